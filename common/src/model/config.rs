//! Model configurations, read from a Hugging Face `config.json` or from GGUF metadata.
use serde::{Deserialize, Serialize};

use super::gemma::{GEMMA2, Gemma2Params};
use crate::{Error, Result};

/// Configuration of a Llama-architecture causal LM (Llama 2/3, Mistral, Qwen2, SmolLM2, Gemma-2).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// `model_type` of config.json (`llama`, `mistral`, `qwen2`, `gemma2`).
    pub model_type: String,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Width of the SwiGLU feed-forward layer.
    pub intermediate_size: usize,
    /// Number of decoder blocks.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (grouped-query attention when smaller than the query heads).
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// Llama 3 style RoPE frequency scaling, if any.
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// Longest context the model was trained for.
    pub max_position_embeddings: usize,
    /// Whether the LM head shares the token embedding matrix.
    pub tie_word_embeddings: bool,
    /// Whether q/k/v projections have a bias (Qwen2).
    pub attention_bias: bool,
    /// Beginning-of-sequence token id.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token ids (generation stops at any of them).
    pub eos_token_ids: Vec<u32>,
    /// Padding token id.
    pub pad_token_id: Option<u32>,
    /// Gemma-2's extras (norms, GeGLU, soft-capping, sliding window); `None` for the other families.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gemma2: Option<Gemma2Params>,
}

/// Llama 3.1+ RoPE scaling (`rope_scaling.rope_type == "llama3"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Llama3RopeScaling {
    /// Scale factor for low frequencies.
    pub factor: f64,
    /// Low-frequency wavelength factor.
    pub low_freq_factor: f64,
    /// High-frequency wavelength factor.
    pub high_freq_factor: f64,
    /// Context length of the original training.
    pub original_max_position_embeddings: usize,
}

/// Configuration of a BERT-architecture encoder (BERT, MiniLM).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Number of attention heads.
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// Number of learned positions.
    pub max_position_embeddings: usize,
    /// Number of token types (segments).
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// Padding token id.
    pub pad_token_id: u32,
}

/// The architecture of a model folder or file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ArchConfig {
    /// A causal LM.
    Llama(LlamaConfig),
    /// An encoder.
    Bert(BertConfig),
}

fn get<'a>(v: &'a serde_json::Value, k: &str) -> Option<&'a serde_json::Value> {
    v.get(k).filter(|x| !x.is_null())
}

fn req_usize(v: &serde_json::Value, k: &str) -> Result<usize> {
    get(v, k)
        .and_then(|x| x.as_u64())
        .map(|x| x as usize)
        .ok_or_else(|| Error::Model(format!("config.json: missing or non-integer `{k}`")))
}

fn opt_f64(v: &serde_json::Value, k: &str, default: f64) -> f64 {
    get(v, k).and_then(|x| x.as_f64()).unwrap_or(default)
}

fn token_ids(v: Option<&serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect(),
        _ => vec![],
    }
}

impl ArchConfig {
    /// Parses a Hugging Face `config.json`.
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| Error::Json { context: "config.json".into(), source: e })?;
        let model_type = get(&v, "model_type").and_then(|x| x.as_str()).unwrap_or("").to_string();
        match model_type.as_str() {
            "llama" | "mistral" | "qwen2" | GEMMA2 => {
                Ok(ArchConfig::Llama(LlamaConfig::from_hf_value(&v, &model_type)?))
            }
            "bert" => Ok(ArchConfig::Bert(BertConfig::from_hf_value(&v)?)),
            other => Err(Error::Model(format!(
                "config.json: model_type `{other}` is not supported (supported: llama, mistral, qwen2, gemma2, bert)"
            ))),
        }
    }
}

