//! bf16 × bf16 → f32 matrix products on AVX-512 BF16 (`vdpbf16ps`), single-threaded.
//!
//! `C (m×n) = [C +] A·B` with A (the activations, m×k) in bf16 — or in f32, converted while it is packed — and B
//! (a weight tile, k×n) packed once into a [`PackedB`]; C is f32. On CPUs with AVX-512 BF16 (Intel Cooper Lake,
//! Sapphire Rapids and later; AMD Zen 4 and later) `vdpbf16ps` multiplies 32 bf16 pairs and adds them into 16 f32
//! lanes per instruction, twice the multiply-adds of an f32 FMA: on a Zen 4 core this GEMM runs at about twice
//! the rate of the best f32 GEMMs. The caller splits work between threads (by column panels of C, each thread
//! with its own [`PackedB`]); nothing here is shared between threads but read-only data.
//!
//! # Use
//! Check [`available`] once. Pack B with one of [`PackedB`]'s constructors (`from_f32_transposed` for the
//! forward `x·Wᵀ` with T = rows of W, `from_f32` for `dy·W`, the `from_bf16*` twins for bf16 weights, and the
//! `repack_*` methods to reuse an allocation), then call [`gemm`] (bf16 A) or [`gemm_f32a`] (f32 A). Where
//! [`available`] is false the same calls run a plain scalar loop (correct, slow); callers should use an f32
//! GEMM there instead.
//!
//! # Precision
//! Inputs are rounded to bf16 (8 significant bits) by [`f32_to_bf16`]: round to nearest, ties to even; NaN stays
//! NaN (quieted), ±∞ stays ±∞, and f32 denormals (|x| < 2⁻¹²⁶) become ±0, as `vcvtne2ps2bf16` does — the scalar
//! path matches it bit for bit, so the rounding does not depend on the CPU. The product of two bf16 values is
//! exact in f32; `vdpbf16ps` adds a pair's two products into the f32 accumulator one at a time, each add rounded
//! to nearest even (it ignores MXCSR), so the result is an f32 sum of exact products: against the exact sum of the
//! bf16-rounded inputs the error is at most about `(k + 1)·2⁻²⁴·Σ|a·b|` (what the tests allow), in practice a
//! few `2⁻²⁴·√k·Σ|a·b|`. `vdpbf16ps` treats bf16 denormal inputs as zero (checked by a test on Zen 4), flushes
//! denormal results to zero (values below 2⁻¹²⁶ ≈ 1.2e-38, far below anything training produces) and raises no
//! floating-point exceptions; the scalar fallback keeps denormals.
//! K is summed in blocks of [`KC`] (partial sums stored in C between blocks), so results can differ in the last
//! bits from a single-pass sum and between shapes of different k blocking, never between runs.
//!
//! # Design (see `kernel.rs` for the loops, `pack.rs` for the layouts)
//! - Microkernel: [`MR`]×[`NR`] = 12×32 of C in 24 zmm accumulators; per k pair it loads two 64-byte lines of B
//!   and broadcasts 12 32-bit pair words of A: 24 `vdpbf16ps` per 14 loads, 27 of the 32 zmm registers. Edge
//!   rows run the same kernel with fewer rows (1 to 11), edge columns use masked loads and stores of C; a panel of
//!   at most 16 columns runs a half-width kernel. With its operands in L1 it runs at one `vdpbf16ps` per cycle
//!   (234 GFLOP/s measured on a Zen 4 EPYC core).
//! - B ([`PackedB`]): panels of 32 columns; within a panel, for each pair of k (`2p`, `2p+1`), 32 u32 words
//!   `B[2p][j] | B[2p+1][j] << 16` (two 64-byte lines); zero-padded to whole pairs and whole panels, 64-byte aligned.
//! - A: packed per (row block, k block) into panels of 12 rows, each `[pair][row]` u32 words, so a kernel's
//!   broadcasts read one sequential stream (rows of A at a 4 KiB stride would also fight over L1 sets).
//! - Blocking: k is not split up to [`KC`] = 4096. The kernel's B micro-panel (64 bytes per element of k: 24 KiB
//!   at k = 384, 128 KiB at k = 2048) then lives in L2 rather than L1, and the 12-row A panel streams from L2 or
//!   L3; per k pair the kernel reads 128 bytes of B and 48 of A for 24 `vdpbf16ps` (about 24 cycles), a small
//!   part of L2's bandwidth, and each tile of C is written once. The textbook blocking (k blocks of 256 so that
//!   the B micro-panel sits in L1, C re-read and re-written per k block) measured slower on Zen 4: 136–212 against
//!   200–222 GFLOP/s, worst for the LM head, whose 100 MB C went through memory once per k block. Rows run in
//!   blocks of up to [`MC`] = 480 (the packed A block, at most 480 × 4096 bf16 = 3.75 MiB); B is read once per
//!   row block, from L3 (or memory: the LM head's 56 MiB B, in one pass since m ≤ MC).
//!
//! # Toolchain
//! The AVX-512 target features and intrinsics are stable from Rust 1.89 (the workspace's `rust-version`).

