//! `fedsb-client bench`: the training step (forward + backward + AdamW) and the LoRA-SB init, on the
//! real small models at the fixed shapes of the PyTorch peer (`../shared/bench/torchref/`):
//! - MiniLM (all-MiniLM-L6-v2 + 2-class head): batch 32 × 64 tokens of Rotten Tomatoes sentences (padded
//!   to 64), r = 16 on query, value, attention.output.dense, output.dense (24 matrices);
//! - SmolLM2-135M: batch 4 × 128 tokens of packed Rotten Tomatoes text, causal-LM loss on every position,
//!   r = 32 on all seven projections (210 matrices).
//!
//! With `--dtype` the frozen weights are converted (bf16, q8_0, ...). With `--synthetic CONFIG_JSON` the model is a
//! published `config.json` with seeded random weights in that format (`fedsb_common::model::synthetic`), at
//! `--batch` × `--seq-len` (default 1 × 256), LoRA-SB `--rank` (32) on all seven projections: speed and memory of
//! billion-parameter models without their checkpoints.
//!
//! Each model runs in its own process so that its peak RSS is its own.
use fedsb_common::benchstats::{median, peak_rss_mib, reset_peak_rss};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use fedsb_common::adapter::init::{InitConfig, lora_sb_init};
use fedsb_common::adapter::{AdapterConfig, AdapterKind};
use fedsb_common::model::{LoadOptions, Model, load_model};
use fedsb_common::train::data::{Batch, Encoded, IGNORE, Target};
use fedsb_common::train::{Dataset, Encoder, LrSchedule, ScheduleKind, Trainer};
use serde_json::json;

use crate::device::parse_device;

/// Arguments of `fedsb-client bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Print one JSON object per line (for scripts) instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
    /// Models to measure: minilm, smollm (comma-separated).
    #[arg(long, default_value = "minilm,smollm")]
    pub(crate) models: String,
    /// Adapters to measure: lora-sb, lora, ffa-lora (comma-separated).
    #[arg(long, default_value = "lora-sb")]
    pub(crate) adapters: String,
    /// Timed steps per measurement (the median is reported).
    #[arg(long, default_value_t = 10)]
    pub(crate) steps: usize,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 2)]
    pub(crate) warmup: usize,
    /// Asset folder of scripts/fetch-assets.sh (default $FEDSB_ASSETS or ~/.cache/fedsb/assets).
    #[arg(long)]
    pub(crate) assets: Option<PathBuf>,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub(crate) device: String,
    #[command(flatten)]
    pub(crate) weights: crate::device::WeightArgs,
    /// Instead of the real small models: a model of this config.json (a Llama-family or BERT architecture) with
    /// seeded random weights in --dtype's format (auto: f32).
    #[arg(long)]
    pub(crate) synthetic: Option<PathBuf>,
    /// Sequences per step of --synthetic.
    #[arg(long, default_value_t = 1)]
    pub(crate) batch: usize,
    /// Tokens per sequence of --synthetic.
    #[arg(long, default_value_t = 256)]
    pub(crate) seq_len: usize,
    /// Adapter rank of --synthetic.
    #[arg(long, default_value_t = 32)]
    pub(crate) rank: usize,
    /// Target modules of --synthetic (default: all seven projections of a Llama model, query/value/
    /// attention.output.dense/output.dense of BERT).
    #[arg(long)]
    pub(crate) targets: Option<String>,
    /// --synthetic: time the real LoRA-SB init (gradient pass over one batch, SVDs) instead of starting from a
    /// random one (it is what a coordinator computes once; its memory is bounded by --init-grad-memory).
    #[arg(long)]
    pub(crate) init: bool,
    /// Memory for the init's full-weight gradients, MiB (layers are taken in groups that fit).
    #[arg(long, default_value_t = fedsb_common::adapter::init::DEFAULT_GRAD_MEMORY_MIB)]
    pub(crate) init_grad_memory: usize,
    /// Also measure the DP-SGD step (per-sample gradients, clipping to C = 1, Gaussian noise σ = 1 from the
    /// OS-seeded CSPRNG) on the same batches, and its ratio to the plain step.
    #[arg(long)]
    pub(crate) dp: bool,
    /// Also print where the plain (and, with --dp, the DP) step's time goes: each fused kernel's forward and
    /// backward, the GEMMs inside them, and what candle's own ops and autograd bookkeeping take (per step,
    /// averaged over the timed steps).
    #[arg(long)]
    pub(crate) profile: bool,
    /// Instead of the model steps: each fused kernel alone, forward and forward + backward, against the
    /// composite candle ops it replaces (median of --steps runs).
    #[arg(long)]
    pub(crate) kernels: bool,
    /// Instead of the model steps: the LoRA-SB init's randomized SVD at --svd-shapes and --svd-ranks, time and
    /// accuracy (as the PyTorch peer's bench_svd.py).
    #[arg(long)]
    pub(crate) svd: bool,
    /// Matrix shapes of --svd (ROWSxCOLS, comma-separated).
    #[arg(long, default_value = "576x576,1536x576,3072x3072,8192x3072")]
    pub(crate) svd_shapes: String,
    /// Ranks of --svd (comma-separated).
    #[arg(long, default_value = "32,200")]
    pub(crate) svd_ranks: String,
    /// Power iterations of --svd (the LoRA-SB init's default: 6).
    #[arg(long, default_value_t = 6)]
    pub(crate) svd_power_iters: usize,
    /// Oversampling of --svd (the LoRA-SB init's default: 8).
    #[arg(long, default_value_t = 8)]
    pub(crate) svd_oversample: usize,
    /// Run the models in this process (used internally).
    #[arg(long, hide = true)]
    pub(crate) in_process: bool,
}

