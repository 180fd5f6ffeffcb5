//! Gemma-2: what its decoder adds to the Llama one ([`super::LlamaModel`] runs both).
//!
//! Ported from Hugging Face `models/gemma2/modeling_gemma2.py` and checked against llama.cpp's `gemma2` graph:
//! token embeddings scaled by `sqrt(hidden_size)` (in f32; transformers casts the factor to the weights'
//! dtype, so a bf16 checkpoint run in bf16 there multiplies by `bf16(sqrt(3584)) = 59.75`, not 59.87); four
//! RMSNorms per block (`input_layernorm` before attention, `post_attention_layernorm` on the attention output
//! before the residual add, `pre_feedforward_layernorm`, `post_feedforward_layernorm` on the MLP output before
//! the residual add); a GeGLU MLP (`gelu_pytorch_tanh(gate)·up`); queries scaled by
//! `query_pre_attn_scalar^-0.5`; attention logits soft-capped (`cap·tanh(s/cap)`) before the mask;
//! sliding-window attention on the layers `layer_types` marks (by default the even ones); the LM head's logits
//! soft-capped too; tied embeddings.
//!
//! **Norm convention.** Hugging Face stores a Gemma RMSNorm weight `w` and multiplies by `1 + w`; llama.cpp's
//! converter stores `w + 1` in GGUF. The [`super::weights::WeightMap`] a model is built from always holds the
//! Hugging Face convention (the GGUF loader subtracts 1, [`norm_from_gguf`]); the model keeps the multiplier
//! `1 + w` ([`take_norm`]), so the plain [`crate::ops::rms_norm`] (and its fused kernel) serves Gemma unchanged,
//! and [`super::LlamaModel::named_weights`] writes `w` back ([`norm_to_hf`]).
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::config::LlamaConfig;
use super::weights::WeightMap;
use crate::{Error, Result};

/// `model_type` of Gemma-2 in `config.json`, and its GGUF `general.architecture`.
pub const GEMMA2: &str = "gemma2";

/// Gemma-2's settings beyond the Llama decoder's (`LlamaConfig::gemma2`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Gemma2Params {
    /// Attention scores are scaled by `query_pre_attn_scalar^-0.5` (not `head_dim^-0.5`).
    pub query_pre_attn_scalar: f64,
    /// `cap` of the attention logits' soft-capping `cap·tanh(s/cap)`, if any.
    pub attn_logit_softcapping: Option<f64>,
    /// `cap` of the LM head logits' soft-capping, if any.
    pub final_logit_softcapping: Option<f64>,
    /// On sliding-window layers a query at position `p` sees the keys at `p − window < j ≤ p`.
    pub sliding_window: Option<usize>,
    /// Per layer: whether it is a sliding-window layer (`layer_types[i] == "sliding_attention"`).
    pub sliding_layers: Vec<bool>,
}

fn num(v: &serde_json::Value, k: &str) -> Option<f64> {
    v.get(k).and_then(|x| x.as_f64())
}

/// A soft-cap value: absent or `null` means none; else it must be a positive number.
fn cap(v: &serde_json::Value, k: &str, default: Option<f64>) -> Result<Option<f64>> {
    match v.get(k) {
        None => Ok(default),
        Some(serde_json::Value::Null) => Ok(None),
        Some(x) => match x.as_f64() {
            Some(c) if c.is_finite() && c > 0.0 => Ok(Some(c)),
            _ => Err(Error::Model(format!("config.json: `{k}` = {x} is not a positive number"))),
        },
    }
}

/// Hugging Face's default layer pattern: `sliding_attention` on even layers, `full_attention` on odd ones.
pub fn default_sliding_layers(layers: usize) -> Vec<bool> {
    (0..layers).map(|i| i % 2 == 0).collect()
}

