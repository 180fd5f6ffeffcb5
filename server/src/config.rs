//! [`RunConfig`]: a federated run, read from a TOML file (flags may override some fields).
//!
//! ```toml
//! rounds = 5
//! clients_per_round = 4        # a count, or a fraction of the joined clients (0.5)
//! min_clients = 4              # joined clients needed to open a round (default: the sample size)
//! quorum = 3                   # updates needed to close a round at its deadline (default: all sampled)
//! round_deadline_secs = 900
//! on_quorum_miss = "retry"     # or "stop"
//! max_retries = 2
//! seed = 42
//! method = "fedsb"
//! weighting = "uniform"        # or "num-examples"
//! wire_dtype = "f32"           # or "bf16", "f16"
//! state_dir = "fedsb-state"
//!
//! [model]
//! path = "~/.cache/fedsb/assets/models/all-minilm-l6-v2"
//! sha256 = "…"                 # optional: refuse to start when the weights differ
//! num_labels = 2
//!
//! [adapter]
//! rank = 16
//! targets = ["query", "value", "attention.output.dense", "output.dense"]
//!
//! [local]                      # fedsb_common::spec::LocalTraining
//! steps = 20
//! batch_size = 32
//! lr = 5e-3
//!
//! [init]                       # the LoRA-SB init, on data the coordinator holds (public/proxy data)
//! data = "public.jsonl"
//! samples = 32
//!
//! [eval]                       # optional: the coordinator evaluates every new global model
//! data = "test.jsonl"
//! limit = 1000
//! # exact_match = 16           # causal LMs: greedy-decode the first 16 and score their final answers
//! # max_new_tokens = 256
//!
//! [dp]                         # optional: DP-SGD required of every client (fedsb_common::dp::DpSpec)
//! max_grad_norm = 0.1          # C, per-sample clipping norm
//! target_epsilon = 3.0         # each client's budget for the whole run
//! delta = 1e-5                 # must be below 1/(each client's local dataset size)
//! # noise_multiplier = 1.1     # fixed σ; default: each client calibrates σ to spend its budget in `rounds` rounds
//! ```
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use fedsb_common::Method;
use fedsb_common::aggregate::Weighting;
use fedsb_common::spec::LocalTraining;
use fedsb_common::wire::WireDtype;
use serde::{Deserialize, Serialize};

/// How many clients a round samples.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ClientsPerRound {
    /// Exactly this many (when that many have joined).
    Count(usize),
    /// This fraction of the joined clients (at least one).
    Fraction(f64),
}

impl ClientsPerRound {
    /// The sample size among `joined` clients.
    pub fn sample_size(self, joined: usize) -> usize {
        match self {
            ClientsPerRound::Count(n) => n.min(joined),
            ClientsPerRound::Fraction(f) => ((f * joined as f64).ceil() as usize).clamp(1, joined.max(1)),
        }
    }
}

/// What a round that misses its quorum leads to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum QuorumMiss {
    /// Sample again (up to `max_retries` times), then stop.
    Retry,
    /// Stop the run as failed.
    Stop,
}

/// The base model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Hugging Face folder or GGUF file.
    pub path: PathBuf,
    /// Expected sha256 of the weights (checked at start when given).
    #[serde(default)]
    pub sha256: Option<String>,
    /// Classes of the classification head (encoders).
    #[serde(default = "two")]
    pub num_labels: usize,
    /// Format the coordinator holds the frozen weights in for the init and the evaluation: `auto` (as stored),
    /// f32, bf16, f16, or a GGUF block format (see `fedsb_common::frozen`).
    #[serde(default = "auto")]
    pub dtype: String,
}

fn auto() -> String {
    "auto".into()
}

fn two() -> usize {
    2
}

/// The adapter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterSection {
    /// Rank r.
    pub rank: usize,
    /// LoRA alpha (default r: scale 1).
    #[serde(default)]
    pub alpha: Option<f64>,
    /// Target modules (default: all attention and MLP projections for Llama; query, value,
    /// attention.output.dense, output.dense for BERT).
    #[serde(default)]
    pub targets: Option<Vec<String>>,
}

/// The LoRA-SB init the coordinator computes once.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitSection {
    /// JSONL data the coordinator holds (public or proxy data — never a client's private data).
    pub data: PathBuf,
    /// Set when `data` is (part of) the clients' private data: the init is then computed without DP and is
    /// **not** covered by any client's privacy budget, which the coordinator states loudly at start and in the
    /// run's status.
    #[serde(default)]
    pub private: bool,
    /// Samples for the gradient estimate (default: max(|D|/1000, one batch)).
    #[serde(default)]
    pub samples: Option<usize>,
    /// Batch size of the gradient estimate.
    #[serde(default = "init_batch")]
    pub batch_size: usize,
    /// Step size η (default: the first local step's learning rate).
    #[serde(default)]
    pub eta: Option<f64>,
    /// Randomized-SVD power iterations.
    #[serde(default = "six")]
    pub power_iters: usize,
    /// Randomized-SVD oversampling.
    #[serde(default = "eight")]
    pub oversample: usize,
    /// Memory for the full-weight gradients the init sums, MiB: layers are taken in groups that fit (default
    /// 1024; see `InitConfig::grad_memory_mib`).
    #[serde(default = "grad_memory_mib")]
    pub grad_memory_mib: usize,
}

