//! Loading pretrained models from a local Hugging Face folder (`config.json`, `*.safetensors`,
//! `tokenizer.json`) or a GGUF file (tokenizer from the metadata).
//!
//! The frozen matrices keep the checkpoint's precision (bf16/f16 safetensors stay bf16/f16, GGUF block formats
//! stay quantized; see [`crate::frozen`]) unless [`LoadOptions::dtype`] asks for another format.
//!
//! GGUF llama checkpoints store Q and K with their rows permuted for llama.cpp's interleaved RoPE; they are
//! un-permuted here to the Hugging Face layout, so one RoPE ([`crate::ops::rope`]) serves every model and an
//! exported adapter applies to the Hugging Face weights of the same model. GGUF `gemma2` files are not permuted;
//! their norms (stored as `w + 1`) are brought to the Hugging Face convention ([`super::gemma`]).
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use serde::Serialize;

use super::bert::{HEAD_BIAS, HEAD_WEIGHT};
use super::config::{ArchConfig, LlamaConfig};
use super::tokenizer::TextTokenizer;
use super::weights::{StoredTensor, WeightMap};
use super::{BertClassifier, BertModel, LlamaModel, Model};
use crate::frozen::{QuantKind, QuantMatrix, WeightDtype};
use crate::tensors::file_sha256;
use crate::{Error, Result};

/// The on-disk format a model came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModelFormat {
    /// A Hugging Face folder with safetensors weights.
    HfFolder,
    /// A GGUF file.
    Gguf,
}

/// Options for [`load_model`].
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Number of classes of the classification head (encoders only). Default 2.
    pub num_labels: usize,
    /// Seed of the classification head's init.
    pub head_seed: u64,
    /// A `tokenizer.json` to use instead of the model's own.
    pub tokenizer: Option<PathBuf>,
    /// The format of the frozen matrices (`--dtype`): as stored (`auto`), or converted.
    pub dtype: WeightDtype,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { num_labels: 2, head_seed: 0, tokenizer: None, dtype: WeightDtype::Auto }
    }
}

/// A loaded model with its tokenizer and where it came from.
#[derive(Clone, Debug)]
pub struct LoadedModel {
    /// The model.
    pub model: Model,
    /// Its tokenizer.
    pub tokenizer: TextTokenizer,
    /// Its architecture.
    pub arch: ArchConfig,
    /// The folder or file given.
    pub path: PathBuf,
    /// The format.
    pub format: ModelFormat,
    /// The files holding the weights, sorted.
    pub weight_files: Vec<PathBuf>,
}

impl LoadedModel {
    /// SHA-256 identifying the base weights: of the file itself when there is one weight file, else of the
    /// lines `"<file name> <sha256>\n"` of the sorted files. Clients and coordinator compare it.
    pub fn weights_sha256(&self) -> Result<String> {
        weights_sha256(&self.weight_files)
    }
}

/// See [`LoadedModel::weights_sha256`].
pub fn weights_sha256(files: &[PathBuf]) -> Result<String> {
    match files {
        [one] => file_sha256(one),
        many => {
            use sha2::Digest;
            let mut h = sha2::Sha256::new();
            for f in many {
                let name = f.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
                h.update(format!("{name} {}\n", file_sha256(f)?).as_bytes());
            }
            Ok(hex::encode(h.finalize()))
        }
    }
}

/// The files holding the weights of the model at `path` (sorted), without loading them: for hashing the
/// base model before deciding how to load it.
pub fn model_weight_files(path: &Path) -> Result<Vec<PathBuf>> {
    let (format, file) = resolve(path)?;
    match format {
        ModelFormat::Gguf => Ok(vec![file]),
        ModelFormat::HfFolder => {
            let files: Vec<PathBuf> =
                list_dir(path)?.into_iter().filter(|p| p.extension().is_some_and(|e| e == "safetensors")).collect();
            if files.is_empty() {
                return Err(Error::Model(format!("{}: no *.safetensors weights", path.display())));
            }
            Ok(files)
        }
    }
}