impl Gemma2Params {
    /// Reads the Gemma-2 fields of a `config.json` with Hugging Face's defaults (`Gemma2Config`).
    pub fn from_hf_value(v: &serde_json::Value, layers: usize) -> Result<Self> {
        for key in ["hidden_activation", "hidden_act"] {
            if let Some(act) = v.get(key).and_then(|x| x.as_str())
                && act != "gelu_pytorch_tanh"
            {
                return Err(Error::Model(format!(
                    "config.json: {key} `{act}` is not supported for gemma2 (only `gelu_pytorch_tanh`)"
                )));
            }
        }
        if v.get("use_bidirectional_attention").and_then(|x| x.as_bool()) == Some(true) {
            return Err(Error::Model("config.json: bidirectional gemma2 attention is not supported".into()));
        }
        let sliding_window = match v.get("sliding_window") {
            None => Some(4096),
            Some(serde_json::Value::Null) => None,
            Some(x) => match x.as_u64() {
                Some(w) if w > 0 => Some(w as usize),
                _ => {
                    return Err(Error::Model(format!("config.json: `sliding_window` = {x} is not a positive integer")));
                }
            },
        };
        let sliding_layers = match v.get("layer_types").filter(|x| !x.is_null()) {
            None => default_sliding_layers(layers),
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .map(|t| match t.as_str() {
                    Some("sliding_attention") => Ok(true),
                    Some("full_attention") => Ok(false),
                    _ => Err(Error::Model(format!("config.json: layer type {t} is not supported"))),
                })
                .collect::<Result<_>>()?,
            Some(x) => return Err(Error::Model(format!("config.json: `layer_types` = {x} is not a list"))),
        };
        let p = Self {
            query_pre_attn_scalar: num(v, "query_pre_attn_scalar").unwrap_or(256.0),
            attn_logit_softcapping: cap(v, "attn_logit_softcapping", Some(50.0))?,
            final_logit_softcapping: cap(v, "final_logit_softcapping", Some(30.0))?,
            sliding_window,
            sliding_layers,
        };
        p.validate(layers)?;
        Ok(p)
    }

    /// Reads the GGUF metadata of a `gemma2` file with llama.cpp's defaults (window 4096, caps 50 and 30). GGUF
    /// has no `query_pre_attn_scalar`: llama.cpp scales by `head_dim^-0.5`, except for the 46-layer 27B
    /// (`hidden/heads`), as Google's reference does.
    pub fn from_gguf(
        ct: &gguf_file::Content,
        layers: usize,
        hidden: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        let f = |k: &str| super::load::md_f64(ct, &format!("{GEMMA2}.{k}"));
        let scalar = if layers == 46 { hidden / heads.max(1) } else { head_dim };
        let p = Self {
            query_pre_attn_scalar: scalar as f64,
            attn_logit_softcapping: Some(f("attn_logit_softcapping").unwrap_or(50.0)),
            final_logit_softcapping: Some(f("final_logit_softcapping").unwrap_or(30.0)),
            sliding_window: Some(super::load::md_u64(ct, "gemma2.attention.sliding_window").unwrap_or(4096) as usize),
            sliding_layers: default_sliding_layers(layers),
        };
        p.validate(layers)?;
        Ok(p)
    }

    /// Checks the values against a model of `layers` layers.
    pub fn validate(&self, layers: usize) -> Result<()> {
        if self.sliding_layers.len() != layers {
            return Err(Error::Model(format!("gemma2: {} layer types for {layers} layers", self.sliding_layers.len())));
        }
        if !(self.query_pre_attn_scalar.is_finite() && self.query_pre_attn_scalar > 0.0) {
            return Err(Error::Model(format!(
                "gemma2: query_pre_attn_scalar {} must be positive",
                self.query_pre_attn_scalar
            )));
        }
        for c in [self.attn_logit_softcapping, self.final_logit_softcapping].into_iter().flatten() {
            if !(c.is_finite() && c > 0.0) {
                return Err(Error::Model(format!("gemma2: soft-cap {c} must be positive")));
            }
        }
        if self.sliding_window == Some(0) {
            return Err(Error::Model("gemma2: sliding_window must be positive".into()));
        }
        Ok(())
    }

    /// The scale of the attention scores, `query_pre_attn_scalar^-0.5`.
    pub fn attention_scale(&self) -> f64 {
        self.query_pre_attn_scalar.powf(-0.5)
    }

