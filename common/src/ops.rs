//! The differentiable operations the models are made of, behind one small set of functions.
//!
//! Every model file calls these and nothing lower, so an op can be replaced by a faster kernel (a custom
//! op with its own backward) without touching a caller. Each function here is differentiable: none of
//! candle-nn's graph-cutting fused ops (`softmax_last_dim`, fused `rms_norm`/`layer_norm`, `rope`, `sdpa`)
//! is used, because they silently drop gradients.
//!
//! Frozen weights never get a gradient: [`linear`] computes only the input gradient, which halves the
//! backward GEMM work of a LoRA step compared with candle's `matmul` (that always computes both sides).
use candle_core::{CpuStorage, CustomOp2, D, DType, Layout, Shape, Tensor, backend::BackendStorage};

use crate::Result;
use crate::frozen::FrozenWeight;

/// Additive mask value for positions that must not be attended to (finite, so a fully masked row gives a
/// uniform distribution instead of NaN).
pub const MASK_VALUE: f32 = f32::MIN;

/// `x · wᵀ` where `w` is frozen: forward as a GEMM, backward gives the gradient of `x` only.
struct FrozenMatmul;

impl CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        w: &CpuStorage,
        w_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let _p = crate::profile::span(self.name());
        let (n, k) = x_l.shape().dims2()?;
        let (m, k2) = w_l.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("frozen-matmul: x is [{n}, {k}] but w is [{m}, {k2}]")
        }
        let wt = w_l.transpose(0, 1)?;
        let out = x.matmul(w, (1, n, m, k), x_l, &wt)?;
        Ok((out, Shape::from((n, m))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_l: &Layout,
        w: &candle_core::CudaStorage,
        w_l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (n, k) = x_l.shape().dims2()?;
        let (m, k2) = w_l.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("frozen-matmul: x is [{n}, {k}] but w is [{m}, {k2}]")
        }
        let wt = w_l.transpose(0, 1)?;
        let out = x.matmul(w, (1, n, m, k), x_l, &wt)?;
        Ok((out, Shape::from((n, m))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.matmul(w)?), None))
    }
}

/// `x · wᵀ` for a weight `w` of shape `[out, in]` that is **not** trained (no gradient is computed
/// for it). `x` is `[..., in]`; the result is `[..., out]`. Works on any device and dtype.
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let in_dim = *dims.last().ok_or_else(|| crate::Error::tensor("x", "scalar input to a linear layer"))?;
    let (out_dim, w_in) = w.dims2()?;
    if w_in != in_dim {
        return Err(crate::Error::tensor(
            "linear",
            format!("input has {in_dim} features but the weight expects {w_in}"),
        ));
    }
    let rows = x.elem_count() / in_dim.max(1);
    let x2 = x.contiguous()?.reshape((rows, in_dim))?;
    let y = if crate::kernels::applies(&x2) && w.dtype() == DType::F32 {
        crate::kernels::frozen_matmul(&x2, w)?
    } else if x.device().is_metal() {
        x2.matmul(&w.t()?)?
    } else {
        x2.apply_op2(w, FrozenMatmul)?
    };
    let mut out_shape = dims[..dims.len() - 1].to_vec();
    out_shape.push(out_dim);
    Ok(y.reshape(out_shape)?)
}

/// Checks `x` `[..., in]` against a weight `[out, in]` and bias `[out]`; returns `(rows, in, out)`.
fn linear_dims(x: &Tensor, w: &FrozenWeight, b: Option<&Tensor>) -> Result<(usize, usize, usize)> {
    let in_dim = *x.dims().last().ok_or_else(|| crate::Error::tensor("x", "scalar input to a linear layer"))?;
    let (out_dim, w_in) = w.dims();
    if w_in != in_dim || b.is_some_and(|b| b.dims() != [out_dim]) {
        return Err(crate::Error::tensor(
            "linear",
            format!("input has {in_dim} features, weight {:?}, bias {:?}", w.dims(), b.map(|b| b.dims().to_vec())),
        ));
    }
    Ok((x.elem_count() / in_dim.max(1), in_dim, out_dim))
}

