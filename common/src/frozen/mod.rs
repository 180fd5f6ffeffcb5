//! Frozen base weights kept compact: [`FrozenWeight`] holds a pretrained matrix in its checkpoint's own
//! precision — f32, bf16 or f16 (a candle tensor on any device), or one of GGUF's block formats
//! ([`QuantMatrix`], CPU) — and never as a whole f32 copy: the kernels dequantize it a tile at a time inside the
//! matrix product (`crate::kernels::frozen_gemm`).
//!
//! Which format a model's matrices are kept in is [`WeightDtype`] (`--dtype`): `auto` keeps each checkpoint
//! tensor as stored; a named format converts to it (f32 → bf16, f32/bf16 → q8_0, ...). Converting between two
//! different block formats is refused (it would quantize twice), and so is a format the shape cannot take
//! (a row length that is not a multiple of the block). Norms, biases, position embeddings, adapters, the
//! classification head and the optimizer's state are always f32.
pub mod quant;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};

pub use quant::{QuantKind, QuantMatrix};

use crate::{Error, Result};

/// The storage format of a frozen matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightFormat {
    /// 32-bit float.
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half.
    F16,
    /// A GGUF block format.
    Quant(QuantKind),
}

impl WeightFormat {
    /// The name `--dtype` takes (`f32`, `bf16`, `f16`, `q8_0`, `q4_k`, ...).
    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::F32 => "f32",
            WeightFormat::Bf16 => "bf16",
            WeightFormat::F16 => "f16",
            WeightFormat::Quant(k) => k.name(),
        }
    }

    /// Every format, by name.
    pub fn all_names() -> Vec<&'static str> {
        let mut v = vec!["f32", "bf16", "f16"];
        v.extend(QuantKind::ALL.iter().map(|k| k.name()));
        v
    }

    /// Whether the format stores less than f32 does.
    pub fn is_compact(self) -> bool {
        self != WeightFormat::F32
    }

    /// The format of a candle float dtype.
    pub fn of_dtype(d: DType) -> Option<Self> {
        match d {
            DType::F32 => Some(WeightFormat::F32),
            DType::BF16 => Some(WeightFormat::Bf16),
            DType::F16 => Some(WeightFormat::F16),
            _ => None,
        }
    }
}

impl std::fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for WeightFormat {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let l = s.trim().to_ascii_lowercase();
        Ok(match l.as_str() {
            "f32" | "float32" => WeightFormat::F32,
            "bf16" | "bfloat16" => WeightFormat::Bf16,
            "f16" | "float16" | "half" => WeightFormat::F16,
            other => match QuantKind::ALL.iter().find(|k| k.name() == other) {
                Some(k) => WeightFormat::Quant(*k),
                None => {
                    return Err(Error::Config(format!(
                        "weight format `{s}` is not supported (supported: {})",
                        WeightFormat::all_names().join(", ")
                    )));
                }
            },
        })
    }
}

/// The format a model's frozen matrices are loaded in (`--dtype`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WeightDtype {
    /// As the checkpoint stores each tensor (f32 stays f32, bf16 stays bf16, Q4_1 stays Q4_1).
    #[default]
    Auto,
    /// Converted to this format.
    To(WeightFormat),
}

impl WeightDtype {
    /// The name (`auto` or the format's).
    pub fn name(self) -> &'static str {
        match self {
            WeightDtype::Auto => "auto",
            WeightDtype::To(f) => f.name(),
        }
    }
}

impl std::fmt::Display for WeightDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for WeightDtype {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        if s.trim().eq_ignore_ascii_case("auto") {
            return Ok(WeightDtype::Auto);
        }
        s.parse::<WeightFormat>().map(WeightDtype::To).map_err(|_| {
            Error::Config(format!(
                "--dtype `{s}` is not supported (supported: auto, {})",
                WeightFormat::all_names().join(", ")
            ))
        })
    }
}

