//! [`TensorSet`]: an ordered set of named tensors, the unit in which adapters are saved, hashed, sent and
//! averaged without knowing the model they belong to.
//!
//! Names are stable (e.g. `model.layers.3.self_attn.q_proj.lora_R.weight`), order is by name, and the
//! content hash covers names, dtypes, shapes and little-endian bytes, so two sets hash equal exactly when
//! they are bit-identical.
use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// An ordered map from name to tensor (f32 unless stated otherwise), plus string metadata.
#[derive(Clone, Debug, Default)]
pub struct TensorSet {
    tensors: BTreeMap<String, Tensor>,
    metadata: BTreeMap<String, String>,
}

impl TensorSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces a tensor.
    pub fn insert(&mut self, name: impl Into<String>, t: Tensor) {
        self.tensors.insert(name.into(), t);
    }

    /// The tensor called `name`, if any.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    /// The tensor called `name`, or an error naming it.
    pub fn require(&self, name: &str) -> Result<&Tensor> {
        self.tensors.get(name).ok_or_else(|| Error::tensor(name, "missing"))
    }

    /// Removes and returns the tensor called `name`.
    pub fn remove(&mut self, name: &str) -> Option<Tensor> {
        self.tensors.remove(name)
    }

    /// Names and tensors, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Tensor)> {
        self.tensors.iter()
    }

    /// The names, in order.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether the set holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Total number of scalar values.
    pub fn num_values(&self) -> usize {
        self.tensors.values().map(|t| t.elem_count()).sum()
    }

    /// String metadata saved with the set (adapter kind, rank, model hash, ...).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Sets one metadata entry.
    pub fn set_metadata(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.metadata.insert(key.into(), value.into());
    }

    /// SHA-256 over every tensor's name, dtype, shape and little-endian bytes, in name order (metadata
    /// excluded), as lowercase hex.
    pub fn content_hash(&self) -> Result<String> {
        let mut h = Sha256::new();
        for (name, t) in &self.tensors {
            h.update((name.len() as u64).to_le_bytes());
            h.update(name.as_bytes());
            h.update(t.dtype().as_str().as_bytes());
            h.update((t.rank() as u64).to_le_bytes());
            for d in t.dims() {
                h.update((*d as u64).to_le_bytes());
            }
            h.update(tensor_le_bytes(t)?);
        }
        Ok(hex::encode(h.finalize()))
    }

    /// Saves as a safetensors file (metadata in its header).
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = self.to_safetensors_bytes().map_err(|e| match e {
            Error::Tensor { msg, .. } => Error::tensor(path.display().to_string(), msg),
            other => other,
        })?;
        write_atomic(path, &bytes)
    }

    /// The safetensors encoding (tensors in their current dtype, metadata in the header).
    pub fn to_safetensors_bytes(&self) -> Result<Vec<u8>> {
        let mut data = Vec::with_capacity(self.tensors.len());
        for (name, t) in &self.tensors {
            data.push((name.clone(), t.to_device(&Device::Cpu)?.contiguous()?));
        }
        let meta: std::collections::HashMap<String, String> =
            self.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let views: Vec<(&str, &Tensor)> = data.iter().map(|(n, t)| (n.as_str(), t)).collect();
        safetensors::serialize(views, Some(meta)).map_err(|e| Error::tensor("<safetensors>", e.to_string()))
    }

    /// Loads a safetensors file onto `device`.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_safetensors_bytes(&bytes, device).map_err(|e| match e {
            Error::Tensor { name, msg } => Error::tensor(name, format!("{msg} (in {})", path.display())),
            other => other,
        })
    }

    /// Parses safetensors bytes.
    pub fn from_safetensors_bytes(bytes: &[u8], device: &Device) -> Result<Self> {
        let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| Error::tensor("<safetensors>", e.to_string()))?;
        let metadata = header.metadata().clone().unwrap_or_default().into_iter().collect();
        let st =
            safetensors::SafeTensors::deserialize(bytes).map_err(|e| Error::tensor("<safetensors>", e.to_string()))?;
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            let t = candle_core::safetensors::Load::load(&view, device)?;
            tensors.insert(name, t);
        }
        Ok(Self { tensors, metadata })
    }

    /// A copy with every tensor converted to `dtype`.
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        let mut out = Self { tensors: BTreeMap::new(), metadata: self.metadata.clone() };
        for (n, t) in &self.tensors {
            out.tensors.insert(n.clone(), t.to_dtype(dtype)?);
        }
        Ok(out)
    }
}

impl FromIterator<(String, Tensor)> for TensorSet {
    fn from_iter<I: IntoIterator<Item = (String, Tensor)>>(iter: I) -> Self {
        Self { tensors: iter.into_iter().collect(), metadata: BTreeMap::new() }
    }
}

/// The little-endian bytes of a tensor (row-major).
pub fn tensor_le_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let t = t.to_device(&Device::Cpu)?.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => t.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::F64 => t.to_vec1::<f64>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::BF16 => t.to_vec1::<half::bf16>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::F16 => t.to_vec1::<half::f16>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::U32 => t.to_vec1::<u32>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::I64 => t.to_vec1::<i64>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::U8 => t.to_vec1::<u8>()?,
        other => {
            return Err(Error::tensor("<hash>", format!("unsupported dtype {other:?}")));
        }
    })
}

/// Writes `bytes` to `path` through a temporary file and a rename, so readers never see a partial file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let tmp = path.with_extension("part");
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// SHA-256 of a file, streamed, as lowercase hex.
pub fn file_sha256(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_roundtrip_keeps_hash_and_metadata() {
        let dev = Device::Cpu;
        let mut s = TensorSet::new();
        s.insert("b.weight", Tensor::randn(0f32, 1., (3, 4), &dev).unwrap());
        s.insert("a.weight", Tensor::randn(0f32, 1., (2, 2), &dev).unwrap());
        s.set_metadata("kind", "lora-sb");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.safetensors");
        s.save(&p).unwrap();
        let l = TensorSet::load(&p, &dev).unwrap();
        assert_eq!(l.content_hash().unwrap(), s.content_hash().unwrap());
        assert_eq!(l.metadata().get("kind").map(String::as_str), Some("lora-sb"));
        assert_eq!(l.names().cloned().collect::<Vec<_>>(), vec!["a.weight", "b.weight"]);
    }

    #[test]
    fn hash_changes_with_one_bit() {
        let dev = Device::Cpu;
        let mut s = TensorSet::new();
        s.insert("x", Tensor::new(&[1f32, 2., 3.], &dev).unwrap());
        let h1 = s.content_hash().unwrap();
        s.insert("x", Tensor::new(&[1f32, 2., f32::from_bits(3f32.to_bits() ^ 1)], &dev).unwrap());
        assert_ne!(h1, s.content_hash().unwrap());
        let mut r = TensorSet::new();
        r.insert("y", Tensor::new(&[1f32, 2., 3.], &dev).unwrap());
        assert_ne!(h1, r.content_hash().unwrap(), "the name is part of the hash");
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(TensorSet::from_safetensors_bytes(b"not a safetensors file", &Device::Cpu).is_err());
    }
}
