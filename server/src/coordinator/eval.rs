//! The coordinator's evaluation of a global model on held-out data (`[eval]` of the run config): loss (and
//! accuracy for a classifier) on every example, plus exact match of greedily decoded answers where asked.
//! Setup builds the [`Evaluator`] from the evaluator's own copy of the model (adapters attached); the thread
//! persisting a closed round loads each new global into that copy and evaluates it.
use anyhow::{Context, Result, bail};
use fedsb_common::model::{Model, TaskKind, TextTokenizer};
use fedsb_common::train::data::{Encoded, Example, extract_final_answer};
use fedsb_common::train::eval::{EvalReport, evaluate, exact_match};
use fedsb_common::train::{Dataset, Encoder};

/// Evaluation of the global model on held-out data.
pub(super) struct Evaluator {
    /// The evaluator's copy of the model: base weights (with the committed folds), adapters attached.
    pub(super) model: Model,
    /// The held-out data, tokenized.
    pub(super) data: Vec<Encoded>,
    /// Examples per forward pass.
    pub(super) batch_size: usize,
    /// The padding token.
    pub(super) pad: u32,
    /// Exact match of greedily decoded answers (causal LMs, `[eval] exact_match`).
    exact_match: Option<ExactMatchSet>,
}

/// What the exact-match part of an evaluation decodes, and how.
struct ExactMatchSet {
    /// The prompt/response pairs scored.
    examples: Vec<Example>,
    /// Encodes prompts, decodes answers.
    tokenizer: TextTokenizer,
    /// Longest prompt, in tokens.
    max_len: usize,
    /// Longest generated answer, in tokens.
    max_new_tokens: usize,
}

impl Evaluator {
    /// Reads and tokenizes the held-out data of `e` for `model` (the evaluator's copy, adapters attached),
    /// checking up front that the exact-match examples can be scored.
    pub(super) fn new(
        e: &crate::config::EvalSection,
        model: &Model,
        tokenizer: &TextTokenizer,
        max_len: usize,
    ) -> Result<Self> {
        let mut ds = Dataset::load_jsonl(&e.data).context("the evaluation data")?;
        if let Some(n) = e.limit {
            ds = ds.take(n);
        }
        let task = model.task();
        let data = Encoder::new(tokenizer, task, max_len)
            .encode_all(&ds)
            .with_context(|| format!("tokenizing the evaluation data {}", e.data.display()))?;
        let exact_match = if e.exact_match > 0 {
            if task != TaskKind::CausalLm {
                bail!("[eval] exact_match needs a causal LM; this model is a classifier (set it to 0)");
            }
            let examples = ds.take(e.exact_match).examples;
            for (i, ex) in examples.iter().enumerate() {
                let scorable = matches!(ex, Example::Instruction { response, answer, .. }
                    if answer.is_some() || extract_final_answer(response).is_some());
                if !scorable {
                    bail!(
                        "[eval] exact_match: example {} of {} is not a prompt/response pair with a reference answer \
                         (`answer`, or a final number in the response)",
                        i + 1,
                        e.data.display()
                    );
                }
            }
            Some(ExactMatchSet { examples, tokenizer: tokenizer.clone(), max_len, max_new_tokens: e.max_new_tokens })
        } else {
            None
        };
        Ok(Self { model: model.clone(), data, batch_size: e.batch_size, pad: tokenizer.pad_id(), exact_match })
    }

    /// Loss (and accuracy) of `model` on the held-out data, and exact match where configured.
    pub(super) fn evaluate(&self, model: &Model) -> Result<EvalReport> {
        let mut rep = evaluate(model, &self.data, self.batch_size, self.pad)?;
        if let Some(em) = &self.exact_match {
            let enc = Encoder::new(&em.tokenizer, TaskKind::CausalLm, em.max_len);
            rep.exact_match = Some(exact_match(model, &enc, &em.examples, em.max_new_tokens, &mut |_, _| {})?);
        }
        Ok(rep)
    }
}

/// The held-out figures of a report, as the round lines print them.
pub fn describe_eval(e: &EvalReport) -> String {
    let main = match e.accuracy {
        Some(a) => format!("held-out accuracy {:.2}% (loss {:.4})", 100.0 * a, e.loss),
        None => format!("held-out loss {:.4}", e.loss),
    };
    match &e.exact_match {
        Some(m) => format!("{main}, exact match {}/{} ({:.1}%)", m.correct, m.total, 100.0 * m.accuracy),
        None => main,
    }
}