/// `x` `[..., in]` → `[..., out]`.
fn with_out_dim(x: &Tensor, y: Tensor, out: usize) -> Result<Tensor> {
    let dims = x.dims();
    let mut shape = dims[..dims.len() - 1].to_vec();
    shape.push(out);
    Ok(y.reshape(shape)?)
}

/// A frozen linear layer: `x · Wᵀ + b` for a frozen weight in any format (f32, bf16, f16, a GGUF block
/// format: see [`crate::frozen`]), gradient for `x` only. On the CPU the weight is read tile by tile inside the
/// product (and the bias fused into it); elsewhere the weight is converted to `x`'s dtype for the call.
pub fn linear(x: &Tensor, w: &FrozenWeight, b: Option<&Tensor>) -> Result<Tensor> {
    let (rows, in_dim, out_dim) = linear_dims(x, w, b)?;
    if crate::kernels::applies(x) && b.is_none_or(|b| b.dtype() == DType::F32) {
        let y = crate::kernels::frozen_linear(&x.reshape((rows, in_dim))?, w, b)?;
        return with_out_dim(x, y, out_dim);
    }
    let wt = match w {
        FrozenWeight::Dense(t) => t.to_dtype(x.dtype())?,
        FrozenWeight::Quant(_) => w.to_f32(x.device())?.to_dtype(x.dtype())?,
    };
    let y = frozen_matmul(x, &wt)?;
    match b {
        Some(b) => Ok(y.broadcast_add(b)?),
        None => Ok(y),
    }
}

/// [`linear`] that also sums the full-weight gradient `∂L/∂W = dyᵀ·x` of every backward pass into `sink` (the
/// LoRA-SB init's gradient pass; CPU kernels only).
pub fn linear_tracking(
    x: &Tensor,
    w: &FrozenWeight,
    b: Option<&Tensor>,
    sink: &crate::kernels::WeightGradSink,
) -> Result<Tensor> {
    let (rows, in_dim, out_dim) = linear_dims(x, w, b)?;
    if !crate::kernels::applies(x) {
        return Err(crate::Error::Numerics("the weight-gradient pass needs the CPU kernels on f32 inputs".into()));
    }
    let y = crate::kernels::frozen_linear_tracking(&x.reshape((rows, in_dim))?, w, b, sink)?;
    with_out_dim(x, y, out_dim)
}

/// Softmax over the last dimension (a fused kernel with backward on CPU f32, else the differentiable composite).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if crate::kernels::applies(x) {
        return Ok(crate::kernels::softmax_last_dim(x)?);
    }
    Ok(candle_nn::ops::softmax(x, D::Minus1)?)
}

/// Log-softmax over the last dimension (differentiable composite).
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::log_softmax(x, D::Minus1)?)
}

/// RMSNorm over the last dimension: `x / sqrt(mean(x²) + eps) · w`, `w` frozen (no gradient for it).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if crate::kernels::applies(x) && w.dtype() == DType::F32 {
        return Ok(crate::kernels::rms_norm(x, w, eps)?);
    }
    Ok(candle_nn::ops::rms_norm_slow(x, w, eps as f32)?)
}

/// LayerNorm over the last dimension: `(x − mean) / sqrt(var + eps) · w + b`, `w` and `b` frozen.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if crate::kernels::applies(x) && w.dtype() == DType::F32 && b.dtype() == DType::F32 {
        return Ok(crate::kernels::layer_norm(x, w, b, eps)?);
    }
    Ok(candle_nn::ops::layer_norm_slow(x, w, b, eps as f32)?)
}

/// Exact (erf) GELU, as BERT uses.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if crate::kernels::applies(x) {
        return Ok(crate::kernels::gelu_erf(x)?);
    }
    Ok(x.gelu_erf()?)
}

