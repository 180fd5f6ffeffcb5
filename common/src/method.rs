//! [`Method`]: the federated LoRA method of a run, parsed once where a name comes in (the TOML config, a CLI
//! flag, the run spec on the wire) and carried as this enum everywhere inside.
//!
//! In: a name, `fedsb`, `fedit`, `ffa-lora`, `fedex-lora` or `flora` (exact, as in configs and on the wire).
//! Out: the method and the facts the coordinator, the clients and the planner ask of it: the adapter it trains,
//! whether it folds a product into the base weights, whether its adapters restart every round.
//!
//! **Invariant:** [`Method::name`], `Display`, `FromStr` and serde use the same names, so a spec written by one
//! version of the code reads back unchanged; an unknown name is refused with the list of the known ones.
use serde::{Deserialize, Deserializer, Serialize};

use crate::adapter::AdapterKind;
use crate::{Error, Result};

/// A federated LoRA method.
/// Ordered by name, so a map keyed by method lists them as one keyed by name did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Method {
    /// Fed-SB: only R (r×r) travels.
    #[serde(rename = "fedsb")]
    FedSb,
    /// FedIT: A and B averaged separately.
    #[serde(rename = "fedit")]
    FedIt,
    /// FFA-LoRA: A frozen, B averaged.
    #[serde(rename = "ffa-lora")]
    FfaLora,
    /// FedEx-LoRA: FedIT plus the residual folded into the base weights.
    #[serde(rename = "fedex-lora")]
    FedExLora,
    /// FLoRA: stacked factors merged into the base weights.
    #[serde(rename = "flora")]
    FLora,
}

/// The methods in the order error messages and docs list them (Fed-SB first).
const LISTED: [Method; 5] = [Method::FedSb, Method::FedIt, Method::FfaLora, Method::FedExLora, Method::FLora];

impl Method {
    /// Every method, in the paper's table order.
    pub const ALL: [Method; 5] = [Method::FedIt, Method::FfaLora, Method::FedExLora, Method::FLora, Method::FedSb];

    /// The name on the command line, in configs and on the wire.
    pub fn name(self) -> &'static str {
        match self {
            Method::FedSb => "fedsb",
            Method::FedIt => "fedit",
            Method::FfaLora => "ffa-lora",
            Method::FedExLora => "fedex-lora",
            Method::FLora => "flora",
        }
    }

    /// The known names, comma-separated, Fed-SB first (for messages).
    pub fn names() -> String {
        LISTED.map(Method::name).join(", ")
    }

    /// The adapter the method trains: LoRA-SB for Fed-SB, LoRA for FedIT, FedEx-LoRA and FLoRA, FFA-LoRA (A
    /// frozen) for FFA-LoRA.
    pub fn adapter_kind(self) -> AdapterKind {
        match self {
            Method::FedSb => AdapterKind::LoraSb,
            Method::FedIt | Method::FedExLora | Method::FLora => AdapterKind::Lora,
            Method::FfaLora => AdapterKind::FfaLora,
        }
    }

    /// Whether every round folds a product into the clients' base weights (FedEx-LoRA, FLoRA).
    pub fn folds_base(self) -> bool {
        matches!(self, Method::FedExLora | Method::FLora)
    }

    /// Whether the fold is the residual `mean(Bᵢ·Aᵢ) − B̄·Ā`, which needs the round's global adapter
    /// (FedEx-LoRA); FLoRA folds the whole mean product.
    pub fn folds_residual(self) -> bool {
        self == Method::FedExLora
    }

    /// Whether the adapters restart from the init blob every round, so the served global is only the head
    /// (FLoRA).
    pub fn restarts_adapters(self) -> bool {
        self == Method::FLora
    }

    /// What one adapted layer's update holds, in words (the analytic minimum's explanation).
    pub fn update_values(self) -> &'static str {
        match self {
            Method::FedSb => "r² values",
            Method::FfaLora => "d·r values (B)",
            Method::FedIt | Method::FedExLora | Method::FLora => "r·(d+k) values (A and B)",
        }
    }
}

impl Ord for Method {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.name().cmp(other.name())
    }
}

impl PartialOrd for Method {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Method {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        LISTED
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| Error::Config(format!("unknown method `{s}` (known: {})", Method::names())))
    }
}

/// By name, with [`FromStr`](std::str::FromStr)'s message for an unknown one.
impl<'de> Deserialize<'de> for Method {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_round_trips_through_fromstr_display_and_serde() {
        let names: Vec<&str> = LISTED.iter().map(|m| m.name()).collect();
        assert_eq!(names, ["fedsb", "fedit", "ffa-lora", "fedex-lora", "flora"]);
        for m in Method::ALL {
            assert_eq!(m.name().parse::<Method>().unwrap(), m);
            assert_eq!(m.to_string(), m.name());
            let json = serde_json::to_string(&m).unwrap();
            assert_eq!(json, format!("\"{}\"", m.name()));
            assert_eq!(serde_json::from_str::<Method>(&json).unwrap(), m);
        }
    }

    #[test]
    fn an_unknown_name_is_refused_with_the_known_ones() {
        for bad in ["fedavg", "FedSB", "", "ffa"] {
            let msg = bad.parse::<Method>().unwrap_err().to_string();
            assert!(msg.contains(&format!("`{bad}`")) && msg.contains(&Method::names()), "{msg}");
            let msg = serde_json::from_str::<Method>(&format!("\"{bad}\"")).unwrap_err().to_string();
            assert!(msg.contains(&format!("`{bad}`")) && msg.contains("fedex-lora"), "{msg}");
        }
        assert!(serde_json::from_str::<Method>("3").is_err());
    }

    #[test]
    fn facts_match_the_methods() {
        use AdapterKind::*;
        let kinds = LISTED.map(Method::adapter_kind);
        assert_eq!(kinds, [LoraSb, Lora, FfaLora, Lora, Lora]);
        assert_eq!(LISTED.map(Method::folds_base), [false, false, false, true, true]);
        assert_eq!(LISTED.map(Method::folds_residual), [false, false, false, true, false]);
        assert_eq!(LISTED.map(Method::restarts_adapters), [false, false, false, false, true]);
    }

    #[test]
    fn methods_order_by_name() {
        let mut sorted = LISTED;
        sorted.sort();
        assert_eq!(sorted.map(Method::name), ["fedex-lora", "fedit", "fedsb", "ffa-lora", "flora"]);
    }
}
