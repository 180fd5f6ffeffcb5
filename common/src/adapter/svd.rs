//! Deterministic randomized truncated SVD (Halko, Martinsson & Tropp 2011, Alg. 4.4) on faer.
//!
//! The LoRA-SB initialization needs the top-`r` singular triplets of every adapted weight
//! update `ΔW = -η·sign(G)` (`d_out × d_in`, up to ~14336 × 4096, `r` up to ~256). A full SVD of
//! such a matrix is far too expensive; the randomized range finder with subspace iteration only
//! needs `2·q + 2` products of the matrix with thin `n × (r + p)` blocks.
//!
//! # Determinism
//!
//! The Gaussian test matrix comes from `StdRng::seed_from_u64(cfg.seed)`, and every faer kernel
//! gets an explicit [`Par`]. For a given input, config and machine the result is bit-identical
//! from call to call *and independent of the rayon thread count*:
//! - the big products with the matrix run on all rayon threads (`Par::rayon(0)`); faer's matmul
//!   splits only the output, so every element is reduced in the same order whatever the number of
//!   threads (measured: `Par::Seq`, `rayon(1|2|3|8)` give identical bits);
//! - the thin QRs (`max(rows, cols) × (rank + oversample)`) and the small SVD run with `Par::Seq`,
//!   because faer's parallel QR/SVD *do* change the bits with the thread count. They are a small
//!   part of the cost (≈0.16 s for a 14336 × 264 QR), and on 2 cores faster sequentially anyway.
//!
//! `thread_count_does_not_change_bits` checks this. Bits are *not* guaranteed across machines with
//! different SIMD support (faer picks AVX2/AVX-512/NEON kernels at run time) or faer versions.

use faer::diag::Diag;
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::householder::{
    apply_block_householder_sequence_on_the_left_in_place_scratch,
    apply_block_householder_sequence_on_the_left_in_place_with_conj,
};
use faer::linalg::matmul::matmul;
use faer::linalg::qr::no_pivoting::factor::{qr_in_place, qr_in_place_scratch, recommended_block_size};
use faer::linalg::svd::{ComputeSvdVectors, svd as faer_svd, svd_scratch};
use faer::{Accum, Conj, Mat, MatRef, Par};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

fn default_oversample() -> usize {
    8
}
fn default_power_iters() -> usize {
    4
}
fn default_seed() -> u64 {
    42
}

/// Settings of the randomized SVD (Halko, Martinsson & Tropp 2011, Alg. 4.4 with subspace iteration).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RsvdConfig {
    /// Number of singular triplets to return (`1..=min(rows, cols)`).
    pub rank: usize,
    /// Extra sketch columns `p`; the sketch has `min(rank + p, min(rows, cols))` columns (default 8).
    #[serde(default = "default_oversample")]
    pub oversample: usize,
    /// Subspace (power) iterations `q`, each re-orthonormalized by QR (default 4).
    #[serde(default = "default_power_iters")]
    pub power_iters: usize,
    /// Seed of the Gaussian test matrix (default 42).
    #[serde(default = "default_seed")]
    pub seed: u64,
}

impl RsvdConfig {
    /// Config for `rank` triplets with the defaults: oversample 8, 4 power iterations, seed 42.
    pub fn new(rank: usize) -> Self {
        Self { rank, oversample: default_oversample(), power_iters: default_power_iters(), seed: default_seed() }
    }
}

/// Top-`rank` factors: M ≈ U·diag(S)·Vt, singular values descending.
///
/// Sign convention: the largest-magnitude entry of every column of `U` is positive (the first one
/// on ties); the matching row of `Vt` carries the compensating sign.
#[derive(Clone, Debug)]
pub struct TruncatedSvd {
    /// Rows of the factorized matrix.
    pub rows: usize,
    /// Columns of the factorized matrix.
    pub cols: usize,
    /// Number of kept singular triplets.
    pub rank: usize,
    /// Left singular vectors, `rows × rank`, row-major.
    pub u: Vec<f32>,
    /// Singular values, length `rank`, non-negative and descending.
    pub s: Vec<f32>,
    /// Right singular vectors transposed, `rank × cols`, row-major.
    pub vt: Vec<f32>,
}