fn grad_memory_mib() -> usize {
    fedsb_common::adapter::init::DEFAULT_GRAD_MEMORY_MIB
}

fn init_batch() -> usize {
    32
}
fn six() -> usize {
    6
}
fn eight() -> usize {
    8
}

/// Evaluation of every new global model by the coordinator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    /// Held-out JSONL data.
    pub data: PathBuf,
    /// Use only the first N examples.
    #[serde(default)]
    pub limit: Option<usize>,
    /// Batch size.
    #[serde(default = "init_batch")]
    pub batch_size: usize,
    /// Causal LMs with prompt/response data: also greedy-decode the first N of the evaluated examples each round
    /// and report the exact match of their final answer (`#### N`, or the last number) with the reference
    /// (0: off). Decoding costs far more than the loss, so keep N small on a CPU.
    #[serde(default)]
    pub exact_match: usize,
    /// Longest generated answer for exact match, in tokens.
    #[serde(default = "max_new_tokens")]
    pub max_new_tokens: usize,
}

fn max_new_tokens() -> usize {
    256
}

impl EvalSection {
    /// Evaluation of `data`: all of it (or the first `limit` examples) in batches of `batch_size`, no exact match.
    pub fn new(data: PathBuf, limit: Option<usize>, batch_size: usize) -> Self {
        Self { data, limit, batch_size, exact_match: 0, max_new_tokens: max_new_tokens() }
    }
}

/// A federated run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Rounds to complete.
    pub rounds: u64,
    /// Clients sampled per round.
    pub clients_per_round: ClientsPerRound,
    /// Joined clients needed before a round opens (default: the sample size's count, or 1).
    #[serde(default)]
    pub min_clients: Option<usize>,
    /// Updates needed to close a round at its deadline (default: every sampled client).
    #[serde(default)]
    pub quorum: Option<usize>,
    /// Seconds a round stays open.
    #[serde(default = "deadline")]
    pub round_deadline_secs: u64,
    /// What a missed quorum leads to.
    #[serde(default = "retry")]
    pub on_quorum_miss: QuorumMiss,
    /// Re-samplings of a round that missed its quorum before the run stops.
    #[serde(default = "two_u32")]
    pub max_retries: u32,
    /// Seed of sampling, init and training.
    #[serde(default = "seed")]
    pub seed: u64,
    /// Aggregation method: `fedsb`, `fedit`, `ffa-lora`, `fedex-lora` or `flora` (an unknown name is refused
    /// when the file is read).
    #[serde(default = "fedsb")]
    pub method: Method,
    /// Weighting of client updates.
    #[serde(default = "uniform")]
    pub weighting: Weighting,
    /// The dtype updates travel in.
    #[serde(default)]
    pub wire_dtype: WireDtype,
    /// Largest update blob accepted, in bytes (default: 4 × the f32 size of the trainable set, set at start).
    #[serde(default)]
    pub max_update_bytes: Option<u64>,
    /// Where the coordinator keeps its database and blobs.
    #[serde(default = "state_dir")]
    pub state_dir: PathBuf,
    /// The base model.
    pub model: ModelSection,
    /// The adapter.
    pub adapter: AdapterSection,
    /// Local training.
    #[serde(default)]
    pub local: LocalTraining,
    /// The LoRA-SB init.
    pub init: InitSection,
    /// Evaluation of the global model.
    #[serde(default)]
    pub eval: Option<EvalSection>,
    /// DP-SGD required of every client (absent: no DP).
    #[serde(default)]
    pub dp: Option<fedsb_common::dp::DpSpec>,
}

fn deadline() -> u64 {
    900
}
fn retry() -> QuorumMiss {
    QuorumMiss::Retry
}
fn two_u32() -> u32 {
    2
}
fn seed() -> u64 {
    42
}
fn fedsb() -> Method {
    Method::FedSb
}
fn uniform() -> Weighting {
    Weighting::Uniform
}
fn state_dir() -> PathBuf {
    PathBuf::from("fedsb-state")
}

/// Expands a leading `~/` to the home folder.
pub fn expand_home(p: &Path) -> PathBuf {
    match p.to_str().and_then(|s| s.strip_prefix("~/")) {
        Some(rest) => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(rest),
        None => p.to_path_buf(),
    }
}

