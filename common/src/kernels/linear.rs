//! Frozen linear layers: `x · Wᵀ (+ b)` for a frozen `W` in any [`crate::frozen::WeightFormat`], and its input
//! gradient, on [`super::frozen_gemm`] (no gradient for `W` or `b`). With a [`WeightGradSink`] the backward also
//! sums the full-weight gradient `∂L/∂W = dyᵀ·x` into it: the LoRA-SB init's gradient pass, on the same GEMMs
//! and without making `W` a variable (which would need an f32 copy of every targeted weight).
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor, Var};
use rayon::prelude::*;

use super::*;
use crate::frozen::FrozenWeight;

/// Where one layer's full-weight gradient `Σ dyᵀ·x` (`n × k`, f32) accumulates over backward passes.
#[derive(Clone, Debug)]
pub struct WeightGradSink {
    sum: Arc<Mutex<Option<Vec<f32>>>>,
    /// A one-element variable the op takes as a second input, so that autograd visits its backward even when
    /// nothing before the layer is trained (the LoRA-SB init attaches no adapter).
    token: Var,
    dims: (usize, usize),
}

impl WeightGradSink {
    /// An empty sink for an `n × k` weight.
    pub fn new(n: usize, k: usize) -> candle_core::Result<Self> {
        let token = Var::zeros(1, candle_core::DType::F32, &candle_core::Device::Cpu)?;
        Ok(Self { sum: Arc::new(Mutex::new(None)), token, dims: (n, k) })
    }

    /// The gradient summed so far (`None` before any backward pass), leaving the sink empty.
    pub fn take(&self) -> candle_core::Result<Option<Tensor>> {
        let v = self.sum.lock().map_err(|_| candle_core::Error::Msg("weight-gradient sink poisoned".into()))?.take();
        v.map(|v| Tensor::from_vec(v, self.dims, &candle_core::Device::Cpu)).transpose()
    }

    /// `sum += g` for a gradient `g` `[n, k]` computed elsewhere (any device and dtype).
    pub fn add_tensor(&self, g: &Tensor) -> candle_core::Result<()> {
        if g.dims() != [self.dims.0, self.dims.1] {
            candle_core::bail!("a weight gradient {:?} for a sink of {:?}", g.dims(), self.dims);
        }
        let g: Vec<f32> =
            g.to_device(&candle_core::Device::Cpu)?.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?;
        let mut guard = self.sum.lock().map_err(|_| candle_core::Error::Msg("weight-gradient sink poisoned".into()))?;
        match guard.as_mut() {
            None => *guard = Some(g),
            Some(sum) => sum.iter_mut().zip(&g).for_each(|(s, v)| *s += v),
        }
        Ok(())
    }

    /// `sum += dyᵀ·x` for `dy` `[rows, n]` and `x` `[rows, k]`.
    fn add(&self, dy: &[f32], x: &[f32], rows: usize) -> candle_core::Result<()> {
        let (n, k) = self.dims;
        let mut guard = self.sum.lock().map_err(|_| candle_core::Error::Msg("weight-gradient sink poisoned".into()))?;
        let first = guard.is_none();
        let g = guard.get_or_insert_with(|| buffer_for_overwrite(n * k));
        let threads = candle_core::utils::get_num_threads();
        // SAFETY: dyᵀ is dy (rows×n) read with swapped strides, x is rows×k, g is n×k.
        unsafe { gemm_into(g, k, (n, k, rows), !first, dy, (1, n), x, (k, 1), threads) };
        Ok(())
    }
}

/// `x · Wᵀ (+ b)` with a frozen `W` `[n, k]` (any format) and optional bias `[n]`: `x` `[rows, k]` → `[rows, n]`.
/// With a bias the output starts as the bias and the products accumulate into it. Backward: the input gradient
/// only (where `x` needs one), and `dyᵀ·x` into the sink when there is one.
struct FrozenLinear {
    w: FrozenWeight,
    bias: Option<Tensor>,
    sink: Option<WeightGradSink>,
}

