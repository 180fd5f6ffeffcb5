//! The AVX-512 BF16 code: the GEMM's loop nest, A's packing, the microkernel, the f32 → bf16 conversion.
//!
//! Loop nest of [`gemm_avx512`] (outermost first):
//! 1. row blocks of up to `mc` rows of A and C;
//! 2. k blocks of up to `kc` (equal sizes, in pairs; one block for k ≤ 4096): pack A's block, then sweep all of
//!    B's panels for that k block, adding into C (from the second k block on, or from the start when
//!    accumulating);
//! 3. B's panels of [`NR`] columns: the micro-panel (`kc × NR` bf16) is brought into L2 (and its first lines
//!    into L1) by the first kernel call and reused by the others of the row block;
//! 4. A's panels of [`MR`] rows: one microkernel call computes an `MR × NR` tile of C over the k block.
//!
//! There is no column-block loop: the whole B is packed beforehand, and its k block streams from L3 or memory
//! once per row block (one pass for m ≤ `mc`).
use super::pack::{LINES, Line, PackedB};
use super::{Blocking, Lhs, MR, NR, f32_to_bf16_one};
use std::arch::x86_64::*;
use std::cell::Cell;

thread_local! {
    /// The packed A block, kept from call to call to reuse its allocation (at most `MC × KC` bf16, 3.75 MiB).
    static A_PACK: Cell<Vec<u32>> = const { Cell::new(Vec::new()) };
}

/// `dst = bf16(src)`: 32 values per `vcvtne2ps2bf16`, the tail by [`f32_to_bf16_one`] (the same bits).
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(super) fn f32_to_bf16_avx512(src: &[f32], dst: &mut [u16]) {
    let (mut s, mut d) = (src.chunks_exact(32), dst.chunks_exact_mut(32));
    for (s, d) in (&mut s).zip(&mut d) {
        // SAFETY: 32 f32 read, 32 u16 written, within the chunks; unaligned loads and stores.
        unsafe {
            let (lo, hi) = (_mm512_loadu_ps(s.as_ptr()), _mm512_loadu_ps(s.as_ptr().add(16)));
            // vcvtne2ps2bf16 puts its second operand's 16 values first.
            let v = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(d.as_mut_ptr().cast(), v);
        }
    }
    for (x, y) in s.remainder().iter().zip(d.into_remainder()) {
        *y = f32_to_bf16_one(*x);
    }
}

/// `C = [C +] A·B` on this thread (see the module docs for the loops).
///
/// # Safety
/// The CPU has AVX-512 F, BW and BF16; A (m × k at row stride `lda ≥ k`) lies within its slice; `c` is valid
/// for the m × n block at row stride `ldc ≥ n` and not accessed by anyone else during the call.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_avx512(
    m: usize,
    a: Lhs,
    lda: usize,
    b: &PackedB,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    blk: Blocking,
) {
    let (k, n, kp) = (b.k(), b.n(), b.kp());
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                // SAFETY: row i's n elements are in the block the caller vouched for.
                unsafe { std::slice::from_raw_parts_mut(c.add(i * ldc), n) }.fill(0.0);
            }
        }
        return;
    }
    // Equal blocks: k = 6000 runs as 2 × 3000 rather than 4096 + 1904, m = 1000 as 3 × 336 rather than
    // 480 + 480 + 40.
    let kcp = kp.div_ceil(kp.div_ceil(blk.kc / 2));
    let mc = m.div_ceil(m.div_ceil(blk.mc)).next_multiple_of(MR);
    let mut a_pack = A_PACK.take();
    if a_pack.len() < mc * kcp {
        // Grown, never shrunk: alternating shapes would otherwise zero the new part on every call.
        a_pack.resize(mc * kcp, 0);
    }
    let mut row_bf16 = vec![0u16; 2 * kcp];
    for ic in (0..m).step_by(mc) {
        let mb = mc.min(m - ic);
        for pc in (0..kp).step_by(kcp) {
            let kb = kcp.min(kp - pc);
            let a_block = &mut a_pack[..mb * kb];
            pack_a(a, lda, k, (ic, mb), (pc, kb), a_block, &mut row_bf16);
            let add = accumulate || pc > 0;
            for jp in 0..b.panels() {
                let cols = NR.min(n - jp * NR);
                let b_panel = &b.panel_from(jp, pc)[..kb * LINES];
                for ir in (0..mb).step_by(MR) {
                    let mr = MR.min(mb - ir);
                    let a_panel = &a_block[ir * kb..(ir + mr) * kb];
                    let kernel = pick_kernel(mr, cols);
                    // SAFETY: the panels hold kb pairs of mr rows and of NR columns; the C tile (rows ic + ir ..
                    // + mr, columns jp·NR .. + cols) is inside the caller's m × n block.
                    unsafe {
                        kernel(kb, a_panel.as_ptr(), b_panel.as_ptr(), c.add((ic + ir) * ldc + jp * NR), ldc, cols, add)
                    };
                }
            }
        }
    }
    A_PACK.set(a_pack);
}

