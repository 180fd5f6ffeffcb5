//! [`WeightMap`]: the pretrained tensors of a checkpoint by name, consumed as the model is built.
//!
//! Tensors stay as the checkpoint stores them (f32, bf16, f16, or GGUF blocks) until taken: the frozen
//! matrices ([`WeightMap::take_frozen`]: linear weights, token embeddings, the LM head) in the map's target
//! [`WeightDtype`], everything else ([`WeightMap::take`]: norms, biases, position embeddings) as f32.
use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::frozen::{FrozenWeight, QuantMatrix, WeightDtype};
use crate::{Error, Result};

/// A checkpoint tensor as read from the file.
#[derive(Clone, Debug)]
pub enum StoredTensor {
    /// A float tensor in its stored dtype (or an integer buffer such as BERT's `position_ids`).
    Dense(Tensor),
    /// A matrix in a GGUF block format.
    Quant(QuantMatrix),
}

impl StoredTensor {
    fn dims(&self) -> Vec<usize> {
        match self {
            StoredTensor::Dense(t) => t.dims().to_vec(),
            StoredTensor::Quant(q) => vec![q.dims().0, q.dims().1],
        }
    }
}

/// Named pretrained tensors, taken one by one while a model is built, so a missing or misshapen tensor is
/// reported by name.
#[derive(Default)]
pub struct WeightMap {
    tensors: HashMap<String, StoredTensor>,
    prefix: String,
    target: WeightDtype,
    device: Option<Device>,
}

impl WeightMap {
    /// Wraps a map of tensors, kept in their dtypes until taken.
    pub fn new(tensors: HashMap<String, Tensor>) -> Result<Self> {
        Ok(Self::from_stored(tensors.into_iter().map(|(k, v)| (k, StoredTensor::Dense(v))).collect()))
    }

    /// Wraps a map of stored tensors (dense or quantized).
    pub fn from_stored(tensors: HashMap<String, StoredTensor>) -> Self {
        Self { tensors, prefix: String::new(), target: WeightDtype::Auto, device: None }
    }

    /// Sets the format the frozen matrices are taken in (`--dtype`).
    pub fn with_target(mut self, target: WeightDtype) -> Self {
        self.target = target;
        self
    }

    /// Moves every taken tensor to `device` (by default each stays where it was read).
    pub fn on_device(mut self, device: &Device) -> Self {
        self.device = Some(device.clone());
        self
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

    fn take_stored(&mut self, name: &str, shape: &[usize]) -> Result<(String, StoredTensor)> {
        let full = format!("{}{name}", self.prefix);
        let t = self.tensors.remove(&full).ok_or_else(|| Error::tensor(&full, "missing from the checkpoint"))?;
        if t.dims() != shape {
            return Err(Error::tensor(full, format!("shape {:?}, expected {shape:?}", t.dims())));
        }
        Ok((full, t))
    }

    fn place(&self, t: Tensor) -> Result<Tensor> {
        match &self.device {
            Some(d) => Ok(t.to_device(d)?),
            None => Ok(t),
        }
    }

    /// Removes and returns the tensor `name` as f32 (float tensors; integer buffers keep their dtype),
    /// checking its shape.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let (_, t) = self.take_stored(name, shape)?;
        let t = match t {
            StoredTensor::Dense(t) if t.dtype().is_float() && t.dtype() != DType::F32 => t.to_dtype(DType::F32)?,
            StoredTensor::Dense(t) => t,
            StoredTensor::Quant(q) => Tensor::from_vec(q.dequantize(), q.dims(), &Device::Cpu)?,
        };
        self.place(t)
    }

    /// Removes and returns the 2-D frozen matrix `name` in the map's target format (see [`WeightDtype`];
    /// unconvertible formats are errors naming the tensor), checking its shape.
    pub fn take_frozen(&mut self, name: &str, shape: &[usize]) -> Result<FrozenWeight> {
        let (full, t) = self.take_stored(name, shape)?;
        let w = match t {
            StoredTensor::Dense(t) => FrozenWeight::dense(&full, t)?,
            StoredTensor::Quant(q) => FrozenWeight::Quant(Arc::new(q)),
        };
        let w = match self.target {
            WeightDtype::Auto => w,
            WeightDtype::To(f) => w.convert(&full, f)?,
        };
        match &self.device {
            Some(d) => w.to_device(d).map_err(|e| Error::tensor(&full, e.to_string())),
            None => Ok(w),
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frozen::WeightFormat;

    #[test]
    fn frozen_matrices_take_the_target_format_and_the_rest_is_f32() {
        let dev = Device::Cpu;
        let mut m = HashMap::new();
        m.insert("w".to_string(), Tensor::randn(0f32, 1.0, (4, 64), &dev).unwrap().to_dtype(DType::BF16).unwrap());
        m.insert("n".to_string(), Tensor::ones(64, DType::BF16, &dev).unwrap());
        m.insert("odd".to_string(), Tensor::ones((2, 48), DType::F32, &dev).unwrap());
        let mut w = WeightMap::new(m)
            .unwrap()
            .with_target(WeightDtype::To(WeightFormat::Quant(crate::frozen::QuantKind::Q8_0)));
        assert_eq!(w.take("n", &[64]).unwrap().dtype(), DType::F32);
        assert_eq!(w.take_frozen("w", &[4, 64]).unwrap().format().name(), "q8_0");
        let e = w.take_frozen("odd", &[2, 48]).unwrap_err().to_string();
        assert!(e.contains("odd") && e.contains("q8_0"), "{e}");
        assert!(w.take("w", &[4, 64]).unwrap_err().to_string().contains("missing"));
    }
}