fn assets_root(a: &BenchArgs) -> PathBuf {
    a.assets.clone().unwrap_or_else(fedsb_common::assets::default_assets_dir)
}

/// What one bench measures: the model's name in the output, batch × sequence length, adapter rank and targets.
pub(crate) struct Shape {
    pub name: String,
    pub batch: usize,
    pub seq: usize,
    pub rank: usize,
    pub targets: Vec<String>,
}

impl Shape {
    fn new(name: &str, batch: usize, seq: usize, rank: usize, targets: &[&str]) -> Self {
        Self { name: name.into(), batch, seq, rank, targets: targets.iter().map(|t| t.to_string()).collect() }
    }

    /// The targets as `&str`s.
    pub fn target_refs(&self) -> Vec<&str> {
        self.targets.iter().map(String::as_str).collect()
    }
}

fn minilm() -> Shape {
    Shape::new("minilm", 32, 64, 16, &["query", "value", "attention.output.dense", "output.dense"])
}

fn smollm() -> Shape {
    Shape::new("smollm", 4, 128, 32, &["q", "k", "v", "o", "gate", "up", "down"])
}

/// Runs `fedsb-client bench`.
pub fn run(a: BenchArgs) -> Result<()> {
    let dtype = a.weights.apply()?;
    if !a.in_process && !a.json && a.device == "cpu" {
        println!("GEMM backend: {}", fedsb_common::mkl::describe());
        println!(
            "frozen weights: {dtype}; products with compact weights: {} (CPU bf16 units: {})",
            fedsb_common::kernels::compact_engine_name(),
            fedsb_common::frozen::bf16_units().unwrap_or("none")
        );
    }
    if let Some(cfg) = &a.synthetic {
        return crate::synthetic_bench::run(&a, cfg, dtype);
    }
    if a.kernels || a.svd {
        if a.kernels {
            crate::kernel_bench::run(a.json, a.steps)?;
        }
        if a.svd {
            let shapes = crate::svd_bench::parse_shapes(&a.svd_shapes)?;
            let ranks: Vec<usize> = a
                .svd_ranks
                .split(',')
                .map(|r| r.trim().parse::<usize>().with_context(|| format!("rank `{r}`")))
                .collect::<Result<_>>()?;
            crate::svd_bench::run(a.json, &shapes, &ranks, a.steps, (a.svd_oversample, a.svd_power_iters))?;
        }
        return Ok(());
    }
    let models: Vec<String> = a.models.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
    for m in &models {
        if m != "minilm" && m != "smollm" {
            bail!("unknown bench model `{m}` (minilm, smollm)");
        }
    }
    if models.len() > 1 && !a.in_process {
        // One process per model, so each peak RSS is the model's own.
        let exe = std::env::current_exe().context("locating fedsb-client")?;
        for m in &models {
            let mut cmd = std::process::Command::new(&exe);
            cmd.args(["bench", "--in-process", "--models", m, "--adapters", &a.adapters]);
            cmd.args(["--steps", &a.steps.to_string(), "--warmup", &a.warmup.to_string(), "--device", &a.device]);
            cmd.args(["--dtype", &a.weights.dtype, "--compute-dtype", &a.weights.compute_dtype]);
            cmd.args(["--recompute", &a.weights.recompute]);
            cmd.arg("--assets").arg(assets_root(&a));
            if a.json {
                cmd.arg("--json");
            }
            if a.dp {
                cmd.arg("--dp");
            }
            if a.profile {
                cmd.arg("--profile");
            }
            let status = cmd.status().with_context(|| format!("running the {m} bench"))?;
            if !status.success() {
                bail!("the {m} bench failed ({status})");
            }
        }
        return Ok(());
    }
    let root = assets_root(&a);
    if !root.join("models").is_dir() {
        bail!("no assets in {} — run scripts/fetch-assets.sh first", root.display());
    }
    for m in &models {
        let shape = if m == "minilm" { &minilm() } else { &smollm() };
        bench_model(&a, &root, shape, dtype)?;
    }
    Ok(())
}

