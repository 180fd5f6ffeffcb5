//! The LoRA-SB layer beside a bf16 `W0` on MKL's bf16 GEMM (AMX): forward and backward each in one parallel
//! pass over blocks of rows, every product with bf16 inputs and f32 accumulation, as PyTorch's autocast does.
//!
//! A block of rows needs nothing from another block until `dR`'s sum: the thread that owns rows `i0..i1`
//! rounds its rows of `x` (or `dy`) to bf16 once, multiplies them by `W0`'s bits in place (no f32 copy, no
//! merged tile), and runs the thin adapter products on the same rows — `h = x·Aᵀ`, `out += s·(h·Rᵀ)·Bᵀ`
//! forward; `dx = dy·W0 + ((s·dy·B)·R)·A` and `s·dy·B` backward. One fork-join per op instead of one per
//! product: on a 2-core machine every fork wakes a sleeping thread, which costs as much as a thin product.
//! `h`, `R`, `dR` and the sums stay f32; `dR = Σ (s·dy·B)ᵀ·h` is summed after the pass (per sample for
//! DP-SGD's per-sample R, whose row blocks never straddle two samples).
use rayon::prelude::*;

use super::frozen_gemm::Engine;
use super::*;
use crate::frozen::{FrozenWeight, WeightData};

/// Whether [`forward`] and [`backward`] apply: `W0` in bf16 and compact products on MKL's bf16 GEMM.
pub(super) fn applies(w0: &FrozenWeight) -> bool {
    w0.format() == crate::frozen::WeightFormat::Bf16 && super::frozen_gemm::engine() == Engine::Bf16Mkl
}

/// Sizes of one LoRA-SB product: rows, in (k), out (n), rank, samples (1 for a shared R).
#[derive(Clone, Copy)]
pub(super) struct Dims {
    pub rows: usize,
    pub k: usize,
    pub n: usize,
    pub r: usize,
    pub samples: usize,
}

impl Dims {
    /// Rows per block: one block per thread, whole samples where R is per sample.
    fn block(self, threads: usize) -> usize {
        let per = self.rows / self.samples.max(1);
        let b = self.rows.div_ceil(threads.max(1)).max(1);
        if self.samples > 1 { b.div_ceil(per.max(1)).max(1) * per } else { b }
    }
}

/// The frozen operands of one op: `W0`'s bf16 bits (`n × k`), `A` (`r × k`) and `B` (`n × r`) rounded to
/// bf16, R (`[r, r]` or `[samples, r, r]`) and the scale.
pub(super) struct Operands<'a> {
    pub w0: &'a [u16],
    pub a: &'a [u16],
    pub b: &'a [u16],
    pub rm: &'a [f32],
    pub scale: f32,
}

/// Calls `f` with `W0`'s bf16 bits (an error for any other format).
pub(super) fn with_bits<R>(w0: &FrozenWeight, f: impl FnOnce(&[u16]) -> R) -> candle_core::Result<R> {
    use half::slice::HalfFloatSliceExt;
    let r = w0.with_data(|data| match data {
        WeightData::Bf16(v) => Ok(f(v.reinterpret_cast())),
        _ => Err(candle_core::Error::Msg("LoRA-SB bf16: W0 is not bf16".into())),
    });
    r.map_err(|e| candle_core::Error::Msg(e.to_string()))?
}

/// `c (m × n) = [c +] a (m × k, bf16, row stride lda) · op(b)` on MKL, with `b` `k × n` (row stride `ldb`)
/// or, with `b_t`, `n × k` read transposed.
///
/// # Safety
/// `a`, `b` and `c` hold the stated blocks; only this call writes `c`.
#[allow(clippy::too_many_arguments)]
unsafe fn mkl(
    mkl: &crate::mkl::Mkl,
    (m, n, k): (usize, usize, usize),
    a: *const u16,
    lda: usize,
    b: &[u16],
    (ldb, b_t): (usize, bool),
    c: *mut f32,
    accumulate: bool,
) {
    let beta = if accumulate { 1.0 } else { 0.0 };
    // SAFETY: as documented above.
    unsafe { mkl.gemm_bf16_rm(m, n, k, 1.0, a, (lda, false), b.as_ptr(), (ldb, b_t), beta, c, n) };
}

