//! Fused CPU kernels with their own backward, as candle custom ops: exact (erf) GELU, softmax over the last
//! dimension, layer norm and RMSNorm.
//!
//! Stock candle builds these from several elementwise ops, each allocating and walking its whole output, and
//! differentiates them through the composite graph (GELU-erf alone: 12.8 ms per (32, 64, 1536) forward here
//! against 0.74 ms in PyTorch; see `../shared/docs/candle-cpu-perf.md`). Each kernel here is one pass over the
//! data (rows or chunks in parallel with rayon), and its backward is one more pass.
//!
//! The kernels run on contiguous f32 CPU tensors; [`crate::ops`] calls them there and falls back to the
//! differentiable composite ops on other devices and dtypes. Norm weights and biases are frozen in fedsb (only
//! adapters and the head train), so the norm kernels give the input gradient only. Every kernel is tested
//! against the composite it replaces, values and gradients (see the tests below for the tolerances).
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Elements per parallel chunk of the elementwise kernels.
const CHUNK: usize = 16 * 1024;

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else { candle_core::bail!("{what}: f32 only") };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{what}: input must be contiguous"),
    }
}

/// A buffer of `n` f32 for the caller to overwrite: every caller writes all `n` elements before any is read
/// (GEMM outputs with `accumulate = false`, elementwise maps, row kernels that write each element). It skips
/// the memset of `vec![0.0; n]` (6.9% of a MiniLM step in `perf`); candle's CPU backend does the same for its
/// op outputs.
///
/// `clippy::uninit_vec` is allowed here on purpose: the elements are only ever written (by GEMMs through raw
/// pointers, or by `*o = ...` through the slice) before being read, which is the pattern candle's own CPU
/// backend uses for its outputs; the tests compare every kernel's outputs against the composite ops.
#[allow(clippy::uninit_vec)]
fn buffer_for_overwrite(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: the capacity is n; f32 has no invalid bit patterns and every caller writes each element before
    // reading it (see above).
    unsafe { v.set_len(n) };
    v
}

/// `f` applied elementwise to one input, in parallel chunks (8 wide with AVX2, see [`crate::simd`]).
fn map1(x: &[f32], f: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
    let mut out = buffer_for_overwrite(x.len());
    out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(o, x)| crate::simd::apply1(o, x, &f));
    out
}

/// `f` applied elementwise to two inputs of one length, in parallel chunks.
fn map2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    let mut out = buffer_for_overwrite(a.len());
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(o, (a, b))| crate::simd::apply2(o, a, b, &f));
    out
}

/// `f` applied elementwise to three inputs of one length, in parallel chunks.
fn map3(a: &[f32], b: &[f32], c: &[f32], f: impl Fn(f32, f32, f32) -> f32 + Sync) -> Vec<f32> {
    let mut out = buffer_for_overwrite(a.len());
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK).zip(c.par_chunks(CHUNK))))
        .for_each(|(o, (a, (b, c)))| crate::simd::apply3(o, a, b, c, &f));
    out
}

/// erf(x) for f32: the rational approximation of Eigen / XLA (`generic_fast_erf_float`), |error| < 2e-7 on
/// the whole line (tested against `libm::erff`); branch-free, so loops over it vectorize.
#[inline(always)]
fn erf_f32(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2 * -2.726_142_3e-10 + 2.770_681_4e-8;
    p = x2 * p + -2.101_024e-6;
    p = x2 * p + -5.692_506_4e-5;
    p = x2 * p + -7.349_906_3e-4;
    p = x2 * p + -2.954_6e-3;
    p = x2 * p + -1.609_603_3e-2;
    p *= x;
    let mut q = x2 * -1.456_607_2e-5 + -2.133_740_6e-4;
    q = x2 * q + -1.682_827e-3;
    q = x2 * q + -7.373_329e-3;
    q = x2 * q + -1.426_474e-2;
    p / q
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1/√(2π).
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// Exact GELU, `x·Φ(x)` with `Φ(x) = ½(1 + erf(x/√2))`.
struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "fedsb-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let _p = crate::profile::span(self.name());
        let x = f32_slice(s, l, "gelu")?;
        let out = map1(x, |v| v * 0.5 * (1.0 + erf_f32(v * FRAC_1_SQRT_2)));
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(&grad.contiguous()?, &GeluErfGrad)?))
    }
}

/// `dy · (Φ(x) + x·φ(x))`.
struct GeluErfGrad;

