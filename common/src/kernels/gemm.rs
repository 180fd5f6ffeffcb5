//! The kernels' GEMM (`gemm_into`): MKL's sgemm split over rayon's threads where `crate::mkl` loaded it, else faer.
use rayon::prelude::*;

use super::*;

/// MKL's sequential sgemm on `threads` disjoint blocks of `dst` in parallel: rows when `m ≥ n`, else columns.
/// Below about 2¹⁸ multiply-adds one thread does it all (the split costs more than it saves).
///
/// # Safety
/// As [`gemm_into`]; `la`/`lb` are [`crate::mkl::operand`]'s description of lhs/rhs.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn mkl_gemm_split(
    mkl: &crate::mkl::Mkl,
    dst: SendPtr,
    dst_rs: usize,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    (lhs, lhs_rs, la): (usize, usize, (usize, bool)),
    (rhs, rhs_cs, lb): (usize, usize, (usize, bool)),
    threads: usize,
) {
    let beta = if accumulate { 1.0 } else { 0.0 };
    let by_rows = m >= n;
    let len = if by_rows { m } else { n };
    let parts = if m * n * k < 1 << 18 { 1 } else { threads.clamp(1, len) };
    let piece = len.div_ceil(parts);
    let run = |i: usize| {
        let (s, e) = (i * piece, ((i + 1) * piece).min(len));
        if s >= e {
            return;
        }
        let (lhs, rhs) = (lhs as *const f32, rhs as *const f32);
        // SAFETY: block [s, e) of dst's rows (with lhs's matching rows) or columns (with rhs's matching columns).
        unsafe {
            if by_rows {
                mkl.sgemm_rm(
                    e - s,
                    n,
                    k,
                    1.0,
                    lhs.add(s * lhs_rs),
                    la,
                    rhs,
                    lb,
                    beta,
                    dst.get().add(s * dst_rs),
                    dst_rs,
                );
            } else {
                mkl.sgemm_rm(m, e - s, k, 1.0, lhs, la, rhs.add(s * rhs_cs), lb, beta, dst.get().add(s), dst_rs);
            }
        }
        crate::simd::clear_upper_simd_state();
    };
    if parts == 1 {
        run(0);
    } else {
        (0..parts).into_par_iter().for_each(run);
    }
}

/// `dst (m×n, row stride dst_rs) = [dst +] lhs · rhs` with arbitrary row/column strides of `lhs` (m×k) and `rhs` (k×n),
/// on `threads` threads: by MKL's sgemm where [`crate::mkl`] loaded it and the strides suit CBLAS, else by faer's
/// matmul.
///
/// faer rather than the `gemm` crate (candle's CPU GEMM) as the fallback: faer's x86 kernels pick AVX-512 at run
/// time where the CPU has it, the `gemm` crate only behind a nightly feature. Measured on a 2-core Sapphire
/// Rapids at 2048 × 1536 × 384: faer 169 GFLOP/s, `gemm` 72, PyTorch/MKL 178 (on a later day: faer 236–265,
/// MKL 290–330 at the MiniLM shapes).
///
/// # Safety
/// The strides must address elements inside `lhs` and `rhs` for every (row, column) of the product, and
/// `dst` must hold `m` rows of `n` elements `dst_rs` apart.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_into(
    dst: &mut [f32],
    dst_rs: usize,
    mnk: (usize, usize, usize),
    accumulate: bool,
    lhs: &[f32],
    lhs_strides: (usize, usize),
    rhs: &[f32],
    rhs_strides: (usize, usize),
    threads: usize,
) {
    let mkl = crate::mkl::load().as_ref().ok();
    // SAFETY: forwarded from the caller.
    unsafe { gemm_into_on(mkl, dst, dst_rs, mnk, accumulate, lhs, lhs_strides, rhs, rhs_strides, threads) }
}

/// [`gemm_into`] on a chosen backend: MKL when `mkl` is given (and the strides suit CBLAS), else faer.
///
/// # Safety
/// As [`gemm_into`].
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_into_on(
    mkl: Option<&crate::mkl::Mkl>,
    dst: &mut [f32],
    dst_rs: usize,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    lhs: &[f32],
    lhs_strides: (usize, usize),
    rhs: &[f32],
    rhs_strides: (usize, usize),
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    debug_assert!(dst.len() >= (m - 1) * dst_rs + n);
    // SAFETY: dst holds m rows of n, dst_rs apart (the caller's promise, checked in debug builds).
    unsafe {
        gemm_ptr_on(
            mkl,
            SendPtr(dst.as_mut_ptr()),
            dst_rs,
            (m, n, k),
            accumulate,
            lhs,
            lhs_strides,
            rhs,
            rhs_strides,
            threads,
        )
    }
}

/// [`gemm_into`] writing through a raw pointer: for callers whose threads fill disjoint column blocks of one
/// output (a `&mut` slice per thread would alias).
///
/// # Safety
/// As [`gemm_into`], and no other thread may touch the `m × n` block at `dst` while this runs.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_ptr(
    dst: SendPtr,
    dst_rs: usize,
    mnk: (usize, usize, usize),
    accumulate: bool,
    lhs: &[f32],
    lhs_strides: (usize, usize),
    rhs: &[f32],
    rhs_strides: (usize, usize),
    threads: usize,
) {
    let mkl = crate::mkl::load().as_ref().ok();
    // SAFETY: forwarded from the caller.
    unsafe { gemm_ptr_on(mkl, dst, dst_rs, mnk, accumulate, lhs, lhs_strides, rhs, rhs_strides, threads) }
}

