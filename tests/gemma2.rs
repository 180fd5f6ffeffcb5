//! Gemma-2 against Hugging Face transformers' `Gemma2ForCausalLM`: a tiny random model and its reference outputs
//! (`scripts/make-gemma2-test-model.py` writes `data/gemma2-tiny/`: the Hugging Face folder, the same model as
//! GGUF the way llama.cpp converts it, and transformers' logits and NLLs). No downloaded assets are needed.
//!
//! The sizes make every Gemma-2 specific matter: sliding window 8 < 20 tokens, attention soft-cap 5 and final
//! soft-cap 3 below the raw scores and logits, norm weights far from 0, heads × head_dim ≠ hidden; and a copy of
//! the folder with `query_pre_attn_scalar` 24 ≠ head_dim 16 is checked against transformers too.
use std::path::PathBuf;

use candle_core::{Device, IndexOp, Tensor};
use fedsb_common::adapter::init::{InitConfig, lora_sb_init};
use fedsb_common::adapter::{AdapterConfig, AdapterKind};
use fedsb_common::export::export_merged;
use fedsb_common::model::{ArchConfig, ChatMessage, LoadOptions, LoadedModel, Model, TaskKind, load_model};
use fedsb_common::train::data::{Batch, Encoded};
use fedsb_common::train::eval::evaluate;
use fedsb_common::train::{Dataset, Encoder, TrainConfig, batch_loss, train};
use fedsb_tests::{rel_max_diff, tempdir};
use serde_json::Value;

/// Logits: largest difference relative to the largest |logit| of the row set; NLL: relative difference.
const TOL: f32 = 1e-4;
const ALL: [&str; 7] = ["q", "k", "v", "o", "gate", "up", "down"];

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/gemma2-tiny")
}