fn bench_batches(shape: &Shape, model: &Model, enc: &Encoder, root: &std::path::Path, n: usize) -> Result<Vec<Batch>> {
    let rt = Dataset::load_jsonl(&root.join("data/rotten-tomatoes/train.jsonl"))?;
    let pad = enc.tokenizer.pad_id();
    let dev = model.device();
    let mut out = Vec::new();
    if shape.name == "minilm" {
        let enc64 = Encoder::new(enc.tokenizer, enc.task, shape.seq);
        let data = enc64.encode_all(&rt.take(n * shape.batch))?;
        for chunk in data.chunks(shape.batch) {
            let items: Vec<&Encoded> = chunk.iter().collect();
            out.push(Batch::collate_to(&items, pad, shape.seq, dev)?);
        }
    } else {
        // Packed text: every row is exactly `seq` real tokens; the loss covers every next token.
        let mut stream = Vec::new();
        for ex in &rt.examples {
            if let fedsb_common::train::Example::Classification { text, .. } = ex {
                stream.extend(enc.tokenizer.encode(&format!("{text}\n"), false)?);
            }
            if stream.len() >= n * shape.batch * shape.seq {
                break;
            }
        }
        for b in 0..n {
            let rows: Vec<Encoded> = (0..shape.batch)
                .map(|r| {
                    let start = (b * shape.batch + r) * shape.seq;
                    let ids = stream[start..start + shape.seq].to_vec();
                    let labels = ids.iter().skip(1).map(|&t| t as i64).chain([IGNORE]).collect();
                    Encoded { type_ids: vec![0; ids.len()], ids, target: Target::NextTokens(labels) }
                })
                .collect();
            out.push(Batch::collate(&rows.iter().collect::<Vec<_>>(), pad, dev)?);
        }
    }
    Ok(out)
}

