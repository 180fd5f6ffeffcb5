//! Export of a trained adapter as a standard Hugging Face PEFT LoRA folder, and of merged full weights.
//!
//! PEFT folder: `adapter_config.json` + `adapter_model.safetensors` with keys
//! `base_model.model.<module path>.lora_A.weight` (`r × d_in`) and `.lora_B.weight` (`d_out × r`), and the
//! classification head under `base_model.model.classifier.{weight,bias}` (`modules_to_save`). LoRA-SB is
//! exported as plain LoRA: `lora_A = A`, `lora_B = s·B·R`, `r = r`, `lora_alpha = r` (PEFT scale 1), so any
//! PEFT-aware tool applies it. `target_modules` lists the full module paths, so PEFT's suffix matching
//! cannot adapt more layers than were trained.
use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::adapter::{AdapterConfig, AdapterKind};
use crate::model::{ArchConfig, Model, TaskKind, TextTokenizer};
use crate::tensors::{TensorSet, write_atomic};
use crate::{Error, Result};

const PEFT_PREFIX: &str = "base_model.model.";

/// Writes `model`'s adapter as a PEFT LoRA folder in `dir`. `base_model` is recorded as
/// `base_model_name_or_path`.
pub fn export_peft(model: &Model, adapter: &AdapterConfig, dir: &Path, base_model: &str) -> Result<()> {
    let mut set = TensorSet::new();
    let mut targets = Vec::new();
    for l in model.linears() {
        let Some(_) = l.adapter() else { continue };
        let mut own = TensorSet::new();
        l.adapter_tensors(&mut own)?;
        let name = l.name();
        let a = own.require(&format!("{name}.lora_A.weight"))?.clone();
        let b = own.require(&format!("{name}.lora_B.weight"))?.clone();
        // PEFT applies (lora_alpha / r)·B·A with lora_alpha = r, i.e. scale 1: fold our scale into B.
        let b = match adapter.kind {
            AdapterKind::LoraSb => (b.matmul(own.require(&format!("{name}.lora_R.weight"))?)? * l.scale())?,
            AdapterKind::Lora | AdapterKind::FfaLora => (b * l.scale())?,
        };
        set.insert(format!("{PEFT_PREFIX}{name}.lora_A.weight"), a.contiguous()?);
        set.insert(format!("{PEFT_PREFIX}{name}.lora_B.weight"), b.contiguous()?);
        targets.push(name.to_string());
    }
    if targets.is_empty() {
        return Err(Error::Adapter("the model has no adapter to export".into()));
    }
    let head = model.head();
    for (n, v) in &head {
        set.insert(format!("{PEFT_PREFIX}{n}"), v.as_tensor().copy()?);
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    set.save(&dir.join("adapter_model.safetensors"))?;
    let cfg = serde_json::json!({
        "peft_type": "LORA",
        "task_type": match model.task() { TaskKind::CausalLm => "CAUSAL_LM", TaskKind::Classification => "SEQ_CLS" },
        "base_model_name_or_path": base_model,
        "r": adapter.rank,
        "lora_alpha": adapter.rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": false,
        "target_modules": targets,
        "modules_to_save": if head.is_empty() { serde_json::Value::Null } else { serde_json::json!(["classifier"]) },
        "inference_mode": true,
        "init_lora_weights": true,
        "use_rslora": false,
        "use_dora": false,
        "fedsb": {
            "adapter": adapter.kind.as_str(),
            "scale": adapter.scale(),
            "note": "lora_B holds scale·B·R for LoRA-SB (lora_alpha = r, so PEFT's scale is 1)",
        },
    });
    let text = serde_json::to_string_pretty(&cfg)
        .map_err(|e| Error::Json { context: "adapter_config.json".into(), source: e })?;
    write_atomic(&dir.join("adapter_config.json"), text.as_bytes())
}

/// Reads a PEFT LoRA folder back as `module path → ΔW = (lora_alpha / r)·B·A`, plus any other tensors
/// (e.g. the head) by their names without the PEFT prefix.
pub fn read_peft_deltas(dir: &Path, device: &Device) -> Result<(BTreeMap<String, Tensor>, TensorSet)> {
    let cfg_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let cfg: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::Json { context: cfg_path.display().to_string(), source: e })?;
    let r =
        cfg.get("r").and_then(|v| v.as_f64()).ok_or_else(|| Error::Adapter("adapter_config.json lacks r".into()))?;
    let alpha = cfg.get("lora_alpha").and_then(|v| v.as_f64()).unwrap_or(r);
    let set = TensorSet::load(&dir.join("adapter_model.safetensors"), device)?;
    let mut deltas = BTreeMap::new();
    let mut other = TensorSet::new();
    for (k, t) in set.iter() {
        let k = k.strip_prefix(PEFT_PREFIX).unwrap_or(k);
        if let Some(m) = k.strip_suffix(".lora_A.weight") {
            let b = set.require(&format!("{PEFT_PREFIX}{m}.lora_B.weight"))?;
            deltas.insert(m.to_string(), (b.matmul(t)? * (alpha / r))?);
        } else if !k.ends_with(".lora_B.weight") {
            other.insert(k.to_string(), t.clone());
        }
    }
    Ok((deltas, other))
}

