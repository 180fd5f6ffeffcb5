//! A BERT-architecture encoder (BERT, MiniLM) whose linear layers take adapters, and a sequence
//! classifier on its mean-pooled output.
//!
//! Ported from Hugging Face `modeling_bert.py` (and candle-transformers' `bert.rs`) with the
//! differentiable ops of [`crate::ops`]. Module paths follow the checkpoint
//! (`encoder.layer.N.attention.self.query`, with a `bert.` prefix when the checkpoint has one).
use candle_core::{DType, Device, Tensor, Var};

use super::config::BertConfig;
use super::weights::WeightMap;
use crate::adapter::AdaptedLinear;
use crate::frozen::{FrozenWeight, WeightBytes};
use crate::{Error, Result, ops};

/// The target kinds of a BERT model, in layer order.
pub const BERT_TARGETS: &[&str] =
    &["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"];

#[derive(Clone, Debug)]
struct LayerNorm {
    w: Tensor,
    b: Tensor,
}

impl LayerNorm {
    fn load(w: &mut WeightMap, p: &str, d: usize) -> Result<Self> {
        // Old checkpoints name LayerNorm parameters gamma/beta.
        Ok(Self {
            w: w.take_any(&[&format!("{p}.weight"), &format!("{p}.gamma")], &[d])?,
            b: w.take_any(&[&format!("{p}.bias"), &format!("{p}.beta")], &[d])?,
        })
    }
}

#[derive(Clone, Debug)]
struct Layer {
    query: AdaptedLinear,
    key: AdaptedLinear,
    value: AdaptedLinear,
    attn_out: AdaptedLinear,
    attn_norm: LayerNorm,
    inter: AdaptedLinear,
    out: AdaptedLinear,
    out_norm: LayerNorm,
}

/// A BERT encoder.
#[derive(Clone, Debug)]
pub struct BertModel {
    cfg: BertConfig,
    prefix: String,
    word: FrozenWeight,
    pos: Tensor,
    token_type: Tensor,
    emb_norm: LayerNorm,
    layers: Vec<Layer>,
}

impl BertModel {
    /// Builds the encoder from checkpoint weights. A `bert.` name prefix is detected.
    pub fn load(cfg: &BertConfig, w: &mut WeightMap) -> Result<Self> {
        let prefix = if w.contains_full("bert.embeddings.word_embeddings.weight") { "bert." } else { "" };
        let saved_prefix = w.prefix().to_string();
        let mut w2 = std::mem::take(w).with_prefix(prefix);
        let r = Self::load_inner(cfg, &mut w2, prefix);
        *w = w2.with_prefix(saved_prefix);
        r
    }