impl LlamaConfig {
    fn from_hf_value(v: &serde_json::Value, model_type: &str) -> Result<Self> {
        let hidden_size = req_usize(v, "hidden_size")?;
        let num_attention_heads = req_usize(v, "num_attention_heads")?;
        if num_attention_heads == 0
            || (!hidden_size.is_multiple_of(num_attention_heads) && get(v, "head_dim").is_none())
        {
            return Err(Error::Model(format!(
                "config.json: hidden_size {hidden_size} is not divisible by num_attention_heads {num_attention_heads}"
            )));
        }
        // Gemma-2 (Hugging Face's `Gemma2Config` defaults): head_dim 256, tied embeddings, 8192 positions, and
        // bos 2 / eos 1 / pad 0 when the keys are absent.
        let gemma = model_type == GEMMA2;
        let head_dim_default = if gemma { 256 } else { hidden_size / num_attention_heads };
        let head_dim = get(v, "head_dim").and_then(|x| x.as_u64()).map(|x| x as usize).unwrap_or(head_dim_default);
        let rope_params = get(v, "rope_scaling").or_else(|| get(v, "rope_parameters"));
        let rope_scaling = match rope_params {
            Some(rs) => {
                let kind =
                    get(rs, "rope_type").or_else(|| get(rs, "type")).and_then(|x| x.as_str()).unwrap_or("default");
                match kind {
                    "default" => None,
                    "llama3" => Some(Llama3RopeScaling {
                        factor: opt_f64(rs, "factor", 8.0),
                        low_freq_factor: opt_f64(rs, "low_freq_factor", 1.0),
                        high_freq_factor: opt_f64(rs, "high_freq_factor", 4.0),
                        original_max_position_embeddings: get(rs, "original_max_position_embeddings")
                            .and_then(|x| x.as_u64())
                            .unwrap_or(8192) as usize,
                    }),
                    other => {
                        return Err(Error::Model(format!("config.json: rope scaling `{other}` is not supported")));
                    }
                }
            }
            None => None,
        };
        let rope_theta = get(v, "rope_theta")
            .and_then(|x| x.as_f64())
            .or_else(|| rope_params.and_then(|r| get(r, "rope_theta")).and_then(|x| x.as_f64()))
            .unwrap_or(10_000.0);
        let num_hidden_layers = req_usize(v, "num_hidden_layers")?;
        let (positions, tied) = if gemma { (8192, true) } else { (4096, false) };
        let token_ids_or = |k: &str, gemma_default: u32| match token_ids(get(v, k)) {
            ids if ids.is_empty() && gemma && v.get(k).is_none() => vec![gemma_default],
            ids => ids,
        };
        let gemma2 = if gemma { Some(Gemma2Params::from_hf_value(v, num_hidden_layers)?) } else { None };
        let cfg = Self {
            model_type: model_type.to_string(),
            vocab_size: req_usize(v, "vocab_size")?,
            hidden_size,
            intermediate_size: req_usize(v, "intermediate_size")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads: get(v, "num_key_value_heads")
                .and_then(|x| x.as_u64())
                .map(|x| x as usize)
                .unwrap_or(num_attention_heads),
            head_dim,
            rms_norm_eps: opt_f64(v, "rms_norm_eps", 1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: get(v, "max_position_embeddings").and_then(|x| x.as_u64()).unwrap_or(positions)
                as usize,
            tie_word_embeddings: get(v, "tie_word_embeddings").and_then(|x| x.as_bool()).unwrap_or(tied),
            attention_bias: get(v, "attention_bias").and_then(|x| x.as_bool()).unwrap_or(model_type == "qwen2"),
            bos_token_id: token_ids_or("bos_token_id", 2).first().copied(),
            eos_token_ids: token_ids_or("eos_token_id", 1),
            pad_token_id: token_ids_or("pad_token_id", 0).first().copied(),
            gemma2,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks that the sizes are consistent.
    pub fn validate(&self) -> Result<()> {
        if self.num_key_value_heads == 0 || !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return Err(Error::Model(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            )));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(Error::Model(format!("head_dim {} must be even for RoPE", self.head_dim)));
        }
        if self.vocab_size == 0 || self.hidden_size == 0 || self.num_hidden_layers == 0 {
            return Err(Error::Model("vocab_size, hidden_size and num_hidden_layers must be positive".into()));
        }
        if let Some(g) = &self.gemma2 {
            g.validate(self.num_hidden_layers)?;
        }
        Ok(())
    }

    /// The Hugging Face `config.json` describing this configuration.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "architectures": [match self.model_type.as_str() {
                "qwen2" => "Qwen2ForCausalLM",
                "mistral" => "MistralForCausalLM",
                _ => "LlamaForCausalLM",
            }],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": false,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": match self.eos_token_ids.as_slice() {
                [one] => serde_json::json!(one),
                many => serde_json::json!(many),
            },
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
        });
        if let Some(g) = &self.gemma2 {
            g.write_hf_json(&mut v);
        }
        if let Some(s) = &self.rope_scaling {
            v["rope_scaling"] = serde_json::json!({
                "rope_type": "llama3",
                "factor": s.factor,
                "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
            });
        }
        v
    }

    /// A tiny random-init configuration for unit tests.
    pub fn tiny() -> Self {
        Self {
            model_type: "llama".into(),
            vocab_size: 61,
            hidden_size: 32,
            intermediate_size: 48,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 8,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: None,
            max_position_embeddings: 128,
            tie_word_embeddings: true,
            attention_bias: false,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
            pad_token_id: Some(2),
            gemma2: None,
        }
    }

    /// RoPE inverse frequencies (`head_dim / 2` of them), with Llama 3 scaling when configured.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base: Vec<f64> = (0..d).step_by(2).map(|i| 1.0 / self.rope_theta.powf(i as f64 / d as f64)).collect();
        match &self.rope_scaling {
            None => base.into_iter().map(|x| x as f32).collect(),
            Some(s) => {
                let low_wavelen = s.original_max_position_embeddings as f64 / s.low_freq_factor;
                let high_wavelen = s.original_max_position_embeddings as f64 / s.high_freq_factor;
                base.into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        let v = if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / s.factor
                        } else {
                            let smooth = (s.original_max_position_embeddings as f64 / wavelen - s.low_freq_factor)
                                / (s.high_freq_factor - s.low_freq_factor);
                            (1.0 - smooth) * f / s.factor + smooth * f
                        };
                        v as f32
                    })
                    .collect()
            }
        }
    }
}

