//! Activation recomputation ("gradient checkpointing") of whole transformer blocks, so a training step holds
//! one block's activations at a time instead of every block's.
//!
//! [`checkpoint`] runs a [`Segment`] (a block) forward as one op that keeps only its input. Its backward runs
//! the segment again, this time with a graph, back-propagates the upstream gradient through it, and returns the
//! input's gradient. The gradients of the trainable tensors inside the segment (adapters, their per-sample
//! copies under DP-SGD, the LoRA-SB init's weight-gradient sinks) cannot leave through the op's outputs: they
//! are summed into a thread-local side store, which [`backward`] merges into the returned [`GradStore`]. So a
//! model that recomputes must be trained through [`backward`], never `Tensor::backward` directly (a forward
//! that finds uncollected gradients fails rather than lose them).
//!
//! Cost: one more forward of every block per step (about a third more work); the values and gradients are the
//! same (the recomputation is bit-identical, the kernels being deterministic).
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor, TensorId, Var};

use crate::{Error, Result};

/// A part of a model to run under [`checkpoint`].
pub trait Segment: Send + Sync + 'static {
    /// The forward pass on `x` (with a graph when `x` or the segment's own variables track one).
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
    /// The tensors inside the segment whose gradients the caller wants (trainable variables, and their
    /// per-sample copies while a DP-SGD scope is active).
    fn grad_targets(&self) -> Vec<Tensor>;
}

thread_local! {
    /// Gradients of the segments' inner variables, by id, waiting for [`backward`] to collect them.
    static PENDING: RefCell<HashMap<TensorId, Tensor>> = RefCell::new(HashMap::new());
}

/// The op [`checkpoint`] applies: inputs `x` and a one-element token variable (so autograd visits the op even
/// when `x` tracks no gradient: the segment's own variables do).
struct Checkpoint {
    seg: Arc<dyn Segment>,
}

