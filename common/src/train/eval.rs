//! Evaluation: mean loss and accuracy (classification), mean response loss and exact match of the final
//! answer with greedy decoding (causal LMs).
use serde::Serialize;

use super::batch_loss;
use super::data::{Batch, Encoded, Encoder, Example, answers_match, extract_final_answer};
use super::generate::generate_greedy;
use crate::model::Model;
use crate::{Error, Result};

/// Loss (and accuracy) of a model on a dataset.
#[derive(Clone, Debug, Default, Serialize)]
pub struct EvalReport {
    /// Mean loss per prediction (per example for classification, per response token for LMs).
    pub loss: f64,
    /// Number of predictions.
    pub count: usize,
    /// Examples evaluated.
    pub examples: usize,
    /// Accuracy (classification).
    pub accuracy: Option<f64>,
    /// Exact match of greedily decoded final answers (causal LMs, where it was computed: see [`exact_match`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exact_match: Option<ExactMatchReport>,
}

/// Mean loss and accuracy of `model` on `data`, in batches of `batch_size`.
pub fn evaluate(model: &Model, data: &[Encoded], batch_size: usize, pad_id: u32) -> Result<EvalReport> {
    if data.is_empty() {
        return Err(Error::Data("no evaluation examples".into()));
    }
    let (mut total, mut count, mut correct, mut any_acc) = (0f64, 0usize, 0usize, false);
    for chunk in data.chunks(batch_size.max(1)) {
        let items: Vec<&Encoded> = chunk.iter().collect();
        let batch = Batch::collate(&items, pad_id, model.device())?;
        let out = crate::kernels::inference(|| batch_loss(model, &batch))?;
        let l = out.loss.to_scalar::<f32>()? as f64;
        total += l * out.count as f64;
        count += out.count;
        if let Some(c) = out.correct {
            correct += c;
            any_acc = true;
        }
    }
    Ok(EvalReport {
        loss: total / count.max(1) as f64,
        count,
        examples: data.len(),
        accuracy: any_acc.then(|| correct as f64 / data.len() as f64),
        exact_match: None,
    })
}

/// Exact match of generated final answers.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ExactMatchReport {
    /// Examples whose extracted answer equals the reference.
    pub correct: usize,
    /// Examples evaluated.
    pub total: usize,
    /// `correct / total`.
    pub accuracy: f64,
    /// Generated tokens in all.
    pub generated_tokens: usize,
}

/// Greedy-decodes an answer to each instruction example (up to `max_new` tokens) and compares its final
/// answer (`#### N`, or the last number) with the example's `answer` (or the one extracted from its
/// response). `on_item(done, total)` reports progress.
pub fn exact_match(
    model: &Model,
    enc: &Encoder,
    examples: &[Example],
    max_new: usize,
    on_item: &mut dyn FnMut(usize, usize),
) -> Result<ExactMatchReport> {
    let Model::CausalLm(lm) = model else {
        return Err(Error::Config("exact match needs a causal LM".into()));
    };
    let mut stop: Vec<u32> = lm.config().eos_token_ids.clone();
    stop.extend(enc.tokenizer.eos_id());
    let (mut correct, mut total, mut gen_tokens) = (0, 0, 0);
    for (i, ex) in examples.iter().enumerate() {
        let Example::Instruction { prompt, response, answer } = ex else {
            return Err(Error::Data("exact match needs prompt/response examples".into()));
        };
        let reference = match answer.clone().or_else(|| extract_final_answer(response)) {
            Some(a) => a,
            None => {
                return Err(Error::Data(format!("example {}: no reference answer", i + 1)));
            }
        };
        let ids = enc.tokenizer.encode(&enc.prompt_text(prompt)?, false)?;
        let out = generate_greedy(lm, &ids, max_new, &stop)?;
        gen_tokens += out.len();
        let text = enc.tokenizer.decode(&out)?;
        if extract_final_answer(&text).is_some_and(|a| answers_match(&a, &reference)) {
            correct += 1;
        }
        total += 1;
        on_item(i + 1, examples.len());
    }
    Ok(ExactMatchReport {
        correct,
        total,
        accuracy: correct as f64 / total.max(1) as f64,
        generated_tokens: gen_tokens,
    })
}
