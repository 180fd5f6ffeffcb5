//! The local training loop: AdamW over the trainable tensors, warm-up and decay, gradient accumulation,
//! gradient clipping, padded batches.
use std::time::{Duration, Instant};

use candle_core::Tensor;
use candle_core::backprop::GradStore;
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use serde::{Deserialize, Serialize};

use super::batch_loss;
use super::data::{Batch, Encoded, epoch_order};
use super::schedule::{LrSchedule, ScheduleKind};
use crate::model::Model;
use crate::{Error, Result};

/// Settings of a local training run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Passes over the data (fractions allowed); ignored when `max_steps` is set.
    pub epochs: f64,
    /// Number of optimizer steps, overriding `epochs`.
    pub max_steps: Option<usize>,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Fraction of the steps spent warming up linearly.
    pub warmup_ratio: f64,
    /// Decay after warm-up.
    pub schedule: ScheduleKind,
    /// AdamW's decoupled weight decay (0 by default, as in the LoRA-SB code).
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (1.0 by default, as Hugging Face's Trainer does).
    pub max_grad_norm: Option<f64>,
    /// Seed of the data order.
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            epochs: 1.0,
            max_steps: None,
            batch_size: 8,
            grad_accum: 1,
            warmup_ratio: 0.02,
            schedule: ScheduleKind::Cosine,
            weight_decay: 0.0,
            max_grad_norm: Some(1.0),
            seed: 42,
        }
    }
}

impl TrainConfig {
    /// Checks the settings.
    pub fn validate(&self) -> Result<()> {
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::Config(format!(
                "learning rate must be positive, got {}",
                self.lr
            )));
        }
        if self.batch_size == 0 || self.grad_accum == 0 {
            return Err(Error::Config(
                "batch size and gradient accumulation must be at least 1".into(),
            ));
        }
        if self.max_steps.is_none() && !(self.epochs.is_finite() && self.epochs > 0.0) {
            return Err(Error::Config(format!(
                "epochs must be positive, got {}",
                self.epochs
            )));
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio) {
            return Err(Error::Config(format!(
                "warmup ratio must be in [0, 1], got {}",
                self.warmup_ratio
            )));
        }
        if self
            .max_grad_norm
            .is_some_and(|c| !(c.is_finite() && c > 0.0))
        {
            return Err(Error::Config("max_grad_norm must be positive".into()));
        }
        Ok(())
    }

    /// Optimizer steps for `n` examples.
    pub fn total_steps(&self, n: usize) -> usize {
        if let Some(s) = self.max_steps {
            return s;
        }
        let per_epoch = n.div_ceil(self.batch_size * self.grad_accum).max(1);
        ((self.epochs * per_epoch as f64).ceil() as usize).max(1)
    }

    /// The learning-rate schedule for `n` examples.
    pub fn schedule_for(&self, n: usize) -> LrSchedule {
        LrSchedule::new(
            self.lr,
            self.warmup_ratio,
            self.total_steps(n),
            self.schedule,
        )
    }
}

/// What happened in one optimizer step (for progress output).
#[derive(Clone, Debug, Serialize)]
pub struct StepReport {
    /// Step number, from 1.
    pub step: usize,
    /// Total steps of the run.
    pub total: usize,
    /// Mean loss over the step's micro-batches.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Real (non-padding) tokens processed in this step.
    pub tokens: usize,
    /// Examples processed in this step.
    pub samples: usize,
    /// Time since the start of training.
    pub elapsed: Duration,
}

/// The outcome of a training run.
#[derive(Clone, Debug, Serialize)]
pub struct TrainSummary {
    /// Optimizer steps taken.
    pub steps: usize,
    /// Examples processed.
    pub samples: usize,
    /// Real tokens processed.
    pub tokens: usize,
    /// Wall time in seconds.
    pub seconds: f64,
    /// Loss of the first step.
    pub first_loss: f64,
    /// Mean loss of the last 10% of steps (at least one).
    pub final_loss: f64,
}