/// Packs rows `r0 .. r0 + mb` × pairs `p0 .. p0 + kb` of A into `dst` (`mb · kb` words): panels of [`MR`] rows
/// (the last one `mb % MR` rows), each `[pair][row]` so that a kernel reads its broadcasts in one sequential
/// stream. Word `(p, i)` is `A[i][2p] | A[i][2p+1] << 16` in bf16 bits, zero past k. Whole panels go 16 pairs at
/// a time through [`transpose16`]; the rest word by word (`row_bf16`, ≥ 2·kb, holds an f32 row's conversion).
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
fn pack_a(
    a: Lhs,
    lda: usize,
    k: usize,
    (r0, mb): (usize, usize),
    (p0, kb): (usize, usize),
    dst: &mut [u32],
    row_bf16: &mut [u16],
) {
    let (c0, c1) = (2 * p0, k.min(2 * (p0 + kb)));
    for ir in (0..mb).step_by(MR) {
        let mr = MR.min(mb - ir);
        let panel = &mut dst[ir * kb..(ir + mr) * kb];
        // Pairs done by the vector path: whole blocks of 16 (32 elements of each row).
        let done = if mr == MR { pack_a_blocks(a, lda, r0 + ir, c0, (c1 - c0) / 32, panel) } else { 0 };
        if c0 + 2 * done == c1 {
            continue;
        }
        for i in 0..mr {
            let (s0, s1) = ((r0 + ir + i) * lda + c0 + 2 * done, (r0 + ir + i) * lda + c1);
            let seg: &[u16] = match a {
                Lhs::Bf16(s) => &s[s0..s1],
                Lhs::F32(s) => {
                    let out = &mut row_bf16[..s1 - s0];
                    f32_to_bf16_avx512(&s[s0..s1], out);
                    out
                }
            };
            let mut pairs = seg.chunks_exact(2);
            for (w, pr) in panel[done * mr + i..].iter_mut().step_by(mr).zip(&mut pairs) {
                *w = u32::from(pr[0]) | u32::from(pr[1]) << 16;
            }
            if let [last] = pairs.remainder() {
                panel[(done + seg.len() / 2) * mr + i] = u32::from(*last);
            }
        }
    }
}

/// Packs `blocks` blocks of 16 pairs of a whole panel (rows `row0 .. row0 + MR` from element `c0`): each block is
/// MR rows of 16 pair words, transposed into 16 pairs of MR words. Returns the pairs packed.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
fn pack_a_blocks(a: Lhs, lda: usize, row0: usize, c0: usize, blocks: usize, panel: &mut [u32]) -> usize {
    const { assert!(MR <= 16) };
    let mask: __mmask16 = (1 << MR) - 1;
    for blk in 0..blocks {
        let mut rows = [_mm512_setzero_si512(); 16];
        for (i, r) in rows.iter_mut().take(MR).enumerate() {
            let start = (row0 + i) * lda + c0 + 32 * blk;
            *r = match a {
                Lhs::Bf16(s) => load_u16x32(&s[start..start + 32]),
                Lhs::F32(s) => pairs_f32(&s[start..start + 32]),
            };
        }
        for (q, col) in transpose16(rows).iter().enumerate() {
            let out = &mut panel[(16 * blk + q) * MR..][..MR];
            // SAFETY: the mask writes MR words, the length of `out`.
            unsafe { _mm512_mask_storeu_epi32(out.as_mut_ptr().cast(), mask, *col) };
        }
    }
    16 * blocks
}

/// A microkernel: `(kb, a_panel, b_panel, c, ldc, cols, accumulate)`.
type Kernel = unsafe fn(usize, *const u32, *const Line, *mut f32, usize, usize, bool);

/// The microkernel for `mr` rows (1 ..= [`MR`]) and `cols` columns (1 ..= [`NR`]): full width, or half width
/// (one zmm per row) when `cols ≤ 16`.
fn pick_kernel(mr: usize, cols: usize) -> Kernel {
    if cols <= 16 { pick_rows::<1>(mr) } else { pick_rows::<2>(mr) }
}

fn pick_rows<const NV: usize>(mr: usize) -> Kernel {
    const { assert!(MR <= 12 && NR == 32) };
    match mr {
        1 => microkernel::<1, NV>,
        2 => microkernel::<2, NV>,
        3 => microkernel::<3, NV>,
        4 => microkernel::<4, NV>,
        5 => microkernel::<5, NV>,
        6 => microkernel::<6, NV>,
        7 => microkernel::<7, NV>,
        8 => microkernel::<8, NV>,
        9 => microkernel::<9, NV>,
        10 => microkernel::<10, NV>,
        11 => microkernel::<11, NV>,
        12 => microkernel::<12, NV>,
        _ => unreachable!("{mr} rows"),
    }
}

