//! Training on the real models: gradients reach every trainable tensor, the LoRA-SB init covers every
//! adapted layer, short runs lower the loss, and exports reload to the same model.
use candle_core::{Device, Tensor};
use fedsb_common::adapter::init::{InitConfig, lora_sb_init};
use fedsb_common::adapter::{AdapterConfig, AdapterKind};
use fedsb_common::export::{export_merged, export_peft, read_peft_deltas};
use fedsb_common::frozen::{ComputeDtype, WeightDtype, with_compute_dtype};
use fedsb_common::model::{LoadOptions, LoadedModel, Model, load_model};
use fedsb_common::train::data::{Batch, Encoded};
use fedsb_common::train::eval::evaluate;
use fedsb_common::train::{Dataset, Encoder, ScheduleKind, TrainConfig, batch_loss, train};
use fedsb_tests::{Assets, assets, rel_max_diff, tempdir};

fn load(path: &std::path::Path) -> LoadedModel {
    load_model(path, &Device::Cpu, &LoadOptions::default()).unwrap()
}

fn encode(l: &LoadedModel, a: &Assets, rel: &str, n: usize, max_len: usize) -> Vec<Encoded> {
    let ds = Dataset::load_jsonl(&a.data(rel)).unwrap().take(n);
    Encoder::new(&l.tokenizer, l.model.task(), max_len).encode_all(&ds).unwrap()
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

/// Asserts that one backward pass gives every trainable tensor a finite, nonzero gradient.
fn assert_all_grads(model: &Model, batch: &Batch) {
    let vars = model.trainable();
    assert!(!vars.is_empty());
    let grads = fedsb_common::recompute::backward(&batch_loss(model, batch).unwrap().loss).unwrap();
    for (name, v) in &vars {
        let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("`{name}` got no gradient"));
        let n = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(n.is_finite() && n > 0.0, "`{name}` has gradient norm² {n}");
    }
}

#[test]
fn every_trainable_tensor_of_every_adapter_gets_a_gradient() {
    let Some(a) = assets() else { return };
    let bert = load(&a.minilm());
    let data = encode(&bert, &a, "rotten-tomatoes/train.jsonl", 4, 32);
    let batch = Batch::collate(&data.iter().collect::<Vec<_>>(), bert.tokenizer.pad_id(), &Device::Cpu).unwrap();
    let all_bert = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"];
    for kind in [AdapterKind::LoraSb, AdapterKind::Lora, AdapterKind::FfaLora] {
        let mut m = bert.model.clone();
        let cfg = AdapterConfig::new(kind, 4, &all_bert);
        let init = if kind == AdapterKind::LoraSb {
            Some(lora_sb_init(&mut m, &cfg, &data, &init_cfg(4), bert.tokenizer.pad_id(), &mut |_, _| {}).unwrap().0)
        } else {
            None
        };
        assert_eq!(m.attach_adapters(&cfg, init.as_ref()).unwrap(), 36);
        // LoRA's B starts at zero, so A's gradient is zero at init; take one step first so both move.
        if kind != AdapterKind::LoraSb {
            let tc =
                TrainConfig { lr: 1e-2, max_steps: Some(1), batch_size: 4, warmup_ratio: 0.0, ..Default::default() };
            train(&m, &data, &tc, bert.tokenizer.pad_id(), &mut |_| {}).unwrap();
        }
        assert_all_grads(&m, &batch);
    }

    let smol = load(&a.smollm_gguf());
    let data = encode(&smol, &a, "gsm8k/train.jsonl", 2, 96);
    let batch = Batch::collate(&data.iter().collect::<Vec<_>>(), smol.tokenizer.pad_id(), &Device::Cpu).unwrap();
    let mut m = smol.model.clone();
    let cfg = AdapterConfig::new(AdapterKind::LoraSb, 4, &["q", "k", "v", "o", "gate", "up", "down"]);
    let (init, rep) = lora_sb_init(&mut m, &cfg, &data, &init_cfg(2), smol.tokenizer.pad_id(), &mut |_, _| {}).unwrap();
    assert_eq!(rep.layers, 30 * 7, "every adapted layer of SmolLM2 gets an init");
    assert_eq!(init.len(), 3 * 30 * 7);
    m.attach_adapters(&cfg, Some(&init)).unwrap();
    assert_all_grads(&m, &batch);
    // The same through block recomputation (the billion-parameter default), and in bf16 compute.
    assert!(m.set_recompute(true));
    assert_all_grads(&m, &batch);
    with_compute_dtype(ComputeDtype::Bf16, || assert_all_grads(&m, &batch));

    // bf16 frozen weights (the checkpoint converted), LoRA-SB on every BERT module.
    let bert = load_as(&a.minilm(), "bf16");
    let data = encode(&bert, &a, "rotten-tomatoes/train.jsonl", 4, 32);
    let batch = Batch::collate(&data.iter().collect::<Vec<_>>(), bert.tokenizer.pad_id(), &Device::Cpu).unwrap();
    let mut m = bert.model.clone();
    let cfg = AdapterConfig::new(AdapterKind::LoraSb, 4, &all_bert);
    let (init, _) = lora_sb_init(&mut m, &cfg, &data, &init_cfg(4), bert.tokenizer.pad_id(), &mut |_, _| {}).unwrap();
    m.attach_adapters(&cfg, Some(&init)).unwrap();
    assert_all_grads(&m, &batch);
}

