//! Adapters injected into frozen linear layers, by module name.
//!
//! - **LoRA-SB**: `W = W0 + s·B·R·A`; `B` (d_out×r) and `A` (r×d_in) frozen and identical on every client,
//!   only `R` (r×r) trained. `s = alpha / r`, 1 by default (alpha = r), as in the LoRA-SB code.
//! - **LoRA**: `W = W0 + s·B·A`, both trained; `A` Kaiming-uniform, `B` zero at init.
//! - **FFA-LoRA**: LoRA with `A` frozen (drawn from a seed shared by every client), only `B` trained.
//!
//! Every tensor of an adapter has a stable name, `<module path>.lora_{A,B,R}.weight`, so an adapter is a
//! [`crate::TensorSet`] that can be saved, sent and averaged without knowing the model.
pub mod init;
pub mod linear;
pub mod svd;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

pub use linear::{AdaptedLinear, Adapter};

/// Which adapter parameterization is injected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AdapterKind {
    /// `W0 + s·B·R·A`, only `R` trained.
    LoraSb,
    /// `W0 + s·B·A`, `A` and `B` trained.
    Lora,
    /// `W0 + s·B·A`, `A` frozen from a shared seed, `B` trained.
    FfaLora,
}

impl AdapterKind {
    /// The name used on the command line and in files.
    pub fn as_str(self) -> &'static str {
        match self {
            AdapterKind::LoraSb => "lora-sb",
            AdapterKind::Lora => "lora",
            AdapterKind::FfaLora => "ffa-lora",
        }
    }
}

impl std::str::FromStr for AdapterKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "lora-sb" | "lorasb" | "sb" => Ok(AdapterKind::LoraSb),
            "lora" => Ok(AdapterKind::Lora),
            "ffa-lora" | "ffa" => Ok(AdapterKind::FfaLora),
            other => Err(Error::Adapter(format!("unknown adapter `{other}` (expected lora-sb, lora or ffa-lora)"))),
        }
    }
}

impl std::fmt::Display for AdapterKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What to inject where: kind, rank, scaling and target modules.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    /// The parameterization.
    pub kind: AdapterKind,
    /// The rank r.
    pub rank: usize,
    /// The LoRA alpha; the adapter path is scaled by `alpha / rank`. Defaults to `rank` (scale 1).
    pub alpha: f64,
    /// Target module kinds, e.g. `q,k,v,o,gate,up,down` (Llama) or
    /// `query,value,attention.output.dense,output.dense` (BERT).
    pub targets: Vec<String>,
    /// Seed for the random parts of the init (LoRA's A, FFA-LoRA's shared A).
    pub seed: u64,
}

impl AdapterConfig {
    /// A config with `alpha = rank` and seed 42.
    pub fn new(kind: AdapterKind, rank: usize, targets: &[&str]) -> Self {
        Self { kind, rank, alpha: rank as f64, targets: targets.iter().map(|s| s.to_string()).collect(), seed: 42 }
    }

    /// The scale `alpha / rank` applied to the adapter path.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// Checks the rank and resolves the targets against the module kinds a model has. Returns the kinds
    /// to adapt, each once, in the model's order.
    pub fn resolve_targets(&self, model_kinds: &[&'static str]) -> Result<Vec<&'static str>> {
        if self.rank == 0 {
            return Err(Error::Adapter("rank must be at least 1".into()));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(Error::Adapter(format!("alpha must be positive and finite, got {}", self.alpha)));
        }
        if self.targets.is_empty() {
            return Err(Error::Adapter("no target modules given".into()));
        }
        let mut out: Vec<&'static str> = Vec::new();
        for t in &self.targets {
            let t = t.trim();
            if t == "all" {
                out.extend(model_kinds.iter().copied());
                continue;
            }
            // Accept the Hugging Face projection names too (`q_proj` for `q`).
            let short = t.strip_suffix("_proj").unwrap_or(t);
            match model_kinds.iter().find(|k| **k == short) {
                Some(k) => out.push(k),
                None => {
                    return Err(Error::Adapter(format!(
                        "unknown target module `{t}` for this model (valid: {}, or all)",
                        model_kinds.join(", ")
                    )));
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        let mut ordered: Vec<&'static str> = model_kinds.iter().copied().filter(|k| out.contains(k)).collect();
        ordered.retain(|k| seen.insert(*k));
        Ok(ordered)
    }
}

/// Parses a comma-separated target list (`q,k,v` or `query,value`).
pub fn parse_targets(s: &str) -> Vec<String> {
    s.split(',').map(|x| x.trim().to_string()).filter(|x| !x.is_empty()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA: &[&str] = &["q", "k", "v", "o", "gate", "up", "down"];

    #[test]
    fn targets_resolve_in_model_order_once() {
        let c = AdapterConfig::new(AdapterKind::LoraSb, 8, &["down", "q_proj", "q"]);
        assert_eq!(c.resolve_targets(LLAMA).unwrap(), vec!["q", "down"]);
        let all = AdapterConfig::new(AdapterKind::Lora, 8, &["all"]);
        assert_eq!(all.resolve_targets(LLAMA).unwrap().len(), 7);
    }

    #[test]
    fn bad_targets_and_ranks_are_refused() {
        let e = AdapterConfig::new(AdapterKind::LoraSb, 8, &["query"]).resolve_targets(LLAMA).unwrap_err();
        assert!(e.to_string().contains("valid: q, k"), "{e}");
        assert!(AdapterConfig::new(AdapterKind::LoraSb, 0, &["q"]).resolve_targets(LLAMA).is_err());
        assert!(AdapterConfig::new(AdapterKind::LoraSb, 4, &[]).resolve_targets(LLAMA).is_err());
        assert!("nope".parse::<AdapterKind>().is_err());
        assert_eq!("ffa".parse::<AdapterKind>().unwrap(), AdapterKind::FfaLora);
    }
}
