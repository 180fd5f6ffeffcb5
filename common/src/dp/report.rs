//! The privacy side of a federated run: [`DpSpec`] (what the run requires of every client), [`ClientPrivacy`]
//! (a client's own accounting over every round it trains in, kept on its disk) and [`DpReport`] (what a client
//! sends with each update, and what the coordinator checks).
//!
//! Accounting is per client and record-level: a client's ε covers its own local dataset, over every local step
//! it ever took in the run (a round trained twice — after a coordinator restart, say — is charged twice).
//! Client shards are disjoint, so the global model inherits each client's (ε, δ) by post-processing and
//! parallel composition; the run's guarantee is the worst client's.
use serde::{Deserialize, Serialize};

use super::accountant::{RdpAccountant, epsilon_for, noise_multiplier_for};
use super::sgd::{DpSgdConfig, sample_rate};
use crate::{Error, Result};

/// Tolerance on ε of the noise calibration (Opacus' `get_noise_multiplier` default).
pub const EPSILON_TOLERANCE: f64 = 0.01;

/// DP-SGD required of every client of a run (the `[dp]` section of the run config, sent in the client spec).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpSpec {
    /// `C`: per-sample gradient clipping norm.
    pub max_grad_norm: f64,
    /// Each client's privacy budget ε for the whole run.
    pub target_epsilon: f64,
    /// δ; must be below 1 / (each client's local dataset size).
    pub delta: f64,
    /// A fixed noise multiplier σ for every client. When absent each client calibrates its own σ so that
    /// `rounds` rounds of local steps spend exactly its budget (given its sampling rate).
    #[serde(default)]
    pub noise_multiplier: Option<f64>,
    /// Rounds the budget must last (filled in by the coordinator from the run's `rounds`).
    #[serde(default)]
    pub rounds: u64,
    /// Accept updates whose noise came from the seeded test generator (never in a real run).
    #[serde(default)]
    pub allow_insecure_noise: bool,
}

impl DpSpec {
    /// Checks the settings.
    pub fn validate(&self) -> Result<()> {
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm > 0.0) {
            return Err(Error::Config(format!("dp.max_grad_norm must be positive, got {}", self.max_grad_norm)));
        }
        if !(self.target_epsilon.is_finite() && self.target_epsilon > 0.0) {
            return Err(Error::Config(format!("dp.target_epsilon must be positive, got {}", self.target_epsilon)));
        }
        if !(self.delta > 0.0 && self.delta < 1.0) {
            return Err(Error::Config(format!("dp.delta must be in (0, 1), got {}", self.delta)));
        }
        if let Some(s) = self.noise_multiplier
            && !(s.is_finite() && s > 0.0)
        {
            return Err(Error::Config(format!("dp.noise_multiplier must be positive, got {s}")));
        }
        Ok(())
    }

    /// Checks that δ is below `1 / n` for a client with `n` examples; the message explains why.
    pub fn check_delta(&self, n: u64) -> Result<()> {
        check_delta(self.delta, n)
    }
}

/// Refuses `δ ≥ 1/n`: with `n` records, a mechanism that publishes one random record outright is (0, 1/n)-DP,
/// so a δ of that size permits leaking a whole record.
pub fn check_delta(delta: f64, n: u64) -> Result<()> {
    if n == 0 {
        return Err(Error::Data("DP accounting needs at least one local example".into()));
    }
    if delta >= 1.0 / n as f64 {
        return Err(Error::Config(format!(
            "δ = {delta:e} is not below 1/N = {:e} for N = {n} local examples: a δ that large allows publishing a \
             whole record; choose δ < 1/N (commonly δ ≤ 1/N², e.g. {:e})",
            1.0 / n as f64,
            1.0 / (n as f64 * n as f64)
        )));
    }
    Ok(())
}

