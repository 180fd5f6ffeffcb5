//! [`Coordinator`]: one federated run — the round engine, the store, the blobs being served, the byte
//! ledger being filled and the evaluation of each new global model. The gRPC handlers in `service.rs` call
//! it; it never sees tonic types, and the round engine never sees I/O.
//!
//! Round closing: the aggregate is encoded as a blob and written durably, evaluated, then the round row and
//! its ledger rows are committed in one transaction, and only then does the engine install the new global
//! (so a crash never leaves a half round; `--resume` continues from the last committed round).
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use candle_core::{Device, Tensor};
use fedsb_common::TensorSet;
use fedsb_common::adapter::init::{InitConfig, lora_sb_init};
use fedsb_common::adapter::{AdapterConfig, AdapterKind};
use fedsb_common::aggregate::product::{base_chain_sha256, base_deltas};
use fedsb_common::aggregate::{FLoraAggregator, Weighting, folds_base, lora_factors, make_aggregator};
use fedsb_common::comm::human_bytes;
use fedsb_common::comm::ledger::{ByteLedger, Direction, LedgerEntry, Transfer};
use fedsb_common::dp::DpReport;
use fedsb_common::model::TextTokenizer;
use fedsb_common::model::{LoadOptions, Model, TaskKind, load_model};
use fedsb_common::spec::ClientSpec;
use fedsb_common::train::data::{Encoded, Example, extract_final_answer};
use fedsb_common::train::eval::{EvalReport, evaluate, exact_match};
use fedsb_common::train::{Dataset, Encoder, LrSchedule};
use fedsb_common::wire::{WireDtype, encode_blob};
use serde::Serialize;
use tokio::sync::Notify;

use crate::config::RunConfig;
use crate::net::Counters;
use crate::round::{ClosedRound, Event, RoundEngine, RoundPolicy};
use crate::store::{LedgerRow, RoundRecord, RunRecord, Store};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Locks a mutex, recovering the data if a panicking thread poisoned it (state changes are all-or-nothing).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A blob the coordinator serves.
#[derive(Clone, Debug)]
pub struct ServedBlob {
    /// The bytes.
    pub bytes: prost::bytes::Bytes,
    /// Tensor bytes (payload) in it.
    pub payload_bytes: u64,
}

/// Evaluation of the global model on held-out data.
struct Evaluator {
    model: Model,
    data: Vec<Encoded>,
    batch_size: usize,
    pad: u32,
    /// Exact match of greedily decoded answers (causal LMs, `[eval] exact_match`).
    exact_match: Option<ExactMatchSet>,
}

/// What the exact-match part of an evaluation decodes, and how.
struct ExactMatchSet {
    examples: Vec<Example>,
    tokenizer: TextTokenizer,
    max_len: usize,
    max_new_tokens: usize,
}

impl Evaluator {
    /// Reads and tokenizes the held-out data of `e` for `model` (the evaluator's copy, adapters attached),
    /// checking up front that the exact-match examples can be scored.
    fn new(e: &crate::config::EvalSection, model: &Model, tokenizer: &TextTokenizer, max_len: usize) -> Result<Self> {
        let mut ds = Dataset::load_jsonl(&e.data).context("the evaluation data")?;
        if let Some(n) = e.limit {
            ds = ds.take(n);
        }
        let task = model.task();
        let data = Encoder::new(tokenizer, task, max_len)
            .encode_all(&ds)
            .with_context(|| format!("tokenizing the evaluation data {}", e.data.display()))?;
        let exact_match = if e.exact_match > 0 {
            if task != TaskKind::CausalLm {
                bail!("[eval] exact_match needs a causal LM; this model is a classifier (set it to 0)");
            }
            let examples = ds.take(e.exact_match).examples;
            for (i, ex) in examples.iter().enumerate() {
                let scorable = matches!(ex, Example::Instruction { response, answer, .. }
                    if answer.is_some() || extract_final_answer(response).is_some());
                if !scorable {
                    bail!(
                        "[eval] exact_match: example {} of {} is not a prompt/response pair with a reference answer \
                         (`answer`, or a final number in the response)",
                        i + 1,
                        e.data.display()
                    );
                }
            }
            Some(ExactMatchSet { examples, tokenizer: tokenizer.clone(), max_len, max_new_tokens: e.max_new_tokens })
        } else {
            None
        };
        Ok(Self { model: model.clone(), data, batch_size: e.batch_size, pad: tokenizer.pad_id(), exact_match })
    }

