//! [`TextTokenizer`]: a Hugging Face `tokenizers` tokenizer plus what the trainer needs around it (special
//! ids, the chat template), built from a `tokenizer.json` or from GGUF metadata.
//!
//! GGUF tokenizers ([`TextTokenizer::from_gguf`], by `tokenizer.ggml.model`):
//! - `gpt2`: byte-level BPE with stored merges (SmolLM2, Llama-3, Qwen2, ...), pre-tokenizer by `tokenizer.ggml.pre`;
//! - `llama`: SentencePiece BPE with byte fallback (Llama-2, Mistral, Gemma, ...), merges derived from the scores
//!   (see `spm.rs`).
//!
//! Other GGUF tokenizers (`bert`, `t5`, `rwkv`, ...) are refused; pass a `tokenizer.json` for those.
//!
//! Special tokens: [`TextTokenizer::encode`] always turns the text of a control token (`<s>`, `<|im_start|>`, ...)
//! into that token, and its `special` flag only adds the tokenizer's own framing (BERT's `[CLS]`/`[SEP]`, an SPM
//! model's BOS when `tokenizer.ggml.add_bos_token` is set; `gpt2` GGUF tokenizers add nothing). Chat templates write
//! `{{ bos_token }}` themselves, so text rendered by [`TextTokenizer::apply_chat_template`] must be encoded with
//! `special = false` (as `train::data` does) or it would start with two BOS.
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

