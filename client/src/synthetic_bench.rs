//! `fedsb-client bench --synthetic CONFIG_JSON`: the training step of a model of a published `config.json` with
//! seeded random weights in `--dtype`'s format (`fedsb_common::model::synthetic`) — billion-parameter shapes
//! without their checkpoints. Batches are seeded random token ids (every position's next token is a target for
//! a causal LM; a random class for an encoder). LoRA-SB starts from a seeded random `B`, `A`, `R` unless
//! `--init` asks for the real init (one gradient pass over the first batch, then the SVDs), which is timed.
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Tensor;
use fedsb_common::adapter::init::{InitConfig, lora_sb_init};
use fedsb_common::adapter::{AdapterConfig, AdapterKind};
use fedsb_common::benchstats::peak_rss_mib;
use fedsb_common::frozen::WeightDtype;
use fedsb_common::model::synthetic::synthetic_model;
use fedsb_common::model::{ArchConfig, Model};
use fedsb_common::tensors::TensorSet;
use fedsb_common::train::data::{Batch, Encoded, IGNORE, Target};
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::bench::{BenchArgs, Shape, emit, init_examples, time_steps};
use crate::device::parse_device;

/// Runs the synthetic bench.
pub fn run(a: &BenchArgs, config: &Path, dtype: WeightDtype) -> Result<()> {
    let text = std::fs::read_to_string(config).with_context(|| format!("reading {}", config.display()))?;
    let arch = ArchConfig::from_hf_json(&text).with_context(|| format!("{}", config.display()))?;
    let device = parse_device(&a.device)?;
    let name = config.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "synthetic".into());
    if a.batch == 0 || a.seq_len < 2 {
        anyhow::bail!("--batch must be at least 1 and --seq-len at least 2");
    }
    let default_targets: &[&str] = match arch {
        ArchConfig::Llama(_) => &["q", "k", "v", "o", "gate", "up", "down"],
        ArchConfig::Bert(_) => &["query", "value", "attention.output.dense", "output.dense"],
    };
    let targets: Vec<String> = match &a.targets {
        Some(t) => t.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect(),
        None => default_targets.iter().map(|s| s.to_string()).collect(),
    };
    let shape = Shape { name: name.clone(), batch: a.batch, seq: a.seq_len, rank: a.rank, targets };
    if !a.json {
        eprintln!("building {name} with seeded random weights ({dtype}) ...");
    }
    let t = Instant::now();
    let base = synthetic_model(&arch, dtype, 42, 2, &device)?;
    let wb = base.weight_bytes();
    if !a.json {
        eprintln!("  {} params, frozen weights {} in {:.1} s", params(&base), wb.describe(), t.elapsed().as_secs_f64());
    }
    let batches = random_batches(&base, &shape, 3)?;
    for kind in a.adapters.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let kind: AdapterKind = kind.parse()?;
        let mut model = base.clone();
        let recompute = a.weights.apply_recompute(&mut model)?;
        if !a.json {
            eprintln!("  recompute blocks in the backward: {}", if recompute { "on" } else { "off" });
        }
        let adapter = AdapterConfig::new(kind, shape.rank, &shape.target_refs());
        let init = match kind {
            AdapterKind::LoraSb if a.init => Some(timed_init(a, &shape, &mut model, &adapter, &batches[0])?),
            AdapterKind::LoraSb => Some(random_lora_sb(&model, &adapter)?),
            _ => None,
        };
        model.attach_adapters(&adapter, init.as_ref())?;
        drop(init);
        let med = time_steps(a, &shape, &model, &batches, kind)?;
        if a.dp {
            crate::bench::bench_dp_step(a, &shape, &model, &batches, kind, med)?;
        }
    }
    Ok(())
}

fn params(m: &Model) -> String {
    let n: usize = m.linears().iter().map(|l| l.dims().0 * l.dims().1).sum();
    format!("{:.2} B linear", n as f64 / 1e9)
}

