//! Tiny random models written as real Hugging Face folders, for tests and examples that must not depend on
//! downloaded assets (protocol tests, quick demos). Their numbers mean nothing; their files are complete.
use std::path::Path;

use candle_core::Device;

use super::bert::random_bert_weights;
use super::config::BertConfig;
use crate::tensors::{TensorSet, write_atomic};
use crate::{Error, Result};

/// Words of the tiny models' vocabulary (ids 5..), after `[PAD] [UNK] [CLS] [SEP] [MASK]`.
pub const TINY_WORDS: &[&str] = &[
    "the", "a", "movie", "film", "good", "bad", "great", "awful", "plot", "acting", "is", "was", "and", "but", "not",
    "very", "fun", "boring", "story", "ending", "love", "hate", "it", "this", "of", "to", "best", "worst", "funny",
    "dull", "smart", "silly", "long", "short", "fine",
];

/// Writes a tiny random BERT (`BertConfig::tiny`, vocabulary of [`TINY_WORDS`]) with a word-level
/// `tokenizer.json` into `dir`, loadable with `load_model`.
pub fn write_tiny_bert(dir: &Path, seed: u64) -> Result<()> {
    let mut cfg = BertConfig::tiny();
    let specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];
    cfg.vocab_size = specials.len() + TINY_WORDS.len();
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let weights: TensorSet = random_bert_weights(&cfg, seed, &Device::Cpu)?.into_iter().collect();
    weights.save(&dir.join("model.safetensors"))?;
    let config = serde_json::to_string_pretty(&cfg.to_hf_json(2))
        .map_err(|e| Error::Json { context: "config.json".into(), source: e })?;
    write_atomic(&dir.join("config.json"), config.as_bytes())?;
    let vocab: serde_json::Map<String, serde_json::Value> =
        specials.iter().chain(TINY_WORDS).enumerate().map(|(i, w)| (w.to_string(), serde_json::json!(i))).collect();
    let added: Vec<serde_json::Value> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| {
            serde_json::json!({"id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": true})
        })
        .collect();
    let tok = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "[SEP]", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}},
                     {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
            "special_tokens": {
                "[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]},
                "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}
            }
        },
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    let text = serde_json::to_string(&tok).map_err(|e| Error::Json { context: "tokenizer.json".into(), source: e })?;
    write_atomic(&dir.join("tokenizer.json"), text.as_bytes())?;
    let tc =
        serde_json::json!({"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]"});
    write_atomic(&dir.join("tokenizer_config.json"), tc.to_string().as_bytes())
}

/// `n` labelled sentences over [`TINY_WORDS`] as classification JSONL (label 1 when "good"-ish words
/// dominate), seeded.
pub fn tiny_classification_jsonl(n: usize, seed: u64) -> String {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let pos = ["good", "great", "love", "best", "funny", "smart", "fun", "fine"];
    let neg = ["bad", "awful", "hate", "worst", "dull", "silly", "boring"];
    let mut out = String::new();
    for _ in 0..n {
        let label = rng.random_range(0..2usize);
        let pool: &[&str] = if label == 1 { &pos } else { &neg };
        let words: Vec<&str> = (0..rng.random_range(3..9))
            .map(|_| {
                if rng.random_bool(0.5) {
                    pool[rng.random_range(0..pool.len())]
                } else {
                    TINY_WORDS[rng.random_range(0..TINY_WORDS.len())]
                }
            })
            .collect();
        out.push_str(&serde_json::json!({"text": words.join(" "), "label": label}).to_string());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{LoadOptions, Model, load_model};

    #[test]
    fn tiny_bert_folder_loads_and_tokenizes() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_bert(dir.path(), 1).unwrap();
        let m = load_model(dir.path(), &Device::Cpu, &LoadOptions::default()).unwrap();
        assert!(matches!(m.model, Model::Classifier(_)));
        assert_eq!(m.tokenizer.encode("the good movie", true).unwrap(), vec![2, 5, 9, 7, 3]);
        let data = crate::train::Dataset::parse_jsonl(&tiny_classification_jsonl(20, 3)).unwrap();
        assert_eq!(data.len(), 20);
    }
}