impl FrozenLinear {
    fn run(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let _p = crate::profile::span("fedsb-frozen-linear");
        let x = f32_slice(s, l, "linear")?;
        let (rows, k) = l.shape().dims2()?;
        let (n, k2) = self.w.dims();
        if k != k2 || self.bias.as_ref().is_some_and(|b| b.dims() != [n]) {
            let b = self.bias.as_ref().map_or(String::new(), |b| format!(", b {:?}", b.dims()));
            candle_core::bail!("linear: x [{rows}, {k}], w [{n}, {k2}]{b}");
        }
        let mut out = buffer_for_overwrite(rows * n);
        if let Some(b) = &self.bias
            && n > 0
        {
            let (bg, bl) = b.storage_and_layout();
            let b = storage_f32(&bg, bl, "linear bias")?;
            out.par_chunks_mut(n * 64).for_each(|o| {
                for row in o.chunks_mut(n) {
                    row.copy_from_slice(b);
                }
            });
        }
        super::frozen_gemm::forward(&self.w, x, rows, &mut out, self.bias.is_some(), None)?;
        Ok((CpuStorage::F32(out), Shape::from((rows, n))))
    }

    /// The input gradient (where `x` tracks one) and the sink's share of the backward.
    fn backward(&self, x: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        if let Some(sink) = &self.sink {
            let _p = crate::profile::span("fedsb-weight-grad");
            let (xg, xl) = x.storage_and_layout();
            let (dg, dl) = grad.storage_and_layout();
            let rows = xl.shape().dims2()?.0;
            sink.add(storage_f32(&dg, dl, "weight grad")?, storage_f32(&xg, xl, "weight grad")?, rows)?;
        }
        if !x.track_op() {
            return Ok(None);
        }
        Ok(Some(grad.apply_op1_no_bwd(&FrozenLinearGrad { w: self.w.clone() })?))
    }
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "fedsb-frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.run(s, l)
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        self.backward(x, grad)
    }
}

/// [`FrozenLinear`] with its gradient sink's token as a second input (see [`WeightGradSink`]).
struct FrozenLinearTracked(FrozenLinear);

impl CustomOp2 for FrozenLinearTracked {
    fn name(&self) -> &'static str {
        "fedsb-frozen-linear"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        _t: &CpuStorage,
        _tl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.0.run(s, l)
    }

    fn bwd(
        &self,
        x: &Tensor,
        token: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((self.0.backward(x, grad)?, Some(token.zeros_like()?)))
    }
}

/// The input gradient of [`FrozenLinear`]: `dx = dy · W` (`dy` `[rows, n]`, `W` `[n, k]`).
struct FrozenLinearGrad {
    w: FrozenWeight,
}

impl CustomOp1 for FrozenLinearGrad {
    fn name(&self) -> &'static str {
        "fedsb-frozen-linear-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let _p = crate::profile::span(self.name());
        let dy = f32_slice(s, l, "linear grad")?;
        let (rows, n) = l.shape().dims2()?;
        let (n2, k) = self.w.dims();
        if n != n2 {
            candle_core::bail!("linear grad: dy [{rows}, {n}], w [{n2}, {k}]");
        }
        let mut dx = buffer_for_overwrite(rows * k);
        super::frozen_gemm::backward_input(&self.w, dy, rows, &mut dx, false, None)?;
        Ok((CpuStorage::F32(dx), Shape::from((rows, k))))
    }
}

/// `x · Wᵀ (+ b)` for a frozen `W` `[n, k]` in any format and an f32 bias `b` `[n]`, `x` `[rows, k]` (CPU f32); the
/// gradient is `x`'s only.
pub fn frozen_linear(x: &Tensor, w: &FrozenWeight, b: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let op = FrozenLinear { w: w.clone(), bias: b.map(|b| b.contiguous()).transpose()?, sink: None };
    x.contiguous()?.apply_op1(op)
}

/// [`frozen_linear`] whose backward also adds `∂L/∂W = dyᵀ·x` to `sink` (the LoRA-SB init's gradient pass).
pub fn frozen_linear_tracking(
    x: &Tensor,
    w: &FrozenWeight,
    b: Option<&Tensor>,
    sink: &WeightGradSink,
) -> candle_core::Result<Tensor> {
    if sink.dims != w.dims() {
        candle_core::bail!("weight-gradient sink {:?} for a weight {:?}", sink.dims, w.dims());
    }
    let op = FrozenLinear { w: w.clone(), bias: b.map(|b| b.contiguous()).transpose()?, sink: Some(sink.clone()) };
    x.contiguous()?.apply_op2(sink.token.as_tensor(), FrozenLinearTracked(op))
}

