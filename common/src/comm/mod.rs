//! Communication accounting: what each round costs on the wire, per client and direction, next to the
//! analytic minimum (the tensor values alone), so measured traffic can be compared with the paper's
//! "# Comm." column (method.md §4). No networking here: the coordinator and clients record what they sent.
pub mod ledger;
pub mod planner;

pub use ledger::{
    ByteLedger, Direction, LedgerEntry, RoundTotals, Transfer, analytic_min_bytes, bytes_per_value, fedsb_min_bytes,
    human_bytes,
};
