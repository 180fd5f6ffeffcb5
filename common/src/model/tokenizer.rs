//! [`TextTokenizer`]: a Hugging Face `tokenizers` tokenizer plus what the trainer needs around it (special
//! ids, the chat template), built from a `tokenizer.json` or from GGUF metadata.
use std::path::Path;

use candle_core::quantized::gguf_file;
use serde::Serialize;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::tokenizer::SplitDelimiterBehavior;
use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer};

use crate::{Error, Result};

/// One turn of a chat, as chat templates expect it.
#[derive(Clone, Debug, Serialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// A tokenizer with its special tokens and chat template.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    chat_template: Option<String>,
    bos: Option<(u32, String)>,
    eos: Option<(u32, String)>,
    pad_id: Option<u32>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab", &self.inner.get_vocab_size(true))
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("chat_template", &self.chat_template.is_some())
            .finish()
    }
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

const REGEX_LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const REGEX_QWEN2: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn split(regex: &str) -> Result<PreTokenizerWrapper> {
    Ok(Split::new(SplitPattern::Regex(regex.to_string()), SplitDelimiterBehavior::Isolated, false)
        .map_err(tok_err)?
        .into())
}

impl TextTokenizer {
    /// Loads a `tokenizer.json`; special tokens and the chat template come from `tokenizer_config.json`
    /// beside it when present.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let mut inner =
            Tokenizer::from_file(&path).map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        // Batching pads and truncates itself; a tokenizer.json's own padding (e.g. to 128) would waste compute.
        inner.with_padding(None);
        inner.with_truncation(None).map_err(tok_err)?;
        let mut t = Self { inner, chat_template: None, bos: None, eos: None, pad_id: None };
        let cfg_path = dir.join("tokenizer_config.json");
        if let Ok(text) = std::fs::read_to_string(&cfg_path) {
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::Json { context: cfg_path.display().to_string(), source: e })?;
            let token_str = |k: &str| -> Option<String> {
                match v.get(k)? {
                    serde_json::Value::String(s) => Some(s.clone()),
                    serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
                    _ => None,
                }
            };
            let with_id = |s: Option<String>| s.and_then(|s| t.inner.token_to_id(&s).map(|id| (id, s)));
            t.bos = with_id(token_str("bos_token"));
            t.eos = with_id(token_str("eos_token"));
            t.pad_id = token_str("pad_token").and_then(|s| t.inner.token_to_id(&s));
            t.chat_template = match v.get("chat_template") {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                _ => None,
            };
        }
        Ok(t)
    }

    /// Builds a byte-level BPE tokenizer (`tokenizer.ggml.model == "gpt2"`) from GGUF metadata, with the
    /// pre-tokenizer named by `tokenizer.ggml.pre`, control tokens registered as special tokens, and the
    /// chat template from `tokenizer.chat_template`.
    pub fn from_gguf(ct: &gguf_file::Content) -> Result<Self> {
        let md = |k: &str| ct.metadata.get(k);
        let model = md("tokenizer.ggml.model").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
        if model != "gpt2" {
            return Err(Error::Tokenizer(format!(
                "GGUF tokenizer model `{model}` is not supported (only byte-level BPE, `gpt2`); \
                 pass a tokenizer.json instead"
            )));
        }
        let strings = |k: &str| -> Result<Vec<String>> {
            let v = md(k).ok_or_else(|| Error::Tokenizer(format!("GGUF metadata lacks `{k}`")))?;
            let arr = v.to_vec().map_err(tok_err)?;
            arr.iter().map(|x| x.to_string().cloned().map_err(tok_err)).collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges: Vec<(String, String)> = strings("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| tok_err(format!("bad merge `{m}`")))
            })
            .collect::<Result<_>>()?;
        let vocab: tokenizers::models::bpe::Vocab =
            tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(tok_err)?;
        let mut inner = Tokenizer::new(bpe);
        let pre = md("tokenizer.ggml.pre").and_then(|v| v.to_string().ok()).cloned().unwrap_or_else(|| "gpt2".into());
        let byte_level = ByteLevel::new(false, true, false);
        let pre_tok: PreTokenizerWrapper = match pre.as_str() {
            // SmolLM2's tokenizer.json: split every digit, then the GPT-2 regex.
            "smollm" => Sequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()]).into(),
            "gpt2" | "default" => ByteLevel::new(false, true, true).into(),
            "llama-bpe" | "llama3" | "smaug-bpe" => Sequence::new(vec![split(REGEX_LLAMA3)?, byte_level.into()]).into(),
            "qwen2" => {
                inner.with_normalizer(Some(NFC)).map_err(tok_err)?;
                Sequence::new(vec![split(REGEX_QWEN2)?, byte_level.into()]).into()
            }
            other => {
                return Err(Error::Tokenizer(format!(
                    "GGUF pre-tokenizer `{other}` is not supported (smollm, gpt2, llama-bpe, qwen2); pass a tokenizer.json instead"
                )));
            }
        };
        inner.with_pre_tokenizer(Some(pre_tok));
        inner.with_decoder(Some(ByteLevelDecoder::new(false, true, true)));
        // llama.cpp token types: 3 = control (special), 4 = user-defined (added, not special).
        if let Some(types) = md("tokenizer.ggml.token_type").and_then(|v| v.to_vec().ok()) {
            let mut special = Vec::new();
            let mut added = Vec::new();
            for (i, ty) in types.iter().enumerate() {
                let ty = ty.to_i32().or_else(|_| ty.to_u32().map(|x| x as i32)).unwrap_or(1);
                if let Some(tok) = tokens.get(i) {
                    match ty {
                        3 => special.push(AddedToken::from(tok.clone(), true)),
                        4 => added.push(AddedToken::from(tok.clone(), false)),
                        _ => {}
                    }
                }
            }
            inner.add_special_tokens(special).map_err(tok_err)?;
            inner.add_tokens(added).map_err(tok_err)?;
        }
        let id = |k: &str| md(k).and_then(|v| v.to_u32().ok());
        let named = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize).map(|s| (i, s.clone())));
        Ok(Self {
            inner,
            chat_template: md("tokenizer.chat_template").and_then(|v| v.to_string().ok()).cloned(),
            bos: named(id("tokenizer.ggml.bos_token_id")),
            eos: named(id("tokenizer.ggml.eos_token_id")),
            pad_id: id("tokenizer.ggml.padding_token_id"),
        })
    }

    /// Writes `tokenizer.json` and a `tokenizer_config.json` (special tokens, chat template) into `dir`.
    pub fn save_hf(&self, dir: &Path) -> Result<()> {
        let path = dir.join("tokenizer.json");
        self.inner.save(&path, false).map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        let mut cfg = serde_json::json!({ "tokenizer_class": "PreTrainedTokenizerFast" });
        if let Some((_, b)) = &self.bos {
            cfg["bos_token"] = serde_json::json!(b);
        }
        if let Some((_, e)) = &self.eos {
            cfg["eos_token"] = serde_json::json!(e);
        }
        if let Some(p) = self.pad_id.and_then(|id| self.inner.id_to_token(id)) {
            cfg["pad_token"] = serde_json::json!(p);
        }
        if let Some(t) = &self.chat_template {
            cfg["chat_template"] = serde_json::json!(t);
        }
        let text = serde_json::to_string_pretty(&cfg)
            .map_err(|e| Error::Json { context: "tokenizer_config.json".into(), source: e })?;
        crate::tensors::write_atomic(&dir.join("tokenizer_config.json"), text.as_bytes())
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text`; `special` adds the tokenizer's own special tokens (e.g. BERT's [CLS]/[SEP]).
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        Ok(self.inner.encode(text, special).map_err(tok_err)?.get_ids().to_vec())
    }

    /// Token ids and token-type ids of a text pair (with special tokens).
    pub fn encode_pair(&self, a: &str, b: &str) -> Result<(Vec<u32>, Vec<u32>)> {
        let e = self.inner.encode((a, b), true).map_err(tok_err)?;
        Ok((e.get_ids().to_vec(), e.get_type_ids().to_vec()))
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(tok_err)
    }

    /// The id of `token`, if it is in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// End-of-sequence token id.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos.as_ref().map(|e| e.0)
    }

    /// End-of-sequence token text.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos.as_ref().map(|e| e.1.as_str())
    }

    /// Padding token id (falls back to EOS, then 0).
    pub fn pad_id(&self) -> u32 {
        self.pad_id.or(self.eos_id()).unwrap_or(0)
    }

    /// The chat template, if the model has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Renders `messages` with the model's chat template (Jinja, as Hugging Face does). `None` when the
    /// model has no template.
    pub fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<Option<String>> {
        let Some(tpl) = &self.chat_template else {
            return Ok(None);
        };
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template("chat", tpl).map_err(|e| Error::Tokenizer(format!("chat template: {e}")))?;
        let t = env.get_template("chat").map_err(|e| Error::Tokenizer(format!("chat template: {e}")))?;
        let out = t
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos.as_ref().map(|b| b.1.clone()).unwrap_or_default(),
                eos_token => self.eos.as_ref().map(|e| e.1.clone()).unwrap_or_default(),
            })
            .map_err(|e| Error::Tokenizer(format!("chat template: {e}")))?;
        Ok(Some(out))
    }
}
