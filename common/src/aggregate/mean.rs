//! [`TensorMean`]: the streaming (weighted) mean of named tensors that Fed-SB, FedIT and FFA-LoRA aggregate
//! with (`methods.rs` says which tensors each method averages and why the mean is or is not exact).
use candle_core::{DType, Device, Tensor};

use super::{Aggregate, Aggregator, Weighting};
use crate::{Error, Method, Result, TensorSet};

/// The weighted mean `Σ wᵢ·Xᵢ / Σ wᵢ` of every tensor of the global trainable set, with `wᵢ = 1` under
/// [`Weighting::Uniform`].
///
/// The running state is one f64 sum per value plus the total weight (O(adapter) memory, however many
/// clients), so the mean is exact to f64 before the final cast to f32. Updates in bf16/f16 are converted
/// to f32 first.
#[derive(Debug)]
pub struct TensorMean {
    method: Method,
    weighting: Weighting,
    round: Option<RoundState>,
}

/// The state of an open round.
#[derive(Debug)]
struct RoundState {
    /// Names and shapes of the global tensors, in name order.
    layout: Vec<(String, Vec<usize>)>,
    /// Where the result is created (the global set's device).
    device: Device,
    /// Weighted sums, one per tensor of `layout`.
    sums: Vec<Vec<f64>>,
    total_weight: f64,
    count: usize,
}

impl TensorMean {
    /// A mean for `method` (its name in errors) with no open round; call [`Aggregator::begin`] first.
    pub fn new(method: Method, weighting: Weighting) -> Self {
        Self { method, weighting, round: None }
    }

    /// How updates are weighted.
    pub fn weighting(&self) -> Weighting {
        self.weighting
    }

    /// The weight an update given `weight` counts with (1 under [`Weighting::Uniform`]).
    pub fn effective_weight(&self, weight: f64) -> f64 {
        match self.weighting {
            Weighting::Uniform => 1.0,
            Weighting::NumExamples => weight,
        }
    }

    fn open(&self) -> Result<&RoundState> {
        self.round
            .as_ref()
            .ok_or_else(|| Error::Config(format!("{} aggregator: no round begun (call begin first)", self.method)))
    }

    /// Validates `update` and `weight`; returns the update's values as f32, in layout order, and the weight
    /// the update counts with.
    fn check(&self, update: &TensorSet, weight: f64) -> Result<(Vec<Vec<f32>>, f64)> {
        let round = self.open()?;
        if !weight.is_finite() || weight <= 0.0 {
            return Err(Error::Numerics(format!("update weight must be finite and > 0, got {weight}")));
        }
        for name in update.names() {
            if round.layout.binary_search_by(|(n, _)| n.as_str().cmp(name)).is_err() {
                return Err(Error::tensor(name, "unexpected tensor: not in the global trainable set"));
            }
        }
        let mut values = Vec::with_capacity(round.layout.len());
        for (name, shape) in &round.layout {
            let t = update.get(name).ok_or_else(|| Error::tensor(name, "missing from the update"))?;
            if t.dims() != shape.as_slice() {
                return Err(Error::tensor(name, format!("shape {:?}, expected {:?}", t.dims(), shape)));
            }
            if !matches!(t.dtype(), DType::F32 | DType::BF16 | DType::F16) {
                return Err(Error::tensor(name, format!("dtype {:?}, expected f32, bf16 or f16", t.dtype())));
            }
            let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                let bad = v.iter().filter(|x| !x.is_finite()).count();
                return Err(Error::tensor(
                    name,
                    format!("non-finite value {} at index {i} ({bad} non-finite of {})", v[i], v.len()),
                ));
            }
            values.push(v);
        }
        let w = self.effective_weight(weight);
        if !(round.total_weight + w).is_finite() {
            return Err(Error::Numerics(format!("total weight overflows after adding weight {weight}")));
        }
        Ok((values, w))
    }
}