/// SwiGLU's gate: `silu(gate) · up`.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if crate::kernels::applies(gate) && up.dtype() == DType::F32 {
        return Ok(crate::kernels::silu_mul(gate, up)?);
    }
    Ok((gate.silu()? * up)?)
}

/// Rotary position embedding in the Hugging Face ("rotate half", NeoX) layout. `x` is
/// `[batch, heads, seq, head_dim]`; `cos`/`sin` are `[seq, head_dim / 2]`.
///
/// GGUF llama checkpoints are converted to this layout on load (their Q/K rows are un-permuted), so
/// one layout serves every model and exported adapters apply to the Hugging Face weights unchanged.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if crate::kernels::applies(x) && cos.dtype() == DType::F32 && sin.dtype() == DType::F32 {
        // Tables may cover more positions than x has (as rope_slow allows): use the first t.
        let t = x.dims4()?.2;
        let (cos, sin) = (cos.narrow(0, 0, t)?, sin.narrow(0, 0, t)?);
        return Ok(crate::kernels::rope(x, &cos, &sin)?);
    }
    Ok(candle_nn::rotary_emb::rope_slow(&x.contiguous()?, cos, sin)?)
}

/// Scaled dot-product attention. `q` is `[b, h, t, d]`, `k`/`v` are `[b, h_kv, s, d]` (grouped-query
/// attention when `h_kv < h`); `mask` is additive, broadcastable to `[b, h, t, s]`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    let (b, h, t, _) = q.dims4()?;
    let (_, h_kv, s, _) = k.dims4()?;
    if h % h_kv != 0 {
        return Err(crate::Error::Model(format!("{h} query heads are not a multiple of {h_kv} kv heads")));
    }
    if crate::kernels::applies(q)
        && mask.is_none_or(|m| m.dims4().is_ok_and(|(mb, mh, mt, ms)| mb == b && mh == 1 && mt == t && ms == s))
    {
        return Ok(crate::kernels::attention(q, k, v, mask, scale)?);
    }
    attention_composite(q, k, v, mask, scale, None)
}

/// Scaled dot-product attention with Gemma-2's logit soft-capping: the scaled scores become
/// `cap·tanh(scores/cap)` before the mask is added and the softmax taken. Shapes as in [`attention`]. Always the
/// differentiable composite (the fused attention kernel has no soft-capping).
pub fn attention_softcapped(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    cap: f64,
) -> Result<Tensor> {
    let (_, h, _, _) = q.dims4()?;
    let (_, h_kv, _, _) = k.dims4()?;
    if h_kv == 0 || h % h_kv != 0 {
        return Err(crate::Error::Model(format!("{h} query heads are not a multiple of {h_kv} kv heads")));
    }
    if !(cap.is_finite() && cap > 0.0) {
        return Err(crate::Error::Model(format!("attention soft-cap {cap} must be positive")));
    }
    attention_composite(q, k, v, mask, scale, Some(cap))
}

/// The composite attention of [`attention`] and [`attention_softcapped`].
fn attention_composite(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    softcap: Option<f64>,
) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let (_, h_kv, s, _) = k.dims4()?;
    let groups = h / h_kv;
    // Grouped-query attention: fold the query heads of one kv head into the sequence axis, so no copy of
    // k and v is needed.
    let q = q.reshape((b, h_kv, groups * t, d))?;
    let scores = (q.matmul(&k.t()?)? * scale)?; // [b, h_kv, groups*t, s]
    let scores = match softcap {
        Some(cap) => self::softcap(&scores, cap)?,
        None => scores,
    };
    let scores = match mask {
        Some(m) => {
            let scores = scores.reshape((b, h, t, s))?;
            scores.broadcast_add(m)?.reshape((b, h_kv, groups * t, s))?
        }
        None => scores,
    };
    let probs = softmax_last_dim(&scores)?;
    let out = probs.matmul(&v.contiguous()?)?; // [b, h_kv, groups*t, d]
    Ok(out.reshape((b, h, t, d))?)
}

