//! Datasets (JSONL), their tokenization for a task, and padded batches.
//!
//! One JSON object per line, in one of three shapes (all lines of a file alike):
//! - classification: `{"text": "...", "label": 1}` or `{"text": "...", "text_pair": "...", "label": 0}`
//!   (labels are class indices `0..num_labels`);
//! - instruction / chat: `{"prompt": "...", "response": "...", "answer": "18"}`; the loss covers the
//!   response tokens only, and `answer` (optional) is the reference for exact-match evaluation;
//! - plain text: `{"text": "..."}`, language-model loss on every token.
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::model::{ChatMessage, TaskKind, TextTokenizer};
use crate::{Error, Result};

/// One example of a dataset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Example {
    /// A text (or text pair) with a class label.
    Classification {
        /// The text.
        text: String,
        /// The second text of a pair.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        text_pair: Option<String>,
        /// The class index.
        label: usize,
    },
    /// A prompt and the response to learn.
    Instruction {
        /// The user's prompt.
        prompt: String,
        /// The target response.
        response: String,
        /// The reference final answer, for exact-match evaluation.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        answer: Option<String>,
    },
    /// Plain text for language modelling.
    Text {
        /// The text.
        text: String,
    },
}

impl Example {
    /// Parses one JSONL line. The shape is chosen by its keys (`label` → classification, `prompt` →
    /// instruction, else `text` → plain text); other keys are ignored.
    pub fn from_json_line(line: &str) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| Error::Data(format!("not JSON: {e}")))?;
        let obj = v.as_object().ok_or_else(|| Error::Data("expected a JSON object".into()))?;
        let string = |k: &str| -> Result<Option<String>> {
            match obj.get(k) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => Err(Error::Data(format!("`{k}` must be a string, got {other}"))),
            }
        };
        if let Some(label) = obj.get("label") {
            let label = label
                .as_u64()
                .ok_or_else(|| Error::Data(format!("`label` must be a class index (0, 1, ...), got {label}")))?;
            let text = string("text")?.ok_or_else(|| Error::Data("a labelled example needs `text`".into()))?;
            return Ok(Example::Classification { text, text_pair: string("text_pair")?, label: label as usize });
        }
        if obj.contains_key("prompt") || obj.contains_key("response") {
            let prompt =
                string("prompt")?.ok_or_else(|| Error::Data("an instruction example needs `prompt`".into()))?;
            let response =
                string("response")?.ok_or_else(|| Error::Data("an instruction example needs `response`".into()))?;
            let answer = match obj.get("answer") {
                Some(serde_json::Value::Number(n)) => Some(n.to_string()),
                _ => string("answer")?,
            };
            return Ok(Example::Instruction { prompt, response, answer });
        }
        match string("text")? {
            Some(text) => Ok(Example::Text { text }),
            None => Err(Error::Data("expected {\"text\", \"label\"}, {\"prompt\", \"response\"} or {\"text\"}".into())),
        }
    }

    fn shape(&self) -> &'static str {
        match self {
            Example::Classification { .. } => "classification",
            Example::Instruction { .. } => "instruction",
            Example::Text { .. } => "text",
        }
    }
}

/// A dataset loaded from a JSONL file.
#[derive(Clone, Debug, Default)]
pub struct Dataset {
    /// The examples, in file order.
    pub examples: Vec<Example>,
}

impl Dataset {
    /// Reads a JSONL file; every line must parse and all lines must have the same shape.
    pub fn load_jsonl(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse_jsonl(&text).map_err(|e| Error::Data(format!("{}: {e}", path.display())))
    }

    /// Parses JSONL text (see [`Self::load_jsonl`]).
    pub fn parse_jsonl(text: &str) -> Result<Self> {
        let mut examples = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let ex = Example::from_json_line(line).map_err(|e| Error::Data(format!("line {}: {e}", i + 1)))?;
            if let Some(first) = examples.first()
                && std::mem::discriminant(first) != std::mem::discriminant(&ex)
            {
                return Err(Error::Data(format!(
                    "line {}: a {} example in a {} dataset",
                    i + 1,
                    ex.shape(),
                    Example::shape(first)
                )));
            }
            examples.push(ex);
        }
        if examples.is_empty() {
            return Err(Error::Data("no examples".into()));
        }
        Ok(Self { examples })
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// Whether there is no example.
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// The number of classes of a classification dataset (largest label + 1), if it is one.
    pub fn num_labels(&self) -> Option<usize> {
        self.examples
            .iter()
            .map(|e| match e {
                Example::Classification { label, .. } => Some(*label + 1),
                _ => None,
            })
            .try_fold(0usize, |acc, l| l.map(|l| acc.max(l)))
    }