    /// Adds the Gemma-2 fields to a Llama-style `config.json` object (and fixes what differs: the activation,
    /// the architecture name, no `mlp_bias`).
    pub fn write_hf_json(&self, v: &mut serde_json::Value) {
        v["architectures"] = serde_json::json!(["Gemma2ForCausalLM"]);
        v["hidden_act"] = serde_json::json!("gelu_pytorch_tanh");
        v["hidden_activation"] = serde_json::json!("gelu_pytorch_tanh");
        // transformers types it `int` (and refuses 256.0).
        let q = self.query_pre_attn_scalar;
        v["query_pre_attn_scalar"] =
            if q.fract() == 0.0 && q < 1e15 { serde_json::json!(q as u64) } else { serde_json::json!(q) };
        v["attn_logit_softcapping"] = serde_json::json!(self.attn_logit_softcapping);
        v["final_logit_softcapping"] = serde_json::json!(self.final_logit_softcapping);
        v["sliding_window"] = serde_json::json!(self.sliding_window);
        v["layer_types"] = serde_json::json!(
            self.sliding_layers
                .iter()
                .map(|&s| if s { "sliding_attention" } else { "full_attention" })
                .collect::<Vec<_>>()
        );
        v["attention_dropout"] = serde_json::json!(0.0);
        if let Some(o) = v.as_object_mut() {
            o.remove("mlp_bias");
        }
    }
}

impl LlamaConfig {
    /// A tiny random-init Gemma-2 configuration for unit tests (window 4 so short sequences exercise it).
    pub fn tiny_gemma2() -> Self {
        let mut c = Self::tiny();
        c.model_type = GEMMA2.into();
        c.num_hidden_layers = 3;
        c.head_dim = 16; // not hidden/heads, as in Gemma-2
        c.rms_norm_eps = 1e-6;
        c.gemma2 = Some(Gemma2Params {
            query_pre_attn_scalar: 12.0,
            attn_logit_softcapping: Some(2.0),
            final_logit_softcapping: Some(1.5),
            sliding_window: Some(4),
            sliding_layers: default_sliding_layers(3),
        });
        c
    }

    /// The scale of the attention scores: `query_pre_attn_scalar^-0.5` for Gemma-2, else `head_dim^-0.5`.
    pub fn attention_scale(&self) -> f64 {
        match &self.gemma2 {
            Some(g) => g.attention_scale(),
            None => 1.0 / (self.head_dim as f64).sqrt(),
        }
    }
}

/// The two extra norms of a Gemma-2 block (multipliers `1 + w`); its `post_attention_layernorm` sits in the
/// block's `post_norm` slot but is applied to the attention output.
#[derive(Clone, Debug)]
pub struct GemmaNorms {
    /// `pre_feedforward_layernorm`: the MLP's input.
    pub pre_ff: Tensor,
    /// `post_feedforward_layernorm`: the MLP's output, before the residual add.
    pub post_ff: Tensor,
}

/// Takes the RMSNorm weight `name` `[d]` and returns the multiplier the model applies: `1 + w` for Gemma-2
/// (Hugging Face convention in `w`), `w` itself otherwise.
pub fn take_norm(w: &mut WeightMap, name: &str, d: usize, gemma: bool) -> Result<Tensor> {
    let t = w.take(name, &[d])?;
    if gemma { Ok(t.to_dtype(DType::F32)?.affine(1.0, 1.0)?) } else { Ok(t) }
}

/// The Hugging Face weight `w` of a Gemma-2 norm multiplier `1 + w` (for `named_weights`).
pub fn norm_to_hf(multiplier: &Tensor) -> Result<Tensor> {
    Ok(multiplier.affine(1.0, -1.0)?)
}

/// The Hugging Face weight `w` of a norm llama.cpp's converter stored as `w + 1`.
pub fn norm_from_gguf(stored: &Tensor) -> Result<Tensor> {
    Ok(stored.to_dtype(DType::F32)?.affine(1.0, -1.0)?)
}

/// The block's extra norms (`pre_feedforward_layernorm`, `post_feedforward_layernorm`) of layer `prefix`.
pub fn take_block_norms(w: &mut WeightMap, prefix: &str, d: usize) -> Result<GemmaNorms> {
    Ok(GemmaNorms {
        pre_ff: take_norm(w, &format!("{prefix}.pre_feedforward_layernorm.weight"), d, true)?,
        post_ff: take_norm(w, &format!("{prefix}.post_feedforward_layernorm.weight"), d, true)?,
    })
}

