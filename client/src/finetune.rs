//! `fedsb-client finetune`: centralized fine-tuning on one machine (the LoRA-SB paper's setting).
//!
//! Load model and data → evaluate the base → LoRA-SB init (gradient estimate, sign, truncated SVD) → train
//! → evaluate → write the adapter, the init, a PEFT folder (and optionally the merged model) and a summary.
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use fedsb_common::adapter::init::{InitConfig, lora_sb_init};
use fedsb_common::adapter::{AdapterConfig, AdapterKind, parse_targets};
use fedsb_common::export::{export_merged, export_peft};
use fedsb_common::model::{LoadOptions, Model, TaskKind, load_model};
use fedsb_common::train::eval::{EvalReport, ExactMatchReport, evaluate, exact_match};
use fedsb_common::train::{Dataset, Encoder, ScheduleKind, TrainConfig, train};
use serde::Serialize;

use crate::device::parse_device;
use crate::progress::{CountProgress, StepProgress};

/// Arguments of `fedsb-client finetune`.
#[derive(Args, Debug)]
pub struct FinetuneArgs {
    /// Model: a Hugging Face folder (config.json, *.safetensors, tokenizer.json) or a .gguf file.
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    weights: crate::device::WeightArgs,
    /// Memory for the LoRA-SB init's full-weight gradients, MiB: the targeted layers are taken in groups that
    /// fit, one gradient pass over the init samples per group.
    #[arg(long, default_value_t = fedsb_common::adapter::init::DEFAULT_GRAD_MEMORY_MIB)]
    init_grad_memory: usize,
    /// Training data, JSONL: {"text","label"} (classification), {"prompt","response"} or {"text"} (LM).
    #[arg(long)]
    train: PathBuf,
    /// Held-out data in the same format, evaluated before and after training.
    #[arg(long)]
    eval: Option<PathBuf>,
    /// Adapter: lora-sb, lora, ffa-lora, or none (train the classification head alone: a linear probe).
    #[arg(long, default_value = "lora-sb")]
    adapter: String,
    /// Adapter rank r.
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// LoRA alpha (the adapter path is scaled by alpha/r); defaults to r, i.e. scale 1.
    #[arg(long)]
    alpha: Option<f64>,
    /// Target modules, comma-separated: q,k,v,o,gate,up,down (Llama) or
    /// query,key,value,attention.output.dense,intermediate.dense,output.dense (BERT), or `all`.
    #[arg(long)]
    targets: Option<String>,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Passes over the training data.
    #[arg(long, default_value_t = 1.0)]
    epochs: f64,
    /// Optimizer steps (overrides --epochs).
    #[arg(long)]
    max_steps: Option<usize>,
    /// Examples per micro-batch.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Fraction of steps of linear warm-up.
    #[arg(long, default_value_t = 0.02)]
    warmup_ratio: f64,
    /// Decay after warm-up: cosine, linear or constant.
    #[arg(long, default_value = "cosine")]
    schedule: String,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Clip the gradient norm to this (0 disables).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// Longest sequence in tokens (longer examples are truncated).
    #[arg(long, default_value_t = 256)]
    max_len: usize,
    /// Use only the first N training examples.
    #[arg(long)]
    train_limit: Option<usize>,
    /// Use only the first N evaluation examples.
    #[arg(long)]
    eval_limit: Option<usize>,
    /// Number of classes (classification; default: largest label in the training data + 1).
    #[arg(long)]
    num_labels: Option<usize>,
    /// Seed of data order, init and head.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// LoRA-SB init: samples for the gradient estimate (default max(|D|/1000, one batch)).
    #[arg(long)]
    init_samples: Option<usize>,
    /// LoRA-SB init: step size η of the approximated first update (default: the first step's learning rate).
    #[arg(long)]
    init_eta: Option<f64>,
    /// LoRA-SB init: power iterations of the randomized SVD.
    #[arg(long, default_value_t = 6)]
    svd_power_iters: usize,
    /// LoRA-SB init: oversampling of the randomized SVD.
    #[arg(long, default_value_t = 8)]
    svd_oversample: usize,
    /// Causal LMs: greedy-decode this many evaluation examples and report exact match of the final answer
    /// (`#### N`), before and after training.
    #[arg(long, default_value_t = 0)]
    exact_match: usize,
    /// Longest generated answer for exact match, in tokens.
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Evaluation batch size.
    #[arg(long, default_value_t = 32)]
    eval_batch_size: usize,
    /// Where to write the adapter, the PEFT export and summary.json.
    #[arg(long, default_value = "fedsb-out")]
    out: PathBuf,
    /// Also write the merged model (W0 + ΔW) as a Hugging Face folder in OUT/merged.
    #[arg(long)]
    export_merged: bool,
    /// Device: cpu, cuda or cuda:N (CUDA needs a build with --features cuda).
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Serialize)]
struct Summary {
    model: String,
    model_sha256: String,
    task: TaskKind,
    adapter: String,
    rank: usize,
    targets: Vec<String>,
    adapted_layers: usize,
    trainable_params: usize,
    train_examples: usize,
    eval_examples: usize,
    steps: usize,
    train_seconds: f64,
    tokens_per_second: f64,
    first_loss: f64,
    final_train_loss: f64,
    init_seconds: Option<f64>,
    eval_before: Option<EvalReport>,
    eval_after: Option<EvalReport>,
    exact_match_before: Option<ExactMatchReport>,
    exact_match_after: Option<ExactMatchReport>,
    config: TrainConfig,
}

