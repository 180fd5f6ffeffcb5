//! Greedy decoding with a KV cache.
use candle_core::{D, Tensor};

use crate::Result;
use crate::model::{KvCache, LlamaModel};

/// Greedily extends `prompt` by at most `max_new` tokens, stopping after any token of `stop` (which is
/// included in the output). Returns the new tokens only.
pub fn generate_greedy(model: &LlamaModel, prompt: &[u32], max_new: usize, stop: &[u32]) -> Result<Vec<u32>> {
    crate::kernels::inference(|| greedy(model, prompt, max_new, stop))
}

fn greedy(model: &LlamaModel, prompt: &[u32], max_new: usize, stop: &[u32]) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        return Err(crate::Error::Data("empty prompt".into()));
    }
    let dev = model.device();
    let mut cache = KvCache::new();
    let mut out = Vec::new();
    let mut input = Tensor::new(prompt, dev)?.unsqueeze(0)?;
    for _ in 0..max_new {
        let logits = model.forward_step(&input, None, &mut cache)?.detach();
        let next = logits.argmax(D::Minus1)?.to_vec1::<u32>()?[0];
        out.push(next);
        if stop.contains(&next) {
            break;
        }
        input = Tensor::new(&[next], dev)?.unsqueeze(0)?;
    }
    Ok(out)
}