/// `n` batches of seeded random token ids of the model's vocabulary.
fn random_batches(model: &Model, shape: &Shape, n: usize) -> Result<Vec<Batch>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let (vocab, causal) = match model {
        Model::CausalLm(m) => (m.config().vocab_size, true),
        Model::Classifier(c) => (c.encoder.config().vocab_size, false),
    };
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let rows: Vec<Encoded> = (0..shape.batch)
            .map(|_| {
                let ids: Vec<u32> = (0..shape.seq).map(|_| rng.random_range(1..vocab as u32)).collect();
                let target = if causal {
                    Target::NextTokens(ids.iter().skip(1).map(|&t| t as i64).chain([IGNORE]).collect())
                } else {
                    Target::Class(rng.random_range(0..2))
                };
                Encoded { type_ids: vec![0; ids.len()], ids, target }
            })
            .collect();
        out.push(Batch::collate(&rows.iter().collect::<Vec<_>>(), 0, model.device())?);
    }
    Ok(out)
}

/// A seeded random LoRA-SB `A`, `B`, `R` for every targeted layer (the step's cost does not depend on them).
fn random_lora_sb(model: &Model, adapter: &AdapterConfig) -> Result<TensorSet> {
    let mut set = TensorSet::new();
    let r = adapter.rank;
    let dev = model.device();
    for (i, l) in model.targeted(adapter)?.into_iter().enumerate() {
        let (n, k) = l.dims();
        let randn = |rows: usize, cols: usize, std: f32, seed: u64| -> Result<Tensor> {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let v: Vec<f32> = (0..rows * cols).map(|_| (rng.random::<f32>() - 0.5) * 2.0 * std).collect();
            Ok(Tensor::from_vec(v, (rows, cols), dev)?)
        };
        let s = 3 * i as u64;
        set.insert(format!("{}.lora_A.weight", l.name()), randn(r, k, 1.0 / (k as f32).sqrt(), s)?);
        set.insert(format!("{}.lora_B.weight", l.name()), randn(n, r, 1.0 / (r as f32).sqrt(), s + 1)?);
        set.insert(format!("{}.lora_R.weight", l.name()), randn(r, r, 1e-3, s + 2)?);
    }
    Ok(set)
}

/// The real LoRA-SB init on `batch`, timed and reported like the real models' (`what: lora_sb_init`).
fn timed_init(
    a: &BenchArgs,
    shape: &Shape,
    model: &mut Model,
    adapter: &AdapterConfig,
    batch: &Batch,
) -> Result<TensorSet> {
    let data = init_examples(shape, batch)?;
    let icfg = InitConfig {
        samples: shape.batch,
        batch_size: shape.batch,
        eta: 1e-4,
        oversample: 8,
        power_iters: 6,
        seed: 42,
        grad_memory_mib: a.init_grad_memory,
    };
    fedsb_common::benchstats::reset_peak_rss();
    let t = Instant::now();
    let (init, rep) = lora_sb_init(model, adapter, &data, &icfg, 0, &mut |done, total| {
        if !a.json && (done % 16 == 0 || done == total) {
            eprintln!("  init: {done}/{total} matrices");
        }
    })?;
    let mut per: Vec<f64> = rep.per_layer.iter().map(|x| x.3).collect();
    let max = per.iter().cloned().fold(0.0, f64::max);
    let med = fedsb_common::benchstats::median(&mut per);
    emit(
        a.json,
        json!({
            "model": shape.name, "what": "lora_sb_init", "adapter": "lora-sb", "rank": shape.rank,
            "matrices": rep.layers, "samples": rep.samples, "gradient_ms": rep.gradient_seconds * 1e3,
            "gradient_passes": rep.gradient_passes, "svd_ms_total": rep.svd_seconds * 1e3,
            "svd_ms_per_matrix_median": med, "svd_ms_per_matrix_max": max,
            "init_ms_total": t.elapsed().as_secs_f64() * 1e3, "gemm": fedsb_common::mkl::backend().name(),
            "device": a.device, "peak_rss_mib": peak_rss_mib(), "weight_bytes": model.weight_bytes().total,
        }),
    );
    Ok(init)
}
