//! Setting a run up from its config: the base model loaded and checked, the adapter init computed (LoRA-SB on
//! the coordinator's init data, or LoRA's seeded factors) and written as the init blob, the run recorded, the
//! starting global evaluated, and the coordinator assembled — the starting global, the round engine, the
//! blobs to serve and, on `--resume`, the committed rounds' folds replayed. A synthetic run (no model, for the
//! load benchmark and tests) takes the same last step, on any [`RunStore`].
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result, anyhow, bail};
use candle_core::{Device, Tensor};
use fedsb_common::TensorSet;
use fedsb_common::adapter::init::{InitConfig, lora_sb_init};
use fedsb_common::adapter::{AdapterConfig, AdapterKind};
use fedsb_common::aggregate::product::base_deltas;
use fedsb_common::aggregate::{Weighting, lora_factors, make_aggregator};
use fedsb_common::model::{LoadOptions, Model, TaskKind, load_model};
use fedsb_common::spec::ClientSpec;
use fedsb_common::train::eval::evaluate;
use fedsb_common::train::{Dataset, Encoder, LrSchedule};
use fedsb_common::wire::{WireDtype, encode_blob};
use tokio::sync::Notify;

use super::eval::{Evaluator, describe_eval};
use super::traffic::Traffic;
use super::{BaseFold, Coordinator, ServeOptions, Served, ServedBlob, lock, now_ms};
use crate::config::RunConfig;
use crate::round::{RoundEngine, RoundPolicy};
use crate::store::{RoundRecord, RunRecord, RunStore, Store};

/// The metrics file of a run, in its state folder: one JSON line per closed round attempt.
const METRICS_FILE: &str = "metrics.jsonl";

/// The adapter of a run: the method's kind, `[adapter]`'s rank, targets (default: the task's usual modules)
/// and alpha (default: the rank), the run's seed.
fn adapter_config(cfg: &RunConfig, task: TaskKind) -> Result<AdapterConfig> {
    let default: &[&str] = match task {
        TaskKind::CausalLm => &["q", "k", "v", "o", "gate", "up", "down"],
        TaskKind::Classification => &["query", "value", "attention.output.dense", "output.dense"],
    };
    let mut a = AdapterConfig::new(cfg.method.adapter_kind(), cfg.adapter.rank, default);
    if let Some(t) = &cfg.adapter.targets {
        a.targets = t.clone();
    }
    a.alpha = cfg.adapter.alpha.unwrap_or(cfg.adapter.rank as f64);
    a.seed = cfg.seed;
    Ok(a)
}

/// Records a new run of `spec` (status "running") whose init blob is `init_sha256`.
fn create_run(store: &dyn RunStore, spec: &ClientSpec, init_sha256: String) -> Result<RunRecord> {
    let run = RunRecord {
        run_id: spec.run_id.clone(),
        spec_json: serde_json::to_string(spec)?,
        init_sha256,
        created_unix_ms: now_ms(),
        status: "running".into(),
        message: String::new(),
    };
    store.create_run(&run)?;
    Ok(run)
}

/// Where a run starts: its init tensors, the frozen hash, the starting global (the round-0 one or, on resume,
/// the last committed one) and the evaluator.
struct RunStart {
    /// The init blob's tensors (frozen factors and starting trainables).
    init: TensorSet,
    /// Values of one client update (the analytic minimum per client and direction).
    update_values: usize,
    /// sha256 of the frozen adapter tensors.
    frozen_sha256: String,
    /// The round-0 global.
    global0: TensorSet,
    /// Rounds already committed (resume).
    completed: u64,
    /// The last committed global's blob (resume), else None: the round-0 global.
    global_sha: Option<String>,
    /// The evaluator, when the config asks for evaluation.
    evaluator: Option<Mutex<Evaluator>>,
}