    /// Loss (and accuracy) of `model` on the held-out data, and exact match where configured.
    fn evaluate(&self, model: &Model) -> Result<EvalReport> {
        let mut rep = evaluate(model, &self.data, self.batch_size, self.pad)?;
        if let Some(em) = &self.exact_match {
            let enc = Encoder::new(&em.tokenizer, TaskKind::CausalLm, em.max_len);
            rep.exact_match = Some(exact_match(model, &enc, &em.examples, em.max_new_tokens, &mut |_, _| {})?);
        }
        Ok(rep)
    }
}

/// The held-out figures of a report, as the round lines print them.
pub fn describe_eval(e: &EvalReport) -> String {
    let main = match e.accuracy {
        Some(a) => format!("held-out accuracy {:.2}% (loss {:.4})", 100.0 * a, e.loss),
        None => format!("held-out loss {:.4}", e.loss),
    };
    match &e.exact_match {
        Some(m) => format!("{main}, exact match {}/{} ({:.1}%)", m.correct, m.total, 100.0 * m.accuracy),
        None => main,
    }
}

/// The byte ledger of the open round, plus per-client wire counters at its opening.
#[derive(Default)]
struct Pending {
    round: u64,
    entries: Vec<LedgerEntry>,
    wire_at_open: HashMap<String, (u64, u64)>,
}

/// One line of `metrics.jsonl` and of the coordinator's round log.
#[derive(Clone, Debug, Serialize)]
pub struct RoundMetrics {
    /// Round number.
    pub round: u64,
    /// Attempt.
    pub attempt: u32,
    /// "completed" or "failed".
    pub status: String,
    /// Sampled clients.
    pub sampled: Vec<String>,
    /// Clients whose update was aggregated.
    pub contributed: Vec<String>,
    /// Sampled clients that sent nothing.
    pub lost: Vec<String>,
    /// Mean local training loss of the contributors.
    pub mean_train_loss: Option<f64>,
    /// The coordinator's evaluation of the new global model.
    pub eval: Option<EvalReport>,
    /// Seconds from opening to closing.
    pub seconds: f64,
    /// Bytes up per contributing client (payload), and the analytic minimum.
    pub up_payload_per_client: u64,
    /// Bytes down per sampled client (payload).
    pub down_payload_per_client: u64,
    /// Sum of up/down message and wire bytes over the round's clients.
    pub up_message_bytes: u64,
    /// Sum of down message bytes.
    pub down_message_bytes: u64,
    /// Sum of up wire bytes.
    pub up_wire_bytes: u64,
    /// Sum of down wire bytes.
    pub down_wire_bytes: u64,
    /// The analytic minimum per client per direction.
    pub analytic_min_bytes: u64,
    /// DP-SGD: the contributors' privacy reports (ε so far, δ, steps, σ, q, C).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub privacy: BTreeMap<String, DpReport>,
    /// DP-SGD: the largest ε any client of the run has reported so far (the run's guarantee).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worst_epsilon: Option<f64>,
}

/// The privacy side of a run, for the status endpoint and the run summary.
#[derive(Clone, Debug, Serialize)]
pub struct PrivacySummary {
    /// How the adapter's initialization relates to private data.
    pub init: String,
    /// The DP-SGD the run requires (none: no DP).
    pub dp: Option<fedsb_common::dp::DpSpec>,
    /// Each client's latest report (ε is cumulative over its rounds).
    pub clients: BTreeMap<String, DpReport>,
    /// The largest ε of any client: the run's record-level guarantee at δ.
    pub worst_epsilon: Option<f64>,
    /// Clients that left the run, and why.
    pub left: BTreeMap<String, String>,
}

/// One round's fold into the clients' base weights (FedEx-LoRA, FLoRA).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BaseFold {
    /// The round that produced it.
    pub round: u64,
    /// sha256 of the product blob.
    pub product_sha256: String,
    /// sha256 of that round's global blob.
    pub global_sha256: String,
}

/// Settings of the transport around a run.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Plaintext, identities from tokens (tests, trusted networks only).
    pub insecure: bool,
    /// Largest update blob accepted.
    pub max_update_bytes: u64,
    /// Print a line per round to stdout.
    pub print_rounds: bool,
    /// HTTP/2 receive window per stream (bytes): what an upload waiting for an ingest slot may buffer here,
    /// so the coordinator's memory grows by at most this much per concurrently uploading client. Larger
    /// windows help clients on long fat links (bandwidth × round-trip time above it).
    pub h2_window_bytes: u32,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self { insecure: false, max_update_bytes: u64::MAX, print_rounds: false, h2_window_bytes: 256 * 1024 }
    }
}

