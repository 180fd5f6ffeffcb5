//! Softmax over the last dimension, and cross-entropy per row (no `[m, vocab]` log-probabilities kept).
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::*;

/// Softmax over the last dimension.
pub(super) struct Softmax;

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
pub(super) struct SoftmaxGrad;

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

/// Cross-entropy of each row of `logits` `[m, c]` against class ids `[m]` (u32): `[m]`, the negative
/// log-softmax at the target, in one pass per row (no `[m, c]` log-softmax is kept: for a language model's
/// vocabulary that is the largest tensor of the step). Backward: `g_i · (softmax_i − onehot(t_i))`.
pub(super) struct TokenNll;

pub(super) fn targets_slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [u32]> {
    let CpuStorage::U32(v) = s else { candle_core::bail!("cross-entropy: targets must be u32") };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("cross-entropy: targets must be contiguous"),
    }
}

/// `log Σ exp(x)` of a row, stably.
#[inline]
pub(super) fn log_sum_exp(x: &[f32]) -> f32 {
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
pub(super) struct TokenNllGrad;

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

/// Softmax over the last dimension (CPU f32).
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(Softmax)
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;
    use candle_core::{D, Device};

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
}