/// Loads the model at `path`: a Hugging Face folder, a `.gguf` file, or a folder holding exactly one
/// `.gguf` file. Llama-family configs give a causal LM; BERT configs a sequence classifier.
pub fn load_model(path: &Path, device: &Device, opts: &LoadOptions) -> Result<LoadedModel> {
    let (format, file) = resolve(path)?;
    let (arch, weights, own_tokenizer, weight_files) = match format {
        ModelFormat::HfFolder => load_hf(path)?,
        ModelFormat::Gguf => load_gguf(&file)?,
    };
    let mut weights = weights.with_target(opts.dtype).on_device(device);
    // The model's own tokenizer is needed only when none is given (a GGUF's may be of an unsupported kind).
    let tokenizer = match &opts.tokenizer {
        Some(t) => {
            let dir = t.parent().unwrap_or(Path::new("."));
            if t.file_name().is_some_and(|n| n == "tokenizer.json") {
                TextTokenizer::from_hf_dir(dir)?
            } else {
                return Err(Error::Tokenizer(format!("{}: expected a path to a tokenizer.json", t.display())));
            }
        }
        None => own_tokenizer?,
    };
    let model = match &arch {
        ArchConfig::Llama(c) => Model::CausalLm(LlamaModel::load(c, &mut weights)?),
        ArchConfig::Bert(c) => {
            let enc = BertModel::load(c, &mut weights)?;
            let d = c.hidden_size;
            // A head saved with the weights (a merged export) is used when it has the requested classes.
            let saved = match (
                weights.take_opt(HEAD_WEIGHT, &[opts.num_labels, d]),
                weights.take_opt(HEAD_BIAS, &[opts.num_labels]),
            ) {
                (Ok(Some(w)), Ok(Some(b))) => Some((w, b)),
                _ => None,
            };
            let clf = BertClassifier::new(enc, opts.num_labels, opts.head_seed)?;
            if let Some((w, b)) = saved {
                clf.set_head(&w, &b)?;
            }
            Model::Classifier(clf)
        }
    };
    let unused: Vec<String> = weights.remaining().into_iter().filter(|n| !ignorable(n)).collect();
    if !unused.is_empty() {
        tracing::debug!("{} checkpoint tensors unused: {:?}", unused.len(), &unused[..unused.len().min(8)]);
    }
    drop(weights);
    crate::benchstats::release_free_memory();
    Ok(LoadedModel { model, tokenizer, arch, path: path.to_path_buf(), format, weight_files })
}

fn ignorable(name: &str) -> bool {
    name.contains("pooler.") || name.ends_with("position_ids") || name.contains("rotary_emb.inv_freq")
}

fn resolve(path: &Path) -> Result<(ModelFormat, PathBuf)> {
    if path.is_file() {
        if path.extension().is_some_and(|e| e == "gguf") {
            return Ok((ModelFormat::Gguf, path.to_path_buf()));
        }
        return Err(Error::Model(format!(
            "{}: not a .gguf file; give a GGUF file or a Hugging Face folder",
            path.display()
        )));
    }
    if !path.is_dir() {
        return Err(Error::Model(format!("{}: no such file or folder", path.display())));
    }
    if path.join("config.json").is_file() {
        return Ok((ModelFormat::HfFolder, path.to_path_buf()));
    }
    let ggufs: Vec<PathBuf> =
        list_dir(path)?.into_iter().filter(|p| p.extension().is_some_and(|e| e == "gguf")).collect();
    match ggufs.as_slice() {
        [one] => Ok((ModelFormat::Gguf, one.clone())),
        [] => Err(Error::Model(format!("{}: holds neither config.json nor a .gguf file", path.display()))),
        _ => Err(Error::Model(format!("{}: holds several .gguf files; name one", path.display()))),
    }
}

fn list_dir(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> =
        std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    v.sort();
    Ok(v)
}

type Loaded = (ArchConfig, WeightMap, Result<TextTokenizer>, Vec<PathBuf>);

fn load_hf(dir: &Path) -> Result<Loaded> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let arch = ArchConfig::from_hf_json(&text).map_err(|e| Error::Model(format!("{}: {e}", cfg_path.display())))?;
    let files: Vec<PathBuf> =
        list_dir(dir)?.into_iter().filter(|p| p.extension().is_some_and(|e| e == "safetensors")).collect();
    if files.is_empty() {
        return Err(Error::Model(format!(
            "{}: no *.safetensors weights (PyTorch .bin checkpoints are not supported)",
            dir.display()
        )));
    }
    let mut tensors = HashMap::new();
    for f in &files {
        // On the CPU in the stored dtype; the model's device and format are applied as each tensor is taken.
        let part = candle_core::safetensors::load(f, &Device::Cpu)
            .map_err(|e| Error::Model(format!("{}: {e}", f.display())))?;
        tensors.extend(part);
    }
    let tokenizer = TextTokenizer::from_hf_dir(dir);
    Ok((arch, WeightMap::new(tensors)?, tokenizer, files))
}

