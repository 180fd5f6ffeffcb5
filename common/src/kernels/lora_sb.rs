//! The LoRA-SB layer in one op: `x·W0ᵀ + bias + s·((x·Aᵀ)·Rᵀ)·Bᵀ`, on the merged weight or the adapter path.
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::frozen_gemm::{LowRank, to_bf16};
use super::lora_sb_bf16::{self as bf16, Operands};
use super::*;
use crate::frozen::FrozenWeight;

/// The merged weight `W0 + s·B·R·A` (`n×k`) of a LoRA-SB layer: `x·(W0 + s·B·R·A)ᵀ` equals
/// `x·W0ᵀ + s·((x·Aᵀ)·Rᵀ)·Bᵀ`, and `dy·(W0 + s·B·R·A)` the input gradient, each in one GEMM (the adapter
/// path costs two thin GEMMs and a pass over the output per layer). Costs a copy of W0 and an `n×k×r` GEMM.
pub(super) fn merged_weight(
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
pub(super) struct LoraSbLinear {
    w0: FrozenWeight,
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
pub(super) struct SbDims {
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
        (w0, a, b): (&FrozenWeight, &Tensor, &Tensor),
        bias: Option<&Tensor>,
    ) -> candle_core::Result<SbDims> {
        let (rows, k) = x.shape().dims2()?;
        let (n, k2) = w0.dims();
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

    /// For a compact W0 the update is merged into each dequantized tile instead (no copy of W0 is made, see
    /// [`super::frozen_gemm`]): it costs `n·k·r` multiply-adds against the adapter path's `rows·r·(k + n)`.
    fn merge_pays_compact(d: SbDims) -> bool {
        d.n * d.k <= d.rows * (d.k + d.n)
    }

    /// The same for the input gradient: `n·k·r` against `(gB·R)·A`'s `rows·r·k`.
    fn merge_pays_backward_compact(d: SbDims) -> bool {
        d.n <= d.rows
    }

    /// The sizes for [`super::lora_sb_bf16`].
    fn bf16_dims(d: SbDims) -> bf16::Dims {
        bf16::Dims { rows: d.rows, k: d.k, n: d.n, r: d.r, samples: d.samples }
    }

    /// `s·R·A` (`r × k`): the right factor of the update merged into a compact W0's tiles.
    fn scaled_ra(d: SbDims, a: &[f32], r0: &[f32], scale: f32) -> Vec<f32> {
        let sr: Vec<f32> = r0.iter().map(|v| v * scale).collect();
        let mut ra = buffer_for_overwrite(d.r * d.k);
        // SAFETY: sR is r×r and A r×k, row-major; ra is r×k.
        unsafe { gemm_into(&mut ra, d.k, (d.r, d.k, d.r), false, &sr, (d.r, 1), a, (d.k, 1), 1) };
        ra
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
        let (ag, al) = self.a.storage_and_layout();
        let (bg, bl) = self.b.storage_and_layout();
        let (a, b) = (storage_f32(&ag, al, "LoRA-SB A")?, storage_f32(&bg, bl, "LoRA-SB B")?);
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
        if bf16::applies(&self.w0) {
            // bf16 W0 on AMX: W0's bits in place and bf16 adapter products, one pass over row blocks.
            let (ab, bb) = (to_bf16(a), to_bf16(b));
            let h1 = bf16::with_bits(&self.w0, |w0| {
                let ops = Operands { w0, a: &ab, b: &bb, rm, scale: self.scale };
                bf16::forward(Self::bf16_dims(d), x, &ops, &mut out, self.bias.is_some())
            })??;
            if let Ok(mut slot) = self.h1.lock() {
                *slot = Some(h1);
            }
            return Ok((CpuStorage::F32(out), Shape::from((d.rows, d.n))));
        }
        match (self.w0.as_f32(), Self::common_r(d, rm)) {
            (Some(w0t), Some(r0)) if Self::merge_pays(d) => {
                let (w0g, w0l) = w0t.storage_and_layout();
                let w0 = storage_f32(&w0g, w0l, "LoRA-SB W0")?;
                let w = merged_weight((d.n, d.k, d.r), w0, a, b, r0, self.scale, threads);
                // SAFETY: x is rows×k, wᵀ is w (n×k) read with swapped strides, out is rows×n.
                unsafe {
                    gemm_into(
                        &mut out,
                        d.n,
                        (d.rows, d.n, d.k),
                        self.bias.is_some(),
                        x,
                        (d.k, 1),
                        &w,
                        (1, d.k),
                        threads,
                    )
                };
                if Self::merge_pays_backward(d)
                    && let Ok(mut slot) = self.merged.lock()
                {
                    *slot = Some(w);
                }
                return Ok((CpuStorage::F32(out), Shape::from((d.rows, d.n))));
            }
            (None, Some(r0)) if Self::merge_pays_compact(d) => {
                let ra = Self::scaled_ra(d, a, r0, self.scale);
                let merge = LowRank { b, ra: &ra, r: d.r };
                super::frozen_gemm::forward(&self.w0, x, d.rows, &mut out, self.bias.is_some(), Some(&merge))?;
                return Ok((CpuStorage::F32(out), Shape::from((d.rows, d.n))));
            }
            _ => {}
        }
        super::frozen_gemm::forward(&self.w0, x, d.rows, &mut out, self.bias.is_some(), None)?;
        let mut h1 = buffer_for_overwrite(d.rows * d.r);
        let mut h2 = buffer_for_overwrite(d.rows * d.r);
        // SAFETY: row-major buffers of the stated sizes; Aᵀ by strides.
        unsafe { gemm_into(&mut h1, d.r, (d.rows, d.r, d.k), false, x, (d.k, 1), a, (1, d.k), threads) };
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
        // dR is copied out: a view would keep the whole packed buffer (dx's size) alive for as long as the
        // gradient store holds dR, i.e. until the step ends (measured: 22 MiB a Llama-3.2-1B block).
        let dr = packed.narrow(0, nx, r.elem_count())?.force_contiguous()?.reshape(r.shape())?;
        Ok((dx, Some(dr)))
    }
}

/// The backward of [`LoraSbLinear`]: inputs x, R, dy; output `[dx ‖ dR]` flattened.
pub(super) struct LoraSbGrad {
    w0: FrozenWeight,
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
        let (ag, al) = self.a.storage_and_layout();
        let (bg, bl) = self.b.storage_and_layout();
        let (a, b) = (storage_f32(&ag, al, "LoRA-SB A")?, storage_f32(&bg, bl, "LoRA-SB B")?);
        let threads = candle_core::utils::get_num_threads();
        let (nx, nr) = (if self.need_dx { x.len() } else { 0 }, rm.len());
        let mut out = buffer_for_overwrite(nx + nr);
        let (dx, dr) = out.split_at_mut(nx);
        if bf16::applies(&self.w0) {
            let (ab, bb) = (to_bf16(a), to_bf16(b));
            let h1 = self.h1.lock().ok().and_then(|mut h| h.take());
            bf16::with_bits(&self.w0, |w0| {
                let ops = Operands { w0, a: &ab, b: &bb, rm, scale: self.scale };
                bf16::backward(LoraSbLinear::bf16_dims(d), x, dy, &ops, h1, dx, dr)
            })??;
            let n = out.len();
            return Ok((CpuStorage::F32(out), Shape::from(n)));
        }
        let mut gb = buffer_for_overwrite(d.rows * d.r);
        // x·Aᵀ: the forward's where it kept it, else computed below.
        let kept_h1 = self.h1.lock().ok().and_then(|mut h| h.take()).filter(|h| h.len() == d.rows * d.r);
        let have_h1 = kept_h1.is_some();
        let mut h1 = kept_h1.unwrap_or_else(|| buffer_for_overwrite(d.rows * d.r));
        // dx in one product with the update merged where that pays (as in the forward), else dy·W0 + (gB·R)·A.
        let merged_dx = match (self.need_dx, LoraSbLinear::common_r(d, rm), self.w0.as_f32()) {
            (true, Some(r0), Some(w0t)) if LoraSbLinear::merge_pays_backward(d) => {
                // The forward's merged weight, where it kept it (the same R), else built again.
                let kept = self.merged.lock().ok().and_then(|mut m| m.take()).filter(|w| w.len() == d.n * d.k);
                let w = match kept {
                    Some(w) => w,
                    None => {
                        let (w0g, w0l) = w0t.storage_and_layout();
                        let w0 = storage_f32(&w0g, w0l, "LoRA-SB W0")?;
                        merged_weight((d.n, d.k, d.r), w0, a, b, r0, self.scale, threads)
                    }
                };
                // SAFETY: dy is rows×n and w n×k, row-major; dx is rows×k.
                unsafe { gemm_into(dx, d.k, (d.rows, d.k, d.n), false, dy, (d.n, 1), &w, (d.k, 1), threads) };
                true
            }
            (true, Some(r0), None) if LoraSbLinear::merge_pays_backward_compact(d) => {
                let ra = LoraSbLinear::scaled_ra(d, a, r0, self.scale);
                let merge = LowRank { b, ra: &ra, r: d.r };
                super::frozen_gemm::backward_input(&self.w0, dy, d.rows, dx, false, Some(&merge))?;
                true
            }
            (true, _, _) => {
                super::frozen_gemm::backward_input(&self.w0, dy, d.rows, dx, false, None)?;
                false
            }
            (false, _, _) => false,
        };
        // The adapter's share of dx, (gB·R)·A, separately: only without the merged update.
        let adapter_dx = self.need_dx && !merged_dx;
        let mut t = if adapter_dx { buffer_for_overwrite(d.rows * d.r) } else { Vec::new() };
        // SAFETY (all): row-major buffers of the stated sizes; transposed operands by strides.
        unsafe {
            // gB = s·dy·B   (rows×n · n×r)
            gemm_into(&mut gb, d.r, (d.rows, d.r, d.n), false, dy, (d.n, 1), b, (d.r, 1), threads);
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
    w0: &FrozenWeight,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    r: &Tensor,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let op = LoraSbLinear {
        w0: w0.clone(),
        bias: bias.map(|b| b.contiguous()).transpose()?,
        a: a.contiguous()?,
        b: b.contiguous()?,
        scale: scale as f32,
        merged: std::sync::Mutex::new(None),
        h1: std::sync::Mutex::new(None),
    };
    x.contiguous()?.apply_op2(&r.contiguous()?, op)
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;
    use candle_core::Var;

    #[test]
    fn lora_sb_linear_matches_the_composite_for_shared_and_per_sample_r() {
        for fmt in ["f32", "bf16", "q8_0", "q4_k"] {
            // Compact W0s on f32 tiles: the same values as their dequantized f32 copy, to float tolerance.
            super::super::frozen_gemm::with_engine(super::super::frozen_gemm::Engine::F32, || check_lora_sb(fmt));
        }
    }

    fn check_lora_sb(fmt: &str) {
        let (k, n, r) = (if fmt == "q4_k" { 256 } else { 32 }, 7usize, 3usize);
        let w0 = FrozenWeight::dense("w0", randn(&[n, k], 60, 0.5)).unwrap().convert("w0", fmt.parse().unwrap());
        let w0 = w0.unwrap();
        let w0d = w0.to_f32(&candle_core::Device::Cpu).unwrap();
        let bias = randn(&[n], 61, 0.5);
        let a = randn(&[r, k], 62, 0.5);
        let b = randn(&[n, r], 63, 0.5);
        // Both paths of the op: the merged weight W0 + s·B·R·A (one R for all rows, and enough rows) and the
        // adapter path beside W0 (per-sample Rs that differ, or too few rows for the merge to pay).
        let dims = |rows, samples| SbDims { rows, k, n, r, samples };
        if k == 32 {
            assert!(LoraSbLinear::merge_pays(dims(24, 1)) && LoraSbLinear::merge_pays_backward(dims(24, 1)));
            assert!(!LoraSbLinear::merge_pays(dims(2, 1)) && !LoraSbLinear::merge_pays_backward(dims(2, 1)));
        }
        assert!(
            LoraSbLinear::merge_pays_compact(dims(24, 1)) && LoraSbLinear::merge_pays_backward_compact(dims(24, 1))
        );
        assert!(!LoraSbLinear::merge_pays_compact(dims(2, 1)));
        assert!(!LoraSbLinear::merge_pays_backward_compact(dims(2, 1)));
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
            let base = xv.as_tensor().matmul(&w0d.t().unwrap()).unwrap().broadcast_add(&bias).unwrap();
            let composite = (base + side).unwrap();
            assert!(maxdiff(&fused, &composite) < 1e-4, "{fmt} values ({rows} rows, {samples} samples, scale {scale})");
            let up = randn(fused.dims(), 67, 1.0);
            let gf = (fused * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let gc = (composite * &up).unwrap().sum_all().unwrap().backward().unwrap();
            for (what, v) in [("x", &xv), ("R", &rv)] {
                let d = maxdiff(gf.get(v.as_tensor()).unwrap(), gc.get(v.as_tensor()).unwrap());
                assert!(d < 1e-3, "{fmt}: d{what} differs by {d} ({rows} rows, {samples} samples, scale {scale})");
            }
        }
        // Without a bias; and wrong shapes are errors.
        let x = randn(&[12, k], 64, 1.0);
        let rm = randn(&[r, r], 68, 1.0);
        let y = lora_sb_linear(&x, &w0, None, &a, &b, &rm, 1.0).unwrap();
        let c = (x.matmul(&w0d.t().unwrap()).unwrap()
            + x.matmul(&a.t().unwrap()).unwrap().matmul(&rm.t().unwrap()).unwrap().matmul(&b.t().unwrap()).unwrap())
        .unwrap();
        assert!(maxdiff(&y, &c) < 1e-4);
        assert!(lora_sb_linear(&x, &w0, None, &a, &b, &randn(&[r + 1, r + 1], 1, 1.0), 1.0).is_err());
        assert!(lora_sb_linear(&x, &w0, None, &a, &b, &randn(&[5, r, r], 1, 1.0), 1.0).is_err(), "12 rows, 5 samples");
    }
}