    fn load_inner(cfg: &BertConfig, w: &mut WeightMap, prefix: &str) -> Result<Self> {
        let (d, ff) = (cfg.hidden_size, cfg.intermediate_size);
        let word = w.take_frozen("embeddings.word_embeddings.weight", &[cfg.vocab_size, d])?;
        let pos = w.take("embeddings.position_embeddings.weight", &[cfg.max_position_embeddings, d])?;
        let token_type = w.take("embeddings.token_type_embeddings.weight", &[cfg.type_vocab_size, d])?;
        let emb_norm = LayerNorm::load(w, "embeddings.LayerNorm", d)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("encoder.layer.{i}");
            let mut lin = |sub: &str, kind: &'static str, out: usize, inp: usize| -> Result<AdaptedLinear> {
                let local = format!("{p}.{sub}");
                let weight = w.take_frozen(&format!("{local}.weight"), &[out, inp])?;
                let bias = w.take(&format!("{local}.bias"), &[out])?;
                AdaptedLinear::new(format!("{prefix}{local}"), kind, weight, Some(bias))
            };
            let query = lin("attention.self.query", "query", d, d)?;
            let key = lin("attention.self.key", "key", d, d)?;
            let value = lin("attention.self.value", "value", d, d)?;
            let attn_out = lin("attention.output.dense", "attention.output.dense", d, d)?;
            let inter = lin("intermediate.dense", "intermediate.dense", ff, d)?;
            let out = lin("output.dense", "output.dense", d, ff)?;
            layers.push(Layer {
                query,
                key,
                value,
                attn_out,
                attn_norm: LayerNorm::load(w, &format!("{p}.attention.output.LayerNorm"), d)?,
                inter,
                out,
                out_norm: LayerNorm::load(w, &format!("{p}.output.LayerNorm"), d)?,
            });
        }
        Ok(Self { cfg: cfg.clone(), prefix: prefix.to_string(), word, pos, token_type, emb_norm, layers })
    }

    /// A model with random weights (unit tests).
    pub fn random(cfg: &BertConfig, seed: u64, device: &Device) -> Result<Self> {
        let mut w = WeightMap::new(random_bert_weights(cfg, seed, device)?)?;
        Self::load(cfg, &mut w)
    }

    /// The configuration.
    pub fn config(&self) -> &BertConfig {
        &self.cfg
    }

    /// The checkpoint's name prefix (`""` or `"bert."`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.pos.device()
    }

    /// Bytes of the frozen matrices (linear weights, word embeddings) by format.
    pub fn weight_bytes(&self) -> WeightBytes {
        let mut b = WeightBytes::default();
        b.add(&self.word);
        for l in self.linears() {
            b.add(l.weight());
        }
        b
    }

    /// Every linear layer, in layer order.
    pub fn linears(&self) -> Vec<&AdaptedLinear> {
        self.layers.iter().flat_map(|l| [&l.query, &l.key, &l.value, &l.attn_out, &l.inter, &l.out]).collect()
    }

    /// Every linear layer, mutably.
    pub fn linears_mut(&mut self) -> Vec<&mut AdaptedLinear> {
        self.layers
            .iter_mut()
            .flat_map(|l| [&mut l.query, &mut l.key, &mut l.value, &mut l.attn_out, &mut l.inter, &mut l.out])
            .collect()
    }

    /// Every base tensor with its checkpoint name; linear weights have their adapter's `ΔW` merged in.
    pub fn named_weights(&self) -> Result<Vec<(String, Tensor)>> {
        let p = &self.prefix;
        let mut v = vec![
            (format!("{p}embeddings.word_embeddings.weight"), self.word.to_f32(self.device())?),
            (format!("{p}embeddings.position_embeddings.weight"), self.pos.clone()),
            (format!("{p}embeddings.token_type_embeddings.weight"), self.token_type.clone()),
            (format!("{p}embeddings.LayerNorm.weight"), self.emb_norm.w.clone()),
            (format!("{p}embeddings.LayerNorm.bias"), self.emb_norm.b.clone()),
        ];
        for (i, l) in self.layers.iter().enumerate() {
            for (n, ln) in [("attention.output.LayerNorm", &l.attn_norm), ("output.LayerNorm", &l.out_norm)] {
                v.push((format!("{p}encoder.layer.{i}.{n}.weight"), ln.w.clone()));
                v.push((format!("{p}encoder.layer.{i}.{n}.bias"), ln.b.clone()));
            }
        }
        for l in self.linears() {
            v.push((format!("{}.weight", l.name()), l.merged_weight()?));
            if let Some(b) = l.bias() {
                v.push((format!("{}.bias", l.name()), b.clone()));
            }
        }
        Ok(v)
    }

    /// Last hidden states `[b, t, hidden]`. `ids`, `type_ids` and `mask` (1 = token, 0 = padding) are
    /// `[b, t]` u32.
    pub fn forward(&self, ids: &Tensor, type_ids: Option<&Tensor>, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if t > self.cfg.max_position_embeddings {
            return Err(Error::Data(format!(
                "sequence of {t} tokens is longer than the model's {} positions",
                self.cfg.max_position_embeddings
            )));
        }
        let d = self.cfg.hidden_size;
        let h = self.cfg.num_attention_heads;
        let hd = d / h;
        let words = self.word.embedding(&ids.flatten_all()?)?.to_device(self.device())?.reshape((b, t, d))?;
        let pos = self.pos.narrow(0, 0, t)?.unsqueeze(0)?;
        let types = match type_ids {
            Some(tt) => self.token_type.embedding(&tt.flatten_all()?)?.reshape((b, t, d))?,
            None => self.token_type.narrow(0, 0, 1)?.unsqueeze(0)?.broadcast_as((b, t, d))?.contiguous()?,
        };
        let x = words.broadcast_add(&pos)?.add(&types)?;
        let mut x = ops::layer_norm(&x, &self.emb_norm.w, &self.emb_norm.b, self.cfg.layer_norm_eps)?;
        let amask = ops::attention_mask(mask, b, t, t, false, 0, self.device())?;
        let scale = 1.0 / (hd as f64).sqrt();
        for l in &self.layers {
            // Heads stay in the projections' layout [b, t, h, hd]: no split/merge copies on the CPU.
            let split = |y: Tensor| -> Result<Tensor> { Ok(y.reshape((b, t, h, hd))?) };
            let q = split(l.query.forward(&x)?)?;
            let k = split(l.key.forward(&x)?)?;
            let v = split(l.value.forward(&x)?)?;
            let a = ops::attention_seq_major(&q, &k, &v, amask.as_ref(), scale)?;
            let a = a.reshape((b, t, d))?;
            let a = l.attn_out.forward(&a)?;
            x = ops::layer_norm(&(a + &x)?, &l.attn_norm.w, &l.attn_norm.b, self.cfg.layer_norm_eps)?;
            let f = ops::gelu_erf(&l.inter.forward(&x)?)?;
            let f = l.out.forward(&f)?;
            x = ops::layer_norm(&(f + &x)?, &l.out_norm.w, &l.out_norm.b, self.cfg.layer_norm_eps)?;
        }
        Ok(x)
    }
}