pub(super) fn md_u64(ct: &gguf_file::Content, key: &str) -> Option<u64> {
    use gguf_file::Value as V;
    match ct.metadata.get(key)? {
        V::U8(v) => Some(*v as u64),
        V::I8(v) => u64::try_from(*v).ok(),
        V::U16(v) => Some(*v as u64),
        V::I16(v) => u64::try_from(*v).ok(),
        V::U32(v) => Some(*v as u64),
        V::I32(v) => u64::try_from(*v).ok(),
        V::U64(v) => Some(*v),
        V::I64(v) => u64::try_from(*v).ok(),
        _ => None,
    }
}

pub(super) fn md_f64(ct: &gguf_file::Content, key: &str) -> Option<f64> {
    use gguf_file::Value as V;
    match ct.metadata.get(key)? {
        V::F32(v) => Some(*v as f64),
        V::F64(v) => Some(*v),
        _ => md_u64(ct, key).map(|v| v as f64),
    }
}

/// The Llama configuration described by GGUF metadata.
pub fn llama_config_from_gguf(ct: &gguf_file::Content) -> Result<LlamaConfig> {
    let arch = ct
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .ok_or_else(|| Error::Model("GGUF metadata lacks general.architecture".into()))?;
    if !matches!(arch.as_str(), "llama" | "mistral" | "qwen2" | super::gemma::GEMMA2) {
        return Err(Error::Model(format!(
            "GGUF architecture `{arch}` is not supported (llama, mistral, qwen2, gemma2)"
        )));
    }
    let req = |k: &str| {
        md_u64(ct, &format!("{arch}.{k}"))
            .map(|v| v as usize)
            .ok_or_else(|| Error::Model(format!("GGUF metadata lacks {arch}.{k}")))
    };
    let hidden = req("embedding_length")?;
    let heads = req("attention.head_count")?;
    let head_dim =
        md_u64(ct, &format!("{arch}.attention.key_length")).map(|v| v as usize).unwrap_or(hidden / heads.max(1));
    let vocab = match md_u64(ct, &format!("{arch}.vocab_size")) {
        Some(v) => v as usize,
        None => ct
            .metadata
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.to_vec().ok())
            .map(|v| v.len())
            .ok_or_else(|| Error::Model("GGUF metadata gives no vocabulary size".into()))?,
    };
    let mut cfg = LlamaConfig {
        model_type: arch.clone(),
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: req("feed_forward_length")?,
        num_hidden_layers: req("block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: md_u64(ct, &format!("{arch}.attention.head_count_kv"))
            .map(|v| v as usize)
            .unwrap_or(heads),
        head_dim,
        rms_norm_eps: md_f64(ct, &format!("{arch}.attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
        rope_theta: md_f64(ct, &format!("{arch}.rope.freq_base")).unwrap_or(10_000.0),
        rope_scaling: None,
        max_position_embeddings: req("context_length").unwrap_or(4096),
        tie_word_embeddings: !ct.tensor_infos.contains_key("output.weight"),
        attention_bias: ct.tensor_infos.contains_key("blk.0.attn_q.bias"),
        bos_token_id: md_u64(ct, "tokenizer.ggml.bos_token_id").map(|v| v as u32),
        eos_token_ids: md_u64(ct, "tokenizer.ggml.eos_token_id").map(|v| vec![v as u32]).unwrap_or_default(),
        pad_token_id: md_u64(ct, "tokenizer.ggml.padding_token_id").map(|v| v as u32),
        gemma2: None,
    };
    if arch == super::gemma::GEMMA2 {
        let g = super::gemma::Gemma2Params::from_gguf(ct, cfg.num_hidden_layers, hidden, heads, head_dim)?;
        cfg.gemma2 = Some(g);
    }
    if ct.tensor_infos.contains_key("rope_freqs.weight") {
        return Err(Error::Model(
            "GGUF with rope_freqs (Llama 3.1 RoPE scaling) is not supported; use the Hugging Face folder".into(),
        ));
    }
    cfg.validate()?;
    Ok(cfg)
}

/// Undoes llama.cpp's Q/K row permutation (`convert_hf_to_gguf.py`, `LlamaModel.permute`) for `heads` heads:
/// rows grouped per head as `[d/2 pairs, 2]` become `[2, d/2]` (Hugging Face's rotate-half layout).
pub fn unpermute_qk(w: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = w.dims().to_vec();
    let rows = dims[0];
    let cols: usize = dims[1..].iter().product::<usize>().max(1);
    if heads == 0 || !rows.is_multiple_of(2 * heads) {
        return Err(Error::tensor("attn_q/attn_k", format!("{rows} rows cannot be split into {heads} heads of pairs")));
    }
    let t = w.reshape((heads, rows / heads / 2, 2, cols))?.transpose(1, 2)?.contiguous()?;
    Ok(t.reshape(dims)?)
}

pub(super) fn hf_name(gguf: &str) -> Option<String> {
    Some(match gguf {
        "token_embd.weight" => "model.embed_tokens.weight".into(),
        "output_norm.weight" => "model.norm.weight".into(),
        "output.weight" => "lm_head.weight".into(),
        _ => {
            let rest = gguf.strip_prefix("blk.")?;
            let (layer, rest) = rest.split_once('.')?;
            let (kind, param) = rest.split_once('.')?;
            let sub = match kind {
                "attn_norm" => "input_layernorm",
                "ffn_norm" => "post_attention_layernorm",
                "attn_q" => "self_attn.q_proj",
                "attn_k" => "self_attn.k_proj",
                "attn_v" => "self_attn.v_proj",
                "attn_output" => "self_attn.o_proj",
                "ffn_gate" => "mlp.gate_proj",
                "ffn_up" => "mlp.up_proj",
                "ffn_down" => "mlp.down_proj",
                _ => return None,
            };
            format!("model.layers.{layer}.{sub}.{param}")
        }
    })
}

/// GGUF tensor types by their number in the file format (ggml.h), for error messages.
fn ggml_type_name(t: u32) -> &'static str {
    match t {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => "unknown",
    }
}

/// The GGUF tensor types fedsb reads, as error messages list them.
pub fn supported_gguf_types() -> String {
    let mut v = vec!["F32".to_string(), "F16".into(), "BF16".into()];
    v.extend(QuantKind::ALL.iter().map(|k| k.name().to_uppercase()));
    v.join(", ")
}

/// Reads a GGUF header, turning candle's "unknown dtype" into an error that names the type and lists the
/// supported ones.
fn read_gguf(file: &Path, f: &mut std::fs::File) -> Result<gguf_file::Content> {
    gguf_file::Content::read(f).map_err(|e| {
        let msg = e.to_string();
        let number = msg
            .split("unknown dtype for tensor ")
            .nth(1)
            .map(|n| n.chars().take_while(char::is_ascii_digit).collect::<String>());
        match number.and_then(|n| n.parse::<u32>().ok()) {
            Some(t) => Error::Model(format!(
                "{}: GGUF tensor type {} ({t}) is not supported (supported: {})",
                file.display(),
                ggml_type_name(t),
                supported_gguf_types()
            )),
            None => Error::Model(format!("{}: {msg}", file.display())),
        }
    })
}

/// The row order that undoes llama.cpp's Q/K permutation for `heads` heads (see [`unpermute_qk`]): row `i` of
/// the result is row `perm[i]` of the GGUF tensor.
fn unpermute_rows(rows: usize, heads: usize) -> Result<Vec<usize>> {
    if heads == 0 || !rows.is_multiple_of(2 * heads) {
        return Err(Error::tensor("attn_q/attn_k", format!("{rows} rows cannot be split into {heads} heads of pairs")));
    }
    let hd = rows / heads;
    let mut perm = Vec::with_capacity(rows);
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..hd / 2 {
                perm.push(h * hd + 2 * i + j);
            }
        }
    }
    Ok(perm)
}