impl CustomOp2 for GeluErfGrad {
    fn name(&self) -> &'static str {
        "fedsb-gelu-erf-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let _p = crate::profile::span(self.name());
        let (x, dy) = (f32_slice(s1, l1, "gelu grad")?, f32_slice(s2, l2, "gelu grad")?);
        let out = map2(x, dy, |v, g| {
            let cdf = 0.5 * (1.0 + erf_f32(v * FRAC_1_SQRT_2));
            let pdf = INV_SQRT_2PI * crate::simd::exp_f32(-0.5 * v * v);
            g * (cdf + v * pdf)
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Softmax over the last dimension.
struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fedsb-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let _p = crate::profile::span(self.name());
        let x = f32_slice(s, l, "softmax")?;
        let n = l.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut out = buffer_for_overwrite(x.len());
        out.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(o, x)| {
            let max = crate::simd::max(x);
            for (o, &v) in o.iter_mut().zip(x) {
                *o = crate::simd::exp_f32(v - max);
            }
            let inv = 1.0 / crate::simd::sum_map(o, |e| e);
            for o in o.iter_mut() {
                *o *= inv;
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(res.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxGrad)?))
    }
}

/// `y ⊙ (dy − ⟨dy, y⟩)` per row.
struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "fedsb-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let _p = crate::profile::span(self.name());
        let (y, dy) = (f32_slice(s1, l1, "softmax grad")?, f32_slice(s2, l2, "softmax grad")?);
        let n = l1.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut out = buffer_for_overwrite(y.len());
        out.par_chunks_mut(n).zip(y.par_chunks(n).zip(dy.par_chunks(n))).for_each(|(o, (y, dy))| {
            let dot = crate::simd::dot(y, dy);
            for ((o, &y), &g) in o.iter_mut().zip(y).zip(dy) {
                *o = y * (g - dot);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Layer norm over the last dimension with frozen `w` and `b`.
struct LayerNorm {
    eps: f32,
}

/// Mean and 1/std of a row.
#[inline]
fn moments(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = crate::simd::sum_map(x, |v| v) / n;
    let var = crate::simd::sum_map(x, |v| (v - mean) * (v - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "fedsb-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let _p = crate::profile::span(self.name());
        let (x, w, b) =
            (f32_slice(s1, l1, "layer norm")?, f32_slice(s2, l2, "layer norm")?, f32_slice(s3, l3, "layer norm")?);
        let n = w.len();
        if n == 0 || b.len() != n || l1.shape().dims().last() != Some(&n) {
            candle_core::bail!("layer norm: input {:?}, weight [{n}], bias [{}]", l1.shape(), b.len());
        }
        let mut out = buffer_for_overwrite(x.len());
        out.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(o, x)| {
            let (mean, rstd) = moments(x, self.eps);
            for (((o, &v), &w), &b) in o.iter_mut().zip(x).zip(w).zip(b) {
                *o = (v - mean) * rstd * w + b;
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = x.apply_op3_no_bwd(w, &grad.contiguous()?, &LayerNormGrad { eps: self.eps })?;
        Ok((Some(dx), None, None))
    }
}

/// `dx = rstd · (g − mean(g) − x̂·mean(g·x̂))` with `g = w ⊙ dy`, `x̂ = (x − mean)·rstd`.
struct LayerNormGrad {
    eps: f32,
}

impl CustomOp3 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "fedsb-layer-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let _p = crate::profile::span(self.name());
        let (x, w, dy) = (
            f32_slice(s1, l1, "layer norm grad")?,
            f32_slice(s2, l2, "layer norm grad")?,
            f32_slice(s3, l3, "layer norm grad")?,
        );
        let n = w.len();
        let mut out = buffer_for_overwrite(x.len());
        out.par_chunks_mut(n).zip(x.par_chunks(n).zip(dy.par_chunks(n))).for_each(|(o, (x, dy))| {
            {
                let (mean, rstd) = moments(x, self.eps);
                let inv_n = 1.0 / n as f32;
                // o holds g = w ⊙ dy first.
                for ((o, &w), &d) in o.iter_mut().zip(w).zip(dy) {
                    *o = w * d;
                }
                let mg = crate::simd::sum_map(o, |g| g) * inv_n;
                let mgx = crate::simd::sum_zip(o, x, |g, v| g * (v - mean)) * rstd * inv_n;
                for (o, &v) in o.iter_mut().zip(x) {
                    let xhat = (v - mean) * rstd;
                    *o = rstd * (*o - mg - xhat * mgx);
                }
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// RMSNorm over the last dimension with a frozen weight: `x / √(mean(x²) + eps) · w`.
struct RmsNorm {
    eps: f32,
}

#[inline]
fn rms_rstd(x: &[f32], eps: f32) -> f32 {
    1.0 / (crate::simd::sum_map(x, |v| v * v) / x.len() as f32 + eps).sqrt()
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fedsb-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let _p = crate::profile::span(self.name());
        let (x, w) = (f32_slice(s1, l1, "rms norm")?, f32_slice(s2, l2, "rms norm")?);
        let n = w.len();
        if n == 0 || l1.shape().dims().last() != Some(&n) {
            candle_core::bail!("rms norm: input {:?}, weight [{n}]", l1.shape());
        }
        let mut out = buffer_for_overwrite(x.len());
        out.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(o, x)| {
            let r = rms_rstd(x, self.eps);
            for ((o, &v), &w) in o.iter_mut().zip(x).zip(w) {
                *o = v * r * w;
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = x.apply_op3_no_bwd(w, &grad.contiguous()?, &RmsNormGrad { eps: self.eps })?;
        Ok((Some(dx), None))
    }
}

/// `dx = r·(g − x·r²·mean(g·x))` with `g = w ⊙ dy`, `r = 1/√(mean(x²) + eps)`.
struct RmsNormGrad {
    eps: f32,
}

impl CustomOp3 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "fedsb-rms-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let _p = crate::profile::span(self.name());
        let (x, w, dy) = (
            f32_slice(s1, l1, "rms norm grad")?,
            f32_slice(s2, l2, "rms norm grad")?,
            f32_slice(s3, l3, "rms norm grad")?,
        );
        let n = w.len();
        let mut out = buffer_for_overwrite(x.len());
        out.par_chunks_mut(n).zip(x.par_chunks(n).zip(dy.par_chunks(n))).for_each(|(o, (x, dy))| {
            {
                let r = rms_rstd(x, self.eps);
                // o holds w ⊙ dy first.
                for ((o, &w), &d) in o.iter_mut().zip(w).zip(dy) {
                    *o = w * d;
                }
                let mgx = crate::simd::dot(o, x) / n as f32;
                for (o, &v) in o.iter_mut().zip(x) {
                    *o = r * (*o - v * r * r * mgx);
                }
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// A raw output pointer that may cross to rayon's threads (each piece writes a disjoint block).
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: only used for disjoint blocks of one output, while the borrow it came from is held.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so that closures capture the whole `Send` wrapper, not its field).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// MKL's sequential sgemm on `threads` disjoint blocks of `dst` in parallel: rows when `m ≥ n`, else columns.
/// Below about 2¹⁸ multiply-adds one thread does it all (the split costs more than it saves).
///
/// # Safety
/// As [`gemm_into`]; `la`/`lb` are [`crate::mkl::operand`]'s description of lhs/rhs.
#[allow(clippy::too_many_arguments)]
unsafe fn mkl_gemm_split(
    mkl: &crate::mkl::Mkl,
    dst: SendPtr,
    dst_rs: usize,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    (lhs, lhs_rs, la): (usize, usize, (usize, bool)),
    (rhs, rhs_cs, lb): (usize, usize, (usize, bool)),
    threads: usize,
) {
    let beta = if accumulate { 1.0 } else { 0.0 };
    let by_rows = m >= n;
    let len = if by_rows { m } else { n };
    let parts = if m * n * k < 1 << 18 { 1 } else { threads.clamp(1, len) };
    let piece = len.div_ceil(parts);
    let run = |i: usize| {
        let (s, e) = (i * piece, ((i + 1) * piece).min(len));
        if s >= e {
            return;
        }
        let (lhs, rhs) = (lhs as *const f32, rhs as *const f32);
        // SAFETY: block [s, e) of dst's rows (with lhs's matching rows) or columns (with rhs's matching columns).
        unsafe {
            if by_rows {
                mkl.sgemm_rm(
                    e - s,
                    n,
                    k,
                    1.0,
                    lhs.add(s * lhs_rs),
                    la,
                    rhs,
                    lb,
                    beta,
                    dst.get().add(s * dst_rs),
                    dst_rs,
                );
            } else {
                mkl.sgemm_rm(m, e - s, k, 1.0, lhs, la, rhs.add(s * rhs_cs), lb, beta, dst.get().add(s), dst_rs);
            }
        }
        crate::simd::clear_upper_simd_state();
    };
    if parts == 1 {
        run(0);
    } else {
        (0..parts).into_par_iter().for_each(run);
    }
}

/// `dst (m×n, row stride dst_rs) = [dst +] lhs · rhs` with arbitrary row/column strides of `lhs` (m×k) and `rhs` (k×n),
/// on `threads` threads: by MKL's sgemm where [`crate::mkl`] loaded it and the strides suit CBLAS, else by faer's
/// matmul.
///
/// faer rather than the `gemm` crate (candle's CPU GEMM) as the fallback: faer's x86 kernels pick AVX-512 at run
/// time where the CPU has it, the `gemm` crate only behind a nightly feature. Measured on a 2-core Sapphire
/// Rapids at 2048 × 1536 × 384: faer 169 GFLOP/s, `gemm` 72, PyTorch/MKL 178 (on a later day: faer 236–265,
/// MKL 290–330 at the MiniLM shapes).
///
/// # Safety
/// The strides must address elements inside `lhs` and `rhs` for every (row, column) of the product, and
/// `dst` must hold `m` rows of `n` elements `dst_rs` apart.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_into(
    dst: &mut [f32],
    dst_rs: usize,
    mnk: (usize, usize, usize),
    accumulate: bool,
    lhs: &[f32],
    lhs_strides: (usize, usize),
    rhs: &[f32],
    rhs_strides: (usize, usize),
    threads: usize,
) {
    let mkl = crate::mkl::load().as_ref().ok();
    // SAFETY: forwarded from the caller.
    unsafe { gemm_into_on(mkl, dst, dst_rs, mnk, accumulate, lhs, lhs_strides, rhs, rhs_strides, threads) }
}

/// [`gemm_into`] on a chosen backend: MKL when `mkl` is given (and the strides suit CBLAS), else faer.
///
/// # Safety
/// As [`gemm_into`].
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_into_on(
    mkl: Option<&crate::mkl::Mkl>,
    dst: &mut [f32],
    dst_rs: usize,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
    threads: usize,
) {
    use faer::{Accum, MatMut, MatRef, Par};
    let _p = crate::profile::span("gemm");
    if m == 0 || n == 0 {
        return;
    }
    debug_assert!(dst.len() >= (m - 1) * dst_rs + n);
    if k == 0 {
        // An empty sum: the output must still be written (it may come from `buffer_for_overwrite`).
        if !accumulate {
            dst.chunks_mut(dst_rs.max(1)).take(m).for_each(|row| row[..n].fill(0.0));
        }
        return;
    }
    let (dst_ptr, lhs_ptr, rhs_ptr) = (SendPtr(dst.as_mut_ptr()), lhs.as_ptr() as usize, rhs.as_ptr() as usize);
    // SAFETY: the caller vouches for dst (m rows of n, dst_rs apart), lhs and rhs.
    let (dst, lhs, rhs) = unsafe {
        (
            MatMut::from_raw_parts_mut(dst.as_mut_ptr(), m, n, dst_rs as isize, 1),
            MatRef::from_raw_parts(lhs.as_ptr(), m, k, lhs_rs as isize, lhs_cs as isize),
            MatRef::from_raw_parts(rhs.as_ptr(), k, n, rhs_rs as isize, rhs_cs as isize),
        )
    };
    if let Some(mkl) = mkl
        && let (Some(la), Some(lb), Some(_)) = (
            crate::mkl::operand(m, k, lhs_rs, lhs_cs),
            crate::mkl::operand(k, n, rhs_rs, rhs_cs),
            crate::mkl::operand(m, n, dst_rs, 1),
        )
    {
        // SAFETY: as for faer below; the pieces are disjoint blocks of dst's rows or columns.
        unsafe {
            mkl_gemm_split(
                mkl,
                dst_ptr,
                dst_rs,
                (m, n, k),
                accumulate,
                (lhs_ptr, lhs_rs, la),
                (rhs_ptr, rhs_cs, lb),
                threads,
            )
        };
        crate::simd::clear_upper_simd_state();
        return;
    }
    let par = if threads > 1 { Par::rayon(threads) } else { Par::Seq };
    faer::linalg::matmul::matmul(dst, if accumulate { Accum::Add } else { Accum::Replace }, lhs, rhs, 1.0f32, par);
    if threads > 1 {
        crate::simd::clear_upper_simd_state_everywhere();
    } else {
        crate::simd::clear_upper_simd_state();
    }
}

/// `x · wᵀ (+ b)` on the kernels' GEMM (`gemm_into`: MKL or faer), the forward of [`FrozenLinear`] and
/// [`FrozenMatmulK`]. With a bias the output starts as the bias and the GEMM accumulates into it, so the bias
/// costs no extra pass.
fn frozen_linear_cpu(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    bias: Option<&[f32]>,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let (x, w) = (f32_slice(s1, l1, "linear")?, f32_slice(s2, l2, "linear")?);
    let (rows, k) = l1.shape().dims2()?;
    let (n, k2) = l2.shape().dims2()?;
    if k != k2 || bias.is_some_and(|b| b.len() != n) {
        let b = bias.map_or(String::new(), |b| format!(", b [{}]", b.len()));
        candle_core::bail!("linear: x [{rows}, {k}], w [{n}, {k2}]{b}");
    }
    let mut out = buffer_for_overwrite(rows * n);
    if let Some(b) = bias
        && n > 0
    {
        out.par_chunks_mut(n * 64).for_each(|o| {
            for row in o.chunks_mut(n) {
                row.copy_from_slice(b);
            }
        });
    }
    let threads = candle_core::utils::get_num_threads();
    // SAFETY: x is rows×k row-major; wᵀ (k×n) is w read with row stride 1 and column stride k.
    unsafe { gemm_into(&mut out, n, (rows, n, k), bias.is_some(), x, (k, 1), w, (1, k), threads) };
    Ok((CpuStorage::F32(out), Shape::from((rows, n))))
}

/// A frozen linear layer with its bias fused into the GEMM: `x · wᵀ + b` (`x` `[rows, k]`, `w` `[n, k]`, `b`
/// `[n]`). The output starts as the bias and the GEMM accumulates into it, so the bias costs no extra pass.
/// Backward: the input gradient only (`w` and `b` are frozen).
struct FrozenLinear;

impl CustomOp3 for FrozenLinear {
    fn name(&self) -> &'static str {
        "fedsb-frozen-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let _p = crate::profile::span(self.name());
        frozen_linear_cpu(s1, l1, s2, l2, Some(f32_slice(s3, l3, "linear")?))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.contiguous()?.apply_op2_no_bwd(&w.contiguous()?, &FrozenLinearGrad)?), None, None))
    }
}

/// The input gradient of [`FrozenLinear`]: `dx = dy · w` (`dy` `[rows, n]`, `w` `[n, k]`), on the kernels' GEMM.
struct FrozenLinearGrad;

impl CustomOp2 for FrozenLinearGrad {
    fn name(&self) -> &'static str {
        "fedsb-frozen-linear-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let _p = crate::profile::span(self.name());
        let (dy, w) = (f32_slice(s1, l1, "linear grad")?, f32_slice(s2, l2, "linear grad")?);
        let (rows, n) = l1.shape().dims2()?;
        let (n2, k) = l2.shape().dims2()?;
        if n != n2 {
            candle_core::bail!("linear grad: dy [{rows}, {n}], w [{n2}, {k}]");
        }
        let mut dx = buffer_for_overwrite(rows * k);
        let threads = candle_core::utils::get_num_threads();
        // SAFETY: dy is rows×n and w is n×k, both row-major; dx is rows×k.
        unsafe { gemm_into(&mut dx, k, (rows, k, n), false, dy, (n, 1), w, (k, 1), threads) };
        Ok((CpuStorage::F32(dx), Shape::from((rows, k))))
    }
}

/// `x · wᵀ` for a frozen `w` `[n, k]` (no bias): the forward and its input gradient on the kernels' GEMM (the LM head).
struct FrozenMatmulK;

impl CustomOp2 for FrozenMatmulK {
    fn name(&self) -> &'static str {
        "fedsb-frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let _p = crate::profile::span(self.name());
        frozen_linear_cpu(s1, l1, s2, l2, None)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.contiguous()?.apply_op2_no_bwd(&w.contiguous()?, &FrozenLinearGrad)?), None))
    }
}

/// `x · wᵀ` for a frozen `w` `[n, k]`, `x` `[rows, k]` (CPU f32); the gradient is `x`'s only.
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, FrozenMatmulK)
}

/// `x · wᵀ + b` for a frozen `w` `[n, k]` and bias `b` `[n]`, `x` `[rows, k]` (CPU f32).
pub fn frozen_linear(x: &Tensor, w: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, FrozenLinear)
}

