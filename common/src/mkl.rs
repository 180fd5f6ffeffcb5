//! Intel oneMKL's single-precision GEMM (`cblas_sgemm`), loaded at run time where its libraries are present:
//! the GEMM backend of [`crate::kernels`] when it can be loaded, faer's otherwise.
//!
//! Why: GEMM is two thirds of a training step, and on the x86 machines we measure MKL's sgemm is about 1.25×
//! faer's (2-core Sapphire Rapids, MiniLM/SmolLM2 linear shapes: 290–340 against 220–265 GFLOP/s). PyTorch's
//! CPU wheels link the same library. Nothing is linked at build time: `scripts/fetch-assets.sh` unpacks the
//! pinned `mkl` wheel's libraries into `<assets>/mkl`, and this module loads `libmkl_rt.so.3` from there (libloading)
//! (or from `$FEDSB_MKL_DIR`). Without them every GEMM runs on faer, with the same results to float tolerance.
//!
//! `FEDSB_GEMM=faer` forces faer; `FEDSB_GEMM=mkl` asks for MKL and warns when it cannot be loaded; unset (or
//! `auto`) uses MKL where it loads. MKL runs sequentially (`MKL_Set_Threading_Layer(SEQUENTIAL)`): the callers
//! split a GEMM over rayon's threads themselves, so MKL brings no OpenMP runtime of its own.
use std::ffi::{c_char, c_int, c_void};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The GEMM implementation the kernels use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmBackend {
    /// faer's matmul (always available).
    Faer,
    /// Intel oneMKL's `cblas_sgemm`, loaded at run time.
    Mkl,
}

impl GemmBackend {
    /// The name printed by the benches (`faer`, `mkl`).
    pub fn name(self) -> &'static str {
        match self {
            GemmBackend::Faer => "faer",
            GemmBackend::Mkl => "mkl",
        }
    }
}

/// The MKL libraries the loader needs in one folder: the runtime dispatcher, the LP64 interface, the
/// sequential threading layer, the core and every CPU-specific kernel library (MKL exits the process when the
/// one it picks for the CPU is missing, so all must be there before it is loaded).
pub const MKL_LIBRARIES: &[&str] = &[
    "libmkl_rt.so.3",
    "libmkl_intel_lp64.so.3",
    "libmkl_sequential.so.3",
    "libmkl_core.so.3",
    "libmkl_def.so.3",
    "libmkl_mc3.so.3",
    "libmkl_avx2.so.3",
    "libmkl_avx512.so.3",
    "libmkl_avx10.so.3",
];

type SgemmFn = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    f32,
    *const f32,
    c_int,
    *const f32,
    c_int,
    f32,
    *mut f32,
    c_int,
);

type Bf16GemmFn = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    f32,
    *const u16,
    c_int,
    *const u16,
    c_int,
    f32,
    *mut f32,
    c_int,
);

/// A loaded MKL: its `cblas_sgemm`, its `cblas_gemm_bf16bf16f32` where the library has it, and its version.
pub struct Mkl {
    sgemm: SgemmFn,
    gemm_bf16: Option<Bf16GemmFn>,
    version: String,
}

// SAFETY: the function pointer is into a library that is never unloaded; MKL's sequential sgemm is thread-safe.
unsafe impl Send for Mkl {}
unsafe impl Sync for Mkl {}

const CBLAS_ROW_MAJOR: c_int = 101;
const CBLAS_NO_TRANS: c_int = 111;
const CBLAS_TRANS: c_int = 112;
const MKL_THREADING_SEQUENTIAL: c_int = 1;
const MKL_INTERFACE_LP64: c_int = 0;

static LOADED: OnceLock<Result<Mkl, String>> = OnceLock::new();

/// The folder MKL is loaded from: `$FEDSB_MKL_DIR`, else `<assets>/mkl`.
pub fn mkl_dir() -> PathBuf {
    match std::env::var_os("FEDSB_MKL_DIR") {
        Some(d) => PathBuf::from(d),
        None => crate::assets::default_assets_dir().join("mkl"),
    }
}