/// One GGUF tensor as stored: float tensors as candle tensors (f32, f16, bf16), block formats as
/// [`QuantMatrix`] read straight from the file (no dequantization).
fn read_gguf_tensor(
    f: &mut std::fs::File,
    ct: &gguf_file::Content,
    name: &str,
    info: &gguf_file::TensorInfo,
) -> Result<StoredTensor> {
    use candle_core::quantized::GgmlDType;
    use std::io::{Read, Seek, SeekFrom};
    let dims = info.shape.dims().to_vec();
    match info.ggml_dtype {
        GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
            let q = ct.tensor(f, name, &Device::Cpu)?;
            let t = match info.ggml_dtype {
                GgmlDType::F32 => q.dequantize(&Device::Cpu)?,
                GgmlDType::F16 => q.dequantize_f16(&Device::Cpu)?,
                _ => q.dequantize(&Device::Cpu)?.to_dtype(candle_core::DType::BF16)?,
            };
            Ok(StoredTensor::Dense(t))
        }
        t => {
            let kind = QuantKind::from_ggml(t).ok_or_else(|| {
                Error::tensor(
                    name,
                    format!("GGUF tensor type {t:?} is not supported (supported: {})", supported_gguf_types()),
                )
            })?;
            let (rows, cols) = match dims.as_slice() {
                [c] => (1, *c),
                [r, c] => (*r, *c),
                d => {
                    return Err(Error::tensor(
                        name,
                        format!("a {kind:?} tensor of shape {d:?}: only 1-D and 2-D are read"),
                    ));
                }
            };
            let bytes = rows * cols / kind.block_size() * kind.block_bytes();
            let mut buf = vec![0u8; bytes];
            f.seek(SeekFrom::Start(ct.tensor_data_offset + info.offset))
                .map_err(|e| Error::tensor(name, e.to_string()))?;
            f.read_exact(&mut buf).map_err(|e| Error::tensor(name, format!("reading {bytes} bytes: {e}")))?;
            let q = QuantMatrix::from_bytes(kind, rows, cols, &buf).map_err(|e| Error::tensor(name, e.to_string()))?;
            if dims.len() == 1 {
                // A quantized vector (a norm or bias in some files): f32 like every vector.
                return Ok(StoredTensor::Dense(Tensor::from_vec(q.dequantize(), cols, &Device::Cpu)?));
            }
            Ok(StoredTensor::Quant(q))
        }
    }
}