#[cfg(target_arch = "x86_64")]
mod kernel;
mod pack;
#[cfg(test)]
mod tests;

pub use pack::PackedB;

/// Rows of C per microkernel call (A rows broadcast per k pair).
pub const MR: usize = 12;
/// Columns of C per microkernel call, and the width of [`PackedB`]'s panels (two zmm of 16 f32).
pub const NR: usize = 32;
/// Most elements of k per block (even): k is split only past this, so that the kernel's B micro-panel
/// (`KC × NR` bf16, at most 256 KiB) stays in L2 (see the module docs for why not L1).
pub const KC: usize = 4096;
/// Most rows of A per block (a multiple of [`MR`]): B's k block is read once per row block.
pub const MC: usize = 480;

/// Whether this CPU runs the AVX-512 BF16 kernels (AVX-512 F, BW and BF16), detected once. Always `false`
/// off x86-64.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether this kernel beats an f32 GEMM on this CPU, so that `--compute-dtype auto` should use it: where it
/// is [`available`] and the CPU is not Intel's. AMD's Zen 4 and Zen 5 run `vdpbf16ps` at the rate of their
/// f32 FMAs, twice the multiply-adds (about 2× faer's f32 GEMM on a Zen 4 EPYC); Intel's AVX-512 cores issue
/// f32 FMAs on two ports and `vdpbf16ps` on one, so there this kernel measured 0.55–0.6× MKL's sgemm and a
/// Llama-3.2-1B step slower than on f32 tiles (Intel's bf16 speed is AMX, through MKL).
pub fn beats_f32() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // Detected once: CPUID is slow, and traps to the hypervisor in a VM.
        use std::sync::OnceLock;
        static BEATS: OnceLock<bool> = OnceLock::new();
        *BEATS.get_or_init(|| {
            // SAFETY: CPUID leaf 0 exists on every x86-64 CPU (the intrinsic is safe on newer toolchains).
            #[allow(unused_unsafe)]
            let id = unsafe { std::arch::x86_64::__cpuid(0) };
            let intel = (id.ebx, id.edx, id.ecx) == (0x756e_6547, 0x4965_6e69, 0x6c65_746e); // "GenuineIntel"
            available() && !intel
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// One f32 rounded to bf16 bits: nearest, ties to even; NaN stays NaN (quiet bit set, as `vcvtneps2bf16`),
/// ±∞ stays ±∞, f32 denormals become ±0 (as `vcvtneps2bf16`).
#[inline]
pub fn f32_to_bf16_one(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    if b & 0x7f80_0000 == 0 {
        // Zero or denormal: signed zero.
        return ((b >> 16) & 0x8000) as u16;
    }
    // Adding 0x7fff plus the lowest kept bit rounds to nearest with ties to even; a carry into the exponent is
    // the correct result (up to ∞ from the largest finite values).
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// bf16 bits to f32 (exact).
#[inline]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// `dst[i] = bf16(src[i])` as [`f32_to_bf16_one`], 32 at a time with `vcvtne2ps2bf16` where [`available`].
///
/// # Panics
/// If the lengths differ.
pub fn f32_to_bf16(src: &[f32], dst: &mut [u16]) {
    assert_eq!(src.len(), dst.len(), "f32_to_bf16: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: the CPU has AVX-512 F, BW and BF16 (checked just above).
        unsafe { kernel::f32_to_bf16_avx512(src, dst) };
        return;
    }
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = f32_to_bf16_one(s);
    }
}

/// `dst[i] = src[i]` widened from bf16 bits to f32 (exact; a NaN stays a NaN with its payload), 16 at a time
/// where the CPU has AVX-512 (half's slice conversion checks every element for NaN and does not vectorize).
///
/// # Panics
/// If the lengths differ.
pub fn bf16_to_f32_slice(src: &[u16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "bf16_to_f32_slice: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512 F (checked just above).
        unsafe { widen_avx512(src, dst) };
        return;
    }
    widen(src, dst);
}

#[inline(always)]
fn widen(src: &[u16], dst: &mut [f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = f32::from_bits(u32::from(s) << 16);
    }
}

/// [`widen`] compiled for AVX-512 (the loop vectorizes to 16-lane zero-extends and shifts).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn widen_avx512(src: &[u16], dst: &mut [f32]) {
    widen(src, dst);
}

/// The left-hand operand: m × k, row-major with row stride `ld` (elements), bf16 bits or f32.
#[derive(Clone, Copy)]
enum Lhs<'a> {
    Bf16(&'a [u16]),
    F32(&'a [f32]),
}

impl Lhs<'_> {
    fn len(&self) -> usize {
        match self {
            Lhs::Bf16(s) => s.len(),
            Lhs::F32(s) => s.len(),
        }
    }
}

/// Block sizes, in elements (kc even, mc a multiple of [`MR`]); the tests shrink them to reach every edge.
#[derive(Clone, Copy, Debug)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct Blocking {
    kc: usize,
    mc: usize,
}

