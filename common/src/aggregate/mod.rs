//! Server-side aggregation of client updates.
//!
//! In: the round's global trainable tensors (a [`TensorSet`]: for Fed-SB every `…lora_R.weight` plus the
//! classifier head, if any) passed to [`Aggregator::begin`], then one update per client (a [`TensorSet`] with
//! exactly the same names and shapes, f32/bf16/f16) and its weight, passed to [`Aggregator::add`] as the
//! updates arrive. Out: an [`Aggregate`] from [`Aggregator::finish`]: the new global tensors (f32) and, for
//! FedEx-LoRA and FLoRA, the round's product blob that every client folds into its frozen base weights
//! (`product.rs`).
//!
//! **Invariant:** aggregation is streaming. An aggregator keeps a running state whose size does not grow
//! with the number of clients: O(adapter) for a mean (one f64 sum per value plus the total weight), and
//! O(min(c·r(d+k), d·k)) per layer for the products of FedEx-LoRA and FLoRA (stacked factors while smaller
//! than the dense matrix, then a dense sum). A rejected update changes nothing.
mod mean;
mod methods;
pub mod product;

pub use mean::TensorMean;
pub use methods::{
    FLoraAggregator, FedExLoraAggregator, FedItAggregator, FedSbAggregator, FfaLoraAggregator, lora_factors,
};

use crate::{Method, Result, TensorSet};

/// What a round's aggregation produces.
#[derive(Debug)]
pub struct Aggregate {
    /// The new global trainable tensors that clients start the next round from (f32). For FLoRA only the
    /// head: its adapters restart from their initial values every round.
    pub global: TensorSet,
    /// FedEx-LoRA and FLoRA: the weighted mean of the clients' `Bᵢ·Aᵢ` ([`product`]), which every client folds
    /// into its frozen base weights. `None` for the other methods.
    pub product: Option<TensorSet>,
}

/// One aggregation method (Fed-SB, FedIT, FFA-LoRA, FedEx-LoRA, FLoRA).
pub trait Aggregator: Send {
    /// The method aggregated.
    fn method(&self) -> Method;
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
    /// The round's [`Aggregate`], or an error when no update was added. Resets for the next `begin`.
    fn finish(&mut self) -> Result<Aggregate>;
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

/// The aggregator for `method`. `restart` is the run's initial adapter (the init blob's `lora_A`/`lora_B`): FLoRA's clients restart from it
/// every round; the other methods ignore it.
pub fn make_aggregator(method: Method, weighting: Weighting, restart: &TensorSet) -> Result<Box<dyn Aggregator>> {
    Ok(match method {
        Method::FedSb => Box::new(FedSbAggregator::new(weighting)),
        Method::FedIt => Box::new(FedItAggregator::new(weighting)),
        Method::FfaLora => Box::new(FfaLoraAggregator::new(weighting)),
        Method::FedExLora => Box::new(FedExLoraAggregator::new(weighting)),
        Method::FLora => Box::new(FLoraAggregator::new(weighting, restart)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn make_aggregator_knows_every_method() {
        let mut restart = TensorSet::new();
        let dev = candle_core::Device::Cpu;
        restart.insert("m.lora_A.weight", candle_core::Tensor::zeros((2, 3), candle_core::DType::F32, &dev).unwrap());
        restart.insert("m.lora_B.weight", candle_core::Tensor::zeros((4, 2), candle_core::DType::F32, &dev).unwrap());
        for m in Method::ALL {
            let a = make_aggregator(m, Weighting::Uniform, &restart).unwrap();
            assert_eq!(a.method(), m);
            assert_eq!(a.count(), 0);
            assert_eq!(m.folds_base(), matches!(m.name(), "fedex-lora" | "flora"));
        }
        assert!(
            make_aggregator(Method::FLora, Weighting::Uniform, &TensorSet::new()).is_err(),
            "no adapter to restart"
        );
        // An unknown name is refused where it is parsed, before an aggregator is asked for.
        let msg = "fedavg".parse::<Method>().unwrap_err().to_string();
        assert!(msg.contains("fedavg") && msg.contains("fedsb"), "{msg}");
    }

    #[test]
    fn weighting_serde_is_kebab_case() {
        assert_eq!(serde_json::to_string(&Weighting::NumExamples).unwrap(), "\"num-examples\"");
        assert_eq!(serde_json::from_str::<Weighting>("\"uniform\"").unwrap(), Weighting::Uniform);
        assert_eq!(Weighting::default(), Weighting::Uniform);
    }
}
