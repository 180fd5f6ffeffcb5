//! Frozen linear layers: `x · wᵀ (+ b)` and its input gradient on the kernels' GEMM (no gradient for `w`).
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::*;

/// `x · wᵀ (+ b)` on the kernels' GEMM (`gemm_into`: MKL or faer), the forward of [`FrozenLinear`] and
/// [`FrozenMatmulK`]. With a bias the output starts as the bias and the GEMM accumulates into it, so the bias
/// costs no extra pass.
pub(super) fn frozen_linear_cpu(
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
pub(super) struct FrozenLinear;

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
pub(super) struct FrozenLinearGrad;

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
pub(super) struct FrozenMatmulK;

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

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;

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
}
