//! A Llama-architecture causal LM (Llama 2/3, Mistral, Qwen2, SmolLM2; Gemma-2 with the extras of
//! [`super::gemma`]) whose linear layers take adapters.
//!
//! Ported from Hugging Face `modeling_llama.py` (and candle-transformers' `llama.rs`), with the
//! differentiable ops of [`crate::ops`] so gradients reach every adapter. Module paths follow the
//! Hugging Face checkpoint (`model.layers.N.self_attn.q_proj`), so adapters export to PEFT unchanged.
use candle_core::{D, DType, Device, IndexOp, Tensor};

use super::config::LlamaConfig;
use super::gemma::{self, GemmaNorms};
use super::weights::WeightMap;
use crate::adapter::AdaptedLinear;
use crate::frozen::{FrozenWeight, WeightBytes};
use crate::{Result, ops};

/// The target kinds of a Llama model, in layer order.
pub const LLAMA_TARGETS: &[&str] = &["q", "k", "v", "o", "gate", "up", "down"];

#[derive(Clone, Debug)]
struct Block {
    input_norm: Tensor,
    q: AdaptedLinear,
    k: AdaptedLinear,
    v: AdaptedLinear,
    o: AdaptedLinear,
    post_norm: Tensor,
    gate: AdaptedLinear,
    up: AdaptedLinear,
    down: AdaptedLinear,
    /// Gemma-2 only: the feed-forward norms (`post_norm` is then its post-attention norm).
    gemma: Option<GemmaNorms>,
}

/// Keys and values of past positions, for incremental decoding.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A Llama-architecture decoder with a language-model head.
#[derive(Clone, Debug)]
pub struct LlamaModel {
    cfg: LlamaConfig,
    embed: FrozenWeight,
    blocks: Vec<Block>,
    norm: Tensor,
    lm_head: Option<FrozenWeight>,
    inv_freq: Tensor,
    /// Whether training forwards recompute each block in the backward (see [`crate::recompute`]).
    recompute: bool,
}

/// What every block of one forward pass shares: sizes, RoPE tables, masks, attention settings.
struct BlockCtx {
    b: usize,
    t: usize,
    cos: Tensor,
    sin: Tensor,
    mask: Option<Tensor>,
    /// Gemma-2's sliding-window mask for its local layers (when the sequence is longer than the window).
    window_mask: Option<Tensor>,
    softcap: Option<f64>,
    scale: f64,
}

/// One block under [`crate::recompute::checkpoint`].
struct BlockSegment {
    cfg: std::sync::Arc<LlamaConfig>,
    blk: Block,
    index: usize,
    ctx: std::sync::Arc<BlockCtx>,
}

impl crate::recompute::Segment for BlockSegment {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        block_forward(&self.cfg, &self.blk, self.index, x, &self.ctx, None)
    }

    fn grad_targets(&self) -> Vec<Tensor> {
        let b = &self.blk;
        let mut v = Vec::new();
        for l in [&b.q, &b.k, &b.v, &b.o, &b.gate, &b.up, &b.down] {
            for (_, var) in l.trainable() {
                if let Some(copy) = crate::dp::per_sample::per_sample(&var) {
                    v.push(copy);
                }
                v.push(var.as_tensor().clone());
            }
        }
        v
    }
}