    /// The task this dataset trains.
    pub fn task(&self) -> TaskKind {
        match self.examples.first() {
            Some(Example::Classification { .. }) => TaskKind::Classification,
            _ => TaskKind::CausalLm,
        }
    }

    /// The first `n` examples (all if fewer).
    pub fn take(&self, n: usize) -> Self {
        Self { examples: self.examples.iter().take(n).cloned().collect() }
    }
}

/// A tokenized example.
#[derive(Clone, Debug, PartialEq)]
pub struct Encoded {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Token-type (segment) ids, for encoders.
    pub type_ids: Vec<u32>,
    /// What to predict.
    pub target: Target,
}

/// What an encoded example is trained to predict.
#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    /// A class index.
    Class(u32),
    /// For each position, the id of the next token to predict, or −100 where no loss is taken.
    NextTokens(Vec<i64>),
}

/// Label value of positions without loss (as in PyTorch).
pub const IGNORE: i64 = -100;

/// Turns examples into token ids for a model's task.
#[derive(Clone, Debug)]
pub struct Encoder<'a> {
    /// The tokenizer.
    pub tokenizer: &'a TextTokenizer,
    /// The model's task.
    pub task: TaskKind,
    /// Longest sequence kept (longer ones are truncated: the end of a classification text, the end of a
    /// response).
    pub max_len: usize,
}

impl<'a> Encoder<'a> {
    /// An encoder for `task` with sequences of at most `max_len` tokens.
    pub fn new(tokenizer: &'a TextTokenizer, task: TaskKind, max_len: usize) -> Self {
        Self { tokenizer, task, max_len }
    }

    /// The prompt as the model sees it before its answer: the chat template with the generation prompt,
    /// or the bare prompt and a newline when the model has no template.
    pub fn prompt_text(&self, prompt: &str) -> Result<String> {
        let msgs = [ChatMessage { role: "user".into(), content: prompt.into() }];
        Ok(match self.tokenizer.apply_chat_template(&msgs, true)? {
            Some(s) => s,
            None => format!("{prompt}\n"),
        })
    }

    /// The text of the response that follows [`Self::prompt_text`], end-of-turn marker included.
    fn response_text(&self, prompt: &str, response: &str) -> Result<String> {
        let msgs = [
            ChatMessage { role: "user".into(), content: prompt.into() },
            ChatMessage { role: "assistant".into(), content: response.into() },
        ];
        let prefix = self.prompt_text(prompt)?;
        match self.tokenizer.apply_chat_template(&msgs, false)? {
            Some(full) => match full.strip_prefix(&prefix) {
                Some(rest) => Ok(rest.to_string()),
                // Templates that render the reply differently from the generation prompt: fall back to the
                // reply followed by the end-of-sequence token.
                None => Ok(format!("{response}{}", self.tokenizer.eos_token().unwrap_or(""))),
            },
            None => Ok(format!("{response}{}", self.tokenizer.eos_token().unwrap_or(""))),
        }
    }

    /// Tokenizes one example.
    pub fn encode(&self, ex: &Example) -> Result<Encoded> {
        if self.max_len < 2 {
            return Err(Error::Config("max_len must be at least 2".into()));
        }
        match (self.task, ex) {
            (TaskKind::Classification, Example::Classification { text, text_pair, label }) => {
                let (mut ids, mut type_ids) = match text_pair {
                    Some(p) => self.tokenizer.encode_pair(text, p)?,
                    None => {
                        let ids = self.tokenizer.encode(text, true)?;
                        let n = ids.len();
                        (ids, vec![0; n])
                    }
                };
                if ids.len() > self.max_len {
                    // Keep the final [SEP] when truncating.
                    let last = *ids.last().unwrap_or(&0);
                    ids.truncate(self.max_len);
                    type_ids.truncate(self.max_len);
                    if let Some(l) = ids.last_mut() {
                        *l = last;
                    }
                }
                Ok(Encoded { ids, type_ids, target: Target::Class(*label as u32) })
            }
            (TaskKind::CausalLm, Example::Instruction { prompt, response, .. }) => {
                // Prompt and response are tokenized as one text (a SentencePiece tokenizer would otherwise give
                // the response its own leading space, a token the model never sees there at inference), and the
                // loss starts where the prompt's own tokens end.
                let prompt_text = self.prompt_text(prompt)?;
                let p = self.tokenizer.encode(&prompt_text, false)?;
                let full = format!("{prompt_text}{}", self.response_text(prompt, response)?);
                let mut ids = self.tokenizer.encode(&full, false)?;
                let split = p.iter().zip(&ids).take_while(|(a, b)| a == b).count();
                if split + 1 >= self.max_len {
                    return Err(Error::Data(format!(
                        "a prompt of {} tokens leaves no room for a response within max_len {}",
                        split, self.max_len
                    )));
                }
                ids.truncate(self.max_len);
                let n = ids.len();
                let mut labels = vec![IGNORE; n];
                for i in split.saturating_sub(1)..n - 1 {
                    labels[i] = ids[i + 1] as i64;
                }
                Ok(Encoded { ids, type_ids: vec![0; n], target: Target::NextTokens(labels) })
            }
            (TaskKind::CausalLm, Example::Text { text }) => {
                let mut ids = self.tokenizer.encode(text, false)?;
                ids.truncate(self.max_len);
                let n = ids.len();
                if n < 2 {
                    return Err(Error::Data("a text of fewer than 2 tokens has nothing to predict".into()));
                }
                let mut labels = vec![IGNORE; n];
                for i in 0..n - 1 {
                    labels[i] = ids[i + 1] as i64;
                }
                Ok(Encoded { ids, type_ids: vec![0; n], target: Target::NextTokens(labels) })
            }
            (task, ex) => Err(Error::Data(format!("a {} example cannot train a {task:?} model", ex.shape()))),
        }
    }