fn default_targets(task: TaskKind) -> &'static str {
    match task {
        TaskKind::CausalLm => "q,k,v,o,gate,up,down",
        TaskKind::Classification => "query,value,attention.output.dense,output.dense",
    }
}

/// Runs `fedsb-client finetune`.
pub fn run(a: FinetuneArgs) -> Result<()> {
    let t_all = Instant::now();
    let device = parse_device(&a.device)?;
    let mut train_ds = Dataset::load_jsonl(&a.train)?;
    if let Some(n) = a.train_limit {
        train_ds = train_ds.take(n);
    }
    let eval_ds = match &a.eval {
        Some(p) => {
            let d = Dataset::load_jsonl(p)?;
            Some(match a.eval_limit {
                Some(n) => d.take(n),
                None => d,
            })
        }
        None => None,
    };
    let num_labels = match (a.num_labels, train_ds.num_labels()) {
        (Some(n), _) => n,
        (None, Some(n)) => n.max(2),
        (None, None) => 2,
    };
    eprintln!("loading {} ...", a.model.display());
    let opts = LoadOptions { num_labels, head_seed: a.seed, tokenizer: None, dtype: a.weights.apply()? };
    let loaded = load_model(&a.model, &device, &opts).with_context(|| format!("loading {}", a.model.display()))?;
    let task = loaded.model.task();
    if task != train_ds.task() {
        bail!("{} is a {task:?} model but {} holds {:?} data", a.model.display(), a.train.display(), train_ds.task());
    }
    let mut model = loaded.model.clone();
    a.weights.apply_recompute(&mut model)?;
    let tokenizer = &loaded.tokenizer;
    let model_sha = loaded.weights_sha256()?;
    eprintln!("model: {:?}, {} linear layers, weights sha256 {}…", task, model.linears().len(), &model_sha[..12]);
    let enc = Encoder::new(tokenizer, task, a.max_len);
    let train_data = enc.encode_all(&train_ds).context("tokenizing the training data")?;
    let eval_data = match &eval_ds {
        Some(d) => Some(enc.encode_all(d).context("tokenizing the evaluation data")?),
        None => None,
    };
    let pad = tokenizer.pad_id();
    let cfg = TrainConfig {
        lr: a.lr,
        epochs: a.epochs,
        max_steps: a.max_steps,
        batch_size: a.batch_size,
        grad_accum: a.grad_accum,
        warmup_ratio: a.warmup_ratio,
        schedule: a.schedule.parse::<ScheduleKind>()?,
        weight_decay: a.weight_decay,
        max_grad_norm: (a.max_grad_norm > 0.0).then_some(a.max_grad_norm),
        seed: a.seed,
    };
    cfg.validate()?;

    // Evaluate the base model (before any adapter).
    let eval_run = |m: &Model, when: &str| -> Result<(Option<EvalReport>, Option<ExactMatchReport>)> {
        let Some(data) = &eval_data else { return Ok((None, None)) };
        let t = Instant::now();
        let r = evaluate(m, data, a.eval_batch_size, pad)?;
        eprintln!(
            "eval {when}: loss {:.4}{} over {} examples ({:.1}s)",
            r.loss,
            r.accuracy.map(|x| format!(", accuracy {:.2}%", 100.0 * x)).unwrap_or_default(),
            r.examples,
            t.elapsed().as_secs_f64()
        );
        let em = if a.exact_match > 0 && task == TaskKind::CausalLm {
            let ds = eval_ds.as_ref().map(|d| d.take(a.exact_match)).unwrap_or_default();
            let p = CountProgress::new(ds.len(), &format!("greedy decoding for exact match ({when})"));
            let r = exact_match(m, &enc, &ds.examples, a.max_new_tokens, &mut |d, n| p.set(d, n))?;
            p.finish();
            eprintln!("exact match {when}: {}/{} = {:.2}%", r.correct, r.total, 100.0 * r.accuracy);
            Some(r)
        } else {
            None
        };
        Ok((Some(r), em))
    };
    let (eval_before, em_before) = eval_run(&model, "before")?;

    // Adapters.
    let kind: Option<AdapterKind> = match a.adapter.as_str() {
        "none" => None,
        s => Some(s.parse()?),
    };
    let targets = parse_targets(a.targets.as_deref().unwrap_or(default_targets(task)));
    let mut adapter = AdapterConfig::new(kind.unwrap_or(AdapterKind::Lora), a.rank, &[]);
    adapter.targets = targets.clone();
    adapter.alpha = a.alpha.unwrap_or(a.rank as f64);
    adapter.seed = a.seed;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let mut init_seconds = None;
    let mut adapted_layers = 0;
    match kind {
        None => {
            if task != TaskKind::Classification {
                bail!("--adapter none trains only a classification head; a causal LM needs an adapter");
            }
            eprintln!("no adapter: training the classification head on the frozen encoder (linear probe)");
        }
        Some(AdapterKind::LoraSb) => {
            let schedule = cfg.schedule_for(train_data.len());
            let icfg = InitConfig {
                samples: a.init_samples.unwrap_or_else(|| InitConfig::default_samples(train_data.len(), a.batch_size)),
                batch_size: a.batch_size,
                eta: a.init_eta.unwrap_or_else(|| schedule.first_lr()),
                oversample: a.svd_oversample,
                power_iters: a.svd_power_iters,
                seed: a.seed,
                grad_memory_mib: a.init_grad_memory,
            };
            eprintln!(
                "LoRA-SB init: gradient over {} samples, η = {:.3e}, rank {} on {}",
                icfg.samples,
                icfg.eta,
                a.rank,
                targets.join(",")
            );
            let t = Instant::now();
            let p = CountProgress::new(model.targeted(&adapter)?.len(), "init (SVD per matrix)");
            let (init, rep) = lora_sb_init(&mut model, &adapter, &train_data, &icfg, pad, &mut |d, n| p.set(d, n))?;
            p.finish();
            init.save(&a.out.join("lora_sb_init.safetensors"))?;
            adapted_layers = model.attach_adapters(&adapter, Some(&init))?;
            init_seconds = Some(t.elapsed().as_secs_f64());
            eprintln!(
                "LoRA-SB init: {} matrices, gradient {:.1}s, SVD {:.1}s, blob sha256 {}…",
                rep.layers,
                rep.gradient_seconds,
                rep.svd_seconds,
                &init.content_hash()?[..12]
            );
        }
        Some(_) => {
            adapted_layers = model.attach_adapters(&adapter, None)?;
        }
    }
    let trainable = model.num_trainable();
    eprintln!(
        "training {} params ({} adapted layers) on {} examples: {} steps of {}×{}",
        trainable,
        adapted_layers,
        train_data.len(),
        cfg.total_steps(train_data.len()),
        a.batch_size,
        a.grad_accum
    );
    let mut prog = StepProgress::new(cfg.total_steps(train_data.len()), "train");
    let summary = train(&model, &train_data, &cfg, pad, &mut |r| prog.step(r))?;
    prog.finish();
    let tps = summary.tokens as f64 / summary.seconds.max(1e-9);
    eprintln!(
        "trained {} steps in {:.1}s ({tps:.0} tokens/s): loss {:.4} → {:.4}",
        summary.steps, summary.seconds, summary.first_loss, summary.final_loss
    );
    let (eval_after, em_after) = eval_run(&model, "after")?;

    // Outputs.
    let adapter_set = model.adapter_tensors()?;
    let mut adapter_set = adapter_set;
    adapter_set.set_metadata("fedsb.kind", a.adapter.as_str());
    adapter_set.set_metadata("fedsb.rank", a.rank.to_string());
    adapter_set.set_metadata("fedsb.base_sha256", model_sha.as_str());
    adapter_set.save(&a.out.join("adapter.safetensors"))?;
    if kind.is_some() {
        export_peft(&model, &adapter, &a.out.join("peft"), &a.model.display().to_string())?;
    }
    if a.export_merged {
        export_merged(&model, tokenizer, &loaded.arch, &a.out.join("merged"))?;
    }
    let s = Summary {
        model: a.model.display().to_string(),
        model_sha256: model_sha,
        task,
        adapter: a.adapter.clone(),
        rank: a.rank,
        targets,
        adapted_layers,
        trainable_params: trainable,
        train_examples: train_data.len(),
        eval_examples: eval_data.as_ref().map_or(0, Vec::len),
        steps: summary.steps,
        train_seconds: summary.seconds,
        tokens_per_second: tps,
        first_loss: summary.first_loss,
        final_train_loss: summary.final_loss,
        init_seconds,
        eval_before,
        eval_after,
        exact_match_before: em_before,
        exact_match_after: em_after,
        config: cfg,
    };
    let json = serde_json::to_string_pretty(&s)?;
    std::fs::write(a.out.join("summary.json"), &json).context("writing summary.json")?;
    print_summary(&s, &a.out, t_all.elapsed().as_secs_f64());
    Ok(())
}