impl RunConfig {
    /// Reads a TOML file; relative paths inside are taken relative to the file's folder.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut cfg: RunConfig = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let fix = |p: &Path| -> PathBuf {
            let p = expand_home(p);
            if p.is_relative() { base.join(p) } else { p }
        };
        cfg.model.path = fix(&cfg.model.path);
        cfg.init.data = fix(&cfg.init.data);
        cfg.state_dir = fix(&cfg.state_dir);
        if let Some(e) = &mut cfg.eval {
            e.data = fix(&e.data);
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the settings, with messages that say what to change.
    pub fn validate(&self) -> Result<()> {
        if self.rounds == 0 {
            bail!("rounds must be at least 1");
        }
        self.model.dtype.parse::<fedsb_common::frozen::WeightDtype>().context("[model] dtype")?;
        match self.clients_per_round {
            ClientsPerRound::Count(0) => bail!("clients_per_round must be at least 1"),
            ClientsPerRound::Fraction(f) if !(f > 0.0 && f <= 1.0) => {
                bail!("clients_per_round as a fraction must be in (0, 1], got {f}")
            }
            _ => {}
        }
        if let (Some(q), ClientsPerRound::Count(n)) = (self.quorum, self.clients_per_round)
            && (q == 0 || q > n)
        {
            bail!("quorum {q} must be between 1 and clients_per_round {n}");
        }
        if self.round_deadline_secs == 0 {
            bail!("round_deadline_secs must be positive");
        }
        if self.adapter.rank == 0 {
            bail!("adapter.rank must be at least 1");
        }
        self.local.validate()?;
        if let Some(e) = &self.eval {
            if e.batch_size == 0 {
                bail!("[eval] batch_size must be at least 1");
            }
            if e.exact_match > 0 && e.max_new_tokens == 0 {
                bail!("[eval] max_new_tokens must be at least 1 when exact_match is on");
            }
        }
        if let Some(dp) = &self.dp {
            dp.validate().context("the [dp] section")?;
            if dp.rounds != 0 && dp.rounds != self.rounds {
                bail!("dp.rounds is filled in from `rounds`; leave it out");
            }
        }
        Ok(())
    }

    /// The DP spec sent to clients: the `[dp]` section with `rounds` filled in.
    pub fn dp_spec(&self) -> Option<fedsb_common::dp::DpSpec> {
        self.dp.clone().map(|mut d| {
            d.rounds = self.rounds;
            d
        })
    }

    /// Joined clients needed before a round opens.
    pub fn min_clients(&self) -> usize {
        self.min_clients.unwrap_or(match self.clients_per_round {
            ClientsPerRound::Count(n) => n,
            ClientsPerRound::Fraction(_) => 1,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
rounds = 2
clients_per_round = 3
[model]
path = "m"
[adapter]
rank = 8
[init]
data = "public.jsonl"
"#;

    #[test]
    fn minimal_config_gets_defaults_and_relative_paths() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("run.toml");
        std::fs::write(&p, MIN).unwrap();
        let c = RunConfig::load(&p).unwrap();
        assert_eq!(c.min_clients(), 3);
        assert_eq!(c.init.data, dir.path().join("public.jsonl"));
        assert_eq!(c.model.num_labels, 2);
        assert_eq!(c.local.batch_size, 16);
        assert_eq!(ClientsPerRound::Fraction(0.5).sample_size(5), 3);
        assert_eq!(ClientsPerRound::Count(4).sample_size(2), 2);
        assert!(c.eval.is_none());
        std::fs::write(&p, format!("{MIN}[eval]\ndata = \"e.jsonl\"\nexact_match = 8\n")).unwrap();
        let e = RunConfig::load(&p).unwrap().eval.unwrap();
        assert_eq!((e.exact_match, e.max_new_tokens, e.batch_size), (8, 256, 32));
        assert_eq!(e.data, dir.path().join("e.jsonl"));
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("run.toml");
        for (bad, needle) in [
            (MIN.replace("rounds = 2", "rounds = 0"), "rounds"),
            (MIN.replace("clients_per_round = 3", "clients_per_round = 1.5"), "fraction"),
            (format!("quorum = 5\n{MIN}"), "quorum"),
            (format!("method = \"fedavg\"\n{MIN}"), "fedavg"),
            (format!("roundz = 1\n{MIN}"), "roundz"),
            (format!("{MIN}[dp]\nmax_grad_norm = 0.1\ntarget_epsilon = 3\ndelta = 2\n"), "delta"),
            (format!("{MIN}[dp]\nmax_grad_norm = -1\ntarget_epsilon = 3\ndelta = 1e-5\n"), "max_grad_norm"),
            (format!("{MIN}[dp]\nmax_grad_norm = 0.1\ndelta = 1e-5\n"), "target_epsilon"),
            (format!("{MIN}[eval]\ndata = \"e.jsonl\"\nexact_match = 4\nmax_new_tokens = 0\n"), "max_new_tokens"),
            (format!("{MIN}[eval]\ndata = \"e.jsonl\"\nbatch_size = 0\n"), "batch_size"),
            (format!("{MIN}[eval]\ndata = \"e.jsonl\"\nexact_matches = 4\n"), "exact_matches"),
        ] {
            std::fs::write(&p, bad).unwrap();
            let e = format!("{:#}", RunConfig::load(&p).unwrap_err());
            assert!(e.contains(needle), "{e}");
        }
    }
}