/// Why a truncated SVD could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum SvdError {
    /// `data.len()` differs from `rows * cols` (or `rows * cols` overflows).
    #[error("data has {len} elements, but a {rows}x{cols} matrix needs rows*cols")]
    Shape {
        /// Length of the given slice.
        len: usize,
        /// Requested rows.
        rows: usize,
        /// Requested columns.
        cols: usize,
    },
    /// The rank is 0 or exceeds `min(rows, cols)`.
    #[error("rank {rank} is invalid for a {rows}x{cols} matrix (must be in 1..=min(rows, cols))")]
    Rank {
        /// Requested rank.
        rank: usize,
        /// Matrix rows.
        rows: usize,
        /// Matrix columns.
        cols: usize,
    },
    /// The input holds a NaN or an infinity.
    #[error("input element {index} is not finite")]
    NonFinite {
        /// Row-major index of the first offending element.
        index: usize,
    },
    /// faer's SVD did not converge, or the result overflowed to a non-finite value.
    #[error("factorization failed: {0}")]
    Factorization(String),
}

/// Checks shape, rank and finiteness of the input.
fn validate(data: &[f32], rows: usize, cols: usize, rank: usize) -> Result<(), SvdError> {
    if rows.checked_mul(cols) != Some(data.len()) {
        return Err(SvdError::Shape { len: data.len(), rows, cols });
    }
    if rank == 0 || rank > rows.min(cols) {
        return Err(SvdError::Rank { rank, rows, cols });
    }
    if let Some(index) = data.iter().position(|x| !x.is_finite()) {
        return Err(SvdError::NonFinite { index });
    }
    Ok(())
}

/// Zero-copy view of the row-major `data` as a tall matrix `A` (`m ≥ n`): `M` itself, or `Mᵀ`
/// when `rows < cols` (then the returned flag is `true`).
fn tall_view(data: &[f32], rows: usize, cols: usize) -> (MatRef<'_, f32>, bool) {
    if rows < cols {
        (MatRef::from_column_major_slice(data, cols, rows), true)
    } else {
        (MatRef::from_row_major_slice(data, rows, cols), false)
    }
}

fn mul(a: MatRef<'_, f32>, b: MatRef<'_, f32>, par: Par) -> Mat<f32> {
    let mut c = Mat::<f32>::zeros(a.nrows(), b.ncols());
    matmul(c.as_mut(), Accum::Replace, a, b, 1.0f32, par);
    c
}

/// Thin orthonormal basis `Q` (`m × n`, `m ≥ n`) of the columns of `y` by Householder QR.
fn orthonormalize(mut y: Mat<f32>, par: Par) -> Mat<f32> {
    let (m, n) = y.shape();
    let bs = recommended_block_size::<f32>(m, n);
    let mut coeff = Mat::<f32>::zeros(bs, n);
    let req = qr_in_place_scratch::<f32>(m, n, bs, par, Default::default())
        .or(apply_block_householder_sequence_on_the_left_in_place_scratch::<f32>(m, bs, n));
    let mut mem = MemBuffer::new(req);
    qr_in_place(y.as_mut(), coeff.as_mut(), par, MemStack::new(&mut mem), Default::default());
    let mut q = Mat::<f32>::identity(m, n);
    apply_block_householder_sequence_on_the_left_in_place_with_conj(
        y.as_ref(),
        coeff.as_ref(),
        Conj::No,
        q.as_mut(),
        par,
        MemStack::new(&mut mem),
    );
    q
}

/// `(U, s, V)` of a thin SVD, column-major faer factors.
type Factors = (Mat<f32>, Vec<f32>, Mat<f32>);

/// Thin SVD `b = U·diag(s)·Vᵀ` with explicit parallelism.
fn thin_svd(b: MatRef<'_, f32>, par: Par) -> Result<Factors, SvdError> {
    let (m, n) = b.shape();
    let k = m.min(n);
    let (mut u, mut v) = (Mat::<f32>::zeros(m, k), Mat::<f32>::zeros(n, k));
    let mut s = Diag::<f32>::zeros(k);
    let thin = ComputeSvdVectors::Thin;
    let mut mem = MemBuffer::new(svd_scratch::<f32>(m, n, thin, thin, par, Default::default()));
    faer_svd(b, s.as_mut(), Some(u.as_mut()), Some(v.as_mut()), par, MemStack::new(&mut mem), Default::default())
        .map_err(|e| SvdError::Factorization(format!("faer svd: {e:?}")))?;
    Ok((u, s.column_vector().iter().copied().collect(), v))
}