impl Coordinator {
    /// Sets up a run from `cfg`: a fresh one (computing the LoRA-SB init on the coordinator's init data), or
    /// with `resume` the latest run in the state folder, from its last committed round.
    pub fn prepare(cfg: &RunConfig, resume: bool, opts: ServeOptions) -> Result<Self> {
        std::fs::create_dir_all(&cfg.state_dir).with_context(|| format!("creating {}", cfg.state_dir.display()))?;
        let store = Store::open(&cfg.state_dir).context("opening the state database")?;
        let dev = Device::Cpu;
        tracing::info!("loading the base model {}", cfg.model.path.display());
        let loaded = load_model(
            &cfg.model.path,
            &dev,
            &LoadOptions {
                num_labels: cfg.model.num_labels,
                head_seed: cfg.seed,
                tokenizer: None,
                dtype: cfg.model.dtype.parse().context("[model] dtype")?,
            },
        )
        .with_context(|| format!("loading {}", cfg.model.path.display()))?;
        let base_sha = loaded.weights_sha256()?;
        let mut loaded = loaded;
        if loaded.model.recompute_by_default() {
            // The init's gradient pass on a billion-parameter model: one block's activations at a time.
            loaded.model.set_recompute(true);
        }
        if let Some(want) = &cfg.model.sha256
            && want != &base_sha
        {
            bail!("the base model's weights have sha256 {base_sha}, but the config requires {want}");
        }
        let task = loaded.model.task();
        let adapter = adapter_config(cfg, task)?;
        let mut model = loaded.model.clone();
        let (run, init, completed, global_sha) = if resume {
            let run = store.latest_run()?.ok_or_else(|| anyhow!("--resume: no run in {}", cfg.state_dir.display()))?;
            let spec: ClientSpec = serde_json::from_str(&run.spec_json).context("the stored run spec")?;
            if spec.base_model_sha256 != base_sha {
                bail!("--resume: the run used base weights {}, these are {base_sha}", spec.base_model_sha256);
            }
            let init = fedsb_common::wire::decode_blob(&store.get_blob(&run.init_sha256)?, &dev)?;
            let last = store.last_completed_round(&run.run_id)?;
            let (completed, global_sha) = match last {
                Some(r) => (r.round, r.global_sha256.clone()),
                None => (0, None),
            };
            tracing::info!("resuming run {} after round {completed}", run.run_id);
            (run, init, completed, global_sha)
        } else {
            let init_ds = Dataset::load_jsonl(&cfg.init.data).context("the init data")?;
            let enc = Encoder::new(&loaded.tokenizer, task, cfg.local.max_len);
            let init_data = enc.encode_all(&init_ds).context("tokenizing the init data")?;
            let local_steps = cfg.local.steps.unwrap_or(100);
            let eta = cfg.init.eta.unwrap_or_else(|| {
                LrSchedule::new(cfg.local.lr, cfg.local.warmup_ratio, local_steps, cfg.local.schedule).first_lr()
            });
            let icfg = InitConfig {
                samples: cfg
                    .init
                    .samples
                    .unwrap_or_else(|| InitConfig::default_samples(init_data.len(), cfg.init.batch_size)),
                batch_size: cfg.init.batch_size,
                eta,
                oversample: cfg.init.oversample,
                power_iters: cfg.init.power_iters,
                seed: cfg.seed,
                grad_memory_mib: cfg.init.grad_memory_mib,
            };
            let init = if adapter.kind == AdapterKind::LoraSb {
                tracing::info!(
                    "LoRA-SB init on {} samples of {} (η = {eta:.3e})",
                    icfg.samples,
                    cfg.init.data.display()
                );
                let (init, rep) =
                    lora_sb_init(&mut model, &adapter, &init_data, &icfg, loaded.tokenizer.pad_id(), &mut |_, _| {})?;
                tracing::info!(
                    "LoRA-SB init: {} matrices in {:.1}s",
                    rep.layers,
                    rep.gradient_seconds + rep.svd_seconds
                );
                init
            } else {
                // LoRA / FFA-LoRA: the seeded starting factors, served once so that every client starts from
                // bit-identical A (and B) and the frozen A of FFA-LoRA is checked by hash like LoRA-SB's B and A.
                model.attach_adapters(&adapter, None)?;
                let init: TensorSet = model
                    .adapter_tensors()?
                    .iter()
                    .filter(|(n, _)| n.contains(".lora_"))
                    .map(|(n, t)| (n.clone(), t.clone()))
                    .collect();
                model.detach_adapters();
                tracing::info!("{} init: {} adapter tensors from seed {}", cfg.method, init.len(), adapter.seed);
                init
            };
            let init_blob = encode_blob(&init, WireDtype::F32)?;
            let init_sha = store.put_blob(&init_blob.bytes)?;
            let run_id = format!("run-{}", now_ms());
            let spec = ClientSpec {
                run_id: run_id.clone(),
                base_model_sha256: base_sha.clone(),
                task,
                num_labels: cfg.model.num_labels,
                method: cfg.method,
                adapter: adapter.clone(),
                local: cfg.local.clone(),
                wire_dtype: cfg.wire_dtype,
                seed: cfg.seed,
                dp: cfg.dp_spec(),
            };
            let run = create_run(&store, &spec, init_sha)?;
            (run, init, 0, None)
        };
        let spec: ClientSpec = serde_json::from_str(&run.spec_json)?;
        model.attach_adapters(&spec.adapter, Some(&init))?;
        let frozen_sha256 = model.frozen_adapter_tensors()?.content_hash()?;
        // The starting global: R0 and the seeded head (recomputed on resume: deterministic). FLoRA serves only
        // the head: its adapters restart from the init blob every round.
        let trainable = model.trainable_tensors()?;
        let update_values = trainable.num_values();
        let global0: TensorSet = if spec.method.restarts_adapters() {
            trainable.iter().filter(|(n, _)| !n.contains(".lora_")).map(|(n, t)| (n.clone(), t.clone())).collect()
        } else {
            trainable
        };
        let evaluator = match &cfg.eval {
            Some(e) => Some(Evaluator::new(e, &model, &loaded.tokenizer, cfg.local.max_len)?),
            None => None,
        };
        if let (Some(ev), false) = (&evaluator, resume) {
            evaluate_start(ev, &loaded.model, &spec, &cfg.state_dir, opts.print_rounds)?;
        }
        let evaluator = evaluator.map(Mutex::new);
        let metrics_path = Some(cfg.state_dir.join(METRICS_FILE));
        let start = RunStart { init, update_values, frozen_sha256, global0, completed, global_sha, evaluator };
        Self::assemble(cfg, opts, Box::new(store), metrics_path, run, start)
    }