/// Mean of `hidden` `[b, t, d]` over the positions where `mask` `[b, t]` is 1.
pub fn mean_pool(hidden: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    match mask {
        None => Ok(hidden.mean(1)?),
        Some(m) => {
            let m = m.to_dtype(DType::F32)?.unsqueeze(2)?; // [b, t, 1]
            let sum = hidden.broadcast_mul(&m)?.sum(1)?; // [b, d]
            let count = m.sum(1)?.clamp(1.0, f64::INFINITY)?; // [b, 1]
            Ok(sum.broadcast_div(&count)?)
        }
    }
}

/// A sequence classifier: a BERT encoder, mean pooling over real tokens, and a trainable linear head
/// (`classifier.weight` `[labels, hidden]`, `classifier.bias`).
#[derive(Clone, Debug)]
pub struct BertClassifier {
    /// The encoder.
    pub encoder: BertModel,
    head_w: Var,
    head_b: Var,
}

/// Names of the classifier head's tensors.
pub const HEAD_WEIGHT: &str = "classifier.weight";
/// Name of the classifier head's bias.
pub const HEAD_BIAS: &str = "classifier.bias";

impl BertClassifier {
    /// Wraps `encoder` with a fresh head for `num_labels` classes (weights N(0, 0.02²) from `seed`, bias 0,
    /// as Hugging Face initializes it).
    pub fn new(encoder: BertModel, num_labels: usize, seed: u64) -> Result<Self> {
        use rand::SeedableRng;
        use rand_distr::{Distribution, Normal};
        if num_labels < 2 {
            return Err(Error::Config(format!("a classifier needs at least 2 labels, got {num_labels}")));
        }
        let d = encoder.config().hidden_size;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let normal = Normal::new(0f32, 0.02).map_err(|e| Error::Config(e.to_string()))?;
        let w: Vec<f32> = (0..num_labels * d).map(|_| normal.sample(&mut rng)).collect();
        let dev = encoder.device().clone();
        let head_w = Var::from_tensor(&Tensor::from_vec(w, (num_labels, d), &dev)?)?;
        let head_b = Var::from_tensor(&Tensor::zeros(num_labels, DType::F32, &dev)?)?;
        Ok(Self { encoder, head_w, head_b })
    }

    /// Replaces the head's values (shapes must match).
    pub fn set_head(&self, w: &Tensor, b: &Tensor) -> Result<()> {
        if w.dims() != self.head_w.dims() || b.dims() != self.head_b.dims() {
            return Err(Error::tensor(
                HEAD_WEIGHT,
                format!(
                    "head shapes {:?}/{:?} do not match {:?}/{:?}",
                    w.dims(),
                    b.dims(),
                    self.head_w.dims(),
                    self.head_b.dims()
                ),
            ));
        }
        self.head_w.set(w)?;
        self.head_b.set(b)?;
        Ok(())
    }

    /// Number of classes.
    pub fn num_labels(&self) -> usize {
        self.head_w.dims()[0]
    }

    /// The head's variables by name.
    pub fn head(&self) -> Vec<(String, Var)> {
        vec![(HEAD_WEIGHT.to_string(), self.head_w.clone()), (HEAD_BIAS.to_string(), self.head_b.clone())]
    }

    /// Logits `[b, labels]`.
    pub fn forward(&self, ids: &Tensor, type_ids: Option<&Tensor>, mask: Option<&Tensor>) -> Result<Tensor> {
        let h = self.encoder.forward(ids, type_ids, mask)?;
        self.head_logits(&mean_pool(&h, mask)?)
    }