impl BertConfig {
    fn from_hf_value(v: &serde_json::Value) -> Result<Self> {
        let act = get(v, "hidden_act").and_then(|x| x.as_str()).unwrap_or("gelu");
        if act != "gelu" {
            return Err(Error::Model(format!("config.json: hidden_act `{act}` is not supported (only exact `gelu`)")));
        }
        let pos = get(v, "position_embedding_type").and_then(|x| x.as_str()).unwrap_or("absolute");
        if pos != "absolute" {
            return Err(Error::Model(format!("config.json: position_embedding_type `{pos}` is not supported")));
        }
        let cfg = Self {
            vocab_size: req_usize(v, "vocab_size")?,
            hidden_size: req_usize(v, "hidden_size")?,
            num_hidden_layers: req_usize(v, "num_hidden_layers")?,
            num_attention_heads: req_usize(v, "num_attention_heads")?,
            intermediate_size: req_usize(v, "intermediate_size")?,
            max_position_embeddings: req_usize(v, "max_position_embeddings")?,
            type_vocab_size: get(v, "type_vocab_size").and_then(|x| x.as_u64()).unwrap_or(2) as usize,
            layer_norm_eps: opt_f64(v, "layer_norm_eps", 1e-12),
            pad_token_id: get(v, "pad_token_id").and_then(|x| x.as_u64()).unwrap_or(0) as u32,
        };
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
            return Err(Error::Model(format!(
                "config.json: hidden_size {} is not divisible by num_attention_heads {}",
                cfg.hidden_size, cfg.num_attention_heads
            )));
        }
        Ok(cfg)
    }

    /// The Hugging Face `config.json` describing this configuration (with `num_labels` classes).
    pub fn to_hf_json(&self, num_labels: usize) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["BertModel"],
            "model_type": "bert",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "intermediate_size": self.intermediate_size,
            "hidden_act": "gelu",
            "max_position_embeddings": self.max_position_embeddings,
            "type_vocab_size": self.type_vocab_size,
            "layer_norm_eps": self.layer_norm_eps,
            "pad_token_id": self.pad_token_id,
            "position_embedding_type": "absolute",
            "num_labels": num_labels,
            "torch_dtype": "float32",
        })
    }

    /// A tiny random-init configuration for unit tests.
    pub fn tiny() -> Self {
        Self {
            vocab_size: 50,
            hidden_size: 24,
            num_hidden_layers: 2,
            num_attention_heads: 3,
            intermediate_size: 40,
            max_position_embeddings: 64,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            pad_token_id: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_llama3_and_qwen2_and_bert() {
        let llama3 = r#"{"model_type":"llama","vocab_size":128256,"hidden_size":3072,"intermediate_size":8192,
            "num_hidden_layers":28,"num_attention_heads":24,"num_key_value_heads":8,"rms_norm_eps":1e-5,
            "rope_theta":500000.0,"rope_scaling":{"factor":32.0,"high_freq_factor":4.0,"low_freq_factor":1.0,
            "original_max_position_embeddings":8192,"rope_type":"llama3"},"tie_word_embeddings":true,
            "bos_token_id":128000,"eos_token_id":[128001,128008,128009]}"#;
        let ArchConfig::Llama(c) = ArchConfig::from_hf_json(llama3).unwrap() else { panic!() };
        assert_eq!(c.head_dim, 128);
        assert_eq!(c.eos_token_ids, vec![128001, 128008, 128009]);
        assert!(c.rope_scaling.is_some());
        let f = c.rope_inv_freq();
        assert_eq!(f.len(), 64);
        assert!((f[0] - 1.0).abs() < 1e-6, "high frequencies are unscaled");
        let qwen = r#"{"model_type":"qwen2","vocab_size":151936,"hidden_size":896,"intermediate_size":4864,
            "num_hidden_layers":24,"num_attention_heads":14,"num_key_value_heads":2,"rope_theta":1000000.0}"#;
        let ArchConfig::Llama(q) = ArchConfig::from_hf_json(qwen).unwrap() else { panic!() };
        assert!(q.attention_bias);
        let bert = r#"{"model_type":"bert","vocab_size":30522,"hidden_size":384,"num_hidden_layers":6,
            "num_attention_heads":12,"intermediate_size":1536,"max_position_embeddings":512,"hidden_act":"gelu"}"#;
        assert!(matches!(ArchConfig::from_hf_json(bert).unwrap(), ArchConfig::Bert(_)));
    }

    #[test]
    fn bad_configs_are_refused_clearly() {
        let e = ArchConfig::from_hf_json(r#"{"model_type":"gpt2"}"#).unwrap_err().to_string();
        assert!(e.contains("gpt2"), "{e}");
        let e = ArchConfig::from_hf_json(r#"{"model_type":"llama","vocab_size":10}"#).unwrap_err().to_string();
        assert!(e.contains("hidden_size"), "{e}");
        assert!(ArchConfig::from_hf_json("{not json").is_err());
        let gqa = r#"{"model_type":"llama","vocab_size":10,"hidden_size":16,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":4,"num_key_value_heads":3}"#;
        assert!(ArchConfig::from_hf_json(gqa).is_err());
    }
}