    /// Tokenizes a dataset, reporting the first bad example by index.
    pub fn encode_all(&self, ds: &Dataset) -> Result<Vec<Encoded>> {
        ds.examples
            .iter()
            .enumerate()
            .map(|(i, e)| self.encode(e).map_err(|err| Error::Data(format!("example {}: {err}", i + 1))))
            .collect()
    }
}

/// A padded batch on a device.
#[derive(Clone, Debug)]
pub struct Batch {
    /// Token ids `[b, t]` (u32), right-padded.
    pub ids: Tensor,
    /// Token-type ids `[b, t]` (u32).
    pub type_ids: Tensor,
    /// 1 for real tokens, 0 for padding, `[b, t]` (u32).
    pub mask: Tensor,
    /// What to predict.
    pub target: BatchTarget,
    /// Number of real (non-padding) tokens.
    pub real_tokens: usize,
}

/// Targets of a batch.
#[derive(Clone, Debug)]
pub enum BatchTarget {
    /// Class indices `[b]` (u32).
    Classes(Tensor),
    /// Per row, per position: next-token id or [`IGNORE`].
    NextTokens(Vec<Vec<i64>>),
}

impl Batch {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.ids.dims()[0]
    }

    /// Whether the batch has no row.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Pads `examples` to their longest length with `pad_id` and moves them to `device`.
    pub fn collate(examples: &[&Encoded], pad_id: u32, device: &Device) -> Result<Self> {
        Self::collate_to(examples, pad_id, 0, device)
    }

    /// Like [`Self::collate`], padding to at least `min_len` positions (fixed shapes for benchmarks).
    pub fn collate_to(examples: &[&Encoded], pad_id: u32, min_len: usize, device: &Device) -> Result<Self> {
        let b = examples.len();
        if b == 0 {
            return Err(Error::Data("empty batch".into()));
        }
        let t = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0).max(min_len).max(1);
        let mut ids = vec![pad_id; b * t];
        let mut types = vec![0u32; b * t];
        let mut mask = vec![0u32; b * t];
        let mut real = 0;
        for (i, e) in examples.iter().enumerate() {
            ids[i * t..i * t + e.ids.len()].copy_from_slice(&e.ids);
            let tl = e.type_ids.len().min(e.ids.len());
            types[i * t..i * t + tl].copy_from_slice(&e.type_ids[..tl]);
            mask[i * t..i * t + e.ids.len()].iter_mut().for_each(|m| *m = 1);
            real += e.ids.len();
        }
        let target = match &examples[0].target {
            Target::Class(_) => {
                let mut cls = Vec::with_capacity(b);
                for e in examples {
                    match e.target {
                        Target::Class(c) => cls.push(c),
                        Target::NextTokens(_) => {
                            return Err(Error::Data("mixed targets in one batch".into()));
                        }
                    }
                }
                BatchTarget::Classes(Tensor::new(cls, device)?)
            }
            Target::NextTokens(_) => {
                let mut rows = Vec::with_capacity(b);
                for e in examples {
                    match &e.target {
                        Target::NextTokens(l) => {
                            let mut row = l.clone();
                            row.resize(t, IGNORE);
                            rows.push(row);
                        }
                        Target::Class(_) => {
                            return Err(Error::Data("mixed targets in one batch".into()));
                        }
                    }
                }
                BatchTarget::NextTokens(rows)
            }
        };
        Ok(Self {
            ids: Tensor::from_vec(ids, (b, t), device)?,
            type_ids: Tensor::from_vec(types, (b, t), device)?,
            mask: Tensor::from_vec(mask, (b, t), device)?.to_dtype(DType::U32)?,
            target,
            real_tokens: real,
        })
    }
}

/// Example indices `0..n` shuffled with `seed` (identity when `shuffle` is false).
pub fn epoch_order(n: usize, seed: u64, shuffle: bool) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    if shuffle {
        v.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    }
    v
}