/// Packs `M ≈ U·diag(s)·Vᵀ` (`U`: rows × r, `V`: cols × r, both column-major faer matrices) into
/// row-major output with the canonical sign convention.
fn pack(u: MatRef<'_, f32>, s: &[f32], v: MatRef<'_, f32>, rank: usize) -> Result<TruncatedSvd, SvdError> {
    let (rows, cols) = (u.nrows(), v.nrows());
    let mut out =
        TruncatedSvd { rows, cols, rank, u: vec![0.0; rows * rank], s: s[..rank].to_vec(), vt: vec![0.0; rank * cols] };
    for k in 0..rank {
        let mut best = (0usize, 0.0f32);
        for i in 0..rows {
            if u[(i, k)].abs() > best.1 {
                best = (i, u[(i, k)].abs());
            }
        }
        let sign = if u[(best.0, k)] < 0.0 { -1.0f32 } else { 1.0 };
        for i in 0..rows {
            out.u[i * rank + k] = sign * u[(i, k)];
        }
        for j in 0..cols {
            out.vt[k * cols + j] = sign * v[(j, k)];
        }
    }
    if out.u.iter().chain(&out.s).chain(&out.vt).any(|x| !x.is_finite()) {
        return Err(SvdError::Factorization("non-finite result (overflow in f32?)".into()));
    }
    Ok(out)
}

/// Randomized truncated SVD of the row-major `rows × cols` matrix `data`.
///
/// Works on the tall orientation (`Mᵀ` when `rows < cols`), so the sketch is
/// `max(rows, cols) × (rank + oversample)`. The products with the matrix use all rayon threads
/// (`Par::rayon(0)`); QR and the small SVD run sequentially, so the output is bit-identical for
/// any thread count (see the module docs).
pub fn randomized_svd(data: &[f32], rows: usize, cols: usize, cfg: &RsvdConfig) -> Result<TruncatedSvd, SvdError> {
    let out = randomized_svd_par(data, rows, cols, cfg, Par::rayon(0));
    crate::simd::clear_upper_simd_state_everywhere();
    out
}

/// [`randomized_svd`] with `par` for the matrix products (QR and the small SVD are always `Par::Seq`).
fn randomized_svd_par(
    data: &[f32],
    rows: usize,
    cols: usize,
    cfg: &RsvdConfig,
    par: Par,
) -> Result<TruncatedSvd, SvdError> {
    validate(data, rows, cols, cfg.rank)?;
    let (a, transposed) = tall_view(data, rows, cols);
    let n = a.ncols();
    let l = cfg.rank.saturating_add(cfg.oversample).min(n);
    // Gaussian test matrix, drawn in a fixed (column-major) order.
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let gauss: Vec<f32> = (0..n * l).map(|_| rng.sample(StandardNormal)).collect();
    let omega = MatRef::from_column_major_slice(&gauss, n, l);
    // Range finder with subspace iteration, re-orthonormalizing after every product.
    let seq = Par::Seq;
    let mut q = orthonormalize(mul(a, omega, par), seq);
    for _ in 0..cfg.power_iters {
        let z = orthonormalize(mul(a.transpose(), q.as_ref(), par), seq);
        q = orthonormalize(mul(a, z.as_ref(), par), seq);
    }
    // Small SVD of B = Qᵀ A (l × n), lifted back with U = Q·Ub.
    let b = mul(q.transpose(), a, par);
    let (ub, s, vb) = thin_svd(b.as_ref(), seq)?;
    let r = cfg.rank;
    let u = mul(q.as_ref(), ub.get(.., ..r), par);
    let v = vb.get(.., ..r);
    if transposed { pack(v, &s, u.as_ref(), r) } else { pack(u.as_ref(), &s, v, r) }
}

/// Exact SVD (faer thin SVD of the whole matrix), truncated to `rank`; same sign convention as
/// [`randomized_svd`]. A reference for tests and a fallback for small matrices; runs sequentially
/// (`Par::Seq`) so its bits do not depend on the thread count either.
pub fn exact_svd(data: &[f32], rows: usize, cols: usize, rank: usize) -> Result<TruncatedSvd, SvdError> {
    validate(data, rows, cols, rank)?;
    let (a, transposed) = tall_view(data, rows, cols);
    let (u, s, v) = thin_svd(a, Par::Seq)?;
    crate::simd::clear_upper_simd_state();
    let (u, v) = (u.get(.., ..rank), v.get(.., ..rank));
    if transposed { pack(v, &s, u, rank) } else { pack(u, &s, v, rank) }
}

