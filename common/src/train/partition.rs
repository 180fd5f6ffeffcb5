//! Splitting a dataset across simulated clients: IID (seeded shuffle, equal slices) or non-IID by label
//! with a Dirichlet prior (each label's examples spread over clients with proportions ~ Dir(α); small α
//! gives each client few labels).
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_distr::Distribution;

use crate::{Error, Result};

/// Example indices `0..n` split into `k` near-equal IID shards (seeded).
pub fn iid_split(n: usize, k: usize, seed: u64) -> Result<Vec<Vec<usize>>> {
    if k == 0 || n < k {
        return Err(Error::Config(format!("cannot split {n} examples over {k} clients")));
    }
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    Ok((0..k).map(|i| idx[i * n / k..(i + 1) * n / k].to_vec()).collect())
}

/// Example indices split over `k` clients by label with Dirichlet(`alpha`) proportions per label (seeded).
/// Every client gets at least one example.
pub fn dirichlet_split(labels: &[usize], k: usize, alpha: f64, seed: u64) -> Result<Vec<Vec<usize>>> {
    if k == 0 || labels.len() < k {
        return Err(Error::Config(format!("cannot split {} examples over {k} clients", labels.len())));
    }
    if !(alpha.is_finite() && alpha > 0.0) {
        return Err(Error::Config(format!("the Dirichlet concentration must be positive, got {alpha}")));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let num_labels = labels.iter().max().map_or(0, |m| m + 1);
    let mut shards: Vec<Vec<usize>> = vec![Vec::new(); k];
    // Dirichlet(α, …, α) as normalized Gamma(α, 1) draws (k is only known at run time).
    let gamma = rand_distr::Gamma::new(alpha, 1.0).map_err(|e| Error::Config(e.to_string()))?;
    for label in 0..num_labels {
        let mut idx: Vec<usize> = labels.iter().enumerate().filter(|(_, l)| **l == label).map(|(i, _)| i).collect();
        idx.shuffle(&mut rng);
        let g: Vec<f64> = (0..k).map(|_| gamma.sample(&mut rng)).collect();
        let total: f64 = g.iter().sum::<f64>().max(f64::MIN_POSITIVE);
        let p: Vec<f64> = g.iter().map(|x| x / total).collect();
        let mut start = 0;
        let mut acc = 0.0;
        for (c, pc) in p.iter().enumerate() {
            acc += pc;
            let end = if c + 1 == k { idx.len() } else { ((acc * idx.len() as f64).round() as usize).min(idx.len()) };
            shards[c].extend_from_slice(&idx[start..end.max(start)]);
            start = end.max(start);
        }
    }
    // No empty client: move one example from the largest shard to each empty one.
    for c in 0..k {
        if shards[c].is_empty() {
            let big = (0..k).max_by_key(|&i| shards[i].len()).unwrap_or(0);
            if let Some(x) = shards[big].pop() {
                shards[c].push(x);
            }
        }
    }
    for s in &mut shards {
        s.sort_unstable();
    }
    Ok(shards)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iid_covers_everything_once() {
        let s = iid_split(10, 3, 1).unwrap();
        let mut all: Vec<usize> = s.concat();
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        assert_eq!(s.iter().map(Vec::len).collect::<Vec<_>>(), vec![3, 3, 4]);
        assert_eq!(s, iid_split(10, 3, 1).unwrap());
        assert!(iid_split(2, 3, 1).is_err());
    }

    #[test]
    fn dirichlet_is_a_partition_and_small_alpha_skews_labels() {
        let labels: Vec<usize> = (0..1000).map(|i| i % 2).collect();
        for alpha in [0.1, 100.0] {
            let s = dirichlet_split(&labels, 4, alpha, 7).unwrap();
            let mut all: Vec<usize> = s.concat();
            all.sort();
            assert_eq!(all, (0..1000).collect::<Vec<_>>(), "alpha {alpha}");
            assert!(s.iter().all(|x| !x.is_empty()));
        }
        let skew = |alpha: f64| -> f64 {
            let s = dirichlet_split(&labels, 4, alpha, 7).unwrap();
            s.iter()
                .map(|x| {
                    let ones = x.iter().filter(|&&i| labels[i] == 1).count() as f64;
                    (ones / x.len() as f64 - 0.5).abs()
                })
                .sum::<f64>()
                / 4.0
        };
        assert!(skew(0.1) > skew(100.0) + 0.1, "{} vs {}", skew(0.1), skew(100.0));
        assert!(dirichlet_split(&labels, 4, 0.0, 1).is_err());
    }
}
