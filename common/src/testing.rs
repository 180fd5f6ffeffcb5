//! How a unit test that cannot run its check says so (test builds only). A skip is not a pass: the test
//! prints one line `SKIPPED: <reason> (<test>)` to stderr and appends it to the file `$FEDSB_SKIP_LOG` names,
//! where `.ci/run` counts and prints every such line (`cargo test` hides the output of passing tests). Where a
//! prerequisite must be there (CI installs MKL itself), an environment variable turns the skip into a failure.
//! `fedsb-tests` (tests/lib.rs) writes the same lines for the end-to-end tests.
use std::io::Write;

/// Records that the calling test did not run (all of) its check, for `reason`.
pub(crate) fn skipped(reason: &str) {
    let thread = std::thread::current();
    let line = match thread.name() {
        Some(test) if test != "main" => format!("SKIPPED: {reason} ({test})"),
        _ => format!("SKIPPED: {reason}"),
    };
    eprintln!("{line}");
    if let Some(log) = std::env::var_os("FEDSB_SKIP_LOG").filter(|p| !p.is_empty()) {
        let written =
            std::fs::OpenOptions::new().create(true).append(true).open(&log).and_then(|mut f| writeln!(f, "{line}"));
        // A skip that cannot be counted would be a silent one.
        if let Err(e) = written {
            panic!("{line}; and FEDSB_SKIP_LOG={} could not be written: {e}", log.to_string_lossy());
        }
    }
}

/// Fails the calling test when the environment variable `require` is `1`: `reason` is then a failure.
pub(crate) fn fail_if_required(require: &str, reason: &str) {
    if std::env::var(require).is_ok_and(|v| v == "1") {
        panic!("{reason}; {require}=1 makes this a failure");
    }
}

/// [`skipped`], or a failure when the environment variable `require` is `1`.
pub(crate) fn skip_unless_required(require: &str, reason: &str) {
    fail_if_required(require, reason);
    skipped(reason);
}

/// The loaded MKL with `cblas_gemm_bf16bf16f32` where `bf16`, or why not. A failure instead when
/// `FEDSB_REQUIRE_MKL=1` (`.ci/run` sets it where scripts/fetch-assets.sh fetches MKL), or when
/// scripts/fetch-assets.sh unpacked MKL here and `FEDSB_GEMM` does not say `faer`.
pub(crate) fn mkl_or_why(bf16: bool) -> Result<&'static crate::mkl::Mkl, String> {
    let why = match crate::mkl::load() {
        Ok(m) if !bf16 || m.has_gemm_bf16() => return Ok(m),
        Ok(m) => format!("MKL {} has no cblas_gemm_bf16bf16f32", m.version()),
        Err(why) => format!("MKL did not load: {why}"),
    };
    let unpacked = crate::mkl::mkl_dir().join(".sha256").is_file()
        && cfg!(all(target_os = "linux", target_arch = "x86_64"))
        && std::env::var("FEDSB_GEMM").map_or(true, |v| v != "faer");
    if unpacked {
        panic!("{why}, though scripts/fetch-assets.sh unpacked it in {}", crate::mkl::mkl_dir().display());
    }
    fail_if_required("FEDSB_REQUIRE_MKL", &why);
    Err(why)
}

/// [`mkl_or_why`], or `None` after a skip saying that `what` was not tested.
pub(crate) fn mkl_or_skip(bf16: bool, what: &str) -> Option<&'static crate::mkl::Mkl> {
    mkl_or_why(bf16).map_err(|why| skipped(&format!("{what} ({why})"))).ok()
}
