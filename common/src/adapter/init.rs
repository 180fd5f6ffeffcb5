//! The LoRA-SB initialization, as the paper's code does it.
//!
//! 1. Sum the full-weight gradient `G = Σ_batches ∂L/∂W` of every adapted matrix over `n` samples of an init
//!    dataset, with the base model (no adapter).
//! 2. Approximate Adam's first update: `ΔW = −η·sign(G)` (at step 1 Adam's update is `−η·g/|g|`).
//! 3. Truncated SVD `ΔW ≈ U·Σ·Vᵀ` of rank r (randomized, seeded): `B = U_r`, `A = V_rᵀ`, `R = Σ_r / s` so that
//!    `s·B·R·A` is the best rank-r approximation of `ΔW`. `W0` is not changed.
//!
//! The result is a [`TensorSet`] with `<module>.lora_{A,B,R}.weight` for every adapted layer: the blob a
//! coordinator serves, identical for every client.
use std::time::Instant;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::svd::{RsvdConfig, randomized_svd};
use super::{AdapterConfig, AdapterKind};
use crate::model::Model;
use crate::tensors::TensorSet;
use crate::train::batch_loss;
use crate::train::data::{Batch, Encoded, epoch_order};
use crate::{Error, Result};

/// Settings of the LoRA-SB initialization.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InitConfig {
    /// Samples used for the gradient estimate (the paper's code uses about |D|/1000, at least one batch).
    pub samples: usize,
    /// Samples per forward/backward pass.
    pub batch_size: usize,
    /// Step size η of the approximated first update (the first step's learning rate by default).
    pub eta: f64,
    /// Oversampling of the randomized SVD.
    pub oversample: usize,
    /// Power iterations of the randomized SVD.
    pub power_iters: usize,
    /// Seed of the sample choice and of the randomized SVD.
    pub seed: u64,
    /// Memory for the summed full-weight gradients (f32, `d_out × d_in` per layer), MiB: the targeted layers are
    /// taken in groups whose gradients fit, one set of gradient passes per group (a billion-parameter model's
    /// gradients would otherwise need 4 bytes per targeted weight at once). At least one layer per group.
    #[serde(default = "default_grad_memory_mib")]
    pub grad_memory_mib: usize,
}

/// The default of [`InitConfig::grad_memory_mib`]: 1 GiB.
pub const DEFAULT_GRAD_MEMORY_MIB: usize = 1024;

fn default_grad_memory_mib() -> usize {
    DEFAULT_GRAD_MEMORY_MIB
}

impl InitConfig {
    /// The default sample count for a dataset of `n` examples: `max(n / 1000, batch_size)`, at most `n`.
    pub fn default_samples(n: usize, batch_size: usize) -> usize {
        (n / 1000).max(batch_size).min(n).max(1)
    }
}

/// Timings and sizes of an init run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct InitReport {
    /// Samples used for the gradient estimate.
    pub samples: usize,
    /// Layers initialized.
    pub layers: usize,
    /// Seconds spent estimating gradients.
    pub gradient_seconds: f64,
    /// Sets of gradient passes over the samples (one per group of layers whose gradients fit in memory).
    pub gradient_passes: usize,
    /// Seconds spent in the truncated SVDs.
    pub svd_seconds: f64,
    /// Per layer: module name, shape and SVD milliseconds.
    pub per_layer: Vec<(String, usize, usize, f64)>,
}

/// Sums `∂L/∂W0` over `cfg.samples` examples of `data` (seeded choice) for every layer `adapter` targets.
/// The per-batch mean loss is weighted by the batch's share of the samples, so the sum is the gradient of
/// the mean loss over all samples (its scale does not matter for `sign`). All the gradients are held at once:
/// [`lora_sb_init`] takes the layers in groups instead (see [`InitConfig::grad_memory_mib`]).
pub fn estimate_gradients(
    model: &mut Model,
    adapter: &AdapterConfig,
    data: &[Encoded],
    cfg: &InitConfig,
    pad_id: u32,
) -> Result<Vec<(String, Tensor)>> {
    let kinds = adapter.resolve_targets(model.target_kinds())?;
    let names: Vec<String> =
        model.linears().iter().filter(|l| kinds.contains(&l.kind())).map(|l| l.name().to_string()).collect();
    gradient_passes(model, &names, data, cfg, pad_id)
}

