//! [`PackedB`]: the right-hand operand in the microkernel's layout, packed from f32 or bf16 tiles in either
//! orientation.
//!
//! Layout: B (k × n) is cut into panels of [`NR`] = 32 columns. A panel holds, for each pair of k rows
//! (`2p`, `2p+1`), one u32 word per column, `bf16(B[2p][j]) | bf16(B[2p+1][j]) << 16` — the operand order of
//! `vdpbf16ps`, whose lane j then adds `a[2p]·B[2p][j] + a[2p+1]·B[2p+1][j]` with a broadcast word of A. The 32
//! words of a pair are two 64-byte [`Line`]s (one zmm each), so a panel's k pairs are one sequential stream, and a
//! k block of it is contiguous. An odd k is padded with a zero row, n with zero columns up to a whole panel.
//!
//! Packing is vectorized for whole panels: a transposed tile (B = Tᵀ, T's rows are B's columns) goes through
//! 16 × 16 transposes of 32-bit pairs; a row-major one (B = T) widens two rows' bf16 into pair words. The
//! scalar loop packs the edges (last panel, last pairs) and everything where AVX-512 BF16 is missing.
use super::{NR, f32_to_bf16_one};

/// Lines (zmm) per pair of a panel.
pub(super) const LINES: usize = NR / 16;

/// 16 columns' pair words of one k pair: a zmm, 64-byte aligned.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct Line(pub(super) [u32; 16]);

/// A k × n right-hand operand packed for [`super::gemm`]: [`NR`]-column panels, k in zero-padded pairs, 64-byte
/// aligned (module docs of `pack.rs` for the layout). Build it once per weight tile, or keep one and
/// `repack_*` into it (the allocation is reused when it is large enough).
#[derive(Clone, Debug, Default)]
pub struct PackedB {
    k: usize,
    n: usize,
    /// Pairs of k: `k.div_ceil(2)`.
    kp: usize,
    lines: Vec<Line>,
}

/// A tile to pack: f32 or bf16 bits, with its row stride; `transposed` when its rows are B's columns.
#[derive(Clone, Copy)]
pub(super) struct Tile<'a> {
    pub(super) src: Src<'a>,
    pub(super) ld: usize,
    pub(super) transposed: bool,
}

/// A tile's elements.
#[derive(Clone, Copy)]
pub(super) enum Src<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
}

impl Tile<'_> {
    /// `B[kk][j]` as bf16 bits.
    fn get(&self, kk: usize, j: usize) -> u16 {
        let idx = if self.transposed { j * self.ld + kk } else { kk * self.ld + j };
        match self.src {
            Src::F32(s) => f32_to_bf16_one(s[idx]),
            Src::Bf16(s) => s[idx],
        }
    }

    fn len(&self) -> usize {
        match self.src {
            Src::F32(s) => s.len(),
            Src::Bf16(s) => s.len(),
        }
    }
}

impl PackedB {
    /// An empty operand (k = n = 0), to `repack_*` into.
    pub fn new() -> Self {
        Self::default()
    }

    /// B = Tᵀ (k × n), T an n × k f32 tile row-major with row stride `ld ≥ k` — the forward `x·Wᵀ` with T = rows
    /// of W. Rounded to bf16 by [`super::f32_to_bf16_one`].
    pub fn from_f32_transposed(t: &[f32], n: usize, k: usize, ld: usize) -> Self {
        let mut p = Self::new();
        p.repack_f32_transposed(t, n, k, ld);
        p
    }

    /// B = T, T a k × n f32 tile row-major with row stride `ld ≥ n` — the input gradient `dy·W` with T = rows
    /// of W.
    pub fn from_f32(t: &[f32], k: usize, n: usize, ld: usize) -> Self {
        let mut p = Self::new();
        p.repack_f32(t, k, n, ld);
        p
    }

    /// [`Self::from_f32_transposed`] from bf16 bits (no rounding: bf16 weights' fast path).
    pub fn from_bf16_transposed(t: &[u16], n: usize, k: usize, ld: usize) -> Self {
        let mut p = Self::new();
        p.repack_bf16_transposed(t, n, k, ld);
        p
    }

    /// [`Self::from_f32`] from bf16 bits.
    pub fn from_bf16(t: &[u16], k: usize, n: usize, ld: usize) -> Self {
        let mut p = Self::new();
        p.repack_bf16(t, k, n, ld);
        p
    }

