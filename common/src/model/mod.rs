//! Pretrained transformers with adapter slots: a Llama-architecture causal LM (Gemma-2 included) and a BERT
//! sequence classifier, loaded from a Hugging Face folder or a GGUF file ([`load`]).
//!
//! [`Model`] is what the trainer, the LoRA-SB init and the exporter see: a set of [`AdaptedLinear`]
//! layers with stable module paths, plus (for classification) a trainable head.
pub mod bert;
pub mod config;
pub mod gemma;
pub mod llama;
pub mod load;
mod spm;
pub mod synthetic;
pub mod testing;
pub mod tokenizer;
pub mod weights;

use candle_core::{Device, Var};

use crate::adapter::{AdaptedLinear, AdapterConfig};
use crate::tensors::TensorSet;
use crate::{Error, Result};

pub use bert::{BertClassifier, BertModel};
pub use config::{ArchConfig, BertConfig, LlamaConfig};
pub use gemma::Gemma2Params;
pub use llama::{KvCache, LlamaModel};
pub use load::{LoadOptions, LoadedModel, ModelFormat, load_model};
pub use tokenizer::{ChatMessage, TextTokenizer};

/// Linear-layer parameters from which `--recompute auto` recomputes blocks (see
/// [`Model::recompute_by_default`]).
pub const RECOMPUTE_AUTO_PARAMS: usize = 500_000_000;

/// What a model is trained for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaskKind {
    /// Next-token prediction (on response tokens for prompt/response data).
    CausalLm,
    /// Text or text-pair classification.
    Classification,
}

/// A pretrained model ready to take adapters.
#[derive(Clone, Debug)]
pub enum Model {
    /// A Llama-architecture causal LM.
    CausalLm(LlamaModel),
    /// A BERT encoder with a classification head.
    Classifier(BertClassifier),
}

impl Model {
    /// The task this model serves.
    pub fn task(&self) -> TaskKind {
        match self {
            Model::CausalLm(_) => TaskKind::CausalLm,
            Model::Classifier(_) => TaskKind::Classification,
        }
    }

    /// The device holding the weights.
    pub fn device(&self) -> &Device {
        match self {
            Model::CausalLm(m) => m.device(),
            Model::Classifier(m) => m.encoder.device(),
        }
    }

    /// Recomputes each transformer block in the backward instead of keeping its activations (causal LMs; see
    /// [`crate::recompute`]). Returns whether the model does it now.
    pub fn set_recompute(&mut self, on: bool) -> bool {
        match self {
            Model::CausalLm(m) => {
                m.set_recompute(on);
                on
            }
            Model::Classifier(_) => false,
        }
    }

    /// The default of `--recompute auto`: on for causal LMs of at least [`RECOMPUTE_AUTO_PARAMS`] parameters in
    /// their linear layers (billion-parameter models, whose activations would otherwise rival their compact
    /// weights), off for smaller ones (whose step it would slow by a third for little memory).
    pub fn recompute_by_default(&self) -> bool {
        let params: usize = self.linears().iter().map(|l| l.dims().0 * l.dims().1).sum();
        matches!(self, Model::CausalLm(_)) && params >= RECOMPUTE_AUTO_PARAMS
    }

    /// Bytes of the frozen matrices (linear weights, embeddings, LM head) by format.
    pub fn weight_bytes(&self) -> crate::frozen::WeightBytes {
        match self {
            Model::CausalLm(m) => m.weight_bytes(),
            Model::Classifier(m) => m.encoder.weight_bytes(),
        }
    }

