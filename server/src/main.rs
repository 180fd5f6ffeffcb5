//! `fedsb-server`: the fedsb coordinator daemon.
//!
//! The coordinator (gRPC service, rounds, Fed-SB aggregation, byte ledger) is built on the local
//! fine-tuning engine in `fedsb-common`; until it lands this binary only says so.
use clap::Parser;

/// fedsb coordinator daemon.
#[derive(Parser)]
#[command(name = "fedsb-server", version, about)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _ = Cli::parse();
    anyhow::bail!(
        "the coordinator daemon is not implemented yet; use `fedsb-client finetune` for local (centralized) \
         fine-tuning"
    )
}