    /// [`Self::from_f32_transposed`] into this operand's allocation.
    pub fn repack_f32_transposed(&mut self, t: &[f32], n: usize, k: usize, ld: usize) {
        self.pack(Tile { src: Src::F32(t), ld, transposed: true }, k, n, true);
    }

    /// [`Self::from_f32`] into this operand's allocation.
    pub fn repack_f32(&mut self, t: &[f32], k: usize, n: usize, ld: usize) {
        self.pack(Tile { src: Src::F32(t), ld, transposed: false }, k, n, true);
    }

    /// [`Self::from_bf16_transposed`] into this operand's allocation.
    pub fn repack_bf16_transposed(&mut self, t: &[u16], n: usize, k: usize, ld: usize) {
        self.pack(Tile { src: Src::Bf16(t), ld, transposed: true }, k, n, true);
    }

    /// [`Self::from_bf16`] into this operand's allocation.
    pub fn repack_bf16(&mut self, t: &[u16], k: usize, n: usize, ld: usize) {
        self.pack(Tile { src: Src::Bf16(t), ld, transposed: false }, k, n, true);
    }

    /// Rows of B (the shared dimension k).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Columns of B (and of C).
    pub fn n(&self) -> usize {
        self.n
    }

    /// Pairs of k (`k.div_ceil(2)`).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(super) fn kp(&self) -> usize {
        self.kp
    }

    /// Panels of [`NR`] columns.
    pub(super) fn panels(&self) -> usize {
        self.n.div_ceil(NR)
    }

    /// The lines of panel `jp` from pair `p` on.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(super) fn panel_from(&self, jp: usize, p: usize) -> &[Line] {
        &self.lines[(jp * self.kp + p) * LINES..(jp + 1) * self.kp * LINES]
    }

    /// Lines of the packed operand (the vector may hold more, from a larger earlier tile).
    fn packed_len(&self) -> usize {
        self.panels() * self.kp * LINES
    }

    /// The packed lines (for the tests' comparisons).
    #[cfg(test)]
    pub(super) fn lines_for_test(&self) -> &[Line] {
        &self.lines[..self.packed_len()]
    }

    /// `B[kk][j]` as bf16 bits, read back from the packed layout.
    pub(super) fn get(&self, kk: usize, j: usize) -> u16 {
        let w = self.lines[((j / NR) * self.kp + kk / 2) * LINES + (j % NR) / 16].0[j % 16];
        (w >> (16 * (kk % 2))) as u16
    }

    /// Packs `tile` as B (k × n); `simd` allows the AVX-512 paths (the tests turn it off to compare).
    ///
    /// # Panics
    /// If the tile's row stride is shorter than its rows or its slice is too short.
    pub(super) fn pack(&mut self, tile: Tile, k: usize, n: usize, simd: bool) {
        let (rows, cols) = if tile.transposed { (n, k) } else { (k, n) };
        assert!(tile.ld >= cols, "PackedB: row stride {} < row length {cols}", tile.ld);
        if rows > 0 && cols > 0 {
            let need = (rows - 1) * tile.ld + cols;
            assert!(tile.len() >= need, "PackedB: tile has {} elements, needs {need}", tile.len());
        }
        self.k = k;
        self.n = n;
        self.kp = k.div_ceil(2);
        // Every line is written below (padding included), so stale contents need no clearing; the vector only
        // grows, so that a `PackedB` reused for tiles of alternating sizes is not zero-filled again each time.
        if self.lines.len() < self.packed_len() {
            self.lines.resize(self.packed_len(), Line::default());
        }
        for jp in 0..self.panels() {
            let full_panel = (jp + 1) * NR <= n;
            let vector_pairs = if simd && full_panel { self.pack_panel_simd(tile, jp) } else { 0 };
            self.pack_panel_scalar(tile, jp, vector_pairs);
        }
    }

    /// Packs pairs `p0..` of panel `jp` one word at a time (zeros beyond k and n).
    fn pack_panel_scalar(&mut self, tile: Tile, jp: usize, p0: usize) {
        let (k, n, kp) = (self.k, self.n, self.kp);
        let cols = NR.min(n - jp * NR);
        for p in p0..kp {
            let line = &mut self.lines[(jp * kp + p) * LINES..][..LINES];
            for c in 0..NR {
                let j = jp * NR + c;
                let lo = if c < cols { tile.get(2 * p, j) } else { 0 };
                let hi = if c < cols && 2 * p + 1 < k { tile.get(2 * p + 1, j) } else { 0 };
                line[c / 16].0[c % 16] = u32::from(lo) | u32::from(hi) << 16;
            }
        }
    }

    /// Packs the leading pairs of the whole panel `jp` with AVX-512 where [`super::available`]; returns how many
    /// pairs it packed (the rest are the scalar loop's).
    fn pack_panel_simd(&mut self, tile: Tile, jp: usize) -> usize {
        #[cfg(target_arch = "x86_64")]
        if super::available() {
            let (kp, lines) = (self.kp, &mut self.lines[jp * self.kp * LINES..(jp + 1) * self.kp * LINES]);
            // SAFETY: the CPU has AVX-512 F, BW and BF16 (checked just above).
            return unsafe { simd::pack_panel(tile, jp, self.k, kp, lines) };
        }
        let _ = (tile, jp);
        0
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    //! The AVX-512 packers of whole panels.
    use super::super::kernel::{load_u16x32, pairs_f32, transpose16};
    use super::{LINES, Line, NR, Src, Tile};
    use std::arch::x86_64::*;

    /// Packs the leading pairs of a whole panel (`NR` columns from `jp·NR`) into `lines` (the panel's `kp·LINES`
    /// lines); returns how many pairs it packed: every whole pair for a row-major tile, whole blocks of 16 pairs
    /// for a transposed one.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) fn pack_panel(tile: Tile, jp: usize, k: usize, kp: usize, lines: &mut [Line]) -> usize {
        debug_assert_eq!(lines.len(), kp * LINES);
        let ld = tile.ld;
        if tile.transposed {
            // B[kk][j] = T[j][kk]: 16 columns (rows of T) × 16 pairs (32 elements of each row) at a time.
            let blocks = k / 32;
            for blk in 0..blocks {
                for l in 0..LINES {
                    let mut rows = [_mm512_setzero_si512(); 16];
                    for (r, row) in rows.iter_mut().enumerate() {
                        let start = (jp * NR + l * 16 + r) * ld + blk * 32;
                        *row = match tile.src {
                            Src::F32(s) => pairs_f32(&s[start..start + 32]),
                            Src::Bf16(s) => load_u16x32(&s[start..start + 32]),
                        };
                    }
                    let cols = transpose16(rows);
                    for (q, col) in cols.iter().enumerate() {
                        store_line(&mut lines[(blk * 16 + q) * LINES + l], *col);
                    }
                }
            }
            blocks * 16
        } else {
            // B[kk][j] = T[kk][j]: rows 2p and 2p+1, 16 columns at a time, widened into pair words.
            let pairs = k / 2;
            for p in 0..pairs {
                for l in 0..LINES {
                    let (r0, r1) = ((2 * p) * ld + jp * NR + l * 16, (2 * p + 1) * ld + jp * NR + l * 16);
                    let (lo, hi) = match tile.src {
                        Src::F32(s) => (widen_f32(&s[r0..r0 + 16]), widen_f32(&s[r1..r1 + 16])),
                        Src::Bf16(s) => (widen_u16(&s[r0..r0 + 16]), widen_u16(&s[r1..r1 + 16])),
                    };
                    store_line(&mut lines[p * LINES + l], _mm512_or_si512(lo, _mm512_slli_epi32::<16>(hi)));
                }
            }
            pairs
        }
    }

    /// 16 f32 rounded to bf16, each zero-extended into the low half of a 32-bit word.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    fn widen_f32(s: &[f32]) -> __m512i {
        assert!(s.len() >= 16);
        // SAFETY: 16 f32 in bounds (asserted); unaligned load.
        let x = unsafe { _mm512_loadu_ps(s.as_ptr()) };
        // SAFETY: __m256bh and __m256i are both 32 plain bytes.
        let h = unsafe { std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(x)) };
        _mm512_cvtepu16_epi32(h)
    }

    /// 16 bf16 bits, each zero-extended into the low half of a 32-bit word.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    fn widen_u16(s: &[u16]) -> __m512i {
        assert!(s.len() >= 16);
        // SAFETY: 32 bytes in bounds (asserted); unaligned load.
        _mm512_cvtepu16_epi32(unsafe { _mm256_loadu_si256(s.as_ptr().cast()) })
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    fn store_line(line: &mut Line, v: __m512i) {
        // SAFETY: a Line is 64 bytes, 64-byte aligned.
        unsafe { _mm512_store_si512((&mut line.0 as *mut [u32; 16]).cast(), v) }
    }
}
