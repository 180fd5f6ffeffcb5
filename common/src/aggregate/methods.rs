//! The aggregation methods: which trainable tensors each federated LoRA method averages, and whether the
//! average of the factors is the average of the clients' weight updates (method.md §4). All average with
//! [`TensorMean`]; FedEx-LoRA and FLoRA also accumulate the mean of the clients' products `Bᵢ·Aᵢ`
//! ([`ProductMean`]) that clients fold into their base weights. The head of a classifier, linear in its own
//! parameters, is averaged exactly by all.
use super::mean::TensorMean;
use super::product::ProductMean;
use super::{Aggregate, Aggregator, Weighting};
use crate::{Error, Method, Result, TensorSet};

/// Checks that the global trainable set holds only the adapter tensors `allowed` (name suffixes) and head
/// tensors, with at least one adapter tensor.
fn check_layout(method: Method, global: &TensorSet, allowed: &[&str]) -> Result<()> {
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
        fn finish(&mut self) -> Result<Aggregate> {
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
        Self(TensorMean::new(Method::FedSb, weighting))
    }
}

impl Aggregator for FedSbAggregator {
    fn method(&self) -> Method {
        Method::FedSb
    }
    fn begin(&mut self, global: &TensorSet) -> Result<()> {
        check_layout(Method::FedSb, global, &[".lora_R.weight"])?;
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
        Self(TensorMean::new(Method::FedIt, weighting))
    }
}

impl Aggregator for FedItAggregator {
    fn method(&self) -> Method {
        Method::FedIt
    }
    fn begin(&mut self, global: &TensorSet) -> Result<()> {
        check_layout(Method::FedIt, global, &[".lora_A.weight", ".lora_B.weight"])?;
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
        Self(TensorMean::new(Method::FfaLora, weighting))
    }
}

impl Aggregator for FfaLoraAggregator {
    fn method(&self) -> Method {
        Method::FfaLora
    }
    fn begin(&mut self, global: &TensorSet) -> Result<()> {
        check_layout(Method::FfaLora, global, &[".lora_B.weight"])?;
        self.0.begin(global)
    }
    delegate_to_mean!();
}

/// FedEx-LoRA (arXiv 2410.09432): FedIT's means `Ā`, `B̄` as the new global, plus the product
/// `M = mean(Bᵢ·Aᵢ)`; every client folds the residual `s·(M − B̄·Ā)` into its frozen base weights.
///
/// **Exact.** `W0 + s·(M − B̄Ā) + s·B̄Ā = W0 + s·mean(BᵢAᵢ)`: the global model is the mean of the clients'.
/// The product travels as stacked factors or dense, whichever is smaller ([`super::product`]).
#[derive(Debug)]
pub struct FedExLoraAggregator(MeanAndProduct);

impl FedExLoraAggregator {
    /// An aggregator with no open round.
    pub fn new(weighting: Weighting) -> Self {
        Self(MeanAndProduct::new(Method::FedExLora, weighting))
    }
}

/// The state both product methods keep: the mean of every trainable tensor and the mean of the products
/// `Bᵢ·Aᵢ`, over the same updates and weights.
#[derive(Debug)]
struct MeanAndProduct {
    mean: TensorMean,
    product: Option<ProductMean>,
}

impl MeanAndProduct {
    fn new(method: Method, weighting: Weighting) -> Self {
        Self { mean: TensorMean::new(method, weighting), product: None }
    }
    /// Starts a round whose updates look like `layout`.
    fn begin(&mut self, layout: &TensorSet) -> Result<()> {
        let product = ProductMean::new(layout)?;
        self.mean.begin(layout)?;
        self.product = Some(product);
        Ok(())
    }
    /// Validates against the mean's layout, then adds to both accumulators.
    fn add(&mut self, u: &TensorSet, w: f64) -> Result<()> {
        let p = self.product.as_mut().ok_or_else(|| Error::Config("no round begun (call begin first)".into()))?;
        self.mean.validate(u, w)?;
        p.add(u, self.mean.effective_weight(w))?;
        self.mean.add(u, w)
    }
    /// The means and the product blob; resets for the next `begin`.
    fn finish(&mut self) -> Result<(TensorSet, Option<TensorSet>)> {
        let product = self.product.as_ref().map(ProductMean::finish).transpose()?;
        let mean = self.mean.finish_mean()?;
        self.product = None;
        Ok((mean, product))
    }
}

/// The product methods' `validate` and `count`, from their [`MeanAndProduct`].
macro_rules! delegate_to_mean_and_product {
    () => {
        fn validate(&self, update: &TensorSet, weight: f64) -> Result<()> {
            self.state().mean.validate(update, weight)
        }
        fn add(&mut self, update: &TensorSet, weight: f64) -> Result<()> {
            self.state_mut().add(update, weight)
        }
        fn count(&self) -> usize {
            self.state().mean.count()
        }
    };
}

