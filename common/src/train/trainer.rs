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
            return Err(Error::Config(format!("learning rate must be positive, got {}", self.lr)));
        }
        if self.batch_size == 0 || self.grad_accum == 0 {
            return Err(Error::Config("batch size and gradient accumulation must be at least 1".into()));
        }
        if self.max_steps.is_none() && !(self.epochs.is_finite() && self.epochs > 0.0) {
            return Err(Error::Config(format!("epochs must be positive, got {}", self.epochs)));
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio) {
            return Err(Error::Config(format!("warmup ratio must be in [0, 1], got {}", self.warmup_ratio)));
        }
        if self.max_grad_norm.is_some_and(|c| !(c.is_finite() && c > 0.0)) {
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
        LrSchedule::new(self.lr, self.warmup_ratio, self.total_steps(n), self.schedule)
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

/// The optimizer state of a training run: AdamW over the model's trainable tensors and the schedule.
/// [`Trainer::step`] takes one optimizer step over a list of micro-batches.
pub struct Trainer<'m> {
    model: &'m Model,
    vars: Vec<(String, candle_core::Var)>,
    opt: AdamW,
    schedule: LrSchedule,
    max_grad_norm: Option<f64>,
    step: usize,
    start: Instant,
}

/// What one optimizer step did, before timing is attached.
#[derive(Clone, Debug)]
pub struct StepOutcome {
    /// Mean loss over the micro-batches.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Real tokens processed.
    pub tokens: usize,
    /// Examples processed.
    pub samples: usize,
}

impl<'m> Trainer<'m> {
    /// An optimizer for `model`'s trainable tensors following `schedule`.
    pub fn new(model: &'m Model, schedule: LrSchedule, weight_decay: f64, max_grad_norm: Option<f64>) -> Result<Self> {
        let vars = model.trainable();
        if vars.is_empty() {
            return Err(Error::Config("the model has nothing to train (no adapter attached)".into()));
        }
        let params = ParamsAdamW { lr: schedule.first_lr(), beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay };
        let opt = AdamW::new(vars.iter().map(|(_, v)| v.clone()).collect(), params)?;
        Ok(Self { model, vars, opt, schedule, max_grad_norm, step: 0, start: Instant::now() })
    }

    /// Steps taken so far.
    pub fn steps_done(&self) -> usize {
        self.step
    }

    /// One optimizer step: the gradients of the micro-batches' mean losses are averaged, clipped and
    /// applied. Nothing is updated when a loss or the gradient is not finite, or when a trainable tensor
    /// gets no gradient (a cut graph).
    pub fn step(&mut self, micro: &[Batch]) -> Result<StepOutcome> {
        if micro.is_empty() {
            return Err(Error::Data("an optimizer step needs at least one batch".into()));
        }
        let step = self.step + 1;
        let lr = self.schedule.lr(step);
        let k = micro.len() as f64;
        let mut acc: Vec<Option<Tensor>> = vec![None; self.vars.len()];
        let (mut loss_sum, mut tokens, mut samples) = (0.0, 0, 0);
        for batch in micro {
            let fwd = crate::profile::span("step/forward");
            let out = batch_loss(self.model, batch)?;
            let lv = out.loss.to_scalar::<f32>()? as f64;
            drop(fwd);
            if !lv.is_finite() {
                return Err(Error::Numerics(format!("loss is {lv} at step {step}; no update was made")));
            }
            let bwd = crate::profile::span("step/backward");
            let grads = crate::recompute::backward(&(out.loss / k)?)?;
            drop(bwd);
            for (slot, (name, var)) in acc.iter_mut().zip(&self.vars) {
                let g = grads.get(var.as_tensor()).ok_or_else(|| {
                    Error::Numerics(format!("no gradient reached `{name}`: the autograd graph is cut"))
                })?;
                *slot = Some(match slot.take() {
                    None => g.clone(),
                    Some(prev) => (prev + g)?,
                });
            }
            loss_sum += lv;
            tokens += batch.real_tokens;
            samples += batch.len();
        }
        let _opt = crate::profile::span("step/optimizer");
        let grads: Vec<Tensor> = acc.into_iter().flatten().collect();
        let mut sq = 0f64;
        for g in &grads {
            sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
        let norm = sq.sqrt();
        if !norm.is_finite() {
            return Err(Error::Numerics(format!("gradient norm is {norm} at step {step}; no update was made")));
        }
        let factor = match self.max_grad_norm {
            Some(c) if norm > c => c / (norm + 1e-6),
            _ => 1.0,
        };
        let mut store = GradStore::default();
        for ((_, var), g) in self.vars.iter().zip(grads) {
            let g = if factor != 1.0 { (g * factor)? } else { g };
            store.insert(var.as_tensor(), g);
        }
        self.opt.set_learning_rate(lr);
        self.opt.step(&store)?;
        self.step = step;
        Ok(StepOutcome { loss: loss_sum / k, lr, grad_norm: norm, tokens, samples })
    }

    /// The trainable variables by name, in the order [`Self::apply`] takes their gradients.
    pub fn vars(&self) -> &[(String, candle_core::Var)] {
        &self.vars
    }

    /// The model being trained.
    pub fn model(&self) -> &'m Model {
        self.model
    }