thread_local! {
    static OFF_HERE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Cross-entropy of each row of `logits` `[m, c]` against class ids `[m]` (u32): `[m]`, the negative
/// log-softmax at the target, in one pass per row (no `[m, c]` log-softmax is kept: for a language model's
/// vocabulary that is the largest tensor of the step). Backward: `g_i · (softmax_i − onehot(t_i))`.
struct TokenNll;

fn targets_slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [u32]> {
    let CpuStorage::U32(v) = s else { candle_core::bail!("cross-entropy: targets must be u32") };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("cross-entropy: targets must be contiguous"),
    }
}

/// `log Σ exp(x)` of a row, stably.
#[inline]
fn log_sum_exp(x: &[f32]) -> f32 {
    let max = crate::simd::max(x);
    max + crate::simd::sum_map(x, |v| crate::simd::exp_f32(v - max)).ln()
}

impl CustomOp2 for TokenNll {
    fn name(&self) -> &'static str {
        "fedsb-token-nll"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let _p = crate::profile::span(self.name());
        let x = f32_slice(s1, l1, "cross-entropy")?;
        let t = targets_slice(s2, l2)?;
        let (m, c) = l1.shape().dims2()?;
        if t.len() != m {
            candle_core::bail!("cross-entropy: {m} rows but {} targets", t.len());
        }
        if let Some(bad) = t.iter().find(|&&t| t as usize >= c) {
            candle_core::bail!("cross-entropy: target {bad} outside {c} classes");
        }
        let mut out = buffer_for_overwrite(m);
        out.par_iter_mut().zip(x.par_chunks(c.max(1))).zip(t.par_iter()).for_each(|((o, row), &t)| {
            *o = log_sum_exp(row) - row[t as usize];
        });
        Ok((CpuStorage::F32(out), Shape::from(m)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = logits.apply_op3_no_bwd(targets, &grad.contiguous()?, &TokenNllGrad)?;
        Ok((Some(g), None))
    }
}

/// `g_i · (softmax(x_i) − onehot(t_i))`.
struct TokenNllGrad;

impl CustomOp3 for TokenNllGrad {
    fn name(&self) -> &'static str {
        "fedsb-token-nll-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let _p = crate::profile::span(self.name());
        let x = f32_slice(s1, l1, "cross-entropy grad")?;
        let t = targets_slice(s2, l2)?;
        let g = f32_slice(s3, l3, "cross-entropy grad")?;
        let (_, c) = l1.shape().dims2()?;
        let mut out = buffer_for_overwrite(x.len());
        out.par_chunks_mut(c.max(1)).zip(x.par_chunks(c.max(1))).zip(t.par_iter().zip(g.par_iter())).for_each(
            |((o, row), (&t, &g))| {
                let lse = log_sum_exp(row);
                for (o, &v) in o.iter_mut().zip(row) {
                    *o = g * crate::simd::exp_f32(v - lse);
                }
                o[t as usize] -= g;
            },
        );
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Cross-entropy of each row of `logits` `[m, c]` against `targets` `[m]` (u32), as `[m]` (CPU f32).
pub fn token_nll(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    logits.contiguous()?.apply_op2(&targets.contiguous()?, TokenNll)
}

/// SwiGLU's gate `silu(g) · u` (`g`, `u` of one shape).
struct SiluMul;

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + crate::simd::exp_f32(-x))
}

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "fedsb-silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let _p = crate::profile::span(self.name());
        let (g, u) = (f32_slice(s1, l1, "silu·gate")?, f32_slice(s2, l2, "silu·gate")?);
        if l1.shape() != l2.shape() {
            candle_core::bail!("silu·gate: gate {:?} but up {:?}", l1.shape(), l2.shape());
        }
        let out = map2(g, u, |g, u| g * sigmoid(g) * u);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = grad.contiguous()?;
        let dg = g.apply_op3_no_bwd(u, &dy, &SiluMulGradGate)?;
        let du = g.apply_op2_no_bwd(&dy, &SiluMulGradUp)?;
        Ok((Some(dg), Some(du)))
    }
}

/// `∂/∂g = dy · u · σ(g)·(1 + g·(1 − σ(g)))`.
struct SiluMulGradGate;