/// A borrowed view of a frozen matrix's CPU data, as the kernels read it.
pub enum WeightData<'a> {
    /// f32, row-major.
    F32(&'a [f32]),
    /// bf16, row-major.
    Bf16(&'a [bf16]),
    /// f16, row-major.
    F16(&'a [f16]),
    /// GGUF blocks.
    Quant(&'a QuantMatrix),
}

/// A frozen 2-D weight `[rows, cols]` (`[out, in]` for a linear layer) in a compact format. Cheap to clone
/// (shared storage).
#[derive(Clone, Debug)]
pub enum FrozenWeight {
    /// f32, bf16 or f16, as a candle tensor (any device).
    Dense(Tensor),
    /// A GGUF block format (CPU).
    Quant(Arc<QuantMatrix>),
}

impl FrozenWeight {
    /// Wraps a 2-D float tensor (f32, bf16 or f16) as it is.
    pub fn dense(name: &str, t: Tensor) -> Result<Self> {
        if t.rank() != 2 {
            return Err(Error::tensor(name, format!("a frozen matrix must be 2-D, got {:?}", t.dims())));
        }
        if WeightFormat::of_dtype(t.dtype()).is_none() {
            return Err(Error::tensor(name, format!("dtype {:?} is not a float format", t.dtype())));
        }
        Ok(FrozenWeight::Dense(t.contiguous()?))
    }

    /// `(rows, cols)`.
    pub fn dims(&self) -> (usize, usize) {
        match self {
            FrozenWeight::Dense(t) => {
                let d = t.dims();
                (d[0], d[1])
            }
            FrozenWeight::Quant(q) => q.dims(),
        }
    }

    /// The storage format.
    pub fn format(&self) -> WeightFormat {
        match self {
            FrozenWeight::Dense(t) => WeightFormat::of_dtype(t.dtype()).unwrap_or(WeightFormat::F32),
            FrozenWeight::Quant(q) => WeightFormat::Quant(q.kind()),
        }
    }

    /// Bytes of storage held.
    pub fn bytes(&self) -> usize {
        match self {
            FrozenWeight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            FrozenWeight::Quant(q) => q.bytes(),
        }
    }

    /// The device holding the data.
    pub fn device(&self) -> Device {
        match self {
            FrozenWeight::Dense(t) => t.device().clone(),
            FrozenWeight::Quant(_) => Device::Cpu,
        }
    }

    /// The tensor itself when the weight is an f32 tensor.
    pub fn as_f32(&self) -> Option<&Tensor> {
        match self {
            FrozenWeight::Dense(t) if t.dtype() == DType::F32 => Some(t),
            _ => None,
        }
    }

    /// Whether two weights share their storage (one was cloned from the other).
    pub fn same_storage(&self, other: &FrozenWeight) -> bool {
        match (self, other) {
            (FrozenWeight::Dense(a), FrozenWeight::Dense(b)) => a.id() == b.id(),
            (FrozenWeight::Quant(a), FrozenWeight::Quant(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    /// The whole matrix as a new f32 tensor on `device` (export, merged weights, composite fallbacks).
    pub fn to_f32(&self, device: &Device) -> Result<Tensor> {
        match self {
            FrozenWeight::Dense(t) => Ok(t.to_dtype(DType::F32)?.to_device(device)?),
            FrozenWeight::Quant(q) => Ok(Tensor::from_vec(q.dequantize(), q.dims(), device)?),
        }
    }

    /// Runs `f` on a view of the data (CPU weights only).
    pub fn with_data<R>(&self, f: impl FnOnce(WeightData<'_>) -> R) -> Result<R> {
        match self {
            FrozenWeight::Quant(q) => Ok(f(WeightData::Quant(q))),
            FrozenWeight::Dense(t) => {
                let (storage, layout) = t.storage_and_layout();
                let candle_core::Storage::Cpu(cpu) = &*storage else {
                    return Err(Error::Numerics("the frozen weight is not on the CPU".into()));
                };
                let (a, b) = layout
                    .contiguous_offsets()
                    .ok_or_else(|| Error::Numerics("the frozen weight is not contiguous".into()))?;
                Ok(match cpu {
                    candle_core::CpuStorage::F32(v) => f(WeightData::F32(&v[a..b])),
                    candle_core::CpuStorage::BF16(v) => f(WeightData::Bf16(&v[a..b])),
                    candle_core::CpuStorage::F16(v) => f(WeightData::F16(&v[a..b])),
                    _ => return Err(Error::Numerics("the frozen weight is not a float tensor".into())),
                })
            }
        }
    }

    /// The rows `ids` `[...]` (u32) as an f32 tensor `[..., cols]`: an embedding lookup (no gradient).
    pub fn embedding(&self, ids: &Tensor) -> Result<Tensor> {
        let (rows, cols) = self.dims();
        let mut shape = ids.dims().to_vec();
        shape.push(cols);
        match self {
            FrozenWeight::Dense(t) => {
                let flat = ids.flatten_all()?;
                Ok(t.embedding(&flat)?.to_dtype(DType::F32)?.reshape(shape)?)
            }
            FrozenWeight::Quant(q) => {
                let ids_v = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
                if let Some(bad) = ids_v.iter().find(|&&i| i as usize >= rows) {
                    return Err(Error::Data(format!("token id {bad} is outside the {rows}-row embedding")));
                }
                let mut out = vec![0f32; ids_v.len() * cols];
                q.gather_rows(&ids_v, &mut out)?;
                Ok(Tensor::from_vec(out, shape, ids.device())?)
            }
        }
    }

    /// This weight in `target` format (`name` for errors). Same format: shared, no copy. Float to float:
    /// rounded. Float to a block format: quantized (rows must split into whole blocks). A block format to a
    /// float: dequantized. One block format to another: refused (two quantizations).
    pub fn convert(&self, name: &str, target: WeightFormat) -> Result<FrozenWeight> {
        let from = self.format();
        if from == target {
            return Ok(self.clone());
        }
        let (rows, cols) = self.dims();
        match (self, target) {
            (FrozenWeight::Quant(_), WeightFormat::Quant(_)) => Err(Error::tensor(
                name,
                format!(
                    "is stored as {from}; converting it to {target} would quantize it a second time \
                     (use --dtype auto to keep {from}, or f32, bf16 or f16)"
                ),
            )),
            (_, WeightFormat::Quant(k)) => {
                QuantMatrix::check_shape(k, name, rows, cols)?;
                let data: Vec<f32> = self.to_f32(&Device::Cpu)?.flatten_all()?.to_vec1()?;
                Ok(FrozenWeight::Quant(Arc::new(QuantMatrix::quantize(k, name, rows, cols, &data)?)))
            }
            (FrozenWeight::Dense(t), f) => {
                let d = match f {
                    WeightFormat::F32 => DType::F32,
                    WeightFormat::Bf16 => DType::BF16,
                    WeightFormat::F16 => DType::F16,
                    WeightFormat::Quant(_) => unreachable!("handled above"),
                };
                Ok(FrozenWeight::Dense(t.to_dtype(d)?))
            }
            (FrozenWeight::Quant(_), f) => {
                let t = self.to_f32(&Device::Cpu)?;
                FrozenWeight::Dense(t).convert(name, f)
            }
        }
    }

    /// `W + delta` (`delta` `[rows, cols]`, f32) as a new f32 weight: how FedEx-LoRA's and FLoRA's folds
    /// change a frozen base (a compact weight becomes f32 here: the sum is not representable in its format).
    pub fn add_f32(&self, delta: &Tensor) -> Result<FrozenWeight> {
        let base = self.to_f32(delta.device())?;
        Ok(FrozenWeight::Dense((base + delta.to_dtype(DType::F32)?)?))
    }

    /// Moves the weight to `device` (quantized weights only exist on the CPU).
    pub fn to_device(&self, device: &Device) -> Result<FrozenWeight> {
        match self {
            FrozenWeight::Dense(t) => Ok(FrozenWeight::Dense(t.to_device(device)?)),
            FrozenWeight::Quant(q) if device.is_cpu() => Ok(FrozenWeight::Quant(q.clone())),
            FrozenWeight::Quant(q) => Err(Error::Model(format!(
                "{} weights are kept on the CPU only; load with --dtype bf16 for {device:?}",
                q.kind().name()
            ))),
        }
    }
}

/// What the matrix products with compact (bf16, f16, quantized) frozen weights compute in: `--compute-dtype`
/// or `FEDSB_COMPUTE_DTYPE`. Activations, gradients, adapters and f32 weights stay f32 in every mode; only the
/// GEMM inputs change.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ComputeDtype {
    /// bf16 GEMMs (inputs rounded to bf16, f32 accumulation) where the CPU has bf16 units that beat its f32
    /// GEMM (AMX through MKL; AVX-512 BF16 on AMD, see [`crate::bf16_gemm::beats_f32`]), else f32.
    #[default]
    Auto,
    /// f32 GEMMs: compact weights are dequantized to f32 tiles.
    F32,
    /// bf16 GEMMs; an error on a CPU without bf16 units.
    Bf16,
}

impl std::str::FromStr for ComputeDtype {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(ComputeDtype::Auto),
            "f32" => Ok(ComputeDtype::F32),
            "bf16" => Ok(ComputeDtype::Bf16),
            other => Err(Error::Config(format!("--compute-dtype `{other}` is not supported (auto, f32, bf16)"))),
        }
    }
}

static COMPUTE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(u8::MAX);

/// Sets the process's [`ComputeDtype`]. `Bf16` on a CPU without bf16 units is an error (nothing changes).
pub fn set_compute_dtype(c: ComputeDtype) -> Result<()> {
    if c == ComputeDtype::Bf16 && bf16_units().is_none() {
        return Err(Error::Config(
            "--compute-dtype bf16: this CPU has no bf16 units (AMX or AVX-512 BF16); use auto or f32".into(),
        ));
    }
    COMPUTE.store(c as u8, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

thread_local! {
    static COMPUTE_HERE: std::cell::Cell<Option<ComputeDtype>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with products on this thread computing in `c` (the choice is made on the calling thread of each
/// product, so the threads it spreads over follow): for comparing the modes in one process.
pub fn with_compute_dtype<R>(c: ComputeDtype, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<ComputeDtype>);
    impl Drop for Restore {
        fn drop(&mut self) {
            COMPUTE_HERE.with(|h| h.set(self.0));
        }
    }
    let _restore = Restore(COMPUTE_HERE.with(|h| h.replace(Some(c))));
    f()
}

/// The [`ComputeDtype`] in force on this thread: [`with_compute_dtype`]'s, else the process's (from
/// `FEDSB_COMPUTE_DTYPE` unless set; `auto` by default).
pub fn compute_dtype() -> ComputeDtype {
    use std::sync::atomic::Ordering;
    if let Some(c) = COMPUTE_HERE.with(|h| h.get()) {
        return c;
    }
    match COMPUTE.load(Ordering::Relaxed) {
        0 => ComputeDtype::Auto,
        1 => ComputeDtype::F32,
        2 => ComputeDtype::Bf16,
        _ => {
            let c = match std::env::var("FEDSB_COMPUTE_DTYPE") {
                Ok(v) => v.parse().unwrap_or_else(|e| {
                    tracing::warn!("FEDSB_COMPUTE_DTYPE: {e}; using auto");
                    ComputeDtype::Auto
                }),
                Err(_) => ComputeDtype::Auto,
            };
            let c = if c == ComputeDtype::Bf16 && bf16_units().is_none() { ComputeDtype::Auto } else { c };
            COMPUTE.store(c as u8, Ordering::Relaxed);
            c
        }
    }
}

/// The bf16 matrix units of this CPU the kernels can use: `"AMX"` (through MKL's `cblas_gemm_bf16bf16f32`,
/// where MKL is loaded), `"AVX-512 BF16"` (fedsb's own kernel), or none.
pub fn bf16_units() -> Option<&'static str> {
    if crate::kernels::amx_bf16_available() {
        Some("AMX")
    } else if crate::bf16_gemm::available() {
        Some("AVX-512 BF16")
    } else {
        None
    }
}

/// Bytes of frozen weights by format, for reports (`weight_bytes`).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct WeightBytes {
    /// Total bytes of the frozen matrices.
    pub total: usize,
    /// Bytes per format name.
    pub by_format: std::collections::BTreeMap<String, usize>,
}

impl WeightBytes {
    /// Adds one weight.
    pub fn add(&mut self, w: &FrozenWeight) {
        self.add_bytes(w.format().name(), w.bytes());
    }

    /// Adds `bytes` of `format`.
    pub fn add_bytes(&mut self, format: &str, bytes: usize) {
        self.total += bytes;
        *self.by_format.entry(format.to_string()).or_default() += bytes;
    }

    /// `"2.47 GB (bf16 2.47 GB)"`.
    pub fn describe(&self) -> String {
        let parts: Vec<String> =
            self.by_format.iter().map(|(f, b)| format!("{f} {}", crate::comm::human_bytes(*b as u64))).collect();
        format!("{} ({})", crate::comm::human_bytes(self.total as u64), parts.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn randn(rows: usize, cols: usize) -> Tensor {
        Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu).unwrap()
    }

    #[test]
    fn formats_parse_by_name_and_unknown_ones_list_the_supported() {
        assert_eq!("bf16".parse::<WeightFormat>().unwrap(), WeightFormat::Bf16);
        assert_eq!("Q4_K".parse::<WeightFormat>().unwrap(), WeightFormat::Quant(QuantKind::Q4K));
        assert_eq!("auto".parse::<WeightDtype>().unwrap(), WeightDtype::Auto);
        let e = "q3_0".parse::<WeightDtype>().unwrap_err().to_string();
        assert!(e.contains("q3_0") && e.contains("q8_0") && e.contains("bf16") && e.contains("auto"), "{e}");
    }

    #[test]
    fn conversions_keep_values_to_the_formats_precision_and_refuse_what_cannot_be() {
        let t = randn(4, 64);
        let w = FrozenWeight::dense("w", t.clone()).unwrap();
        assert_eq!(w.format(), WeightFormat::F32);
        assert_eq!(w.bytes(), 4 * 64 * 4);
        let b = w.convert("w", WeightFormat::Bf16).unwrap();
        assert_eq!((b.format(), b.bytes()), (WeightFormat::Bf16, 4 * 64 * 2));
        let back = b.to_f32(&Device::Cpu).unwrap();
        let rel = ((&back - &t).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap())
            / t.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(rel < 1.0 / 256.0, "bf16 relative error {rel}");
        let q = b.convert("w", WeightFormat::Quant(QuantKind::Q8_0)).unwrap();
        assert_eq!(q.bytes(), 4 * 64 / 32 * 34);
        // Same format: shared storage.
        assert!(q.convert("w", WeightFormat::Quant(QuantKind::Q8_0)).unwrap().same_storage(&q));
        // Block format to block format: refused by name.
        let e = q.convert("blk.0.w", WeightFormat::Quant(QuantKind::Q4_0)).unwrap_err().to_string();
        assert!(e.contains("blk.0.w") && e.contains("q8_0") && e.contains("q4_0"), "{e}");
        // Rows that do not split into whole blocks: refused.
        let odd = FrozenWeight::dense("odd", randn(2, 48)).unwrap();
        assert!(odd.convert("odd", WeightFormat::Quant(QuantKind::Q4_0)).is_err());
        // A block format back to f32 and bf16.
        assert_eq!(q.convert("w", WeightFormat::F32).unwrap().format(), WeightFormat::F32);
        assert_eq!(q.convert("w", WeightFormat::Bf16).unwrap().format(), WeightFormat::Bf16);
    }

    #[test]
    fn embedding_lookups_agree_across_formats() {
        let t = randn(10, 64);
        let ids = Tensor::new(&[[3u32, 0], [9, 3]], &Device::Cpu).unwrap();
        let reference = t.embedding(&ids.flatten_all().unwrap()).unwrap().reshape((2, 2, 64)).unwrap();
        for fmt in ["f32", "bf16", "f16", "q8_0"] {
            let w = FrozenWeight::dense("e", t.clone()).unwrap().convert("e", fmt.parse().unwrap()).unwrap();
            let e = w.embedding(&ids).unwrap();
            assert_eq!(e.dims(), &[2, 2, 64]);
            let d = (&e - &reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 0.05, "{fmt}: {d}");
        }
        let w = FrozenWeight::dense("e", t).unwrap().convert("e", "q8_0".parse().unwrap()).unwrap();
        assert!(w.embedding(&Tensor::new(&[10u32], &Device::Cpu).unwrap()).is_err());
    }
}