/// A client's privacy spending, reported with each update.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DpReport {
    /// ε spent so far (after this update's steps), at `delta`.
    pub epsilon: f64,
    /// δ.
    pub delta: f64,
    /// The RDP order that gave ε.
    pub best_order: f64,
    /// Local DP-SGD steps charged so far, over every round.
    pub steps: u64,
    /// σ.
    pub noise_multiplier: f64,
    /// Poisson sampling rate q.
    pub sample_rate: f64,
    /// C.
    pub max_grad_norm: f64,
    /// Whether the noise came from the OS-seeded CSPRNG (false: test mode).
    pub secure_noise: bool,
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs()).max(1.0)
}

impl DpReport {
    /// The coordinator's check of a report for an update of `update_steps` local steps trained on
    /// `num_examples` examples with expected batch `expected_batch`: it matches the run's spec (C, δ, σ if
    /// fixed), δ < 1/N, q = L/N, the noise was secure, it charges at least the update's own steps, and ε —
    /// recomputed here from (q, σ, steps, δ), not taken on trust — equals the reported one and is within the
    /// budget.
    pub fn verify(&self, spec: &DpSpec, num_examples: u64, expected_batch: usize, update_steps: u64) -> Result<()> {
        let bad = |m: String| Err(Error::Config(format!("DP report refused: {m}")));
        for (what, v) in [
            ("epsilon", self.epsilon),
            ("delta", self.delta),
            ("noise_multiplier", self.noise_multiplier),
            ("sample_rate", self.sample_rate),
            ("max_grad_norm", self.max_grad_norm),
        ] {
            if !v.is_finite() {
                return bad(format!("{what} is {v}"));
            }
        }
        if !close(self.max_grad_norm, spec.max_grad_norm, 1e-9) {
            return bad(format!(
                "clipping norm C = {} but the run requires {}",
                self.max_grad_norm, spec.max_grad_norm
            ));
        }
        if !close(self.delta, spec.delta, 1e-12) {
            return bad(format!("δ = {} but the run requires {}", self.delta, spec.delta));
        }
        check_delta(self.delta, num_examples).or_else(|e| bad(e.to_string()))?;
        if self.noise_multiplier.is_nan() || self.noise_multiplier <= 0.0 {
            return bad(format!("noise multiplier σ = {} (no noise)", self.noise_multiplier));
        }
        if let Some(s) = spec.noise_multiplier
            && !close(self.noise_multiplier, s, 1e-9)
        {
            return bad(format!("σ = {} but the run fixes σ = {s}", self.noise_multiplier));
        }
        let q = sample_rate(expected_batch, num_examples as usize);
        if !close(self.sample_rate, q, 1e-9) {
            return bad(format!(
                "sampling rate q = {} but an expected batch of {expected_batch} from {num_examples} examples gives {q}",
                self.sample_rate
            ));
        }
        if !self.secure_noise && !spec.allow_insecure_noise {
            return bad("the noise came from the seeded test generator".into());
        }
        if self.steps == 0 || self.steps < update_steps {
            return bad(format!(
                "the report charges {} DP-SGD steps but this update alone took {update_steps}",
                self.steps
            ));
        }
        let (eps, _) = epsilon_for(self.sample_rate, self.noise_multiplier, self.steps, self.delta)?;
        if !close(self.epsilon, eps, 1e-6) {
            return bad(format!(
                "reported ε = {} but (q = {}, σ = {}, {} steps, δ = {}) gives ε = {eps}",
                self.epsilon, self.sample_rate, self.noise_multiplier, self.steps, self.delta
            ));
        }
        if eps > spec.target_epsilon * (1.0 + 1e-9) {
            return bad(format!("ε = {eps:.4} exceeds the run's budget ε = {}", spec.target_epsilon));
        }
        Ok(())
    }
}

/// Why a client does not train another round.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BudgetExceeded {
    /// ε after the round it would train.
    pub epsilon_after: f64,
    /// The budget.
    pub target_epsilon: f64,
    /// ε spent so far.
    pub epsilon_now: f64,
}

