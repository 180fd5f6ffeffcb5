//! [`AdaptedLinear`]: a frozen linear layer `W0` (+ bias) with an optional adapter on its side path.
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};

use super::{AdapterConfig, AdapterKind};
use crate::frozen::FrozenWeight;
use crate::kernels::WeightGradSink;
use crate::tensors::TensorSet;
use crate::{Error, Result, ops};

/// The trainable (or frozen-but-shared) tensors on the side path of one linear layer.
#[derive(Clone, Debug)]
pub enum Adapter {
    /// LoRA-SB: `B·R·A`, only `R` trained.
    LoraSb {
        /// Frozen `r × d_in`.
        a: Tensor,
        /// Frozen `d_out × r`.
        b: Tensor,
        /// Trained `r × r`.
        r: Var,
    },
    /// LoRA: `B·A`, both trained.
    Lora {
        /// Trained `r × d_in`.
        a: Var,
        /// Trained `d_out × r`.
        b: Var,
    },
    /// FFA-LoRA: `B·A`, `A` frozen.
    FfaLora {
        /// Frozen `r × d_in`.
        a: Tensor,
        /// Trained `d_out × r`.
        b: Var,
    },
}

/// A linear layer of a pretrained model: frozen `W0` (`d_out × d_in`, in its compact format: see
/// [`crate::frozen`]) and bias, plus an optional adapter scaled by `scale`. The forward pass is
/// `x·W0ᵀ + b + scale·((x·Aᵀ)·Rᵀ)·Bᵀ` (LoRA-SB) or `x·W0ᵀ + b + scale·(x·Aᵀ)·Bᵀ` (LoRA, FFA-LoRA); no gradient
/// is ever computed for `W0` except while the LoRA-SB init estimates it (see
/// [`AdaptedLinear::track_weight_grad`]).
#[derive(Clone, Debug)]
pub struct AdaptedLinear {
    name: String,
    kind: &'static str,
    w0: FrozenWeight,
    bias: Option<Tensor>,
    adapter: Option<Adapter>,
    scale: f64,
    weight_grad: Option<WeightGrad>,
}

/// How `∂L/∂W0` is read while the LoRA-SB init tracks it.
#[derive(Clone, Debug)]
enum WeightGrad {
    /// The CPU kernels sum `dyᵀ·x` into a sink in each backward pass (W0 stays as it is).
    Sink(WeightGradSink),
    /// Elsewhere (other devices, kernels off): `W0` as an f32 variable, its gradient read from each
    /// backward pass's store and summed into the sink.
    Var(Var, WeightGradSink),
}

fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// PEFT's LoRA `A` init: Kaiming-uniform with `a = √5`, i.e. U(−1/√d_in, 1/√d_in), drawn from a stream
/// seeded by `seed` and the module name (so every client that shares the seed gets the same `A`).
pub fn kaiming_uniform_a(name: &str, rank: usize, d_in: usize, seed: u64, device: &Device) -> Result<Tensor> {
    let bound = 1.0 / (d_in as f32).sqrt();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ fnv1a(name));
    let data: Vec<f32> = (0..rank * d_in).map(|_| rng.random_range(-bound..bound)).collect();
    Ok(Tensor::from_vec(data, (rank, d_in), device)?)
}

impl AdaptedLinear {
    /// A frozen layer with no adapter. `name` is its module path (e.g. `model.layers.0.self_attn.q_proj`),
    /// `kind` its target name (`q`).
    pub fn new(name: impl Into<String>, kind: &'static str, w0: FrozenWeight, bias: Option<Tensor>) -> Result<Self> {
        let name = name.into();
        let (d_out, _) = w0.dims();
        if let Some(b) = &bias
            && b.dims() != [d_out]
        {
            return Err(Error::tensor(format!("{name}.bias"), format!("shape {:?}, expected [{d_out}]", b.dims())));
        }
        Ok(Self { name, kind, w0, bias, adapter: None, scale: 1.0, weight_grad: None })
    }

    /// The module path.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The target kind (`q`, `query`, ...).
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// `(d_out, d_in)`.
    pub fn dims(&self) -> (usize, usize) {
        self.w0.dims()
    }

    /// The frozen base weight.
    pub fn weight(&self) -> &FrozenWeight {
        &self.w0
    }

    /// The frozen bias.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The adapter, if one is attached.
    pub fn adapter(&self) -> Option<&Adapter> {
        self.adapter.as_ref()
    }