fn bench_model(
    a: &BenchArgs,
    root: &std::path::Path,
    shape: &Shape,
    dtype: fedsb_common::frozen::WeightDtype,
) -> Result<()> {
    let device = parse_device(&a.device)?;
    let path = if shape.name == "minilm" {
        root.join("models/all-minilm-l6-v2")
    } else {
        root.join("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
    };
    let loaded = load_model(&path, &device, &LoadOptions { dtype, ..LoadOptions::default() })?;
    let enc = Encoder::new(&loaded.tokenizer, loaded.model.task(), shape.seq);
    let batches = bench_batches(shape, &loaded.model, &enc, root, 6)?;
    let threads = candle_core::utils::get_num_threads();
    for kind in a.adapters.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let kind: AdapterKind = kind.parse()?;
        let mut model = loaded.model.clone();
        a.weights.apply_recompute(&mut model)?;
        let adapter = AdapterConfig::new(kind, shape.rank, &shape.target_refs());
        if kind == AdapterKind::LoraSb {
            // The init on one batch of the same data, timed: gradient estimate, then one SVD per matrix.
            let init_data: Vec<Encoded> = init_examples(shape, &batches[0])?;
            let icfg = InitConfig {
                samples: shape.batch,
                batch_size: shape.batch,
                eta: 1e-4,
                oversample: 8,
                power_iters: 6,
                seed: 42,
                grad_memory_mib: fedsb_common::adapter::init::DEFAULT_GRAD_MEMORY_MIB,
            };
            let t = Instant::now();
            let (init, rep) =
                lora_sb_init(&mut model, &adapter, &init_data, &icfg, enc.tokenizer.pad_id(), &mut |_, _| {})?;
            let total_ms = t.elapsed().as_secs_f64() * 1e3;
            let mut per: Vec<f64> = rep.per_layer.iter().map(|x| x.3).collect();
            let max = per.iter().cloned().fold(0.0, f64::max);
            let med = median(&mut per);
            emit(
                a.json,
                json!({
                    "model": shape.name, "what": "lora_sb_init", "adapter": kind.as_str(), "rank": shape.rank,
                    "matrices": rep.layers, "samples": rep.samples, "gradient_ms": rep.gradient_seconds * 1e3,
                    "svd_ms_total": rep.svd_seconds * 1e3, "svd_ms_per_matrix_median": med, "svd_ms_per_matrix_max": max,
                    "init_ms_total": total_ms, "threads": threads, "gemm": fedsb_common::mkl::backend().name(), "device": a.device, "peak_rss_mib": peak_rss_mib(),
                }),
            );
            model.attach_adapters(&adapter, Some(&init))?;
        } else {
            model.attach_adapters(&adapter, None)?;
        }
        let med = time_steps(a, shape, &model, &batches, kind)?;
        if a.dp {
            bench_dp_step(a, shape, &model, &batches, kind, med)?;
        }
    }
    Ok(())
}