/// The summed full-weight gradients of the layers `names` (in the model's layer order) over `cfg.samples`
/// examples: one forward and backward pass per batch, the gradients summed by the layers themselves
/// ([`crate::adapter::AdaptedLinear::track_weight_grad`]). The model is left without adapters.
fn gradient_passes(
    model: &mut Model,
    names: &[String],
    data: &[Encoded],
    cfg: &InitConfig,
    pad_id: u32,
) -> Result<Vec<(String, Tensor)>> {
    if data.is_empty() {
        return Err(Error::Data("the init dataset is empty".into()));
    }
    let n = cfg.samples.clamp(1, data.len());
    let order = epoch_order(data.len(), cfg.seed, true);
    model.detach_adapters();
    for l in model.linears_mut() {
        let on = names.iter().any(|n| n == l.name());
        l.track_weight_grad(on)?;
    }
    let result = (|| -> Result<Vec<(String, Tensor)>> {
        for chunk in order[..n].chunks(cfg.batch_size.max(1)) {
            let items: Vec<&Encoded> = chunk.iter().map(|&i| &data[i]).collect();
            let batch = Batch::collate(&items, pad_id, model.device())?;
            let out = batch_loss(model, &batch)?;
            let loss = (out.loss * (chunk.len() as f64 / n as f64))?;
            let grads = crate::recompute::backward(&loss)?;
            for l in model.linears().iter().filter(|l| l.tracks_weight_grad()) {
                l.collect_weight_grad(&grads)?;
            }
        }
        let mut out = Vec::with_capacity(names.len());
        for l in model.linears().iter().filter(|l| l.tracks_weight_grad()) {
            let g = l
                .take_weight_grad()?
                .ok_or_else(|| Error::Numerics(format!("no gradient reached `{}.weight`", l.name())))?;
            out.push((l.name().to_string(), g));
        }
        Ok(out)
    })();
    for l in model.linears_mut() {
        l.track_weight_grad(false)?;
    }
    result
}

/// The targeted layers in groups whose f32 gradients fit `budget` bytes (at least one layer a group), in layer
/// order.
fn layer_groups(model: &Model, adapter: &AdapterConfig, budget: usize) -> Result<Vec<Vec<String>>> {
    let kinds = adapter.resolve_targets(model.target_kinds())?;
    let mut groups: Vec<Vec<String>> = Vec::new();
    let mut used = 0usize;
    for l in model.linears().into_iter().filter(|l| kinds.contains(&l.kind())) {
        let (n, k) = l.dims();
        let bytes = n * k * 4;
        match groups.last_mut() {
            Some(g) if used + bytes <= budget => {
                g.push(l.name().to_string());
                used += bytes;
            }
            _ => {
                groups.push(vec![l.name().to_string()]);
                used = bytes;
            }
        }
    }
    Ok(groups)
}

/// `ΔW = −η·sign(G)` factored as LoRA-SB's `B`, `R`, `A` for rank `adapter.rank` (see the module docs).
/// Returns the three tensors for `name`.
pub fn factor_update(
    name: &str,
    grad: &Tensor,
    adapter: &AdapterConfig,
    cfg: &InitConfig,
) -> Result<[(String, Tensor); 3]> {
    let (rows, cols) = grad.dims2()?;
    let r = adapter.rank;
    if r > rows.min(cols) {
        return Err(Error::Adapter(format!("rank {r} exceeds the smaller side of `{name}` ({rows}×{cols})")));
    }
    let delta = (grad.sign()? * (-cfg.eta))?.to_dtype(DType::F32)?;
    let data: Vec<f32> = delta.flatten_all()?.to_vec1()?;
    if data.iter().any(|v| !v.is_finite()) {
        return Err(Error::Numerics(format!("the gradient of `{name}` is not finite")));
    }
    let svd_cfg = RsvdConfig { rank: r, oversample: cfg.oversample, power_iters: cfg.power_iters, seed: cfg.seed };
    let svd = randomized_svd(&data, rows, cols, &svd_cfg)?;
    let dev = grad.device();
    let b = Tensor::from_vec(svd.u, (rows, r), dev)?;
    let a = Tensor::from_vec(svd.vt, (r, cols), dev)?;
    let s = Tensor::from_vec(svd.s, r, dev)?;
    let rm = (Tensor::eye(r, DType::F32, dev)?.broadcast_mul(&s.unsqueeze(0)?)? / adapter.scale())?;
    Ok([
        (format!("{name}.lora_A.weight"), a),
        (format!("{name}.lora_B.weight"), b),
        (format!("{name}.lora_R.weight"), rm),
    ])
}

