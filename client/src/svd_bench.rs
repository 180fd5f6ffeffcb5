//! `fedsb-client bench --svd`: the LoRA-SB init's randomized truncated SVD at the shapes and ranks of the
//! PyTorch peer's `bench_svd.py` (`torch.svd_lowrank(q=r, niter=10)`): time on a Gaussian matrix, and accuracy
//! on a matrix with the decaying spectrum σᵢ = 1/(1+i) (relative Frobenius error of the rank-r
//! reconstruction beside the optimal one, and the largest relative error of the r singular values).
use std::time::Instant;

use anyhow::{Context, Result};
use fedsb_common::adapter::svd::{RsvdConfig, matrix_with_spectrum, randomized_svd};
use fedsb_common::benchstats::median;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use serde_json::json;

/// Parses `576x576,1536x576` into shapes.
pub fn parse_shapes(s: &str) -> Result<Vec<(usize, usize)>> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(|x| {
            let (r, c) = x.split_once('x').with_context(|| format!("shape `{x}` is not ROWSxCOLS"))?;
            Ok((r.trim().parse()?, c.trim().parse()?))
        })
        .collect()
}

/// Runs the SVD bench: `iters` timed runs (after one warm-up) per shape and rank.
pub fn run(json: bool, shapes: &[(usize, usize)], ranks: &[usize], iters: usize, cfg: (usize, usize)) -> Result<()> {
    let (oversample, power_iters) = cfg;
    let threads = candle_core::utils::get_num_threads();
    if !json {
        println!(
            "randomized SVD (oversample {oversample}, {power_iters} power iterations; median of {iters}, {threads} threads)"
        );
        println!(
            "  {:<12} {:>5} {:>10} {:>14} {:>14} {:>16}",
            "shape", "r", "ms", "rel. error", "optimal", "max σ rel. err"
        );
    }
    for &(rows, cols) in shapes {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let gauss: Vec<f32> = (0..rows * cols).map(|_| rng.sample(StandardNormal)).collect();
        let k = rows.min(cols);
        let sigma: Vec<f32> = (0..k).map(|i| 1.0 / (1.0 + i as f32)).collect();
        let decaying = matrix_with_spectrum(rows, cols, &sigma, 1);
        let total_sq: f64 = sigma.iter().map(|&s| (s as f64).powi(2)).sum();
        for &r in ranks.iter().filter(|&&r| r <= k) {
            let c = RsvdConfig { rank: r, oversample, power_iters, seed: 42 };
            randomized_svd(&gauss, rows, cols, &c)?;
            let mut t = Vec::with_capacity(iters);
            for _ in 0..iters {
                let s = Instant::now();
                let out = randomized_svd(&gauss, rows, cols, &c)?;
                t.push(s.elapsed().as_secs_f64() * 1e3);
                drop(out);
            }
            let ms = median(&mut t);
            let f = randomized_svd(&decaying, rows, cols, &c)?;
            let err = f.relative_error(&decaying);
            let optimal = (sigma[r..].iter().map(|&s| (s as f64).powi(2)).sum::<f64>() / total_sq).sqrt();
            let sv_err = f.s.iter().zip(&sigma).map(|(&a, &b)| ((a - b).abs() / b) as f64).fold(0.0, f64::max);
            if json {
                println!(
                    "{}",
                    json!({"what": "svd", "fn": "randomized_svd", "rows": rows, "cols": cols, "r": r,
                           "oversample": oversample, "power_iters": power_iters, "iters": iters,
                           "ms_median": ms, "threads": threads, "spectrum": "1/(1+i)",
                           "rel_fro_err": err, "rel_fro_err_optimal": optimal, "max_rel_sigma_err": sv_err})
                );
            } else {
                println!(
                    "  {:<12} {:>5} {:>10.2} {:>14.6} {:>14.6} {:>16.2e}",
                    format!("{rows}x{cols}"),
                    r,
                    ms,
                    err,
                    optimal,
                    sv_err
                );
            }
        }
    }
    Ok(())
}