/// Times `a.steps` training steps (after `a.warmup`) of `model` on `batches` and prints them (with `--profile`, where
/// the time goes); returns the median ms per step. Peak RSS is that of the steps alone (reset first: the init's
/// gradients would otherwise dominate it).
pub(crate) fn time_steps(
    a: &BenchArgs,
    shape: &Shape,
    model: &Model,
    batches: &[Batch],
    kind: AdapterKind,
) -> Result<f64> {
    let threads = candle_core::utils::get_num_threads();
    reset_peak_rss();
    let total = a.warmup + a.steps;
    let schedule = LrSchedule::new(1e-4, 0.0, total, ScheduleKind::Constant);
    let mut trainer = Trainer::new(model, schedule, 0.0, Some(1.0))?;
    let mut times = Vec::with_capacity(a.steps);
    let (mut first, mut last) = (f64::NAN, f64::NAN);
    for i in 0..total {
        let b = &batches[i % batches.len()];
        if a.profile && i == a.warmup {
            fedsb_common::profile::take();
            fedsb_common::profile::set_enabled(true);
        }
        let t = Instant::now();
        let o = trainer.step(std::slice::from_ref(b))?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        if i == 0 {
            first = o.loss;
        }
        last = o.loss;
        if i >= a.warmup {
            times.push(ms);
        }
        if !a.json && total > 3 && a.synthetic.is_some() {
            eprintln!("  step {}/{total}: {ms:.0} ms, loss {:.4}", i + 1, o.loss);
        }
    }
    let profile = a.profile.then(|| finish_profile(&times));
    let min = times.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = times.iter().cloned().fold(0.0, f64::max);
    let med = median(&mut times);
    let adapted = model.linears().iter().filter(|l| l.adapter().is_some()).count();
    let wb = model.weight_bytes();
    emit(
        a.json,
        json!({
            "model": shape.name, "what": "train_step", "adapter": kind.as_str(), "batch": shape.batch,
            "seq_len": shape.seq, "rank": shape.rank, "adapted_matrices": adapted,
            "trainable_params": model.num_trainable(), "steps": a.steps, "warmup": a.warmup,
            "ms_per_step_median": med, "ms_per_step_min": min, "ms_per_step_max": max,
            "tokens_per_s": (shape.batch * shape.seq) as f64 / (med / 1e3),
            "loss_first": first, "loss_last": last, "threads": threads, "gemm": fedsb_common::mkl::backend().name(),
            "device": a.device, "peak_rss_mib": peak_rss_mib(),
            "weight_bytes": wb.total, "weight_formats": wb.by_format,
            "compact_products": fedsb_common::kernels::compact_engine_name(),
            "compute_dtype": a.weights.compute_dtype, "recompute": model_recomputes(model),
        }),
    );
    if let Some(p) = profile {
        emit_profile(a.json, shape, kind, "train_step", p);
    }
    Ok(med)
}

fn model_recomputes(m: &Model) -> bool {
    match m {
        Model::CausalLm(l) => l.recomputes(),
        Model::Classifier(_) => false,
    }
}

/// The DP-SGD step on the same fixed batches (the expected batch is the bench batch; no Poisson draw, so the
/// work per step equals the plain step's): per-sample gradients, clipping, noise, AdamW. It continues from the
/// plain steps' trained tensors (only the time is measured).
pub(crate) fn bench_dp_step(
    a: &BenchArgs,
    shape: &Shape,
    model: &Model,
    batches: &[Batch],
    kind: AdapterKind,
    plain_ms: f64,
) -> Result<()> {
    use fedsb_common::dp::sgd::{DpSgdConfig, dp_step};
    let threads = candle_core::utils::get_num_threads();
    reset_peak_rss();
    let total = a.warmup + a.steps;
    let mut trainer = Trainer::new(model, LrSchedule::new(1e-4, 0.0, total, ScheduleKind::Constant), 0.0, None)?;
    let dp = DpSgdConfig {
        max_grad_norm: 1.0,
        noise_multiplier: 1.0,
        expected_batch_size: shape.batch,
        physical_batch_size: shape.batch,
    };
    let mut rng = fedsb_common::dp::NoiseRng::from_os()?;
    let mut times = Vec::with_capacity(a.steps);
    let mut clipped = 0usize;
    for i in 0..total {
        let b = &batches[i % batches.len()];
        if a.profile && i == a.warmup {
            fedsb_common::profile::take();
            fedsb_common::profile::set_enabled(true);
        }
        let t = Instant::now();
        let (_, st) = dp_step(&mut trainer, std::slice::from_ref(b), &dp, &mut rng)?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        if i >= a.warmup {
            times.push(ms);
            clipped += st.clipped;
        }
    }
    let profile = a.profile.then(|| finish_profile(&times));
    let min = times.iter().cloned().fold(f64::INFINITY, f64::min);
    let med = median(&mut times);
    emit(
        a.json,
        json!({
            "model": shape.name, "what": "train_step_dp", "adapter": kind.as_str(), "batch": shape.batch,
            "seq_len": shape.seq, "rank": shape.rank, "steps": a.steps, "warmup": a.warmup,
            "ms_per_step_median": med, "ms_per_step_min": min, "dp_over_plain": med / plain_ms,
            "plain_ms_per_step_median": plain_ms,
            "clipped_fraction": clipped as f64 / (a.steps * shape.batch) as f64,
            "tokens_per_s": (shape.batch * shape.seq) as f64 / (med / 1e3), "threads": threads, "gemm": fedsb_common::mkl::backend().name(),
            "device": a.device, "peak_rss_mib": peak_rss_mib(),
        }),
    );
    if let Some(p) = profile {
        emit_profile(a.json, shape, kind, "train_step_dp", p);
    }
    Ok(())
}

