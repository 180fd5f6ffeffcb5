//! ARCHITECTURE.md is the map of the code: every Rust source file of the workspace (not `vendor/`) must be
//! named in it, so a module added without a line in the map fails here.
//!
//! A file counts as named when the map holds its path from its crate's `src/` (or the crate root), e.g.
//! `coordinator/events.rs`, or its file name (`events.rs`), or — for a kernel or model module listed by name —
//! its stem in backticks (`` `lora_sb` ``). A `mod.rs` counts as named by its folder (`coordinator/`).
use std::path::{Path, PathBuf};

/// The workspace root (this crate is `tests/`).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// Every `.rs` file under `dir`, recursively.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Whether the map names `file`, whose path below its crate's source folder is `rel`.
fn named(map: &str, rel: &Path) -> bool {
    let rel_s = rel.to_string_lossy().replace('\\', "/");
    let name = rel.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let stem = rel.file_stem().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if name == "mod.rs" {
        let dir = rel.parent().and_then(|d| d.file_name()).map(|d| d.to_string_lossy().into_owned());
        return dir.is_some_and(|d| map.contains(&format!("{d}/")));
    }
    map.contains(&rel_s) || map.contains(&name) || map.contains(&format!("`{stem}`"))
}

#[test]
fn architecture_map_names_every_source_file() {
    let root = root();
    let map = std::fs::read_to_string(root.join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let mut missing = Vec::new();
    let mut checked = 0;
    for (crate_dir, sub) in [
        ("common", "src"),
        ("common", "tests"),
        ("common", "examples"),
        ("server", "src"),
        ("server", "tests"),
        ("client", "src"),
        ("client", "tests"),
        ("proto", "src"),
        ("tests", ""),
    ] {
        let base = root.join(crate_dir).join(sub);
        let mut files = Vec::new();
        rust_files(&base, &mut files);
        for f in files {
            // The tests crate's data folder holds no Rust; `build.rs` files are build scripts.
            let rel = f.strip_prefix(&base).expect("below its base").to_path_buf();
            if rel.file_name().is_some_and(|n| n == "build.rs") {
                continue;
            }
            checked += 1;
            if !named(&map, &rel) {
                missing.push(format!("{crate_dir}/{sub}/{}", rel.display()).replace("//", "/"));
            }
        }
    }
    assert!(checked > 100, "only {checked} source files found under {}: wrong root?", root.display());
    assert!(missing.is_empty(), "ARCHITECTURE.md does not name these source files: {missing:?}");
}

#[test]
fn a_file_missing_from_the_map_is_found() {
    let map = "`kernels/` — `lora_sb`, `gemm`; `events.rs`; `store/mem.rs`";
    assert!(named(map, Path::new("kernels/lora_sb.rs")));
    assert!(named(map, Path::new("kernels/mod.rs")));
    assert!(named(map, Path::new("coordinator/events.rs")));
    assert!(!named(map, Path::new("kernels/lora_sb_bf16.rs")));
    assert!(!named(map, Path::new("coordinator/mod.rs")));
    assert!(!named(map, Path::new("sweep/chart.rs")));
}