/// A row-major `rows × cols` matrix `Q1·diag(sigma)·Q2ᵀ` with random orthonormal `Q1`, `Q2` (seeded):
/// a known spectrum, to measure a truncated SVD's accuracy (`fedsb-client bench --svd`). `sigma` has
/// `min(rows, cols)` values.
pub fn matrix_with_spectrum(rows: usize, cols: usize, sigma: &[f32], seed: u64) -> Vec<f32> {
    let k = sigma.len().min(rows).min(cols);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut ortho = |n: usize| {
        let g: Vec<f32> = (0..n * k).map(|_| rng.sample(StandardNormal)).collect();
        orthonormalize(MatRef::from_column_major_slice(&g, n, k).to_owned(), Par::rayon(0))
    };
    let (q1, q2) = (ortho(rows), ortho(cols));
    let scaled = Mat::<f32>::from_fn(rows, k, |i, j| q1[(i, j)] * sigma[j]);
    let m = mul(scaled.as_ref(), q2.transpose(), Par::rayon(0));
    crate::simd::clear_upper_simd_state_everywhere();
    let mut out = Vec::with_capacity(rows * cols);
    for i in 0..rows {
        out.extend((0..cols).map(|j| m[(i, j)]));
    }
    out
}

impl TruncatedSvd {
    /// `‖M − U·diag(S)·Vᵀ‖_F / ‖M‖_F` for the row-major matrix `m` this factorizes.
    pub fn relative_error(&self, m: &[f32]) -> f64 {
        let u = MatRef::from_row_major_slice(&self.u, self.rows, self.rank);
        let us = Mat::<f32>::from_fn(self.rows, self.rank, |i, j| u[(i, j)] * self.s[j]);
        let vt = MatRef::from_row_major_slice(&self.vt, self.rank, self.cols);
        let approx = mul(us.as_ref(), vt, Par::rayon(0));
        crate::simd::clear_upper_simd_state_everywhere();
        let (mut num, mut den) = (0f64, 0f64);
        for i in 0..self.rows {
            for j in 0..self.cols {
                let x = m[i * self.cols + j] as f64;
                num += (x - approx[(i, j)] as f64).powi(2);
                den += x * x;
            }
        }
        (num / den.max(f64::MIN_POSITIVE)).sqrt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gaussian(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..rows * cols).map(|_| rng.sample(StandardNormal)).collect()
    }

    /// Random `n × k` matrix with orthonormal columns.
    fn orthonormal(n: usize, k: usize, seed: u64) -> Mat<f32> {
        let g = gaussian(n, k, seed);
        orthonormalize(MatRef::from_column_major_slice(&g, n, k).to_owned(), Par::Seq)
    }

    /// Row-major `Q1·diag(σ)·Q2ᵀ`.
    fn with_spectrum(q1: &Mat<f32>, sigma: &[f32], q2: &Mat<f32>) -> Vec<f32> {
        let scaled = Mat::<f32>::from_fn(q1.nrows(), sigma.len(), |i, j| q1[(i, j)] * sigma[j]);
        let m = mul(scaled.as_ref(), q2.transpose(), Par::Seq);
        let mut out = Vec::with_capacity(m.nrows() * m.ncols());
        for i in 0..m.nrows() {
            out.extend((0..m.ncols()).map(|j| m[(i, j)]));
        }
        out
    }