/// `FEDSB_GEMM`: `None` for faer only, `Some(required)` to load MKL (`required` when asked for by name).
fn wanted() -> Option<bool> {
    match std::env::var("FEDSB_GEMM").ok().as_deref().map(str::trim) {
        Some("faer") => None,
        Some("mkl") => Some(true),
        None | Some("" | "auto") => Some(false),
        Some(other) => {
            tracing::warn!("FEDSB_GEMM={other} is not one of faer, mkl, auto; using auto");
            Some(false)
        }
    }
}

/// The loaded MKL, or why there is none (not wanted, files missing, `dlopen` failed).
pub fn load() -> &'static Result<Mkl, String> {
    LOADED.get_or_init(|| {
        let required = match wanted() {
            None => return Err("FEDSB_GEMM=faer".into()),
            Some(r) => r,
        };
        let r = load_from(&mkl_dir());
        if let (true, Err(e)) = (required, &r) {
            tracing::warn!("FEDSB_GEMM=mkl, but MKL could not be loaded ({e}); GEMMs run on faer");
        }
        r
    })
}

/// The GEMM backend in use.
pub fn backend() -> GemmBackend {
    if load().is_ok() { GemmBackend::Mkl } else { GemmBackend::Faer }
}

/// A one-line description of the backend in use (for bench output): `mkl 2026.2 (<dir>)` or `faer (<why>)`.
pub fn describe() -> String {
    match load() {
        Ok(m) => format!("mkl ({})", m.version),
        Err(why) => format!("faer (no MKL: {why})"),
    }
}

#[cfg(target_os = "linux")]
fn load_from(dir: &Path) -> Result<Mkl, String> {
    if let Some(missing) = MKL_LIBRARIES.iter().find(|f| !dir.join(f).is_file()) {
        return Err(format!("{} not found (scripts/fetch-assets.sh unpacks it)", dir.join(missing).display()));
    }
    let path = dir.join("libmkl_rt.so.3");
    // SAFETY: loading MKL runs its initializers, which have no preconditions; the library is never unloaded
    // (forgotten below), so the function pointers stay valid for the life of the process. Symbols are
    // transmuted to their documented C signatures.
    unsafe {
        let lib = libloading::os::unix::Library::open(Some(&path), libc::RTLD_NOW | libc::RTLD_LOCAL).map_err(|e| {
            let why = std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_else(|| e.to_string());
            format!("dlopen {}: {why}", path.display())
        })?;
        let sym = |name: &str| -> Result<*mut c_void, String> {
            match lib.get::<*mut c_void>(name.as_bytes()) {
                Ok(p) if !(*p).is_null() => Ok(*p),
                _ => Err(format!("{name} not in {}", path.display())),
            }
        };
        let set_layer: unsafe extern "C" fn(c_int) -> c_int = std::mem::transmute(sym("MKL_Set_Threading_Layer")?);
        let set_iface: unsafe extern "C" fn(c_int) -> c_int = std::mem::transmute(sym("MKL_Set_Interface_Layer")?);
        let get_version: unsafe extern "C" fn(*mut c_char, c_int) = std::mem::transmute(sym("MKL_Get_Version_String")?);
        let sgemm: SgemmFn = std::mem::transmute(sym("cblas_sgemm")?);
        let gemm_bf16: Option<Bf16GemmFn> = sym("cblas_gemm_bf16bf16f32").ok().map(|p| std::mem::transmute(p));
        if set_iface(MKL_INTERFACE_LP64) != MKL_INTERFACE_LP64 {
            return Err("MKL refused the LP64 interface".into());
        }
        if set_layer(MKL_THREADING_SEQUENTIAL) != MKL_THREADING_SEQUENTIAL {
            return Err("MKL refused the sequential threading layer".into());
        }
        let mut buf = [0 as c_char; 256];
        get_version(buf.as_mut_ptr(), buf.len() as c_int);
        buf[buf.len() - 1] = 0;
        let full = std::ffi::CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned();
        // "Intel(R) oneAPI Math Kernel Library Version 2026.2-Product Build ..." -> "2026.2"
        let version =
            full.split("Version ").nth(1).and_then(|v| v.split(['-', ' ']).next()).unwrap_or(full.as_str()).to_string();
        std::mem::forget(lib);
        let m = Mkl { sgemm, gemm_bf16, version };
        // A first call checks the library works: [1 2; 3 4]·I.
        let (a, b, mut c) = ([1f32, 2., 3., 4.], [1f32, 0., 0., 1.], [0f32; 4]);
        m.sgemm_rm(2, 2, 2, 1.0, a.as_ptr(), (2, false), b.as_ptr(), (2, false), 0.0, c.as_mut_ptr(), 2);
        crate::simd::clear_upper_simd_state();
        if c != a {
            return Err(format!("MKL's sgemm self-check failed: {c:?}"));
        }
        Ok(m)
    }
}

