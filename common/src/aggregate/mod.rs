//! Server-side aggregation of client updates.
//!
//! In: the round's global trainable tensors (a [`TensorSet`]: for Fed-SB every `…lora_R.weight` plus the
//! classifier head, if any) passed to [`Aggregator::begin`], then one update per client (a [`TensorSet`] with
//! exactly the same names and shapes, f32/bf16/f16) and its weight, passed to [`Aggregator::add`] as the
//! updates arrive. Out: the new global tensors (f32) from [`Aggregator::finish`].
//!
//! **Invariant:** aggregation is streaming. An aggregator keeps a running state whose size is O(adapter)
//! (for a mean, one f64 sum per value plus the total weight), never a list of client updates, so memory
//! does not grow with the number of clients. A rejected update changes nothing.
mod mean;
mod methods;

pub use mean::TensorMean;
pub use methods::{FedItAggregator, FedSbAggregator, FfaLoraAggregator};

use crate::{Error, Result, TensorSet};

/// The method names [`make_aggregator`] knows.
pub const METHODS: &[&str] = &["fedsb", "fedit", "ffa-lora"];

/// One aggregation method (Fed-SB, FedIT, FFA-LoRA; FedEx-LoRA and FLoRA, which also change the base
/// weights, come later behind the same trait).
pub trait Aggregator: Send {
    /// Method name as used in configs ("fedsb").
    fn name(&self) -> &'static str;
    /// Starts a round whose global trainable tensors are `global` (names, shapes define what updates must
    /// look like). Discards any state of a previous, unfinished round.
    fn begin(&mut self, global: &TensorSet) -> Result<()>;
    /// Checks an update without changing any state: same names as the global set (no missing, no extra),
    /// same shapes, f32/bf16/f16 dtype, all values finite, weight finite and > 0. Error messages name the
    /// tensor and the problem.
    fn validate(&self, update: &TensorSet, weight: f64) -> Result<()>;
    /// Validates, then adds the update to the running state. On error nothing changes.
    fn add(&mut self, update: &TensorSet, weight: f64) -> Result<()>;
    /// Number of updates added this round.
    fn count(&self) -> usize;
    /// The new global tensors (f32), or an error when no update was added. Resets for the next `begin`.
    fn finish(&mut self) -> Result<TensorSet>;
}

/// How client updates are weighted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Weighting {
    /// Every update counts once: the paper's unweighted mean (the default). The weight given to `add` is
    /// still validated but otherwise ignored.
    #[default]
    Uniform,
    /// Updates are weighted by the weight given to `add`, normally the client's number of training examples.
    NumExamples,
}

/// The aggregator for `method` (one of [`METHODS`]), or [`Error::Config`] listing the known methods.
pub fn make_aggregator(method: &str, weighting: Weighting) -> Result<Box<dyn Aggregator>> {
    match method {
        "fedsb" => Ok(Box::new(FedSbAggregator::new(weighting))),
        "fedit" => Ok(Box::new(FedItAggregator::new(weighting))),
        "ffa-lora" => Ok(Box::new(FfaLoraAggregator::new(weighting))),
        other => {
            Err(Error::Config(format!("unknown aggregation method `{other}`; known methods: {}", METHODS.join(", "))))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn make_aggregator_knows_the_methods_it_lists() {
        for m in METHODS {
            let a = make_aggregator(m, Weighting::Uniform).unwrap();
            assert_eq!(a.name(), *m);
            assert_eq!(a.count(), 0);
        }
        assert!(make_aggregator("flora", Weighting::Uniform).is_err(), "not yet");
        let msg = make_aggregator("fedavg", Weighting::Uniform).err().unwrap().to_string();
        assert!(msg.contains("fedavg") && msg.contains("fedsb"), "{msg}");
    }

    #[test]
    fn weighting_serde_is_kebab_case() {
        assert_eq!(serde_json::to_string(&Weighting::NumExamples).unwrap(), "\"num-examples\"");
        assert_eq!(serde_json::from_str::<Weighting>("\"uniform\"").unwrap(), Weighting::Uniform);
        assert_eq!(Weighting::default(), Weighting::Uniform);
    }
}
