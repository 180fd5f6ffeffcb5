//! The aggregation methods: which trainable tensors each federated LoRA method averages, and whether the
//! average of the factors is the average of the clients' weight updates (method.md §4). All three average
//! with [`TensorMean`]; the head of a classifier, linear in its own parameters, is averaged exactly by all.
use super::mean::TensorMean;
use super::{Aggregator, Weighting};
use crate::{Error, Result, TensorSet};

/// Checks that the global trainable set holds only the adapter tensors `allowed` (name suffixes) and head
/// tensors, with at least one adapter tensor.
fn check_layout(method: &str, global: &TensorSet, allowed: &[&str]) -> Result<()> {
    let mut adapters = 0;
    for name in global.names() {
        let is_adapter = name.contains(".lora_");
        if is_adapter && !allowed.iter().any(|s| name.ends_with(s)) {
            return Err(Error::Config(format!(
                "{method} averages only {} (and the head), but the run's trainable set holds `{name}`",
                allowed.join(", ")
            )));
        }
        adapters += usize::from(is_adapter);
    }
    if adapters == 0 {
        return Err(Error::Config(format!("{method}: the run's trainable set has no adapter tensor")));
    }
    Ok(())
}

macro_rules! delegate_to_mean {
    () => {
        fn validate(&self, update: &TensorSet, weight: f64) -> Result<()> {
            self.0.validate(update, weight)
        }
        fn add(&mut self, update: &TensorSet, weight: f64) -> Result<()> {
            self.0.add(update, weight)
        }
        fn count(&self) -> usize {
            self.0.count()
        }
        fn finish(&mut self) -> Result<TensorSet> {
            self.0.finish()
        }
    };
}

/// Fed-SB: `R̄ = mean(Rᵢ)` per adapted layer (`CERT-Lab/fed-sb:fed_agg.py::aggregate_models_fed_sb`).
///
/// **Exact.** All clients share the frozen `B` and `A` of the LoRA-SB init, so a layer's update `s·B·R·A`
/// is linear in `R` and `B·mean(Rᵢ)·A = mean(B·Rᵢ·A)`.
#[derive(Debug)]
pub struct FedSbAggregator(TensorMean);

impl FedSbAggregator {
    /// An aggregator with no open round.
    pub fn new(weighting: Weighting) -> Self {
        Self(TensorMean::new("fedsb", weighting))
    }
}

impl Aggregator for FedSbAggregator {
    fn name(&self) -> &'static str {
        "fedsb"
    }
    fn begin(&mut self, global: &TensorSet) -> Result<()> {
        check_layout("fedsb", global, &[".lora_R.weight"])?;
        self.0.begin(global)
    }
    delegate_to_mean!();
}

/// FedIT (arXiv 2305.05644): clients train `A` and `B`; `Ā = mean(Aᵢ)` and `B̄ = mean(Bᵢ)` separately.
///
/// **Inexact.** `B̄·Ā ≠ mean(Bᵢ·Aᵢ)` in general: the global update differs from the mean of the clients'
/// updates by the cross terms (measured in this module's tests, and what FedEx-LoRA corrects).
#[derive(Debug)]
pub struct FedItAggregator(TensorMean);

impl FedItAggregator {
    /// An aggregator with no open round.
    pub fn new(weighting: Weighting) -> Self {
        Self(TensorMean::new("fedit", weighting))
    }
}

impl Aggregator for FedItAggregator {
    fn name(&self) -> &'static str {
        "fedit"
    }
    fn begin(&mut self, global: &TensorSet) -> Result<()> {
        check_layout("fedit", global, &[".lora_A.weight", ".lora_B.weight"])?;
        self.0.begin(global)
    }
    delegate_to_mean!();
}

/// FFA-LoRA (arXiv 2403.12313): `A` frozen from a seed shared by every client, only `B` trained;
/// `B̄ = mean(Bᵢ)`.
///
/// **Exact.** With a shared `A`, `B̄·A = mean(Bᵢ·A)`.
#[derive(Debug)]
pub struct FfaLoraAggregator(TensorMean);

impl FfaLoraAggregator {
    /// An aggregator with no open round.
    pub fn new(weighting: Weighting) -> Self {
        Self(TensorMean::new("ffa-lora", weighting))
    }
}