/// Block `i` of a decoder on `x` `[b, t, hidden]`, extending `cache` when given.
fn block_forward(
    cfg: &LlamaConfig,
    blk: &Block,
    i: usize,
    x: &Tensor,
    ctx: &BlockCtx,
    cache: Option<&mut KvCache>,
) -> Result<Tensor> {
    let (b, t) = (ctx.b, ctx.t);
    let (hq, hkv, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
    let h = ops::rms_norm(x, &blk.input_norm, cfg.rms_norm_eps)?;
    let q = blk.q.forward(&h)?.reshape((b, t, hq, hd))?.transpose(1, 2)?;
    let k = blk.k.forward(&h)?.reshape((b, t, hkv, hd))?.transpose(1, 2)?;
    let v = blk.v.forward(&h)?.reshape((b, t, hkv, hd))?.transpose(1, 2)?;
    let q = ops::rope(&q, &ctx.cos, &ctx.sin)?;
    let k = ops::rope(&k, &ctx.cos, &ctx.sin)?;
    let (k, v) = match cache {
        Some(c) => {
            let (k, v) = match &c.layers[i] {
                Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v.contiguous()?], 2)?),
                None => (k, v.contiguous()?),
            };
            // Detached: decoding needs no gradient, and the graph would keep every step alive.
            c.layers[i] = Some((k.detach(), v.detach()));
            (k, v)
        }
        None => (k, v),
    };
    let gemma = cfg.gemma2.as_ref();
    let sliding = gemma.is_some_and(|g| g.sliding_layers.get(i).copied().unwrap_or(false));
    let m = if sliding && ctx.window_mask.is_some() { ctx.window_mask.as_ref() } else { ctx.mask.as_ref() };
    let a = match ctx.softcap {
        Some(cap) => ops::attention_softcapped(&q, &k, &v, m, ctx.scale, cap)?,
        None => ops::attention(&q, &k, &v, m, ctx.scale)?,
    };
    let a = a.transpose(1, 2)?.reshape((b, t, hq * hd))?;
    let eps = cfg.rms_norm_eps;
    if let Some(g) = &blk.gemma {
        // Gemma-2: norms on the attention and MLP outputs before the residual adds; GeGLU.
        let x = (x + ops::rms_norm(&blk.o.forward(&a)?, &blk.post_norm, eps)?)?;
        let h = ops::rms_norm(&x, &g.pre_ff, eps)?;
        let ff = ops::gelu_tanh_mul(&blk.gate.forward(&h)?, &blk.up.forward(&h)?)?;
        return Ok((&x + ops::rms_norm(&blk.down.forward(&ff)?, &g.post_ff, eps)?)?);
    }
    let x = (x + blk.o.forward(&a)?)?;
    let h = ops::rms_norm(&x, &blk.post_norm, eps)?;
    let ff = ops::silu_mul(&blk.gate.forward(&h)?, &blk.up.forward(&h)?)?;
    Ok((&x + blk.down.forward(&ff)?)?)
}