    /// The adapter path's scale.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Attaches a fresh adapter of `cfg`'s kind. LoRA-SB gets its `A`, `B`, `R` from `init` (the LoRA-SB
    /// initialization, see [`super::init`]); LoRA and FFA-LoRA are initialized here (A Kaiming-uniform from
    /// the seed, B zero) unless `init` holds their tensors.
    pub fn attach(&mut self, cfg: &AdapterConfig, init: Option<&TensorSet>) -> Result<()> {
        let (d_out, d_in) = self.dims();
        let r = cfg.rank;
        let dev = self.w0.device();
        let get = |suffix: &str, shape: (usize, usize)| -> Result<Option<Tensor>> {
            let key = format!("{}.{suffix}", self.name);
            match init.and_then(|s| s.get(&key)) {
                None => Ok(None),
                Some(t) => {
                    if t.dims() != [shape.0, shape.1] {
                        return Err(Error::tensor(
                            key,
                            format!("shape {:?}, expected [{}, {}]", t.dims(), shape.0, shape.1),
                        ));
                    }
                    check_finite(&key, t)?;
                    Ok(Some(t.to_device(&dev)?.to_dtype(DType::F32)?))
                }
            }
        };
        let adapter = match cfg.kind {
            AdapterKind::LoraSb => {
                let (Some(a), Some(b), Some(rm)) = (
                    get("lora_A.weight", (r, d_in))?,
                    get("lora_B.weight", (d_out, r))?,
                    get("lora_R.weight", (r, r))?,
                ) else {
                    return Err(Error::Adapter(format!(
                        "LoRA-SB needs its initialization (lora_A, lora_B, lora_R) for `{}`",
                        self.name
                    )));
                };
                Adapter::LoraSb { a, b, r: Var::from_tensor(&rm)? }
            }
            AdapterKind::Lora => {
                let a = match get("lora_A.weight", (r, d_in))? {
                    Some(a) => a,
                    None => kaiming_uniform_a(&self.name, r, d_in, cfg.seed, &dev)?,
                };
                let b = match get("lora_B.weight", (d_out, r))? {
                    Some(b) => b,
                    None => Tensor::zeros((d_out, r), DType::F32, &dev)?,
                };
                Adapter::Lora { a: Var::from_tensor(&a)?, b: Var::from_tensor(&b)? }
            }
            AdapterKind::FfaLora => {
                let a = match get("lora_A.weight", (r, d_in))? {
                    Some(a) => a,
                    None => kaiming_uniform_a(&self.name, r, d_in, cfg.seed, &dev)?,
                };
                let b = match get("lora_B.weight", (d_out, r))? {
                    Some(b) => b,
                    None => Tensor::zeros((d_out, r), DType::F32, &dev)?,
                };
                Adapter::FfaLora { a, b: Var::from_tensor(&b)? }
            }
        };
        self.adapter = Some(adapter);
        self.scale = cfg.scale();
        Ok(())
    }

    /// Removes the adapter.
    pub fn detach(&mut self) {
        self.adapter = None;
    }

    /// While `on`, every backward pass sums the full-weight gradient `∂L/∂W0` of this layer (the LoRA-SB init
    /// needs it): on the CPU kernels without touching `W0`, elsewhere through an f32 variable standing for it
    /// (then [`Self::collect_weight_grad`] reads each pass's gradient). Off by default; turning it off drops
    /// what was summed.
    pub fn track_weight_grad(&mut self, on: bool) -> Result<()> {
        self.weight_grad = if !on {
            None
        } else {
            let (n, k) = self.dims();
            let sink = WeightGradSink::new(n, k)?;
            if self.w0.device().is_cpu() && crate::kernels::active_here() {
                Some(WeightGrad::Sink(sink))
            } else {
                let dev = self.w0.device();
                Some(WeightGrad::Var(Var::from_tensor(&self.w0.to_f32(&dev)?)?, sink))
            }
        };
        Ok(())
    }

    /// Whether the full-weight gradient is being tracked.
    pub fn tracks_weight_grad(&self) -> bool {
        self.weight_grad.is_some()
    }

