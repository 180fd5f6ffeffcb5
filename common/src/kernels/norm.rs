//! Layer norm and RMSNorm over the last dimension (frozen weights: input gradient only).
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::*;

/// Layer norm over the last dimension with frozen `w` and `b`.
pub(super) struct LayerNorm {
    eps: f32,
}

/// Mean and 1/std of a row.
#[inline]
pub(super) fn moments(x: &[f32], eps: f32) -> (f32, f32) {
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
pub(super) struct LayerNormGrad {
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
pub(super) struct RmsNorm {
    eps: f32,
}

#[inline]
pub(super) fn rms_rstd(x: &[f32], eps: f32) -> f32 {
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
pub(super) struct RmsNormGrad {
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
    use super::super::test_util::*;
    use super::*;

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
}