impl LlamaModel {
    /// Builds the model from Hugging Face-named weights (`model.embed_tokens.weight`, ...).
    pub fn load(cfg: &LlamaConfig, w: &mut WeightMap) -> Result<Self> {
        cfg.validate()?;
        let (d, v) = (cfg.hidden_size, cfg.vocab_size);
        let (hq, hkv, hd, ff) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size);
        let embed = w.take_frozen("model.embed_tokens.weight", &[v, d])?;
        let is_gemma = cfg.gemma2.is_some();
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let mut lin =
                |sub: &str, kind: &'static str, out: usize, inp: usize, bias: bool| -> Result<AdaptedLinear> {
                    let name = format!("{p}.{sub}");
                    let weight = w.take_frozen(&format!("{name}.weight"), &[out, inp])?;
                    let b = if bias {
                        Some(w.take(&format!("{name}.bias"), &[out])?)
                    } else {
                        w.take_opt(&format!("{name}.bias"), &[out])?
                    };
                    AdaptedLinear::new(name, kind, weight, b)
                };
            let ab = cfg.attention_bias;
            let q = lin("self_attn.q_proj", "q", hq * hd, d, ab)?;
            let k = lin("self_attn.k_proj", "k", hkv * hd, d, ab)?;
            let vv = lin("self_attn.v_proj", "v", hkv * hd, d, ab)?;
            let o = lin("self_attn.o_proj", "o", d, hq * hd, false)?;
            let gate = lin("mlp.gate_proj", "gate", ff, d, false)?;
            let up = lin("mlp.up_proj", "up", ff, d, false)?;
            let down = lin("mlp.down_proj", "down", d, ff, false)?;
            blocks.push(Block {
                input_norm: gemma::take_norm(w, &format!("{p}.input_layernorm.weight"), d, is_gemma)?,
                post_norm: gemma::take_norm(w, &format!("{p}.post_attention_layernorm.weight"), d, is_gemma)?,
                gemma: if is_gemma { Some(gemma::take_block_norms(w, &p, d)?) } else { None },
                q,
                k,
                v: vv,
                o,
                gate,
                up,
                down,
            });
        }
        let norm = gemma::take_norm(w, "model.norm.weight", d, is_gemma)?;
        let lm_head = if w.contains("lm_head.weight") {
            Some(w.take_frozen("lm_head.weight", &[v, d])?)
        } else if cfg.tie_word_embeddings {
            None
        } else {
            return Err(crate::Error::tensor("lm_head.weight", "missing and tie_word_embeddings is false"));
        };
        let inv_freq = Tensor::new(cfg.rope_inv_freq(), norm.device())?;
        Ok(Self { cfg: cfg.clone(), embed, blocks, norm, lm_head, inv_freq, recompute: false })
    }

    /// A model with random weights of the given config (unit tests).
    pub fn random(cfg: &LlamaConfig, seed: u64, device: &Device) -> Result<Self> {
        let mut w = WeightMap::new(random_llama_weights(cfg, seed, device)?)?;
        Self::load(cfg, &mut w)
    }

    /// The configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.norm.device()
    }

    /// Bytes of the frozen matrices (linear weights, embeddings, LM head) by format.
    pub fn weight_bytes(&self) -> WeightBytes {
        let mut b = WeightBytes::default();
        b.add(&self.embed);
        if let Some(h) = &self.lm_head {
            b.add(h);
        }
        for l in self.linears() {
            b.add(l.weight());
        }
        b
    }

    /// Whether training forwards recompute each block in the backward instead of keeping its activations
    /// (see [`crate::recompute`]: about a third more work, one block's activations in memory). Such a model must be
    /// trained through [`crate::recompute::backward`].
    pub fn set_recompute(&mut self, on: bool) {
        self.recompute = on;
    }

    /// Whether blocks are recomputed (see [`Self::set_recompute`]).
    pub fn recomputes(&self) -> bool {
        self.recompute
    }

    /// Every linear layer, in layer order.
    pub fn linears(&self) -> Vec<&AdaptedLinear> {
        self.blocks.iter().flat_map(|b| [&b.q, &b.k, &b.v, &b.o, &b.gate, &b.up, &b.down]).collect()
    }

    /// Every linear layer, mutably.
    pub fn linears_mut(&mut self) -> Vec<&mut AdaptedLinear> {
        self.blocks
            .iter_mut()
            .flat_map(|b| [&mut b.q, &mut b.k, &mut b.v, &mut b.o, &mut b.gate, &mut b.up, &mut b.down])
            .collect()
    }

    /// Every base tensor with its Hugging Face name; linear weights have their adapter's `ΔW` merged in.
    pub fn named_weights(&self) -> Result<Vec<(String, Tensor)>> {
        let mut v = vec![("model.embed_tokens.weight".to_string(), self.embed.to_f32(self.device())?)];
        // Gemma-2 norms are kept as the multiplier `1 + w`; Hugging Face stores `w`.
        let is_gemma = self.cfg.gemma2.is_some();
        let norm = |t: &Tensor| if is_gemma { gemma::norm_to_hf(t) } else { Ok(t.clone()) };
        for (i, b) in self.blocks.iter().enumerate() {
            let p = format!("model.layers.{i}");
            v.push((format!("{p}.input_layernorm.weight"), norm(&b.input_norm)?));
            v.push((format!("{p}.post_attention_layernorm.weight"), norm(&b.post_norm)?));
            if let Some(g) = &b.gemma {
                v.push((format!("{p}.pre_feedforward_layernorm.weight"), norm(&g.pre_ff)?));
                v.push((format!("{p}.post_feedforward_layernorm.weight"), norm(&g.post_ff)?));
            }
        }
        for l in self.linears() {
            v.push((format!("{}.weight", l.name()), l.merged_weight()?));
            if let Some(b) = l.bias() {
                v.push((format!("{}.bias", l.name()), b.clone()));
            }
        }
        v.push(("model.norm.weight".to_string(), norm(&self.norm)?));
        if let Some(h) = &self.lm_head {
            v.push(("lm_head.weight".to_string(), h.to_f32(self.device())?));
        }
        Ok(v)
    }

    fn rope_tables(&self, offset: usize, t: usize) -> Result<(Tensor, Tensor)> {
        let pos = Tensor::arange(offset as u32, (offset + t) as u32, self.device())?.to_dtype(DType::F32)?;
        let freqs = pos.unsqueeze(1)?.broadcast_mul(&self.inv_freq.unsqueeze(0)?)?; // [t, hd/2]
        Ok((freqs.cos()?, freqs.sin()?))
    }

    /// Final hidden states `[b, t, hidden]` for `ids` `[b, t]` (u32). `key_mask` `[b, s]` marks real tokens
    /// (1) and padding (0) over all `s = cached + t` key positions. With a `cache`, the new keys and values
    /// are appended to it and positions continue after the cached ones.
    pub fn forward_hidden(
        &self,
        ids: &Tensor,
        key_mask: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let offset = cache.as_ref().map_or(0, |c| c.len);
        if offset + t > self.cfg.max_position_embeddings.max(1) {
            tracing::warn!(
                "sequence of {} positions exceeds the model's max_position_embeddings {}",
                offset + t,
                self.cfg.max_position_embeddings
            );
        }
        let mut x = self.embed.embedding(&ids.flatten_all()?)?.to_device(self.device())?.reshape((
            b,
            t,
            self.cfg.hidden_size,
        ))?;
        let (cos, sin) = self.rope_tables(offset, t)?;
        let mask = ops::attention_mask(key_mask, b, t, offset + t, true, offset, self.device())?;
        // Gemma-2: scaled embeddings, a sliding-window mask for its local layers, soft-capped attention logits.
        let gemma = self.cfg.gemma2.as_ref();
        if gemma.is_some() {
            x = (x * (self.cfg.hidden_size as f64).sqrt())?;
        }
        let window_mask = match gemma.and_then(|g| g.sliding_window) {
            Some(w) if offset + t > w => {
                Some(ops::sliding_window_mask(key_mask, b, t, offset + t, offset, w, self.device())?)
            }
            _ => None,
        };
        let softcap = gemma.and_then(|g| g.attn_logit_softcapping);
        if let Some(c) = cache.as_deref_mut()
            && c.layers.len() != self.blocks.len()
        {
            c.layers = vec![None; self.blocks.len()];
        }
        let ctx = BlockCtx { b, t, cos, sin, mask, window_mask, softcap, scale: self.cfg.attention_scale() };
        // Recompute blocks in the backward when asked, for training forwards on the CPU kernels.
        let recompute = self.recompute && cache.is_none() && crate::kernels::applies(&x);
        if recompute {
            let (cfg, ctx) = (std::sync::Arc::new(self.cfg.clone()), std::sync::Arc::new(ctx));
            for (i, blk) in self.blocks.iter().enumerate() {
                let seg = BlockSegment { cfg: cfg.clone(), blk: blk.clone(), index: i, ctx: ctx.clone() };
                x = crate::recompute::checkpoint(std::sync::Arc::new(seg), &x)?;
            }
        } else {
            for (i, blk) in self.blocks.iter().enumerate() {
                x = block_forward(&self.cfg, blk, i, &x, &ctx, cache.as_deref_mut())?;
            }
        }
        if let Some(c) = cache {
            c.len += t;
        }
        ops::rms_norm(&x, &self.norm, self.cfg.rms_norm_eps)
    }

    /// Logits `[..., vocab]` of hidden states `[..., hidden]` (the LM head is frozen); Gemma-2's are
    /// soft-capped here, so generation and the loss ([`Self::lm_token_nll`]) both see the capped logits.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let logits = ops::linear(hidden, self.lm_head.as_ref().unwrap_or(&self.embed), None)?;
        match self.cfg.gemma2.as_ref().and_then(|g| g.final_logit_softcapping) {
            Some(cap) => ops::softcap(&logits, cap),
            None => Ok(logits),
        }
    }

    /// Logits for every position: `[b, t, vocab]`.
    pub fn forward(&self, ids: &Tensor, key_mask: Option<&Tensor>) -> Result<Tensor> {
        self.logits(&self.forward_hidden(ids, key_mask, None)?)
    }

    /// Mean next-token cross-entropy over the positions whose label is not `ignore` (`labels[b, i]` is the
    /// target for position `i`, i.e. already shifted). Returns the mean loss and the number of positions.
    /// Only labelled positions go through the LM head.
    pub fn lm_loss(&self, ids: &Tensor, key_mask: Option<&Tensor>, labels: &[Vec<i64>]) -> Result<(Tensor, usize)> {
        let (nll, rows) = self.lm_token_nll(ids, key_mask, labels)?;
        Ok((nll.mean_all()?, rows.len()))
    }

    /// Negative log-likelihood of every labelled position `[m]`, and the batch row each belongs to.
    pub fn lm_token_nll(
        &self,
        ids: &Tensor,
        key_mask: Option<&Tensor>,
        labels: &[Vec<i64>],
    ) -> Result<(Tensor, Vec<usize>)> {
        let (b, t) = ids.dims2()?;
        let hidden = self.forward_hidden(ids, key_mask, None)?.reshape((b * t, self.cfg.hidden_size))?;
        let mut rows = Vec::new();
        let mut owners = Vec::new();
        let mut targets = Vec::new();
        for (bi, row) in labels.iter().enumerate() {
            for (i, &l) in row.iter().enumerate().take(t) {
                if l >= 0 {
                    if l as usize >= self.cfg.vocab_size {
                        return Err(crate::Error::Data(format!("label {l} is outside the vocabulary")));
                    }
                    rows.push((bi * t + i) as u32);
                    owners.push(bi);
                    targets.push(l as u32);
                }
            }
        }
        if rows.is_empty() {
            return Err(crate::Error::Data("batch has no labelled position".into()));
        }
        let sel = hidden.index_select(&Tensor::new(rows, self.device())?, 0)?;
        let cap = self.cfg.gemma2.as_ref().and_then(|g| g.final_logit_softcapping);
        if crate::kernels::applies(&sel) {
            // The head and the loss in one op: no [m, vocab] logits kept (see `kernels::lm_head_nll`).
            let head = self.lm_head.as_ref().unwrap_or(&self.embed);
            return Ok((crate::kernels::lm_head_nll(&sel, head, &targets, cap)?, owners));
        }
        let logits = self.logits(&sel)?;
        let targets = Tensor::new(targets, self.device())?;
        Ok((token_nll(&logits, &targets)?, owners))
    }

    /// Next-token logits `[b, vocab]` of the last position, using and extending `cache`.
    pub fn forward_step(&self, ids: &Tensor, key_mask: Option<&Tensor>, cache: &mut KvCache) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let h = self.forward_hidden(ids, key_mask, Some(cache))?;
        self.logits(&h.i((.., t - 1, ..))?)
    }
}