#[test]
fn minilm_lora_sb_short_run_learns_and_exports() {
    let Some(a) = assets() else { return };
    let bert = load(&a.minilm());
    let pad = bert.tokenizer.pad_id();
    let train_data = encode(&bert, &a, "rotten-tomatoes/train.jsonl", 640, 64);
    let test_data = encode(&bert, &a, "rotten-tomatoes/test.jsonl", 200, 64);
    let mut m = bert.model.clone();
    let cfg =
        AdapterConfig::new(AdapterKind::LoraSb, 16, &["query", "value", "attention.output.dense", "output.dense"]);
    let (init, _) = lora_sb_init(&mut m, &cfg, &train_data, &init_cfg(32), pad, &mut |_, _| {}).unwrap();
    m.attach_adapters(&cfg, Some(&init)).unwrap();
    let before = evaluate(&m, &test_data, 50, pad).unwrap();
    let tc = TrainConfig {
        lr: 5e-3,
        epochs: 1.0,
        batch_size: 32,
        warmup_ratio: 0.1,
        schedule: ScheduleKind::Linear,
        ..Default::default()
    };
    let summary = train(&m, &train_data, &tc, pad, &mut |_| {}).unwrap();
    assert_eq!(summary.steps, 20);
    let after = evaluate(&m, &test_data, 50, pad).unwrap();
    let (acc0, acc1) = (before.accuracy.unwrap(), after.accuracy.unwrap());
    eprintln!(
        "MiniLM LoRA-SB, 20 steps: held-out loss {:.4} -> {:.4}, accuracy {acc0:.3} -> {acc1:.3}",
        before.loss, after.loss
    );
    assert!(after.loss < before.loss - 0.05, "held-out loss {} -> {}", before.loss, after.loss);
    assert!(acc1 > 0.65, "held-out accuracy after 20 steps is {acc1}");

    // B and A stayed frozen: the trained model's B and A are bit-identical to the init blob.
    let trained = m.adapter_tensors().unwrap();
    for name in init.names().filter(|n| !n.ends_with("lora_R.weight")) {
        let d = rel_max_diff(trained.require(name).unwrap(), init.require(name).unwrap());
        assert_eq!(d, 0.0, "{name} changed during training");
    }

    // PEFT export: ΔW of every layer is reproduced from lora_A / lora_B.
    let dir = tempdir();
    export_peft(&m, &cfg, dir.path(), "all-MiniLM-L6-v2").unwrap();
    let (deltas, head) = read_peft_deltas(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(deltas.len(), 24);
    assert_eq!(head.len(), 2);
    for l in m.linears().into_iter().filter(|l| l.adapter().is_some()) {
        let d = rel_max_diff(&deltas[l.name()], &l.delta_weight().unwrap().unwrap());
        assert!(d < 1e-5, "{}: PEFT ΔW differs by {d}", l.name());
    }
    // Merged export reloads as a plain model with the same predictions (the head travels with it).
    let merged = tempdir();
    export_merged(&m, &bert.tokenizer, &bert.arch, merged.path()).unwrap();
    let reloaded = load(merged.path());
    assert_eq!(reloaded.model.num_trainable(), 2 * 384 + 2, "no adapter, just the head");
    let again = evaluate(&reloaded.model, &test_data, 50, pad).unwrap();
    assert!((again.loss - after.loss).abs() < 1e-4, "merged model loss {} vs {}", again.loss, after.loss);
    assert_eq!(again.accuracy, after.accuracy);
}

#[test]
fn smollm2_lora_sb_lowers_gsm8k_loss_and_merges() {
    let Some(a) = assets() else { return };
    let smol = load(&a.smollm_gguf());
    let pad = smol.tokenizer.pad_id();
    let train_data = encode(&smol, &a, "gsm8k/train.jsonl", 16, 192);
    let mut m = smol.model.clone();
    let cfg = AdapterConfig::new(AdapterKind::LoraSb, 8, &["q", "k", "v", "o", "gate", "up", "down"]);
    let (init, _) = lora_sb_init(&mut m, &cfg, &train_data, &init_cfg(4), pad, &mut |_, _| {}).unwrap();
    m.attach_adapters(&cfg, Some(&init)).unwrap();
    assert_eq!(m.num_trainable(), 210 * 64);
    let before = evaluate(&m, &train_data, 4, pad).unwrap();
    let tc = TrainConfig { lr: 5e-3, max_steps: Some(8), batch_size: 4, warmup_ratio: 0.0, ..Default::default() };
    train(&m, &train_data, &tc, pad, &mut |_| {}).unwrap();
    let after = evaluate(&m, &train_data, 4, pad).unwrap();
    eprintln!("SmolLM2 LoRA-SB, 8 steps on 16 GSM8K problems: response loss {:.4} -> {:.4}", before.loss, after.loss);
    assert!(after.loss < before.loss - 0.02, "loss {} -> {}", before.loss, after.loss);

    // The merged Hugging Face folder gives the adapted model's logits.
    let dir = tempdir();
    export_merged(&m, &smol.tokenizer, &smol.arch, dir.path()).unwrap();
    let merged = load(dir.path());
    let ids = Tensor::new(&train_data[0].ids[..32], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let (Model::CausalLm(x), Model::CausalLm(y)) = (&m, &merged.model) else { panic!() };
    // f32 products on both sides (the adapted model's weights are Q4_1, the merged folder's f32).
    let d = with_compute_dtype(ComputeDtype::F32, || {
        rel_max_diff(&y.forward(&ids, None).unwrap(), &x.forward(&ids, None).unwrap())
    });
    assert!(d < 1e-4, "merged logits differ by {d}");
}

fn load_as(path: &std::path::Path, dtype: &str) -> LoadedModel {
    let dtype: WeightDtype = dtype.parse().unwrap();
    load_model(path, &Device::Cpu, &LoadOptions { dtype, ..LoadOptions::default() }).unwrap()
}

/// One LoRA-SB training run from `init` on `path` loaded as `dtype`, its products in `compute`: checks every
/// trainable tensor gets a gradient and the held-out loss falls; returns the loss after.
#[allow(clippy::too_many_arguments)]
fn train_on(
    path: &std::path::Path,
    dtype: &str,
    compute: ComputeDtype,
    cfg: &AdapterConfig,
    init: &fedsb_common::tensors::TensorSet,
    data: (&[Encoded], &[Encoded]),
    tc: &TrainConfig,
    eval_batch: usize,
) -> f64 {
    with_compute_dtype(compute, || {
        let l = load_as(path, dtype);
        let pad = l.tokenizer.pad_id();
        let mut m = l.model.clone();
        m.attach_adapters(cfg, Some(init)).unwrap();
        let batch = Batch::collate(&data.0[..2].iter().collect::<Vec<_>>(), pad, &Device::Cpu).unwrap();
        assert_all_grads(&m, &batch);
        let before = evaluate(&m, data.1, eval_batch, pad).unwrap().loss;
        train(&m, data.0, tc, pad, &mut |_| {}).unwrap();
        let after = evaluate(&m, data.1, eval_batch, pad).unwrap().loss;
        eprintln!(
            "{} LoRA-SB on {dtype} weights, {compute:?} products: loss {before:.4} -> {after:.4}",
            path.display()
        );
        assert!(after < before, "{dtype} ({compute:?}): held-out loss {before} -> {after}");
        after
    })
}

/// The same LoRA-SB training (one init blob, the same batches) with the frozen weights as stored, widened to
/// f32, or converted to bf16 / q8_0 from the real checkpoints. With f32 products (compact weights dequantized
/// tile by tile) the loss after training is within 1 % of the f32 weights' run: the formats hold the weights
/// faithfully. With bf16 products (where the CPU has bf16 units, else f32 again) every run still learns and
/// lands within 5 % of it: bf16 inputs move a freshly initialized LoRA-SB model's loss by 1–3 % on SmolLM2
/// (its init is one large sign step, and the LM head's logits are large), 0.2 % for the base model.
#[test]
fn training_on_compact_weights_matches_f32() {
    let Some(a) = assets() else { return };
    // MiniLM: f32 checkpoint, converted to bf16 and q8_0.
    let base = load_as(&a.minilm(), "f32");
    let pad = base.tokenizer.pad_id();
    let train_data = encode(&base, &a, "rotten-tomatoes/train.jsonl", 256, 64);
    let test_data = encode(&base, &a, "rotten-tomatoes/test.jsonl", 128, 64);
    let cfg =
        AdapterConfig::new(AdapterKind::LoraSb, 16, &["query", "value", "attention.output.dense", "output.dense"]);
    let mut m0 = base.model.clone();
    let (init, _) = lora_sb_init(&mut m0, &cfg, &train_data, &init_cfg(32), pad, &mut |_, _| {}).unwrap();
    let tc = TrainConfig { lr: 5e-3, max_steps: Some(8), batch_size: 32, warmup_ratio: 0.0, ..Default::default() };
    let data = (&train_data[..], &test_data[..]);
    let f32_loss = train_on(&a.minilm(), "f32", ComputeDtype::F32, &cfg, &init, data, &tc, 64);
    for (dtype, compute, tol) in
        [("bf16", ComputeDtype::F32, 0.01), ("q8_0", ComputeDtype::F32, 0.01), ("bf16", ComputeDtype::Bf16, 0.05)]
    {
        let loss = train_on(&a.minilm(), dtype, compute, &cfg, &init, data, &tc, 64);
        let rel = (loss - f32_loss).abs() / f32_loss;
        assert!(rel < tol, "MiniLM on {dtype} ({compute:?}): loss {loss} vs f32's {f32_loss} ({:.2} %)", rel * 100.0);
    }

    // SmolLM2: the Q4_1 checkpoint as stored, widened to f32, and as bf16.
    let smol = load_as(&a.smollm_gguf(), "f32");
    let pad = smol.tokenizer.pad_id();
    let data = encode(&smol, &a, "gsm8k/train.jsonl", 8, 128);
    let cfg = AdapterConfig::new(AdapterKind::LoraSb, 8, &["q", "k", "v", "o", "gate", "up", "down"]);
    let mut m0 = smol.model.clone();
    let (init, _) = lora_sb_init(&mut m0, &cfg, &data, &init_cfg(4), pad, &mut |_, _| {}).unwrap();
    let tc = TrainConfig { lr: 5e-3, max_steps: Some(4), batch_size: 4, warmup_ratio: 0.0, ..Default::default() };
    let data = (&data[..], &data[..]);
    let f32_loss = train_on(&a.smollm_gguf(), "f32", ComputeDtype::F32, &cfg, &init, data, &tc, 4);
    for (dtype, compute, tol) in [
        ("auto", ComputeDtype::F32, 0.01),
        ("bf16", ComputeDtype::F32, 0.01),
        ("auto", ComputeDtype::Bf16, 0.05),
        ("bf16", ComputeDtype::Bf16, 0.05),
    ] {
        let loss = train_on(&a.smollm_gguf(), dtype, compute, &cfg, &init, data, &tc, 4);
        let rel = (loss - f32_loss).abs() / f32_loss;
        assert!(rel < tol, "SmolLM2 on {dtype} ({compute:?}): loss {loss} vs f32's {f32_loss} ({:.2} %)", rel * 100.0);
    }
}