fn print_summary(s: &Summary, out: &Path, total: f64) {
    println!("== fedsb finetune summary ==");
    println!("model            {} ({:?})", s.model, s.task);
    if s.adapted_layers == 0 {
        println!("adapter          none: classification head only ({} trainable params)", s.trainable_params);
    } else {
        println!(
            "adapter          {} r={} on {} ({} layers, {} trainable params)",
            s.adapter,
            s.rank,
            s.targets.join(","),
            s.adapted_layers,
            s.trainable_params
        );
    }
    println!(
        "training         {} steps, {:.1}s, {:.0} tokens/s, loss {:.4} -> {:.4}",
        s.steps, s.train_seconds, s.tokens_per_second, s.first_loss, s.final_train_loss
    );
    if let (Some(b), Some(a)) = (&s.eval_before, &s.eval_after) {
        println!("eval loss        {:.4} -> {:.4} ({} examples)", b.loss, a.loss, a.examples);
        if let (Some(x), Some(y)) = (b.accuracy, a.accuracy) {
            println!("eval accuracy    {:.2}% -> {:.2}%", 100.0 * x, 100.0 * y);
        }
    }
    if let (Some(b), Some(a)) = (&s.exact_match_before, &s.exact_match_after) {
        println!("exact match      {}/{} -> {}/{}", b.correct, b.total, a.correct, a.total);
    }
    println!("outputs          {}", out.display());
    println!("total time       {total:.1}s");
}