const DEFAULT_BLOCKING: Blocking = Blocking { kc: KC, mc: MC };

/// `C (m × n, row stride ldc) = [C +] A·B`, A m × k bf16 bits row-major (row stride `lda ≥ k`, in elements),
/// B = `b` (k × n), accumulating into C when `accumulate`. Runs on the calling thread.
///
/// # Panics
/// If `lda < k`, `ldc < n`, or `a` / `c` are too short for m rows of their strides.
pub fn gemm(m: usize, a: &[u16], lda: usize, b: &PackedB, c: &mut [f32], ldc: usize, accumulate: bool) {
    gemm_checked(m, Lhs::Bf16(a), lda, b, c, ldc, accumulate, DEFAULT_BLOCKING);
}

/// [`gemm`] with A in f32 (row stride `lda`), rounded to bf16 by [`f32_to_bf16_one`] while it is packed (no
/// bf16 copy of A is made).
///
/// # Panics
/// As [`gemm`].
pub fn gemm_f32a(m: usize, a: &[f32], lda: usize, b: &PackedB, c: &mut [f32], ldc: usize, accumulate: bool) {
    gemm_checked(m, Lhs::F32(a), lda, b, c, ldc, accumulate, DEFAULT_BLOCKING);
}

/// [`gemm`] writing through a raw pointer, for callers that split one C between threads by column blocks
/// (each thread one block, with its own [`PackedB`] of those columns).
///
/// # Safety
/// `c` must be valid for reads and writes of the m × n block at row stride `ldc` (elements `i·ldc + j`,
/// `i < m`, `j < n`), and nothing else may access that block during the call. Elements of the rows outside
/// columns `0..n` are never touched.
///
/// # Panics
/// If `lda < k`, `ldc < n`, or `a` is too short for m rows.
pub unsafe fn gemm_ptr(m: usize, a: &[u16], lda: usize, b: &PackedB, c: *mut f32, ldc: usize, accumulate: bool) {
    check_lhs(m, Lhs::Bf16(a), lda, b);
    assert!(ldc >= b.n(), "bf16 gemm: ldc {ldc} < n {}", b.n());
    // SAFETY: A's bounds were checked; the caller vouches for C.
    unsafe { gemm_unchecked(m, Lhs::Bf16(a), lda, b, c, ldc, accumulate, DEFAULT_BLOCKING) }
}