/// Writes a complete Hugging Face folder of the merged model `W0 + ΔW`: `config.json`,
/// `model.safetensors` (f32, checkpoint names; a classifier's head as `classifier.{weight,bias}`),
/// `tokenizer.json` and `tokenizer_config.json` (with the chat template). fedsb loads it back like any
/// Hugging Face folder; it is also how a GGUF model becomes a Hugging Face one.
pub fn export_merged(model: &Model, tokenizer: &TextTokenizer, arch: &ArchConfig, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut set = TensorSet::new();
    let (weights, config) = match (model, arch) {
        (Model::CausalLm(m), ArchConfig::Llama(c)) => (m.named_weights()?, c.to_hf_json()),
        (Model::Classifier(m), ArchConfig::Bert(c)) => {
            let mut w = m.encoder.named_weights()?;
            for (n, v) in m.head() {
                w.push((n, v.as_tensor().copy()?));
            }
            (w, c.to_hf_json(m.num_labels()))
        }
        _ => return Err(Error::Model("model and architecture do not match".into())),
    };
    for (n, t) in weights {
        set.insert(n, t.contiguous()?);
    }
    set.set_metadata("format", "pt");
    set.save(&dir.join("model.safetensors"))?;
    let text =
        serde_json::to_string_pretty(&config).map_err(|e| Error::Json { context: "config.json".into(), source: e })?;
    write_atomic(&dir.join("config.json"), text.as_bytes())?;
    tokenizer.save_hf(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BertClassifier, BertConfig, BertModel, LlamaConfig, LlamaModel};

    fn check_roundtrip(model: &Model, adapter: &AdapterConfig) {
        let dir = tempfile::tempdir().unwrap();
        export_peft(model, adapter, dir.path(), "test").unwrap();
        let (deltas, other) = read_peft_deltas(dir.path(), &Device::Cpu).unwrap();
        let adapted: Vec<_> = model.linears().into_iter().filter(|l| l.adapter().is_some()).collect();
        assert_eq!(deltas.len(), adapted.len());
        for l in adapted {
            let ours = l.delta_weight().unwrap().unwrap();
            let theirs = &deltas[l.name()];
            let d = (&ours - theirs).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let m = ours.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d <= 1e-5 * m.max(1e-3), "{}: {d} vs {m}", l.name());
        }
        assert_eq!(other.len(), model.head().len());
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap()).unwrap();
        assert_eq!(cfg["r"], adapter.rank);
    }

    #[test]
    fn peft_export_reloads_to_the_same_delta() {
        let dev = Device::Cpu;
        let mut m = Model::CausalLm(LlamaModel::random(&LlamaConfig::tiny(), 1, &dev).unwrap());
        let mut lora = AdapterConfig::new(AdapterKind::Lora, 3, &["q", "down"]);
        lora.alpha = 6.0;
        m.attach_adapters(&lora, None).unwrap();
        for (n, v) in m.trainable() {
            if n.ends_with("lora_B.weight") {
                v.set(&Tensor::randn(0f32, 1., v.dims(), &dev).unwrap()).unwrap();
            }
        }
        check_roundtrip(&m, &lora);
        // LoRA-SB with a non-trivial scale and R.
        let mut c = Model::Classifier(
            BertClassifier::new(BertModel::random(&BertConfig::tiny(), 1, &dev).unwrap(), 2, 0).unwrap(),
        );
        let mut sb = AdapterConfig::new(AdapterKind::LoraSb, 2, &["query", "output.dense"]);
        sb.alpha = 4.0;
        let mut init = TensorSet::new();
        for l in c.targeted(&sb).unwrap() {
            let (o, i) = l.dims();
            init.insert(format!("{}.lora_A.weight", l.name()), Tensor::randn(0f32, 1., (2, i), &dev).unwrap());
            init.insert(format!("{}.lora_B.weight", l.name()), Tensor::randn(0f32, 1., (o, 2), &dev).unwrap());
            init.insert(format!("{}.lora_R.weight", l.name()), Tensor::randn(0f32, 1., (2, 2), &dev).unwrap());
        }
        assert_eq!(c.attach_adapters(&sb, Some(&init)).unwrap(), 4);
        check_roundtrip(&c, &sb);
        assert!(
            export_peft(
                &Model::CausalLm(LlamaModel::random(&LlamaConfig::tiny(), 1, &dev).unwrap()),
                &sb,
                tempfile::tempdir().unwrap().path(),
                "x"
            )
            .is_err()
        );
    }
}
