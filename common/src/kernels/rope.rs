//! Rotary position embedding in the rotate-half layout.
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::*;

/// RoPE in the rotate-half layout: for each `[b, h, t]` row `x = (x1, x2)`, `(x1·c − x2·s, x2·c + x1·s)` with
/// `c, s` `[t, d/2]`; `inverse` rotates the other way, which is also the backward.
pub(super) struct Rope {
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

/// RoPE, rotate-half layout: `x` `[b, h, t, d]`, `cos`/`sin` `[t, d/2]` (CPU f32; no gradient for the tables).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rope { inverse: false })
}