    /// A run of a synthetic LoRA-SB adapter with no model behind it — `layers × modules` R matrices of
    /// `rank × rank`, seeded — for load tests of the transport, the ingest path and the round commit (the
    /// coordinator load benchmark). Clients of such a run must submit updates of exactly these tensors, with the
    /// frozen hash `frozen_sha256`. `cfg.model` is not read and there is no evaluation. Its state goes to
    /// `cfg.state_dir`, like a real run's.
    pub fn synthetic(
        cfg: &RunConfig,
        opts: ServeOptions,
        layers: usize,
        modules: &[&str],
        rank: usize,
    ) -> Result<Self> {
        std::fs::create_dir_all(&cfg.state_dir).with_context(|| format!("creating {}", cfg.state_dir.display()))?;
        let store = Store::open(&cfg.state_dir).context("opening the state database")?;
        let metrics_path = Some(cfg.state_dir.join(METRICS_FILE));
        Self::synthetic_in(cfg, opts, Box::new(store), metrics_path, layers, modules, rank)
    }

    /// [`Coordinator::synthetic`] on the given store, appending its metrics lines to `metrics_path` (None:
    /// nowhere); `cfg.state_dir` is not used. With a [`MemStore`](crate::store::mem::MemStore) and no metrics
    /// file, a run that touches no file (unit tests of the event handling).
    pub fn synthetic_in(
        cfg: &RunConfig,
        opts: ServeOptions,
        store: Box<dyn RunStore>,
        metrics_path: Option<PathBuf>,
        layers: usize,
        modules: &[&str],
        rank: usize,
    ) -> Result<Self> {
        use rand::SeedableRng;
        use rand_distr::Distribution;
        let dev = Device::Cpu;
        let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
        let normal = rand_distr::Normal::new(0f32, 1.0)?;
        let mut global0 = TensorSet::new();
        let mut frozen = TensorSet::new();
        for l in 0..layers {
            for m in modules {
                let name = format!("model.layers.{l}.{m}");
                let r: Vec<f32> = (0..rank * rank).map(|_| normal.sample(&mut rng)).collect();
                global0.insert(format!("{name}.lora_R.weight"), Tensor::from_vec(r, (rank, rank), &dev)?);
                // Stand-ins for B and A (their content only feeds the frozen hash).
                frozen.insert(format!("{name}.lora_A.weight"), Tensor::full(l as f32, (rank, 1), &dev)?);
            }
        }
        let frozen_sha256 = frozen.content_hash()?;
        let mut init = frozen;
        for (n, t) in global0.iter() {
            init.insert(n.clone(), t.clone());
        }
        let init_blob = encode_blob(&init, WireDtype::F32)?;
        let init_sha256 = store.put_blob(&init_blob.bytes)?;
        let run_id = format!("load-{}", now_ms());
        let mut adapter = AdapterConfig::new(AdapterKind::LoraSb, rank, modules);
        adapter.seed = cfg.seed;
        let spec = ClientSpec {
            run_id: run_id.clone(),
            base_model_sha256: "synthetic".into(),
            task: TaskKind::CausalLm,
            num_labels: 0,
            method: cfg.method,
            adapter,
            local: cfg.local.clone(),
            wire_dtype: cfg.wire_dtype,
            seed: cfg.seed,
            dp: cfg.dp_spec(),
        };
        let run = create_run(store.as_ref(), &spec, init_sha256)?;
        let update_values = global0.num_values();
        let start =
            RunStart { init, update_values, frozen_sha256, global0, completed: 0, global_sha: None, evaluator: None };
        Self::assemble(cfg, opts, store, metrics_path, run, start)
    }