fn load_gguf(file: &Path) -> Result<Loaded> {
    let mut f = std::fs::File::open(file).map_err(|e| Error::io(file, e))?;
    let ct = read_gguf(file, &mut f)?;
    let cfg = llama_config_from_gguf(&ct).map_err(|e| Error::Model(format!("{}: {e}", file.display())))?;
    let permuted = matches!(cfg.model_type.as_str(), "llama" | "mistral");
    let gemma = cfg.gemma2.is_some();
    let mut names: Vec<&String> = ct.tensor_infos.keys().collect();
    names.sort();
    let mut tensors = HashMap::new();
    for name in names {
        let Some(hf) = (if gemma { super::gemma::gguf_hf_name(name) } else { hf_name(name) }) else {
            tracing::debug!("GGUF tensor {name} not used");
            continue;
        };
        let info = &ct.tensor_infos[name];
        let mut t =
            read_gguf_tensor(&mut f, &ct, name, info).map_err(|e| Error::Model(format!("{}: {e}", file.display())))?;
        let heads = if !permuted {
            None
        } else if name.contains(".attn_q.") {
            Some(cfg.num_attention_heads)
        } else if name.contains(".attn_k.") {
            Some(cfg.num_key_value_heads)
        } else {
            None
        };
        if let Some(heads) = heads {
            t = match t {
                StoredTensor::Dense(d) => StoredTensor::Dense(unpermute_qk(&d, heads)?),
                StoredTensor::Quant(q) => StoredTensor::Quant(q.permute_rows(&unpermute_rows(q.dims().0, heads)?)?),
            };
        }
        if gemma
            && super::gemma::is_norm(&hf)
            && let StoredTensor::Dense(d) = &t
        {
            t = StoredTensor::Dense(super::gemma::norm_from_gguf(d)?);
        }
        tensors.insert(hf, t);
    }
    let tokenizer = TextTokenizer::from_gguf(&ct);
    Ok((ArchConfig::Llama(cfg), WeightMap::from_stored(tensors), tokenizer, vec![file.to_path_buf()]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        let dev = Device::Cpu;
        let (heads, hd, cols) = (3, 4, 5);
        let w = Tensor::arange(0f32, (heads * hd * cols) as f32, &dev).unwrap().reshape((heads * hd, cols)).unwrap();
        // llama.cpp: w.reshape(n_head, 2, rows//n_head//2, cols).swapaxes(1, 2).reshape(rows, cols)
        let permuted = w
            .reshape((heads, 2, hd / 2, cols))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((heads * hd, cols))
            .unwrap();
        let back = unpermute_qk(&permuted, heads).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
        // The row order used for quantized tensors is the same permutation.
        let perm = unpermute_rows(heads * hd, heads).unwrap();
        let rows: Vec<Vec<f32>> = permuted.to_vec2().unwrap();
        let by_perm: Vec<Vec<f32>> = perm.iter().map(|&p| rows[p].clone()).collect();
        assert_eq!(by_perm, w.to_vec2::<f32>().unwrap());
        assert!(unpermute_qk(&w, 5).is_err());
    }

    #[test]
    fn gguf_names_map_to_hf() {
        assert_eq!(hf_name("blk.3.attn_q.weight").unwrap(), "model.layers.3.self_attn.q_proj.weight");
        assert_eq!(hf_name("blk.0.ffn_down.weight").unwrap(), "model.layers.0.mlp.down_proj.weight");
        assert_eq!(hf_name("blk.1.attn_k.bias").unwrap(), "model.layers.1.self_attn.k_proj.bias");
        assert!(hf_name("rope_freqs.weight").is_none());
    }

    /// A tensor type candle cannot even parse (an i-quant) is refused by name with the supported list; one it
    /// parses but fedsb does not keep (Q8_1) too.
    #[test]
    fn unsupported_gguf_types_are_refused_by_name() {
        use candle_core::quantized::{GgmlDType, QTensor};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.gguf");
        let x = Tensor::zeros((2, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
        let q = QTensor::quantize(&x, GgmlDType::F32).unwrap();
        let mut out = std::fs::File::create(&path).unwrap();
        gguf_file::write(&mut out, &[], &[("x", &q)]).unwrap();
        drop(out);
        // Header (24 bytes), then the tensor info: name (u64 length + 1 byte), u32 dims, 2 × u64 dims, u32 type.
        let mut bytes = std::fs::read(&path).unwrap();
        let at = 24 + 8 + 1 + 4 + 16;
        assert_eq!(u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()), 0, "F32 where expected");
        bytes[at..at + 4].copy_from_slice(&16u32.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let mut f = std::fs::File::open(&path).unwrap();
        let e = read_gguf(&path, &mut f).unwrap_err().to_string();
        assert!(e.contains("IQ2_XXS") && e.contains("Q4_K") && e.contains("BF16"), "{e}");
        // Q8_1: parsed by candle, not a format fedsb keeps.
        let q = QTensor::quantize(&x, GgmlDType::Q8_1).unwrap();
        let mut out = std::fs::File::create(&path).unwrap();
        gguf_file::write(&mut out, &[], &[("x", &q)]).unwrap();
        drop(out);
        let mut f = std::fs::File::open(&path).unwrap();
        let ct = read_gguf(&path, &mut f).unwrap();
        let e = read_gguf_tensor(&mut f, &ct, "x", &ct.tensor_infos["x"]).unwrap_err().to_string();
        assert!(e.contains("Q8_1") && e.contains("Q6_K"), "{e}");
    }

    #[test]
    fn missing_paths_are_clear_errors() {
        let e = resolve(Path::new("/nonexistent/model")).unwrap_err().to_string();
        assert!(e.contains("no such file"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let e = resolve(dir.path()).unwrap_err().to_string();
        assert!(e.contains("neither config.json"), "{e}");
        std::fs::write(dir.path().join("config.json"), r#"{"model_type":"bert"}"#).unwrap();
        let e = load_model(dir.path(), &Device::Cpu, &LoadOptions::default()).unwrap_err().to_string();
        assert!(e.contains("vocab_size"), "{e}");
    }
}