impl FedExLoraAggregator {
    fn state(&self) -> &MeanAndProduct {
        &self.0
    }
    fn state_mut(&mut self) -> &mut MeanAndProduct {
        &mut self.0
    }
}

impl Aggregator for FedExLoraAggregator {
    fn method(&self) -> Method {
        Method::FedExLora
    }
    fn begin(&mut self, global: &TensorSet) -> Result<()> {
        check_layout(Method::FedExLora, global, &[".lora_A.weight", ".lora_B.weight"])?;
        self.0.begin(global)
    }
    delegate_to_mean_and_product!();
    fn finish(&mut self) -> Result<Aggregate> {
        let (global, product) = self.0.finish()?;
        Ok(Aggregate { global, product })
    }
}

/// The `lora_A`/`lora_B` tensors of `set` (a LoRA adapter without its head).
pub fn lora_factors(set: &TensorSet) -> TensorSet {
    set.iter()
        .filter(|(n, _)| n.ends_with(".lora_A.weight") || n.ends_with(".lora_B.weight"))
        .map(|(n, t)| (n.clone(), t.clone()))
        .collect()
}

/// FLoRA (arXiv 2409.05976): the clients' factors stacked — `[p₁B₁ … p_cB_c]·[A₁; …; A_c] = Σ pᵢ·Bᵢ·Aᵢ` —
/// and merged into every client's base weights (`s·M`); the adapters restart from their initial values
/// (the init blob's `A`, `B = 0`) each round, so the global holds only the averaged head, if any.
///
/// **Exact.** The merged model is `W0 + s·Σ pᵢ·BᵢAᵢ`, the weighted mean of the clients' models.
#[derive(Debug)]
pub struct FLoraAggregator {
    state: MeanAndProduct,
    restart: TensorSet,
}

impl FLoraAggregator {
    /// An aggregator with no open round; `restart` holds the initial `lora_A`/`lora_B` of every adapted layer
    /// (other tensors in it are ignored). Every `lora_B` must be zero: the restarted adapter adds nothing, so
    /// folding `s·M` leaves the global model the mean of the clients'. The same `A` is reused every round (FLoRA
    /// draws a new one; any `A` with `B = 0` keeps the fold exact, and this one is already on every client).
    pub fn new(weighting: Weighting, restart: &TensorSet) -> Result<Self> {
        let restart = lora_factors(restart);
        for (n, t) in restart.iter().filter(|(n, _)| n.ends_with(".lora_B.weight")) {
            let max = t.abs()?.flatten_all()?.max(0)?.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
            if max != 0.0 {
                return Err(Error::tensor(n, "FLoRA restarts from B = 0, but this initial lora_B is not zero"));
            }
        }
        ProductMean::new(&restart)?;
        Ok(Self { state: MeanAndProduct::new(Method::FLora, weighting), restart })
    }

    /// What clients train from in a round whose served global is `global` (the head): the restart adapter plus
    /// the global.
    pub fn round_start(restart: &TensorSet, global: &TensorSet) -> TensorSet {
        let mut s = lora_factors(restart);
        for (n, t) in global.iter() {
            s.insert(n.clone(), t.clone());
        }
        s
    }

    fn state(&self) -> &MeanAndProduct {
        &self.state
    }
    fn state_mut(&mut self) -> &mut MeanAndProduct {
        &mut self.state
    }
}

impl Aggregator for FLoraAggregator {
    fn method(&self) -> Method {
        Method::FLora
    }
    fn begin(&mut self, global: &TensorSet) -> Result<()> {
        if let Some(n) = global.names().find(|n| n.contains(".lora_")) {
            return Err(Error::Config(format!(
                "flora: the served global holds only the head (adapters restart each round), not `{n}`"
            )));
        }
        self.state.begin(&Self::round_start(&self.restart, global))
    }
    delegate_to_mean_and_product!();
    fn finish(&mut self) -> Result<Aggregate> {
        let (mean, product) = self.state.finish()?;
        // The averaged factors are not used: the adapters restart; only the head carries over.
        let global = mean.iter().filter(|(n, _)| !n.contains(".lora_")).map(|(n, t)| (n.clone(), t.clone())).collect();
        Ok(Aggregate { global, product })
    }
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
        agg.finish().unwrap().global
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

