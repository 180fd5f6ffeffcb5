//! Scaled dot-product attention in one op, parallel over the batch, with its backward.
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::*;

/// Scaled dot-product attention in one op, parallel over the batch: `softmax(Q·Kᵀ·scale + mask)·V` for `q`
/// `[b, h, t, d]`, `k`/`v` `[b, h_kv, s, d]` (grouped-query when `h_kv < h`), or with `seq_major` the layout the
/// projections produce, `q` `[b, t, h, d]` and `k`/`v` `[b, s, h_kv, d]` (no head split/merge copies), and an
/// optional additive mask `[b, t, s]` shared by the heads. Backward recomputes the probabilities (one small GEMM)
/// instead of keeping them, and gives `dQ`, `dK`, `dV` in one pass.
pub(super) struct Attention {
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
pub(super) const SAVED_PROBS_MAX: usize = 8 << 20;

#[cfg(test)]
thread_local! {
    /// Tests: the backward recomputes the probabilities even where the forward could keep them.
    static RECOMPUTE_PROBS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// How many probabilities an attention op may keep for its backward.
pub(super) fn saved_probs_max() -> usize {
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
pub(super) struct AttnDims {
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
pub(super) struct AttentionGrad {
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

pub(super) fn attention_op(mask: Option<&Tensor>, scale: f64, seq_major: bool) -> candle_core::Result<Attention> {
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

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;
    use candle_core::{D, Device, Var};

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
}