/// Extracts the final answer of a GSM8K-style solution: the number after the last `####`, or else the
/// last number in the text. Commas, `$` and a trailing period are removed.
pub fn extract_final_answer(text: &str) -> Option<String> {
    let clean = |s: &str| -> Option<String> {
        let s: String = s.chars().filter(|c| *c != ',' && *c != '$').collect();
        let tok = s.split_whitespace().next()?.trim_end_matches('.').to_string();
        if tok.is_empty() { None } else { Some(tok) }
    };
    if let Some(idx) = text.rfind("####") {
        return clean(&text[idx + 4..]);
    }
    let mut last = None;
    let mut cur = String::new();
    for c in text.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_digit()
            || (c == '.' && !cur.is_empty())
            || (c == '-' && cur.is_empty())
            || (c == ',' && !cur.is_empty())
        {
            cur.push(c);
        } else {
            let t = cur.trim_end_matches(['.', ',']).replace(',', "");
            if t.chars().any(|c| c.is_ascii_digit()) {
                last = Some(t);
            }
            cur.clear();
        }
    }
    last
}

/// Whether two final answers agree (numerically when both parse as numbers).
pub fn answers_match(a: &str, b: &str) -> bool {
    match (a.trim().parse::<f64>(), b.trim().parse::<f64>()) {
        (Ok(x), Ok(y)) => (x - y).abs() <= 1e-6 * x.abs().max(1.0),
        _ => a.trim() == b.trim(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_shapes_and_refuses_mixes() {
        let c =
            Dataset::parse_jsonl("{\"text\":\"a\",\"label\":1}\n{\"text\":\"b\",\"text_pair\":\"c\",\"label\":2}\n")
                .unwrap();
        assert_eq!(c.num_labels(), Some(3));
        assert_eq!(c.task(), TaskKind::Classification);
        let i = Dataset::parse_jsonl("{\"prompt\":\"q\",\"response\":\"r\"}\n").unwrap();
        assert_eq!(i.task(), TaskKind::CausalLm);
        let t = Dataset::parse_jsonl("{\"text\":\"plain\"}\n").unwrap();
        assert!(matches!(t.examples[0], Example::Text { .. }));
        let e = Dataset::parse_jsonl("{\"text\":\"a\",\"label\":1}\n{\"text\":\"plain\"}\n").unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
        let e = Dataset::parse_jsonl("{\"text\":\"a\",\"label\":-1}\n").unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("class index"), "{e}");
        let e = Dataset::parse_jsonl("{\"prompt\":\"a\"}\n").unwrap_err().to_string();
        assert!(e.contains("response"), "{e}");
        let extra = Dataset::parse_jsonl("{\"id\":7,\"text\":\"a\",\"label\":0}\n").unwrap();
        assert_eq!(extra.num_labels(), Some(1));
        assert!(Dataset::parse_jsonl("\n\n").is_err());
    }

    #[test]
    fn collate_pads_and_masks() {
        let a = Encoded { ids: vec![5, 6, 7], type_ids: vec![0; 3], target: Target::NextTokens(vec![6, 7, IGNORE]) };
        let b = Encoded { ids: vec![8], type_ids: vec![0], target: Target::NextTokens(vec![IGNORE]) };
        let batch = Batch::collate(&[&a, &b], 0, &Device::Cpu).unwrap();
        assert_eq!(batch.ids.to_vec2::<u32>().unwrap(), vec![vec![5, 6, 7], vec![8, 0, 0]]);
        assert_eq!(batch.mask.to_vec2::<u32>().unwrap(), vec![vec![1, 1, 1], vec![1, 0, 0]]);
        assert_eq!(batch.real_tokens, 4);
        let BatchTarget::NextTokens(rows) = batch.target else { panic!() };
        assert_eq!(rows[1], vec![IGNORE; 3]);
        let c = Encoded { ids: vec![1], type_ids: vec![0], target: Target::Class(1) };
        assert!(Batch::collate(&[&a, &c], 0, &Device::Cpu).is_err());
        assert!(Batch::collate(&[], 0, &Device::Cpu).is_err());
    }

    #[test]
    fn final_answers() {
        assert_eq!(extract_final_answer("so 9 * 2 = 18.\n#### 1,800").as_deref(), Some("1800"));
        assert_eq!(extract_final_answer("#### $18.").as_deref(), Some("18"));
        assert_eq!(extract_final_answer("The answer is 42.").as_deref(), Some("42"));
        assert_eq!(extract_final_answer("It costs -3.5 dollars").as_deref(), Some("-3.5"));
        assert_eq!(extract_final_answer("no numbers"), None);
        assert!(answers_match("18", "18.0"));
        assert!(!answers_match("18", "19"));
    }
}