impl std::fmt::Display for BudgetExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "privacy budget: the next round would bring ε from {:.4} to {:.4}, above the budget ε = {}; this client \
             stops taking tasks",
            self.epsilon_now, self.epsilon_after, self.target_epsilon
        )
    }
}

/// A client's privacy accounting for one run: its σ and q, and an accountant charged with every local step it
/// ever took. Serializable, so a restarted client continues where it stopped instead of starting from ε = 0.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClientPrivacy {
    /// The run this accounting belongs to.
    pub run_id: String,
    /// The run's DP spec.
    pub spec: DpSpec,
    /// Local examples N.
    pub num_examples: u64,
    /// Expected batch L.
    pub expected_batch: usize,
    /// q = L / N.
    pub sample_rate: f64,
    /// σ (the spec's, or calibrated for this client).
    pub noise_multiplier: f64,
    /// Steps charged, by (σ, q).
    pub accountant: RdpAccountant,
    /// Rounds trained (a round trained twice appears twice).
    pub rounds: Vec<u64>,
}

impl ClientPrivacy {
    /// Plans a client's DP: checks δ < 1/N, sets q = L/N and σ (fixed by the spec, or the smallest σ whose ε
    /// after `spec.rounds × steps_per_round` steps is within the budget).
    pub fn plan(
        run_id: &str,
        spec: &DpSpec,
        num_examples: u64,
        expected_batch: usize,
        steps_per_round: u64,
    ) -> Result<Self> {
        spec.validate()?;
        spec.check_delta(num_examples)?;
        let q = sample_rate(expected_batch, num_examples as usize);
        let sigma = match spec.noise_multiplier {
            Some(s) => s,
            None => {
                let total = spec.rounds.max(1) * steps_per_round;
                noise_multiplier_for(spec.target_epsilon, spec.delta, q, total, EPSILON_TOLERANCE)?
            }
        };
        Ok(Self {
            run_id: run_id.to_string(),
            spec: spec.clone(),
            num_examples,
            expected_batch,
            sample_rate: q,
            noise_multiplier: sigma,
            accountant: RdpAccountant::new(),
            rounds: Vec::new(),
        })
    }

    /// The DP-SGD settings of a local round (`physical` is the largest batch run at once).
    pub fn sgd_config(&self, physical: usize) -> DpSgdConfig {
        DpSgdConfig {
            max_grad_norm: self.spec.max_grad_norm,
            noise_multiplier: self.noise_multiplier,
            expected_batch_size: self.expected_batch,
            physical_batch_size: physical.max(1),
        }
    }

    /// (ε, best order) spent so far (0 before any step).
    pub fn epsilon(&self) -> Result<(f64, f64)> {
        if self.accountant.steps() == 0 {
            return Ok((0.0, f64::NAN));
        }
        self.accountant.epsilon(self.spec.delta)
    }

    /// Whether `steps` more steps stay within the budget: `Err` says by how much they would not.
    pub fn check_round(&self, steps: u64) -> Result<std::result::Result<f64, BudgetExceeded>> {
        let mut next = self.accountant.clone();
        next.step(self.noise_multiplier, self.sample_rate, steps)?;
        let (after, _) = next.epsilon(self.spec.delta)?;
        if after > self.spec.target_epsilon * (1.0 + 1e-9) {
            return Ok(Err(BudgetExceeded {
                epsilon_after: after,
                target_epsilon: self.spec.target_epsilon,
                epsilon_now: self.epsilon()?.0,
            }));
        }
        Ok(Ok(after))
    }

    /// Charges a round's `steps` (call before its update leaves the client, whether or not it is accepted).
    pub fn charge(&mut self, round: u64, steps: u64) -> Result<()> {
        self.accountant.step(self.noise_multiplier, self.sample_rate, steps)?;
        self.rounds.push(round);
        Ok(())
    }