/// Trains `model`'s trainable tensors on `data` with AdamW. `on_step` is called after every optimizer
/// step. Fails (leaving the step's update out) on a non-finite loss or gradient, and when a trainable
/// tensor receives no gradient (a cut graph).
pub fn train(
    model: &Model,
    data: &[Encoded],
    cfg: &TrainConfig,
    pad_id: u32,
    on_step: &mut dyn FnMut(&StepReport),
) -> Result<TrainSummary> {
    cfg.validate()?;
    if data.is_empty() {
        return Err(Error::Data("no training examples".into()));
    }
    let vars = model.trainable();
    if vars.is_empty() {
        return Err(Error::Config(
            "the model has nothing to train (no adapter attached)".into(),
        ));
    }
    let schedule = cfg.schedule_for(data.len());
    let params = ParamsAdamW {
        lr: schedule.first_lr(),
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: cfg.weight_decay,
    };
    let mut opt = AdamW::new(vars.iter().map(|(_, v)| v.clone()).collect(), params)?;
    let device = model.device().clone();
    let start = Instant::now();
    let mut order: Vec<usize> = Vec::new();
    let mut cursor = 0usize;
    let mut epoch = 0u64;
    let (mut samples, mut tokens) = (0usize, 0usize);
    let mut losses = Vec::with_capacity(schedule.total);
    for step in 1..=schedule.total {
        let lr = schedule.lr(step);
        opt.set_learning_rate(lr);
        let mut acc: Vec<Option<Tensor>> = vec![None; vars.len()];
        let (mut step_loss, mut step_tokens, mut step_samples) = (0.0, 0, 0);
        for _ in 0..cfg.grad_accum {
            if cursor >= order.len() {
                order = epoch_order(data.len(), cfg.seed.wrapping_add(epoch), true);
                epoch += 1;
                cursor = 0;
            }
            let end = (cursor + cfg.batch_size).min(order.len());
            let items: Vec<&Encoded> = order[cursor..end].iter().map(|&i| &data[i]).collect();
            cursor = end;
            let batch = Batch::collate(&items, pad_id, &device)?;
            let out = batch_loss(model, &batch)?;
            let lv = out.loss.to_scalar::<f32>()? as f64;
            if !lv.is_finite() {
                return Err(Error::Numerics(format!(
                    "loss is {lv} at step {step}; no update was made"
                )));
            }
            let grads = (out.loss / cfg.grad_accum as f64)?.backward()?;
            for (slot, (name, var)) in acc.iter_mut().zip(&vars) {
                let g = grads.get(var.as_tensor()).ok_or_else(|| {
                    Error::Numerics(format!(
                        "no gradient reached `{name}`: the autograd graph is cut"
                    ))
                })?;
                *slot = Some(match slot.take() {
                    None => g.clone(),
                    Some(prev) => (prev + g)?,
                });
            }
            step_loss += lv / cfg.grad_accum as f64;
            step_tokens += batch.real_tokens;
            step_samples += batch.len();
        }
        let grads: Vec<Tensor> = acc
            .into_iter()
            .map(|g| g.expect("every slot filled"))
            .collect();
        let sq: f64 = grads
            .iter()
            .map(|g| {
                g.sqr()
                    .and_then(|s| s.sum_all())
                    .and_then(|s| s.to_scalar::<f32>())
            })
            .sum::<candle_core::Result<f32>>()? as f64;
        let norm = sq.sqrt();
        if !norm.is_finite() {
            return Err(Error::Numerics(format!(
                "gradient norm is {norm} at step {step}; no update was made"
            )));
        }
        let factor = match cfg.max_grad_norm {
            Some(c) if norm > c => c / (norm + 1e-6),
            _ => 1.0,
        };
        let mut store = GradStore::default();
        for ((_, var), g) in vars.iter().zip(grads) {
            let g = if factor != 1.0 { (g * factor)? } else { g };
            store.insert(var.as_tensor(), g);
        }
        opt.step(&store)?;
        samples += step_samples;
        tokens += step_tokens;
        losses.push(step_loss);
        on_step(&StepReport {
            step,
            total: schedule.total,
            loss: step_loss,
            lr,
            grad_norm: norm,
            tokens: step_tokens,
            samples: step_samples,
            elapsed: start.elapsed(),
        });
    }
    let tail = (losses.len() / 10).max(1);
    Ok(TrainSummary {
        steps: schedule.total,
        samples,
        tokens,
        seconds: start.elapsed().as_secs_f64(),
        first_loss: losses[0],
        final_loss: losses[losses.len() - tail..].iter().sum::<f64>() / tail as f64,
    })
}