/// Mean cross-entropy of `logits` `[n, c]` against class ids `targets` `[n]` (u32).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    Ok(token_nll(logits, targets)?.mean_all()?)
}

/// Cross-entropy of each row of `logits` `[n, c]` against class ids `targets` `[n]` (u32): `[n]`.
pub fn token_nll(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if crate::kernels::applies(logits) && targets.dtype() == candle_core::DType::U32 && logits.rank() == 2 {
        return Ok(crate::kernels::token_nll(logits, targets)?);
    }
    let logp = ops::log_softmax_last_dim(logits)?;
    let picked = logp.gather(&targets.unsqueeze(1)?, D::Minus1)?;
    Ok(picked.squeeze(1)?.neg()?)
}

/// Random weights with Hugging Face names for `cfg` (unit tests; normal with std 0.05, norms 1).
pub fn random_llama_weights(
    cfg: &LlamaConfig,
    seed: u64,
    device: &Device,
) -> Result<std::collections::HashMap<String, Tensor>> {
    use rand::SeedableRng;
    use rand_distr::{Distribution, Normal};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let normal = Normal::new(0f32, 0.05).map_err(|e| crate::Error::Config(e.to_string()))?;
    let mut randn = |shape: &[usize]| -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| normal.sample(&mut rng)).collect();
        Ok(Tensor::from_vec(v, shape, device)?)
    };
    let (d, v, ff) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
    let (q, kv) = (cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim);
    let mut m = std::collections::HashMap::new();
    m.insert("model.embed_tokens.weight".to_string(), randn(&[v, d])?);
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
            m.insert(format!("{p}.{n}.weight"), randn(&s)?);
        }
        if cfg.attention_bias {
            m.insert(format!("{p}.self_attn.q_proj.bias"), randn(&[q])?);
            m.insert(format!("{p}.self_attn.k_proj.bias"), randn(&[kv])?);
            m.insert(format!("{p}.self_attn.v_proj.bias"), randn(&[kv])?);
        }
        m.insert(format!("{p}.input_layernorm.weight"), Tensor::ones(d, DType::F32, device)?);
        m.insert(format!("{p}.post_attention_layernorm.weight"), Tensor::ones(d, DType::F32, device)?);
    }
    m.insert("model.norm.weight".to_string(), Tensor::ones(d, DType::F32, device)?);
    if cfg.gemma2.is_some() {
        gemma::add_random_norms(cfg, &mut m, seed, device)?;
    }
    if !cfg.tie_word_embeddings {
        m.insert("lm_head.weight".to_string(), randn(&[v, d])?);
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn maxdiff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn kv_cache_decoding_matches_full_forward() {
        let dev = Device::Cpu;
        let mut cfg = LlamaConfig::tiny();
        cfg.attention_bias = true;
        let m = LlamaModel::random(&cfg, 1, &dev).unwrap();
        let ids = Tensor::new(&[[3u32, 7, 9, 11, 5, 8]], &dev).unwrap();
        let full = m.forward(&ids, None).unwrap();
        let mut cache = KvCache::new();
        let first = m.forward_step(&ids.narrow(1, 0, 4).unwrap(), None, &mut cache).unwrap();
        assert!(maxdiff(&first, &full.i((.., 3, ..)).unwrap()) < 1e-5);
        for p in 4..6 {
            let step = m.forward_step(&ids.narrow(1, p, 1).unwrap(), None, &mut cache).unwrap();
            assert!(maxdiff(&step, &full.i((.., p, ..)).unwrap()) < 1e-5, "position {p}");
        }
        assert_eq!(cache.len(), 6);
    }

    #[test]
    fn right_padding_does_not_change_real_positions() {
        let dev = Device::Cpu;
        let m = LlamaModel::random(&LlamaConfig::tiny(), 2, &dev).unwrap();
        let short = Tensor::new(&[[3u32, 7, 9]], &dev).unwrap();
        let padded = Tensor::new(&[[3u32, 7, 9, 2, 2], [4, 5, 6, 7, 8]], &dev).unwrap();
        let mask = Tensor::new(&[[1u32, 1, 1, 0, 0], [1, 1, 1, 1, 1]], &dev).unwrap();
        let a = m.forward(&short, None).unwrap();
        let b = m.forward(&padded, Some(&mask)).unwrap();
        assert!(maxdiff(&a.i(0).unwrap(), &b.i(0).unwrap().narrow(0, 0, 3).unwrap()) < 1e-5);
    }

    #[test]
    fn loss_is_finite_and_near_log_vocab_for_random_weights() {
        let dev = Device::Cpu;
        let m = LlamaModel::random(&LlamaConfig::tiny(), 3, &dev).unwrap();
        let ids = Tensor::new(&[[3u32, 7, 9, 11]], &dev).unwrap();
        let (loss, n) = m.lm_loss(&ids, None, &[vec![7, 9, 11, -100]]).unwrap();
        assert_eq!(n, 3);
        let l = loss.to_scalar::<f32>().unwrap();
        assert!((l - (61f32).ln()).abs() < 0.5, "{l}");
        assert!(m.lm_loss(&ids, None, &[vec![-100; 4]]).is_err());
        assert!(m.lm_loss(&ids, None, &[vec![999, -100, -100, -100]]).is_err());
    }
}