/// The recorded spans of the timed steps, per step: stops recording.
fn finish_profile(times: &[f64]) -> StepProfile {
    use fedsb_common::profile;
    profile::set_enabled(false);
    let steps = times.len().max(1) as f64;
    let spans = profile::take();
    let mut rows: Vec<ProfileRow> = Vec::new();
    let phases: Vec<_> = spans.iter().filter(|s| s.name.starts_with(profile::PHASE_PREFIX)).collect();
    let mut gemm_ms = 0.0;
    for ph in &phases {
        let phase_ms = ph.seconds * 1e3 / steps;
        let label = ph.name.trim_start_matches(profile::PHASE_PREFIX);
        rows.push(ProfileRow { phase: label.into(), op: String::new(), ms: phase_ms, calls: ph.calls as f64 / steps });
        let mut inside = 0.0;
        for s in spans.iter().filter(|s| s.phase == ph.name && !s.name.starts_with(profile::PHASE_PREFIX)) {
            let ms = s.seconds * 1e3 / steps;
            if s.name == "gemm" {
                gemm_ms += ms;
                rows.push(ProfileRow {
                    phase: label.into(),
                    op: "(of which GEMM in kernels)".into(),
                    ms,
                    calls: s.calls as f64 / steps,
                });
                continue;
            }
            inside += ms;
            let op = s.name.trim_start_matches("fedsb-").to_string();
            rows.push(ProfileRow { phase: label.into(), op, ms, calls: s.calls as f64 / steps });
        }
        let other =
            if label == "backward" { "candle ops + autograd bookkeeping" } else { "candle ops (outside the kernels)" };
        rows.push(ProfileRow { phase: label.into(), op: other.into(), ms: (phase_ms - inside).max(0.0), calls: 0.0 });
    }
    let step_ms = times.iter().sum::<f64>() / steps;
    let phased: f64 = phases.iter().map(|p| p.seconds * 1e3 / steps).sum();
    rows.push(ProfileRow {
        phase: "rest".into(),
        op: "outside the phases".into(),
        ms: (step_ms - phased).max(0.0),
        calls: 0.0,
    });
    StepProfile { step_ms, gemm_ms, rows }
}

/// Where a step's time goes (see [`fedsb_common::profile`]).
struct StepProfile {
    step_ms: f64,
    gemm_ms: f64,
    rows: Vec<ProfileRow>,
}

/// One line of a [`StepProfile`]: a phase total (empty `op`) or one op inside it.
struct ProfileRow {
    phase: String,
    op: String,
    ms: f64,
    calls: f64,
}

fn emit_profile(json: bool, shape: &Shape, kind: AdapterKind, what: &str, p: StepProfile) {
    if json {
        let rows: Vec<_> = p
            .rows
            .iter()
            .map(|r| json!({"phase": r.phase, "op": r.op, "ms_per_step": r.ms, "calls_per_step": r.calls}))
            .collect();
        println!(
            "{}",
            json!({"model": shape.name, "what": format!("{what}_profile"), "adapter": kind.as_str(),
                   "ms_per_step_mean": p.step_ms, "gemm_ms_per_step": p.gemm_ms, "rows": rows})
        );
        return;
    }
    println!(
        "{} {} {what}: where the time goes (mean of the timed steps: {:.1} ms/step; GEMM inside the kernels {:.1} ms = {:.0}%)",
        shape.name,
        kind.as_str(),
        p.step_ms,
        p.gemm_ms,
        100.0 * p.gemm_ms / p.step_ms
    );
    println!("  {:<12} {:<40} {:>10} {:>8} {:>10}", "phase", "op", "ms/step", "share", "calls/step");
    for r in &p.rows {
        let calls = if r.calls > 0.0 { format!("{:.0}", r.calls) } else { String::new() };
        let op = if r.op.is_empty() { "(total)" } else { &r.op };
        println!("  {:<12} {:<40} {:>10.1} {:>7.1}% {:>10}", r.phase, op, r.ms, 100.0 * r.ms / p.step_ms, calls);
    }
}

