//! Models of a published `config.json` with seeded random weights in a chosen format: the real shapes of a
//! billion-parameter model without its checkpoint, for measuring the training step's speed and memory (which do
//! not depend on the weights' values).
//!
//! Every matrix is drawn N(0, 0.02²) (Hugging Face's `initializer_range`) in parallel chunks with their own
//! seeded streams (deterministic for a seed, whatever the thread count), converted to the format one tensor at
//! a time, so the f32 copy of one tensor at most exists at once. Norm weights are 1, biases 0.
use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;

use super::bert::BertClassifier;
use super::config::{ArchConfig, BertConfig, LlamaConfig};
use super::weights::{StoredTensor, WeightMap};
use super::{BertModel, LlamaModel, Model};
use crate::frozen::{FrozenWeight, WeightDtype};
use crate::{Error, Result};

/// Values per independently seeded chunk.
const CHUNK: usize = 1 << 20;

/// `n` values of N(0, std²): chunk `i` from the stream seeded by `(seed, i)`.
fn normal_values(n: usize, std: f32, seed: u64) -> Result<Vec<f32>> {
    let normal = Normal::new(0f32, std).map_err(|e| Error::Config(e.to_string()))?;
    let mut v = vec![0f32; n];
    v.par_chunks_mut(CHUNK).enumerate().for_each(|(i, c)| {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        c.iter_mut().for_each(|x| *x = normal.sample(&mut rng));
    });
    Ok(v)
}

/// One tensor of a synthetic checkpoint: its name, shape and kind.
enum Kind {
    /// A frozen matrix (linear weight, embedding, LM head): random, in the target format.
    Matrix,
    /// A norm weight: ones (f32).
    Ones,
    /// A bias or norm bias: zeros (f32).
    Zeros,
    /// A small table kept f32 (position and token-type embeddings): random.
    Table,
}

fn llama_tensors(cfg: &LlamaConfig) -> Vec<(String, Vec<usize>, Kind)> {
    let (d, v, ff) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
    let (q, kv) = (cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim);
    let mut t = vec![("model.embed_tokens.weight".to_string(), vec![v, d], Kind::Matrix)];
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        for (n, s) in [
            ("self_attn.q_proj", [q, d]),
            ("self_attn.k_proj", [kv, d]),
            ("self_attn.v_proj", [kv, d]),
            ("self_attn.o_proj", [d, q]),
            ("mlp.gate_proj", [ff, d]),
            ("mlp.up_proj", [ff, d]),
            ("mlp.down_proj", [d, ff]),
        ] {
            t.push((format!("{p}.{n}.weight"), s.to_vec(), Kind::Matrix));
        }
        if cfg.attention_bias {
            for (n, o) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
                t.push((format!("{p}.self_attn.{n}.bias"), vec![o], Kind::Zeros));
            }
        }
        t.push((format!("{p}.input_layernorm.weight"), vec![d], Kind::Ones));
        t.push((format!("{p}.post_attention_layernorm.weight"), vec![d], Kind::Ones));
    }
    t.push(("model.norm.weight".to_string(), vec![d], Kind::Ones));
    if !cfg.tie_word_embeddings {
        t.push(("lm_head.weight".to_string(), vec![v, d], Kind::Matrix));
    }
    t
}

fn bert_tensors(cfg: &BertConfig) -> Vec<(String, Vec<usize>, Kind)> {
    let (d, ff) = (cfg.hidden_size, cfg.intermediate_size);
    let mut t = vec![
        ("embeddings.word_embeddings.weight".to_string(), vec![cfg.vocab_size, d], Kind::Matrix),
        ("embeddings.position_embeddings.weight".into(), vec![cfg.max_position_embeddings, d], Kind::Table),
        ("embeddings.token_type_embeddings.weight".into(), vec![cfg.type_vocab_size, d], Kind::Table),
        ("embeddings.LayerNorm.weight".into(), vec![d], Kind::Ones),
        ("embeddings.LayerNorm.bias".into(), vec![d], Kind::Zeros),
    ];
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
            t.push((format!("{p}.{n}.weight"), vec![o, inp], Kind::Matrix));
            t.push((format!("{p}.{n}.bias"), vec![o], Kind::Zeros));
        }
        for n in ["attention.output.LayerNorm", "output.LayerNorm"] {
            t.push((format!("{p}.{n}.weight"), vec![d], Kind::Ones));
            t.push((format!("{p}.{n}.bias"), vec![d], Kind::Zeros));
        }
    }
    t
}

