//! Shared helpers of fedsb's end-to-end tests: where the real models and datasets are
//! (`scripts/fetch-assets.sh` puts them in `$FEDSB_ASSETS`, default `~/.cache/fedsb/assets`).
//!
//! Tests that need them call [`assets`]: when the assets are missing the test is skipped with a message,
//! unless `FEDSB_REQUIRE_ASSETS=1` (CI sets it), in which case it fails.
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
    eprintln!("SKIPPED: {msg}");
    None
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
