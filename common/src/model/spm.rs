//! SentencePiece tokenizers as llama.cpp stores them in GGUF (`tokenizer.ggml.model == "llama"`: Llama-2, Mistral,
//! Gemma, ...), rebuilt as a Hugging Face `tokenizers` BPE with byte fallback, the way Hugging Face transformers
//! converts them (`GGUFLlamaConverter`, `LlamaConverter`).
//!
//! SentencePiece's BPE starts from the characters of the text (with `▁` for every space, and a leading `▁` when
//! `tokenizer.ggml.add_space_prefix` is true) and repeatedly merges the adjacent pair whose concatenation is the
//! highest-scoring piece; characters left outside the vocabulary become `<0xXX>` byte pieces. A BPE model does the
//! same when its merge ranks follow the merged pieces' scores, so the merges are generated from the vocabulary: every
//! split of a normal or user-defined piece into two pieces of the vocabulary is a merge, ranked by the merged piece's
//! score (descending), then by id. Control, unknown, byte and unused pieces are never merge results: SentencePiece
//! does not produce them from text either.
//!
//! Control and unknown tokens become special tokens, user-defined ones added tokens (both matched in the raw text
//! before normalization, as llama.cpp does with `parse_special`). BOS (and EOS when `add_eos_token`) are added by a
//! post-processor, so only when the caller asks for special tokens.
use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::processors::template::{SpecialToken, TemplateProcessing};
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, Tokenizer};

use crate::{Error, Result};

/// SentencePiece's stand-in for a space.
const SPACE: &str = "\u{2581}";

/// A SentencePiece tokenizer read from GGUF, with its special tokens.
pub(crate) struct SpmTokenizer {
    /// The `tokenizers` pipeline.
    pub tokenizer: Tokenizer,
    /// Beginning-of-sequence id and text.
    pub bos: Option<(u32, String)>,
    /// End-of-sequence id and text.
    pub eos: Option<(u32, String)>,
    /// Padding id.
    pub pad_id: Option<u32>,
}

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TokenType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    fn from_code(code: i64) -> Option<Self> {
        Some(match code {
            // 0 is llama.cpp's "undefined", which it treats as normal text.
            0 | 1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => return None,
        })
    }

    /// Whether SentencePiece's BPE may produce this piece by merging (its `pieces_`).
    fn is_piece(self) -> bool {
        matches!(self, Self::Normal | Self::UserDefined | Self::Unused)
    }
}

fn err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

fn bad(key: &str, what: impl std::fmt::Display) -> Error {
    Error::Tokenizer(format!("GGUF `{key}`: {what}"))
}

/// An integer of any GGUF integer type.
fn int(v: &Value) -> Option<i64> {
    Some(match v {
        Value::U8(x) => i64::from(*x),
        Value::I8(x) => i64::from(*x),
        Value::U16(x) => i64::from(*x),
        Value::I16(x) => i64::from(*x),
        Value::U32(x) => i64::from(*x),
        Value::I32(x) => i64::from(*x),
        Value::U64(x) => i64::try_from(*x).ok()?,
        Value::I64(x) => *x,
        _ => return None,
    })
}

fn array<'a>(ct: &'a Content, key: &str) -> Result<Option<&'a Vec<Value>>> {
    match ct.metadata.get(key) {
        None => Ok(None),
        Some(Value::Array(a)) => Ok(Some(a)),
        Some(v) => Err(bad(key, format!("expected an array, found {:?}", v.value_type()))),
    }
}

/// A boolean flag, `default` when absent.
fn flag(ct: &Content, key: &str, default: bool) -> Result<bool> {
    match ct.metadata.get(key) {
        None => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => int(v).map(|x| x != 0).ok_or_else(|| bad(key, format!("expected a bool, found {v:?}"))),
    }
}

/// A token id below `n`: `default` when absent, none when negative (llama.cpp's "no token").
fn token_id(ct: &Content, key: &str, default: Option<u32>, n: usize) -> Result<Option<u32>> {
    let Some(v) = ct.metadata.get(key) else {
        return Ok(default.filter(|&d| (d as usize) < n));
    };
    let id = int(v).ok_or_else(|| bad(key, format!("expected an integer token id, found {v:?}")))?;
    if id < 0 {
        return Ok(None);
    }
    if id as u64 >= n as u64 {
        return Err(bad(key, format!("token id {id} is outside the vocabulary of {n} tokens")));
    }
    Ok(Some(id as u32))
}

