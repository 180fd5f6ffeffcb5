//! [`ClientSpec`]: what every client of a federated run must agree on, sent by the coordinator when a client
//! joins (as JSON), and [`LocalTraining`], the settings of a client's local round.
use serde::{Deserialize, Serialize};

use crate::adapter::AdapterConfig;
use crate::model::TaskKind;
use crate::train::{ScheduleKind, TrainConfig};
use crate::wire::WireDtype;
use crate::{Error, Result};

/// Settings of one local round on a client (a fresh AdamW and schedule each round, as in the Fed-SB code).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalTraining {
    /// Optimizer steps per round (overrides `epochs`).
    #[serde(default)]
    pub steps: Option<usize>,
    /// Passes over the local data per round (default 1).
    #[serde(default = "one")]
    pub epochs: f64,
    /// Examples per micro-batch.
    #[serde(default = "batch")]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[serde(default = "one_usize")]
    pub grad_accum: usize,
    /// Peak learning rate.
    #[serde(default = "lr")]
    pub lr: f64,
    /// Fraction of the round's steps of linear warm-up.
    #[serde(default = "warmup")]
    pub warmup_ratio: f64,
    /// Decay after warm-up.
    #[serde(default = "schedule")]
    pub schedule: ScheduleKind,
    /// AdamW weight decay.
    #[serde(default)]
    pub weight_decay: f64,
    /// Gradient-norm clipping (none when absent).
    #[serde(default = "clip")]
    pub max_grad_norm: Option<f64>,
    /// Longest sequence in tokens.
    #[serde(default = "max_len")]
    pub max_len: usize,
}

fn one() -> f64 {
    1.0
}
fn one_usize() -> usize {
    1
}
fn batch() -> usize {
    16
}
fn lr() -> f64 {
    5e-3
}
fn warmup() -> f64 {
    0.06
}
fn schedule() -> ScheduleKind {
    ScheduleKind::Linear
}
fn clip() -> Option<f64> {
    Some(1.0)
}
fn max_len() -> usize {
    128
}

impl Default for LocalTraining {
    fn default() -> Self {
        Self {
            steps: None,
            epochs: one(),
            batch_size: batch(),
            grad_accum: 1,
            lr: lr(),
            warmup_ratio: warmup(),
            schedule: schedule(),
            weight_decay: 0.0,
            max_grad_norm: clip(),
            max_len: max_len(),
        }
    }
}

impl LocalTraining {
    /// The trainer settings of round `round` (the data order's seed mixes the run seed and the round).
    pub fn train_config(&self, seed: u64, round: u64) -> TrainConfig {
        TrainConfig {
            lr: self.lr,
            epochs: self.epochs,
            max_steps: self.steps,
            batch_size: self.batch_size,
            grad_accum: self.grad_accum,
            warmup_ratio: self.warmup_ratio,
            schedule: self.schedule,
            weight_decay: self.weight_decay,
            max_grad_norm: self.max_grad_norm,
            seed: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(round),
        }
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<()> {
        self.train_config(0, 0).validate()?;
        if self.max_len < 2 {
            return Err(Error::Config("max_len must be at least 2".into()));
        }
        Ok(())
    }
}

/// What every client of a run must agree on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClientSpec {
    /// The run.
    pub run_id: String,
    /// sha256 of the base weights (see `LoadedModel::weights_sha256`); a client with other weights is refused.
    pub base_model_sha256: String,
    /// The task.
    pub task: TaskKind,
    /// Classes of the classification head.
    pub num_labels: usize,
    /// Aggregation method; in the run spec JSON by name (`"fedsb"`), an unknown name is refused on reading.
    pub method: crate::Method,
    /// The adapter (LoRA-SB: its B, A and R0 come from the init blob).
    pub adapter: AdapterConfig,
    /// Local training per round.
    pub local: LocalTraining,
    /// The dtype updates travel in.
    pub wire_dtype: WireDtype,
    /// The run's seed.
    pub seed: u64,
    /// DP-SGD required of every client (absent: no DP).
    #[serde(default)]
    pub dp: Option<crate::dp::DpSpec>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_a_partial_table_and_unknown_keys_are_refused() {
        let l: LocalTraining = serde_json::from_str(r#"{"steps": 20, "lr": 0.01}"#).unwrap();
        assert_eq!(l.steps, Some(20));
        assert_eq!(l.batch_size, 16);
        assert!(l.validate().is_ok());
        assert!(serde_json::from_str::<LocalTraining>(r#"{"stesp": 20}"#).is_err());
        let bad = LocalTraining { lr: -1.0, ..Default::default() };
        assert!(bad.validate().is_err());
        let c = l.train_config(7, 3);
        assert_ne!(c.seed, l.train_config(7, 4).seed, "each round shuffles differently");
    }
}
