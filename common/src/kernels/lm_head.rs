//! The LM head and the next-token cross-entropy in one op: `nllᵢ = logsumexp(zᵢ) − zᵢ[tᵢ]` with `z = h·Wᵀ` (and,
//! for Gemma-2, `z = cap·tanh(h·Wᵀ/cap)`), without ever holding the `[m, vocab]` logits or their gradient
//! whole: rows are taken in chunks of at most [`CHUNK_BYTES`] of logits.
//!
//! The gradient is computed in the forward (as "cut cross-entropy" does): with the chunk's logits at hand,
//! `∂nllᵢ/∂zᵢ = softmax(zᵢ) − onehot(tᵢ)` is known before any upstream gradient, so `dhᵢ = (∂nllᵢ/∂zᵢ)·W` is
//! computed right away and kept (`m × d`, small); the backward only scales its rows by the upstream gradient.
//! That is the unfused op's work (one product with W forward, one backward) with one chunk of logits in memory
//! instead of two full `[m, vocab]` tensors (for Llama-3.2-1B at 256 labelled tokens: 16 MiB against 250 MiB).
use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::softmax::log_sum_exp;
use super::*;
use crate::frozen::FrozenWeight;

/// The most logits one chunk holds. Each chunk reads W once forward and once for `dh`, so fewer, larger
/// chunks read a compact W less often; 64 MiB keeps Llama-3.2-1B's 128,256-token head to two chunks of 256 rows.
const CHUNK_BYTES: usize = 64 << 20;

#[cfg(test)]
thread_local! {
    static CHUNK_ROWS: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Rows per chunk for a `vocab`-wide head.
fn chunk_rows(vocab: usize, m: usize) -> usize {
    #[cfg(test)]
    if let Some(r) = CHUNK_ROWS.with(|c| c.get()) {
        return r;
    }
    (CHUNK_BYTES / 4 / vocab.max(1)).clamp(1, m.max(1))
}

struct LmHeadNll {
    w: FrozenWeight,
    targets: Vec<u32>,
    softcap: Option<f32>,
    /// Whether the forward computes the input gradient (the input is part of a graph being trained).
    with_grad: bool,
    /// `∂nllᵢ/∂hᵢ` (`m × d`), from the forward.
    dh: Mutex<Option<Vec<f32>>>,
}

impl CustomOp1 for LmHeadNll {
    fn name(&self) -> &'static str {
        "fedsb-lm-head-nll"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let _p = crate::profile::span(self.name());
        let h = f32_slice(s, l, "LM head")?;
        let (m, d) = l.shape().dims2()?;
        let (vocab, d2) = self.w.dims();
        if d != d2 || self.targets.len() != m {
            candle_core::bail!("LM head: h [{m}, {d}], W [{vocab}, {d2}], {} targets", self.targets.len());
        }
        if let Some(bad) = self.targets.iter().find(|&&t| t as usize >= vocab) {
            candle_core::bail!("LM head: target {bad} outside the {vocab}-token vocabulary");
        }
        let rows = chunk_rows(vocab, m);
        let mut nll = buffer_for_overwrite(m);
        let mut dh = if self.with_grad { buffer_for_overwrite(m * d) } else { Vec::new() };
        let mut z = buffer_for_overwrite(rows * vocab);
        for r0 in (0..m).step_by(rows) {
            let r1 = (r0 + rows).min(m);
            let z = &mut z[..(r1 - r0) * vocab];
            super::frozen_gemm::forward(&self.w, &h[r0 * d..r1 * d], r1 - r0, z, false, None)?;
            let targets = &self.targets[r0..r1];
            let cap = self.softcap;
            let with_grad = self.with_grad;
            // Per row: the (capped) logits' log-sum-exp and the NLL; with the gradient, in place
            // ∂nll/∂logitⱼ = (softmax(z)ⱼ − [j = t])·∂zⱼ/∂logitⱼ, where ∂z/∂logit = 1 − (z/c)² under the cap.
            z.par_chunks_mut(vocab).zip(nll[r0..r1].par_iter_mut()).zip(targets.par_iter()).for_each(
                |((row, o), &t)| {
                    if let Some(c) = cap {
                        row.iter_mut().for_each(|v| *v = c * (*v / c).tanh());
                    }
                    let lse = log_sum_exp(row);
                    let zt = row[t as usize];
                    *o = lse - zt;
                    if with_grad {
                        let dcap = |z: f32| cap.map_or(1.0, |c| 1.0 - (z / c) * (z / c));
                        for v in row.iter_mut() {
                            *v = crate::simd::exp_f32(*v - lse) * dcap(*v);
                        }
                        row[t as usize] -= dcap(zt);
                    }
                },
            );
            if with_grad {
                super::frozen_gemm::backward_input(&self.w, z, r1 - r0, &mut dh[r0 * d..r1 * d], false, None)?;
            }
        }
        if let Ok(mut slot) = self.dh.lock() {
            *slot = self.with_grad.then_some(dh);
        }
        Ok((CpuStorage::F32(nll), Shape::from(m)))
    }

    fn bwd(&self, h: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dh = self.dh.lock().ok().and_then(|mut s| s.take());
        let Some(dh) = dh else {
            candle_core::bail!("LM head: the forward kept no input gradient (a second backward through one forward?)")
        };
        let (m, d) = h.dims2()?;
        let dh = Tensor::from_vec(dh, (m, d), h.device())?;
        Ok(Some(dh.broadcast_mul(&grad.reshape((m, 1))?)?))
    }
}