/// The checkpoint of `arch` with seeded random values, its matrices in `dtype` (`auto`: f32). A format the
/// shapes cannot take (rows that do not split into whole blocks) is an error naming the tensor.
pub fn synthetic_weights(arch: &ArchConfig, dtype: WeightDtype, seed: u64) -> Result<WeightMap> {
    let list = match arch {
        ArchConfig::Llama(c) => llama_tensors(c),
        ArchConfig::Bert(c) => bert_tensors(c),
    };
    let mut out = HashMap::with_capacity(list.len());
    for (i, (name, shape, kind)) in list.into_iter().enumerate() {
        let n: usize = shape.iter().product();
        let t = match kind {
            Kind::Ones => StoredTensor::Dense(Tensor::ones(shape, DType::F32, &Device::Cpu)?),
            Kind::Zeros => StoredTensor::Dense(Tensor::zeros(shape, DType::F32, &Device::Cpu)?),
            Kind::Table => StoredTensor::Dense(Tensor::from_vec(
                normal_values(n, 0.02, seed.wrapping_add(i as u64) << 20)?,
                shape,
                &Device::Cpu,
            )?),
            Kind::Matrix => {
                let v = normal_values(n, 0.02, seed.wrapping_add(i as u64) << 20)?;
                let w = FrozenWeight::dense(&name, Tensor::from_vec(v, shape, &Device::Cpu)?)?;
                let w = match dtype {
                    WeightDtype::Auto => w,
                    WeightDtype::To(f) => w.convert(&name, f)?,
                };
                match w {
                    FrozenWeight::Dense(t) => StoredTensor::Dense(t),
                    FrozenWeight::Quant(q) => {
                        StoredTensor::Quant(std::sync::Arc::try_unwrap(q).unwrap_or_else(|q| (*q).clone()))
                    }
                }
            }
        };
        out.insert(name, t);
    }
    Ok(WeightMap::from_stored(out))
}

/// A model of `arch` with [`synthetic_weights`] on `device` (encoders get a classification head of
/// `num_labels` classes).
pub fn synthetic_model(
    arch: &ArchConfig,
    dtype: WeightDtype,
    seed: u64,
    num_labels: usize,
    device: &Device,
) -> Result<Model> {
    let mut w = synthetic_weights(arch, dtype, seed)?.on_device(device);
    let m = match arch {
        ArchConfig::Llama(c) => Model::CausalLm(LlamaModel::load(c, &mut w)?),
        ArchConfig::Bert(c) => Model::Classifier(BertClassifier::new(BertModel::load(c, &mut w)?, num_labels, seed)?),
    };
    drop(w);
    crate::benchstats::release_free_memory();
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frozen::WeightFormat;

    #[test]
    fn synthetic_models_have_the_configs_shapes_in_the_asked_format_and_are_deterministic() {
        let mut cfg = LlamaConfig::tiny();
        cfg.hidden_size = 64;
        cfg.intermediate_size = 128;
        cfg.num_attention_heads = 4;
        cfg.num_key_value_heads = 2;
        cfg.head_dim = 16;
        let arch = ArchConfig::Llama(cfg.clone());
        let dev = Device::Cpu;
        let q = synthetic_model(&arch, "q8_0".parse().unwrap(), 1, 2, &dev).unwrap();
        let b = q.weight_bytes();
        assert_eq!(b.by_format.keys().collect::<Vec<_>>(), vec!["q8_0"]);
        let params = cfg.vocab_size * 64 + 2 * (64 * 64 * 2 + 32 * 64 * 2 + 3 * 128 * 64);
        assert_eq!(b.total, params / 32 * 34);
        let f = synthetic_model(&arch, WeightDtype::To(WeightFormat::Bf16), 1, 2, &dev).unwrap();
        assert_eq!(f.weight_bytes().total, params * 2);
        let again = synthetic_model(&arch, WeightDtype::To(WeightFormat::Bf16), 1, 2, &dev).unwrap();
        let (Model::CausalLm(a), Model::CausalLm(c)) = (&f, &again) else { panic!() };
        let ids = Tensor::new(&[[1u32, 5, 7]], &dev).unwrap();
        let (ya, yc) = (a.forward(&ids, None).unwrap(), c.forward(&ids, None).unwrap());
        assert_eq!(
            ya.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            yc.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        // A format the rows cannot take is an error by name (64-wide rows are not whole Q4_K blocks).
        let e = synthetic_model(&arch, "q4_k".parse().unwrap(), 1, 2, &dev).unwrap_err().to_string();
        assert!(e.contains("embed_tokens") && e.contains("q4_k"), "{e}");
    }
}
