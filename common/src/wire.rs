//! Tensors on the wire: a [`TensorSet`] travels as a **blob**, a safetensors file (named tensors with dtype
//! and shape, little-endian bytes), identified by the sha256 of its bytes and streamed in chunks of
//! [`CHUNK_SIZE`] so that no message limit caps the model size.
//!
//! Values travel as f32 by default; bf16 or f16 halve the bytes (the receiver converts back to f32).
//! The **payload** of a blob is its tensor bytes; the safetensors header is overhead the byte ledger counts
//! at the message level.
use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::tensors::TensorSet;
use crate::{Error, Result};

/// Bytes per streamed chunk.
pub const CHUNK_SIZE: usize = 1 << 20;

/// The dtype values travel in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WireDtype {
    /// 4 bytes per value, exact.
    #[default]
    F32,
    /// 2 bytes per value, 8 exponent bits.
    Bf16,
    /// 2 bytes per value, 5 exponent bits.
    F16,
}

impl WireDtype {
    /// The candle dtype.
    pub fn dtype(self) -> DType {
        match self {
            WireDtype::F32 => DType::F32,
            WireDtype::Bf16 => DType::BF16,
            WireDtype::F16 => DType::F16,
        }
    }

    /// Bytes per value.
    pub fn bytes_per_value(self) -> u64 {
        match self {
            WireDtype::F32 => 4,
            WireDtype::Bf16 | WireDtype::F16 => 2,
        }
    }
}

impl std::fmt::Display for WireDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WireDtype::F32 => "f32",
            WireDtype::Bf16 => "bf16",
            WireDtype::F16 => "f16",
        })
    }
}

impl std::str::FromStr for WireDtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            "f16" => Ok(Self::F16),
            o => Err(Error::Config(format!("unknown wire dtype `{o}` (f32, bf16, f16)"))),
        }
    }
}

/// A set encoded as a blob: its bytes, hash and payload size.
#[derive(Clone, Debug)]
pub struct Blob {
    /// The safetensors bytes.
    pub bytes: Vec<u8>,
    /// Lowercase hex sha256 of `bytes`.
    pub sha256: String,
    /// Tensor bytes (values × bytes per value), without the header.
    pub payload_bytes: u64,
}

/// Encodes `set` as a blob with values in `dtype`.
pub fn encode_blob(set: &TensorSet, dtype: WireDtype) -> Result<Blob> {
    let converted = if dtype == WireDtype::F32 { set.to_dtype(DType::F32)? } else { set.to_dtype(dtype.dtype())? };
    let bytes = converted.to_safetensors_bytes()?;
    Ok(Blob { sha256: sha256_hex(&bytes), payload_bytes: set.num_values() as u64 * dtype.bytes_per_value(), bytes })
}

/// Decodes a blob into f32 tensors on `device`. Only f32, bf16 and f16 tensors are accepted.
pub fn decode_blob(bytes: &[u8], device: &Device) -> Result<TensorSet> {
    let set = TensorSet::from_safetensors_bytes(bytes, device)?;
    for (name, t) in set.iter() {
        if !matches!(t.dtype(), DType::F32 | DType::BF16 | DType::F16) {
            return Err(Error::tensor(name, format!("dtype {:?} is not a wire dtype (f32, bf16, f16)", t.dtype())));
        }
    }
    set.to_dtype(DType::F32)
}

/// Lowercase hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Whether `s` looks like a sha256 digest (64 lowercase hex characters).
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Tensor;

    fn set() -> TensorSet {
        let dev = Device::Cpu;
        let mut s = TensorSet::new();
        s.insert("l0.lora_R.weight", Tensor::new(&[[1.5f32, -2.0], [0.25, 3.0]], &dev).unwrap());
        s.insert("classifier.bias", Tensor::new(&[0.1f32, -0.1], &dev).unwrap());
        s
    }

    #[test]
    fn f32_blobs_are_exact_and_content_addressed() {
        let b = encode_blob(&set(), WireDtype::F32).unwrap();
        assert_eq!(b.payload_bytes, 6 * 4);
        assert!(b.bytes.len() as u64 > b.payload_bytes, "header is extra");
        assert_eq!(b.sha256, sha256_hex(&b.bytes));
        let back = decode_blob(&b.bytes, &Device::Cpu).unwrap();
        assert_eq!(back.content_hash().unwrap(), set().content_hash().unwrap());
        assert_eq!(encode_blob(&set(), WireDtype::F32).unwrap().sha256, b.sha256, "deterministic");
    }

    #[test]
    fn half_precision_halves_the_payload() {
        for d in [WireDtype::Bf16, WireDtype::F16] {
            let b = encode_blob(&set(), d).unwrap();
            assert_eq!(b.payload_bytes, 6 * 2);
            let back = decode_blob(&b.bytes, &Device::Cpu).unwrap();
            let v = back.require("l0.lora_R.weight").unwrap().to_vec2::<f32>().unwrap();
            assert_eq!(v, vec![vec![1.5, -2.0], vec![0.25, 3.0]], "{d:?}: exactly representable values survive");
            assert_eq!(back.require("classifier.bias").unwrap().dtype(), DType::F32);
        }
    }

    #[test]
    fn garbage_and_wrong_dtypes_are_refused() {
        assert!(decode_blob(b"garbage", &Device::Cpu).is_err());
        let mut s = TensorSet::new();
        s.insert("ids", Tensor::new(&[1u32, 2], &Device::Cpu).unwrap());
        let bytes = s.to_safetensors_bytes().unwrap();
        assert!(decode_blob(&bytes, &Device::Cpu).is_err());
        assert!(is_sha256_hex(&"a".repeat(64)));
        assert!(!is_sha256_hex("../../etc/passwd"));
    }
}