    /// After a backward pass: adds its `∂L/∂W0` to the sum where it is read from the gradient store (the
    /// variable path); the kernels' sink needs nothing. Fails when the pass gave `W0` no gradient.
    pub fn collect_weight_grad(&self, grads: &candle_core::backprop::GradStore) -> Result<()> {
        if let Some(WeightGrad::Var(v, sink)) = &self.weight_grad {
            let g = grads
                .get(v.as_tensor())
                .ok_or_else(|| Error::Numerics(format!("no gradient reached `{}.weight`", self.name)))?;
            sink.add_tensor(g)?;
        }
        Ok(())
    }

    /// The full-weight gradient summed since tracking started (`None` before any backward pass reached it),
    /// leaving the sum empty.
    pub fn take_weight_grad(&self) -> Result<Option<Tensor>> {
        match &self.weight_grad {
            None => Ok(None),
            Some(WeightGrad::Sink(s) | WeightGrad::Var(_, s)) => Ok(s.take()?),
        }
    }

    /// The forward pass; `x` is `[..., d_in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let (None, Some(Adapter::LoraSb { a, b, r })) = (&self.weight_grad, &self.adapter)
            && crate::kernels::applies(x)
        {
            // One fused op for the base layer and the adapter path (with R, or a per-sample copy of it).
            let rm = match crate::dp::per_sample::per_sample(r) {
                Some(copy) => copy,
                None => trained(r),
            };
            let dims = x.dims().to_vec();
            let (d_out, d_in) = self.dims();
            if dims.last() != Some(&d_in) {
                return Err(Error::tensor(&self.name, format!("input {dims:?}, expected [..., {d_in}]")));
            }
            let rows = x.elem_count() / d_in.max(1);
            let y = crate::kernels::lora_sb_linear(
                &x.reshape((rows, d_in))?,
                &self.w0,
                self.bias.as_ref(),
                a,
                b,
                &rm,
                self.scale,
            )?;
            let mut out = dims;
            if let Some(last) = out.last_mut() {
                *last = d_out;
            }
            return Ok(y.reshape(out)?);
        }
        let base = match &self.weight_grad {
            Some(WeightGrad::Var(w, _)) => {
                let y = x.broadcast_matmul(&w.as_tensor().t()?)?;
                match &self.bias {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                }
            }
            Some(WeightGrad::Sink(sink)) => ops::linear_tracking(x, &self.w0, self.bias.as_ref(), sink)?,
            None => ops::linear(x, &self.w0, self.bias.as_ref())?,
        };
        let side = match &self.adapter {
            None => return Ok(base),
            Some(adapter) if crate::dp::per_sample::active() => self.per_sample_side(x, adapter)?,
            Some(Adapter::LoraSb { a, b, r }) => {
                let h = ops::frozen_matmul(x, a)?;
                let h = h.broadcast_matmul(&trained(r).t()?)?;
                ops::frozen_matmul(&h, b)?
            }
            Some(Adapter::Lora { a, b }) => {
                let h = x.broadcast_matmul(&trained(a).t()?)?;
                h.broadcast_matmul(&trained(b).t()?)?
            }
            Some(Adapter::FfaLora { a, b }) => {
                let h = ops::frozen_matmul(x, a)?;
                h.broadcast_matmul(&trained(b).t()?)?
            }
        };
        let side = if self.scale == 1.0 { side } else { (side * self.scale)? };
        Ok((base + side)?)
    }

    /// The adapter path with per-sample copies of the trainable tensors (DP-SGD, see [`crate::dp::per_sample`]):
    /// sample `i` of `x` (`[n, ..., d_in]`) goes through its own copy, so one backward pass gives every sample's
    /// gradient. Tensors without a copy are used as they are.
    fn per_sample_side(&self, x: &Tensor, adapter: &Adapter) -> Result<Tensor> {
        use crate::dp::per_sample::per_sample;
        let dims = x.dims().to_vec();
        let (n, d_in) = (dims[0], *dims.last().unwrap_or(&0));
        let rows = x.elem_count() / (n * d_in).max(1);
        let x3 = x.contiguous()?.reshape((n, rows, d_in))?;
        // `h · Mᵀ` with M either shared `[o, i]` (frozen or not copied) or per-sample `[n, o, i]`.
        let apply = |h: &Tensor, m: &Tensor, copy: Option<Tensor>| -> Result<Tensor> {
            Ok(match copy {
                Some(c) => {
                    if c.dims()[0] != n {
                        return Err(Error::tensor(
                            &self.name,
                            format!("per-sample copy for {} samples, batch has {n}", c.dims()[0]),
                        ));
                    }
                    h.matmul(&c.transpose(1, 2)?)?
                }
                None => ops::frozen_matmul(h, m)?,
            })
        };
        let side = match adapter {
            Adapter::LoraSb { a, b, r } => {
                let h = ops::frozen_matmul(&x3, a)?;
                let h = apply(&h, r.as_tensor(), per_sample(r))?;
                ops::frozen_matmul(&h, b)?
            }
            Adapter::Lora { a, b } => {
                let h = apply(&x3, a.as_tensor(), per_sample(a))?;
                apply(&h, b.as_tensor(), per_sample(b))?
            }
            Adapter::FfaLora { a, b } => {
                let h = ops::frozen_matmul(&x3, a)?;
                apply(&h, b.as_tensor(), per_sample(b))?
            }
        };
        let mut out = dims;
        if let Some(last) = out.last_mut() {
            *last = self.dims().0;
        }
        Ok(side.reshape(out)?)
    }

    /// The trainable tensors, with their stable names.
    pub fn trainable(&self) -> Vec<(String, Var)> {
        let n = &self.name;
        match &self.adapter {
            None => vec![],
            Some(Adapter::LoraSb { r, .. }) => vec![(format!("{n}.lora_R.weight"), r.clone())],
            Some(Adapter::Lora { a, b }) => {
                vec![(format!("{n}.lora_A.weight"), a.clone()), (format!("{n}.lora_B.weight"), b.clone())]
            }
            Some(Adapter::FfaLora { b, .. }) => vec![(format!("{n}.lora_B.weight"), b.clone())],
        }
    }

    /// Every adapter tensor (frozen and trained), by stable name, as detached copies.
    pub fn adapter_tensors(&self, out: &mut TensorSet) -> Result<()> {
        let n = &self.name;
        match &self.adapter {
            None => {}
            Some(Adapter::LoraSb { a, b, r }) => {
                out.insert(format!("{n}.lora_A.weight"), a.clone());
                out.insert(format!("{n}.lora_B.weight"), b.clone());
                out.insert(format!("{n}.lora_R.weight"), r.as_tensor().copy()?);
            }
            Some(Adapter::Lora { a, b }) => {
                out.insert(format!("{n}.lora_A.weight"), a.as_tensor().copy()?);
                out.insert(format!("{n}.lora_B.weight"), b.as_tensor().copy()?);
            }
            Some(Adapter::FfaLora { a, b }) => {
                out.insert(format!("{n}.lora_A.weight"), a.clone());
                out.insert(format!("{n}.lora_B.weight"), b.as_tensor().copy()?);
            }
        }
        Ok(())
    }

    /// Sets the trained tensors from `set` (names as in [`Self::trainable`]); shapes must match and values
    /// be finite. Nothing changes unless every tensor is valid.
    pub fn load_trainable(&self, set: &TensorSet) -> Result<()> {
        let vars = self.trainable();
        let mut staged = Vec::with_capacity(vars.len());
        for (name, var) in &vars {
            let t = set.require(name)?;
            if t.dims() != var.dims() {
                return Err(Error::tensor(name, format!("shape {:?}, expected {:?}", t.dims(), var.dims())));
            }
            check_finite(name, t)?;
            staged.push((var, t.to_device(var.device())?.to_dtype(DType::F32)?));
        }
        for (var, t) in staged {
            var.set(&t)?;
        }
        Ok(())
    }

    /// Adds `delta` (`d_out × d_in`, finite) to the frozen base weight: how FedEx-LoRA's residual and FLoRA's
    /// merged product reach a client's model. Refused (nothing changes) while `W0` tracks a gradient.
    pub fn add_to_base(&mut self, delta: &Tensor) -> Result<()> {
        let name = format!("{}.weight", self.name);
        let (n, k) = self.w0.dims();
        if delta.dims() != [n, k] {
            return Err(Error::tensor(name, format!("base delta {:?}, expected {:?}", delta.dims(), [n, k])));
        }
        if self.weight_grad.is_some() {
            return Err(Error::tensor(name, "cannot change W0 while its gradient is tracked"));
        }
        check_finite(&name, delta)?;
        if self.w0.format().is_compact() {
            tracing::debug!("{name}: a folded base delta makes this {} weight f32", self.w0.format());
        }
        self.w0 = self.w0.add_f32(&delta.to_device(&self.w0.device())?)?;
        Ok(())
    }

    /// `W0 + ΔW` (just `W0` without an adapter), as an f32 tensor.
    pub fn merged_weight(&self) -> Result<Tensor> {
        let w0 = self.w0.to_f32(&self.w0.device())?;
        match self.delta_weight()? {
            Some(d) => Ok((w0 + d)?),
            None => Ok(w0),
        }
    }

    /// The dense update `ΔW = scale·B·R·A` (or `scale·B·A`), `d_out × d_in`, if an adapter is attached.
    pub fn delta_weight(&self) -> Result<Option<Tensor>> {
        let d = match &self.adapter {
            None => return Ok(None),
            Some(Adapter::LoraSb { a, b, r }) => b.matmul(r.as_tensor())?.matmul(a)?,
            Some(Adapter::Lora { a, b }) => b.as_tensor().matmul(a.as_tensor())?,
            Some(Adapter::FfaLora { a, b }) => b.as_tensor().matmul(a)?,
        };
        Ok(Some((d * self.scale)?))
    }
}