/// `C[0..R][0..cols] = [C +] Σ_p A(p)·B(p)` over `kb` pairs: `R × NV` zmm accumulators (16 columns each); per
/// pair, `NV` aligned loads of B's line and `R` broadcasts of A's pair word, `R · NV` `vdpbf16ps`. Columns past
/// `cols` (B's zero padding) are computed and masked off at the store.
///
/// # Safety
/// The CPU has AVX-512 F, BW and BF16; `a` holds `kb · R` words; `b` holds `kb · LINES` lines; `16 · (NV − 1) <
/// cols ≤ 16 · NV`; `c` is valid for R rows of `cols` elements at row stride `ldc`.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn microkernel<const R: usize, const NV: usize>(
    kb: usize,
    a: *const u32,
    b: *const Line,
    c: *mut f32,
    ldc: usize,
    cols: usize,
    accumulate: bool,
) {
    let mut acc = [[_mm512_setzero_ps(); NV]; R];
    for p in 0..kb {
        let mut bv = [_mm512_setzero_si512(); NV];
        for (v, x) in bv.iter_mut().enumerate() {
            // SAFETY: line v of pair p < kb, 64-byte aligned.
            *x = unsafe { _mm512_load_si512(b.add(p * LINES + v).cast()) };
        }
        for (i, row) in acc.iter_mut().enumerate() {
            // SAFETY: word i of pair p < kb.
            let ai = as_bh(_mm512_set1_epi32(unsafe { a.add(p * R + i).read() } as i32));
            for (x, &y) in row.iter_mut().zip(&bv) {
                *x = _mm512_dpbf16_ps(*x, ai, as_bh(y));
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for (v, &x) in row.iter().enumerate() {
            let left = cols - 16 * v;
            let mask: __mmask16 = if left >= 16 { 0xffff } else { (1 << left) - 1 };
            // SAFETY: row i < R, columns 16v .. 16v + 16 masked to those < cols.
            unsafe {
                let dst = c.add(i * ldc + 16 * v);
                let x = if accumulate { _mm512_add_ps(x, _mm512_maskz_loadu_ps(mask, dst)) } else { x };
                _mm512_mask_storeu_ps(dst, mask, x);
            }
        }
    }
}

/// 32 bf16 values in a zmm, typed as `vdpbf16ps` takes them.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
fn as_bh(x: __m512i) -> __m512bh {
    // SAFETY: both are 64 plain bytes.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(x) }
}

/// 32 f32 rounded to bf16, as 16 pair words (element 2q in the low half of word q).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(super) fn pairs_f32(s: &[f32]) -> __m512i {
    assert!(s.len() >= 32);
    // SAFETY: 32 f32 in bounds (asserted); unaligned loads.
    let (lo, hi) = unsafe { (_mm512_loadu_ps(s.as_ptr()), _mm512_loadu_ps(s.as_ptr().add(16))) };
    // vcvtne2ps2bf16 puts its second operand's 16 values first.
    // SAFETY: __m512bh and __m512i are both 64 plain bytes.
    unsafe { std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo)) }
}

/// 32 bf16 bits as 16 pair words.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(super) fn load_u16x32(s: &[u16]) -> __m512i {
    assert!(s.len() >= 32);
    // SAFETY: 64 bytes in bounds (asserted); unaligned load.
    unsafe { _mm512_loadu_si512(s.as_ptr().cast()) }
}

/// The transpose of a 16 × 16 matrix of 32-bit words (`rows[r]` lane c → result `[c]` lane r): 32-bit and
/// 64-bit interleaves within 128-bit lanes, then two rounds of 128-bit lane shuffles.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(super) fn transpose16(r: [__m512i; 16]) -> [__m512i; 16] {
    // t[2i] lane L: (r[2i], r[2i+1]) at columns 4L, 4L+1; t[2i+1]: columns 4L+2, 4L+3.
    let mut t = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    // u[4g + j] lane L: rows 4g..4g+4 at column 4L + j.
    let mut u = [_mm512_setzero_si512(); 16];
    for g in 0..4 {
        u[4 * g] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
        u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
        u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
        u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
    }
    // Column 4L + j is lane L of u[j], u[4 + j], u[8 + j], u[12 + j].
    let mut out = [_mm512_setzero_si512(); 16];
    for j in 0..4 {
        let v0 = _mm512_shuffle_i32x4::<0x88>(u[j], u[4 + j]); // lanes 0, 2 of each
        let v1 = _mm512_shuffle_i32x4::<0xdd>(u[j], u[4 + j]); // lanes 1, 3 of each
        let w0 = _mm512_shuffle_i32x4::<0x88>(u[8 + j], u[12 + j]);
        let w1 = _mm512_shuffle_i32x4::<0xdd>(u[8 + j], u[12 + j]);
        out[j] = _mm512_shuffle_i32x4::<0x88>(v0, w0);
        out[8 + j] = _mm512_shuffle_i32x4::<0xdd>(v0, w0);
        out[4 + j] = _mm512_shuffle_i32x4::<0x88>(v1, w1);
        out[12 + j] = _mm512_shuffle_i32x4::<0xdd>(v1, w1);
    }
    out
}