    /// One optimizer step with gradients computed elsewhere (DP-SGD's noisy clipped mean, see
    /// [`crate::dp::sgd`]): one per variable of [`Self::vars`], same shapes, all finite. No clipping is applied
    /// here. Returns the step number and the learning rate used; on error nothing is updated.
    pub fn apply(&mut self, grads: Vec<Tensor>) -> Result<(usize, f64)> {
        if grads.len() != self.vars.len() {
            return Err(Error::Numerics(format!("{} gradients for {} variables", grads.len(), self.vars.len())));
        }
        let step = self.step + 1;
        let mut store = GradStore::default();
        for ((name, var), g) in self.vars.iter().zip(grads) {
            if g.dims() != var.dims() {
                return Err(Error::tensor(name, format!("gradient {:?}, variable {:?}", g.dims(), var.dims())));
            }
            store.insert(var.as_tensor(), g);
        }
        let lr = self.schedule.lr(step);
        self.opt.set_learning_rate(lr);
        self.opt.step(&store)?;
        self.step = step;
        Ok((step, lr))
    }

    /// Time since the trainer was made.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

/// Trains `model`'s trainable tensors on `data` with AdamW (shuffled each epoch, padded micro-batches,
/// `grad_accum` of them per step). `on_step` is called after every optimizer step. Fails (leaving that
/// step's update out) on a non-finite loss or gradient, and when a trainable tensor receives no gradient.
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
    let schedule = cfg.schedule_for(data.len());
    let mut trainer = Trainer::new(model, schedule, cfg.weight_decay, cfg.max_grad_norm)?;
    let device = model.device().clone();
    let mut order: Vec<usize> = Vec::new();
    let mut cursor = 0usize;
    let mut epoch = 0u64;
    let (mut samples, mut tokens) = (0usize, 0usize);
    let mut losses = Vec::with_capacity(schedule.total);
    for _ in 0..schedule.total {
        let mut micro = Vec::with_capacity(cfg.grad_accum);
        for _ in 0..cfg.grad_accum {
            if cursor >= order.len() {
                order = epoch_order(data.len(), cfg.seed.wrapping_add(epoch), true);
                epoch += 1;
                cursor = 0;
            }
            let end = (cursor + cfg.batch_size).min(order.len());
            let items: Vec<&Encoded> = order[cursor..end].iter().map(|&i| &data[i]).collect();
            cursor = end;
            micro.push(Batch::collate(&items, pad_id, &device)?);
        }
        let o = trainer.step(&micro)?;
        samples += o.samples;
        tokens += o.tokens;
        losses.push(o.loss);
        on_step(&StepReport {
            step: trainer.steps_done(),
            total: schedule.total,
            loss: o.loss,
            lr: o.lr,
            grad_norm: o.grad_norm,
            tokens: o.tokens,
            samples: o.samples,
            elapsed: trainer.elapsed(),
        });
    }
    let tail = (losses.len() / 10).max(1);
    Ok(TrainSummary {
        steps: schedule.total,
        samples,
        tokens,
        seconds: trainer.elapsed().as_secs_f64(),
        first_loss: losses[0],
        final_loss: losses[losses.len() - tail..].iter().sum::<f64>() / tail as f64,
    })
}