/// `[m]` next-token NLLs of hidden states `h` `[m, d]` against `targets` through the frozen LM head `w`
/// `[vocab, d]` (any format), logits soft-capped at `softcap` when given (CPU f32). The gradient is `h`'s only.
pub fn lm_head_nll(h: &Tensor, w: &FrozenWeight, targets: &[u32], softcap: Option<f64>) -> candle_core::Result<Tensor> {
    let op = LmHeadNll {
        w: w.clone(),
        targets: targets.to_vec(),
        softcap: softcap.map(|c| c as f32),
        with_grad: h.track_op() && !super::in_inference(),
        dh: Mutex::new(None),
    };
    h.contiguous()?.apply_op1(op)
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;
    use candle_core::{D, Var};

    /// Values and input gradients equal the unfused head (logits, optional cap, log-softmax, gather), in every
    /// weight format, with chunks of one row and of many.
    #[test]
    fn fused_head_matches_logits_then_cross_entropy() {
        let (m, d, vocab) = (7, 32, 50);
        let w = randn(&[vocab, d], 70, 0.5);
        let h = randn(&[m, d], 71, 1.0);
        let targets: Vec<u32> = (0..m as u32).map(|i| (i * 7 + 3) % vocab as u32).collect();
        let tt = Tensor::new(targets.as_slice(), h.device()).unwrap();
        for (fmt, chunk) in [("f32", None), ("bf16", Some(3)), ("q8_0", Some(1))] {
            CHUNK_ROWS.with(|c| c.set(chunk));
            let fw = FrozenWeight::dense("w", w.clone()).unwrap().convert("w", fmt.parse().unwrap()).unwrap();
            let wd = fw.to_f32(h.device()).unwrap();
            for cap in [None, Some(3.0)] {
                super::super::frozen_gemm::with_engine(super::super::frozen_gemm::Engine::F32, || {
                    let hv = Var::from_tensor(&h).unwrap();
                    let fused = lm_head_nll(hv.as_tensor(), &fw, &targets, cap).unwrap();
                    let logits = hv.as_tensor().matmul(&wd.t().unwrap()).unwrap();
                    let logits = match cap {
                        Some(c) => ((logits / c).unwrap().tanh().unwrap() * c).unwrap(),
                        None => logits,
                    };
                    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
                    let composite =
                        logp.gather(&tt.unsqueeze(1).unwrap(), 1).unwrap().squeeze(1).unwrap().neg().unwrap();
                    assert!(maxdiff(&fused, &composite) < 1e-4, "{fmt} cap {cap:?}: values");
                    let up = randn(&[m], 72, 1.0);
                    let gf = (fused * &up).unwrap().sum_all().unwrap().backward().unwrap();
                    let gc = (composite * &up).unwrap().sum_all().unwrap().backward().unwrap();
                    let dd = maxdiff(gf.get(hv.as_tensor()).unwrap(), gc.get(hv.as_tensor()).unwrap());
                    assert!(dd < 1e-4, "{fmt} cap {cap:?}: input gradients differ by {dd}");
                });
            }
        }
        CHUNK_ROWS.with(|c| c.set(None));
        // Without a graph (evaluation) no gradient is computed; bad targets are errors.
        let fw = FrozenWeight::dense("w", w).unwrap();
        assert_eq!(lm_head_nll(&h, &fw, &targets, None).unwrap().dims(), &[m]);
        assert!(lm_head_nll(&h, &fw, &[vocab as u32; 7], None).is_err());
        assert!(lm_head_nll(&h, &fw, &targets[..3], None).is_err());
    }
}
