//! Where `scripts/fetch-assets.sh` puts the real small models and data: `$FEDSB_ASSETS`, else
//! `~/.cache/fedsb/assets`. The binaries' defaults and the real-model tests read it from here.
use std::path::PathBuf;

/// The asset folder: `$FEDSB_ASSETS`, else `$HOME/.cache/fedsb/assets`.
pub fn default_assets_dir() -> PathBuf {
    match std::env::var_os("FEDSB_ASSETS") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/fedsb/assets"),
    }
}