    /// The common tail of [`Coordinator::prepare`] and [`Coordinator::synthetic_in`]: the starting global, the
    /// round engine and the served blobs.
    fn assemble(
        cfg: &RunConfig,
        opts: ServeOptions,
        store: Box<dyn RunStore>,
        metrics_path: Option<PathBuf>,
        run: RunRecord,
        start: RunStart,
    ) -> Result<Self> {
        let RunStart { init, update_values, frozen_sha256, global0, completed, global_sha, evaluator } = start;
        let dev = Device::Cpu;
        let spec: ClientSpec = serde_json::from_str(&run.spec_json)?;
        let g0 = encode_blob(&global0, WireDtype::F32)?;
        let g0_sha = store.put_blob(&g0.bytes)?;
        let (global, global_sha) = match global_sha {
            Some(sha) => (fedsb_common::wire::decode_blob(&store.get_blob(&sha)?, &dev)?, sha),
            None => (global0, g0_sha),
        };
        let analytic_min_bytes = update_values as u64 * spec.wire_dtype.bytes_per_value();
        let policy = RoundPolicy {
            rounds: cfg.rounds,
            clients_per_round: cfg.clients_per_round,
            min_clients: cfg.min_clients(),
            quorum: cfg.quorum,
            deadline_ms: cfg.round_deadline_secs * 1000,
            on_quorum_miss: cfg.on_quorum_miss,
            max_retries: cfg.max_retries,
            seed: cfg.seed,
        };
        let aggregator = make_aggregator(spec.method, cfg.weighting, &init)?;
        let restart = lora_factors(&init);
        let mut engine = RoundEngine::new(
            run.run_id.clone(),
            policy,
            aggregator,
            cfg.weighting == Weighting::NumExamples,
            global.clone(),
            global_sha.clone(),
            completed,
        );
        // On resume, the clients that had joined are known again: they keep polling the restarted coordinator
        // without joining anew (a client that is really gone is handled by the round deadline).
        let now = now_ms();
        for c in store.clients(&run.run_id)? {
            engine.join(&c.client_id, c.num_examples, now);
        }
        let mut blobs = HashMap::new();
        blobs.insert(
            run.init_sha256.clone(),
            ServedBlob { bytes: store.get_blob(&run.init_sha256)?.into(), payload_bytes: init.num_values() as u64 * 4 },
        );
        blobs.insert(
            global_sha.clone(),
            ServedBlob { bytes: store.get_blob(&global_sha)?.into(), payload_bytes: global.num_values() as u64 * 4 },
        );
        // On resume, the folds of the committed rounds: served again (a restarted client folds them all) and
        // replayed on the evaluator's model.
        let mut folds = Vec::new();
        if spec.method.folds_base() {
            let mut done: Vec<RoundRecord> =
                store.rounds(&run.run_id)?.into_iter().filter(|r| r.status == "completed").collect();
            done.sort_by_key(|r| r.round);
            for r in done {
                let (Some(p), Some(g)) = (r.product_sha256.clone(), r.global_sha256.clone()) else {
                    bail!("--resume: completed round {} of a {} run has no product blob", r.round, spec.method);
                };
                let (pb, gb) = (store.get_blob(&p)?, store.get_blob(&g)?);
                let (product, round_global) =
                    (fedsb_common::wire::decode_blob(&pb, &dev)?, fedsb_common::wire::decode_blob(&gb, &dev)?);
                if let Some(ev) = &evaluator {
                    let mut ev = lock(ev);
                    let fedex = spec.method.folds_residual();
                    ev.model.fold_into_base(&base_deltas(
                        &product,
                        fedex.then_some(&round_global),
                        spec.adapter.scale(),
                    )?)?;
                }
                blobs
                    .insert(p.clone(), ServedBlob { bytes: pb.into(), payload_bytes: product.num_values() as u64 * 4 });
                blobs.insert(
                    g.clone(),
                    ServedBlob { bytes: gb.into(), payload_bytes: round_global.num_values() as u64 * 4 },
                );
                folds.push(BaseFold { round: r.round, product_sha256: p, global_sha256: g });
            }
        }
        let max_update = cfg.max_update_bytes.unwrap_or(4 * (update_values as u64 * 4) + (1 << 20));
        let init_privacy = init_privacy_statement(cfg, &spec);
        if cfg.init.private {
            tracing::warn!("{init_privacy}");
        } else {
            tracing::info!("privacy: {init_privacy}");
        }
        if let Some(dp) = &spec.dp {
            tracing::info!(
                "DP-SGD required of every client: C = {}, budget ε = {} at δ = {:e} over {} rounds{}",
                dp.max_grad_norm,
                dp.target_epsilon,
                dp.delta,
                dp.rounds,
                dp.noise_multiplier.map_or(", σ calibrated by each client".into(), |s| format!(", σ = {s}"))
            );
        }
        Ok(Self {
            run_id: run.run_id.clone(),
            spec_json: run.spec_json.clone(),
            spec,
            init_sha256: run.init_sha256.clone(),
            frozen_sha256,
            opts: ServeOptions { max_update_bytes: max_update.min(opts.max_update_bytes), ..opts },
            notify: Notify::new(),
            events: Mutex::new(()),
            engine: Mutex::new(engine),
            evaluator,
            store: Mutex::new(store),
            served: Mutex::new(Served { blobs, folds }),
            traffic: Mutex::new(Traffic::default()),
            restart,
            analytic_min_bytes,
            rounds: cfg.rounds,
            metrics_path,
            init_privacy,
        })
    }
}