/// Soft-capping `cap·tanh(x/cap)` (Gemma-2's attention and final logits): differentiable, bounded by `±cap`.
pub fn softcap(x: &Tensor, cap: f64) -> Result<Tensor> {
    Ok(((x / cap)?.tanh()? * cap)?)
}

/// GeGLU's gate: `gelu_tanh(gate) · up`, with the tanh approximation of GELU (`gelu_pytorch_tanh`, Gemma-2).
/// candle's `Tensor::gelu` is that approximation and has a backward.
pub fn gelu_tanh_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Ok((gate.gelu()? * up)?)
}

/// Scaled dot-product attention on the projections' layout: `q` `[b, t, h, d]`, `k`/`v` `[b, s, h_kv, d]`,
/// result `[b, t, h, d]`. On the CPU one fused kernel reads the heads in place (no head split/merge copies);
/// elsewhere the heads are transposed and [`attention`] runs.
pub fn attention_seq_major(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    let (b, t, _, _) = q.dims4()?;
    let s = k.dims4()?.1;
    if crate::kernels::applies(q)
        && mask.is_none_or(|m| m.dims4().is_ok_and(|(mb, mh, mt, ms)| mb == b && mh == 1 && mt == t && ms == s))
    {
        return Ok(crate::kernels::attention_seq_major(q, k, v, mask, scale)?);
    }
    let heads = |x: &Tensor| -> Result<Tensor> { Ok(x.transpose(1, 2)?.contiguous()?) };
    let a = attention(&heads(q)?, &heads(k)?, &heads(v)?, mask, scale)?;
    Ok(a.transpose(1, 2)?)
}

/// An additive attention mask `[b, 1, t, s]` from a key padding mask `[b, s]` (1 = token, 0 = padding),
/// optionally causal (query `i` at absolute position `offset + i` sees keys `0..=offset + i`).
pub fn attention_mask(
    key_mask: Option<&Tensor>,
    b: usize,
    t: usize,
    s: usize,
    causal: bool,
    offset: usize,
    device: &candle_core::Device,
) -> Result<Option<Tensor>> {
    if key_mask.is_none() && !causal {
        return Ok(None);
    }
    Ok(Some(build_mask(key_mask, b, t, s, causal, offset, None, device)?))
}

/// A causal sliding-window mask `[b, 1, t, s]` (Gemma-2's local layers): query `i` at absolute position
/// `p = offset + i` sees keys `j` with `p − window < j ≤ p` (Hugging Face's `kv_idx > q_idx − sliding_window`,
/// llama.cpp's standard SWA), and no padding key of `key_mask` `[b, s]`.
pub fn sliding_window_mask(
    key_mask: Option<&Tensor>,
    b: usize,
    t: usize,
    s: usize,
    offset: usize,
    window: usize,
    device: &candle_core::Device,
) -> Result<Tensor> {
    if window == 0 {
        return Err(crate::Error::Model("sliding window must be positive".into()));
    }
    build_mask(key_mask, b, t, s, true, offset, Some(window), device)
}