fn to_msg(e: Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

impl CustomOp2 for Checkpoint {
    fn name(&self) -> &'static str {
        "fedsb-checkpoint"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        _t: &CpuStorage,
        _tl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(v) = s else { candle_core::bail!("checkpoint: f32 input only") };
        let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("checkpoint: contiguous input only") };
        let x = Tensor::from_slice(&v[a..b], l.shape(), &candle_core::Device::Cpu)?;
        // The segment's graph (its activations) lives only until `y` is copied out.
        let y = self.seg.forward(&x).map_err(to_msg)?.contiguous()?;
        let shape = y.shape().clone();
        let data = y.flatten_all()?.to_vec1::<f32>()?;
        Ok((CpuStorage::F32(data), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        token: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let _p = crate::profile::span("recompute");
        let xv = Var::from_tensor(&x.detach())?;
        let y = self.seg.forward(xv.as_tensor()).map_err(to_msg)?;
        let inner = (y * grad.detach())?.sum_all()?.backward()?;
        PENDING.with(|p| -> candle_core::Result<()> {
            let mut p = p.borrow_mut();
            for t in self.seg.grad_targets() {
                if let Some(g) = inner.get(&t) {
                    let sum = match p.remove(&t.id()) {
                        Some(prev) => (prev + g)?,
                        None => g.clone(),
                    };
                    p.insert(t.id(), sum);
                }
            }
            Ok(())
        })?;
        let dx = if x.track_op() { inner.get(xv.as_tensor()).cloned() } else { None };
        Ok((dx, Some(token.zeros_like()?)))
    }
}

/// `seg(x)` keeping only `x` for the backward, which recomputes the segment (CPU f32).
pub fn checkpoint(seg: Arc<dyn Segment>, x: &Tensor) -> Result<Tensor> {
    if PENDING.with(|p| !p.borrow().is_empty()) {
        return Err(Error::Numerics(
            "gradients of recomputed blocks from the last backward pass were never collected \
             (train a recomputing model through fedsb_common::recompute::backward)"
                .into(),
        ));
    }
    let token = Var::zeros(1, candle_core::DType::F32, x.device())?;
    Ok(x.contiguous()?.apply_op2(token.as_tensor(), Checkpoint { seg })?)
}

/// `loss.backward()`, plus the gradients of every recomputed segment's inner variables (see the module docs):
/// the backward pass training code calls.
pub fn backward(loss: &Tensor) -> Result<GradStore> {
    let mut grads = loss.backward()?;
    let pending = PENDING.with(|p| std::mem::take(&mut *p.borrow_mut()));
    for (id, g) in pending {
        let sum = match grads.get_id(id) {
            Some(prev) => (prev + &g)?,
            None => g,
        };
        grads.insert_id(id, sum);
    }
    Ok(grads)
}

/// Drops gradients a failed step left uncollected (so the next step starts clean).
pub fn discard_pending() {
    PENDING.with(|p| p.borrow_mut().clear());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::init::{InitConfig, estimate_gradients};
    use crate::adapter::{AdapterConfig, AdapterKind};
    use crate::dp::per_sample::PerSampleScope;
    use crate::model::{LlamaConfig, LlamaModel, Model};
    use crate::train::data::{Batch, Encoded, Target};
    use crate::train::{batch_loss, per_sample_loss};
    use candle_core::Device;

    fn data() -> Vec<Encoded> {
        (0..4u32)
            .map(|i| {
                let ids: Vec<u32> = (0..9).map(|j| (i * 5 + j * 7) % 61).collect();
                let labels = ids.iter().skip(1).map(|&x| x as i64).chain([-100]).collect();
                Encoded { type_ids: vec![0; 9], ids, target: Target::NextTokens(labels) }
            })
            .collect()
    }

    fn maxdiff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// The same loss and the same gradient of every trainable tensor with and without recomputation: plain,
    /// per-sample (DP-SGD), and the LoRA-SB init's full-weight gradients.
    #[test]
    fn recomputed_blocks_give_the_same_gradients() {
        let dev = Device::Cpu;
        let base = Model::CausalLm(LlamaModel::random(&LlamaConfig::tiny(), 5, &dev).unwrap());
        let d = data();
        let batch = Batch::collate(&d.iter().collect::<Vec<_>>(), 0, &dev).unwrap();
        for kind in [AdapterKind::Lora, AdapterKind::FfaLora] {
            let mut m = base.clone();
            m.attach_adapters(&AdapterConfig::new(kind, 4, &["q", "v", "gate", "down"]), None).unwrap();
            for (_, v) in m.trainable() {
                v.set(&Tensor::randn(0f32, 0.1, v.dims(), &dev).unwrap()).unwrap();
            }
            let mut r = m.clone();
            assert!(r.set_recompute(true));
            let (l0, l1) = (batch_loss(&m, &batch).unwrap().loss, batch_loss(&r, &batch).unwrap().loss);
            assert_eq!(l0.to_scalar::<f32>().unwrap(), l1.to_scalar::<f32>().unwrap());
            let (g0, g1) = (backward(&l0).unwrap(), backward(&l1).unwrap());
            for (name, v) in m.trainable() {
                let (a, b) = (g0.get(v.as_tensor()).unwrap(), g1.get(v.as_tensor()));
                let b = b.unwrap_or_else(|| panic!("{kind}: `{name}` got no gradient through the recomputed blocks"));
                assert!(maxdiff(a, b) < 1e-6, "{kind}: `{name}` differs by {}", maxdiff(a, b));
            }
            // Per-sample gradients (DP-SGD) through recomputed blocks.
            let per = |model: &Model| {
                let scope = PerSampleScope::enter(&model.trainable(), 4).unwrap();
                let out = per_sample_loss(model, &batch).unwrap();
                let store = backward(&out.losses.sum_all().unwrap()).unwrap();
                scope.grads(&store).unwrap()
            };
            for (a, b) in per(&m).iter().zip(&per(&r)) {
                assert!(maxdiff(a, b) < 1e-6, "{kind}: per-sample gradients differ by {}", maxdiff(a, b));
            }
        }
        // The LoRA-SB init's gradient pass with recomputation.
        let adapter = AdapterConfig::new(AdapterKind::LoraSb, 4, &["q", "v", "down"]);
        let cfg = InitConfig {
            samples: 4,
            batch_size: 2,
            eta: 1e-3,
            oversample: 4,
            power_iters: 4,
            seed: 7,
            grad_memory_mib: 1024,
        };
        let (mut m, mut r) = (base.clone(), base.clone());
        r.set_recompute(true);
        let (g0, g1) = (
            estimate_gradients(&mut m, &adapter, &d, &cfg, 0).unwrap(),
            estimate_gradients(&mut r, &adapter, &d, &cfg, 0).unwrap(),
        );
        for ((n, a), (_, b)) in g0.iter().zip(&g1) {
            assert!(maxdiff(a, b) < 1e-6, "init gradient of {n} differs by {}", maxdiff(a, b));
        }
        // A recomputing model's gradients must be collected: a plain backward leaves them behind, and the next
        // forward says so.
        let mut m = base.clone();
        m.attach_adapters(&AdapterConfig::new(AdapterKind::Lora, 4, &["q"]), None).unwrap();
        m.set_recompute(true);
        batch_loss(&m, &batch).unwrap().loss.backward().unwrap();
        let e = batch_loss(&m, &batch).unwrap_err().to_string();
        assert!(e.contains("never collected"), "{e}");
        discard_pending();
        assert!(batch_loss(&m, &batch).is_ok());
    }
}