/// What the held-out data says before any round: the starting global (the model every client starts round 1
/// from) and, for LoRA-SB, the base model without adapters — LoRA-SB's init already moves the model
/// (`R0 = Σ_r`, a step of size η), unlike LoRA's `B = 0`. Printed (or logged) and written to
/// `STATE/eval_start.json`.
fn evaluate_start(ev: &Evaluator, base: &Model, spec: &ClientSpec, state_dir: &Path, print: bool) -> Result<()> {
    let t = std::time::Instant::now();
    let start = ev.evaluate(&ev.model).context("evaluating the starting global")?;
    let base = if spec.adapter.kind == AdapterKind::LoraSb {
        Some(evaluate(base, &ev.data, ev.batch_size, ev.pad).context("evaluating the base model")?)
    } else {
        None
    };
    let line = match &base {
        Some(b) => format!(
            "before round 1: {} of the starting global (the LoRA-SB init); the base model without adapters: {} \
             ({:.1}s)",
            describe_eval(&start),
            describe_eval(b),
            t.elapsed().as_secs_f64()
        ),
        None => format!(
            "before round 1: {} of the starting global ({:.1}s)",
            describe_eval(&start),
            t.elapsed().as_secs_f64()
        ),
    };
    if print {
        println!("{line}");
    } else {
        tracing::info!("{line}");
    }
    let path = state_dir.join("eval_start.json");
    let json = serde_json::json!({ "start": start, "base": base });
    std::fs::write(&path, serde_json::to_string_pretty(&json)?).with_context(|| format!("writing {}", path.display()))
}

/// What the run says about its adapter init and private data (logged at start; in the status and summary).
fn init_privacy_statement(cfg: &RunConfig, spec: &ClientSpec) -> String {
    if spec.adapter.kind != AdapterKind::LoraSb {
        return format!(
            "{} starts from data-independent adapters (A seeded at random, B = 0): no private data is used before \
             training",
            spec.method
        );
    }
    if cfg.init.private {
        format!(
            "WARNING: the LoRA-SB init (B, A) was computed WITHOUT differential privacy from {}, which the config \
             marks as private data (init.private = true): it is NOT covered by any client's privacy budget{}",
            cfg.init.data.display(),
            if spec.dp.is_some() { ", so the run's ε does not account for it" } else { "" }
        )
    } else {
        format!(
            "the LoRA-SB init (B, A) was computed by the coordinator from {}, public/proxy data that no client \
             trains on; it spends no client's privacy budget (set init.private = true if that data is private)",
            cfg.init.data.display()
        )
    }
}