impl Aggregator for TensorMean {
    fn method(&self) -> Method {
        self.method
    }

    fn begin(&mut self, global: &TensorSet) -> Result<()> {
        if global.is_empty() {
            return Err(Error::Config(format!("{} aggregator: the global trainable set has no tensors", self.method)));
        }
        let layout: Vec<(String, Vec<usize>)> = global.iter().map(|(n, t)| (n.clone(), t.dims().to_vec())).collect();
        let device = global.iter().next().map(|(_, t)| t.device().clone()).unwrap_or(Device::Cpu);
        let sums = layout.iter().map(|(_, s)| vec![0f64; s.iter().product()]).collect();
        self.round = Some(RoundState { layout, device, sums, total_weight: 0.0, count: 0 });
        Ok(())
    }

    fn validate(&self, update: &TensorSet, weight: f64) -> Result<()> {
        self.check(update, weight).map(|_| ())
    }

    fn add(&mut self, update: &TensorSet, weight: f64) -> Result<()> {
        let (values, w) = self.check(update, weight)?;
        let round = self.round.as_mut().expect("check succeeded, so a round is open");
        for (sum, v) in round.sums.iter_mut().zip(&values) {
            for (s, x) in sum.iter_mut().zip(v) {
                *s += w * f64::from(*x);
            }
        }
        round.total_weight += w;
        round.count += 1;
        Ok(())
    }

    fn count(&self) -> usize {
        self.round.as_ref().map_or(0, |r| r.count)
    }

    /// The weighted means. With no update added this is an error and the round stays open.
    fn finish(&mut self) -> Result<Aggregate> {
        Ok(Aggregate { global: self.finish_mean()?, product: None })
    }
}

