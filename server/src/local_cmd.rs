//! `fedsb-server local`: its arguments and the command — a data split, certificates, a coordinator and N
//! client processes on loopback, all from flags (see `fedsb_server::local`).
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use fedsb_server::config::RunConfig;

/// The flags of `fedsb-server local`.
#[derive(Args, Debug)]
pub(crate) struct LocalArgs {
    /// Number of client processes.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Rounds.
    #[arg(long, default_value_t = 5)]
    rounds: u64,
    /// Asset folder of scripts/fetch-assets.sh (default $FEDSB_ASSETS or ~/.cache/fedsb/assets).
    #[arg(long)]
    assets: Option<PathBuf>,
    /// Model (default: all-MiniLM-L6-v2 from the assets).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Training data to split over the clients (default: Rotten Tomatoes train).
    #[arg(long)]
    train: Option<PathBuf>,
    /// Held-out data the coordinator evaluates on (default: Rotten Tomatoes test).
    #[arg(long)]
    eval: Option<PathBuf>,
    /// Examples the coordinator evaluates each round (0: all; default 1000 for labelled data, 64 for
    /// prompt/response or text data, whose held-out loss costs a forward pass of a causal LM per example).
    #[arg(long)]
    eval_limit: Option<usize>,
    /// Batch size of the coordinator's evaluation (default: --batch-size).
    #[arg(long)]
    eval_batch_size: Option<usize>,
    /// Causal LMs with prompt/response data: each round (and before the first) also greedy-decode the first N
    /// evaluated examples and report the exact match of their final answer (`#### N`) with the reference.
    /// Decoding is slow on a CPU (hundreds of tokens per example): keep N small. 0: off.
    #[arg(long, default_value_t = 0)]
    exact_match: usize,
    /// Longest generated answer for --exact-match, in tokens.
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// `iid`, or `dirichlet` (non-IID by label, see --dirichlet-alpha).
    #[arg(long, default_value = "iid")]
    split: String,
    /// Concentration of the Dirichlet split (smaller: more skewed).
    #[arg(long, default_value_t = 0.5)]
    dirichlet_alpha: f64,
    /// First examples of the training data kept as the coordinator's public data for the LoRA-SB init and given
    /// to no client (default: 256 for labelled data, 64 for prompt/response or text data).
    #[arg(long)]
    public_examples: Option<usize>,
    /// LoRA-SB init: public examples in the gradient estimate (default: one --batch-size batch).
    #[arg(long)]
    init_samples: Option<usize>,
    /// LoRA-SB init: step size η of the approximated first update `−η·sign(G)`. Default for labelled data: the
    /// first local step's learning rate. For prompt/response or text data: what the paper's code would use with
    /// the clients' data as one dataset, Adam's first step under the warm-up of one pass over it in batches of
    /// --batch-size (lr / ⌈warmup-ratio · examples / batch-size⌉) — on short rounds a round's first rate is the
    /// peak rate, and that step costs a causal LM more than a few rounds recover (see README "Results").
    #[arg(long)]
    init_eta: Option<f64>,
    /// Format of the frozen base weights, for the coordinator and every client: auto (as the checkpoint stores
    /// them), f32, bf16, f16, or a GGUF block format (q8_0, q4_0, q4_k, ...).
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// What products with bf16/f16/quantized weights compute in, for the coordinator and every client: auto
    /// (bf16 where the CPU has fast bf16 units: AMX, or AVX-512 BF16 on AMD), f32, bf16.
    #[arg(long, default_value = "auto", env = "FEDSB_COMPUTE_DTYPE")]
    compute_dtype: String,
    /// Method: fedsb (LoRA-SB, R averaged), or the baselines fedit (LoRA, A and B averaged), ffa-lora (LoRA
    /// with A frozen, B averaged), fedex-lora (FedIT plus the residual folded into the base weights) and flora
    /// (the stacked product merged into the base weights, adapters restarted each round).
    #[arg(long, default_value = "fedsb")]
    method: fedsb_common::Method,
    /// Adapter rank.
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// Adapted modules, comma-separated (default: q,k,v,o,gate,up,down for Llama-style models;
    /// query,value,attention.output.dense,output.dense for BERT).
    #[arg(long, value_delimiter = ',')]
    targets: Option<Vec<String>>,
    /// Local optimizer steps per round.
    #[arg(long, default_value_t = 40)]
    local_steps: usize,
    /// Local batch size.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Local peak learning rate.
    #[arg(long, default_value_t = 5e-3)]
    lr: f64,
    /// Learning-rate schedule within a round's local steps: constant, linear or cosine (decay to 0 after the
    /// warm-up; every round restarts it).
    #[arg(long, default_value = "linear")]
    schedule: String,
    /// Fraction of a round's local steps of linear warm-up.
    #[arg(long, default_value_t = 0.06)]
    warmup_ratio: f64,
    /// Longest sequence in tokens.
    #[arg(long, default_value_t = 64)]
    max_len: usize,
    /// Updates needed to close a round at its deadline (default: all clients).
    #[arg(long)]
    quorum: Option<usize>,
    /// Seconds a round stays open.
    #[arg(long, default_value_t = 1800)]
    deadline_secs: u64,
    /// Wire dtype of updates: f32, bf16, f16.
    #[arg(long, default_value = "f32")]
    wire_dtype: String,
    /// Seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Work folder (certificates, shards, state, logs).
    #[arg(long, default_value = "fedsb-local")]
    work_dir: PathBuf,
    /// The fedsb-client executable (default: next to this one).
    #[arg(long)]
    client_exe: Option<PathBuf>,
    /// Show the clients' output here instead of writing WORK_DIR/client-N.log.
    #[arg(long)]
    show_client_output: bool,
    /// Require DP-SGD of every client with this privacy budget ε for the whole run (record-level, per client;
    /// each client calibrates its noise to spend it in --rounds rounds).
    #[arg(long)]
    dp_epsilon: Option<f64>,
    /// DP δ (default: 1/N² for the smallest client's N examples, which is below 1/N as required).
    #[arg(long, requires = "dp_epsilon")]
    dp_delta: Option<f64>,
    /// DP per-sample clipping norm C.
    #[arg(long, default_value_t = 1.0, requires = "dp_epsilon")]
    dp_max_grad_norm: f64,
    /// A fixed DP noise multiplier σ instead of the per-client calibration (the budget is still enforced: a
    /// client stops when the next round would exceed it).
    #[arg(long, requires = "dp_epsilon")]
    dp_noise_multiplier: Option<f64>,
    /// Mark the LoRA-SB init data as private (it then is not covered by the budget, and the run says so).
    #[arg(long)]
    init_data_private: bool,
}