#[cfg(not(target_os = "linux"))]
fn load_from(_dir: &Path) -> Result<Mkl, String> {
    Err("run-time loading of MKL is implemented on Linux only".into())
}

impl Mkl {
    /// The library's version (`2026.2`).
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Row-major `c (m×n, ldc) = alpha·op(a)·op(b) + beta·c`; `(ld, trans)` per operand as in CBLAS.
    ///
    /// # Safety
    /// The pointers must address the matrices the dimensions, leading dimensions and transposes describe.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn sgemm_rm(
        &self,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: *const f32,
        (lda, ta): (usize, bool),
        b: *const f32,
        (ldb, tb): (usize, bool),
        beta: f32,
        c: *mut f32,
        ldc: usize,
    ) {
        let t = |x: bool| if x { CBLAS_TRANS } else { CBLAS_NO_TRANS };
        // SAFETY: the caller vouches for the pointers; dimensions were checked to fit c_int by `operand`.
        unsafe {
            (self.sgemm)(
                CBLAS_ROW_MAJOR,
                t(ta),
                t(tb),
                m as c_int,
                n as c_int,
                k as c_int,
                alpha,
                a,
                lda as c_int,
                b,
                ldb as c_int,
                beta,
                c,
                ldc as c_int,
            )
        }
    }
}

impl Mkl {
    /// Whether the library has `cblas_gemm_bf16bf16f32`.
    pub fn has_gemm_bf16(&self) -> bool {
        self.gemm_bf16.is_some()
    }

    /// Row-major `c (m×n, ldc) = alpha·op(a)·op(b) + beta·c` with bf16 `a` and `b` (bit patterns) and f32
    /// accumulation (`cblas_gemm_bf16bf16f32`; on CPUs with AMX it runs on the tile units). Does nothing and
    /// returns `false` when the library lacks the function.
    ///
    /// # Safety
    /// As [`Mkl::sgemm_rm`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemm_bf16_rm(
        &self,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: *const u16,
        (lda, ta): (usize, bool),
        b: *const u16,
        (ldb, tb): (usize, bool),
        beta: f32,
        c: *mut f32,
        ldc: usize,
    ) -> bool {
        let Some(f) = self.gemm_bf16 else { return false };
        let t = |x: bool| if x { CBLAS_TRANS } else { CBLAS_NO_TRANS };
        // SAFETY: the caller vouches for the pointers and sizes.
        unsafe {
            f(
                CBLAS_ROW_MAJOR,
                t(ta),
                t(tb),
                m as c_int,
                n as c_int,
                k as c_int,
                alpha,
                a,
                lda as c_int,
                b,
                ldb as c_int,
                beta,
                c,
                ldc as c_int,
            )
        };
        true
    }
}