/// `x · wᵀ` for a frozen f32 tensor `w` `[n, k]`, `x` `[rows, k]` (CPU f32); the gradient is `x`'s only.
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let w = FrozenWeight::dense("weight", w.clone()).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    frozen_linear(x, &w, None)
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;
    use crate::frozen::WeightFormat;

    #[test]
    fn frozen_linear_matches_matmul_plus_bias_and_grads_only_the_input() {
        for (rows, k, n) in [(1usize, 3usize, 2usize), (37, 19, 23), (256, 384, 64)] {
            let w = randn(&[n, k], 12, 0.5);
            let fw = FrozenWeight::dense("w", w.clone()).unwrap();
            let b = randn(&[n], 13, 0.5);
            let x = randn(&[rows, k], 14, 1.0);
            compare(
                &x,
                &|t| frozen_linear(t, &fw, Some(&b)).unwrap(),
                &|t| t.matmul(&w.t().unwrap()).unwrap().broadcast_add(&b).unwrap(),
                1e-5,
                "frozen linear",
            );
        }
        let x = randn(&[5, 4], 15, 1.0).t().unwrap(); // [4, 5], strided
        let (w, b) = (randn(&[3, 5], 16, 1.0), randn(&[3], 17, 1.0));
        let fw = FrozenWeight::dense("w", w.clone()).unwrap();
        let y = frozen_linear(&x, &fw, Some(&b)).unwrap();
        let r = x.matmul(&w.t().unwrap()).unwrap().broadcast_add(&b).unwrap();
        assert!(maxdiff(&y, &r) < 1e-5);
        let wt = FrozenWeight::dense("w", w.t().unwrap()).unwrap();
        assert!(frozen_linear(&x, &wt, Some(&b)).is_err());
        assert!(frozen_linear(&x, &fw, Some(&randn(&[4], 1, 1.0))).is_err());
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

    /// Compact weights: values and input gradients equal those of the f32 weight dequantized from them.
    #[test]
    fn compact_weights_match_their_dequantized_f32_copy() {
        let (rows, k, n) = (9, 64, 40);
        let w = randn(&[n, k], 22, 0.5);
        let b = randn(&[n], 23, 0.5);
        let x = randn(&[rows, k], 24, 1.0);
        for fmt in ["bf16", "f16", "q8_0", "q4_1"] {
            let fw = FrozenWeight::dense("w", w.clone()).unwrap().convert("w", fmt.parse::<WeightFormat>().unwrap());
            let fw = fw.unwrap();
            let wd = fw.to_f32(&candle_core::Device::Cpu).unwrap();
            super::super::frozen_gemm::with_engine(super::super::frozen_gemm::Engine::F32, || {
                compare(
                    &x,
                    &|t| frozen_linear(t, &fw, Some(&b)).unwrap(),
                    &|t| t.matmul(&wd.t().unwrap()).unwrap().broadcast_add(&b).unwrap(),
                    1e-4,
                    fmt,
                )
            });
        }
    }

    /// The sink sums `dyᵀ·x` over backward passes, equal to the gradient of `W` made a variable, also when
    /// nothing before the layer is trained.
    #[test]
    fn the_sink_collects_the_full_weight_gradient() {
        let (rows, k, n) = (7, 12, 5);
        let w = randn(&[n, k], 25, 0.5);
        let fw = FrozenWeight::dense("w", w.clone()).unwrap();
        let sink = WeightGradSink::new(n, k).unwrap();
        let wv = Var::from_tensor(&w).unwrap();
        let mut want: Option<Tensor> = None;
        for seed in [26, 27] {
            let x = randn(&[rows, k], seed, 1.0);
            let up = randn(&[rows, n], seed + 10, 1.0);
            let y = frozen_linear_tracking(&x, &fw, None, &sink).unwrap();
            (y * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let y2 = x.matmul(&wv.as_tensor().t().unwrap()).unwrap();
            let g = (y2 * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let gw = g.get(wv.as_tensor()).unwrap().clone();
            want = Some(match want {
                None => gw,
                Some(p) => (p + gw).unwrap(),
            });
        }
        let got = sink.take().unwrap().expect("two backward passes");
        assert!(maxdiff(&got, want.as_ref().unwrap()) < 1e-4);
        assert!(sink.take().unwrap().is_none(), "taking empties the sink");
        assert!(
            frozen_linear_tracking(&randn(&[1, k], 1, 1.0), &fw, None, &WeightGradSink::new(n, k + 1).unwrap())
                .is_err()
        );
    }
}
