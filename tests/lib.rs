//! Shared helpers of fedsb's end-to-end tests: where the real models and datasets are
//! (`scripts/fetch-assets.sh` puts them in `$FEDSB_ASSETS`, default `~/.cache/fedsb/assets`).
//!
//! Tests that need them call [`assets`]: when the assets are missing the test is skipped with a message,
//! unless `FEDSB_REQUIRE_ASSETS=1` (CI sets it), in which case it fails.
//!
//! A skip is not a pass: [`skipped`] prints one `SKIPPED: <reason> (<test>)` line and appends it to the file
//! `$FEDSB_SKIP_LOG` names, where `.ci/run` counts them (as fedsb-common's unit tests do, in its `testing`).
use std::io::Write;
use std::path::{Path, PathBuf};

/// Paths of the fetched assets.
pub struct Assets {
    /// The asset root.
    pub root: PathBuf,
}

impl Assets {
    /// all-MiniLM-L6-v2, a Hugging Face folder.
    pub fn minilm(&self) -> PathBuf {
        self.root.join("models/all-minilm-l6-v2")
    }
    /// SmolLM2-135M-Instruct, a GGUF file.
    pub fn smollm_gguf(&self) -> PathBuf {
        self.root.join("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
    }
    /// A dataset file under `data/`.
    pub fn data(&self, rel: &str) -> PathBuf {
        self.root.join("data").join(rel)
    }
}

/// The asset root: `$FEDSB_ASSETS`, else `$HOME/.cache/fedsb/assets`.
pub fn assets_root() -> PathBuf {
    fedsb_common::assets::default_assets_dir()
}

/// The assets, or `None` (test skipped) when they are missing and not required.
pub fn assets() -> Option<Assets> {
    let root = assets_root();
    let a = Assets { root };
    let present = a.minilm().join("model.safetensors").is_file()
        && a.smollm_gguf().is_file()
        && a.data("gsm8k/eval.jsonl").is_file();
    if present {
        return Some(a);
    }
    let msg = format!("real-model assets missing under {} (run scripts/fetch-assets.sh)", a.root.display());
    if std::env::var("FEDSB_REQUIRE_ASSETS").is_ok_and(|v| v == "1") {
        panic!("{msg}; FEDSB_REQUIRE_ASSETS=1 makes this a failure");
    }
    skipped(&msg);
    None
}

/// Records that the calling test did not run (all of) its check, for `reason`: one line to stderr and to the
/// file `$FEDSB_SKIP_LOG` names, if set (a log that cannot be written fails the test).
pub fn skipped(reason: &str) {
    let thread = std::thread::current();
    let line = match thread.name() {
        Some(test) if test != "main" => format!("SKIPPED: {reason} ({test})"),
        _ => format!("SKIPPED: {reason}"),
    };
    eprintln!("{line}");
    if let Some(log) = std::env::var_os("FEDSB_SKIP_LOG").filter(|p| !p.is_empty()) {
        let written =
            std::fs::OpenOptions::new().create(true).append(true).open(&log).and_then(|mut f| writeln!(f, "{line}"));
        if let Err(e) = written {
            panic!("{line}; and FEDSB_SKIP_LOG={} could not be written: {e}", log.to_string_lossy());
        }
    }
}

/// Largest absolute difference between two equally shaped tensors, relative to the largest magnitude of
/// `reference`.
pub fn rel_max_diff(a: &candle_core::Tensor, reference: &candle_core::Tensor) -> f32 {
    let d = (a - reference)
        .and_then(|d| d.abs())
        .and_then(|d| d.max_all())
        .and_then(|d| d.to_scalar::<f32>())
        .expect("diff");
    let m = reference.abs().and_then(|d| d.max_all()).and_then(|d| d.to_scalar::<f32>()).expect("max");
    d / m.max(f32::MIN_POSITIVE)
}

/// A fresh temporary folder.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// Whether `p` exists (for readable asserts).
pub fn exists(p: &Path) -> bool {
    p.exists()
}

/// Writes a copy of the GGUF file `src` to `dst` with every tensor re-encoded in the type `choose(name, shape)`
/// returns (from its values as stored: a real checkpoint in another GGUF format), metadata unchanged.
pub fn rewrite_gguf(
    src: &Path,
    dst: &Path,
    choose: impl Fn(&str, &[usize]) -> candle_core::quantized::GgmlDType,
) -> candle_core::Result<()> {
    use candle_core::quantized::{QTensor, gguf_file};
    let mut f = std::fs::File::open(src)?;
    let ct = gguf_file::Content::read(&mut f)?;
    let mut names: Vec<&String> = ct.tensor_infos.keys().collect();
    names.sort();
    let mut tensors = Vec::new();
    for name in names {
        let t = ct.tensor(&mut f, name, &candle_core::Device::Cpu)?.dequantize(&candle_core::Device::Cpu)?;
        let q = QTensor::quantize(&t, choose(name, t.dims()))?;
        tensors.push((name.clone(), q));
    }
    let md: Vec<(&str, &gguf_file::Value)> = ct.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tv: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, q)| (n.as_str(), q)).collect();
    let mut out = std::fs::File::create(dst)?;
    gguf_file::write(&mut out, &md, &tv)
}

/// Writes a copy of the Hugging Face folder `src` into `dst` with every float tensor of its safetensors in
/// `dtype` (a real checkpoint as bf16 or f16), the other files copied.
pub fn rewrite_hf_folder(src: &Path, dst: &Path, dtype: candle_core::DType) -> candle_core::Result<()> {
    std::fs::create_dir_all(dst)?;
    for e in std::fs::read_dir(src)? {
        let p = e?.path();
        let name = p.file_name().expect("a file name").to_owned();
        if p.extension().is_some_and(|x| x == "safetensors") {
            let ts = candle_core::safetensors::load(&p, &candle_core::Device::Cpu)?;
            let conv: std::collections::HashMap<String, candle_core::Tensor> = ts
                .into_iter()
                .map(|(k, t)| {
                    let t = if t.dtype().is_float() { t.to_dtype(dtype)? } else { t };
                    Ok((k, t))
                })
                .collect::<candle_core::Result<_>>()?;
            candle_core::safetensors::save(&conv, dst.join(name))?;
        } else if p.is_file() {
            std::fs::copy(&p, dst.join(name))?;
        }
    }
    Ok(())
}