/// The Hugging Face name of a tensor of a GGUF `gemma2` file (llama.cpp's `MODEL_ARCH.GEMMA2` names): its
/// `ffn_norm` is the pre-feed-forward norm, `post_attention_norm` and `post_ffw_norm` the two post-norms; the
/// rest is named as in llama.
pub fn gguf_hf_name(gguf: &str) -> Option<String> {
    if let Some(rest) = gguf.strip_prefix("blk.")
        && let Some((layer, rest)) = rest.split_once('.')
        && let Some((kind, param)) = rest.split_once('.')
    {
        let sub = match kind {
            "post_attention_norm" => Some("post_attention_layernorm"),
            "ffn_norm" => Some("pre_feedforward_layernorm"),
            "post_ffw_norm" => Some("post_feedforward_layernorm"),
            _ => None,
        };
        if let Some(sub) = sub {
            return Some(format!("model.layers.{layer}.{sub}.{param}"));
        }
    }
    super::load::hf_name(gguf)
}

/// Whether a Hugging Face tensor name is an RMSNorm weight (those GGUF stores as `w + 1`).
pub fn is_norm(hf_name: &str) -> bool {
    hf_name.ends_with("norm.weight")
}

/// Adds the Gemma-2 norms to random Llama weights (unit tests): every norm `N(0, 0.1)` in the Hugging Face
/// convention, so the `1 + w` matters.
pub fn add_random_norms(
    cfg: &LlamaConfig,
    m: &mut std::collections::HashMap<String, Tensor>,
    seed: u64,
    device: &Device,
) -> Result<()> {
    let d = cfg.hidden_size;
    let mut names = vec!["model.norm.weight".to_string()];
    for i in 0..cfg.num_hidden_layers {
        for n in
            ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"]
        {
            names.push(format!("model.layers.{i}.{n}.weight"));
        }
    }
    use rand::SeedableRng;
    use rand_distr::{Distribution, Normal};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x6e6f726d);
    let normal = Normal::new(0f32, 0.1).map_err(|e| Error::Config(e.to_string()))?;
    for n in names {
        let v: Vec<f32> = (0..d).map(|_| normal.sample(&mut rng)).collect();
        m.insert(n, Tensor::from_vec(v, d, device)?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The numerics against Hugging Face transformers are in `tests/gemma2.rs`; these use a random tiny model.
    use candle_core::{D, IndexOp};

    use super::*;
    use crate::adapter::{AdapterConfig, AdapterKind};
    use crate::model::Model;
    use crate::model::config::ArchConfig;
    use crate::model::llama::{KvCache, LLAMA_TARGETS, LlamaModel, random_llama_weights};
    use crate::ops;

    fn maxdiff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    fn ids(v: &[u32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap().unsqueeze(0).unwrap()
    }

    #[test]
    fn published_gemma_2_9b_config_parses_and_writes_back() {
        let text = r#"{"architectures":["Gemma2ForCausalLM"],"attention_bias":false,"attention_dropout":0.0,
            "attn_logit_softcapping":50.0,"bos_token_id":2,"cache_implementation":"hybrid","eos_token_id":1,
            "final_logit_softcapping":30.0,"head_dim":256,"hidden_act":"gelu_pytorch_tanh",
            "hidden_activation":"gelu_pytorch_tanh","hidden_size":3584,"initializer_range":0.02,
            "intermediate_size":14336,"max_position_embeddings":8192,"model_type":"gemma2","num_attention_heads":16,
            "num_hidden_layers":42,"num_key_value_heads":8,"pad_token_id":0,"query_pre_attn_scalar":256,
            "rms_norm_eps":1e-06,"rope_theta":10000.0,"sliding_window":4096,"torch_dtype":"float32",
            "use_cache":true,"vocab_size":256000}"#;
        let ArchConfig::Llama(c) = ArchConfig::from_hf_json(text).unwrap() else { panic!("causal LM expected") };
        assert_eq!((c.head_dim, c.num_key_value_heads), (256, 8));
        assert!(c.tie_word_embeddings, "Gemma-2 ties its embeddings by default");
        let g = c.gemma2.as_ref().unwrap();
        assert_eq!(g.attn_logit_softcapping, Some(50.0));
        assert_eq!(g.final_logit_softcapping, Some(30.0));
        assert_eq!(g.sliding_window, Some(4096));
        assert_eq!(g.sliding_layers.len(), 42);
        assert!(g.sliding_layers[0] && !g.sliding_layers[1] && g.sliding_layers[40] && !g.sliding_layers[41]);
        assert!((c.attention_scale() - 1.0 / 16.0).abs() < 1e-12);
        let out = c.to_hf_json();
        assert_eq!(out["architectures"][0], "Gemma2ForCausalLM");
        assert_eq!(out["hidden_activation"], "gelu_pytorch_tanh");
        assert_eq!(out["layer_types"][1], "full_attention");
        assert!(out["query_pre_attn_scalar"].is_u64(), "transformers wants an int");
        assert!(out.get("mlp_bias").is_none());
        let ArchConfig::Llama(back) = ArchConfig::from_hf_json(&out.to_string()).unwrap() else { panic!() };
        assert_eq!(back, c);
        // Llama configs do not grow a gemma2 field when serialized.
        let llama = serde_json::to_value(LlamaConfig::tiny()).unwrap();
        assert!(llama.get("gemma2").is_none());
    }

    #[test]
    fn bad_gemma2_configs_are_refused() {
        let base = r#"{"model_type":"gemma2","vocab_size":10,"hidden_size":16,"intermediate_size":8,
            "num_hidden_layers":2,"num_attention_heads":2,"head_dim":8"#;
        for extra in [
            r#","hidden_activation":"relu"}"#,
            r#","attn_logit_softcapping":-1}"#,
            r#","sliding_window":0}"#,
            r#","layer_types":["sliding_attention"]}"#,
            r#","layer_types":["chunked_attention","full_attention"]}"#,
        ] {
            let e = ArchConfig::from_hf_json(&format!("{base}{extra}"));
            assert!(e.is_err(), "{extra} should be refused");
        }
        let ok = ArchConfig::from_hf_json(&format!(r#"{base},"final_logit_softcapping":null,"sliding_window":null}}"#));
        let ArchConfig::Llama(c) = ok.unwrap() else { panic!() };
        let g = c.gemma2.unwrap();
        assert_eq!((g.final_logit_softcapping, g.sliding_window), (None, None));
    }

    #[test]
    fn gguf_gemma2_names_map_to_hf() {
        assert_eq!(gguf_hf_name("blk.2.ffn_norm.weight").unwrap(), "model.layers.2.pre_feedforward_layernorm.weight");
        assert_eq!(
            gguf_hf_name("blk.0.post_attention_norm.weight").unwrap(),
            "model.layers.0.post_attention_layernorm.weight"
        );
        assert_eq!(
            gguf_hf_name("blk.1.post_ffw_norm.weight").unwrap(),
            "model.layers.1.post_feedforward_layernorm.weight"
        );
        assert_eq!(gguf_hf_name("blk.1.attn_norm.weight").unwrap(), "model.layers.1.input_layernorm.weight");
        assert_eq!(gguf_hf_name("blk.1.attn_q.weight").unwrap(), "model.layers.1.self_attn.q_proj.weight");
        assert_eq!(gguf_hf_name("output_norm.weight").unwrap(), "model.norm.weight");
        assert!(is_norm("model.norm.weight") && !is_norm("model.layers.0.mlp.up_proj.weight"));
    }

    /// The composite of one Gemma-2 forward pass written out with plain candle ops, from the Hugging Face-named
    /// weights: an independent check of the block order, the norm convention and the sliding window.
    fn reference_forward(cfg: &LlamaConfig, w: &std::collections::HashMap<String, Tensor>, ids: &[u32]) -> Tensor {
        let g = cfg.gemma2.as_ref().unwrap();
        let (d, hq, hkv, hd) = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let t = ids.len();
        let dev = Device::Cpu;
        let get = |n: &str| w.get(n).unwrap().clone();
        let rms = |x: &Tensor, n: &str| -> Tensor {
            let var = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
            let y = x.broadcast_div(&(var + cfg.rms_norm_eps).unwrap().sqrt().unwrap()).unwrap();
            y.broadcast_mul(&(get(n) + 1.0).unwrap()).unwrap()
        };
        let lin = |x: &Tensor, n: &str| x.matmul(&get(&format!("{n}.weight")).t().unwrap()).unwrap();
        let emb = get("model.embed_tokens.weight");
        let mut x = (emb.index_select(&Tensor::new(ids, &dev).unwrap(), 0).unwrap() * (d as f64).sqrt()).unwrap();
        let inv: Vec<f32> = cfg.rope_inv_freq();
        let rope = |x: &Tensor| -> Tensor {
            // x [h, t, hd], rotate-half layout.
            let mut rows = Vec::new();
            for p in 0..t {
                let xp = x.i((.., p, ..)).unwrap();
                let (x1, x2) = (xp.narrow(1, 0, hd / 2).unwrap(), xp.narrow(1, hd / 2, hd / 2).unwrap());
                let ang: Vec<f32> = inv.iter().map(|f| f * p as f32).collect();
                let c = Tensor::new(ang.iter().map(|a| a.cos()).collect::<Vec<_>>(), &dev).unwrap();
                let s = Tensor::new(ang.iter().map(|a| a.sin()).collect::<Vec<_>>(), &dev).unwrap();
                let r1 = (x1.broadcast_mul(&c).unwrap() - x2.broadcast_mul(&s).unwrap()).unwrap();
                let r2 = (x2.broadcast_mul(&c).unwrap() + x1.broadcast_mul(&s).unwrap()).unwrap();
                rows.push(Tensor::cat(&[r1, r2], 1).unwrap().unsqueeze(1).unwrap());
            }
            Tensor::cat(&rows, 1).unwrap()
        };
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let h = rms(&x, &format!("{p}.input_layernorm.weight"));
            let q = lin(&h, &format!("{p}.self_attn.q_proj")).reshape((t, hq, hd)).unwrap().transpose(0, 1).unwrap();
            let k = lin(&h, &format!("{p}.self_attn.k_proj")).reshape((t, hkv, hd)).unwrap().transpose(0, 1).unwrap();
            let v = lin(&h, &format!("{p}.self_attn.v_proj")).reshape((t, hkv, hd)).unwrap().transpose(0, 1).unwrap();
            let (q, k) = (rope(&q.contiguous().unwrap()), rope(&k.contiguous().unwrap()));
            let mut heads = Vec::new();
            for head in 0..hq {
                let kv = head / (hq / hkv);
                let s =
                    (q.i(head).unwrap().matmul(&k.i(kv).unwrap().t().unwrap()).unwrap() * g.attention_scale()).unwrap();
                let cap = g.attn_logit_softcapping.unwrap();
                let s = ((s / cap).unwrap().tanh().unwrap() * cap).unwrap();
                let mut mask = vec![0f32; t * t];
                for i in 0..t {
                    for j in 0..t {
                        let window = g.sliding_layers[l] && i - j.min(i) >= g.sliding_window.unwrap();
                        if j > i || window {
                            mask[i * t + j] = f32::NEG_INFINITY;
                        }
                    }
                }
                let s = (s + Tensor::from_vec(mask, (t, t), &dev).unwrap()).unwrap();
                let pr = candle_nn::ops::softmax(&s, D::Minus1).unwrap();
                heads.push(pr.matmul(&v.i(kv).unwrap().contiguous().unwrap()).unwrap());
            }
            let a = Tensor::cat(&heads, 1).unwrap(); // [t, hq*hd]
            x = (x + rms(&lin(&a, &format!("{p}.self_attn.o_proj")), &format!("{p}.post_attention_layernorm.weight")))
                .unwrap();
            let h = rms(&x, &format!("{p}.pre_feedforward_layernorm.weight"));
            let gate = lin(&h, &format!("{p}.mlp.gate_proj"));
            let gelu = {
                let c = (2.0f64 / std::f64::consts::PI).sqrt();
                let inner = ((&gate + (gate.powf(3.0).unwrap() * 0.044715).unwrap()).unwrap() * c).unwrap();
                ((&gate * 0.5).unwrap() * (inner.tanh().unwrap() + 1.0).unwrap()).unwrap()
            };
            let ff = (gelu * lin(&h, &format!("{p}.mlp.up_proj"))).unwrap();
            x = (x + rms(&lin(&ff, &format!("{p}.mlp.down_proj")), &format!("{p}.post_feedforward_layernorm.weight")))
                .unwrap();
        }
        let x = rms(&x, "model.norm.weight");
        let logits = x.matmul(&emb.t().unwrap()).unwrap();
        let cap = g.final_logit_softcapping.unwrap();
        ((logits / cap).unwrap().tanh().unwrap() * cap).unwrap()
    }

    #[test]
    fn forward_matches_a_plain_composite() {
        let cfg = LlamaConfig::tiny_gemma2();
        let w = random_llama_weights(&cfg, 7, &Device::Cpu).unwrap();
        let m = LlamaModel::random(&cfg, 7, &Device::Cpu).unwrap();
        let seq = [3u32, 7, 9, 11, 5, 8, 13, 2, 40, 17, 1];
        let ours = m.forward(&ids(&seq), None).unwrap().i(0).unwrap();
        let theirs = reference_forward(&cfg, &w, &seq);
        let d = maxdiff(&ours, &theirs);
        assert!(d < 1e-5, "Gemma-2 forward differs from the composite by {d}");
        // The window matters: without it the later positions change.
        let mut no_window = cfg.clone();
        no_window.gemma2.as_mut().unwrap().sliding_window = None;
        let m2 = LlamaModel::random(&no_window, 7, &Device::Cpu).unwrap();
        let far = m2.forward(&ids(&seq), None).unwrap().i(0).unwrap();
        assert!(maxdiff(&far.i(10).unwrap(), &ours.i(10).unwrap()) > 1e-4);
        assert!(maxdiff(&far.i(3).unwrap(), &ours.i(3).unwrap()) < 1e-6, "positions inside the window agree");
    }

    #[test]
    fn kv_cache_and_padding_match_the_full_forward() {
        let dev = Device::Cpu;
        let m = LlamaModel::random(&LlamaConfig::tiny_gemma2(), 1, &dev).unwrap();
        let seq = [3u32, 7, 9, 11, 5, 8, 13, 2, 40];
        let full = m.forward(&ids(&seq), None).unwrap();
        let mut cache = KvCache::new();
        let first = m.forward_step(&ids(&seq[..3]), None, &mut cache).unwrap();
        assert!(maxdiff(&first, &full.i((.., 2, ..)).unwrap()) < 1e-5);
        for p in 3..seq.len() {
            let step = m.forward_step(&ids(&seq[p..p + 1]), None, &mut cache).unwrap();
            assert!(maxdiff(&step, &full.i((.., p, ..)).unwrap()) < 1e-5, "position {p}");
        }
        // Right padding changes nothing on the real tokens.
        let padded = Tensor::new(&[[3u32, 7, 9, 11, 5, 8, 0, 0, 0], seq], &dev).unwrap();
        let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 1, 0, 0, 0], [1; 9]], &dev).unwrap();
        let out = m.forward(&padded, Some(&mask)).unwrap();
        let short = m.forward(&ids(&seq[..6]), None).unwrap();
        assert!(maxdiff(&out.i((0, ..6, ..)).unwrap(), &short.i(0).unwrap()) < 1e-5);
        assert!(maxdiff(&out.i(1).unwrap(), &full.i(0).unwrap()) < 1e-5);
        let v: Vec<f32> = out.flatten_all().unwrap().to_vec1().unwrap();
        assert!(v.iter().all(|x| x.is_finite() && x.abs() <= 1.5 + 1e-5), "logits are soft-capped at 1.5");
    }

    #[test]
    fn export_writes_hf_norms_and_reloads_the_same_model() {
        let dev = Device::Cpu;
        let cfg = LlamaConfig::tiny_gemma2();
        let w = random_llama_weights(&cfg, 4, &dev).unwrap();
        let mut model = Model::CausalLm(LlamaModel::random(&cfg, 4, &dev).unwrap());
        let acfg = AdapterConfig::new(AdapterKind::FfaLora, 2, LLAMA_TARGETS);
        model.attach_adapters(&acfg, None).unwrap();
        let Model::CausalLm(m) = &model else { unreachable!() };
        let named = m.named_weights().unwrap();
        assert_eq!(named.len(), w.len(), "every Hugging Face tensor is exported");
        for (n, t) in &named {
            if is_norm(n) {
                assert!(maxdiff(t, &w[n]) < 1e-6, "{n} is written in the Hugging Face convention");
            }
        }
        let mut map = crate::model::weights::WeightMap::new(named.into_iter().collect()).unwrap();
        let back = LlamaModel::load(&cfg, &mut map).unwrap();
        let x = ids(&[1, 2, 3, 4, 5, 6, 7]);
        assert!(maxdiff(&back.forward(&x, None).unwrap(), &m.forward(&x, None).unwrap()) < 1e-6);
    }

    #[test]
    fn every_adapter_of_every_target_gets_a_gradient() {
        let dev = Device::Cpu;
        let mut model = Model::CausalLm(LlamaModel::random(&LlamaConfig::tiny_gemma2(), 5, &dev).unwrap());
        // FFA-LoRA: A random and frozen, B (trained) starts at zero and still gets a gradient.
        let acfg = AdapterConfig::new(AdapterKind::FfaLora, 2, LLAMA_TARGETS);
        assert_eq!(model.attach_adapters(&acfg, None).unwrap(), 3 * 7);
        let Model::CausalLm(m) = &model else { unreachable!() };
        let x = Tensor::new(&[[3u32, 7, 9, 11, 5, 8, 13, 2], [4, 4, 6, 1, 9, 0, 0, 0]], &dev).unwrap();
        let mask = Tensor::new(&[[1u32; 8], [1, 1, 1, 1, 1, 0, 0, 0]], &dev).unwrap();
        let labels: Vec<Vec<i64>> = vec![vec![7, 9, 11, 5, 8, 13, 2, -100], vec![4, 6, 1, 9, -100, -100, -100, -100]];
        let (loss, _) = m.lm_loss(&x, Some(&mask), &labels).unwrap();
        let grads = loss.backward().unwrap();
        for (name, v) in model.trainable() {
            let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{name} got no gradient"));
            let n = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(n.is_finite() && n > 0.0, "{name}: gradient norm² {n}");
        }
    }

    #[test]
    fn softcapped_attention_and_sliding_mask_match_their_definitions() {
        let dev = Device::Cpu;
        let (b, h, hkv, t, d) = (1, 4, 2, 6, 4);
        let q = Tensor::randn(0f32, 2., (b, h, t, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 2., (b, hkv, t, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1., (b, hkv, t, d), &dev).unwrap();
        let mask = ops::sliding_window_mask(None, b, t, t, 0, 3, &dev).unwrap();
        let m: Vec<f32> = mask.flatten_all().unwrap().to_vec1().unwrap();
        for i in 0..t {
            for j in 0..t {
                let visible = j <= i && i - j < 3;
                assert_eq!(m[i * t + j] == 0.0, visible, "query {i}, key {j}");
            }
        }
        let out = ops::attention_softcapped(&q, &k, &v, Some(&mask), 0.7, 1.5).unwrap();
        for head in 0..h {
            let kv = head / 2;
            let s = (q.i((0, head)).unwrap().matmul(&k.i((0, kv)).unwrap().t().unwrap()).unwrap() * 0.7).unwrap();
            let s = ((s / 1.5).unwrap().tanh().unwrap() * 1.5).unwrap();
            let s = s.broadcast_add(&mask.i((0, 0)).unwrap()).unwrap();
            let p = candle_nn::ops::softmax(&s, D::Minus1).unwrap();
            let r = p.matmul(&v.i((0, kv)).unwrap()).unwrap();
            assert!(maxdiff(&out.i((0, head)).unwrap(), &r) < 1e-5, "head {head}");
        }
        // With an offset (decoding), positions are absolute.
        let m2 = ops::sliding_window_mask(None, 1, 1, 5, 4, 2, &dev).unwrap();
        let row: Vec<f32> = m2.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(row.iter().map(|&x| x == 0.0).collect::<Vec<_>>(), vec![false, false, false, true, true]);
    }
}