    /// The report for the update of the last charged round.
    pub fn report(&self, secure_noise: bool) -> Result<DpReport> {
        let (epsilon, best_order) = self.accountant.epsilon(self.spec.delta)?;
        Ok(DpReport {
            epsilon,
            delta: self.spec.delta,
            best_order,
            steps: self.accountant.steps(),
            noise_multiplier: self.noise_multiplier,
            sample_rate: self.sample_rate,
            max_grad_norm: self.spec.max_grad_norm,
            secure_noise,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> DpSpec {
        DpSpec {
            max_grad_norm: 0.1,
            target_epsilon: 3.0,
            delta: 1e-5,
            noise_multiplier: None,
            rounds: 3,
            allow_insecure_noise: false,
        }
    }

    #[test]
    fn delta_must_be_below_one_over_n() {
        assert!(check_delta(1e-5, 1000).is_ok());
        let e = check_delta(1e-3, 1000).unwrap_err().to_string();
        assert!(e.contains("1/N") && e.contains("1000"), "{e}");
        assert!(check_delta(1e-3, 0).is_err());
        assert!(ClientPrivacy::plan("r", &DpSpec { delta: 0.01, ..spec() }, 200, 16, 10).is_err());
    }

    #[test]
    fn calibrated_budget_lasts_exactly_the_planned_rounds() {
        let mut p = ClientPrivacy::plan("r", &spec(), 2000, 32, 40).unwrap();
        assert!((p.sample_rate - 0.016).abs() < 1e-12);
        for round in 1..=3 {
            let after = p.check_round(40).unwrap().expect("within budget");
            p.charge(round, 40).unwrap();
            assert!((p.epsilon().unwrap().0 - after).abs() < 1e-12);
        }
        let eps = p.epsilon().unwrap().0;
        assert!(eps <= 3.0 && eps > 3.0 - EPSILON_TOLERANCE - 1e-9, "ε after the planned rounds: {eps}");
        let over = p.check_round(40).unwrap().unwrap_err();
        assert!(over.epsilon_after > 3.0);
        assert!(over.to_string().contains("stops taking tasks"));
    }

    #[test]
    fn the_coordinator_recomputes_epsilon_and_refuses_mismatches() {
        let mut p = ClientPrivacy::plan("r", &spec(), 2000, 32, 40).unwrap();
        p.charge(1, 40).unwrap();
        let good = p.report(true).unwrap();
        good.verify(&spec(), 2000, 32, 40).unwrap();
        let cases: Vec<(DpReport, &str)> = vec![
            (DpReport { epsilon: good.epsilon / 2.0, ..good.clone() }, "gives ε"),
            (DpReport { max_grad_norm: 1.0, ..good.clone() }, "clipping norm"),
            (DpReport { delta: 1e-3, ..good.clone() }, "δ"),
            (DpReport { sample_rate: 0.001, ..good.clone() }, "sampling rate"),
            (DpReport { secure_noise: false, ..good.clone() }, "test generator"),
            (DpReport { noise_multiplier: 0.0, ..good.clone() }, "no noise"),
            (DpReport { epsilon: f64::NAN, ..good.clone() }, "NaN"),
        ];
        for (r, needle) in cases {
            let e = r.verify(&spec(), 2000, 32, 40).unwrap_err().to_string();
            assert!(e.contains(needle), "{needle}: {e}");
        }
        // Over budget: more steps than the calibration allowed.
        let mut over = p.clone();
        over.charge(2, 400).unwrap();
        let e = over.report(true).unwrap().verify(&spec(), 2000, 32, 40).unwrap_err().to_string();
        assert!(e.contains("exceeds the run's budget"), "{e}");
        // Fewer steps charged than the update took.
        let e = good.verify(&spec(), 2000, 32, 41).unwrap_err().to_string();
        assert!(e.contains("this update alone took 41"), "{e}");
        // δ ≥ 1/N for a client with fewer examples.
        assert!(good.verify(&spec(), 50_000_000, 32, 40).is_err());
        let small = DpSpec { delta: 1e-2, ..spec() };
        assert!(DpReport { delta: 1e-2, ..good }.verify(&small, 2000, 32, 40).unwrap_err().to_string().contains("1/N"));
    }
}