    /// Property: after FedEx-LoRA's or FLoRA's fold, the global model `W0 + fold + s·(global adapter)` equals
    /// the (weighted) mean of the clients' models `W0 + s·BᵢAᵢ`, with the product in factor and dense form.
    #[test]
    fn fedex_lora_and_flora_give_the_mean_of_the_client_models() {
        use crate::aggregate::product::base_deltas;
        let scale = 2.0;
        for (seed, (d, r, k, c)) in [(21u64, (24, 2, 16, 3)), (22, (6, 3, 5, 4)), (23, (40, 4, 8, 2))] {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let w0 = randn(&mut rng, &[d, k]);
            let clients: Vec<(Tensor, Tensor)> =
                (0..c).map(|_| (randn(&mut rng, &[d, r]), randn(&mut rng, &[r, k]))).collect();
            let weights: Vec<f64> = (1..=c).map(|i| i as f64).collect();
            let total: f64 = weights.iter().sum();
            let mut want = w0.clone();
            for ((b, a), w) in clients.iter().zip(&weights) {
                want = (want + (b.matmul(a).unwrap() * (scale * w / total)).unwrap()).unwrap();
            }
            let updates: Vec<TensorSet> =
                clients.iter().map(|(b, a)| set(&[("lora_A.weight", a), ("lora_B.weight", b)])).collect();
            let apply = |agg: &mut dyn Aggregator, start: &TensorSet, restart: Option<&TensorSet>| {
                agg.begin(start).unwrap();
                for (u, w) in updates.iter().zip(&weights) {
                    agg.add(u, *w).unwrap();
                }
                let out = agg.finish().unwrap();
                let product = out.product.expect("a product");
                let fedex = restart.is_none();
                let deltas = base_deltas(&product, fedex.then_some(&out.global), scale).unwrap();
                assert_eq!(deltas.len(), 1);
                let adapter = if fedex { out.global } else { restart.unwrap().clone() };
                let ba = adapter
                    .require(&format!("{L}.lora_B.weight"))
                    .unwrap()
                    .matmul(adapter.require(&format!("{L}.lora_A.weight")).unwrap())
                    .unwrap();
                let got = ((&w0 + &deltas[0].1).unwrap() + (ba * scale).unwrap()).unwrap();
                rel_diff(&got, &want)
            };
            let e = apply(&mut FedExLoraAggregator::new(Weighting::NumExamples), &updates[0], None);
            assert!(e < 1e-5, "FedEx-LoRA is exact ({d}×{k}, r {r}, {c} clients): {e}");
            let restart = set(&[
                ("lora_A.weight", &randn(&mut rng, &[r, k])),
                ("lora_B.weight", &Tensor::zeros((d, r), candle_core::DType::F32, &Device::Cpu).unwrap()),
            ]);
            let mut flora = FLoraAggregator::new(Weighting::NumExamples, &restart).unwrap();
            let e = apply(&mut flora, &TensorSet::new(), Some(&restart));
            assert!(e < 1e-5, "FLoRA is exact ({d}×{k}, r {r}, {c} clients): {e}");
        }
    }

    #[test]
    fn flora_serves_only_the_head_and_checks_updates_against_the_restart_adapter() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let (a, b) = (randn(&mut rng, &[2, 3]), randn(&mut rng, &[4, 2]));
        let head = randn(&mut rng, &[2, 4]);
        let nonzero_b = set(&[("lora_A.weight", &a), ("lora_B.weight", &b)]);
        let msg = FLoraAggregator::new(Weighting::Uniform, &nonzero_b).err().unwrap().to_string();
        assert!(msg.contains("B = 0"), "{msg}");
        let zero_b = b.zeros_like().unwrap();
        let restart = set(&[("lora_A.weight", &a), ("lora_B.weight", &zero_b)]);
        let global: TensorSet = [("classifier.weight".to_string(), head.clone())].into_iter().collect();
        let mut agg = FLoraAggregator::new(Weighting::Uniform, &restart).unwrap();
        assert!(agg.begin(&restart).is_err(), "the served global must not hold adapters");
        agg.begin(&global).unwrap();
        assert!(agg.add(&global, 1.0).is_err(), "an update without the adapter");
        let full = FLoraAggregator::round_start(&restart, &global);
        agg.add(&full, 1.0).unwrap();
        let out = agg.finish().unwrap();
        assert_eq!(out.global.names().cloned().collect::<Vec<_>>(), vec!["classifier.weight".to_string()]);
        assert!(out.product.is_some());
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
        assert!(FedExLoraAggregator::new(Weighting::Uniform).begin(&sb).is_err());
        assert!(FedExLoraAggregator::new(Weighting::Uniform).begin(&lora).is_ok());
        assert!(FLoraAggregator::new(Weighting::Uniform, &sb).is_err());
        let head_only: TensorSet = [("classifier.weight".to_string(), a.clone())].into_iter().collect();
        assert!(FedSbAggregator::new(Weighting::Uniform).begin(&head_only).is_err());
    }
}