/// Builds the tokenizer of a GGUF whose `tokenizer.ggml.model` is `llama` (SentencePiece).
///
/// Reads `tokenizer.ggml.tokens`, `.scores` (required, one per token), `.token_type` (optional; without it the
/// unknown, BOS and EOS tokens are the only special ones), `.bos_token_id` / `.eos_token_id` / `.unknown_token_id`
/// (llama.cpp's defaults 1, 2 and 0 when absent), `.padding_token_id`, `.add_bos_token` (default true),
/// `.add_eos_token` (default false) and `.add_space_prefix` (default true; Gemma sets it false).
pub(crate) fn from_gguf(ct: &Content) -> Result<SpmTokenizer> {
    const TOKENS: &str = "tokenizer.ggml.tokens";
    const SCORES: &str = "tokenizer.ggml.scores";
    const TYPES: &str = "tokenizer.ggml.token_type";
    let tokens: Vec<String> = array(ct, TOKENS)?
        .ok_or_else(|| bad(TOKENS, "missing"))?
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::String(s) => Ok(s.clone()),
            v => Err(bad(TOKENS, format!("token {i} is not a string: {v:?}"))),
        })
        .collect::<Result<_>>()?;
    let n = tokens.len();
    if n == 0 {
        return Err(bad(TOKENS, "the vocabulary is empty"));
    }
    if u32::try_from(n).is_err() {
        return Err(bad(TOKENS, format!("{n} tokens do not fit u32 ids")));
    }
    let scores = array(ct, SCORES)?.ok_or_else(|| {
        bad(SCORES, "missing (a SentencePiece vocabulary needs one score per token to derive its merges)")
    })?;
    if scores.len() != n {
        return Err(bad(SCORES, format!("{} scores for {n} tokens", scores.len())));
    }
    let scores: Vec<f32> = scores
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::F32(x) if !x.is_nan() => Ok(*x),
            Value::F64(x) if !x.is_nan() => Ok(*x as f32),
            v => Err(bad(SCORES, format!("score {i} is not a number: {v:?}"))),
        })
        .collect::<Result<_>>()?;

    let unk = token_id(ct, "tokenizer.ggml.unknown_token_id", Some(0), n)?;
    let bos = token_id(ct, "tokenizer.ggml.bos_token_id", Some(1), n)?;
    let eos = token_id(ct, "tokenizer.ggml.eos_token_id", Some(2), n)?;
    let pad_id = token_id(ct, "tokenizer.ggml.padding_token_id", None, n)?;
    let add_bos = flag(ct, "tokenizer.ggml.add_bos_token", true)?;
    let add_eos = flag(ct, "tokenizer.ggml.add_eos_token", false)?;
    let space_prefix = flag(ct, "tokenizer.ggml.add_space_prefix", true)?;

    let types: Vec<TokenType> = match array(ct, TYPES)? {
        Some(a) => {
            if a.len() != n {
                return Err(bad(TYPES, format!("{} token types for {n} tokens", a.len())));
            }
            a.iter()
                .enumerate()
                .map(|(i, v)| {
                    int(v)
                        .and_then(TokenType::from_code)
                        .ok_or_else(|| bad(TYPES, format!("token {i} has type {v:?}; known types are 0 to 6")))
                })
                .collect::<Result<_>>()?
        }
        None => (0..n as u32)
            .map(|i| match i {
                _ if Some(i) == unk => TokenType::Unknown,
                _ if Some(i) == bos || Some(i) == eos => TokenType::Control,
                _ => TokenType::Normal,
            })
            .collect(),
    };

    // A text that appears twice encodes to its first id; the later id decodes to nothing.
    let mut vocab = Vocab::default();
    for (i, t) in tokens.iter().enumerate() {
        vocab.entry(t.clone()).or_insert(i as u32);
    }
    let merges = merges(&tokens, &scores, &types, &vocab);
    let mut bpe = BPE::builder().vocab_and_merges(vocab, merges).byte_fallback(true).fuse_unk(true);
    if let Some(u) = unk {
        bpe = bpe.unk_token(tokens[u as usize].clone());
    }
    let mut tokenizer = Tokenizer::new(bpe.build().map_err(err)?);

    let replace: NormalizerWrapper = Replace::new(" ", SPACE).map_err(err)?.into();
    let normalizer = if space_prefix {
        NormalizerSequence::new(vec![Prepend::new(SPACE.into()).into(), replace])
    } else {
        NormalizerSequence::new(vec![replace])
    };
    tokenizer.with_normalizer(Some(normalizer)).map_err(err)?;
    let mut decoders: Vec<DecoderWrapper> =
        vec![Replace::new(SPACE, " ").map_err(err)?.into(), ByteFallback::new().into(), Fuse::new().into()];
    if space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));

    let mut special = Vec::new();
    let mut added = Vec::new();
    for (t, ty) in tokens.iter().zip(&types) {
        match ty {
            TokenType::Control | TokenType::Unknown => special.push(AddedToken::from(t.clone(), true)),
            TokenType::UserDefined => added.push(AddedToken::from(t.clone(), false).normalized(false)),
            _ => {}
        }
    }
    tokenizer.add_special_tokens(special).map_err(err)?;
    tokenizer.add_tokens(added).map_err(err)?;

    let named = |id: Option<u32>| id.map(|i| (i, tokens[i as usize].clone()));
    let (bos, eos) = (named(bos), named(eos));
    if let Some(p) = post_processor(bos.as_ref(), eos.as_ref(), add_bos, add_eos)? {
        tokenizer.with_post_processor(Some(p));
    }
    Ok(SpmTokenizer { tokenizer, bos, eos, pad_id })
}