impl TensorMean {
    /// The weighted means (f32), or an error when no update was added. Resets for the next `begin`.
    pub fn finish_mean(&mut self) -> Result<TensorSet> {
        let round = self.open()?;
        if round.count == 0 {
            return Err(Error::Config(format!("{} aggregator: finish with no update added this round", self.method)));
        }
        let mut out = TensorSet::new();
        for ((name, shape), sum) in round.layout.iter().zip(&round.sums) {
            let mean: Vec<f32> = sum.iter().map(|s| (s / round.total_weight) as f32).collect();
            if mean.iter().any(|x| !x.is_finite()) {
                return Err(Error::Numerics(format!("{} aggregator: non-finite mean in `{name}`", self.method)));
            }
            out.insert(name.clone(), Tensor::from_vec(mean, shape.as_slice(), &round.device)?);
        }
        self.round = None;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_distr::{Distribution, StandardNormal};

    const R_NAME: &str = "model.layers.0.self_attn.q_proj.lora_R.weight";
    const R2_NAME: &str = "model.layers.1.mlp.down_proj.lora_R.weight";
    const HEAD_NAME: &str = "classifier.weight";

    fn randn(rng: &mut rand::rngs::StdRng, shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| StandardNormal.sample(rng)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// A random set shaped like a small Fed-SB trainable set: two r×r `R`s and a 3×5 head.
    fn random_set(rng: &mut rand::rngs::StdRng) -> TensorSet {
        let mut s = TensorSet::new();
        s.insert(R_NAME, randn(rng, &[4, 4]));
        s.insert(R2_NAME, randn(rng, &[4, 4]));
        s.insert(HEAD_NAME, randn(rng, &[3, 5]));
        s
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    fn assert_close(a: &TensorSet, b: &TensorSet, tol: f32) {
        assert_eq!(a.names().collect::<Vec<_>>(), b.names().collect::<Vec<_>>());
        for (name, t) in a.iter() {
            let u = b.get(name).unwrap();
            assert_eq!(t.dims(), u.dims(), "{name}");
            for (x, y) in values(t).iter().zip(values(u)) {
                assert!((x - y).abs() <= tol, "{name}: {x} vs {y}");
            }
        }
    }

    fn aggregate(weighting: Weighting, global: &TensorSet, updates: &[(TensorSet, f64)]) -> TensorSet {
        let mut agg = TensorMean::new(Method::FedSb, weighting);
        agg.begin(global).unwrap();
        for (u, w) in updates {
            agg.add(u, *w).unwrap();
        }
        assert_eq!(agg.count(), updates.len());
        agg.finish_mean().unwrap()
    }

    /// The weighted mean computed independently: per tensor, a loop over the updates in f64.
    fn reference_mean(updates: &[(TensorSet, f64)], weighted: bool) -> TensorSet {
        let mut out = TensorSet::new();
        for (name, t) in updates[0].0.iter() {
            let mut acc = vec![0f64; t.elem_count()];
            let mut total = 0f64;
            for (u, w) in updates {
                let w = if weighted { *w } else { 1.0 };
                total += w;
                for (a, x) in acc.iter_mut().zip(values(u.get(name).unwrap())) {
                    *a += w * x as f64;
                }
            }
            let mean: Vec<f32> = acc.iter().map(|a| (a / total) as f32).collect();
            out.insert(name.clone(), Tensor::from_vec(mean, t.dims(), &Device::Cpu).unwrap());
        }
        out
    }

    #[test]
    fn uniform_mean_matches_reference_and_ignores_weights() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let global = random_set(&mut rng);
        let updates: Vec<(TensorSet, f64)> =
            (0..7).map(|i| (random_set(&mut rng), [1.0, 10.0, 3.0, 100.0, 0.5, 2.0, 7.0][i])).collect();
        let got = aggregate(Weighting::Uniform, &global, &updates);
        assert_close(&got, &reference_mean(&updates, false), 1e-6);
        // The weights really were ignored: the weighted mean differs.
        let weighted = reference_mean(&updates, true);
        let diff = (values(got.get(R_NAME).unwrap())[0] - values(weighted.get(R_NAME).unwrap())[0]).abs();
        assert!(diff > 1e-3, "uniform and weighted means should differ here, diff {diff}");
        for (_, t) in got.iter() {
            assert_eq!(t.dtype(), DType::F32);
        }
    }

    #[test]
    fn num_examples_weighted_mean_matches_reference() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let global = random_set(&mut rng);
        let updates: Vec<(TensorSet, f64)> =
            [120.0, 800.0, 33.0, 1.0].iter().map(|w| (random_set(&mut rng), *w)).collect();
        let got = aggregate(Weighting::NumExamples, &global, &updates);
        assert_close(&got, &reference_mean(&updates, true), 1e-6);
        // A hand-checked case: weights 1 and 3 of the values 0 and 4 give 3.
        let mut g = TensorSet::new();
        g.insert("x", Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap());
        let mk = |v: f32| {
            let mut s = TensorSet::new();
            s.insert("x", Tensor::new(&[v, -v], &Device::Cpu).unwrap());
            s
        };
        let got = aggregate(Weighting::NumExamples, &g, &[(mk(0.0), 1.0), (mk(4.0), 3.0)]);
        assert_eq!(values(got.get("x").unwrap()), vec![3.0, -3.0]);
    }

    #[test]
    fn mean_of_r_gives_mean_of_full_updates() {
        let (d, r, k, c) = (24, 6, 16, 5);
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let b = randn(&mut rng, &[d, r]);
        let a = randn(&mut rng, &[r, k]);
        let rs: Vec<Tensor> = (0..c).map(|_| randn(&mut rng, &[r, r])).collect();
        let mut global = TensorSet::new();
        global.insert(R_NAME, Tensor::zeros((r, r), DType::F32, &Device::Cpu).unwrap());
        let updates: Vec<(TensorSet, f64)> = rs
            .iter()
            .map(|ri| {
                let mut s = TensorSet::new();
                s.insert(R_NAME, ri.clone());
                (s, 1.0)
            })
            .collect();
        let r_bar = aggregate(Weighting::Uniform, &global, &updates);
        let lhs = b.matmul(r_bar.get(R_NAME).unwrap()).unwrap().matmul(&a).unwrap();
        let mut sum = Tensor::zeros((d, k), DType::F32, &Device::Cpu).unwrap();
        for ri in &rs {
            sum = (sum + b.matmul(ri).unwrap().matmul(&a).unwrap()).unwrap();
        }
        let rhs = (sum / c as f64).unwrap();
        let (l, rv) = (values(&lhs), values(&rhs));
        let scale = rv.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(scale > 1.0, "non-trivial products");
        for (x, y) in l.iter().zip(&rv) {
            assert!((x - y).abs() <= 1e-5 * scale, "{x} vs {y}");
        }
    }

    #[test]
    fn half_precision_updates_are_converted() {
        let mut g = TensorSet::new();
        g.insert("x", Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap());
        let mut u1 = TensorSet::new();
        u1.insert("x", Tensor::new(&[1f32, 2., 3.], &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap());
        let mut u2 = TensorSet::new();
        u2.insert("x", Tensor::new(&[2f32, 4., -1.], &Device::Cpu).unwrap().to_dtype(DType::F16).unwrap());
        let got = aggregate(Weighting::Uniform, &g, &[(u1, 1.0), (u2, 1.0)]);
        assert_eq!(got.get("x").unwrap().dtype(), DType::F32);
        assert_eq!(values(got.get("x").unwrap()), vec![1.5, 3.0, 1.0]);
    }

    #[test]
    fn invalid_updates_are_rejected_and_change_nothing() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let global = random_set(&mut rng);
        let first = random_set(&mut rng);
        let last = random_set(&mut rng);
        let expected = aggregate(Weighting::NumExamples, &global, &[(first.clone(), 2.0), (last.clone(), 5.0)]);

        let with = |name: &str, t: Tensor| {
            let mut s = first.clone();
            s.insert(name, t);
            s
        };
        let mut poisoned = values(first.get(R2_NAME).unwrap());
        poisoned[5] = f32::NAN;
        let nan = with(R2_NAME, Tensor::from_vec(poisoned.clone(), (4, 4), &Device::Cpu).unwrap());
        poisoned[5] = f32::INFINITY;
        let inf = with(R2_NAME, Tensor::from_vec(poisoned.clone(), (4, 4), &Device::Cpu).unwrap());
        poisoned[5] = f32::NEG_INFINITY;
        let neg_inf = with(HEAD_NAME, Tensor::from_vec(poisoned[..15].to_vec(), (3, 5), &Device::Cpu).unwrap());
        let mut missing = first.clone();
        missing.remove(HEAD_NAME);
        let extra = with("model.layers.9.self_attn.v_proj.lora_R.weight", randn(&mut rng, &[4, 4]));
        let wrong_shape = with(R_NAME, randn(&mut rng, &[4, 5]));
        let transposed_head = with(HEAD_NAME, randn(&mut rng, &[5, 3]));
        let f64_dtype = with(R_NAME, first.get(R_NAME).unwrap().to_dtype(DType::F64).unwrap());

        let cases: Vec<(&str, TensorSet, f64, &[&str])> = vec![
            ("missing", missing, 1.0, &[HEAD_NAME, "missing"]),
            ("extra", extra, 1.0, &["model.layers.9.self_attn.v_proj.lora_R.weight", "unexpected"]),
            ("wrong shape", wrong_shape, 1.0, &[R_NAME, "shape", "[4, 5]", "[4, 4]"]),
            ("transposed head", transposed_head, 1.0, &[HEAD_NAME, "shape"]),
            ("nan", nan, 1.0, &[R2_NAME, "NaN", "index 5"]),
            ("inf", inf, 1.0, &[R2_NAME, "inf", "index 5"]),
            ("-inf", neg_inf, 1.0, &[HEAD_NAME, "-inf"]),
            ("f64", f64_dtype, 1.0, &[R_NAME, "dtype"]),
            ("zero weight", first.clone(), 0.0, &["weight", "0"]),
            ("negative weight", first.clone(), -3.0, &["weight", "-3"]),
            ("nan weight", first.clone(), f64::NAN, &["weight", "NaN"]),
            ("inf weight", first.clone(), f64::INFINITY, &["weight", "inf"]),
        ];
        for (what, bad, w, needles) in cases {
            let mut agg = TensorMean::new(Method::FedSb, Weighting::NumExamples);
            agg.begin(&global).unwrap();
            agg.add(&first, 2.0).unwrap();
            let msg = agg.validate(&bad, w).unwrap_err().to_string();
            let msg2 = agg.add(&bad, w).unwrap_err().to_string();
            assert_eq!(msg, msg2, "{what}");
            for n in needles {
                assert!(msg.contains(n), "{what}: `{msg}` should mention `{n}`");
            }
            assert_eq!(agg.count(), 1, "{what}: count unchanged");
            agg.add(&last, 5.0).unwrap();
            let got = agg.finish_mean().unwrap();
            assert_eq!(got.content_hash().unwrap(), expected.content_hash().unwrap(), "{what}: aggregate unchanged");
        }
    }

    #[test]
    fn uniform_still_validates_the_weight() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let global = random_set(&mut rng);
        let mut agg = TensorMean::new(Method::FedSb, Weighting::Uniform);
        agg.begin(&global).unwrap();
        assert!(agg.add(&random_set(&mut rng), 0.0).is_err());
        assert_eq!(agg.count(), 0);
    }