#[allow(clippy::too_many_arguments)]
fn build_mask(
    key_mask: Option<&Tensor>,
    b: usize,
    t: usize,
    s: usize,
    causal: bool,
    offset: usize,
    window: Option<usize>,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let keys: Option<Vec<Vec<f32>>> = match key_mask {
        Some(m) => Some(m.to_dtype(DType::F32)?.to_vec2::<f32>()?),
        None => None,
    };
    let mut data = vec![0f32; b * t * s];
    for bi in 0..b {
        for i in 0..t {
            let row = &mut data[(bi * t + i) * s..(bi * t + i + 1) * s];
            for (j, v) in row.iter_mut().enumerate() {
                let masked_causal = causal && j > offset + i;
                let masked_window = window.is_some_and(|w| j + w <= offset + i);
                let masked_pad = keys.as_ref().is_some_and(|k| k[bi][j] == 0.0);
                if masked_causal || masked_window || masked_pad {
                    *v = MASK_VALUE;
                }
            }
        }
    }
    Ok(Tensor::from_vec(data, (b, 1, t, s), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn maxdiff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn frozen_matmul_matches_matmul_and_only_grads_input() {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1., (2, 5, 7), &dev).unwrap();
        let w = Tensor::randn(0f32, 1., (3, 7), &dev).unwrap();
        let y = frozen_matmul(x.as_tensor(), &w).unwrap();
        let y_ref = x.as_tensor().broadcast_matmul(&w.t().unwrap()).unwrap();
        assert!(maxdiff(&y, &y_ref) < 1e-5);
        let g = (y.sqr().unwrap().sum_all().unwrap()).backward().unwrap();
        let g_ref = (y_ref.sqr().unwrap().sum_all().unwrap()).backward().unwrap();
        let gx = g.get(x.as_tensor()).unwrap();
        assert!(maxdiff(gx, g_ref.get(x.as_tensor()).unwrap()) < 1e-4);
        assert!(g.get(&w).is_none());
    }

    #[test]
    fn frozen_matmul_accepts_non_contiguous_input() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (7, 4), &dev).unwrap().t().unwrap(); // [4, 7], strided
        let w = Tensor::randn(0f32, 1., (3, 7), &dev).unwrap();
        let y = frozen_matmul(&x, &w).unwrap();
        let y_ref = x.contiguous().unwrap().matmul(&w.t().unwrap()).unwrap();
        assert!(maxdiff(&y, &y_ref) < 1e-5);
        assert!(frozen_matmul(&x, &w.t().unwrap()).is_err());
    }

    #[test]
    fn gqa_attention_matches_repeated_kv() {
        let dev = Device::Cpu;
        let (b, h, hkv, t, d) = (2, 6, 2, 5, 4);
        let q = Tensor::randn(0f32, 1., (b, h, t, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1., (b, hkv, t, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1., (b, hkv, t, d), &dev).unwrap();
        let keymask = Tensor::new(&[[1u32, 1, 1, 0, 0], [1, 1, 1, 1, 1]], &dev).unwrap();
        let mask = attention_mask(Some(&keymask), b, t, t, true, 0, &dev).unwrap().unwrap();
        let out = attention(&q, &k, &v, Some(&mask), 0.5).unwrap();
        // Reference: repeat each kv head for its group of query heads.
        let rep = |x: &Tensor| {
            let (b, hk, s, d) = x.dims4().unwrap();
            x.unsqueeze(2).unwrap().expand((b, hk, h / hk, s, d)).unwrap().reshape((b, h, s, d)).unwrap()
        };
        let (k2, v2) = (rep(&k), rep(&v));
        let sc = (q.matmul(&k2.t().unwrap()).unwrap() * 0.5).unwrap().broadcast_add(&mask).unwrap();
        let p = candle_nn::ops::softmax(&sc, D::Minus1).unwrap();
        let out_ref = p.matmul(&v2).unwrap();
        assert!(maxdiff(&out, &out_ref) < 1e-5);
    }

    #[test]
    fn fully_masked_rows_stay_finite() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1., (1, 1, 2, 4), &dev).unwrap();
        let keymask = Tensor::new(&[[0u32, 0]], &dev).unwrap();
        let mask = attention_mask(Some(&keymask), 1, 2, 2, false, 0, &dev).unwrap().unwrap();
        let out = attention(&q, &q, &q, Some(&mask), 1.0).unwrap();
        let v: Vec<f32> = out.flatten_all().unwrap().to_vec1().unwrap();
        assert!(v.iter().all(|x| x.is_finite()));
    }
}