impl Aggregator for FfaLoraAggregator {
    fn name(&self) -> &'static str {
        "ffa-lora"
    }
    fn begin(&mut self, global: &TensorSet) -> Result<()> {
        check_layout("ffa-lora", global, &[".lora_B.weight"])?;
        self.0.begin(global)
    }
    delegate_to_mean!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};
    use rand::SeedableRng;
    use rand_distr::{Distribution, StandardNormal};

    const L: &str = "model.layers.0.self_attn.q_proj";

    fn randn(rng: &mut rand::rngs::StdRng, shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| StandardNormal.sample(rng)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn set(items: &[(&str, &Tensor)]) -> TensorSet {
        let mut s = TensorSet::new();
        for (n, t) in items {
            s.insert(format!("{L}.{n}"), (*t).clone());
        }
        s
    }

    fn run(agg: &mut dyn Aggregator, updates: &[TensorSet]) -> TensorSet {
        agg.begin(&updates[0]).unwrap();
        for u in updates {
            agg.add(u, 1.0).unwrap();
        }
        agg.finish().unwrap()
    }

    /// max |X − Y| / max |Y|.
    fn rel_diff(x: &Tensor, y: &Tensor) -> f32 {
        let scale = y.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let d = (x - y).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        d / scale
    }

    fn mean_of_products(bs: &[Tensor], as_: &[Tensor]) -> Tensor {
        let prods: Vec<Tensor> = bs.iter().zip(as_).map(|(b, a)| b.matmul(a).unwrap()).collect();
        (Tensor::stack(&prods, 0).unwrap().sum(0).unwrap() / bs.len() as f64).unwrap()
    }

    #[test]
    fn ffa_lora_is_exact_and_fedit_is_not_and_its_deviation_is_measured() {
        let (d, r, k, c) = (24, 4, 16, 5);
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let a_shared = randn(&mut rng, &[r, k]);
        let bs: Vec<Tensor> = (0..c).map(|_| randn(&mut rng, &[d, r])).collect();
        let as_: Vec<Tensor> = (0..c).map(|_| randn(&mut rng, &[r, k])).collect();

        // FFA-LoRA: B̄·A = mean(Bᵢ·A).
        let ffa: Vec<TensorSet> = bs.iter().map(|b| set(&[("lora_B.weight", b)])).collect();
        let g = run(&mut FfaLoraAggregator::new(Weighting::Uniform), &ffa);
        let b_bar = g.require(&format!("{L}.lora_B.weight")).unwrap();
        let shared: Vec<Tensor> = (0..c).map(|_| a_shared.clone()).collect();
        let e = rel_diff(&b_bar.matmul(&a_shared).unwrap(), &mean_of_products(&bs, &shared));
        assert!(e < 1e-5, "FFA-LoRA is exact: {e}");

        // FedIT: B̄·Ā differs from mean(Bᵢ·Aᵢ); the deviation is large for independent factors.
        let fedit: Vec<TensorSet> =
            bs.iter().zip(&as_).map(|(b, a)| set(&[("lora_A.weight", a), ("lora_B.weight", b)])).collect();
        let g = run(&mut FedItAggregator::new(Weighting::Uniform), &fedit);
        let (a_bar, b_bar) =
            (g.require(&format!("{L}.lora_A.weight")).unwrap(), g.require(&format!("{L}.lora_B.weight")).unwrap());
        let e = rel_diff(&b_bar.matmul(a_bar).unwrap(), &mean_of_products(&bs, &as_));
        eprintln!("FedIT relative deviation |B̄Ā − mean(BᵢAᵢ)| / |mean(BᵢAᵢ)| = {e:.3}");
        assert!(e > 0.1, "FedIT is inexact: {e}");
        // With identical A (the FFA-LoRA situation) FedIT would be exact too: the deviation comes from Aᵢ.
        let same_a: Vec<TensorSet> =
            bs.iter().map(|b| set(&[("lora_A.weight", &a_shared), ("lora_B.weight", b)])).collect();
        let g = run(&mut FedItAggregator::new(Weighting::Uniform), &same_a);
        let b_bar = g.require(&format!("{L}.lora_B.weight")).unwrap();
        assert!(rel_diff(&b_bar.matmul(&a_shared).unwrap(), &mean_of_products(&bs, &shared)) < 1e-5);
    }

    #[test]
    fn each_method_refuses_a_trainable_set_of_another_method() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let (a, b, r) = (randn(&mut rng, &[2, 3]), randn(&mut rng, &[3, 2]), randn(&mut rng, &[2, 2]));
        let lora = set(&[("lora_A.weight", &a), ("lora_B.weight", &b)]);
        let sb = set(&[("lora_R.weight", &r)]);
        assert!(FedSbAggregator::new(Weighting::Uniform).begin(&lora).is_err());
        assert!(FfaLoraAggregator::new(Weighting::Uniform).begin(&lora).is_err());
        assert!(FedItAggregator::new(Weighting::Uniform).begin(&sb).is_err());
        assert!(FedSbAggregator::new(Weighting::Uniform).begin(&sb).is_ok());
        let head_only: TensorSet = [("classifier.weight".to_string(), a.clone())].into_iter().collect();
        assert!(FedSbAggregator::new(Weighting::Uniform).begin(&head_only).is_err());
    }
}