/// Whether the CPU reports AMX bf16 tile units (CPUID leaf 7, EDX bit 22). Rust's feature detection for AMX is
/// not stable yet, so the bit is read directly.
pub fn cpu_has_amx_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // Detected once (every product asks; CPUID traps to the hypervisor in a VM). CPUID is available on every
        // x86-64; leaf 7 exists when the maximum leaf (leaf 0's EAX) ≥ 7.
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            let max = std::arch::x86_64::__cpuid(0).eax;
            max >= 7 && (std::arch::x86_64::__cpuid_count(7, 0).edx >> 22) & 1 == 1
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// CBLAS's description `(ld, transposed)` of a `rows × cols` operand with strides `(rs, cs)`, if it has one:
/// unit column stride (row-major, `ld = rs`) or unit row stride (a transposed row-major matrix, `ld = cs`).
pub fn operand(rows: usize, cols: usize, rs: usize, cs: usize) -> Option<(usize, bool)> {
    let fits = |v: usize| v <= c_int::MAX as usize;
    if !(fits(rows) && fits(cols) && fits(rs) && fits(cs)) {
        return None;
    }
    if cs == 1 && rs >= cols.max(1) {
        Some((rs, false))
    } else if rs == 1 && cs >= rows.max(1) {
        Some((cs, true))
    } else if rows <= 1 && cs == 1 {
        Some((cols.max(1), false))
    } else if cols <= 1 && rs == 1 {
        Some((rows.max(1), true))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operands_get_cblas_layouts_only_where_they_have_one() {
        // Row-major (unit column stride) and transposed (unit row stride) matrices.
        assert_eq!(operand(4, 3, 3, 1), Some((3, false)));
        assert_eq!(operand(4, 3, 5, 1), Some((5, false)), "padded rows");
        assert_eq!(operand(4, 3, 1, 4), Some((4, true)));
        // A leading dimension shorter than a row is not a CBLAS matrix.
        assert_eq!(operand(4, 3, 2, 1), None);
        assert_eq!(operand(4, 3, 1, 3), None);
        // Neither stride is 1: no CBLAS layout (faer takes it).
        assert_eq!(operand(4, 3, 6, 2), None);
        // One row or one column: any stride of the unit dimension.
        assert_eq!(operand(1, 3, 0, 1), Some((3, false)));
        assert_eq!(operand(4, 1, 1, 0), Some((4, true)));
        // Sizes beyond CBLAS's 32-bit ints.
        assert_eq!(operand(1 << 31, 1, 1, 1 << 31), None);
    }

    /// The names are the values `FEDSB_GEMM` takes, one per backend, and [`describe`] begins with the name of
    /// the backend in use: MKL's version where it loaded, why not otherwise. Where MKL must load (CI, or
    /// scripts/fetch-assets.sh unpacked it) the backend in use is MKL.
    #[test]
    fn backend_names_are_distinct_and_describe_names_the_one_in_use() {
        let all = [GemmBackend::Faer, GemmBackend::Mkl];
        for b in all {
            // The name is the variant's, as FEDSB_GEMM spells it.
            assert_eq!(b.name(), format!("{b:?}").to_lowercase());
        }
        assert_ne!(all[0].name(), all[1].name());
        let (used, text) = (backend(), describe());
        assert_eq!(used == GemmBackend::Mkl, load().is_ok(), "backend() disagrees with load()");
        assert!(text.starts_with(&format!("{} (", used.name())), "{text:?} does not name {used:?}");
        match load() {
            Ok(m) => {
                assert!(!m.version().is_empty() && text.contains(m.version()), "{text:?}");
                assert!(m.version().chars().next().is_some_and(|c| c.is_ascii_digit()), "version {:?}", m.version());
            }
            Err(why) => assert!(text.contains(why.as_str()), "{text:?} does not say why: {why}"),
        }
        if crate::testing::mkl_or_skip(false, "describe() was NOT checked with MKL loaded").is_some() {
            assert_eq!(used, GemmBackend::Mkl);
        }
    }
}
