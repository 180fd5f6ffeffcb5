//! Local training: data and batches ([`data`]), the loss of a batch, the training loop with AdamW and a
//! learning-rate schedule ([`trainer`]), evaluation ([`eval`]) and greedy decoding ([`generate`]).
pub mod data;
pub mod eval;
pub mod generate;
pub mod partition;
pub mod schedule;
pub mod trainer;

use candle_core::{D, Tensor};

use crate::model::Model;
use crate::model::bert::mean_pool;
use crate::model::llama::{cross_entropy, token_nll};
use crate::{Error, Result};
use data::{Batch, BatchTarget};

pub use data::{Dataset, Encoded, Encoder, Example};
pub use schedule::{LrSchedule, ScheduleKind};
pub use trainer::{StepOutcome, StepReport, TrainConfig, TrainSummary, Trainer, train};

/// The loss of one batch.
#[derive(Debug)]
pub struct LossOut {
    /// Mean loss over the batch's predictions (a scalar tensor, differentiable).
    pub loss: Tensor,
    /// Number of predictions the mean is over (rows for classification, labelled tokens for LM).
    pub count: usize,
    /// Correct predictions (classification only).
    pub correct: Option<usize>,
}

/// The classifier's logits on `batch` (labels `y` checked against its classes), the number of rows and the
/// correct predictions.
fn classify(c: &crate::model::BertClassifier, batch: &Batch, y: &Tensor) -> Result<(Tensor, usize, usize)> {
    let num_labels = c.num_labels() as u32;
    let ys = y.to_vec1::<u32>()?;
    if let Some(bad) = ys.iter().find(|l| **l >= num_labels) {
        return Err(Error::Data(format!("label {bad} but the classifier has {num_labels} classes")));
    }
    let h = c.encoder.forward(&batch.ids, Some(&batch.type_ids), Some(&batch.mask))?;
    let logits = c.head_logits(&mean_pool(&h, Some(&batch.mask))?)?;
    let pred = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
    let correct = pred.iter().zip(&ys).filter(|(p, y)| p == y).count();
    Ok((logits, ys.len(), correct))
}

/// Mean cross-entropy of `model` on `batch` (response tokens for causal LMs, classes for classifiers).
pub fn batch_loss(model: &Model, batch: &Batch) -> Result<LossOut> {
    match (model, &batch.target) {
        (Model::CausalLm(m), BatchTarget::NextTokens(labels)) => {
            let (loss, count) = m.lm_loss(&batch.ids, Some(&batch.mask), labels)?;
            Ok(LossOut { loss, count, correct: None })
        }
        (Model::Classifier(c), BatchTarget::Classes(y)) => {
            let (logits, count, correct) = classify(c, batch, y)?;
            Ok(LossOut { loss: cross_entropy(&logits, y)?, count, correct: Some(correct) })
        }
        _ => Err(Error::Data("the batch's targets do not match the model's task".into())),
    }
}

/// Per-sample losses of one batch (DP-SGD): each sample's own mean loss.
#[derive(Debug)]
pub struct PerSampleLoss {
    /// `[n]`: cross-entropy of each example (classification), or the mean over each example's labelled tokens
    /// (causal LM; 0 for an example with none). Differentiable.
    pub losses: Tensor,
    /// Correct predictions (classification only).
    pub correct: Option<usize>,
}

/// Each sample's loss on `batch` (see [`PerSampleLoss`]); the gradient of their sum with per-sample copies of the
/// trainable tensors gives every sample's gradient ([`crate::dp::per_sample`]).
pub fn per_sample_loss(model: &Model, batch: &Batch) -> Result<PerSampleLoss> {
    match (model, &batch.target) {
        (Model::CausalLm(m), BatchTarget::NextTokens(labels)) => {
            let n = batch.len();
            let (nll, owners) = m.lm_token_nll(&batch.ids, Some(&batch.mask), labels)?;
            let mut counts = vec![0usize; n];
            for &o in &owners {
                counts[o] += 1;
            }
            // losses = W · nll with W[i, t] = 1/count(i) where token t belongs to sample i.
            let mut w = vec![0f32; n * owners.len()];
            for (t, &o) in owners.iter().enumerate() {
                w[o * owners.len() + t] = 1.0 / counts[o] as f32;
            }
            let w = Tensor::from_vec(w, (n, owners.len()), nll.device())?;
            let losses = w.matmul(&nll.unsqueeze(1)?)?.squeeze(1)?;
            Ok(PerSampleLoss { losses, correct: None })
        }
        (Model::Classifier(c), BatchTarget::Classes(y)) => {
            let (logits, _, correct) = classify(c, batch, y)?;
            Ok(PerSampleLoss { losses: token_nll(&logits, y)?, correct: Some(correct) })
        }
        _ => Err(Error::Data("the batch's targets do not match the model's task".into())),
    }
}