    /// The adapter target kinds this architecture has (`q,k,v,o,gate,up,down` or BERT's six).
    pub fn target_kinds(&self) -> &'static [&'static str] {
        match self {
            Model::CausalLm(_) => llama::LLAMA_TARGETS,
            Model::Classifier(_) => bert::BERT_TARGETS,
        }
    }

    /// Every linear layer, in layer order.
    pub fn linears(&self) -> Vec<&AdaptedLinear> {
        match self {
            Model::CausalLm(m) => m.linears(),
            Model::Classifier(m) => m.encoder.linears(),
        }
    }

    /// Every linear layer, mutably.
    pub fn linears_mut(&mut self) -> Vec<&mut AdaptedLinear> {
        match self {
            Model::CausalLm(m) => m.linears_mut(),
            Model::Classifier(m) => m.encoder.linears_mut(),
        }
    }

    /// The linear layers `cfg` targets.
    pub fn targeted(&self, cfg: &AdapterConfig) -> Result<Vec<&AdaptedLinear>> {
        let kinds = cfg.resolve_targets(self.target_kinds())?;
        Ok(self.linears().into_iter().filter(|l| kinds.contains(&l.kind())).collect())
    }

    /// Attaches adapters of `cfg` to every targeted layer (see [`AdaptedLinear::attach`]); returns how many
    /// layers were adapted. On error no layer is changed.
    pub fn attach_adapters(&mut self, cfg: &AdapterConfig, init: Option<&TensorSet>) -> Result<usize> {
        let kinds = cfg.resolve_targets(self.target_kinds())?;
        let mut staged: Vec<AdaptedLinear> = Vec::new();
        for l in self.linears() {
            if kinds.contains(&l.kind()) {
                let mut c = l.clone();
                c.attach(cfg, init)?;
                staged.push(c);
            }
        }
        let n = staged.len();
        let mut it = staged.into_iter();
        for l in self.linears_mut() {
            if kinds.contains(&l.kind())
                && let Some(c) = it.next()
            {
                *l = c;
            }
        }
        Ok(n)
    }

    /// Removes every adapter.
    pub fn detach_adapters(&mut self) {
        for l in self.linears_mut() {
            l.detach();
        }
    }

    /// The classification head's variables (empty for a causal LM).
    pub fn head(&self) -> Vec<(String, Var)> {
        match self {
            Model::CausalLm(_) => vec![],
            Model::Classifier(c) => c.head(),
        }
    }

    /// Every trainable tensor by stable name: adapter tensors, then the head.
    pub fn trainable(&self) -> Vec<(String, Var)> {
        let mut v: Vec<(String, Var)> = self.linears().iter().flat_map(|l| l.trainable()).collect();
        v.extend(self.head());
        v
    }

    /// Number of trainable scalars.
    pub fn num_trainable(&self) -> usize {
        self.trainable().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Every adapter tensor (frozen and trained) and the head, by stable name, copied.
    pub fn adapter_tensors(&self) -> Result<TensorSet> {
        let mut s = TensorSet::new();
        for l in self.linears() {
            l.adapter_tensors(&mut s)?;
        }
        for (n, v) in self.head() {
            s.insert(n, v.as_tensor().copy()?);
        }
        Ok(s)
    }

    /// The frozen adapter tensors (LoRA-SB's `B` and `A`, FFA-LoRA's `A`): identical on every client of a run,
    /// which [`TensorSet::content_hash`] of this set checks.
    pub fn frozen_adapter_tensors(&self) -> Result<TensorSet> {
        let all = self.adapter_tensors()?;
        let trained: std::collections::HashSet<String> = self.trainable().into_iter().map(|(n, _)| n).collect();
        Ok(all.iter().filter(|(n, _)| !trained.contains(*n)).map(|(n, t)| (n.clone(), t.clone())).collect())
    }

    /// The trained tensors only (what a Fed-SB client sends: the R matrices and the head).
    pub fn trainable_tensors(&self) -> Result<TensorSet> {
        let mut s = TensorSet::new();
        for (n, v) in self.trainable() {
            s.insert(n, v.as_tensor().copy()?);
        }
        Ok(s)
    }

    /// Adds each `(module path, ΔW0)` to that module's frozen base weight (FedEx-LoRA, FLoRA). Every module must
    /// exist with the delta's shape and every value be finite; on error nothing changes.
    pub fn fold_into_base(&mut self, deltas: &[(String, candle_core::Tensor)]) -> Result<()> {
        let names: Vec<String> = self.linears().iter().map(|l| l.name().to_string()).collect();
        let mut seen = std::collections::HashSet::new();
        for (module, d) in deltas {
            if !seen.insert(module.as_str()) {
                return Err(crate::Error::tensor(module, "two base deltas for one module"));
            }
            let i = names
                .iter()
                .position(|n| n == module)
                .ok_or_else(|| crate::Error::tensor(module, "a base delta for a module this model does not have"))?;
            let l = &self.linears()[i];
            if l.tracks_weight_grad() {
                return Err(crate::Error::tensor(module, "cannot fold into W0 while its gradient is tracked"));
            }
            if d.dims() != [l.dims().0, l.dims().1] {
                return Err(crate::Error::tensor(
                    module,
                    format!("base delta {:?}, expected {:?}", d.dims(), l.dims()),
                ));
            }
            crate::adapter::linear::check_finite(module, d)?;
        }
        let mut linears = self.linears_mut();
        for (module, d) in deltas {
            if let Some(l) = linears.iter_mut().find(|l| l.name() == module) {
                l.add_to_base(d)?;
            }
        }
        Ok(())
    }

    /// Sets every trainable tensor from `set` (e.g. a global adapter). All names must be present with the
    /// right shapes and finite values; on error nothing changes.
    pub fn load_trainable(&self, set: &TensorSet) -> Result<()> {
        let vars = self.trainable();
        let mut staged = Vec::with_capacity(vars.len());
        for (name, var) in &vars {
            let t = set.require(name)?;
            if t.dims() != var.dims() {
                return Err(Error::tensor(name, format!("shape {:?}, expected {:?}", t.dims(), var.dims())));
            }
            crate::adapter::linear::check_finite(name, t)?;
            staged.push((var, t.to_device(var.device())?.to_dtype(candle_core::DType::F32)?));
        }
        for (var, t) in staged {
            var.set(&t)?;
        }
        Ok(())
    }
}