/// [`gemm_f32a`] writing through a raw pointer, as [`gemm_ptr`].
///
/// # Safety
/// As [`gemm_ptr`].
pub unsafe fn gemm_f32a_ptr(m: usize, a: &[f32], lda: usize, b: &PackedB, c: *mut f32, ldc: usize, accumulate: bool) {
    check_lhs(m, Lhs::F32(a), lda, b);
    assert!(ldc >= b.n(), "bf16 gemm: ldc {ldc} < n {}", b.n());
    // SAFETY: A's bounds were checked; the caller vouches for C.
    unsafe { gemm_unchecked(m, Lhs::F32(a), lda, b, c, ldc, accumulate, DEFAULT_BLOCKING) }
}

/// Panics unless A (m × k at row stride lda) lies within its slice.
fn check_lhs(m: usize, a: Lhs, lda: usize, b: &PackedB) {
    let k = b.k();
    assert!(lda >= k, "bf16 gemm: lda {lda} < k {k}");
    if m > 0 && k > 0 {
        assert!(a.len() >= (m - 1) * lda + k, "bf16 gemm: A has {} elements, needs {}", a.len(), (m - 1) * lda + k);
    }
}

/// The safe entry points' common body: checks every bound, then runs the kernels.
#[allow(clippy::too_many_arguments)]
fn gemm_checked(m: usize, a: Lhs, lda: usize, b: &PackedB, c: &mut [f32], ldc: usize, accumulate: bool, blk: Blocking) {
    check_lhs(m, a, lda, b);
    let n = b.n();
    assert!(ldc >= n, "bf16 gemm: ldc {ldc} < n {n}");
    if m > 0 && n > 0 {
        assert!(c.len() >= (m - 1) * ldc + n, "bf16 gemm: C has {} elements, needs {}", c.len(), (m - 1) * ldc + n);
    }
    // SAFETY: A's and C's bounds were checked just above; `c` is borrowed mutably for the call.
    unsafe { gemm_unchecked(m, a, lda, b, c.as_mut_ptr(), ldc, accumulate, blk) }
}

/// Runs the AVX-512 kernels where [`available`], else the scalar loop.
///
/// # Safety
/// A's bounds checked by [`check_lhs`]; `c` valid for the m × n block at stride `ldc ≥ n`, not aliased.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_unchecked(
    m: usize,
    a: Lhs,
    lda: usize,
    b: &PackedB,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    blk: Blocking,
) {
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: the CPU has AVX-512 F, BW and BF16; the caller vouches for the bounds.
        unsafe { kernel::gemm_avx512(m, a, lda, b, c, ldc, accumulate, blk) };
        return;
    }
    let _ = blk;
    // SAFETY: as above.
    unsafe { gemm_scalar(m, a, lda, b, c, ldc, accumulate) }
}

/// The portable fallback: the same products (of bf16-rounded inputs, read from the packed B) summed in f32, one
/// element of C at a time. Unlike `vdpbf16ps` it keeps denormals.
///
/// # Safety
/// As [`gemm_unchecked`].
unsafe fn gemm_scalar(m: usize, a: Lhs, lda: usize, b: &PackedB, c: *mut f32, ldc: usize, accumulate: bool) {
    let k = b.k();
    let mut row = vec![0u16; k];
    for i in 0..m {
        match a {
            Lhs::Bf16(s) => row.copy_from_slice(&s[i * lda..i * lda + k]),
            Lhs::F32(s) => row.iter_mut().zip(&s[i * lda..i * lda + k]).for_each(|(d, &x)| *d = f32_to_bf16_one(x)),
        }
        for j in 0..b.n() {
            let mut acc = 0f32;
            for (kk, &h) in row.iter().enumerate() {
                acc += bf16_to_f32(h) * bf16_to_f32(b.get(kk, j));
            }
            // SAFETY: i < m, j < n, within the block the caller vouched for.
            let dst = unsafe { &mut *c.add(i * ldc + j) };
            *dst = if accumulate { *dst + acc } else { acc };
        }
    }
}
