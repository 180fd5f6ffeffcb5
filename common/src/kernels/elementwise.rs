//! Elementwise kernels: exact (erf) GELU and SwiGLU's `silu(gate) · up`.
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};

use super::*;

/// erf(x) for f32: the rational approximation of Eigen / XLA (`generic_fast_erf_float`), |error| < 2e-7 on
/// the whole line (tested against `libm::erff`); branch-free, so loops over it vectorize.
#[inline(always)]
pub(super) fn erf_f32(x: f32) -> f32 {
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

pub(super) const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1/√(2π).
pub(super) const INV_SQRT_2PI: f32 = 0.398_942_3;

/// Exact GELU, `x·Φ(x)` with `Φ(x) = ½(1 + erf(x/√2))`.
pub(super) struct GeluErf;

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
pub(super) struct GeluErfGrad;

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

/// SwiGLU's gate `silu(g) · u` (`g`, `u` of one shape).
pub(super) struct SiluMul;

#[inline(always)]
pub(super) fn sigmoid(x: f32) -> f32 {
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
pub(super) struct SiluMulGradGate;

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
pub(super) struct SiluMulGradUp;

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

/// `silu(gate) · up` (CPU f32).
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, SiluMul)
}

/// Exact GELU (CPU f32; see [`applies`]).
pub fn gelu_erf(x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(GeluErf)
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;

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
}