    /// Logits of pooled features `[b, hidden]`.
    pub fn head_logits(&self, pooled: &Tensor) -> Result<Tensor> {
        use crate::dp::per_sample::per_sample;
        if let (Some(w), Some(b)) = (per_sample(&self.head_w), per_sample(&self.head_b)) {
            // DP-SGD: sample i uses its own copy of the head (see `crate::dp::per_sample`).
            let logits = pooled.unsqueeze(1)?.matmul(&w.transpose(1, 2)?)?.squeeze(1)?;
            return Ok((logits + b)?);
        }
        let (w, b) = if crate::kernels::in_inference() {
            (self.head_w.as_tensor().detach(), self.head_b.as_tensor().detach())
        } else {
            (self.head_w.as_tensor().clone(), self.head_b.as_tensor().clone())
        };
        Ok(pooled.matmul(&w.t()?)?.broadcast_add(&b)?)
    }
}

/// Random weights with checkpoint names for `cfg` (unit tests).
pub fn random_bert_weights(
    cfg: &BertConfig,
    seed: u64,
    device: &Device,
) -> Result<std::collections::HashMap<String, Tensor>> {
    use rand::SeedableRng;
    use rand_distr::{Distribution, Normal};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let normal = Normal::new(0f32, 0.05).map_err(|e| Error::Config(e.to_string()))?;
    let mut randn = |shape: &[usize]| -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| normal.sample(&mut rng)).collect();
        Ok(Tensor::from_vec(v, shape, device)?)
    };
    let (d, ff) = (cfg.hidden_size, cfg.intermediate_size);
    let mut m = std::collections::HashMap::new();
    m.insert("embeddings.word_embeddings.weight".into(), randn(&[cfg.vocab_size, d])?);
    m.insert("embeddings.position_embeddings.weight".into(), randn(&[cfg.max_position_embeddings, d])?);
    m.insert("embeddings.token_type_embeddings.weight".into(), randn(&[cfg.type_vocab_size, d])?);
    let ones = Tensor::ones(d, DType::F32, device)?;
    let zeros = Tensor::zeros(d, DType::F32, device)?;
    m.insert("embeddings.LayerNorm.weight".into(), ones.clone());
    m.insert("embeddings.LayerNorm.bias".into(), zeros.clone());
    for i in 0..cfg.num_hidden_layers {
        let p = format!("encoder.layer.{i}");
        for (n, o, inp) in [
            ("attention.self.query", d, d),
            ("attention.self.key", d, d),
            ("attention.self.value", d, d),
            ("attention.output.dense", d, d),
            ("intermediate.dense", ff, d),
            ("output.dense", d, ff),
        ] {
            m.insert(format!("{p}.{n}.weight"), randn(&[o, inp])?);
            m.insert(format!("{p}.{n}.bias"), randn(&[o])?);
        }
        for n in ["attention.output.LayerNorm", "output.LayerNorm"] {
            m.insert(format!("{p}.{n}.weight"), ones.clone());
            m.insert(format!("{p}.{n}.bias"), zeros.clone());
        }
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::IndexOp;

    fn maxdiff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn padding_does_not_change_pooled_output() {
        let dev = Device::Cpu;
        let m = BertModel::random(&BertConfig::tiny(), 1, &dev).unwrap();
        let c = BertClassifier::new(m, 3, 0).unwrap();
        let short = Tensor::new(&[[1u32, 5, 9, 2]], &dev).unwrap();
        let padded = Tensor::new(&[[1u32, 5, 9, 2, 0, 0]], &dev).unwrap();
        let mask = Tensor::new(&[[1u32, 1, 1, 1, 0, 0]], &dev).unwrap();
        let a = c.forward(&short, None, None).unwrap();
        let b = c.forward(&padded, None, Some(&mask)).unwrap();
        assert!(maxdiff(&a, &b) < 1e-5);
        assert_eq!(b.dims(), &[1, 3]);
        assert_eq!(c.encoder.linears().len(), 12);
        let _ = b.i(0).unwrap();
    }

    #[test]
    fn bert_prefix_is_detected_and_kept_in_module_names() {
        let dev = Device::Cpu;
        let raw = random_bert_weights(&BertConfig::tiny(), 1, &dev).unwrap();
        let prefixed = raw.into_iter().map(|(k, v)| (format!("bert.{k}"), v)).collect();
        let mut w = WeightMap::new(prefixed).unwrap();
        let m = BertModel::load(&BertConfig::tiny(), &mut w).unwrap();
        assert_eq!(m.prefix(), "bert.");
        assert_eq!(m.linears()[0].name(), "bert.encoder.layer.0.attention.self.query");
        assert!(w.remaining().is_empty(), "{:?}", w.remaining());
    }

    #[test]
    fn too_long_input_is_an_error() {
        let dev = Device::Cpu;
        let m = BertModel::random(&BertConfig::tiny(), 1, &dev).unwrap();
        let ids = Tensor::zeros((1, 65), DType::U32, &dev).unwrap();
        assert!(m.forward(&ids, None, None).is_err());
    }
}