/// The merges that make a BPE encode like SentencePiece's BPE over this vocabulary (see the module doc).
fn merges(tokens: &[String], scores: &[f32], types: &[TokenType], vocab: &Vocab) -> Vec<(String, String)> {
    let piece_id = |s: &str| vocab.get(s).copied().filter(|&i| types[i as usize].is_piece());
    let mut found: Vec<(f32, u32, u32, u32, usize)> = Vec::new();
    for (id, tok) in tokens.iter().enumerate() {
        let id = id as u32;
        if !matches!(types[id as usize], TokenType::Normal | TokenType::UserDefined) || vocab.get(tok) != Some(&id) {
            continue;
        }
        for (at, _) in tok.char_indices().skip(1) {
            if let (Some(l), Some(r)) = (piece_id(&tok[..at]), piece_id(&tok[at..])) {
                found.push((scores[id as usize], id, l, r, at));
            }
        }
    }
    found.sort_by(|a, b| b.0.total_cmp(&a.0).then((a.1, a.2, a.3).cmp(&(b.1, b.2, b.3))));
    found
        .into_iter()
        .map(|(_, id, _, _, at)| {
            let t = &tokens[id as usize];
            (t[..at].to_string(), t[at..].to_string())
        })
        .collect()
}

/// `bos $A eos` (and `bos $A eos bos $B:1 eos:1` for pairs), with the parts the flags ask for; none when neither.
fn post_processor(
    bos: Option<&(u32, String)>,
    eos: Option<&(u32, String)>,
    add_bos: bool,
    add_eos: bool,
) -> Result<Option<TemplateProcessing>> {
    if !add_bos && !add_eos {
        return Ok(None);
    }
    let mut specials = Vec::new();
    let mut pick = |add: bool, tok: Option<&(u32, String)>, name: &'static str, key: &str| -> Result<Option<&str>> {
        if !add {
            return Ok(None);
        }
        let (id, text) = tok.ok_or_else(|| {
            Error::Tokenizer(format!(
                "GGUF `tokenizer.ggml.add_{name}_token` is true but there is no {name} token (`tokenizer.ggml.{key}`)"
            ))
        })?;
        specials.push(SpecialToken::new(name.into(), vec![*id], vec![text.clone()]).map_err(err)?);
        Ok(Some(name))
    };
    let b = pick(add_bos, bos, "bos", "bos_token_id")?;
    let e = pick(add_eos, eos, "eos", "eos_token_id")?;
    let seq = |s: &'static str, ty: u32| -> Vec<String> {
        b.iter()
            .map(|b| format!("{b}:{ty}"))
            .chain([format!("{s}:{ty}")])
            .chain(e.iter().map(|e| format!("{e}:{ty}")))
            .collect()
    };
    let single = seq("$A", 0);
    let pair: Vec<String> = single.iter().cloned().chain(seq("$B", 1)).collect();
    let template = TemplateProcessing::builder()
        .try_single(single)
        .map_err(err)?
        .try_pair(pair)
        .map_err(err)?
        .special_tokens(specials)
        .build()
        .map_err(err)?;
    Ok(Some(template))
}
