//! Per-sample gradients by per-sample copies of the trainable tensors.
//!
//! candle has no per-sample gradients and does not keep the gradients of intermediate tensors. The exact and
//! cheap way: for one batch of `n` samples, every trainable tensor `P` (shape `s`) gets a copy `P̃` of shape
//! `[n, s]` that is its own leaf variable, and sample `i`'s forward pass uses `P̃[i]`. The forward values are
//! unchanged (each slice equals `P`), and the gradient of `Σᵢ lossᵢ` with respect to `P̃` is, slice by slice,
//! exactly the per-sample gradient `∂lossᵢ/∂P`: one backward pass, no per-sample loop. For LoRA-SB the extra
//! work is one batched `r × r` product per adapted layer.
//!
//! [`PerSampleScope::enter`] makes the copies and publishes them for the current thread; the layers that use a
//! trainable tensor ask [`per_sample`] for its copy while the scope lives (LoRA adapters in
//! [`crate::adapter::AdaptedLinear`], the classifier head). Dropping the scope ends it. The scope is
//! thread-local, so a model shared by several threads (an evaluator, another trainer) is not affected.
use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, TensorId, Var};

use crate::{Error, Result};

thread_local! {
    static ACTIVE: RefCell<Option<HashMap<TensorId, Tensor>>> = const { RefCell::new(None) };
}

/// The per-sample copy `[n, ...]` of `var` while a [`PerSampleScope`] is active on this thread.
pub fn per_sample(var: &Var) -> Option<Tensor> {
    ACTIVE.with(|a| a.borrow().as_ref().and_then(|m| m.get(&var.as_tensor().id()).cloned()))
}

/// Whether a [`PerSampleScope`] is active on this thread.
pub fn active() -> bool {
    ACTIVE.with(|a| a.borrow().is_some())
}

/// Per-sample copies of a model's trainable tensors for one batch; active on this thread until dropped.
pub struct PerSampleScope {
    copies: Vec<(String, Var)>,
    n: usize,
}

impl PerSampleScope {
    /// Makes a `[n, ...]` leaf copy of every tensor of `params` and activates them on this thread. Fails if a
    /// scope is already active here.
    pub fn enter(params: &[(String, Var)], n: usize) -> Result<Self> {
        if n == 0 {
            return Err(Error::Data("per-sample gradients of an empty batch".into()));
        }
        if active() {
            return Err(Error::Config("a per-sample scope is already active on this thread".into()));
        }
        let mut copies = Vec::with_capacity(params.len());
        let mut map = HashMap::with_capacity(params.len());
        for (name, v) in params {
            let t = v.as_tensor();
            let mut shape = vec![n];
            shape.extend_from_slice(t.dims());
            let copy = Var::from_tensor(&t.unsqueeze(0)?.broadcast_as(shape)?.contiguous()?)?;
            map.insert(t.id(), copy.as_tensor().clone());
            copies.push((name.clone(), copy));
        }
        ACTIVE.with(|a| *a.borrow_mut() = Some(map));
        Ok(Self { copies, n })
    }

    /// Samples in the batch.
    pub fn batch_size(&self) -> usize {
        self.n
    }

    /// The per-sample gradients `[n, ...]` of every tensor, in the order of `params` at [`Self::enter`]. A
    /// tensor the backward pass did not reach is an error (a cut graph, or a layer that ignored its copy).
    pub fn grads(&self, store: &GradStore) -> Result<Vec<Tensor>> {
        self.copies
            .iter()
            .map(|(name, v)| {
                store.get(v.as_tensor()).cloned().ok_or_else(|| {
                    Error::Numerics(format!("no per-sample gradient reached `{name}`: the autograd graph is cut"))
                })
            })
            .collect()
    }
}

impl Drop for PerSampleScope {
    fn drop(&mut self) {
        ACTIVE.with(|a| *a.borrow_mut() = None);
    }
}
