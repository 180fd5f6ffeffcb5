//! [`NoiseRng`]: the Gaussian noise of DP-SGD, from a cryptographically secure generator.
//!
//! How a sample is drawn: a ChaCha20 stream cipher generator ([`rand_chacha::ChaCha20Rng`], a CSPRNG) is seeded
//! with 32 bytes from the operating system's entropy source (`getrandom`: the `getrandom(2)` system call on
//! Linux) when the trainer starts. Each coordinate of the noise is `σ·C·z` with `z` a standard normal variate
//! drawn in `f64` by the ziggurat method of `rand_distr::StandardNormal` from that stream, then rounded to
//! `f32` (the precision of the gradients it is added to). The generator is never seeded from a number except in
//! the explicit, loudly labelled test mode ([`NoiseRng::insecure_seeded`]), whose reports say so and which a
//! coordinator that requires DP refuses unless its run spec allows it.
//!
//! Known limit, shared with Opacus and every floating-point DP-SGD: noise is not sampled on a discrete grid, so
//! the guarantees hold for the ideal real-valued mechanism (Mironov 2012 describes attacks on textbook
//! floating-point Laplace samplers; none is known against DP-SGD's Gaussian noise on gradients).
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::{Error, Result};

/// The noise generator of one DP-SGD run.
pub struct NoiseRng {
    rng: ChaCha20Rng,
    secure: bool,
}

impl std::fmt::Debug for NoiseRng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the generator's state.
        f.debug_struct("NoiseRng").field("secure", &self.secure).finish_non_exhaustive()
    }
}

impl NoiseRng {
    /// A ChaCha20 generator seeded from the operating system's entropy source: the generator to use.
    pub fn from_os() -> Result<Self> {
        let mut seed = [0u8; 32];
        getrandom_fill(&mut seed)?;
        Ok(Self { rng: ChaCha20Rng::from_seed(seed), secure: true })
    }

    /// **Test mode only**: a generator seeded from `seed`, so a run can be repeated bit for bit. Noise from it
    /// gives no privacy against anyone who knows or guesses the seed; [`Self::is_secure`] is false and every
    /// DP report made with it says so.
    pub fn insecure_seeded(seed: u64) -> Self {
        Self { rng: ChaCha20Rng::seed_from_u64(seed), secure: false }
    }

    /// Whether the generator was seeded from the operating system (false in test mode).
    pub fn is_secure(&self) -> bool {
        self.secure
    }

    /// A uniform draw from [0, 1) with 53 random bits (Poisson sampling).
    pub fn uniform(&mut self) -> f64 {
        use rand::Rng;
        self.rng.random::<f64>()
    }

    /// `n` independent draws from N(0, std²), as `f32`.
    pub fn gaussian(&mut self, n: usize, std: f64) -> Result<Vec<f32>> {
        if !(std.is_finite() && std >= 0.0) {
            return Err(Error::Config(format!("noise standard deviation must be finite and ≥ 0, got {std}")));
        }
        Ok((0..n)
            .map(|_| {
                let z: f64 = StandardNormal.sample(&mut self.rng);
                (std * z) as f32
            })
            .collect())
    }
}

/// Fills `buf` from the operating system's entropy source.
fn getrandom_fill(buf: &mut [u8]) -> Result<()> {
    use rand::TryRngCore;
    rand::rngs::OsRng
        .try_fill_bytes(buf)
        .map_err(|e| Error::Config(format!("the operating system's entropy source failed: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_seeded_generators_differ_and_test_mode_repeats() {
        let a = NoiseRng::from_os().unwrap().gaussian(8, 1.0).unwrap();
        let b = NoiseRng::from_os().unwrap().gaussian(8, 1.0).unwrap();
        assert_ne!(a, b);
        assert!(NoiseRng::from_os().unwrap().is_secure());
        let mut s = NoiseRng::insecure_seeded(7);
        assert!(!s.is_secure());
        assert_eq!(s.gaussian(8, 1.0).unwrap(), NoiseRng::insecure_seeded(7).gaussian(8, 1.0).unwrap());
        assert!(s.gaussian(1, f64::NAN).is_err());
        assert!(s.gaussian(1, -1.0).is_err());
    }

    #[test]
    fn draws_have_the_requested_moments() {
        let mut g = NoiseRng::insecure_seeded(1);
        let n = 200_000;
        let v = g.gaussian(n, 0.5).unwrap();
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n as f64;
        // Standard errors: mean 0.5/√n ≈ 0.0011, variance ≈ 0.25·√(2/n) ≈ 0.0008.
        assert!(mean.abs() < 0.006, "mean {mean}");
        assert!((var - 0.25).abs() < 0.005, "variance {var}");
        let tail = v.iter().filter(|&&x| (x as f64).abs() > 1.0).count() as f64 / n as f64;
        // P(|z| > 2) = 0.0455.
        assert!((tail - 0.0455).abs() < 0.003, "tail {tail}");
    }
}