    #[test]
    fn finish_without_updates_is_an_error_and_keeps_the_round_open() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(6);
        let global = random_set(&mut rng);
        let mut agg = TensorMean::new(Method::FedSb, Weighting::Uniform);
        assert!(agg.finish_mean().is_err(), "no round begun");
        assert!(agg.add(&global, 1.0).unwrap_err().to_string().contains("begin"));
        agg.begin(&global).unwrap();
        let msg = agg.finish_mean().unwrap_err().to_string();
        assert!(msg.contains("no update"), "{msg}");
        let u = random_set(&mut rng);
        agg.add(&u, 1.0).unwrap();
        assert_close(&agg.finish_mean().unwrap(), &u, 0.0);
        // finish reset the state: no round is open any more.
        assert_eq!(agg.count(), 0);
        assert!(agg.finish_mean().is_err());
        assert!(agg.add(&u, 1.0).is_err());
        assert!(agg.begin(&TensorSet::new()).is_err(), "an empty global set is rejected");
    }

    #[test]
    fn begin_resets() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let global = random_set(&mut rng);
        let mut agg = TensorMean::new(Method::FedSb, Weighting::NumExamples);
        agg.begin(&global).unwrap();
        agg.add(&random_set(&mut rng), 3.0).unwrap();
        agg.add(&random_set(&mut rng), 4.0).unwrap();
        assert_eq!(agg.count(), 2);

        // A new round with a different layout: the old sums, weights and names are gone.
        let mut g2 = TensorSet::new();
        g2.insert("head.bias", Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap());
        agg.begin(&g2).unwrap();
        assert_eq!(agg.count(), 0);
        assert!(agg.validate(&global, 1.0).is_err(), "the old layout no longer applies");
        let mut u = TensorSet::new();
        u.insert("head.bias", Tensor::new(&[1f32, -2., 0.25], &Device::Cpu).unwrap());
        agg.add(&u, 9.0).unwrap();
        let got = agg.finish_mean().unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(values(got.get("head.bias").unwrap()), vec![1.0, -2.0, 0.25]);

        // Beginning the same layout again also starts from zero.
        agg.begin(&global).unwrap();
        let u = random_set(&mut rng);
        agg.add(&u, 1.0).unwrap();
        assert_close(&agg.finish_mean().unwrap(), &u, 0.0);
    }
}