/// Runs the whole LoRA-SB init (gradient estimate, sign, truncated SVD) for every layer `adapter` targets.
/// The model is left without adapters; attach the result with [`Model::attach_adapters`].
pub fn lora_sb_init(
    model: &mut Model,
    adapter: &AdapterConfig,
    data: &[Encoded],
    cfg: &InitConfig,
    pad_id: u32,
    on_layer: &mut dyn FnMut(usize, usize),
) -> Result<(TensorSet, InitReport)> {
    if adapter.kind != AdapterKind::LoraSb {
        return Err(Error::Adapter(format!("the LoRA-SB init does not apply to {}", adapter.kind)));
    }
    if !(cfg.eta.is_finite() && cfg.eta > 0.0) {
        return Err(Error::Config(format!("init step size η must be positive, got {}", cfg.eta)));
    }
    if data.is_empty() {
        return Err(Error::Data("the init dataset is empty".into()));
    }
    let groups = layer_groups(model, adapter, cfg.grad_memory_mib.max(1) << 20)?;
    if groups.len() > 1 {
        tracing::info!(
            "LoRA-SB init: {} gradient groups (--init-grad-memory {} MiB), one set of passes each",
            groups.len(),
            cfg.grad_memory_mib
        );
    }
    let total: usize = groups.iter().map(Vec::len).sum();
    let mut set = TensorSet::new();
    let mut report = InitReport {
        samples: cfg.samples.clamp(1, data.len()),
        layers: total,
        gradient_passes: groups.len(),
        ..Default::default()
    };
    let mut done = 0;
    for group in &groups {
        let t0 = Instant::now();
        let grads = gradient_passes(model, group, data, cfg, pad_id)?;
        report.gradient_seconds += t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        for (name, g) in grads {
            let ts = Instant::now();
            let (rows, cols) = g.dims2()?;
            for (k, t) in factor_update(&name, &g, adapter, cfg)? {
                set.insert(k, t);
            }
            report.per_layer.push((name, rows, cols, ts.elapsed().as_secs_f64() * 1e3));
            done += 1;
            on_layer(done, total);
        }
        report.svd_seconds += t1.elapsed().as_secs_f64();
        crate::benchstats::release_free_memory();
    }
    set.set_metadata("fedsb.kind", "lora-sb-init");
    set.set_metadata("fedsb.rank", adapter.rank.to_string());
    set.set_metadata("fedsb.alpha", adapter.alpha.to_string());
    set.set_metadata("fedsb.targets", adapter.targets.join(","));
    set.set_metadata("fedsb.eta", cfg.eta.to_string());
    set.set_metadata("fedsb.samples", report.samples.to_string());
    set.set_metadata("fedsb.seed", cfg.seed.to_string());
    Ok((set, report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{LlamaConfig, LlamaModel};
    use crate::train::data::Target;
    use candle_core::Device;

    fn lm_data() -> Vec<Encoded> {
        (0..6u32)
            .map(|i| {
                let ids: Vec<u32> = (0..8).map(|j| (i * 7 + j * 3) % 61).collect();
                let labels = ids.iter().skip(1).map(|&x| x as i64).chain([-100]).collect();
                Encoded { type_ids: vec![0; 8], ids, target: Target::NextTokens(labels) }
            })
            .collect()
    }

    fn cfg() -> InitConfig {
        InitConfig {
            samples: 4,
            batch_size: 2,
            eta: 1e-3,
            oversample: 4,
            power_iters: 4,
            seed: 7,
            grad_memory_mib: DEFAULT_GRAD_MEMORY_MIB,
        }
    }

    #[test]
    fn every_adapted_layer_gets_an_exact_rank_r_init() {
        let dev = Device::Cpu;
        let mut model = Model::CausalLm(LlamaModel::random(&LlamaConfig::tiny(), 3, &dev).unwrap());
        let adapter = AdapterConfig::new(AdapterKind::LoraSb, 4, &["q", "v", "down"]);
        let data = lm_data();
        let grads = estimate_gradients(&mut model, &adapter, &data, &cfg(), 0).unwrap();
        assert_eq!(grads.len(), 2 * 3);
        let (set, report) = lora_sb_init(&mut model, &adapter, &data, &cfg(), 0, &mut |_, _| {}).unwrap();
        assert_eq!(report.layers, 6);
        assert_eq!(set.len(), 18);
        for l in model.linears() {
            assert!(!l.tracks_weight_grad(), "weights are frozen again");
        }
        for (name, g) in &grads {
            let a = set.require(&format!("{name}.lora_A.weight")).unwrap();
            let b = set.require(&format!("{name}.lora_B.weight")).unwrap();
            let r = set.require(&format!("{name}.lora_R.weight")).unwrap();
            // Orthonormal factors.
            let ata = a.matmul(&a.t().unwrap()).unwrap();
            let btb = b.t().unwrap().matmul(b).unwrap();
            let eye = Tensor::eye(4, DType::F32, &dev).unwrap();
            for m in [&ata, &btb] {
                let d = (m - &eye).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(d < 1e-4, "{name}: not orthonormal ({d})");
            }
            // B·R·A is (close to) the best rank-4 approximation of −η·sign(G).
            let delta = (g.sign().unwrap() * -1e-3).unwrap();
            let approx = b.matmul(r).unwrap().matmul(a).unwrap();
            let err = (&delta - &approx).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
            let data: Vec<f32> = delta.flatten_all().unwrap().to_vec1().unwrap();
            let (rows, cols) = delta.dims2().unwrap();
            let exact = super::super::svd::exact_svd(&data, rows, cols, 4).unwrap();
            let opt = {
                let u = Tensor::from_vec(exact.u, (rows, 4), &dev).unwrap();
                let s = Tensor::from_vec(exact.s, 4, &dev).unwrap();
                let vt = Tensor::from_vec(exact.vt, (4, cols), &dev).unwrap();
                let best = u.broadcast_mul(&s.unsqueeze(0).unwrap()).unwrap().matmul(&vt).unwrap();
                (&delta - best).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt()
            };
            assert!(err <= opt * 1.02 + 1e-7, "{name}: error {err} vs optimal {opt}");
        }
        // The init attaches and is deterministic.
        model.attach_adapters(&adapter, Some(&set)).unwrap();
        let mut model2 = Model::CausalLm(LlamaModel::random(&LlamaConfig::tiny(), 3, &dev).unwrap());
        let (set2, _) = lora_sb_init(&mut model2, &adapter, &data, &cfg(), 0, &mut |_, _| {}).unwrap();
        assert_eq!(set.content_hash().unwrap(), set2.content_hash().unwrap());
    }

    /// Gradients taken a group of layers at a time equal those of one pass over all layers (the grouping a
    /// memory budget forces changes the work, not the result).
    #[test]
    fn grouped_gradient_passes_give_the_same_gradients() {
        let dev = Device::Cpu;
        let mut model = Model::CausalLm(LlamaModel::random(&LlamaConfig::tiny(), 3, &dev).unwrap());
        let adapter = AdapterConfig::new(AdapterKind::LoraSb, 4, &["q", "v", "down"]);
        let data = lm_data();
        let all = estimate_gradients(&mut model, &adapter, &data, &cfg(), 0).unwrap();
        let groups = layer_groups(&model, &adapter, 1).unwrap();
        assert_eq!(groups.len(), 6, "a one-byte budget puts every layer in its own group");
        assert_eq!(layer_groups(&model, &adapter, 1 << 30).unwrap().len(), 1);
        let mut grouped = Vec::new();
        for g in &groups {
            grouped.extend(gradient_passes(&mut model, g, &data, &cfg(), 0).unwrap());
        }
        assert_eq!(all.len(), grouped.len());
        for ((na, ga), (nb, gb)) in all.iter().zip(&grouped) {
            assert_eq!(na, nb);
            let d = (ga - gb).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-6, "{na}: {d}");
        }
    }

    #[test]
    fn bad_settings_are_refused() {
        let dev = Device::Cpu;
        let mut model = Model::CausalLm(LlamaModel::random(&LlamaConfig::tiny(), 3, &dev).unwrap());
        let data = lm_data();
        let lora = AdapterConfig::new(AdapterKind::Lora, 4, &["q"]);
        assert!(lora_sb_init(&mut model, &lora, &data, &cfg(), 0, &mut |_, _| {}).is_err());
        let big = AdapterConfig::new(AdapterKind::LoraSb, 64, &["q"]);
        assert!(lora_sb_init(&mut model, &big, &data, &cfg(), 0, &mut |_, _| {}).is_err());
        let sb = AdapterConfig::new(AdapterKind::LoraSb, 4, &["q"]);
        assert!(lora_sb_init(&mut model, &sb, &[], &cfg(), 0, &mut |_, _| {}).is_err());
        let mut c = cfg();
        c.eta = 0.0;
        assert!(lora_sb_init(&mut model, &sb, &data, &c, 0, &mut |_, _| {}).is_err());
    }
}