/// The examples of one batch, back as [`Encoded`] (for the timed init on the bench's own data).
pub(crate) fn init_examples(shape: &Shape, b: &Batch) -> Result<Vec<Encoded>> {
    let ids = b.ids.to_vec2::<u32>()?;
    let mask = b.mask.to_vec2::<u32>()?;
    let mut out = Vec::new();
    for (i, row) in ids.iter().enumerate() {
        let n = mask[i].iter().filter(|m| **m == 1).count().max(1);
        let ids = row[..n].to_vec();
        let target = match &b.target {
            fedsb_common::train::data::BatchTarget::Classes(c) => Target::Class(c.to_vec1::<u32>()?[i]),
            fedsb_common::train::data::BatchTarget::NextTokens(l) => Target::NextTokens(l[i][..n].to_vec()),
        };
        out.push(Encoded { type_ids: vec![0; ids.len()], ids, target });
    }
    debug_assert_eq!(out.len(), shape.batch);
    Ok(out)
}

pub(crate) fn emit(json: bool, v: serde_json::Value) {
    if json {
        println!("{v}");
        return;
    }
    let g = |k: &str| v.get(k).cloned().unwrap_or(serde_json::Value::Null);
    let f = |k: &str| g(k).as_f64().unwrap_or(f64::NAN);
    if g("what") == "lora_sb_init" {
        println!(
            "{:<7} LoRA-SB init r={:<3} {:>3} matrices: gradient {:>8.1} ms, SVD {:>8.1} ms (median {:.2} ms/matrix), peak RSS {:.0} MiB",
            g("model").as_str().unwrap_or(""),
            g("rank"),
            g("matrices"),
            f("gradient_ms"),
            f("svd_ms_total"),
            f("svd_ms_per_matrix_median"),
            f("peak_rss_mib")
        );
    } else if g("what") == "train_step_dp" {
        println!(
            "{:<7} {:<8} DP-SGD step {}x{} r={:<3}: median {:>8.1} ms (min {:.1}) = {:.3}x the plain step, peak RSS {:.0} MiB",
            g("model").as_str().unwrap_or(""),
            g("adapter").as_str().unwrap_or(""),
            g("batch"),
            g("seq_len"),
            g("rank"),
            f("ms_per_step_median"),
            f("ms_per_step_min"),
            f("dp_over_plain"),
            f("peak_rss_mib")
        );
    } else {
        let formats: Vec<String> =
            g("weight_formats").as_object().map(|m| m.keys().cloned().collect()).unwrap_or_default();
        println!(
            "{:<7} {:<8} step {}x{} r={:<3}: median {:>8.1} ms (min {:.1}), {:>7.0} tokens/s, peak RSS {:.0} MiB; \
             frozen weights {} ({}), peak RSS = {:.2}x the frozen weights",
            g("model").as_str().unwrap_or(""),
            g("adapter").as_str().unwrap_or(""),
            g("batch"),
            g("seq_len"),
            g("rank"),
            f("ms_per_step_median"),
            f("ms_per_step_min"),
            f("tokens_per_s"),
            f("peak_rss_mib"),
            fedsb_common::comm::human_bytes(f("weight_bytes") as u64),
            formats.join("+"),
            f("peak_rss_mib") * 1048576.0 / f("weight_bytes"),
        );
    }
}