/// `t (m × r) = s·h·Rᵢᵀ` (or `·Rᵢ` with `!transpose`) for rows `i0..i0+m` of `h`, `Rᵢ` the R of their sample.
fn apply_r(d: Dims, i0: usize, h: &[f32], rm: &[f32], scale: f32, transpose: bool, t: &mut [f32]) {
    let per = d.rows / d.samples.max(1);
    let m = h.len() / d.r.max(1);
    let mut row = 0;
    while row < m {
        let sample = (i0 + row) / per.max(1);
        let end = (((sample + 1) * per).saturating_sub(i0)).min(m).max(row + 1);
        let ri = &rm[sample * d.r * d.r..(sample + 1) * d.r * d.r];
        let rs = if transpose { (1, d.r) } else { (d.r, 1) };
        let (hs, ts) = (&h[row * d.r..end * d.r], &mut t[row * d.r..end * d.r]);
        // SAFETY: hs and ts are (end−row) × r row-major, R r×r read with the strides above.
        unsafe { gemm_into(ts, d.r, (end - row, d.r, d.r), false, hs, (d.r, 1), ri, rs, 1) };
        row = end;
    }
    if scale != 1.0 {
        t.iter_mut().for_each(|v| *v *= scale);
    }
}

/// Per-thread scratch: bf16 rows of the input, f32 and bf16 rank-r rows.
#[derive(Default)]
struct Scratch {
    rows16: Vec<u16>,
    t: Vec<f32>,
    t16: Vec<u16>,
}

/// The forward: `out (rows × n) = [out +] x·W0ᵀ + s·((x·Aᵀ)·Rᵀ)·Bᵀ`, accumulating onto `out` (the bias) when
/// asked. Returns `h = x·Aᵀ` (`rows × r`) for the backward's `dR`.
pub(super) fn forward(
    d: Dims,
    x: &[f32],
    ops: &Operands<'_>,
    out: &mut [f32],
    accumulate: bool,
) -> candle_core::Result<Vec<f32>> {
    let mkl_lib = crate::mkl::load().as_ref().map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let (Dims { rows, k, n, r, .. }, threads) = (d, candle_core::utils::get_num_threads());
    if x.len() != rows * k || out.len() != rows * n || ops.w0.len() != n * k || ops.a.len() != r * k {
        candle_core::bail!(
            "LoRA-SB bf16: x {}, out {}, W0 {}, A {} for {rows}×{k}→{n}",
            x.len(),
            out.len(),
            ops.w0.len(),
            ops.a.len()
        );
    }
    if n == 0 || k == 0 || r == 0 {
        candle_core::bail!("LoRA-SB bf16: an empty dimension ({rows}×{k}→{n}, rank {r})");
    }
    let mut h = buffer_for_overwrite(rows * r);
    if rows == 0 {
        return Ok(h);
    }
    let mb = d.block(threads);
    out.par_chunks_mut(mb * n).zip(h.par_chunks_mut(mb * r)).enumerate().for_each_init(
        Scratch::default,
        |s, (i, (out, h))| {
            let (i0, m) = (i * mb, h.len() / r.max(1));
            s.rows16.resize(m * k, 0);
            crate::bf16_gemm::f32_to_bf16(&x[i0 * k..(i0 + m) * k], &mut s.rows16);
            s.t.resize(m * r, 0.0);
            s.t16.resize(m * r, 0);
            let xb = s.rows16.as_ptr();
            // SAFETY (all): this block's rows of x (bf16), out and h; W0 n×k, A r×k, B n×r, all row-major.
            unsafe {
                mkl(mkl_lib, (m, n, k), xb, k, ops.w0, (k, true), out.as_mut_ptr(), accumulate);
                mkl(mkl_lib, (m, r, k), xb, k, ops.a, (k, true), h.as_mut_ptr(), false);
            }
            apply_r(d, i0, h, ops.rm, ops.scale, true, &mut s.t);
            crate::bf16_gemm::f32_to_bf16(&s.t, &mut s.t16);
            unsafe { mkl(mkl_lib, (m, n, r), s.t16.as_ptr(), r, ops.b, (r, true), out.as_mut_ptr(), true) };
            crate::simd::clear_upper_simd_state();
        },
    );
    Ok(h)
}