    fn u_mat(t: &TruncatedSvd) -> MatRef<'_, f32> {
        MatRef::from_row_major_slice(&t.u, t.rows, t.rank)
    }
    fn vt_mat(t: &TruncatedSvd) -> MatRef<'_, f32> {
        MatRef::from_row_major_slice(&t.vt, t.rank, t.cols)
    }

    /// ‖M − U S Vt‖_F in f64.
    fn residual(data: &[f32], t: &TruncatedSvd) -> f64 {
        let mut acc = 0.0f64;
        for i in 0..t.rows {
            for j in 0..t.cols {
                let approx: f64 =
                    (0..t.rank).map(|k| t.u[i * t.rank + k] as f64 * t.s[k] as f64 * t.vt[k * t.cols + j] as f64).sum();
                acc += (data[i * t.cols + j] as f64 - approx).powi(2);
            }
        }
        acc.sqrt()
    }

    /// Max |XᵀX − I| for a matrix with orthonormal columns.
    fn orth_defect(x: MatRef<'_, f32>) -> f32 {
        let g = mul(x.transpose(), x, Par::Seq);
        let mut worst = 0.0f32;
        for i in 0..g.nrows() {
            for j in 0..g.ncols() {
                worst = worst.max((g[(i, j)] - if i == j { 1.0 } else { 0.0 }).abs());
            }
        }
        worst
    }

    #[test]
    fn known_spectrum_values_and_subspace() {
        let (q1, q2) = (orthonormal(300, 60, 1), orthonormal(200, 60, 2));
        let slow: Vec<f32> = (0..60).map(|i| 1.0 / (1.0 + i as f32)).collect();
        let sharp: Vec<f32> = (0..60).map(|i| 0.5f32.powi(i)).collect();
        for sigma in [slow, sharp] {
            let m = with_spectrum(&q1, &sigma, &q2);
            let t = randomized_svd(&m, 300, 200, &RsvdConfig::new(10)).unwrap();
            assert_eq!((t.rows, t.cols, t.rank, t.u.len(), t.vt.len()), (300, 200, 10, 3000, 2000));
            for (k, (&got, &want)) in t.s.iter().zip(&sigma).enumerate() {
                assert!((got - want).abs() <= 1e-3 * want, "sigma_{k}: {got} vs {want}");
            }
            // Cosines of the principal angles between span(U) and span(Q1[:, :10]).
            let overlap = mul(u_mat(&t).transpose(), q1.get(.., ..10), Par::Seq);
            let (_, cosines, _) = thin_svd(overlap.as_ref(), Par::Seq).unwrap();
            assert!(cosines.iter().all(|&c| c > 0.999), "cosines {cosines:?}");
        }
    }

    #[test]
    fn factors_are_orthonormal() {
        let m = gaussian(150, 90, 3);
        for t in [randomized_svd(&m, 150, 90, &RsvdConfig::new(20)).unwrap(), exact_svd(&m, 150, 90, 20).unwrap()] {
            assert!(orth_defect(u_mat(&t)) < 1e-4);
            assert!(orth_defect(vt_mat(&t).transpose()) < 1e-4);
            assert!(t.s.windows(2).all(|w| w[0] >= w[1]) && t.s[19] > 0.0);
            for k in 0..t.rank {
                let col: Vec<f32> = (0..t.rows).map(|i| t.u[i * t.rank + k]).collect();
                let max = col.iter().copied().fold(0.0f32, |a, x| if x.abs() > a.abs() { x } else { a });
                assert!(max > 0.0, "sign convention violated in column {k}");
            }
        }
    }

    #[test]
    fn near_optimal_error_on_gaussian_and_sign_matrices() {
        let gauss = gaussian(256, 128, 4);
        let signs: Vec<f32> = gaussian(256, 128, 5).iter().map(|x| if *x >= 0.0 { 1.0 } else { -1.0 }).collect();
        for m in [gauss, signs] {
            let best = residual(&m, &exact_svd(&m, 256, 128, 16).unwrap());
            let got = residual(&m, &randomized_svd(&m, 256, 128, &RsvdConfig::new(16)).unwrap());
            assert!(got >= best * (1.0 - 1e-4), "beats Eckart-Young? {got} < {best}");
            assert!(got <= best * 1.01, "rsvd error {got} vs optimal {best}");
        }
    }

    #[test]
    fn wide_matrix_matches_exact() {
        let (q1, q2) = (orthonormal(70, 40, 6), orthonormal(230, 40, 7));
        let sigma: Vec<f32> = (0..40).map(|i| 3.0 * 0.8f32.powi(i)).collect();
        let m = with_spectrum(&q1, &sigma, &q2); // 70 × 230
        let t = randomized_svd(&m, 70, 230, &RsvdConfig::new(8)).unwrap();
        let e = exact_svd(&m, 70, 230, 8).unwrap();
        assert_eq!((t.rows, t.cols, t.u.len(), t.vt.len()), (70, 230, 70 * 8, 8 * 230));
        for (a, b) in t.s.iter().zip(&e.s) {
            assert!((a - b).abs() <= 1e-3 * b, "{a} vs {b}");
        }
        // Canonical signs make the factors themselves comparable.
        let du = t.u.iter().zip(&e.u).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        let dv = t.vt.iter().zip(&e.vt).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(du < 1e-2 && dv < 1e-2, "du {du} dv {dv}");
        assert!((residual(&m, &t) - residual(&m, &e)).abs() < 1e-3 * residual(&m, &e).max(1e-3));
    }

    #[test]
    fn deterministic_and_seed_dependent() {
        let m = gaussian(200, 120, 8);
        let cfg = RsvdConfig::new(12);
        let (a, b) = (randomized_svd(&m, 200, 120, &cfg).unwrap(), randomized_svd(&m, 200, 120, &cfg).unwrap());
        let bits =
            |t: &TruncatedSvd| -> Vec<u32> { t.u.iter().chain(&t.s).chain(&t.vt).map(|x| x.to_bits()).collect() };
        assert_eq!(bits(&a), bits(&b));
        let c = randomized_svd(&m, 200, 120, &RsvdConfig { seed: 7, ..cfg }).unwrap();
        assert_ne!(bits(&a), bits(&c));
        let (ra, rc) = (residual(&m, &a), residual(&m, &c));
        assert!((ra - rc).abs() <= 5e-3 * ra, "{ra} vs {rc}");
    }

    #[test]
    fn thread_count_does_not_change_bits() {
        let m = gaussian(700, 300, 9); // big enough for faer to actually split the work
        let cfg = RsvdConfig::new(24);
        let bits = |par| -> Vec<u32> {
            let t = randomized_svd_par(&m, 700, 300, &cfg, par).unwrap();
            t.u.iter().chain(&t.s).chain(&t.vt).map(|x| x.to_bits()).collect()
        };
        let seq = bits(Par::Seq);
        for n in [1, 2, 3, 8] {
            let diff = seq.iter().zip(bits(Par::rayon(n))).filter(|(a, b)| **a != *b).count();
            assert_eq!(diff, 0, "Par::rayon({n}) changes {diff} of {} output values", seq.len());
        }
    }

    #[test]
    fn zero_and_rank_deficient_matrices() {
        let zero = vec![0.0f32; 40 * 30];
        let t = randomized_svd(&zero, 40, 30, &RsvdConfig::new(5)).unwrap();
        assert!(t.s.iter().all(|&x| x == 0.0) && t.u.iter().chain(&t.vt).all(|x| x.is_finite()));
        // Rank 3 matrix, rank 10 requested: 3 exact values, then (numerically) zeros.
        let (q1, q2) = (orthonormal(90, 3, 11), orthonormal(50, 3, 12));
        let m = with_spectrum(&q1, &[4.0, 2.0, 1.0], &q2);
        let t = randomized_svd(&m, 90, 50, &RsvdConfig::new(10)).unwrap();
        for (got, want) in t.s.iter().zip([4.0f32, 2.0, 1.0]) {
            assert!((got - want).abs() < 1e-4 * want, "{got} vs {want}");
        }
        assert!(t.s[3..].iter().all(|&x| x < 1e-5), "{:?}", t.s);
        assert!(residual(&m, &t) < 1e-4);
    }

    #[test]
    fn bad_input_is_rejected() {
        let m = gaussian(6, 4, 10);
        let cfg = |r| RsvdConfig::new(r);
        assert!(matches!(randomized_svd(&m[..23], 6, 4, &cfg(2)), Err(SvdError::Shape { len: 23, rows: 6, cols: 4 })));
        assert!(matches!(exact_svd(&m, usize::MAX, 2, 1), Err(SvdError::Shape { .. })));
        assert!(matches!(randomized_svd(&m, 6, 4, &cfg(0)), Err(SvdError::Rank { rank: 0, .. })));
        assert!(matches!(randomized_svd(&m, 6, 4, &cfg(5)), Err(SvdError::Rank { rank: 5, .. })));
        assert!(matches!(exact_svd(&m, 6, 4, 5), Err(SvdError::Rank { rank: 5, .. })));
        assert!(matches!(randomized_svd(&[], 0, 0, &cfg(1)), Err(SvdError::Rank { .. })));
        let mut bad = m.clone();
        bad[13] = f32::NAN;
        assert!(matches!(randomized_svd(&bad, 6, 4, &cfg(2)), Err(SvdError::NonFinite { index: 13 })));
        bad[13] = f32::INFINITY;
        assert!(matches!(exact_svd(&bad, 6, 4, 2), Err(SvdError::NonFinite { index: 13 })));
        // Full rank with the sketch clamped to min(rows, cols) is fine.
        assert_eq!(randomized_svd(&m, 6, 4, &cfg(4)).unwrap().s.len(), 4);
    }
}
