//! [`WeightMap`]: the pretrained tensors of a checkpoint by name, consumed as the model is built.
use std::collections::HashMap;

use candle_core::{DType, Tensor};

use crate::{Error, Result};

/// Named pretrained tensors (f32, on the model's device), taken one by one while a model is built, so a
/// missing or misshapen tensor is reported by name.
#[derive(Default)]
pub struct WeightMap {
    tensors: HashMap<String, Tensor>,
    prefix: String,
}

impl WeightMap {
    /// Wraps a map of tensors. Every tensor is converted to f32.
    pub fn new(tensors: HashMap<String, Tensor>) -> Result<Self> {
        let mut out = HashMap::with_capacity(tensors.len());
        for (k, v) in tensors {
            let v = if v.dtype() == DType::F32 || !v.dtype().is_float() { v } else { v.to_dtype(DType::F32)? };
            out.insert(k, v);
        }
        Ok(Self { tensors: out, prefix: String::new() })
    }

    /// Sets a name prefix prepended to every lookup (e.g. `bert.`).
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The current prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Whether a tensor named `name` (after the prefix) exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(&format!("{}{name}", self.prefix))
    }

    /// Whether a tensor with this exact full name exists (no prefix applied).
    pub fn contains_full(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Removes and returns the tensor `name`, checking its shape.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let full = format!("{}{name}", self.prefix);
        let t = self.tensors.remove(&full).ok_or_else(|| Error::tensor(&full, "missing from the checkpoint"))?;
        if t.dims() != shape {
            return Err(Error::tensor(full, format!("shape {:?}, expected {shape:?}", t.dims())));
        }
        Ok(t)
    }

    /// Like [`Self::take`] but `None` when absent.
    pub fn take_opt(&mut self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        if self.contains(name) { self.take(name, shape).map(Some) } else { Ok(None) }
    }

    /// The first of `names` that exists, taken.
    pub fn take_any(&mut self, names: &[&str], shape: &[usize]) -> Result<Tensor> {
        for n in names {
            if self.contains(n) {
                return self.take(n, shape);
            }
        }
        Err(Error::tensor(format!("{}{}", self.prefix, names.join(" | ")), "missing from the checkpoint"))
    }

    /// Names not consumed yet.
    pub fn remaining(&self) -> Vec<String> {
        let mut v: Vec<String> = self.tensors.keys().cloned().collect();
        v.sort();
        v
    }
}