fn reference() -> Value {
    let text = std::fs::read_to_string(data_dir().join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn load(path: PathBuf) -> LoadedModel {
    load_model(&path, &Device::Cpu, &LoadOptions::default()).unwrap()
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn row(v: &Value) -> Tensor {
    let r: Vec<f32> = v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
    Tensor::new(r, &Device::Cpu).unwrap()
}

/// Next-token labels of `ids` under `mask` (the last position and padding are ignored).
fn labels(ids: &[u32], mask: &[u32]) -> Vec<i64> {
    (0..ids.len()).map(|i| if i + 1 < ids.len() && mask[i + 1] == 1 { ids[i + 1] as i64 } else { -100 }).collect()
}

/// Checks logits slices and mean NLLs of every reference sequence, alone and as one padded batch.
fn assert_matches_transformers(model: &Model, what: &str) {
    let Model::CausalLm(lm) = model else { panic!("{what}: a causal LM expected") };
    let r = reference();
    let dev = Device::Cpu;
    let (mut worst_logits, mut worst_nll) = (0f32, 0f64);
    let mut close_nll = |ours: f32, theirs: f64, ctx: &str| {
        let d = ((ours as f64 - theirs) / theirs).abs();
        worst_nll = worst_nll.max(d);
        assert!(d < TOL as f64, "{what} {ctx}: mean NLL {ours} vs transformers' {theirs}");
    };
    for (n, s) in r["single"].as_array().unwrap().iter().enumerate() {
        let ids = ids_of(&s["ids"]);
        let x = Tensor::new(ids.as_slice(), &dev).unwrap().unsqueeze(0).unwrap();
        let logits = lm.forward(&x, None).unwrap().i(0).unwrap();
        for (p, want) in s["logits"].as_object().unwrap() {
            let p: usize = p.parse().unwrap();
            let d = rel_max_diff(&logits.i(p).unwrap(), &row(want));
            worst_logits = worst_logits.max(d);
            assert!(d < TOL, "{what} sequence {n} position {p}: logits differ from transformers' by {d}");
        }
        let (loss, count) = lm.lm_loss(&x, None, &[labels(&ids, &vec![1; ids.len()])]).unwrap();
        assert_eq!(count, ids.len() - 1);
        close_nll(loss.to_scalar::<f32>().unwrap(), s["mean_nll"].as_f64().unwrap(), &format!("sequence {n}"));
    }
    let b = &r["batch"];
    let rows: Vec<Vec<u32>> = b["ids"].as_array().unwrap().iter().map(ids_of).collect();
    let masks: Vec<Vec<u32>> = b["mask"].as_array().unwrap().iter().map(ids_of).collect();
    let t = rows[0].len();
    let ids = Tensor::from_vec(rows.concat(), (rows.len(), t), &dev).unwrap();
    let mask = Tensor::from_vec(masks.concat(), (rows.len(), t), &dev).unwrap();
    let logits = lm.forward(&ids, Some(&mask)).unwrap();
    for (bi, slices) in b["logits"].as_array().unwrap().iter().enumerate() {
        for (p, want) in slices.as_object().unwrap() {
            let p: usize = p.parse().unwrap();
            let d = rel_max_diff(&logits.i((bi, p)).unwrap(), &row(want));
            worst_logits = worst_logits.max(d);
            assert!(d < TOL, "{what} padded batch row {bi} position {p}: logits differ by {d}");
        }
    }
    let lab: Vec<Vec<i64>> = rows.iter().zip(&masks).map(|(i, m)| labels(i, m)).collect();
    let (loss, _) = lm.lm_loss(&ids, Some(&mask), &lab).unwrap();
    close_nll(loss.to_scalar::<f32>().unwrap(), b["mean_nll"].as_f64().unwrap(), "padded batch");
    eprintln!(
        "{what}: logits within {worst_logits:.2e} (relative to the row's largest), mean NLL within {worst_nll:.2e}"
    );
}

fn assert_tokenizer_matches(l: &LoadedModel, what: &str) {
    for t in reference()["tokenizer"].as_array().unwrap() {
        let text = t["text"].as_str().unwrap();
        assert_eq!(l.tokenizer.encode(text, false).unwrap(), ids_of(&t["ids"]), "{what}: ids of {text:?}");
        let with_bos = l.tokenizer.encode(text, true).unwrap();
        assert_eq!(with_bos[0], 2, "{what}: <bos> is prepended");
    }
    assert_eq!(
        l.tokenizer.decode(&l.tokenizer.encode("round 12345 ünïcödé!", true).unwrap()).unwrap(),
        "round 12345 ünïcödé!"
    );
    let msgs = [ChatMessage { role: "user".into(), content: "hello".into() }];
    let prompt = l.tokenizer.apply_chat_template(&msgs, true).unwrap().unwrap();
    assert_eq!(prompt, "<bos><start_of_turn>user\nhello<end_of_turn>\n<start_of_turn>model\n", "{what}");
    let ids = l.tokenizer.encode(&prompt, false).unwrap();
    assert_eq!(&ids[..2], &[2, 4], "{what}: <bos> and <start_of_turn> are single tokens");
}

#[test]
fn hf_folder_matches_transformers() {
    let l = load(data_dir().join("hf"));
    let ArchConfig::Llama(c) = &l.arch else { panic!() };
    let g = c.gemma2.as_ref().expect("a gemma2 config");
    assert_eq!((g.sliding_window, g.sliding_layers.as_slice()), (Some(8), &[true, false, true][..]));
    assert_eq!((g.attn_logit_softcapping, g.final_logit_softcapping), (Some(5.0), Some(3.0)));
    assert_matches_transformers(&l.model, "HF folder");
    assert_tokenizer_matches(&l, "tokenizer.json");

    // query_pre_attn_scalar (not head_dim) scales the scores: the same weights with 24 in config.json.
    let dir = tempdir();
    for f in ["model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(data_dir().join("hf").join(f), dir.path().join(f)).unwrap();
    }
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(data_dir().join("hf/config.json")).unwrap()).unwrap();
    cfg["query_pre_attn_scalar"] = 24.into();
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let Model::CausalLm(lm) = load(dir.path().to_path_buf()).model else { panic!() };
    let s = &reference()["scalar_24"];
    let ids = ids_of(&s["ids"]);
    let logits = lm.forward(&Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap(), None).unwrap();
    for (p, want) in s["logits"].as_object().unwrap() {
        let d = rel_max_diff(&logits.i((0, p.parse::<usize>().unwrap())).unwrap(), &row(want));
        assert!(d < TOL, "query_pre_attn_scalar 24, position {p}: logits differ from transformers' by {d}");
    }
}

#[test]
fn gguf_matches_transformers_and_the_hf_folder() {
    let gguf = load(data_dir().join("gemma2-tiny.gguf"));
    let hf = load(data_dir().join("hf"));
    let (ArchConfig::Llama(a), ArchConfig::Llama(b)) = (&gguf.arch, &hf.arch) else { panic!() };
    assert!((a.rms_norm_eps - b.rms_norm_eps).abs() < 1e-12, "GGUF stores eps as f32");
    let a = fedsb_common::model::LlamaConfig { rms_norm_eps: b.rms_norm_eps, ..a.clone() };
    assert_eq!(&a, b, "GGUF metadata gives the config.json's settings");
    assert_matches_transformers(&gguf.model, "GGUF");
    assert_tokenizer_matches(&gguf, "GGUF sentencepiece tokenizer");
    // A tokenizer.json given instead of the GGUF's own.
    let opts = LoadOptions { tokenizer: Some(data_dir().join("hf/tokenizer.json")), ..Default::default() };
    let with_json = load_model(&data_dir().join("gemma2-tiny.gguf"), &Device::Cpu, &opts).unwrap();
    assert_tokenizer_matches(&with_json, "GGUF with a tokenizer.json");
    // Same weights in the Hugging Face convention (norms: GGUF's w + 1 brought back to w).
    let (Model::CausalLm(a), Model::CausalLm(b)) = (&gguf.model, &hf.model) else { panic!() };
    let (wa, wb) = (a.named_weights().unwrap(), b.named_weights().unwrap());
    assert_eq!(wa.len(), wb.len());
    for ((na, ta), (nb, tb)) in wa.iter().zip(&wb) {
        assert_eq!(na, nb);
        let d = (ta - tb).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-6, "{na} differs by {d}");
    }
}

/// Instruction examples in the chat template (loss on the responses).
fn encoded(l: &LoadedModel, n: usize) -> Vec<Encoded> {
    let words = ["the model", "a small update", "every round", "the data", "one client", "two servers"];
    let lines: String = (0..n)
        .map(|i| {
            let p = format!("repeat {}", words[i % words.len()]);
            let r = format!("{} {}", words[i % words.len()], words[(i + 1) % words.len()]);
            format!("{}\n", serde_json::json!({"prompt": p, "response": r}))
        })
        .collect();
    let ds = Dataset::parse_jsonl(&lines).unwrap();
    Encoder::new(&l.tokenizer, TaskKind::CausalLm, 48).encode_all(&ds).unwrap()
}

fn init_cfg(samples: usize) -> InitConfig {
    InitConfig {
        samples,
        batch_size: samples,
        eta: 1e-3,
        oversample: 8,
        power_iters: 6,
        seed: 42,
        grad_memory_mib: fedsb_common::adapter::init::DEFAULT_GRAD_MEMORY_MIB,
    }
}

#[test]
fn every_trainable_tensor_of_every_adapter_gets_a_gradient() {
    let l = load(data_dir().join("gemma2-tiny.gguf"));
    let pad = l.tokenizer.pad_id();
    let data = encoded(&l, 6);
    let batch = Batch::collate(&data.iter().collect::<Vec<_>>(), pad, &Device::Cpu).unwrap();
    for kind in [AdapterKind::LoraSb, AdapterKind::Lora, AdapterKind::FfaLora] {
        let mut m = l.model.clone();
        let cfg = AdapterConfig::new(kind, 4, &ALL);
        let init = if kind == AdapterKind::LoraSb {
            let (init, rep) = lora_sb_init(&mut m, &cfg, &data, &init_cfg(6), pad, &mut |_, _| {}).unwrap();
            assert_eq!(rep.layers, 3 * 7, "every adapted layer gets an init");
            Some(init)
        } else {
            None
        };
        assert_eq!(m.attach_adapters(&cfg, init.as_ref()).unwrap(), 3 * 7);
        // LoRA's B starts at zero, so A's gradient is zero at init; one step first so both move.
        if kind == AdapterKind::Lora {
            let tc =
                TrainConfig { lr: 1e-2, max_steps: Some(1), batch_size: 6, warmup_ratio: 0.0, ..Default::default() };
            train(&m, &data, &tc, pad, &mut |_| {}).unwrap();
        }
        let vars = m.trainable();
        assert_eq!(vars.len(), if kind == AdapterKind::Lora { 2 * 21 } else { 21 }, "{kind}");
        let grads = batch_loss(&m, &batch).unwrap().loss.backward().unwrap();
        for (name, v) in &vars {
            let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{kind}: `{name}` got no gradient"));
            let n = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(n.is_finite() && n > 0.0, "{kind}: `{name}` has gradient norm² {n}");
        }
    }
}

#[test]
fn lora_sb_training_lowers_the_loss_and_the_merged_export_reloads() {
    let l = load(data_dir().join("hf"));
    let pad = l.tokenizer.pad_id();
    let data = encoded(&l, 12);
    let mut m = l.model.clone();
    let cfg = AdapterConfig::new(AdapterKind::LoraSb, 8, &ALL);
    let (init, _) = lora_sb_init(&mut m, &cfg, &data, &init_cfg(6), pad, &mut |_, _| {}).unwrap();
    m.attach_adapters(&cfg, Some(&init)).unwrap();
    let before = evaluate(&m, &data, 6, pad).unwrap();
    let tc = TrainConfig { lr: 2e-2, max_steps: Some(10), batch_size: 6, warmup_ratio: 0.0, ..Default::default() };
    train(&m, &data, &tc, pad, &mut |_| {}).unwrap();
    let after = evaluate(&m, &data, 6, pad).unwrap();
    eprintln!("tiny Gemma-2 LoRA-SB, 10 steps: response loss {:.4} -> {:.4}", before.loss, after.loss);
    assert!(after.loss < before.loss - 0.1, "loss {} -> {}", before.loss, after.loss);

    // Merged export: a Gemma-2 config.json and Hugging Face-convention norms that reload to the same logits.
    let dir = tempdir();
    export_merged(&m, &l.tokenizer, &l.arch, dir.path()).unwrap();
    let cfg_json: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg_json["architectures"][0], "Gemma2ForCausalLM");
    assert_eq!(cfg_json["model_type"], "gemma2");
    assert_eq!(cfg_json["final_logit_softcapping"], 3.0);
    let merged = load(dir.path().to_path_buf());
    let x = Tensor::new(&data[0].ids[..], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let (Model::CausalLm(a), Model::CausalLm(b)) = (&m, &merged.model) else { panic!() };
    let d = rel_max_diff(&b.forward(&x, None).unwrap(), &a.forward(&x, None).unwrap());
    assert!(d < 1e-5, "merged logits differ by {d}");
    // Without the adapters the export is the base model: transformers' numbers again.
    let base = tempdir();
    export_merged(&l.model, &l.tokenizer, &l.arch, base.path()).unwrap();
    assert_matches_transformers(&load(base.path().to_path_buf()).model, "re-exported HF folder");
}