/// The GGUF tokenizer models [`TextTokenizer::from_gguf`] reads, for error messages.
const SUPPORTED: &str = "supported: `gpt2` (byte-level BPE), `llama` (SentencePiece)";

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

    /// Builds the tokenizer stored in GGUF metadata, chosen by `tokenizer.ggml.model`: `gpt2` (byte-level BPE) or
    /// `llama` (SentencePiece BPE with byte fallback). Control tokens are registered as special tokens; the chat
    /// template comes from `tokenizer.chat_template`.
    pub fn from_gguf(ct: &gguf_file::Content) -> Result<Self> {
        let chat_template = ct.metadata.get("tokenizer.chat_template").and_then(|v| v.to_string().ok()).cloned();
        let model = match ct.metadata.get("tokenizer.ggml.model") {
            None => return Err(Error::Tokenizer(format!("GGUF metadata lacks `tokenizer.ggml.model` ({SUPPORTED})"))),
            Some(v) => v.to_string().map_err(|e| tok_err(format!("GGUF `tokenizer.ggml.model`: {e}")))?,
        };
        match model.as_str() {
            "gpt2" => Ok(Self { chat_template, ..Self::gpt2_from_gguf(ct)? }),
            "llama" => {
                let s = super::spm::from_gguf(ct)?;
                Ok(Self { inner: s.tokenizer, chat_template, bos: s.bos, eos: s.eos, pad_id: s.pad_id })
            }
            other => Err(Error::Tokenizer(format!(
                "GGUF tokenizer model `{other}` is not supported ({SUPPORTED}); pass a tokenizer.json instead"
            ))),
        }
    }

    /// A byte-level BPE tokenizer (`tokenizer.ggml.model == "gpt2"`) with the pre-tokenizer named by
    /// `tokenizer.ggml.pre`; no chat template.
    fn gpt2_from_gguf(ct: &gguf_file::Content) -> Result<Self> {
        let md = |k: &str| ct.metadata.get(k);
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
            chat_template: None,
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

    /// Token ids of `text`; `special` adds the tokenizer's own special tokens (BERT's [CLS]/[SEP], a SentencePiece
    /// GGUF's BOS). Control-token text in `text` (e.g. a chat template's `<s>`) is parsed as that token either way.
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

#[cfg(test)]
mod tests {
    //! The SentencePiece (`llama`) GGUF path against the real SentencePiece library: the GGUF files and expected
    //! ids in `tests/data/spm/` come from `scripts/make-spm-test-data.py`.
    use super::*;
    use candle_core::quantized::gguf_file::{Content, Value};

    #[derive(serde::Deserialize)]
    struct Case {
        text: String,
        ids: Vec<u32>,
        ids_special: Vec<u32>,
        decoded: String,
        sp_ids: Vec<u32>,
        parses_special: bool,
    }

    #[derive(serde::Deserialize)]
    struct Reference {
        vocab_size: usize,
        bos_id: u32,
        eos_id: u32,
        pad_id: Option<u32>,
        cases: Vec<Case>,
    }

    fn data(file: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/spm").join(file)
    }

    fn content(name: &str) -> Content {
        let path = data(&format!("{name}.gguf"));
        let mut f = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Content::read(&mut f).unwrap()
    }

    fn reference(name: &str) -> Reference {
        let path = data(&format!("{name}.json"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_str(&text).unwrap()
    }

    /// Every case's ids (with and without BOS) and decoding equal SentencePiece's.
    fn check_cases(name: &str, tok: &TextTokenizer) {
        let r = reference(name);
        let mut bad = Vec::new();
        for c in &r.cases {
            if !c.parses_special {
                assert_eq!(c.ids, c.sp_ids, "{name}: the data claims SentencePiece's own ids for {:?}", c.text);
            }
            let ids = tok.encode(&c.text, false).unwrap();
            let ids_special = tok.encode(&c.text, true).unwrap();
            let decoded = tok.decode(&ids_special).unwrap();
            if ids != c.ids || ids_special != c.ids_special || decoded != c.decoded {
                bad.push(format!(
                    "{:?}:\n  ids  {ids_special:?}\n  want {:?}\n  decoded {decoded:?}, want {:?}",
                    c.text, c.ids_special, c.decoded
                ));
            }
        }
        assert!(
            bad.is_empty(),
            "{name}: {} of {} cases differ from SentencePiece:\n{}",
            bad.len(),
            r.cases.len(),
            bad.join("\n")
        );
    }

    fn check_against_sentencepiece(name: &str) {
        let r = reference(name);
        let tok = TextTokenizer::from_gguf(&content(name)).unwrap();
        assert_eq!(tok.vocab_size(), r.vocab_size);
        assert_eq!(tok.bos.as_ref().map(|b| b.0), Some(r.bos_id));
        assert_eq!(tok.eos_id(), Some(r.eos_id));
        assert_eq!(tok.pad_id, r.pad_id);
        assert!(tok.chat_template().is_some());
        check_cases(name, &tok);
    }

    #[test]
    fn spm_tokenizer_matches_sentencepiece_with_space_prefix() {
        check_against_sentencepiece("llama");
    }

    #[test]
    fn spm_tokenizer_matches_sentencepiece_without_space_prefix() {
        check_against_sentencepiece("gemma");
    }

    #[test]
    fn spm_tokenizer_without_token_types() {
        // Without `token_type`, the unknown, BOS and EOS tokens are the special ones: all the llama file has.
        let mut ct = content("llama");
        ct.metadata.remove("tokenizer.ggml.token_type");
        check_cases("llama", &TextTokenizer::from_gguf(&ct).unwrap());
    }

    #[test]
    fn spm_tokenizer_chat_template_has_one_bos() {
        let msgs = [ChatMessage { role: "user".into(), content: "What is 2 + 2?".into() }];
        for (name, start) in [("llama", "<s>[INST] What"), ("gemma", "<bos><start_of_turn>user\nWhat")] {
            let r = reference(name);
            let tok = TextTokenizer::from_gguf(&content(name)).unwrap();
            let text = tok.apply_chat_template(&msgs, true).unwrap().unwrap();
            assert!(text.starts_with(start), "{name}: {text:?}");
            // The template writes the BOS text, which encodes to the BOS token: encode with special = false.
            let ids = tok.encode(&text, false).unwrap();
            assert_eq!(ids[0], r.bos_id, "{name}");
            assert_eq!(ids.iter().filter(|&&i| i == r.bos_id).count(), 1, "{name}");
            assert_eq!(tok.encode(&text, true).unwrap()[..2], [r.bos_id, r.bos_id], "{name}");
            assert_eq!(tok.decode(&ids).unwrap(), text.replacen(tok.bos.as_ref().map_or("", |b| b.1.as_str()), "", 1));
        }
    }

    #[test]
    fn spm_tokenizer_bos_eos_flags_and_pairs() {
        let r = reference("llama");
        let (bos, eos) = (r.bos_id, r.eos_id);
        let mut ct = content("llama");
        let set = |ct: &mut Content, k: &str, v: bool| {
            ct.metadata.insert(format!("tokenizer.ggml.{k}"), Value::Bool(v));
        };
        let plain = TextTokenizer::from_gguf(&ct).unwrap();
        let hello = plain.encode("Hello", false).unwrap();
        let world = plain.encode("world", false).unwrap();
        let cat = |parts: &[&[u32]]| parts.concat();
        assert_eq!(plain.encode("Hello", true).unwrap(), cat(&[&[bos], &hello]));

        set(&mut ct, "add_eos_token", true);
        let tok = TextTokenizer::from_gguf(&ct).unwrap();
        assert_eq!(tok.encode("Hello", true).unwrap(), cat(&[&[bos], &hello, &[eos]]));
        assert_eq!(tok.encode("Hello", false).unwrap(), hello);
        let (ids, types) = tok.encode_pair("Hello", "world").unwrap();
        assert_eq!(ids, cat(&[&[bos], &hello, &[eos, bos], &world, &[eos]]));
        let n0 = hello.len() + 2;
        assert_eq!(types, [vec![0; n0], vec![1; ids.len() - n0]].concat());

        set(&mut ct, "add_bos_token", false);
        assert_eq!(TextTokenizer::from_gguf(&ct).unwrap().encode("Hello", true).unwrap(), cat(&[&hello, &[eos]]));
        set(&mut ct, "add_eos_token", false);
        assert_eq!(TextTokenizer::from_gguf(&ct).unwrap().encode("Hello", true).unwrap(), hello);
    }

    #[test]
    fn spm_tokenizer_survives_save_hf() {
        let tok = TextTokenizer::from_gguf(&content("gemma")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        tok.save_hf(dir.path()).unwrap();
        let back = TextTokenizer::from_hf_dir(dir.path()).unwrap();
        assert_eq!((back.bos.clone(), back.eos.clone()), (tok.bos.clone(), tok.eos.clone()));
        assert_eq!(back.chat_template(), tok.chat_template());
        check_cases("gemma", &back);
    }

    #[test]
    fn spm_tokenizer_rejects_bad_metadata() {
        let n = reference("llama").vocab_size;
        let (short, long) =
            (format!("{} scores for {n} tokens", n - 1), format!("{} token types for {n} tokens", n + 1));
        let fails = |what: &str, edit: &dyn Fn(&mut Content), needles: &[&str]| {
            let mut ct = content("llama");
            edit(&mut ct);
            let e = TextTokenizer::from_gguf(&ct).err().unwrap_or_else(|| panic!("{what}: loaded")).to_string();
            for n in needles {
                assert!(e.contains(n), "{what}: {e:?} lacks {n:?}");
            }
        };
        let set = |k: &'static str, v: Value| {
            move |ct: &mut Content| {
                ct.metadata.insert(k.into(), v.clone());
            }
        };
        let remove = |k: &'static str| {
            move |ct: &mut Content| {
                ct.metadata.remove(k);
            }
        };
        let edit_array = |k: &'static str, f: fn(&mut Vec<Value>)| {
            move |ct: &mut Content| {
                if let Some(Value::Array(a)) = ct.metadata.get_mut(k) {
                    f(a)
                }
            }
        };
        fails(
            "unknown model",
            &set("tokenizer.ggml.model", Value::String("bert".into())),
            &["`bert`", "gpt2", "llama"],
        );
        fails("no model", &remove("tokenizer.ggml.model"), &["tokenizer.ggml.model", "gpt2", "llama"]);
        fails("model not a string", &set("tokenizer.ggml.model", Value::U32(1)), &["tokenizer.ggml.model"]);
        fails("no tokens", &remove("tokenizer.ggml.tokens"), &["tokenizer.ggml.tokens", "missing"]);
        fails("no scores", &remove("tokenizer.ggml.scores"), &["tokenizer.ggml.scores", "missing"]);
        fails(
            "short scores",
            &edit_array("tokenizer.ggml.scores", |a| {
                a.pop();
            }),
            &[&short],
        );
        fails(
            "scores not numbers",
            &edit_array("tokenizer.ggml.scores", |a| a[5] = Value::String("x".into())),
            &["tokenizer.ggml.scores", "score 5"],
        );
        fails("NaN score", &edit_array("tokenizer.ggml.scores", |a| a[7] = Value::F32(f32::NAN)), &["score 7"]);
        fails("scores not an array", &set("tokenizer.ggml.scores", Value::F32(0.0)), &["scores", "expected an array"]);
        fails("long types", &edit_array("tokenizer.ggml.token_type", |a| a.push(Value::I32(1))), &[&long]);
        fails(
            "bad type",
            &edit_array("tokenizer.ggml.token_type", |a| a[3] = Value::I32(9)),
            &["tokenizer.ggml.token_type", "token 3 has type"],
        );
        fails(
            "bos out of range",
            &set("tokenizer.ggml.bos_token_id", Value::U32(n as u32)),
            &["bos_token_id", "outside"],
        );
        fails("unk not an id", &set("tokenizer.ggml.unknown_token_id", Value::F32(0.0)), &["unknown_token_id"]);
        fails(
            "bos asked for but none",
            &set("tokenizer.ggml.bos_token_id", Value::I32(-1)),
            &["add_bos_token", "no bos token"],
        );
    }
}