/// One federated run (see the module docs).
pub struct Coordinator {
    /// The run's id.
    pub run_id: String,
    /// The spec clients receive at Join, as JSON.
    pub spec_json: String,
    /// The spec.
    pub spec: ClientSpec,
    /// sha256 of the init blob.
    pub init_sha256: String,
    /// sha256 of the frozen tensors (B, A) every update must have been trained with.
    pub frozen_sha256: String,
    /// Transport settings.
    pub opts: ServeOptions,
    engine: Mutex<RoundEngine>,
    store: Mutex<Store>,
    blobs: Mutex<HashMap<String, ServedBlob>>,
    pending: Mutex<Pending>,
    init_ledger: Mutex<Vec<LedgerEntry>>,
    conns: Mutex<HashMap<String, Vec<Arc<Counters>>>>,
    evaluator: Option<Mutex<Evaluator>>,
    /// FedEx-LoRA, FLoRA: the folds of the committed rounds, in round order.
    folds: Mutex<Vec<BaseFold>>,
    /// FLoRA: the adapter tensors its clients restart from every round (the init blob's `lora_A`/`lora_B`).
    restart: TensorSet,
    analytic_min_bytes: u64,
    rounds: u64,
    metrics_path: PathBuf,
    /// How the adapter's initialization relates to private data (stated at start, in the status and summary).
    init_privacy: String,
    /// Woken whenever the phase changes (round opened, closed, run finished).
    pub notify: Notify,
    /// Held from an engine transition until its event is handled (persisted), so that nobody sees a finished
    /// run whose last round is not recorded yet.
    events: Mutex<()>,
}

/// The adapter each method trains: LoRA-SB for Fed-SB, LoRA for FedIT, FedEx-LoRA and FLoRA, FFA-LoRA (A
/// frozen) for FFA-LoRA.
fn adapter_kind(method: &str) -> Result<AdapterKind> {
    Ok(match method {
        "fedsb" => AdapterKind::LoraSb,
        "fedit" | "fedex-lora" | "flora" => AdapterKind::Lora,
        "ffa-lora" => AdapterKind::FfaLora,
        o => bail!(
            "method `{o}` is not supported by the coordinator yet (supported: {})",
            fedsb_common::aggregate::METHODS.join(", ")
        ),
    })
}

fn adapter_config(cfg: &RunConfig, task: TaskKind) -> Result<AdapterConfig> {
    let default: &[&str] = match task {
        TaskKind::CausalLm => &["q", "k", "v", "o", "gate", "up", "down"],
        TaskKind::Classification => &["query", "value", "attention.output.dense", "output.dense"],
    };
    let mut a = AdapterConfig::new(adapter_kind(&cfg.method)?, cfg.adapter.rank, default);
    if let Some(t) = &cfg.adapter.targets {
        a.targets = t.clone();
    }
    a.alpha = cfg.adapter.alpha.unwrap_or(cfg.adapter.rank as f64);
    a.seed = cfg.seed;
    Ok(a)
}