/// The body of [`gemm_into_on`] and [`gemm_ptr`].
///
/// # Safety
/// As [`gemm_ptr`].
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_ptr_on(
    mkl: Option<&crate::mkl::Mkl>,
    dst: SendPtr,
    dst_rs: usize,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
    threads: usize,
) {
    use faer::{Accum, MatMut, MatRef, Par};
    let _p = crate::profile::span("gemm");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        // An empty sum: the output must still be written (it may come from `buffer_for_overwrite`).
        if !accumulate {
            for i in 0..m {
                // SAFETY: row i of the m × n block at dst.
                unsafe { std::slice::from_raw_parts_mut(dst.get().add(i * dst_rs), n).fill(0.0) };
            }
        }
        return;
    }
    let (lhs_ptr, rhs_ptr) = (lhs.as_ptr() as usize, rhs.as_ptr() as usize);
    // SAFETY: the caller vouches for dst (m rows of n, dst_rs apart), lhs and rhs.
    let (dst_mat, lhs, rhs) = unsafe {
        (
            MatMut::from_raw_parts_mut(dst.get(), m, n, dst_rs as isize, 1),
            MatRef::from_raw_parts(lhs.as_ptr(), m, k, lhs_rs as isize, lhs_cs as isize),
            MatRef::from_raw_parts(rhs.as_ptr(), k, n, rhs_rs as isize, rhs_cs as isize),
        )
    };
    if let Some(mkl) = mkl
        && let (Some(la), Some(lb), Some(_)) = (
            crate::mkl::operand(m, k, lhs_rs, lhs_cs),
            crate::mkl::operand(k, n, rhs_rs, rhs_cs),
            crate::mkl::operand(m, n, dst_rs, 1),
        )
    {
        // SAFETY: as for faer below; the pieces are disjoint blocks of dst's rows or columns.
        unsafe {
            mkl_gemm_split(
                mkl,
                dst,
                dst_rs,
                (m, n, k),
                accumulate,
                (lhs_ptr, lhs_rs, la),
                (rhs_ptr, rhs_cs, lb),
                threads,
            )
        };
        crate::simd::clear_upper_simd_state();
        return;
    }
    let par = if threads > 1 { Par::rayon(threads) } else { Par::Seq };
    faer::linalg::matmul::matmul(dst_mat, if accumulate { Accum::Add } else { Accum::Replace }, lhs, rhs, 1.0f32, par);
    if threads > 1 {
        crate::simd::clear_upper_simd_state_everywhere();
    } else {
        crate::simd::clear_upper_simd_state();
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    use rand::{Rng, SeedableRng};

    #[test]
    fn mkl_and_faer_gemms_agree_on_every_layout() {
        // MKL must load where scripts/fetch-assets.sh unpacked it or FEDSB_REQUIRE_MKL=1; elsewhere a loud skip.
        let Some(mkl) = crate::testing::mkl_or_skip(false, "MKL's sgemm was NOT compared with faer's") else {
            return;
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(71);
        // (m, n, k), lhs transposed, rhs transposed, accumulate, threads: thin, square, odd and empty shapes,
        // split by rows (m ≥ n) and by columns.
        let cases = [
            ((64, 48, 40), false, true, false, 2),
            ((33, 65, 17), true, false, true, 2),
            ((7, 300, 129), false, false, false, 2),
            ((300, 5, 64), true, true, true, 2),
            ((16, 16, 1), false, true, false, 1),
            ((9, 11, 0), false, false, false, 2),
            ((9, 11, 0), false, false, true, 2),
            ((1, 1, 1), true, true, false, 1),
        ];
        for ((m, n, k), lt, rt, acc, threads) in cases {
            let lhs: Vec<f32> = (0..m * k).map(|_| rng.random::<f32>() - 0.5).collect();
            let rhs: Vec<f32> = (0..k * n).map(|_| rng.random::<f32>() - 0.5).collect();
            let init: Vec<f32> = (0..m * n).map(|_| rng.random::<f32>()).collect();
            // Transposed operands are stored the other way round and read with swapped strides.
            let ls = if lt { (1, m) } else { (k, 1) };
            let rs = if rt { (1, k) } else { (n, 1) };
            let (mut a, mut b) = (init.clone(), init.clone());
            unsafe {
                gemm_into_on(Some(mkl), &mut a, n, (m, n, k), acc, &lhs, ls, &rhs, rs, threads);
                gemm_into_on(None, &mut b, n, (m, n, k), acc, &lhs, ls, &rhs, rs, threads);
            }
            let d = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
            assert!(d < 1e-5 * (k as f32).max(1.0), "{m}x{n}x{k} lt {lt} rt {rt} acc {acc}: differ by {d}");
            if k == 0 && !acc {
                assert!(a.iter().all(|&v| v == 0.0), "an empty product is zero");
            }
        }
        assert_eq!(crate::mkl::backend(), crate::mkl::GemmBackend::Mkl);
        assert!(crate::mkl::describe().starts_with("mkl"));
    }
}