/// `fedsb-server local`: a whole federation on this machine.
pub(crate) fn local(a: LocalArgs) -> Result<()> {
    use fedsb_server::config::{AdapterSection, ClientsPerRound, EvalSection, InitSection, ModelSection, QuorumMiss};
    use fedsb_server::local::{LocalFederation, Split};
    fedsb_common::frozen::set_compute_dtype(a.compute_dtype.parse()?)?;
    a.dtype.parse::<fedsb_common::frozen::WeightDtype>().context("--dtype")?;
    let assets = a.assets.clone().unwrap_or_else(fedsb_common::assets::default_assets_dir);
    let model = a.model.clone().unwrap_or_else(|| assets.join("models/all-minilm-l6-v2"));
    let train = a.train.clone().unwrap_or_else(|| assets.join("data/rotten-tomatoes/train.jsonl"));
    let eval = a.eval.clone().unwrap_or_else(|| assets.join("data/rotten-tomatoes/test.jsonl"));
    for p in [&model, &train, &eval] {
        if !p.exists() {
            bail!(
                "{} is missing: run `bash scripts/fetch-assets.sh` first (or pass --model/--train/--eval)",
                p.display()
            );
        }
    }
    // The data's task picks the defaults: a causal LM's evaluation and init cost far more per example.
    let train_ds = fedsb_common::train::Dataset::load_jsonl(&train).context("the training data")?;
    let task = train_ds.task();
    let labelled = task == fedsb_common::model::TaskKind::Classification;
    let split = match a.split.as_str() {
        "iid" => Split::Iid,
        "dirichlet" if !labelled => bail!(
            "--split dirichlet skews the shards by label, and {} has no labels (prompt/response or text data): use \
             --split iid",
            train.display()
        ),
        "dirichlet" => Split::Dirichlet(a.dirichlet_alpha),
        o => bail!("unknown --split `{o}` (iid, dirichlet)"),
    };
    let public_examples = a.public_examples.unwrap_or(if labelled { 256 } else { 64 });
    let eval_limit = a.eval_limit.unwrap_or(if labelled { 1000 } else { 64 });
    if a.exact_match > 0 && labelled {
        bail!("--exact-match scores generated answers of a causal LM; {} is labelled data", train.display());
    }
    if a.init_eta.is_some_and(|e| !(e.is_finite() && e > 0.0)) {
        bail!("--init-eta must be a positive number");
    }
    let client_exe = match a.client_exe.clone() {
        Some(p) => p,
        None => std::env::current_exe()?.with_file_name("fedsb-client"),
    };
    if !client_exe.exists() {
        bail!(
            "{} not found: build it (`cargo build --release -p fedsb-client`) or pass --client-exe",
            client_exe.display()
        );
    }
    let local = fedsb_common::spec::LocalTraining {
        steps: Some(a.local_steps),
        batch_size: a.batch_size,
        lr: a.lr,
        max_len: a.max_len,
        schedule: a.schedule.parse()?,
        warmup_ratio: a.warmup_ratio,
        ..Default::default()
    };
    // A causal LM's init step: by default the one of the paper's code over the clients' data (see
    // `paper_init_eta`); the coordinator's own default, a round's first learning rate, is the peak rate on short
    // rounds and costs SmolLM2 more than a few rounds recover. Labelled data keeps the coordinator's default.
    let init_eta = match a.init_eta {
        Some(e) => Some(e),
        None if !labelled => {
            let examples = train_ds.len().saturating_sub(public_examples);
            let eta = fedsb_server::local::paper_init_eta(&local, examples);
            tracing::info!(
                "LoRA-SB init step η = {eta:.3e}: lr / warm-up steps of one pass over the clients' {examples} examples \
                 in batches of {} (--init-eta sets it)",
                a.batch_size
            );
            Some(eta)
        }
        None => None,
    };
    let config = RunConfig {
        rounds: a.rounds,
        clients_per_round: ClientsPerRound::Count(a.clients),
        min_clients: Some(a.clients),
        quorum: Some(a.quorum.unwrap_or(a.clients)),
        round_deadline_secs: a.deadline_secs,
        on_quorum_miss: QuorumMiss::Retry,
        max_retries: 2,
        seed: a.seed,
        method: a.method,
        weighting: fedsb_common::aggregate::Weighting::Uniform,
        wire_dtype: a.wire_dtype.parse()?,
        max_update_bytes: None,
        state_dir: a.work_dir.join("state"),
        model: ModelSection { path: model.clone(), sha256: None, num_labels: 2, dtype: a.dtype.clone() },
        adapter: AdapterSection { rank: a.rank, alpha: None, targets: a.targets.clone() },
        local,
        init: InitSection {
            data: a.work_dir.join("data/public.jsonl"),
            samples: Some(a.init_samples.unwrap_or(a.batch_size).min(public_examples)),
            batch_size: a.batch_size,
            eta: init_eta,
            power_iters: 6,
            oversample: 8,
            private: a.init_data_private,
            grad_memory_mib: fedsb_common::adapter::init::DEFAULT_GRAD_MEMORY_MIB,
        },
        eval: Some(EvalSection {
            data: eval.clone(),
            limit: (eval_limit > 0).then_some(eval_limit),
            batch_size: a.eval_batch_size.unwrap_or(a.batch_size),
            exact_match: a.exact_match,
            max_new_tokens: a.max_new_tokens,
        }),
        dp: a.dp_epsilon.map(|eps| fedsb_common::dp::DpSpec {
            max_grad_norm: a.dp_max_grad_norm,
            target_epsilon: eps,
            // NaN: chosen by `LocalFederation::prepare` from the shards' sizes (1/N² of the smallest).
            delta: a.dp_delta.unwrap_or(f64::NAN),
            noise_multiplier: a.dp_noise_multiplier,
            rounds: 0,
            allow_insecure_noise: std::env::var_os("FEDSB_DP_INSECURE_TEST_SEED").is_some(),
        }),
    };
    if a.work_dir.join("state").exists() {
        bail!("{} already holds a run; pick another --work-dir or remove it", a.work_dir.display());
    }
    let fed = LocalFederation {
        clients: a.clients,
        model,
        train,
        eval: Some(eval),
        public_examples,
        split,
        config,
        work_dir: a.work_dir.clone(),
        client_exe,
        client_output_inherit: a.show_client_output,
        client_args: vec!["--dtype".into(), a.dtype.clone(), "--compute-dtype".into(), a.compute_dtype.clone()],
    };
    let cfg = fed.prepare()?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let outcome = rt.block_on(fed.run(cfg))?;
    if outcome.status != "completed" {
        bail!("the run failed: {}", outcome.message);
    }
    Ok(())
}