impl CustomOp3 for SiluMulGradGate {
    fn name(&self) -> &'static str {
        "fedsb-silu-mul-grad-gate"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let _p = crate::profile::span(self.name());
        let (g, u, dy) =
            (f32_slice(s1, l1, "silu grad")?, f32_slice(s2, l2, "silu grad")?, f32_slice(s3, l3, "silu grad")?);
        let out = map3(g, u, dy, |g, u, d| {
            let sg = sigmoid(g);
            d * u * sg * (1.0 + g * (1.0 - sg))
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `∂/∂u = dy · silu(g)`.
struct SiluMulGradUp;

impl CustomOp2 for SiluMulGradUp {
    fn name(&self) -> &'static str {
        "fedsb-silu-mul-grad-up"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let _p = crate::profile::span(self.name());
        let (g, dy) = (f32_slice(s1, l1, "silu grad")?, f32_slice(s2, l2, "silu grad")?);
        let out = map2(g, dy, |g, d| d * g * sigmoid(g));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// RoPE in the rotate-half layout: for each `[b, h, t]` row `x = (x1, x2)`, `(x1·c − x2·s, x2·c + x1·s)` with
/// `c, s` `[t, d/2]`; `inverse` rotates the other way, which is also the backward.
struct Rope {
    inverse: bool,
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "fedsb-rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let _p = crate::profile::span(self.name());
        let (x, cos, sin) = (f32_slice(s1, l1, "rope")?, f32_slice(s2, l2, "rope")?, f32_slice(s3, l3, "rope")?);
        let (_, _, t, d) = l1.shape().dims4()?;
        let half = d / 2;
        if d % 2 != 0 || l2.shape().dims() != [t, half] || l3.shape().dims() != [t, half] {
            candle_core::bail!("rope: x {:?}, cos {:?}, sin {:?}", l1.shape(), l2.shape(), l3.shape());
        }
        let sign = if self.inverse { -1.0f32 } else { 1.0 };
        let mut out = buffer_for_overwrite(x.len());
        out.par_chunks_mut(d).zip(x.par_chunks(d)).enumerate().for_each(|(row, (o, x))| {
            let p = row % t;
            let (c, s) = (&cos[p * half..(p + 1) * half], &sin[p * half..(p + 1) * half]);
            for i in 0..half {
                let (x1, x2, si) = (x[i], x[i + half], sign * s[i]);
                o[i] = x1 * c[i] - x2 * si;
                o[i + half] = x2 * c[i] + x1 * si;
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = grad.contiguous()?.apply_op3_no_bwd(cos, sin, &Rope { inverse: !self.inverse })?;
        Ok((Some(dx), None, None))
    }
}

/// Scaled dot-product attention in one op, parallel over the batch: `softmax(Q·Kᵀ·scale + mask)·V` for `q`
/// `[b, h, t, d]`, `k`/`v` `[b, h_kv, s, d]` (grouped-query when `h_kv < h`), or with `seq_major` the layout the
/// projections produce, `q` `[b, t, h, d]` and `k`/`v` `[b, s, h_kv, d]` (no head split/merge copies), and an
/// optional additive mask `[b, t, s]` shared by the heads. Backward recomputes the probabilities (one small GEMM)
/// instead of keeping them, and gives `dQ`, `dK`, `dV` in one pass.
struct Attention {
    scale: f32,
    /// `[b, t, s]`, row-major.
    mask: Option<std::sync::Arc<Vec<f32>>>,
    seq_major: bool,
    /// The forward's probabilities `[b, h, t, s]`, kept for the backward (which otherwise recomputes them) when
    /// they take at most [`SAVED_PROBS_MAX`] values.
    saved_probs: std::sync::Mutex<Option<Vec<f32>>>,
}

/// The most attention probabilities one op keeps from its forward for its backward: 8 Mi values (32 MiB), so
/// MiniLM's (6.3 MiB a layer) and SmolLM2's training shapes (2.4 MiB) are kept and long contexts recomputed.
const SAVED_PROBS_MAX: usize = 8 << 20;

#[cfg(test)]
thread_local! {
    /// Tests: the backward recomputes the probabilities even where the forward could keep them.
    static RECOMPUTE_PROBS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// How many probabilities an attention op may keep for its backward.
fn saved_probs_max() -> usize {
    #[cfg(test)]
    if RECOMPUTE_PROBS.with(|r| r.get()) {
        return 0;
    }
    SAVED_PROBS_MAX
}

impl Attention {
    fn new(scale: f32, mask: Option<std::sync::Arc<Vec<f32>>>, seq_major: bool) -> Self {
        Self { scale, mask, seq_major, saved_probs: std::sync::Mutex::new(None) }
    }
}

/// Dimensions of an attention call.
#[derive(Clone, Copy)]
struct AttnDims {
    b: usize,
    h: usize,
    hkv: usize,
    t: usize,
    s: usize,
    d: usize,
    seq_major: bool,
}

impl AttnDims {
    /// Offset of query head `qh` inside a batch's block, and its row stride.
    fn q_head(&self, qh: usize) -> (usize, usize) {
        if self.seq_major { (qh * self.d, self.h * self.d) } else { (qh * self.t * self.d, self.d) }
    }

    /// Offset of kv head `kh` inside a batch's block, and its row stride.
    fn kv_head(&self, kh: usize) -> (usize, usize) {
        if self.seq_major { (kh * self.d, self.hkv * self.d) } else { (kh * self.s * self.d, self.d) }
    }
}

impl Attention {
    fn dims(&self, q: &Layout, k: &Layout, v: &Layout) -> candle_core::Result<AttnDims> {
        let ((b, h, t, d), (b2, hkv, s, d2)) = if self.seq_major {
            let (b, t, h, d) = q.shape().dims4()?;
            let (b2, s, hkv, d2) = k.shape().dims4()?;
            ((b, h, t, d), (b2, hkv, s, d2))
        } else {
            (q.shape().dims4()?, k.shape().dims4()?)
        };
        if b2 != b || d2 != d || v.shape() != k.shape() || hkv == 0 || h % hkv != 0 {
            candle_core::bail!("attention: q {:?}, k {:?}, v {:?}", q.shape(), k.shape(), v.shape());
        }
        Ok(AttnDims { b, h, hkv, t, s, d, seq_major: self.seq_major })
    }

    /// The probabilities `[t, s]` of one query head (`q` from its first row, row stride `qrs`) against one kv
    /// head (`k`, row stride `krs`) of batch `bi`, into `p`.
    fn probs(&self, dm: AttnDims, bi: usize, (q, qrs): (&[f32], usize), (k, krs): (&[f32], usize), p: &mut [f32]) {
        let AttnDims { t, s, d, .. } = dm;
        // SAFETY: q is t×d (row stride qrs), k is s×d (row stride krs) read as kᵀ, p is t×s.
        unsafe { gemm_into(p, s, (t, s, d), false, q, (qrs, 1), k, (1, krs), 1) };
        #[cfg(target_arch = "x86_64")]
        if crate::simd::has_avx2() {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            return unsafe { self.softmax_rows_avx2(bi, t, s, p) };
        }
        self.softmax_rows(bi, t, s, p);
    }

    /// [`Self::softmax_rows`] compiled for AVX2 + FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn softmax_rows_avx2(&self, bi: usize, t: usize, s: usize, p: &mut [f32]) {
        self.softmax_rows(bi, t, s, p)
    }

    /// Scales, masks and softmaxes the t rows of s scores of batch `bi` in place.
    #[inline(always)]
    fn softmax_rows(&self, bi: usize, t: usize, s: usize, p: &mut [f32]) {
        for (i, row) in p.chunks_mut(s).enumerate() {
            let m = self.mask.as_ref().map(|m| &m[(bi * t + i) * s..(bi * t + i + 1) * s]);
            match m {
                Some(m) => row.iter_mut().zip(m).for_each(|(x, &m)| *x = *x * self.scale + m),
                None => row.iter_mut().for_each(|x| *x *= self.scale),
            }
            let max = crate::simd::max(row);
            row.iter_mut().for_each(|x| *x = crate::simd::exp_f32(*x - max));
            let inv = 1.0 / crate::simd::sum_map(row, |x| x);
            row.iter_mut().for_each(|x| *x *= inv);
        }
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fedsb-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let _p = crate::profile::span(self.name());
        let (q, k, v) =
            (f32_slice(s1, l1, "attention")?, f32_slice(s2, l2, "attention")?, f32_slice(s3, l3, "attention")?);
        let dm = self.dims(l1, l2, l3)?;
        let AttnDims { b, h, hkv, t, s, d, .. } = dm;
        if self.mask.as_ref().is_some_and(|m| m.len() != b * t * s) {
            candle_core::bail!("attention: mask does not match [{b}, {t}, {s}]");
        }
        let g = h / hkv;
        let (qb, kb) = (h * t * d, hkv * s * d);
        let mut out = buffer_for_overwrite(b * qb);
        let pb = h * t * s;
        // Each batch's probabilities go to the saved buffer where it is kept, else to a per-task scratch.
        let mut saved = if b * pb <= saved_probs_max() { buffer_for_overwrite(b * pb) } else { Vec::new() };
        let batch = |p: &mut [f32], bi: usize, o: &mut [f32]| {
            let (qblk, kblk, vblk) =
                (&q[bi * qb..(bi + 1) * qb], &k[bi * kb..(bi + 1) * kb], &v[bi * kb..(bi + 1) * kb]);
            for qh in 0..h {
                let ((qo, qrs), (ko, krs)) = (dm.q_head(qh), dm.kv_head(qh / g));
                let p = if p.len() == pb { &mut p[qh * t * s..(qh + 1) * t * s] } else { &mut p[..t * s] };
                self.probs(dm, bi, (&qblk[qo..], qrs), (&kblk[ko..], krs), p);
                // SAFETY: p is t×s, v's head is s×d (row stride krs), the output head is t×d (row stride qrs).
                unsafe { gemm_into(&mut o[qo..], qrs, (t, d, s), false, p, (s, 1), &vblk[ko..], (krs, 1), 1) };
            }
        };
        if saved.is_empty() {
            out.par_chunks_mut(qb.max(1))
                .enumerate()
                .for_each_init(|| buffer_for_overwrite(t * s), |p, (bi, o)| batch(p, bi, o));
        } else {
            out.par_chunks_mut(qb.max(1))
                .zip(saved.par_chunks_mut(pb.max(1)))
                .enumerate()
                .for_each(|(bi, (o, p))| batch(p, bi, o));
            if let Ok(mut slot) = self.saved_probs.lock() {
                *slot = Some(saved);
            }
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // One op computes dQ, dK and dV into one buffer; split it here.
        let dy = grad.contiguous()?;
        let fwd = Attention::new(self.scale, self.mask.clone(), self.seq_major);
        let probs = self.saved_probs.lock().ok().and_then(|mut p| p.take());
        let packed = q.apply_op3_no_bwd(k, &dy, &AttentionGrad { fwd, v: v.contiguous()?, probs })?;
        let (nq, nk) = (q.elem_count(), k.elem_count());
        let dq = packed.narrow(0, 0, nq)?.reshape(q.shape())?;
        let dk = packed.narrow(0, nq, nk)?.reshape(k.shape())?;
        let dv = packed.narrow(0, nq + nk, nk)?.reshape(v.shape())?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// The backward of [`Attention`]: inputs q, k and dy (`v` held by the op: a custom op takes three inputs);
/// output `[dq ‖ dk ‖ dv]` flattened.
struct AttentionGrad {
    fwd: Attention,
    v: Tensor,
    /// The forward's probabilities `[b, h, t, s]` where it kept them (else they are recomputed).
    probs: Option<Vec<f32>>,
}

impl CustomOp3 for AttentionGrad {
    fn name(&self) -> &'static str {
        "fedsb-attention-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let _p = crate::profile::span(self.name());
        let (q, k, dy) = (
            f32_slice(s1, l1, "attention grad")?,
            f32_slice(s2, l2, "attention grad")?,
            f32_slice(s3, l3, "attention grad")?,
        );
        let (vg, vl) = self.v.storage_and_layout();
        let v = storage_f32(&vg, vl, "attention grad v")?;
        let dm = self.fwd.dims(l1, l2, vl)?;
        let AttnDims { h, hkv, t, s, d, .. } = dm;
        let (nq, nk) = (q.len(), k.len());
        if dy.len() != nq || v.len() != nk {
            candle_core::bail!("attention grad: dy has {} values, v {}; expected {nq} and {nk}", dy.len(), v.len());
        }
        let g = h / hkv;
        let scale = self.fwd.scale;
        let (qb, kb) = (h * t * d, hkv * s * d);
        // The forward's probabilities where it kept them for this shape.
        let saved = self.probs.as_deref().filter(|p| p.len() == dm.b * h * t * s);
        let mut out = buffer_for_overwrite(nq + 2 * nk);
        let (dq_all, dkv) = out.split_at_mut(nq);
        let (dk_all, dv_all) = dkv.split_at_mut(nk);
        // One task per batch: it owns that batch's dQ, dK and dV.
        dq_all.par_chunks_mut(qb).zip(dk_all.par_chunks_mut(kb).zip(dv_all.par_chunks_mut(kb))).enumerate().for_each(
            |(bi, (dq, (dk, dv)))| {
                let blk = |n: usize| bi * n..(bi + 1) * n;
                let (qblk, dyblk) = (&q[blk(qb)], &dy[blk(qb)]);
                let (kblk, vblk) = (&k[blk(kb)], &v[blk(kb)]);
                let mut scratch = if saved.is_none() { buffer_for_overwrite(t * s) } else { Vec::new() };
                let mut dp = buffer_for_overwrite(t * s);
                for qh in 0..h {
                    let ((qo, qrs), (ko, krs)) = (dm.q_head(qh), dm.kv_head(qh / g));
                    let first = qh % g == 0;
                    let p: &[f32] = match saved {
                        Some(all) => &all[(bi * h + qh) * t * s..(bi * h + qh + 1) * t * s],
                        None => {
                            self.fwd.probs(dm, bi, (&qblk[qo..], qrs), (&kblk[ko..], krs), &mut scratch);
                            &scratch
                        }
                    };
                    // SAFETY (all four): buffers of the stated sizes and row strides; transposes by strides.
                    // dV += Pᵀ·dY   (s×t · t×d)
                    unsafe { gemm_into(&mut dv[ko..], krs, (s, d, t), !first, p, (1, s), &dyblk[qo..], (qrs, 1), 1) };
                    // dP = dY·Vᵀ    (t×d · d×s)
                    unsafe {
                        gemm_into(&mut dp, s, (t, s, d), false, &dyblk[qo..], (qrs, 1), &vblk[ko..], (1, krs), 1)
                    };
                    // dS = P ⊙ (dP − rowsum(dP ⊙ P)) · scale
                    {
                        for (pr, dr) in p.chunks(s).zip(dp.chunks_mut(s)) {
                            let dot = crate::simd::dot(pr, dr);
                            for (x, &pv) in dr.iter_mut().zip(pr) {
                                *x = pv * (*x - dot) * scale;
                            }
                        }
                    };
                    // dQ = dS·K     (t×s · s×d)
                    unsafe { gemm_into(&mut dq[qo..], qrs, (t, d, s), false, &dp, (s, 1), &kblk[ko..], (krs, 1), 1) };
                    // dK += dSᵀ·Q   (s×t · t×d)
                    unsafe { gemm_into(&mut dk[ko..], krs, (s, d, t), !first, &dp, (1, s), &qblk[qo..], (qrs, 1), 1) };
                }
            },
        );
        let n = out.len();
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }
}

fn attention_op(mask: Option<&Tensor>, scale: f64, seq_major: bool) -> candle_core::Result<Attention> {
    let mask = match mask {
        Some(m) => Some(std::sync::Arc::new(m.contiguous()?.flatten_all()?.to_vec1::<f32>()?)),
        None => None,
    };
    Ok(Attention::new(scale as f32, mask, seq_major))
}

/// Scaled dot-product attention (CPU f32): `q` `[b, h, t, d]`, `k`/`v` `[b, h_kv, s, d]`, `mask` an additive
/// `[b, 1, t, s]` (or `[b, t, s]`) mask shared by the heads.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, scale: f64) -> candle_core::Result<Tensor> {
    q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, attention_op(mask, scale, false)?)
}

/// The same on the projections' layout: `q` `[b, t, h, d]`, `k`/`v` `[b, s, h_kv, d]`; the result is
/// `[b, t, h, d]` (no head split or merge copies).
pub fn attention_seq_major(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> candle_core::Result<Tensor> {
    q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, attention_op(mask, scale, true)?)
}

/// `silu(gate) · up` (CPU f32).
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, SiluMul)
}

/// RoPE, rotate-half layout: `x` `[b, h, t, d]`, `cos`/`sin` `[t, d/2]` (CPU f32; no gradient for the tables).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rope { inverse: false })
}

/// The contiguous f32 data of a CPU storage.
fn storage_f32<'a>(s: &'a candle_core::Storage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    match s {
        candle_core::Storage::Cpu(c) => f32_slice(c, l, what),
        _ => candle_core::bail!("{what}: CPU tensors only"),
    }
}

/// The merged weight `W0 + s·B·R·A` (`n×k`) of a LoRA-SB layer: `x·(W0 + s·B·R·A)ᵀ` equals
/// `x·W0ᵀ + s·((x·Aᵀ)·Rᵀ)·Bᵀ`, and `dy·(W0 + s·B·R·A)` the input gradient, each in one GEMM (the adapter
/// path costs two thin GEMMs and a pass over the output per layer). Costs a copy of W0 and an `n×k×r` GEMM.
fn merged_weight(
    (n, k, r): (usize, usize, usize),
    w0: &[f32],
    a: &[f32],
    b: &[f32],
    rm: &[f32],
    scale: f32,
    threads: usize,
) -> Vec<f32> {
    let sr: Vec<f32> = rm.iter().map(|v| v * scale).collect();
    let mut ra = buffer_for_overwrite(r * k);
    let mut w = w0.to_vec();
    // SAFETY: sR is r×r, A r×k, B n×r, all row-major; ra is r×k and w n×k.
    unsafe {
        gemm_into(&mut ra, k, (r, k, r), false, &sr, (r, 1), a, (k, 1), 1);
        gemm_into(&mut w, k, (n, k, r), true, b, (r, 1), &ra, (k, 1), threads);
    }
    w
}

/// A LoRA-SB layer in one op: `y = x·W0ᵀ + bias + s·((x·Aᵀ)·Rᵀ)·Bᵀ`, with `W0`, `bias`, `A`, `B` frozen and
/// `R` either shared `[r, r]` or per sample `[n, r, r]` (DP-SGD; `x`'s rows are then `n` samples of equal
/// length, sample-major). The adapter path accumulates into the base output in the same buffer; backward gives
/// the input gradient and R's (summed, or per sample), nothing for the frozen tensors.
struct LoraSbLinear {
    w0: Tensor,
    bias: Option<Tensor>,
    a: Tensor,
    b: Tensor,
    scale: f32,
    /// The forward's merged weight, kept for the backward's input gradient when that uses it too (the same R).
    merged: std::sync::Mutex<Option<Vec<f32>>>,
    /// The forward's `x·Aᵀ` (`rows×r`, small) where it computed it, kept for the backward's dR.
    h1: std::sync::Mutex<Option<Vec<f32>>>,
}

/// Sizes of a LoRA-SB op: rows of x, in, out, rank, samples (1 for a shared R).
#[derive(Clone, Copy)]
struct SbDims {
    rows: usize,
    k: usize,
    n: usize,
    r: usize,
    samples: usize,
}

impl LoraSbLinear {
    fn dims(&self, x: &Layout, rl: &Layout) -> candle_core::Result<SbDims> {
        Self::dims_of(x, rl, (&self.w0, &self.a, &self.b), self.bias.as_ref())
    }

    /// The sizes of a LoRA-SB op on `x` and `R` with frozen `(W0, A, B)` and bias, checked against each other.
    fn dims_of(
        x: &Layout,
        rl: &Layout,
        (w0, a, b): (&Tensor, &Tensor, &Tensor),
        bias: Option<&Tensor>,
    ) -> candle_core::Result<SbDims> {
        let (rows, k) = x.shape().dims2()?;
        let (n, k2) = w0.dims2()?;
        let (r, k3) = a.dims2()?;
        let (n2, r2) = b.dims2()?;
        let samples = match rl.shape().dims() {
            [a, b] if *a == r && *b == r => 1,
            [m, a, b] if *a == r && *b == r && *m > 0 && rows % m == 0 => *m,
            d => candle_core::bail!("LoRA-SB: R {d:?} for rank {r} and {rows} rows"),
        };
        if k != k2 || k != k3 || n != n2 || r != r2 || bias.is_some_and(|b| b.dims() != [n]) {
            candle_core::bail!("LoRA-SB: x [{rows}, {k}], W0 [{n}, {k2}], A [{r}, {k3}], B [{n2}, {r2}]");
        }
        Ok(SbDims { rows, k, n, r, samples })
    }

    /// The one R every row uses, if there is one: the shared R, or per-sample copies that are all bitwise
    /// equal (DP-SGD's per-sample leaf copies of R: equal values, separate gradients).
    fn common_r(d: SbDims, rm: &[f32]) -> Option<&[f32]> {
        let rr = d.r * d.r;
        let first = &rm[..rr];
        rm.chunks(rr.max(1))
            .skip(1)
            .all(|ri| ri.iter().zip(first).all(|(a, b)| a.to_bits() == b.to_bits()))
            .then_some(first)
    }

    /// Whether the forward runs on the merged weight `W0 + s·B·R·A` (see [`merged_weight`]) rather than the
    /// adapter path beside W0, by the memory each moves beyond the main GEMM: building the merged weight reads
    /// and writes `n×k` twice (copy of W0, rank-r update); the adapter path reads x once more (`x·Aᵀ`) and
    /// reads and writes the `rows×n` output once more (`+ ·Bᵀ`). It pays for MiniLM's training batch (2,048
    /// rows, 384-wide weights), not for SmolLM2's (512 rows, 576×1536 weights) nor one short sequence.
    fn merge_pays(d: SbDims) -> bool {
        4 * d.n * d.k <= d.rows * (d.k + 2 * d.n)
    }

    /// The same choice for the input gradient: the merged weight (`4·n·k`) against the adapter path's extra
    /// update of the `rows×k` input gradient (`(gB·R)·A`, `2·rows·k`).
    fn merge_pays_backward(d: SbDims) -> bool {
        2 * d.n <= d.rows
    }

    /// `h2 = h1·Rᵀ` per sample block of rows (`h1`, `h2` `[rows, r]`).
    fn apply_r(d: SbDims, h1: &[f32], rm: &[f32], h2: &mut [f32]) {
        let per = d.rows / d.samples;
        for i in 0..d.samples {
            let (h1s, h2s) = (&h1[i * per * d.r..(i + 1) * per * d.r], &mut h2[i * per * d.r..(i + 1) * per * d.r]);
            let ri = &rm[i * d.r * d.r..(i + 1) * d.r * d.r];
            // SAFETY: h1s is per×r, Rᵀ is R read with swapped strides, h2s is per×r.
            unsafe { gemm_into(h2s, d.r, (per, d.r, d.r), false, h1s, (d.r, 1), ri, (1, d.r), 1) };
        }
    }
}

impl CustomOp2 for LoraSbLinear {
    fn name(&self) -> &'static str {
        "fedsb-lora-sb-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let _p = crate::profile::span(self.name());
        let (x, rm) = (f32_slice(s1, l1, "LoRA-SB")?, f32_slice(s2, l2, "LoRA-SB")?);
        let d = self.dims(l1, l2)?;
        let (w0g, w0l) = self.w0.storage_and_layout();
        let (ag, al) = self.a.storage_and_layout();
        let (bg, bl) = self.b.storage_and_layout();
        let (w0, a, b) = (
            storage_f32(&w0g, w0l, "LoRA-SB W0")?,
            storage_f32(&ag, al, "LoRA-SB A")?,
            storage_f32(&bg, bl, "LoRA-SB B")?,
        );
        let threads = candle_core::utils::get_num_threads();
        let mut out = buffer_for_overwrite(d.rows * d.n);
        if let Some(bias) = &self.bias {
            let (bsg, bsl) = bias.storage_and_layout();
            let bias = storage_f32(&bsg, bsl, "LoRA-SB bias")?;
            out.par_chunks_mut(d.n.max(1) * 64).for_each(|o| {
                for row in o.chunks_mut(d.n.max(1)) {
                    row.copy_from_slice(bias);
                }
            });
        }
        if let Some(r0) = Self::common_r(d, rm)
            && Self::merge_pays(d)
        {
            let w = merged_weight((d.n, d.k, d.r), w0, a, b, r0, self.scale, threads);
            // SAFETY: x is rows×k, wᵀ is w (n×k) read with swapped strides, out is rows×n.
            unsafe {
                gemm_into(&mut out, d.n, (d.rows, d.n, d.k), self.bias.is_some(), x, (d.k, 1), &w, (1, d.k), threads)
            };
            if Self::merge_pays_backward(d)
                && let Ok(mut slot) = self.merged.lock()
            {
                *slot = Some(w);
            }
            return Ok((CpuStorage::F32(out), Shape::from((d.rows, d.n))));
        }
        let mut h1 = buffer_for_overwrite(d.rows * d.r);
        let mut h2 = buffer_for_overwrite(d.rows * d.r);
        // SAFETY (all): row-major buffers of the stated sizes; transposed operands by strides.
        unsafe {
            gemm_into(&mut out, d.n, (d.rows, d.n, d.k), self.bias.is_some(), x, (d.k, 1), w0, (1, d.k), threads);
            gemm_into(&mut h1, d.r, (d.rows, d.r, d.k), false, x, (d.k, 1), a, (1, d.k), threads);
        }
        Self::apply_r(d, &h1, rm, &mut h2);
        if self.scale != 1.0 {
            h2.iter_mut().for_each(|v| *v *= self.scale);
        }
        unsafe { gemm_into(&mut out, d.n, (d.rows, d.n, d.r), true, &h2, (d.r, 1), b, (1, d.r), threads) };
        if let Ok(mut slot) = self.h1.lock() {
            *slot = Some(h1);
        }
        Ok((CpuStorage::F32(out), Shape::from((d.rows, d.n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        r: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // The input gradient only where the graph needs it (not for the first layer's input, the embeddings).
        let need_dx = x.track_op();
        let merged = self.merged.lock().ok().and_then(|mut m| m.take());
        let grad_op = LoraSbGrad {
            w0: self.w0.clone(),
            a: self.a.clone(),
            b: self.b.clone(),
            scale: self.scale,
            need_dx,
            merged: std::sync::Mutex::new(merged),
            h1: std::sync::Mutex::new(self.h1.lock().ok().and_then(|mut h| h.take())),
        };
        let packed = x.apply_op3_no_bwd(r, &grad.contiguous()?, &grad_op)?;
        let nx = if need_dx { x.elem_count() } else { 0 };
        let dx = if need_dx { Some(packed.narrow(0, 0, nx)?.reshape(x.shape())?) } else { None };
        let dr = packed.narrow(0, nx, r.elem_count())?.reshape(r.shape())?;
        Ok((dx, Some(dr)))
    }
}

/// The backward of [`LoraSbLinear`]: inputs x, R, dy; output `[dx ‖ dR]` flattened.
struct LoraSbGrad {
    w0: Tensor,
    a: Tensor,
    b: Tensor,
    scale: f32,
    /// Whether to compute `dx` (output `[dx, dR]` flat) or only `dR`.
    need_dx: bool,
    /// The forward's merged weight, where it kept one.
    merged: std::sync::Mutex<Option<Vec<f32>>>,
    /// The forward's `x·Aᵀ`, where it kept it.
    h1: std::sync::Mutex<Option<Vec<f32>>>,
}

impl CustomOp3 for LoraSbGrad {
    fn name(&self) -> &'static str {
        "fedsb-lora-sb-linear-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let _p = crate::profile::span(self.name());
        let (x, rm, dy) = (
            f32_slice(s1, l1, "LoRA-SB grad")?,
            f32_slice(s2, l2, "LoRA-SB grad")?,
            f32_slice(s3, l3, "LoRA-SB grad")?,
        );
        let d = LoraSbLinear::dims_of(l1, l2, (&self.w0, &self.a, &self.b), None)?;
        let (w0g, w0l) = self.w0.storage_and_layout();
        let (ag, al) = self.a.storage_and_layout();
        let (bg, bl) = self.b.storage_and_layout();
        let (w0, a, b) = (
            storage_f32(&w0g, w0l, "LoRA-SB W0")?,
            storage_f32(&ag, al, "LoRA-SB A")?,
            storage_f32(&bg, bl, "LoRA-SB B")?,
        );
        let threads = candle_core::utils::get_num_threads();
        let (nx, nr) = (if self.need_dx { x.len() } else { 0 }, rm.len());
        let mut out = buffer_for_overwrite(nx + nr);
        let (dx, dr) = out.split_at_mut(nx);
        let mut gb = buffer_for_overwrite(d.rows * d.r);
        // x·Aᵀ: the forward's where it kept it, else computed below.
        let kept_h1 = self.h1.lock().ok().and_then(|mut h| h.take()).filter(|h| h.len() == d.rows * d.r);
        let have_h1 = kept_h1.is_some();
        let mut h1 = kept_h1.unwrap_or_else(|| buffer_for_overwrite(d.rows * d.r));
        // dx in one GEMM on the merged weight where that pays (as in the forward), else dy·W0 + (gB·R)·A.
        let merged = match LoraSbLinear::common_r(d, rm) {
            Some(r0) if self.need_dx && LoraSbLinear::merge_pays_backward(d) => {
                // The forward's, where it kept it (the same R), else built again.
                let kept = self.merged.lock().ok().and_then(|mut m| m.take()).filter(|w| w.len() == d.n * d.k);
                Some(kept.unwrap_or_else(|| merged_weight((d.n, d.k, d.r), w0, a, b, r0, self.scale, threads)))
            }
            _ => None,
        };
        // The adapter's share of dx, (gB·R)·A, separately: only without the merged weight.
        let adapter_dx = self.need_dx && merged.is_none();
        let mut t = if adapter_dx { buffer_for_overwrite(d.rows * d.r) } else { Vec::new() };
        // SAFETY (all): row-major buffers of the stated sizes; transposed operands by strides.
        unsafe {
            // gB = s·dy·B   (rows×n · n×r)
            gemm_into(&mut gb, d.r, (d.rows, d.r, d.n), false, dy, (d.n, 1), b, (d.r, 1), threads);
            // dx = dy·W0, or dy·(W0 + s·B·R·A)    (rows×n · n×k)
            if self.need_dx {
                let w = merged.as_deref().unwrap_or(w0);
                gemm_into(dx, d.k, (d.rows, d.k, d.n), false, dy, (d.n, 1), w, (d.k, 1), threads);
            }
            // h1 = x·Aᵀ     (rows×k · k×r)
            if !have_h1 {
                gemm_into(&mut h1, d.r, (d.rows, d.r, d.k), false, x, (d.k, 1), a, (1, d.k), threads);
            }
        }
        if self.scale != 1.0 {
            gb.iter_mut().for_each(|v| *v *= self.scale);
        }
        let per = d.rows / d.samples;
        for i in 0..d.samples {
            let rows = i * per * d.r..(i + 1) * per * d.r;
            let ri = &rm[i * d.r * d.r..(i + 1) * d.r * d.r];
            let dri = &mut dr[i * d.r * d.r..(i + 1) * d.r * d.r];
            unsafe {
                // t = gB·R     (per×r · r×r)
                if adapter_dx {
                    let g = &gb[rows.clone()];
                    gemm_into(&mut t[rows.clone()], d.r, (per, d.r, d.r), false, g, (d.r, 1), ri, (d.r, 1), 1);
                }
                // dR = gBᵀ·h1   (r×per · per×r)
                gemm_into(dri, d.r, (d.r, d.r, per), false, &gb[rows.clone()], (1, d.r), &h1[rows], (d.r, 1), 1);
            }
        }
        // dx += t·A   (rows×r · r×k)
        if adapter_dx {
            unsafe { gemm_into(dx, d.k, (d.rows, d.k, d.r), true, &t, (d.r, 1), a, (d.k, 1), threads) };
        }
        let n = out.len();
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }
}

/// A LoRA-SB layer `x·W0ᵀ + bias + scale·((x·Aᵀ)·Rᵀ)·Bᵀ` in one op (CPU f32): `x` `[rows, k]`, `R` `[r, r]` or per
/// sample `[n, r, r]` (rows sample-major). Gradients: `x` and `R` only.
pub fn lora_sb_linear(
    x: &Tensor,
    w0: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    r: &Tensor,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let op = LoraSbLinear {
        w0: w0.contiguous()?,
        bias: bias.map(|b| b.contiguous()).transpose()?,
        a: a.contiguous()?,
        b: b.contiguous()?,
        scale: scale as f32,
        merged: std::sync::Mutex::new(None),
        h1: std::sync::Mutex::new(None),
    };
    x.contiguous()?.apply_op2(&r.contiguous()?, op)
}

/// Whether the fused kernels apply: f32 on the CPU, not switched off by `FEDSB_KERNELS=off` (every op then uses
/// candle's composite ops: for comparisons and as an escape hatch), nor on this thread by [`without`].
pub fn applies(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32 && enabled() && !OFF_HERE.with(|o| o.get())
}

/// Runs `f` with the kernels off on this thread (the composite ops instead): to compare the two.
pub fn without<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            OFF_HERE.with(|o| o.set(self.0));
        }
    }
    let _restore = Restore(OFF_HERE.with(|o| o.replace(true)));
    f()
}

/// Whether the kernels are on (`FEDSB_KERNELS` is not `off`), read once.
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("FEDSB_KERNELS").map_or(true, |v| v != "off"))
}