/// The backward: `dR` (`[r, r]` or `[samples, r, r]`, summed over each sample's rows) and, with `dx`
/// (`rows × k`, else empty), the input gradient `dy·W0 + ((s·dy·B)·R)·A`. `h` is the forward's `x·Aᵀ`
/// where it kept it, else computed from `x`.
pub(super) fn backward(
    d: Dims,
    x: &[f32],
    dy: &[f32],
    ops: &Operands<'_>,
    h: Option<Vec<f32>>,
    dx: &mut [f32],
    dr: &mut [f32],
) -> candle_core::Result<()> {
    let mkl_lib = crate::mkl::load().as_ref().map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let (Dims { rows, k, n, r, samples }, threads) = (d, candle_core::utils::get_num_threads());
    let need_dx = !dx.is_empty();
    if x.len() != rows * k || dy.len() != rows * n || (need_dx && dx.len() != rows * k) || dr.len() != samples * r * r {
        candle_core::bail!(
            "LoRA-SB bf16 grad: x {}, dy {}, dx {}, dR {} for {rows}×{k}→{n}",
            x.len(),
            dy.len(),
            dx.len(),
            dr.len()
        );
    }
    if n == 0 || k == 0 || r == 0 {
        candle_core::bail!("LoRA-SB bf16 grad: an empty dimension ({rows}×{k}→{n}, rank {r})");
    }
    if rows == 0 {
        dr.fill(0.0);
        return Ok(());
    }
    let have_h = h.as_ref().is_some_and(|h| h.len() == rows * r);
    let mut h = h.filter(|_| have_h).unwrap_or_else(|| buffer_for_overwrite(rows * r));
    let mut gb = buffer_for_overwrite(rows * r);
    let mb = d.block(threads);
    let dxp = SendPtr(dx.as_mut_ptr());
    gb.par_chunks_mut(mb * r).zip(h.par_chunks_mut(mb * r)).enumerate().for_each_init(
        Scratch::default,
        |s, (i, (gb, h))| {
            let (i0, m) = (i * mb, gb.len() / r.max(1));
            s.rows16.resize(m * n.max(k), 0);
            s.t.resize(m * r, 0.0);
            s.t16.resize(m * r, 0);
            let dyb = &mut s.rows16[..m * n];
            crate::bf16_gemm::f32_to_bf16(&dy[i0 * n..(i0 + m) * n], dyb);
            // SAFETY (all): this block's rows of dy (bf16), dx (where there is one), gB and h; W0 n×k, A r×k,
            // B n×r, row-major.
            let dx_rows = if need_dx { unsafe { dxp.get().add(i0 * k) } } else { std::ptr::null_mut() };
            unsafe {
                if need_dx {
                    mkl(mkl_lib, (m, k, n), dyb.as_ptr(), n, ops.w0, (k, false), dx_rows, false);
                }
                mkl(mkl_lib, (m, r, n), dyb.as_ptr(), n, ops.b, (r, false), gb.as_mut_ptr(), false);
            }
            if ops.scale != 1.0 {
                gb.iter_mut().for_each(|v| *v *= ops.scale);
            }
            if !have_h {
                let xb = &mut s.rows16[..m * k];
                crate::bf16_gemm::f32_to_bf16(&x[i0 * k..(i0 + m) * k], xb);
                unsafe { mkl(mkl_lib, (m, r, k), xb.as_ptr(), k, ops.a, (k, true), h.as_mut_ptr(), false) };
            }
            if need_dx {
                apply_r(d, i0, gb, ops.rm, 1.0, false, &mut s.t);
                crate::bf16_gemm::f32_to_bf16(&s.t, &mut s.t16);
                unsafe { mkl(mkl_lib, (m, k, r), s.t16.as_ptr(), r, ops.a, (k, false), dx_rows, true) };
            }
            crate::simd::clear_upper_simd_state();
        },
    );
    // dRᵢ = gBᵢᵀ·hᵢ per sample (r × per · per × r).
    let per = rows / samples.max(1);
    for (i, dri) in dr.chunks_mut(r * r).enumerate() {
        let rs = i * per * r..(i + 1) * per * r;
        // SAFETY: gB and h rows of sample i (per × r), gBᵀ by strides; dRᵢ r×r.
        unsafe { gemm_into(dri, r, (r, r, per), false, &gb[rs.clone()], (1, r), &h[rs], (r, 1), 1) };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{matmul_f64 as mm, rand_vec, round_bf16 as bf};
    use super::*;

    fn bits(v: &[f32]) -> Vec<u16> {
        v.iter().map(|x| half::bf16::from_f32(*x).to_bits()).collect()
    }

    /// Forward and backward against an f64 reference on the bf16-rounded operands (shared and per-sample R,
    /// odd sizes, with and without dx, with and without the forward's h).
    #[test]
    fn matches_the_bf16_rounded_reference() {
        if crate::testing::mkl_or_skip(true, "the bf16 LoRA-SB products were NOT tested").is_none() {
            return;
        }
        for (samples, per, k, n, r) in [(1usize, 37usize, 70usize, 45usize, 5usize), (3, 8, 64, 96, 4)] {
            let rows = samples * per;
            let d = Dims { rows, k, n, r, samples };
            let (w0, a, b) = (bf(&rand_vec(n * k, 1)), bf(&rand_vec(r * k, 2)), bf(&rand_vec(n * r, 3)));
            let (x, dy, rm) = (rand_vec(rows * k, 4), rand_vec(rows * n, 5), rand_vec(samples * r * r, 6));
            let scale = 1.5f32;
            let (w0b, ab, bb) = (bits(&w0), bits(&a), bits(&b));
            let ops = Operands { w0: &w0b, a: &ab, b: &bb, rm: &rm, scale };
            let mut out = vec![1f32; rows * n];
            let h = forward(d, &x, &ops, &mut out, true).unwrap();
            // Reference per sample: y = x·W0ᵀ + s·((x·Aᵀ)·Rᵀ)·Bᵀ on bf16-rounded x, A, B, W0 (and t rounded).
            let xr = bf(&x);
            let base = mm(&xr, (rows, k), &w0, n, true);
            let href = mm(&xr, (rows, k), &a, r, true);
            for (got, want) in h.iter().zip(&href) {
                assert!((*got as f64 - want).abs() < 1e-3 * (1.0 + want.abs()), "h {got} vs {want}");
            }
            for i in 0..rows {
                let ri = &rm[(i / per) * r * r..(i / per + 1) * r * r];
                let t: Vec<f32> = (0..r)
                    .map(|j| scale * (0..r).map(|p| href[i * r + p] as f32 * ri[j * r + p]).sum::<f32>())
                    .collect();
                let t = bf(&t);
                for c in 0..n {
                    let want = 1.0 + base[i * n + c] + (0..r).map(|j| t[j] as f64 * b[c * r + j] as f64).sum::<f64>();
                    let got = out[i * n + c] as f64;
                    assert!((got - want).abs() < 1e-2 * (1.0 + want.abs()), "y[{i},{c}] {got} vs {want}");
                }
            }
            for keep_h in [true, false] {
                for with_dx in [true, false] {
                    let mut dx = if with_dx { vec![0f32; rows * k] } else { Vec::new() };
                    let mut dr = vec![0f32; samples * r * r];
                    backward(d, &x, &dy, &ops, keep_h.then(|| h.clone()), &mut dx, &mut dr).unwrap();
                    let dyr = bf(&dy);
                    let gb: Vec<f64> =
                        mm(&dyr, (rows, n), &b, r, false).into_iter().map(|v| v * scale as f64).collect();
                    for s in 0..samples {
                        for p in 0..r {
                            for q in 0..r {
                                let want: f64 = (s * per..(s + 1) * per).map(|i| gb[i * r + p] * href[i * r + q]).sum();
                                let got = dr[s * r * r + p * r + q] as f64;
                                assert!((got - want).abs() < 1e-2 * (1.0 + want.abs()), "dR {got} vs {want}");
                            }
                        }
                    }
                    if with_dx {
                        let base = mm(&dyr, (rows, n), &w0, k, false);
                        for i in 0..rows {
                            let ri = &rm[(i / per) * r * r..(i / per + 1) * r * r];
                            let t: Vec<f32> = (0..r)
                                .map(|q| (0..r).map(|p| gb[i * r + p] as f32 * ri[p * r + q]).sum::<f32>())
                                .collect();
                            let t = bf(&t);
                            for c in 0..k {
                                let want =
                                    base[i * k + c] + (0..r).map(|q| t[q] as f64 * a[q * k + c] as f64).sum::<f64>();
                                let got = dx[i * k + c] as f64;
                                assert!((got - want).abs() < 1e-2 * (1.0 + want.abs()), "dx[{i},{c}] {got} vs {want}");
                            }
                        }
                    }
                }
            }
        }
    }
}