/// Records a new run of `spec` (status "running") whose init blob is `init_sha256`.
fn create_run(store: &Store, spec: &ClientSpec, init_sha256: String) -> Result<RunRecord> {
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
    init: TensorSet,
    /// Values of one client update (the analytic minimum per client and direction).
    update_values: usize,
    frozen_sha256: String,
    global0: TensorSet,
    completed: u64,
    global_sha: Option<String>,
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
                method: cfg.method.clone(),
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
        let global0: TensorSet = if spec.method == "flora" {
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
        Self::assemble(
            cfg,
            opts,
            store,
            run,
            RunStart { init, update_values, frozen_sha256, global0, completed, global_sha, evaluator },
        )
    }

    /// A run of a synthetic LoRA-SB adapter with no model behind it — `layers × modules` R matrices of
    /// `rank × rank`, seeded — for load tests of the transport, the ingest path and the round commit (the
    /// coordinator load benchmark). Clients of such a run must submit updates of exactly these tensors, with the
    /// frozen hash `frozen_sha256`. `cfg.model` is not read and there is no evaluation.
    pub fn synthetic(
        cfg: &RunConfig,
        opts: ServeOptions,
        layers: usize,
        modules: &[&str],
        rank: usize,
    ) -> Result<Self> {
        use rand::SeedableRng;
        use rand_distr::Distribution;
        std::fs::create_dir_all(&cfg.state_dir).with_context(|| format!("creating {}", cfg.state_dir.display()))?;
        let store = Store::open(&cfg.state_dir).context("opening the state database")?;
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
            method: cfg.method.clone(),
            adapter,
            local: cfg.local.clone(),
            wire_dtype: cfg.wire_dtype,
            seed: cfg.seed,
            dp: cfg.dp_spec(),
        };
        let run = create_run(&store, &spec, init_sha256)?;
        let update_values = global0.num_values();
        let start =
            RunStart { init, update_values, frozen_sha256, global0, completed: 0, global_sha: None, evaluator: None };
        Self::assemble(cfg, opts, store, run, start)
    }

    /// The common tail of [`Coordinator::prepare`] and [`Coordinator::synthetic`]: the starting global, the
    /// round engine and the served blobs.
    fn assemble(cfg: &RunConfig, opts: ServeOptions, store: Store, run: RunRecord, start: RunStart) -> Result<Self> {
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
        let aggregator = make_aggregator(&spec.method, cfg.weighting, &init)?;
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
        if folds_base(&spec.method) {
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
                    let fedex = spec.method == "fedex-lora";
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
            engine: Mutex::new(engine),
            store: Mutex::new(store),
            blobs: Mutex::new(blobs),
            pending: Mutex::new(Pending::default()),
            init_ledger: Mutex::new(Vec::new()),
            conns: Mutex::new(HashMap::new()),
            evaluator,
            folds: Mutex::new(folds),
            restart,
            analytic_min_bytes,
            rounds: cfg.rounds,
            metrics_path: cfg.state_dir.join("metrics.jsonl"),
            init_privacy,
            notify: Notify::new(),
            events: Mutex::new(()),
        })
    }

    /// The round engine, locked.
    pub fn engine(&self) -> MutexGuard<'_, RoundEngine> {
        lock(&self.engine)
    }

    /// The store, locked.
    pub fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }

    /// A blob being served, by sha256.
    pub fn blob(&self, sha256: &str) -> Option<ServedBlob> {
        lock(&self.blobs).get(sha256).cloned()
    }

    /// The base folds of the committed rounds (FedEx-LoRA, FLoRA; empty for the other methods).
    pub fn base_folds(&self) -> Vec<BaseFold> {
        lock(&self.folds).clone()
    }

    /// The hash an update for `round` must carry as `frozen_sha256`: the frozen adapter tensors' hash, chained
    /// with the product blobs of the rounds before it ([`base_chain_sha256`]).
    pub fn expected_frozen_sha256(&self, round: u64) -> String {
        let products: Vec<String> =
            lock(&self.folds).iter().filter(|f| f.round < round).map(|f| f.product_sha256.clone()).collect();
        base_chain_sha256(&self.frozen_sha256, &products)
    }

    /// The trainable tensors a client starts a round from, given the served global (FLoRA adds the restart
    /// adapter; the other methods serve the whole set).
    fn round_start(&self, global: &TensorSet) -> TensorSet {
        if self.spec.method == "flora" { FLoraAggregator::round_start(&self.restart, global) } else { global.clone() }
    }

    /// The analytic minimum bytes per client per direction of one round.
    pub fn analytic_min_bytes(&self) -> u64 {
        self.analytic_min_bytes
    }

    /// Associates a connection's counters with a client (wire bytes are counted per client).
    pub fn register_connection(&self, client: &str, counters: &Arc<Counters>) {
        let mut conns = lock(&self.conns);
        let v = conns.entry(client.to_string()).or_default();
        if !v.iter().any(|c| Arc::ptr_eq(c, counters)) {
            v.push(counters.clone());
        }
    }

    fn wire_totals(&self, client: &str) -> (u64, u64) {
        lock(&self.conns)
            .get(client)
            .map_or((0, 0), |v| v.iter().fold((0, 0), |(r, w), c| (r + c.read(), w + c.written())))
    }

    /// Records traffic of the open round (task reply and download of the global, upload of an update);
    /// repeated calls for the same client and direction add up.
    pub fn record_round_traffic(&self, round: u64, client: &str, direction: Direction, payload: u64, message: u64) {
        let mut p = lock(&self.pending);
        if p.round != round {
            return;
        }
        match p.entries.iter_mut().find(|e| e.client == client && e.direction == direction) {
            Some(e) => {
                e.payload_bytes += payload;
                e.message_bytes += message;
            }
            None => p.entries.push(LedgerEntry {
                round,
                client: client.to_string(),
                direction,
                transfer: Transfer::Round,
                payload_bytes: payload,
                message_bytes: message,
                wire_bytes: None,
                analytic_min_bytes: self.analytic_min_bytes,
            }),
        }
    }

    /// Records a download of a global blob by a client sampled in the open round.
    pub fn record_global_download(&self, client: &str, sha256: &str, payload: u64, message: u64) {
        let round = {
            let p = lock(&self.pending);
            p.wire_at_open.contains_key(client).then_some(p.round)
        };
        match round {
            Some(r) => self.record_round_traffic(r, client, Direction::Down, payload, message),
            None => tracing::debug!("{client} downloaded {sha256} outside a round it is sampled in"),
        }
    }

    /// Records a client's one-time init download (with the wire bytes its connection carried meanwhile).
    pub fn record_init_download(&self, client: &str, payload: u64, message: u64, wire: Option<u64>) {
        let entry = LedgerEntry {
            round: 0,
            client: client.to_string(),
            direction: Direction::Down,
            transfer: Transfer::Init,
            payload_bytes: payload,
            message_bytes: message,
            wire_bytes: wire,
            analytic_min_bytes: payload,
        };
        // A round that opened while this client was still downloading the init must not count that download a
        // second time in its wire bytes: the round's baseline for the client moves to now (a client asks for its
        // task only once it has the init).
        let now = self.wire_totals(client);
        if let Some(at_open) = lock(&self.pending).wire_at_open.get_mut(client) {
            *at_open = (at_open.0.max(now.0), at_open.1.max(now.1));
        }
        let row = ledger_row(&entry);
        lock(&self.init_ledger).push(entry);
        if let Err(e) = self.store().add_ledger(&self.run_id, &[row]) {
            tracing::warn!("could not record the init download of {client}: {e}");
        }
    }

    /// Wire bytes (read, written) of `client`'s connections so far.
    pub fn client_wire(&self, client: &str) -> (u64, u64) {
        self.wire_totals(client)
    }

    /// Advances the engine's clock; call every ~100 ms.
    pub fn tick(self: &Arc<Self>) {
        let _events = self.event_guard();
        let ev = self.engine().tick(now_ms());
        self.handle(ev);
    }

    /// Hold this from an engine call that may change the phase until its event is [handled](Self::handle).
    pub fn event_guard(&self) -> MutexGuard<'_, ()> {
        lock(&self.events)
    }

    /// Acts on an engine event (from `tick` or a submit).
    pub fn handle(self: &Arc<Self>, ev: Result<Option<Event>, crate::round::Reject>) {
        match ev {
            Ok(None) => {}
            Err(e) => {
                tracing::error!("round engine: {e}");
                self.engine().abort(format!("the round engine failed: {e}"));
                self.finish_run();
            }
            Ok(Some(Event::Opened { round, attempt, sampled })) => {
                let snap: HashMap<String, (u64, u64)> =
                    sampled.iter().map(|c| (c.clone(), self.wire_totals(c))).collect();
                *lock(&self.pending) = Pending { round, entries: Vec::new(), wire_at_open: snap };
                tracing::info!("round {round} opened (attempt {attempt}): sampled {}", sampled.join(", "));
                self.notify.notify_waiters();
            }
            Ok(Some(Event::Closed(c))) => {
                let me = self.clone();
                // Encoding, writing and evaluating take a while: off the async threads.
                tokio::task::spawn_blocking(move || {
                    if let Err(e) = me.persist_closed(*c) {
                        tracing::error!("could not persist the round: {e:#}");
                        me.engine().abort(format!("could not persist the round: {e:#}"));
                    }
                    me.after_phase_change();
                });
            }
            Ok(Some(Event::Failed { round, attempt, sampled, contributed, opened_ms, retry })) => {
                let lost: Vec<String> = sampled.iter().filter(|c| !contributed.contains(c)).cloned().collect();
                let ledger = self.take_round_ledger(round, &sampled);
                let rec = RoundRecord {
                    round,
                    attempt,
                    status: "failed".into(),
                    global_sha256: None,
                    opened_unix_ms: opened_ms,
                    closed_unix_ms: now_ms(),
                    sampled: sampled.clone(),
                    contributed: contributed.clone(),
                    lost: lost.clone(),
                    mean_train_loss: None,
                    eval_json: None,
                    product_sha256: None,
                    privacy_json: None,
                };
                if let Err(e) =
                    self.store().commit_round(&self.run_id, &rec, &ledger.iter().map(ledger_row).collect::<Vec<_>>())
                {
                    tracing::error!("could not record the failed round: {e}");
                }
                let line = format!(
                    "round {round} attempt {attempt} FAILED: {} of {} sampled clients answered before the deadline (lost: {}){}",
                    contributed.len(),
                    sampled.len(),
                    lost.join(", "),
                    if retry { "; sampling again" } else { "; the run stops" }
                );
                if self.opts.print_rounds {
                    println!("{line}");
                } else {
                    tracing::warn!("{line}");
                }
                self.write_metrics(&RoundMetrics {
                    round,
                    attempt,
                    status: "failed".into(),
                    sampled,
                    contributed,
                    lost,
                    mean_train_loss: None,
                    eval: None,
                    seconds: (now_ms().saturating_sub(opened_ms)) as f64 / 1e3,
                    up_payload_per_client: 0,
                    down_payload_per_client: 0,
                    up_message_bytes: 0,
                    down_message_bytes: 0,
                    up_wire_bytes: 0,
                    down_wire_bytes: 0,
                    analytic_min_bytes: self.analytic_min_bytes,
                    privacy: BTreeMap::new(),
                    worst_epsilon: self.worst_epsilon(),
                });
                self.after_phase_change();
            }
        }
    }

    /// A client process this coordinator started itself died (a local federation, see `local.rs`): a client
    /// that had joined leaves the run as if it had called `Leave` with `reason` (the others go on when they still
    /// make the quorum, else the run stops saying why); one that never joined stops the run, whose rounds would
    /// otherwise wait for it. Returns false, changing nothing, while a round is being persisted: call again.
    pub fn client_died(self: &Arc<Self>, client: &str, reason: &str) -> bool {
        let _events = self.event_guard();
        let mut engine = self.engine();
        if engine.outcome().is_some() {
            return true;
        }
        if engine.is_closing() {
            return false;
        }
        if engine.clients().contains_key(client) {
            let ev = engine.leave(client, reason, now_ms());
            drop(engine);
            tracing::warn!("{client} left the run: {reason}");
            self.handle(ev);
        } else {
            engine.abort(format!("{client} stopped before joining the run: {reason}"));
            drop(engine);
            tracing::error!("{client} stopped before joining the run: {reason}");
        }
        self.after_phase_change();
        true
    }

    fn after_phase_change(&self) {
        if self.engine().outcome().is_some() {
            self.finish_run();
        }
        self.notify.notify_waiters();
    }

    fn finish_run(&self) {
        let outcome = self.engine().outcome().cloned();
        if let Some(o) = outcome
            && let Err(e) = self.store().set_run_status(&self.run_id, &o.status, &o.message)
        {
            tracing::error!("could not record the run's end: {e}");
        }
        self.notify.notify_waiters();
    }

    /// The ledger entries of `round` plus wire deltas since it opened, for the clients in `clients`.
    fn take_round_ledger(&self, round: u64, clients: &[String]) -> Vec<LedgerEntry> {
        let mut p = lock(&self.pending);
        if p.round != round {
            return Vec::new();
        }
        let mut entries = std::mem::take(&mut p.entries);
        for c in clients {
            let (r0, w0) = p.wire_at_open.get(c).copied().unwrap_or((0, 0));
            let (r1, w1) = self.wire_totals(c);
            for (dir, bytes) in [(Direction::Up, r1.saturating_sub(r0)), (Direction::Down, w1.saturating_sub(w0))] {
                match entries.iter_mut().find(|e| &e.client == c && e.direction == dir) {
                    Some(e) => e.wire_bytes = Some(bytes),
                    None if bytes > 0 => entries.push(LedgerEntry {
                        round,
                        client: c.clone(),
                        direction: dir,
                        transfer: Transfer::Round,
                        payload_bytes: 0,
                        message_bytes: 0,
                        wire_bytes: Some(bytes),
                        analytic_min_bytes: self.analytic_min_bytes,
                    }),
                    None => {}
                }
            }
        }
        entries
    }

    fn persist_closed(self: &Arc<Self>, c: ClosedRound) -> Result<()> {
        let blob = encode_blob(&c.global, WireDtype::F32)?;
        let sha = self.store().put_blob(&blob.bytes)?;
        let product = match &c.product {
            Some(p) => {
                let pb = encode_blob(p, WireDtype::F32)?;
                let psha = self.store().put_blob(&pb.bytes)?;
                Some((psha, pb))
            }
            None => None,
        };
        let eval = match &self.evaluator {
            Some(ev) => {
                let mut ev = lock(ev);
                if let Some(p) = &c.product {
                    let fedex = self.spec.method == "fedex-lora";
                    let deltas = base_deltas(p, fedex.then_some(&c.global), self.spec.adapter.scale())?;
                    ev.model.fold_into_base(&deltas)?;
                }
                ev.model.load_trainable(&self.round_start(&c.global))?;
                Some(ev.evaluate(&ev.model)?)
            }
            None => None,
        };
        let ledger = self.take_round_ledger(c.round, &c.sampled);
        let contributed: Vec<String> = c.contributed.iter().map(|(n, _)| n.clone()).collect();
        let mean_loss = if c.contributed.is_empty() {
            None
        } else {
            Some(c.contributed.iter().map(|(_, m)| m.train_loss).sum::<f64>() / c.contributed.len() as f64)
        };
        let privacy: BTreeMap<String, DpReport> =
            c.contributed.iter().filter_map(|(n, m)| m.dp.clone().map(|d| (n.clone(), d))).collect();
        let rec = RoundRecord {
            round: c.round,
            attempt: c.attempt,
            status: "completed".into(),
            global_sha256: Some(sha.clone()),
            opened_unix_ms: c.opened_ms,
            closed_unix_ms: c.closed_ms,
            sampled: c.sampled.clone(),
            contributed: contributed.clone(),
            lost: c.lost.clone(),
            mean_train_loss: mean_loss,
            eval_json: eval.as_ref().map(serde_json::to_string).transpose()?,
            product_sha256: product.as_ref().map(|(p, _)| p.clone()),
            privacy_json: if privacy.is_empty() { None } else { Some(serde_json::to_string(&privacy)?) },
        };
        self.store().commit_round(&self.run_id, &rec, &ledger.iter().map(ledger_row).collect::<Vec<_>>())?;
        lock(&self.blobs)
            .insert(sha.clone(), ServedBlob { bytes: blob.bytes.into(), payload_bytes: blob.payload_bytes });
        if let Some((psha, pb)) = product {
            lock(&self.blobs)
                .insert(psha.clone(), ServedBlob { bytes: pb.bytes.into(), payload_bytes: pb.payload_bytes });
            lock(&self.folds).push(BaseFold { round: c.round, product_sha256: psha, global_sha256: sha.clone() });
        }
        let sum = |dir: Direction, f: &dyn Fn(&LedgerEntry) -> u64| -> u64 {
            ledger.iter().filter(|e| e.direction == dir).map(f).sum()
        };
        let per_client = |dir: Direction| -> u64 {
            ledger
                .iter()
                .filter(|e| e.direction == dir && e.payload_bytes > 0)
                .map(|e| e.payload_bytes)
                .max()
                .unwrap_or(0)
        };
        let m = RoundMetrics {
            round: c.round,
            attempt: c.attempt,
            status: "completed".into(),
            sampled: c.sampled,
            contributed,
            lost: c.lost,
            mean_train_loss: mean_loss,
            eval,
            seconds: (c.closed_ms.saturating_sub(c.opened_ms)) as f64 / 1e3,
            up_payload_per_client: per_client(Direction::Up),
            down_payload_per_client: per_client(Direction::Down),
            up_message_bytes: sum(Direction::Up, &|e| e.message_bytes),
            down_message_bytes: sum(Direction::Down, &|e| e.message_bytes),
            up_wire_bytes: sum(Direction::Up, &|e| e.wire_bytes.unwrap_or(0)),
            down_wire_bytes: sum(Direction::Down, &|e| e.wire_bytes.unwrap_or(0)),
            analytic_min_bytes: self.analytic_min_bytes,
            worst_epsilon: self.worst_epsilon(),
            privacy,
        };
        self.write_metrics(&m);
        self.print_round(&m);
        // Only now does the new global become the run's.
        self.engine().commit(c.round, c.global, sha);
        Ok(())
    }

    fn write_metrics(&self, m: &RoundMetrics) {
        use std::io::Write;
        let line = match serde_json::to_string(m) {
            Ok(l) => l,
            Err(e) => return tracing::warn!("metrics: {e}"),
        };
        let r = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.metrics_path)
            .and_then(|mut f| writeln!(f, "{line}"));
        if let Err(e) = r {
            tracing::warn!("could not append to {}: {e}", self.metrics_path.display());
        }
    }

    fn print_round(&self, m: &RoundMetrics) {
        let eval = m.eval.as_ref().map_or_else(|| "no evaluation".into(), describe_eval);
        let line = format!(
            "round {}/{}: {} clients (lost {}), mean local loss {}, {eval}, up {} / down {} per client (min {}), wire up {} down {}, {:.1}s",
            m.round,
            self.rounds,
            m.contributed.len(),
            m.lost.len(),
            m.mean_train_loss.map_or("-".into(), |l| format!("{l:.4}")),
            human_bytes(m.up_payload_per_client),
            human_bytes(m.down_payload_per_client),
            human_bytes(m.analytic_min_bytes),
            human_bytes(m.up_wire_bytes),
            human_bytes(m.down_wire_bytes),
            m.seconds
        );
        let line = match m.worst_epsilon {
            Some(e) => format!("{line}, DP ε ≤ {e:.3} (worst client)"),
            None => line,
        };
        if self.opts.print_rounds {
            println!("{line}");
        } else {
            tracing::info!("{line}");
        }
    }

    /// The whole ledger so far (init downloads and committed rounds), from the store.
    pub fn ledger(&self) -> Result<ByteLedger> {
        let rows = self.store().ledger(&self.run_id)?;
        let mut l = ByteLedger::new();
        for r in rows {
            l.record(LedgerEntry {
                round: r.round,
                client: r.client,
                direction: if r.direction == "up" { Direction::Up } else { Direction::Down },
                transfer: if r.transfer == "init" { Transfer::Init } else { Transfer::Round },
                payload_bytes: r.payload_bytes,
                message_bytes: r.message_bytes,
                wire_bytes: r.wire_bytes,
                analytic_min_bytes: r.analytic_min_bytes,
            });
        }
        Ok(l)
    }

    /// The privacy statement of the run: how the init relates to private data, the DP spec, each client's
    /// latest report (from the store, so it survives a restart) and the worst-case ε.
    pub fn privacy_summary(&self) -> Result<PrivacySummary> {
        let mut clients: BTreeMap<String, DpReport> = BTreeMap::new();
        for r in self.store().rounds(&self.run_id)? {
            if let Some(j) = &r.privacy_json {
                let reports: BTreeMap<String, DpReport> =
                    serde_json::from_str(j).with_context(|| format!("round {}'s privacy reports", r.round))?;
                for (c, rep) in reports {
                    let newer = clients.get(&c).is_none_or(|old| rep.steps >= old.steps);
                    if newer {
                        clients.insert(c, rep);
                    }
                }
            }
        }
        let worst_epsilon = clients.values().map(|r| r.epsilon).reduce(f64::max);
        Ok(PrivacySummary {
            init: self.init_privacy.clone(),
            dp: self.spec.dp.clone(),
            clients,
            worst_epsilon,
            left: self.engine().left().clone(),
        })
    }

    /// The largest ε any client has reported (None in a run without DP: the store is not read then).
    fn worst_epsilon(&self) -> Option<f64> {
        self.spec.dp.as_ref()?;
        self.privacy_summary().ok().and_then(|p| p.worst_epsilon)
    }

    /// The status document served by `GetStatus`.
    pub fn status_json(&self) -> Result<String> {
        let (phase, completed, clients, outcome) = {
            let e = self.engine();
            (
                e.phase_summary(),
                e.completed_rounds(),
                e.clients().keys().cloned().collect::<Vec<_>>(),
                e.outcome().cloned(),
            )
        };
        let rounds = self.store().rounds(&self.run_id)?;
        let ledger = self.ledger()?;
        let v = serde_json::json!({
            "run_id": self.run_id,
            "phase": phase,
            "completed_rounds": completed,
            "clients": clients,
            "outcome": outcome.map(|o| serde_json::json!({"status": o.status, "message": o.message, "global_sha256": o.global_sha256})),
            "rounds": rounds,
            "ledger_totals": ledger.round_totals(),
            "ledger": ledger.entries(),
            "analytic_min_bytes_per_client": self.analytic_min_bytes,
            "base_folds": self.base_folds(),
            "privacy": self.privacy_summary()?,
        });
        Ok(serde_json::to_string_pretty(&v)?)
    }

    /// Polls until the run is finished (for the `run` command and tests).
    pub async fn wait_finished(&self, poll: Duration) {
        loop {
            let finished = {
                let _events = self.event_guard();
                self.engine().outcome().is_some()
            };
            if finished {
                return;
            }
            tokio::select! {
                _ = self.notify.notified() => {}
                _ = tokio::time::sleep(poll) => {}
            }
        }
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

/// The store's row for a ledger entry.
pub fn ledger_row(e: &LedgerEntry) -> LedgerRow {
    LedgerRow {
        round: e.round,
        client: e.client.clone(),
        direction: match e.direction {
            Direction::Up => "up".into(),
            Direction::Down => "down".into(),
        },
        transfer: match e.transfer {
            Transfer::Init => "init".into(),
            Transfer::Round => "round".into(),
        },
        payload_bytes: e.payload_bytes,
        message_bytes: e.message_bytes,
        wire_bytes: e.wire_bytes,
        analytic_min_bytes: e.analytic_min_bytes,
    }
}

/// The update blob's tensors as the engine wants them, with validation errors as strings.
pub fn tensors_of(bytes: &[u8]) -> std::result::Result<TensorSet, String> {
    fedsb_common::wire::decode_blob(bytes, &Device::Cpu).map_err(|e| e.to_string())
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