/// A trained tensor as a forward pass uses it: itself while training, detached under
/// [`crate::kernels::inference`] (evaluation, generation), so no graph is built and every activation is freed
/// as soon as the next layer has used it.
fn trained(v: &Var) -> Tensor {
    if crate::kernels::in_inference() { v.as_tensor().detach() } else { v.as_tensor().clone() }
}

/// Fails when `t` holds a NaN or infinity.
pub fn check_finite(name: &str, t: &Tensor) -> Result<()> {
    let s = t.to_dtype(DType::F32)?.flatten_all()?;
    let bad = s.to_vec1::<f32>()?.iter().any(|v| !v.is_finite());
    if bad {
        return Err(Error::tensor(name, "holds NaN or infinite values"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fw(t: &Tensor) -> FrozenWeight {
        FrozenWeight::dense("w0", t.clone()).unwrap()
    }

    fn maxdiff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    fn lora_sb_init(name: &str, d_out: usize, d_in: usize, r: usize, dev: &Device) -> TensorSet {
        let mut s = TensorSet::new();
        s.insert(format!("{name}.lora_A.weight"), Tensor::randn(0f32, 1., (r, d_in), dev).unwrap());
        s.insert(format!("{name}.lora_B.weight"), Tensor::randn(0f32, 1., (d_out, r), dev).unwrap());
        s.insert(format!("{name}.lora_R.weight"), Tensor::randn(0f32, 1., (r, r), dev).unwrap());
        s
    }

    #[test]
    fn forward_equals_merged_weight_for_every_kind() {
        let dev = Device::Cpu;
        let (d_out, d_in, r) = (6, 5, 3);
        let w0 = Tensor::randn(0f32, 1., (d_out, d_in), &dev).unwrap();
        let bias = Tensor::randn(0f32, 1., d_out, &dev).unwrap();
        let x = Tensor::randn(0f32, 1., (2, 4, d_in), &dev).unwrap();
        for kind in [AdapterKind::LoraSb, AdapterKind::Lora, AdapterKind::FfaLora] {
            let mut l = AdaptedLinear::new("m.q", "q", fw(&w0), Some(bias.clone())).unwrap();
            let mut cfg = AdapterConfig::new(kind, r, &["q"]);
            cfg.alpha = 2.0 * r as f64;
            let init = lora_sb_init("m.q", d_out, d_in, r, &dev);
            l.attach(&cfg, Some(&init)).unwrap();
            // Make B nonzero for LoRA kinds so the side path matters.
            for (n, v) in l.trainable() {
                if n.ends_with("lora_B.weight") {
                    v.set(&Tensor::randn(0f32, 1., v.dims(), &dev).unwrap()).unwrap();
                }
            }
            let y = l.forward(&x).unwrap();
            let merged = (&w0 + l.delta_weight().unwrap().unwrap()).unwrap();
            let y_ref = x.broadcast_matmul(&merged.t().unwrap()).unwrap().broadcast_add(&bias).unwrap();
            assert!(maxdiff(&y, &y_ref) < 1e-4, "{kind}");
        }
    }

    /// Under `kernels::inference` a forward builds no graph (its activations are freed as it goes) and gives
    /// the same values.
    #[test]
    fn inference_forwards_build_no_graph() {
        let dev = Device::Cpu;
        let w0 = Tensor::randn(0f32, 1., (6, 32), &dev).unwrap();
        let x = Tensor::randn(0f32, 1., (3, 32), &dev).unwrap();
        for kind in [AdapterKind::LoraSb, AdapterKind::Lora, AdapterKind::FfaLora] {
            let mut l = AdaptedLinear::new("m.q", "q", fw(&w0), None).unwrap();
            l.attach(&AdapterConfig::new(kind, 2, &["q"]), Some(&lora_sb_init("m.q", 6, 32, 2, &dev))).unwrap();
            let y = l.forward(&x).unwrap();
            assert!(y.track_op(), "{kind}: training forwards track the adapter");
            let yi = crate::kernels::inference(|| l.forward(&x).unwrap());
            assert!(!yi.track_op(), "{kind}: an inference forward built a graph");
            assert_eq!(maxdiff(&y, &yi), 0.0);
        }
    }

    #[test]
    fn only_adapter_tensors_get_gradients() {
        let dev = Device::Cpu;
        let w0 = Tensor::randn(0f32, 1., (4, 3), &dev).unwrap();
        let mut l = AdaptedLinear::new("m.v", "v", fw(&w0), None).unwrap();
        l.attach(&AdapterConfig::new(AdapterKind::LoraSb, 2, &["v"]), Some(&lora_sb_init("m.v", 4, 3, 2, &dev)))
            .unwrap();
        let x = Var::randn(0f32, 1., (5, 3), &dev).unwrap();
        let g = l.forward(x.as_tensor()).unwrap().sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let (name, r) = &l.trainable()[0];
        assert_eq!(name, "m.v.lora_R.weight");
        let gr = g.get(r.as_tensor()).expect("R has a gradient");
        assert!(gr.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
        assert!(g.get(x.as_tensor()).is_some());
        assert!(g.get(l.weight().as_f32().unwrap()).is_none());
    }

    #[test]
    fn lora_starts_at_zero_delta_and_ffa_a_is_shared() {
        let dev = Device::Cpu;
        let w0 = Tensor::randn(0f32, 1., (4, 3), &dev).unwrap();
        let mut l = AdaptedLinear::new("m.k", "k", fw(&w0), None).unwrap();
        l.attach(&AdapterConfig::new(AdapterKind::Lora, 2, &["k"]), None).unwrap();
        let d = l.delta_weight().unwrap().unwrap();
        assert_eq!(d.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        let mut f1 = AdaptedLinear::new("m.k", "k", fw(&w0), None).unwrap();
        let mut f2 = AdaptedLinear::new("m.k", "k", fw(&w0), None).unwrap();
        let cfg = AdapterConfig::new(AdapterKind::FfaLora, 2, &["k"]);
        f1.attach(&cfg, None).unwrap();
        f2.attach(&cfg, None).unwrap();
        let (mut s1, mut s2) = (TensorSet::new(), TensorSet::new());
        f1.adapter_tensors(&mut s1).unwrap();
        f2.adapter_tensors(&mut s2).unwrap();
        assert_eq!(s1.content_hash().unwrap(), s2.content_hash().unwrap());
        assert_eq!(f1.trainable().len(), 1);
    }

    #[test]
    fn bad_init_and_bad_loads_change_nothing() {
        let dev = Device::Cpu;
        let w0 = Tensor::randn(0f32, 1., (4, 3), &dev).unwrap();
        let mut l = AdaptedLinear::new("m.q", "q", fw(&w0), None).unwrap();
        let cfg = AdapterConfig::new(AdapterKind::LoraSb, 2, &["q"]);
        assert!(l.attach(&cfg, None).is_err());
        let wrong = lora_sb_init("m.q", 4, 3, 3, &dev); // rank 3 tensors for a rank-2 config
        assert!(l.attach(&cfg, Some(&wrong)).is_err());
        l.attach(&cfg, Some(&lora_sb_init("m.q", 4, 3, 2, &dev))).unwrap();
        let before = l.trainable()[0].1.as_tensor().copy().unwrap();
        let mut bad = TensorSet::new();
        bad.insert("m.q.lora_R.weight", Tensor::new(&[[f32::NAN, 0.], [0., 0.]], &dev).unwrap());
        assert!(l.load_trainable(&bad).is_err());
        bad.insert("m.q.lora_R.weight", Tensor::zeros((3, 3), DType::F32, &dev).unwrap());
        assert!(l.load_trainable(&bad).is_err());
        assert_eq!(maxdiff(&before, l.trainable()[0].1.as_tensor()), 0.0);
    }
}