/// Exact GELU (CPU f32; see [`applies`]).
pub fn gelu_erf(x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(GeluErf)
}

/// Softmax over the last dimension (CPU f32).
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(Softmax)
}

/// Layer norm over the last dimension, `w` and `b` frozen (CPU f32).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, LayerNorm { eps: eps as f32 })
}

/// RMSNorm over the last dimension, `w` frozen (CPU f32).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 })
}

#[cfg(test)]
mod tests {
    use candle_core::{D, Device, Var};
    use rand::{Rng, SeedableRng};

    use super::*;

    fn randn(shape: &[usize], seed: u64, scale: f32) -> Tensor {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn maxdiff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// Values and input gradients of `fused` and `composite` on `x`, with a random upstream gradient.
    fn compare(
        x: &Tensor,
        fused: &dyn Fn(&Tensor) -> Tensor,
        composite: &dyn Fn(&Tensor) -> Tensor,
        tol: f32,
        what: &str,
    ) {
        let v = Var::from_tensor(x).unwrap();
        let (yf, yc) = (fused(v.as_tensor()), composite(v.as_tensor()));
        assert!(maxdiff(&yf, &yc) <= tol, "{what}: values differ by {}", maxdiff(&yf, &yc));
        let up = randn(yf.dims(), 99, 1.0);
        let gf = (yf * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (yc * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let (gf, gc) = (gf.get(v.as_tensor()).unwrap(), gc.get(v.as_tensor()).unwrap());
        let d = maxdiff(gf, gc);
        assert!(d <= tol * 10.0, "{what}: gradients differ by {d}");
    }

    #[test]
    fn erf_is_accurate_everywhere() {
        let mut worst = 0f32;
        for i in -100_000..=100_000 {
            let x = i as f32 * 1e-4 * 6.0;
            worst = worst.max((erf_f32(x) - libm::erff(x)).abs());
        }
        assert!(worst < 5e-7, "max |erf − libm::erff| = {worst}");
        assert!((erf_f32(50.0) - 1.0).abs() < 2e-7 && (erf_f32(-50.0) + 1.0).abs() < 2e-7);
        assert!(erf_f32(f32::INFINITY) > 0.9999 && erf_f32(f32::NEG_INFINITY) < -0.9999);
    }

    #[test]
    fn gelu_matches_candle_values_and_gradients() {
        // Odd sizes, a batch of one, a non-contiguous input, and large magnitudes (the tails).
        for (shape, scale) in [(vec![3, 7, 33], 4.0), (vec![1, 5], 8.0), (vec![2, 64, 1536], 3.0)] {
            let x = randn(&shape, 1, scale);
            compare(&x, &|t| gelu_erf(t).unwrap(), &|t| t.gelu_erf().unwrap(), 2e-6 * scale, "gelu");
        }
        let x = randn(&[9, 5], 2, 3.0).t().unwrap();
        compare(&x, &|t| gelu_erf(t).unwrap(), &|t| t.gelu_erf().unwrap(), 1e-5, "gelu, transposed");
    }

    #[test]
    fn softmax_matches_candle_with_masks_and_odd_rows() {
        let composite = |t: &Tensor| candle_nn::ops::softmax(t, D::Minus1).unwrap();
        for shape in [vec![2, 3, 5, 7], vec![1, 1, 1, 64], vec![4, 13]] {
            let x = randn(&shape, 3, 5.0);
            compare(&x, &|t| softmax_last_dim(t).unwrap(), &composite, 1e-6, "softmax");
        }
        // An additive padding mask (finite, as ops::MASK_VALUE), including a fully masked row.
        let mut m = vec![0f32; 2 * 6];
        for (i, v) in m.iter_mut().enumerate() {
            if i % 6 >= 4 || i < 6 {
                *v = f32::MIN;
            }
        }
        let mask = Tensor::from_vec(m, (2, 6), &Device::Cpu).unwrap();
        let x = randn(&[2, 6], 4, 3.0).broadcast_add(&mask).unwrap();
        compare(&x, &|t| softmax_last_dim(t).unwrap(), &composite, 1e-6, "softmax, masked");
        let y = softmax_last_dim(&x).unwrap().to_vec2::<f32>().unwrap();
        assert!(y[0].iter().all(|v| (v - 1.0 / 6.0).abs() < 1e-6), "a fully masked row is uniform: {:?}", y[0]);
        let x = randn(&[5, 8], 5, 2.0).t().unwrap();
        compare(&x, &|t| softmax_last_dim(t).unwrap(), &composite, 1e-6, "softmax, transposed");
    }

    #[test]
    fn norms_match_candle_values_and_input_gradients() {
        for (rows, n) in [(1usize, 8usize), (7, 33), (64, 384)] {
            let x = (randn(&[rows, n], 6, 2.0) + 0.7).unwrap();
            let w = randn(&[n], 7, 1.5);
            let b = randn(&[n], 8, 0.5);
            compare(
                &x,
                &|t| layer_norm(t, &w, &b, 1e-12).unwrap(),
                &|t| candle_nn::ops::layer_norm_slow(t, &w, &b, 1e-12).unwrap(),
                2e-5,
                "layer norm",
            );
            compare(
                &x,
                &|t| rms_norm(t, &w, 1e-5).unwrap(),
                &|t| candle_nn::ops::rms_norm_slow(t, &w, 1e-5).unwrap(),
                2e-5,
                "rms norm",
            );
        }
        let x = randn(&[6, 4, 10], 9, 1.0).transpose(0, 1).unwrap();
        let w = randn(&[10], 10, 1.0);
        let b = randn(&[10], 11, 1.0);
        compare(
            &x,
            &|t| layer_norm(t, &w, &b, 1e-5).unwrap(),
            &|t| candle_nn::ops::layer_norm_slow(t, &w, &b, 1e-5).unwrap(),
            2e-5,
            "layer norm, non-contiguous",
        );
    }

    #[test]
    fn frozen_linear_matches_matmul_plus_bias_and_grads_only_the_input() {
        for (rows, k, n) in [(1usize, 3usize, 2usize), (37, 19, 23), (256, 384, 64)] {
            let w = randn(&[n, k], 12, 0.5);
            let b = randn(&[n], 13, 0.5);
            let x = randn(&[rows, k], 14, 1.0);
            compare(
                &x,
                &|t| frozen_linear(t, &w, &b).unwrap(),
                &|t| t.matmul(&w.t().unwrap()).unwrap().broadcast_add(&b).unwrap(),
                1e-5,
                "frozen linear",
            );
        }
        let x = randn(&[5, 4], 15, 1.0).t().unwrap(); // [4, 5], strided
        let (w, b) = (randn(&[3, 5], 16, 1.0), randn(&[3], 17, 1.0));
        let y = frozen_linear(&x, &w, &b).unwrap();
        let r = x.matmul(&w.t().unwrap()).unwrap().broadcast_add(&b).unwrap();
        assert!(maxdiff(&y, &r) < 1e-5);
        assert!(frozen_linear(&x, &w.t().unwrap(), &b).is_err());
    }

    #[test]
    fn frozen_matmul_matches_matmul_and_grads_only_the_input() {
        for (rows, k, n) in [(1usize, 3usize, 2usize), (37, 19, 23), (64, 96, 1000)] {
            let w = randn(&[n, k], 18, 0.5);
            let x = randn(&[rows, k], 19, 1.0);
            compare(
                &x,
                &|t| frozen_matmul(t, &w).unwrap(),
                &|t| t.matmul(&w.t().unwrap()).unwrap(),
                1e-5,
                "frozen matmul",
            );
        }
        let x = randn(&[5, 4], 20, 1.0).t().unwrap(); // [4, 5], strided
        let w = randn(&[3, 5], 21, 1.0);
        assert!(maxdiff(&frozen_matmul(&x, &w).unwrap(), &x.matmul(&w.t().unwrap()).unwrap()) < 1e-5);
        assert!(frozen_matmul(&x, &w.t().unwrap()).is_err());
    }

    /// A few training steps of a tiny BERT classifier and a tiny Llama with LoRA-SB, with the kernels and with
    /// the composite ops: the same losses and the same trained tensors, to float tolerance.
    #[test]
    fn training_with_and_without_the_kernels_gives_the_same_result() {
        use crate::adapter::{AdapterConfig, AdapterKind};
        use crate::model::config::{BertConfig, LlamaConfig};
        use crate::model::{BertClassifier, BertModel, LlamaModel, Model};
        use crate::tensors::TensorSet;
        use crate::train::data::{Batch, Encoded, Target};
        use crate::train::{LrSchedule, ScheduleKind, Trainer};
        let dev = Device::Cpu;
        for classifier in [true, false] {
            let make = || {
                let mut m = if classifier {
                    Model::Classifier(
                        BertClassifier::new(BertModel::random(&BertConfig::tiny(), 2, &dev).unwrap(), 2, 3).unwrap(),
                    )
                } else {
                    Model::CausalLm(LlamaModel::random(&LlamaConfig::tiny(), 2, &dev).unwrap())
                };
                let targets: &[&str] =
                    if classifier { &["query", "value", "output.dense"] } else { &["q", "v", "down"] };
                let cfg = AdapterConfig::new(AdapterKind::LoraSb, 4, targets);
                let mut init = TensorSet::new();
                for (i, l) in m.targeted(&cfg).unwrap().iter().enumerate() {
                    let (o, d) = l.dims();
                    init.insert(format!("{}.lora_A.weight", l.name()), randn(&[4, d], 20 + i as u64, 0.3));
                    init.insert(format!("{}.lora_B.weight", l.name()), randn(&[o, 4], 40 + i as u64, 0.3));
                    init.insert(format!("{}.lora_R.weight", l.name()), randn(&[4, 4], 60 + i as u64, 0.5));
                }
                m.attach_adapters(&cfg, Some(&init)).unwrap();
                m
            };
            let data: Vec<Encoded> = (0..6)
                .map(|i| {
                    let ids: Vec<u32> = (0..5 + i % 3).map(|j| ((i * 7 + j * 3) % 40 + 1) as u32).collect();
                    let target = if classifier {
                        Target::Class((i % 2) as u32)
                    } else {
                        Target::NextTokens(ids.iter().skip(1).map(|&x| x as i64).chain([-100]).collect())
                    };
                    Encoded { type_ids: vec![0; ids.len()], ids, target }
                })
                .collect();
            let batch = Batch::collate(&data.iter().collect::<Vec<_>>(), 0, &dev).unwrap();
            let run = |m: &Model| -> Vec<f64> {
                let mut t =
                    Trainer::new(m, LrSchedule::new(1e-2, 0.0, 4, ScheduleKind::Constant), 0.0, Some(1.0)).unwrap();
                (0..4).map(|_| t.step(std::slice::from_ref(&batch)).unwrap().loss).collect()
            };
            let (fast, slow) = (make(), make());
            let lf = run(&fast);
            let ls = without(|| run(&slow));
            for (a, b) in lf.iter().zip(&ls) {
                assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "classifier={classifier}: losses {lf:?} vs {ls:?}");
            }
            let (tf, ts) = (fast.trainable_tensors().unwrap(), slow.trainable_tensors().unwrap());
            for (name, t) in tf.iter() {
                let d = maxdiff(t, ts.require(name).unwrap());
                assert!(d < 1e-4, "classifier={classifier}: {name} differs by {d}");
            }
        }
    }

    #[test]
    fn token_nll_matches_log_softmax_and_gather() {
        let composite = |x: &Tensor, t: &Tensor| {
            let logp = candle_nn::ops::log_softmax(x, D::Minus1).unwrap();
            logp.gather(&t.unsqueeze(1).unwrap(), D::Minus1).unwrap().squeeze(1).unwrap().neg().unwrap()
        };
        for (m, c) in [(1usize, 2usize), (7, 13), (64, 3000)] {
            let x = randn(&[m, c], 30, 6.0);
            let t: Vec<u32> = (0..m).map(|i| ((i * 7919) % c) as u32).collect();
            let t = Tensor::new(t, &Device::Cpu).unwrap();
            compare(&x, &|v| token_nll(v, &t).unwrap(), &|v| composite(v, &t), 2e-5, "cross-entropy");
        }
        let x = randn(&[2, 3], 31, 1.0);
        assert!(token_nll(&x, &Tensor::new(&[0u32, 3], &Device::Cpu).unwrap()).is_err(), "target out of range");
        assert!(token_nll(&x, &Tensor::new(&[0u32], &Device::Cpu).unwrap()).is_err(), "too few targets");
    }

    #[test]
    fn silu_gate_and_rope_match_candle() {
        let g = randn(&[3, 5, 17], 40, 4.0);
        let u = randn(&[3, 5, 17], 41, 2.0);
        // Gradients of both inputs.
        let (gv, uv) = (Var::from_tensor(&g).unwrap(), Var::from_tensor(&u).unwrap());
        let yf = silu_mul(gv.as_tensor(), uv.as_tensor()).unwrap();
        let yc = (gv.as_tensor().silu().unwrap() * uv.as_tensor()).unwrap();
        assert!(maxdiff(&yf, &yc) < 1e-5);
        let up = randn(yf.dims(), 42, 1.0);
        let gf = (yf * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (yc * &up).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&gv, &uv] {
            assert!(maxdiff(gf.get(v.as_tensor()).unwrap(), gc.get(v.as_tensor()).unwrap()) < 1e-4);
        }
        assert!(silu_mul(&g, &randn(&[3, 5, 16], 1, 1.0)).is_err());
        // RoPE with position tables as the Llama model makes them, batch of one and of three.
        for (b, h, t, d) in [(1usize, 1usize, 1usize, 2usize), (3, 4, 7, 16)] {
            let pos: Vec<f32> =
                (0..t * d / 2).map(|i| (i / (d / 2)) as f32 * 0.3 + (i % (d / 2)) as f32 * 0.01).collect();
            let f = Tensor::from_vec(pos, (t, d / 2), &Device::Cpu).unwrap();
            let (cos, sin) = (f.cos().unwrap(), f.sin().unwrap());
            let x = randn(&[b, h, t, d], 43, 1.0);
            compare(
                &x,
                &|v| rope(v, &cos, &sin).unwrap(),
                &|v| candle_nn::rotary_emb::rope_slow(&v.contiguous().unwrap(), &cos, &sin).unwrap(),
                1e-5,
                "rope",
            );
        }
        let x = randn(&[1, 2, 3, 5], 44, 1.0);
        let t = Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap();
        assert!(rope(&x, &t, &t).is_err(), "odd head dimension");
    }

    #[test]
    fn attention_matches_the_composite_with_masks_and_grouped_heads() {
        let dev = Device::Cpu;
        // Each shape twice: the backward on the probabilities the forward kept, and recomputing them.
        for ((b, h, hkv, t, d, causal), recompute) in
            [(2usize, 3usize, 3usize, 5usize, 4usize, false), (1, 6, 2, 7, 8, true), (3, 2, 1, 1, 2, false)]
                .into_iter()
                .flat_map(|c| [(c, false), (c, true)])
        {
            RECOMPUTE_PROBS.with(|r| r.set(recompute));
            let q = randn(&[b, h, t, d], 50, 1.0);
            let k = randn(&[b, hkv, t, d], 51, 1.0);
            let v = randn(&[b, hkv, t, d], 52, 1.0);
            // Padding: the last key of every batch row but the first is masked.
            let keep: Vec<u32> = (0..b * t).map(|i| u32::from(i / t == 0 || i % t != t - 1)).collect();
            let keymask = Tensor::from_vec(keep, (b, t), &dev).unwrap();
            let mask = crate::ops::attention_mask(Some(&keymask), b, t, t, causal, 0, &dev).unwrap().unwrap();
            let composite = |q: &Tensor, k: &Tensor, v: &Tensor| {
                let rep = |x: &Tensor| {
                    let (b, hk, s, d) = x.dims4().unwrap();
                    x.unsqueeze(2).unwrap().expand((b, hk, h / hk, s, d)).unwrap().reshape((b, h, s, d)).unwrap()
                };
                let sc = (q.matmul(&rep(k).t().unwrap()).unwrap() * 0.35).unwrap().broadcast_add(&mask).unwrap();
                candle_nn::ops::softmax(&sc, D::Minus1).unwrap().matmul(&rep(v)).unwrap()
            };
            let (qv, kv, vv) =
                (Var::from_tensor(&q).unwrap(), Var::from_tensor(&k).unwrap(), Var::from_tensor(&v).unwrap());
            let yf = attention(qv.as_tensor(), kv.as_tensor(), vv.as_tensor(), Some(&mask), 0.35).unwrap();
            let yc = composite(qv.as_tensor(), kv.as_tensor(), vv.as_tensor());
            assert!(maxdiff(&yf, &yc) < 1e-5, "values differ by {}", maxdiff(&yf, &yc));
            let up = randn(yf.dims(), 53, 1.0);
            let gf = (yf * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let gc = (yc * &up).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, x) in [("q", &qv), ("k", &kv), ("v", &vv)] {
                let d = maxdiff(gf.get(x.as_tensor()).unwrap(), gc.get(x.as_tensor()).unwrap());
                assert!(d < 1e-4, "d{name} differs by {d} (b {b}, h {h}, h_kv {hkv}, t {t}, recompute {recompute})");
            }
        }
        RECOMPUTE_PROBS.with(|r| r.set(false));
        let q = randn(&[1, 3, 2, 4], 1, 1.0);
        let k = randn(&[1, 2, 2, 4], 1, 1.0);
        assert!(attention(&q, &k, &k, None, 1.0).is_err(), "3 heads are not a multiple of 2");
        // The sequence-major layout [b, t, h, d] gives the same values and gradients as the head-major one.
        let (b, h, hkv, t, d) = (2usize, 4usize, 2usize, 5usize, 3usize);
        let q = randn(&[b, t, h, d], 54, 1.0);
        let k = randn(&[b, t, hkv, d], 55, 1.0);
        let v = randn(&[b, t, hkv, d], 56, 1.0);
        let keymask = Tensor::new(&[[1u32, 1, 1, 1, 0], [1, 1, 1, 1, 1]], &dev).unwrap();
        let mask = crate::ops::attention_mask(Some(&keymask), b, t, t, true, 0, &dev).unwrap().unwrap();
        let (qv, kv, vv) =
            (Var::from_tensor(&q).unwrap(), Var::from_tensor(&k).unwrap(), Var::from_tensor(&v).unwrap());
        let ys = attention_seq_major(qv.as_tensor(), kv.as_tensor(), vv.as_tensor(), Some(&mask), 0.6).unwrap();
        let hm = |x: &Tensor| x.transpose(1, 2).unwrap().contiguous().unwrap();
        let yh = attention(&hm(qv.as_tensor()), &hm(kv.as_tensor()), &hm(vv.as_tensor()), Some(&mask), 0.6).unwrap();
        let yh = yh.transpose(1, 2).unwrap().contiguous().unwrap();
        assert!(maxdiff(&ys, &yh) < 1e-6);
        let up = randn(ys.dims(), 57, 1.0);
        let gs = (ys * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let gh = (yh * &up).unwrap().sum_all().unwrap().backward().unwrap();
        for x in [&qv, &kv, &vv] {
            assert!(maxdiff(gs.get(x.as_tensor()).unwrap(), gh.get(x.as_tensor()).unwrap()) < 1e-5);
        }
    }

    #[test]
    fn mkl_and_faer_gemms_agree_on_every_layout() {
        // MKL must load where scripts/fetch-assets.sh unpacked it (x86-64 Linux; its download is optional).
        let required = crate::mkl::mkl_dir().join(".sha256").is_file()
            && cfg!(all(target_os = "linux", target_arch = "x86_64"))
            && std::env::var("FEDSB_GEMM").map_or(true, |v| v != "faer");
        let mkl = match crate::mkl::load() {
            Ok(m) => m,
            Err(why) => {
                assert!(!required, "MKL did not load: {why}");
                eprintln!("skipped: no MKL ({why})");
                return;
            }
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(71);
        // (m, n, k), lhs transposed, rhs transposed, accumulate, threads: thin, square, odd and empty shapes,
        // split by rows (m ≥ n) and by columns.
        let cases = [
            ((64, 48, 40), false, true, false, 2),
            ((33, 65, 17), true, false, true, 2),
            ((7, 300, 129), false, false, false, 2),
            ((300, 5, 64), true, true, true, 2),
            ((16, 16, 1), false, true, false, 1),
            ((9, 11, 0), false, false, false, 2),
            ((9, 11, 0), false, false, true, 2),
            ((1, 1, 1), true, true, false, 1),
        ];
        for ((m, n, k), lt, rt, acc, threads) in cases {
            let lhs: Vec<f32> = (0..m * k).map(|_| rng.random::<f32>() - 0.5).collect();
            let rhs: Vec<f32> = (0..k * n).map(|_| rng.random::<f32>() - 0.5).collect();
            let init: Vec<f32> = (0..m * n).map(|_| rng.random::<f32>()).collect();
            // Transposed operands are stored the other way round and read with swapped strides.
            let ls = if lt { (1, m) } else { (k, 1) };
            let rs = if rt { (1, k) } else { (n, 1) };
            let (mut a, mut b) = (init.clone(), init.clone());
            unsafe {
                gemm_into_on(Some(mkl), &mut a, n, (m, n, k), acc, &lhs, ls, &rhs, rs, threads);
                gemm_into_on(None, &mut b, n, (m, n, k), acc, &lhs, ls, &rhs, rs, threads);
            }
            let d = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
            assert!(d < 1e-5 * (k as f32).max(1.0), "{m}x{n}x{k} lt {lt} rt {rt} acc {acc}: differ by {d}");
            if k == 0 && !acc {
                assert!(a.iter().all(|&v| v == 0.0), "an empty product is zero");
            }
        }
        assert_eq!(crate::mkl::backend(), crate::mkl::GemmBackend::Mkl);
        assert!(crate::mkl::describe().starts_with("mkl"));
    }

    #[test]
    fn lora_sb_linear_matches_the_composite_for_shared_and_per_sample_r() {
        let (k, n, r) = (10usize, 7usize, 3usize);
        let w0 = randn(&[n, k], 60, 0.5);
        let bias = randn(&[n], 61, 0.5);
        let a = randn(&[r, k], 62, 0.5);
        let b = randn(&[n, r], 63, 0.5);
        // Both paths of the op: the merged weight W0 + s·B·R·A (one R for all rows, and enough rows) and the
        // adapter path beside W0 (per-sample Rs that differ, or too few rows for the merge to pay).
        let dims = |rows, samples| SbDims { rows, k, n, r, samples };
        assert!(LoraSbLinear::merge_pays(dims(24, 1)) && LoraSbLinear::merge_pays_backward(dims(24, 1)));
        assert!(!LoraSbLinear::merge_pays(dims(2, 1)) && !LoraSbLinear::merge_pays_backward(dims(2, 1)));
        for (rows, samples, scale, equal_copies) in [
            (24usize, 1usize, 1.0f64, false),
            (24, 1, 2.5, false),
            (24, 4, 1.0, false),
            (24, 3, 0.5, false),
            (24, 4, 1.5, true),
            (2, 1, 1.0, false),
            (2, 2, 0.5, true),
        ] {
            let x = randn(&[rows, k], 64, 1.0);
            let rm = match (samples, equal_copies) {
                (1, _) => randn(&[r, r], 65, 1.0),
                (_, false) => randn(&[samples, r, r], 66, 1.0),
                (_, true) => randn(&[1, r, r], 66, 1.0).repeat((samples, 1, 1)).unwrap(),
            };
            let (xv, rv) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&rm).unwrap());
            let fused = lora_sb_linear(xv.as_tensor(), &w0, Some(&bias), &a, &b, rv.as_tensor(), scale).unwrap();
            let h1 = xv.as_tensor().matmul(&a.t().unwrap()).unwrap();
            let h2 = if samples == 1 {
                h1.matmul(&rv.as_tensor().t().unwrap()).unwrap()
            } else {
                let h = h1.reshape((samples, rows / samples, r)).unwrap();
                h.matmul(&rv.as_tensor().transpose(1, 2).unwrap()).unwrap().reshape((rows, r)).unwrap()
            };
            let side = (h2.matmul(&b.t().unwrap()).unwrap() * scale).unwrap();
            let base = xv.as_tensor().matmul(&w0.t().unwrap()).unwrap().broadcast_add(&bias).unwrap();
            let composite = (base + side).unwrap();
            assert!(maxdiff(&fused, &composite) < 1e-5, "values ({rows} rows, {samples} samples, scale {scale})");
            let up = randn(fused.dims(), 67, 1.0);
            let gf = (fused * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let gc = (composite * &up).unwrap().sum_all().unwrap().backward().unwrap();
            for (what, v) in [("x", &xv), ("R", &rv)] {
                let d = maxdiff(gf.get(v.as_tensor()).unwrap(), gc.get(v.as_tensor()).unwrap());
                assert!(d < 1e-4, "d{what} differs by {d} ({rows} rows, {samples} samples, scale {scale})");
            }
        }
        // Without a bias; and wrong shapes are errors.
        let x = randn(&[12, k], 64, 1.0);
        let rm = randn(&[r, r], 68, 1.0);
        let y = lora_sb_linear(&x, &w0, None, &a, &b, &rm, 1.0).unwrap();
        let c = (x.matmul(&w0.t().unwrap()).unwrap()
            + x.matmul(&a.t().unwrap()).unwrap().matmul(&rm.t().unwrap()).unwrap().matmul(&b.t().unwrap()).unwrap())
        .unwrap();
        assert!(maxdiff(&y, &c) < 1e-5);
        assert!(lora_sb_linear(&x, &w0, None, &a, &b, &randn(&[r + 1, r + 1], 1, 1.0), 1.0).is_err());
        assert!(lora_sb_linear(&x, &w0, None, &a, &b, &randn(&[5, r, r], 1, 1.0), 1.0).is_err(), "12 rows, 5 samples");
    }

    #[test]
    fn bad_inputs_are_errors() {
        let x = Tensor::zeros((2, 3), DType::F64, &Device::Cpu).unwrap();
        assert!(gelu_erf(&x).is_err());
        let x = randn(&[2, 6], 1, 1.0);
        assert!(layer_norm(&x, &randn(&[4], 1, 1.0), &randn(&[4], 1, 1.0), 1e-5).is_err());
        assert!(rms_norm(&x, &randn(&[4], 1, 1.0), 1e-5).is_err());
    }
}
