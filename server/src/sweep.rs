//! Experiment sweeps (`fedsb-server sweep`): one TOML file describes methods × ranks × seeds × splits; each
//! combination runs as its own `fedsb-server local` process, and the results land in one folder: `results.csv`,
//! `results.md`, `rounds.csv` and two SVG charts (accuracy vs round, accuracy vs cumulative bytes).
//!
//! ```toml
//! name = "minilm-rt"                   # optional (default: the file's name)
//! clients = 4
//! rounds = 3
//! methods = ["fedsb", "fedit", "ffa-lora", "fedex-lora", "flora"]
//! ranks = [16]                         # every method's ranks, unless [method.NAME] says otherwise
//! seeds = [42]
//! splits = ["iid", "dirichlet"]
//! dirichlet_alpha = 0.5
//!
//! [local]                              # flags of `fedsb-server local` passed to every run
//! local_steps = 20
//!
//! [method.fedsb]                       # per-method: ranks, and any [local] key
//! ranks = [16, 64]
//! ```
//!
//! Privacy sweeps: `dp_epsilons = [1.0, 3.0, 8.0]` runs every configuration once per privacy budget ε (DP-SGD
//! required of every client, `--dp-epsilon`), plus once without DP unless `dp_non_private = false`; `[local]`
//! may set `dp_delta` and `dp_max_grad_norm`. The report then has an accuracy-vs-ε table.
//!
//! The output folder holds `runs/<name>/` (each run's work folder, `state/metrics.jsonl` among others),
//! `runs/<name>.log` (its output) and `runs/<name>/sweep-run.json` (its flags, exit and wall time). A run
//! whose folder shows it completed with the same flags is skipped, so an interrupted sweep resumes; any other
//! run folder is removed and the run started again. See `docs/sweeps.md`.
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use fedsb_common::comm::human_bytes;
use fedsb_common::comm::planner::Method;
use serde::{Deserialize, Serialize};

pub mod plot;

use plot::{Chart, PALETTE, Scale, Series};

/// Errors of a sweep.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    /// The sweep file is not valid TOML or does not match the format.
    #[error("{}: {source}", path.display())]
    Toml {
        /// The sweep file.
        path: PathBuf,
        /// The parser's error (with line and column).
        #[source]
        source: toml::de::Error,
    },
    /// The sweep parses but describes something invalid.
    #[error("invalid sweep: {0}")]
    Invalid(String),
    /// A filesystem operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A run's `metrics.jsonl` has a line that is not a round's metrics.
    #[error("{}:{line}: {message}", path.display())]
    Metrics {
        /// The metrics file.
        path: PathBuf,
        /// The line number (from 1).
        line: usize,
        /// What is wrong.
        message: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SweepError + '_ {
    move |source| SweepError::Io { path: path.to_path_buf(), source }
}

fn invalid(msg: impl Into<String>) -> SweepError {
    SweepError::Invalid(msg.into())
}

/// How a run's training data is split over its clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SplitKind {
    /// IID: shuffled, equal shards.
    Iid,
    /// Non-IID: Dirichlet(α) label proportions per client (α = the sweep's `dirichlet_alpha`).
    Dirichlet,
}

impl SplitKind {
    /// The name in sweep files, run names and `--split`.
    pub fn name(self) -> &'static str {
        match self {
            SplitKind::Iid => "iid",
            SplitKind::Dirichlet => "dirichlet",
        }
    }

    fn parse(s: &str) -> Result<Self, SweepError> {
        match s {
            "iid" => Ok(SplitKind::Iid),
            "dirichlet" => Ok(SplitKind::Dirichlet),
            o => Err(invalid(format!("unknown split `{o}` in `splits` (iid, dirichlet)"))),
        }
    }
}

/// Flags of `fedsb-server local` a sweep sets for every run (`[local]`) or per method (`[method.NAME]`).
/// Unset keys keep the `local` command's defaults.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalOptions {
    /// `--local-steps`: local optimizer steps per round.
    pub local_steps: Option<usize>,
    /// `--batch-size`: local batch size.
    pub batch_size: Option<usize>,
    /// `--lr`: local peak learning rate.
    pub lr: Option<f64>,
    /// `--schedule`: constant, linear or cosine.
    pub schedule: Option<String>,
    /// `--warmup-ratio`: fraction of a round's local steps of warm-up.
    pub warmup_ratio: Option<f64>,
    /// `--max-len`: longest sequence in tokens.
    pub max_len: Option<usize>,
    /// `--eval-limit`: examples evaluated each round (0: all).
    pub eval_limit: Option<usize>,
    /// `--public-examples`: training examples kept as the coordinator's public init data.
    pub public_examples: Option<usize>,
    /// `--quorum`: updates needed to close a round at its deadline.
    pub quorum: Option<usize>,
    /// `--deadline-secs`: seconds a round stays open.
    pub deadline_secs: Option<u64>,
    /// `--wire-dtype`: f32, bf16 or f16.
    pub wire_dtype: Option<String>,
    /// `--dp-delta`: δ of DP runs (default: 1/N² of the smallest shard).
    pub dp_delta: Option<f64>,
    /// `--dp-max-grad-norm`: per-sample clipping norm C of DP runs.
    pub dp_max_grad_norm: Option<f64>,
    /// `--model` (relative paths are relative to the sweep file).
    pub model: Option<PathBuf>,
    /// `--train` (relative to the sweep file).
    pub train: Option<PathBuf>,
    /// `--eval` (relative to the sweep file).
    pub eval: Option<PathBuf>,
    /// Extra arguments appended verbatim to the `local` command line (flags this format does not know yet).
    pub extra_args: Option<Vec<String>>,
}

impl LocalOptions {
    /// `self`'s keys where set, else `base`'s.
    pub fn over(&self, base: &LocalOptions) -> LocalOptions {
        LocalOptions {
            local_steps: self.local_steps.or(base.local_steps),
            batch_size: self.batch_size.or(base.batch_size),
            lr: self.lr.or(base.lr),
            schedule: self.schedule.clone().or_else(|| base.schedule.clone()),
            warmup_ratio: self.warmup_ratio.or(base.warmup_ratio),
            max_len: self.max_len.or(base.max_len),
            eval_limit: self.eval_limit.or(base.eval_limit),
            public_examples: self.public_examples.or(base.public_examples),
            quorum: self.quorum.or(base.quorum),
            deadline_secs: self.deadline_secs.or(base.deadline_secs),
            wire_dtype: self.wire_dtype.clone().or_else(|| base.wire_dtype.clone()),
            dp_delta: self.dp_delta.or(base.dp_delta),
            dp_max_grad_norm: self.dp_max_grad_norm.or(base.dp_max_grad_norm),
            model: self.model.clone().or_else(|| base.model.clone()),
            train: self.train.clone().or_else(|| base.train.clone()),
            eval: self.eval.clone().or_else(|| base.eval.clone()),
            extra_args: self.extra_args.clone().or_else(|| base.extra_args.clone()),
        }
    }

    /// The `local` flags for the set keys, in a fixed order.
    pub fn args(&self) -> Vec<String> {
        let mut a = Vec::new();
        let mut push = |flag: &str, v: Option<String>| {
            if let Some(v) = v {
                a.push(flag.to_string());
                a.push(v);
            }
        };
        push("--local-steps", self.local_steps.map(|v| v.to_string()));
        push("--batch-size", self.batch_size.map(|v| v.to_string()));
        push("--lr", self.lr.map(|v| v.to_string()));
        push("--schedule", self.schedule.clone());
        push("--warmup-ratio", self.warmup_ratio.map(|v| v.to_string()));
        push("--max-len", self.max_len.map(|v| v.to_string()));
        push("--eval-limit", self.eval_limit.map(|v| v.to_string()));
        push("--public-examples", self.public_examples.map(|v| v.to_string()));
        push("--quorum", self.quorum.map(|v| v.to_string()));
        push("--deadline-secs", self.deadline_secs.map(|v| v.to_string()));
        push("--wire-dtype", self.wire_dtype.clone());
        push("--dp-delta", self.dp_delta.map(|v| v.to_string()));
        push("--dp-max-grad-norm", self.dp_max_grad_norm.map(|v| v.to_string()));
        push("--model", self.model.as_ref().map(|p| p.display().to_string()));
        push("--train", self.train.as_ref().map(|p| p.display().to_string()));
        push("--eval", self.eval.as_ref().map(|p| p.display().to_string()));
        a.extend(self.extra_args.iter().flatten().cloned());
        a
    }

    /// `key = value` for the set keys (for the report).
    fn describe(&self) -> Vec<String> {
        self.args().chunks(2).map(|c| c.join(" ")).collect()
    }

    fn validate(&self, section: &str, clients: usize) -> Result<(), SweepError> {
        let bad = |key: &str, why: &str| invalid(format!("[{section}] {key}: {why}"));
        for (key, v) in [("local_steps", self.local_steps), ("batch_size", self.batch_size), ("max_len", self.max_len)]
        {
            if v == Some(0) {
                return Err(bad(key, "must be positive"));
            }
        }
        if let Some(lr) = self.lr
            && !(lr.is_finite() && lr > 0.0)
        {
            return Err(bad("lr", "must be a positive number"));
        }
        if let Some(w) = self.warmup_ratio
            && !(0.0..1.0).contains(&w)
        {
            return Err(bad("warmup_ratio", "must be in [0, 1)"));
        }
        if let Some(q) = self.quorum
            && (q == 0 || q > clients)
        {
            return Err(bad("quorum", &format!("must be between 1 and clients ({clients})")));
        }
        if self.deadline_secs == Some(0) {
            return Err(bad("deadline_secs", "must be positive"));
        }
        if let Some(d) = self.dp_delta
            && !(d > 0.0 && d < 1.0)
        {
            return Err(bad("dp_delta", "must be in (0, 1)"));
        }
        if let Some(c) = self.dp_max_grad_norm
            && !(c.is_finite() && c > 0.0)
        {
            return Err(bad("dp_max_grad_norm", "must be a positive number"));
        }
        if let Some(s) = &self.schedule {
            s.parse::<fedsb_common::train::schedule::ScheduleKind>().map_err(|e| bad("schedule", &e.to_string()))?;
        }
        if let Some(d) = &self.wire_dtype {
            d.parse::<fedsb_common::wire::WireDtype>().map_err(|e| bad("wire_dtype", &e.to_string()))?;
        }
        Ok(())
    }

    fn resolve_paths(&mut self, base: &Path) {
        for p in [&mut self.model, &mut self.train, &mut self.eval].into_iter().flatten() {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }
}

/// Per-method settings (`[method.NAME]`): its ranks and any `[local]` key.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MethodOverride {
    /// Ranks of this method (instead of the sweep's `ranks`).
    pub ranks: Option<Vec<usize>>,
    /// `[local]` keys for this method's runs (a key set here replaces `[local]`'s).
    pub local: LocalOptions,
}

/// The file as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SweepFile {
    name: Option<String>,
    clients: Option<usize>,
    rounds: Option<u64>,
    methods: Vec<String>,
    ranks: Option<Vec<usize>>,
    seeds: Option<Vec<u64>>,
    splits: Option<Vec<String>>,
    dirichlet_alpha: Option<f64>,
    dp_epsilons: Option<Vec<f64>>,
    dp_non_private: Option<bool>,
    #[serde(default)]
    local: LocalOptions,
    #[serde(default)]
    method: BTreeMap<String, toml::Table>,
}

/// A validated sweep (see the module docs for the file format).
#[derive(Clone, Debug, PartialEq)]
pub struct SweepSpec {
    /// The sweep's name (titles of the report and charts).
    pub name: String,
    /// Clients of every run.
    pub clients: usize,
    /// Rounds of every run.
    pub rounds: u64,
    /// Methods, in the order given.
    pub methods: Vec<String>,
    /// Default ranks.
    pub ranks: Vec<usize>,
    /// Seeds.
    pub seeds: Vec<u64>,
    /// Splits.
    pub splits: Vec<SplitKind>,
    /// Concentration of the Dirichlet split.
    pub dirichlet_alpha: f64,
    /// Privacy budgets: `Some(ε)` runs with DP-SGD at that budget, `None` without DP (default: `[None]`).
    pub epsilons: Vec<Option<f64>>,
    /// `[local]`: flags for every run.
    pub local: LocalOptions,
    /// `[method.NAME]` sections.
    pub overrides: BTreeMap<String, MethodOverride>,
}

/// Default clients, rounds, rank, seed and Dirichlet α: those of `fedsb-server local`.
const DEFAULT_CLIENTS: usize = 4;
const DEFAULT_ROUNDS: u64 = 5;
const DEFAULT_RANK: usize = 16;
const DEFAULT_SEED: u64 = 42;
const DEFAULT_ALPHA: f64 = 0.5;

fn check_list<T: PartialEq + std::fmt::Debug>(key: &str, v: &[T]) -> Result<(), SweepError> {
    if v.is_empty() {
        return Err(invalid(format!("`{key}` is empty")));
    }
    for (i, x) in v.iter().enumerate() {
        if v[..i].contains(x) {
            return Err(invalid(format!("`{key}` lists {x:?} twice")));
        }
    }
    Ok(())
}

fn check_ranks(key: &str, ranks: &[usize]) -> Result<(), SweepError> {
    check_list(key, ranks)?;
    if ranks.contains(&0) {
        return Err(invalid(format!("`{key}`: ranks must be positive")));
    }
    Ok(())
}

impl SweepSpec {
    /// Reads and validates a sweep file; relative paths in it are relative to its folder.
    pub fn load(path: &Path) -> Result<Self, SweepError> {
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let base = if base.as_os_str().is_empty() { PathBuf::from(".") } else { base };
        let base = std::path::absolute(&base).map_err(io_err(&base))?;
        let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "sweep".into());
        Self::parse(&text, &base, &stem).map_err(|e| match e {
            SweepError::Toml { source, .. } => SweepError::Toml { path: path.to_path_buf(), source },
            o => o,
        })
    }

    /// Parses and validates a sweep from TOML text; `base` anchors relative paths, `default_name` is the name
    /// when the file gives none.
    pub fn parse(text: &str, base: &Path, default_name: &str) -> Result<Self, SweepError> {
        let f: SweepFile =
            toml::from_str(text).map_err(|source| SweepError::Toml { path: PathBuf::from("<sweep>"), source })?;
        let name = f.name.unwrap_or_else(|| default_name.to_string());
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) {
            return Err(invalid(format!("name `{name}`: use letters, digits, `.`, `_` and `-` only")));
        }
        let clients = f.clients.unwrap_or(DEFAULT_CLIENTS);
        if clients == 0 {
            return Err(invalid("`clients` must be positive"));
        }
        let rounds = f.rounds.unwrap_or(DEFAULT_ROUNDS);
        if rounds == 0 {
            return Err(invalid("`rounds` must be positive"));
        }
        check_list("methods", &f.methods)?;
        for m in &f.methods {
            m.parse::<Method>().map_err(|e| invalid(format!("`methods`: {e}")))?;
        }
        let ranks = f.ranks.unwrap_or_else(|| vec![DEFAULT_RANK]);
        check_ranks("ranks", &ranks)?;
        let seeds = f.seeds.unwrap_or_else(|| vec![DEFAULT_SEED]);
        check_list("seeds", &seeds)?;
        let splits = f.splits.unwrap_or_else(|| vec!["iid".to_string()]);
        check_list("splits", &splits)?;
        let splits = splits.iter().map(|s| SplitKind::parse(s)).collect::<Result<Vec<_>, _>>()?;
        let dirichlet_alpha = f.dirichlet_alpha.unwrap_or(DEFAULT_ALPHA);
        if !(dirichlet_alpha.is_finite() && dirichlet_alpha > 0.0) {
            return Err(invalid("`dirichlet_alpha` must be a positive number"));
        }
        let mut epsilons: Vec<Option<f64>> = Vec::new();
        if let Some(eps) = &f.dp_epsilons {
            if eps.is_empty() {
                return Err(invalid("`dp_epsilons` is empty"));
            }
            for (i, &e) in eps.iter().enumerate() {
                if !(e.is_finite() && e > 0.0) {
                    return Err(invalid(format!("`dp_epsilons`: {e} is not a positive number")));
                }
                if eps[..i].contains(&e) {
                    return Err(invalid(format!("`dp_epsilons` lists {e} twice")));
                }
                epsilons.push(Some(e));
            }
        } else if f.dp_non_private.is_some() {
            return Err(invalid("`dp_non_private` needs `dp_epsilons`"));
        }
        if f.dp_non_private.unwrap_or(true) {
            epsilons.push(None);
        }
        let mut local = f.local;
        local.validate("local", clients)?;
        local.resolve_paths(base);
        let mut overrides = BTreeMap::new();
        for (m, mut table) in f.method {
            let section = format!("method.{m}");
            if !f.methods.contains(&m) {
                return Err(invalid(format!("[{section}]: `{m}` is not in `methods` ({})", f.methods.join(", "))));
            }
            let ranks = match table.remove("ranks") {
                Some(v) => {
                    let r: Vec<usize> =
                        v.try_into().map_err(|e| invalid(format!("[{section}] ranks: {}", one_line(&e))))?;
                    check_ranks(&format!("[{section}] ranks"), &r)?;
                    Some(r)
                }
                None => None,
            };
            let mut opts: LocalOptions = toml::Value::Table(table)
                .try_into()
                .map_err(|e| invalid(format!("[{section}]: {} (ranks or a [local] key)", one_line(&e))))?;
            opts.validate(&section, clients)?;
            opts.resolve_paths(base);
            overrides.insert(m, MethodOverride { ranks, local: opts });
        }
        Ok(SweepSpec {
            name,
            clients,
            rounds,
            methods: f.methods,
            ranks,
            seeds,
            splits,
            dirichlet_alpha,
            epsilons,
            local,
            overrides,
        })
    }

    /// The runs, in order: seed, split, method (as listed), rank, privacy budget — every method runs once per split and seed
    /// before the next, so a sweep cut short already compares all methods on the first split.
    pub fn runs(&self) -> Vec<PlannedRun> {
        let mut out = Vec::new();
        for &seed in &self.seeds {
            for &split in &self.splits {
                for m in &self.methods {
                    let ov = self.overrides.get(m);
                    let ranks = ov.and_then(|o| o.ranks.clone()).unwrap_or_else(|| self.ranks.clone());
                    let local = ov.map_or_else(|| self.local.clone(), |o| o.local.over(&self.local));
                    for &rank in &ranks {
                        for &dp_epsilon in &self.epsilons {
                            let eps = dp_epsilon.map_or(String::new(), |e| format!("-eps{e}"));
                            out.push(PlannedRun {
                                name: format!("{m}-r{rank}{eps}-{}-s{seed}", split.name()),
                                method: m.clone(),
                                rank,
                                split,
                                seed,
                                clients: self.clients,
                                rounds: self.rounds,
                                dirichlet_alpha: self.dirichlet_alpha,
                                dp_epsilon,
                                local: local.clone(),
                            });
                        }
                    }
                }
            }
        }
        out
    }
}

/// The first line of a TOML error (the rest repeats the source).
fn one_line(e: &toml::de::Error) -> String {
    e.message().lines().next().unwrap_or_default().to_string()
}

/// One run of a sweep.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedRun {
    /// `METHOD-rRANK-SPLIT-sSEED`, e.g. `fedsb-r16-iid-s42`: its folder and log under `OUT/runs/`.
    pub name: String,
    /// The method.
    pub method: String,
    /// The adapter rank.
    pub rank: usize,
    /// The split.
    pub split: SplitKind,
    /// The seed.
    pub seed: u64,
    /// Clients.
    pub clients: usize,
    /// Rounds.
    pub rounds: u64,
    /// Dirichlet α (used when `split` is Dirichlet).
    pub dirichlet_alpha: f64,
    /// DP-SGD's privacy budget ε (None: no DP).
    pub dp_epsilon: Option<f64>,
    /// The other `local` flags.
    pub local: LocalOptions,
}

impl PlannedRun {
    /// The arguments of `fedsb-server local` for this run, except `--work-dir`, `--client-exe` and `--assets`
    /// (which do not change results; a completed run is skipped when these arguments are unchanged).
    pub fn local_args(&self) -> Vec<String> {
        let mut a: Vec<String> = [
            ("--clients", self.clients.to_string()),
            ("--rounds", self.rounds.to_string()),
            ("--method", self.method.clone()),
            ("--rank", self.rank.to_string()),
            ("--split", self.split.name().to_string()),
        ]
        .into_iter()
        .flat_map(|(k, v)| [k.to_string(), v])
        .collect();
        if self.split == SplitKind::Dirichlet {
            a.extend(["--dirichlet-alpha".to_string(), self.dirichlet_alpha.to_string()]);
        }
        a.extend(["--seed".to_string(), self.seed.to_string()]);
        if let Some(e) = self.dp_epsilon {
            a.extend(["--dp-epsilon".to_string(), e.to_string()]);
        }
        let mut rest = self.local.args();
        if self.dp_epsilon.is_none() {
            // The DP keys of `[local]` only apply to DP runs (`local` refuses them without --dp-epsilon).
            let mut i = 0;
            while i < rest.len() {
                if rest[i] == "--dp-delta" || rest[i] == "--dp-max-grad-norm" {
                    rest.drain(i..(i + 2).min(rest.len()));
                } else {
                    i += 1;
                }
            }
        }
        a.extend(rest);
        a
    }

    /// The privacy setting in words: `ε=3` or `non-private`.
    pub fn privacy_label(&self) -> String {
        self.dp_epsilon.map_or_else(|| "non-private".into(), |e| format!("ε={e}"))
    }

    /// The run's configuration without its seed (legend and summary label), e.g. `fedsb r16 iid`.
    pub fn label(&self) -> String {
        let base = match self.split {
            SplitKind::Iid => format!("{} r{} iid", self.method, self.rank),
            SplitKind::Dirichlet => format!("{} r{} non-IID (α={})", self.method, self.rank, self.dirichlet_alpha),
        };
        match self.dp_epsilon {
            Some(e) => format!("{base} ε={e}"),
            None => base,
        }
    }
}

/// Where a sweep's runs go and which executables and assets they use.
#[derive(Clone, Debug)]
pub struct RunnerOptions {
    /// The output folder.
    pub out: PathBuf,
    /// The `fedsb-server` executable that runs `local` (normally this process's own).
    pub server_exe: PathBuf,
    /// `--client-exe` for every run (default: `local`'s, next to the server executable).
    pub client_exe: Option<PathBuf>,
    /// `--assets` for every run.
    pub assets: Option<PathBuf>,
}

/// A run's work folder: `OUT/runs/NAME`.
pub fn run_dir(out: &Path, name: &str) -> PathBuf {
    out.join("runs").join(name)
}

/// A run's log: `OUT/runs/NAME.log`.
pub fn run_log(out: &Path, name: &str) -> PathBuf {
    out.join("runs").join(format!("{name}.log"))
}

/// The file in a run's folder recording how it was run.
pub const STAMP_FILE: &str = "sweep-run.json";

/// What `OUT/runs/NAME/sweep-run.json` records once a run's process has exited.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunStamp {
    /// [`PlannedRun::local_args`] of the run.
    pub args: Vec<String>,
    /// Whether the process exited successfully.
    pub success: bool,
    /// Its exit status, in words.
    pub exit: String,
    /// Wall-clock seconds of the whole process (setup, init, rounds, evaluation).
    pub wall_seconds: f64,
}

fn read_stamp(dir: &Path) -> Option<RunStamp> {
    let text = std::fs::read_to_string(dir.join(STAMP_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

/// What a run's folder says about it.
#[derive(Clone, Debug, PartialEq)]
pub enum RunState {
    /// No folder: the run has not started.
    Absent,
    /// Finished all rounds with the planned flags: skipped when resuming.
    Complete,
    /// Anything else (interrupted, failed, other flags): removed and run again. The reason is in words.
    Stale(String),
}

/// The state of `run` under `out` (see [`RunState`]).
pub fn run_state(run: &PlannedRun, out: &Path) -> RunState {
    let dir = run_dir(out, &run.name);
    if !dir.exists() {
        return RunState::Absent;
    }
    let Some(stamp) = read_stamp(&dir) else {
        return RunState::Stale("an unfinished run folder".into());
    };
    if stamp.args != run.local_args() {
        return RunState::Stale("run with other settings".into());
    }
    if !stamp.success {
        return RunState::Stale(format!("failed before ({})", stamp.exit));
    }
    match read_metrics(&dir.join("state/metrics.jsonl")) {
        Ok(m) if completed_rounds(&m).len() as u64 >= run.rounds => RunState::Complete,
        Ok(m) => RunState::Stale(format!("{} of {} rounds completed", completed_rounds(&m).len(), run.rounds)),
        Err(e) => RunState::Stale(format!("unreadable metrics: {e}")),
    }
}

/// The fields of a `metrics.jsonl` line (see `coordinator::RoundMetrics`) a sweep reads.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct MetricsLine {
    /// Round number.
    pub round: u64,
    /// Attempt.
    #[serde(default)]
    pub attempt: u32,
    /// "completed" or "failed".
    pub status: String,
    /// Sampled clients.
    #[serde(default)]
    pub sampled: Vec<String>,
    /// Clients whose update was aggregated.
    #[serde(default)]
    pub contributed: Vec<String>,
    /// Mean local training loss.
    #[serde(default)]
    pub mean_train_loss: Option<f64>,
    /// The coordinator's evaluation.
    #[serde(default)]
    pub eval: Option<MetricsEval>,
    /// Seconds from opening to closing.
    #[serde(default)]
    pub seconds: f64,
    /// Payload bytes up per contributing client.
    #[serde(default)]
    pub up_payload_per_client: u64,
    /// Payload bytes down per sampled client.
    #[serde(default)]
    pub down_payload_per_client: u64,
    /// DP-SGD: the largest ε any client had spent after the round.
    #[serde(default)]
    pub worst_epsilon: Option<f64>,
}

/// The evaluation part of a metrics line.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct MetricsEval {
    /// Mean loss.
    #[serde(default)]
    pub loss: Option<f64>,
    /// Accuracy in 0..1 (classification).
    #[serde(default)]
    pub accuracy: Option<f64>,
}

/// Reads a `metrics.jsonl` (missing file: no lines). A truncated last line (an interrupted write) is ignored.
pub fn read_metrics(path: &Path) -> Result<Vec<MetricsLine>, SweepError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(path)(e)),
    };
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        if l.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(l) {
            Ok(m) => out.push(m),
            Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => break,
            Err(e) => {
                return Err(SweepError::Metrics { path: path.to_path_buf(), line: i + 1, message: e.to_string() });
            }
        }
    }
    Ok(out)
}

/// The completed rounds, one per round number (the last completed attempt), by round.
pub fn completed_rounds(lines: &[MetricsLine]) -> Vec<&MetricsLine> {
    let mut by_round: BTreeMap<u64, &MetricsLine> = BTreeMap::new();
    for l in lines.iter().filter(|l| l.status == "completed") {
        by_round.insert(l.round, l);
    }
    by_round.into_values().collect()
}

/// The one-time init download (payload bytes, all clients) from a run's ledger, when its state has one.
fn ledger_init_bytes(state_dir: &Path) -> Option<u64> {
    if !state_dir.join("state.sqlite").exists() {
        return None;
    }
    let read = || -> Result<Option<u64>, crate::store::StoreError> {
        let store = crate::store::Store::open(state_dir)?;
        let Some(run) = store.latest_run()? else { return Ok(None) };
        let rows = store.ledger(&run.run_id)?;
        Ok(Some(rows.iter().filter(|r| r.transfer == "init").map(|r| r.payload_bytes).sum()))
    };
    match read() {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!("{}: cannot read the init download from the ledger: {e}", state_dir.display());
            None
        }
    }
}

/// How a run stands in the report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunStatus {
    /// All rounds completed with the planned flags.
    Completed,
    /// Started but not complete (failed or interrupted).
    Incomplete,
    /// Its folder holds a run with other flags (its numbers are not reported).
    Stale,
    /// Not started.
    NotRun,
}

impl RunStatus {
    /// The word in the reports.
    pub fn name(self) -> &'static str {
        match self {
            RunStatus::Completed => "completed",
            RunStatus::Incomplete => "incomplete",
            RunStatus::Stale => "stale",
            RunStatus::NotRun => "not run",
        }
    }
}

/// One completed round of a run, as reported.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundPoint {
    /// Round number.
    pub round: u64,
    /// Eval accuracy (0..1).
    pub accuracy: Option<f64>,
    /// Eval loss.
    pub eval_loss: Option<f64>,
    /// Mean local training loss.
    pub train_loss: Option<f64>,
    /// Payload bytes of the round, all clients, both directions.
    pub bytes: u64,
    /// Payload bytes so far: the init download plus every round up to this one.
    pub cumulative_bytes: u64,
    /// Seconds the round was open.
    pub seconds: f64,
}

/// A run's results.
#[derive(Clone, Debug, PartialEq)]
pub struct RunResult {
    /// The run.
    pub run: PlannedRun,
    /// Its status.
    pub status: RunStatus,
    /// Completed rounds.
    pub rounds: Vec<RoundPoint>,
    /// Accuracy after the last completed round.
    pub final_accuracy: Option<f64>,
    /// Best accuracy over the rounds.
    pub best_accuracy: Option<f64>,
    /// Mean payload bytes up per client per round.
    pub up_per_client_round: Option<f64>,
    /// Mean payload bytes down per client per round.
    pub down_per_client_round: Option<f64>,
    /// The one-time init download, all clients (when the ledger could be read).
    pub init_bytes: Option<u64>,
    /// All payload bytes: init download plus every round, all clients, both directions.
    pub total_bytes: u64,
    /// Wall-clock seconds of the run's process.
    pub wall_seconds: Option<f64>,
    /// DP-SGD: the largest ε any client spent (after the last completed round).
    pub epsilon_spent: Option<f64>,
}

/// Reads a run's results from its folder under `out`.
pub fn load_result(run: &PlannedRun, out: &Path) -> Result<RunResult, SweepError> {
    let dir = run_dir(out, &run.name);
    let mut r = RunResult {
        run: run.clone(),
        status: RunStatus::NotRun,
        rounds: Vec::new(),
        final_accuracy: None,
        best_accuracy: None,
        up_per_client_round: None,
        down_per_client_round: None,
        init_bytes: None,
        total_bytes: 0,
        wall_seconds: None,
        epsilon_spent: None,
    };
    if !dir.exists() {
        return Ok(r);
    }
    let stamp = read_stamp(&dir);
    if stamp.as_ref().is_some_and(|s| s.args != run.local_args()) {
        r.status = RunStatus::Stale;
        return Ok(r);
    }
    r.wall_seconds = stamp.as_ref().map(|s| s.wall_seconds);
    let lines = read_metrics(&dir.join("state/metrics.jsonl"))?;
    let done = completed_rounds(&lines);
    r.status = if stamp.is_some_and(|s| s.success) && done.len() as u64 >= run.rounds {
        RunStatus::Completed
    } else {
        RunStatus::Incomplete
    };
    r.init_bytes = ledger_init_bytes(&dir.join("state"));
    let mut cumulative = r.init_bytes.unwrap_or(0);
    for m in &done {
        let bytes =
            m.up_payload_per_client * m.contributed.len() as u64 + m.down_payload_per_client * m.sampled.len() as u64;
        cumulative += bytes;
        r.rounds.push(RoundPoint {
            round: m.round,
            accuracy: m.eval.as_ref().and_then(|e| e.accuracy),
            eval_loss: m.eval.as_ref().and_then(|e| e.loss),
            train_loss: m.mean_train_loss,
            bytes,
            cumulative_bytes: cumulative,
            seconds: m.seconds,
        });
    }
    r.total_bytes = cumulative;
    r.epsilon_spent = done.last().and_then(|m| m.worst_epsilon);
    r.final_accuracy = r.rounds.last().and_then(|p| p.accuracy);
    r.best_accuracy = r.rounds.iter().filter_map(|p| p.accuracy).reduce(f64::max);
    if !done.is_empty() {
        let n = done.len() as f64;
        r.up_per_client_round = Some(done.iter().map(|m| m.up_payload_per_client as f64).sum::<f64>() / n);
        r.down_per_client_round = Some(done.iter().map(|m| m.down_payload_per_client as f64).sum::<f64>() / n);
    }
    Ok(r)
}

/// The results of every run of `spec` under `out`.
pub fn collect_results(spec: &SweepSpec, out: &Path) -> Result<Vec<RunResult>, SweepError> {
    spec.runs().iter().map(|r| load_result(r, out)).collect()
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.to_string() }
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

fn opt_f(v: Option<f64>, decimals: usize) -> String {
    v.map(|v| format!("{v:.decimals$}")).unwrap_or_default()
}

/// `results.csv`: one row per run.
pub fn results_csv(results: &[RunResult]) -> String {
    let mut o = String::from(
        "name,method,rank,split,seed,status,rounds_planned,rounds_completed,final_accuracy,best_accuracy,\
         up_bytes_per_client_per_round,down_bytes_per_client_per_round,init_bytes,total_bytes,wall_seconds,\
         dp_epsilon_budget,dp_epsilon_spent\n",
    );
    for r in results {
        let row = [
            csv_field(&r.run.name),
            csv_field(&r.run.method),
            r.run.rank.to_string(),
            r.run.split.name().to_string(),
            r.run.seed.to_string(),
            r.status.name().to_string(),
            r.run.rounds.to_string(),
            r.rounds.len().to_string(),
            opt_f(r.final_accuracy, 6),
            opt_f(r.best_accuracy, 6),
            opt_f(r.up_per_client_round, 0),
            opt_f(r.down_per_client_round, 0),
            opt(r.init_bytes),
            if r.rounds.is_empty() { String::new() } else { r.total_bytes.to_string() },
            opt_f(r.wall_seconds, 2),
            opt(r.run.dp_epsilon),
            opt_f(r.epsilon_spent, 4),
        ];
        o.push_str(&row.join(","));
        o.push('\n');
    }
    o
}

/// `rounds.csv`: one row per run per completed round.
pub fn rounds_csv(results: &[RunResult]) -> String {
    let mut o = String::from(
        "name,method,rank,split,seed,round,accuracy,eval_loss,train_loss,round_bytes,cumulative_bytes,round_seconds\n",
    );
    for r in results {
        for p in &r.rounds {
            let row = [
                csv_field(&r.run.name),
                csv_field(&r.run.method),
                r.run.rank.to_string(),
                r.run.split.name().to_string(),
                r.run.seed.to_string(),
                p.round.to_string(),
                opt_f(p.accuracy, 6),
                opt_f(p.eval_loss, 6),
                opt_f(p.train_loss, 6),
                p.bytes.to_string(),
                p.cumulative_bytes.to_string(),
                format!("{:.3}", p.seconds),
            ];
            o.push_str(&row.join(","));
            o.push('\n');
        }
    }
    o
}

fn pct(v: Option<f64>) -> String {
    v.map(|a| format!("{:.2} %", a * 100.0)).unwrap_or_else(|| "–".into())
}

fn bytes_f(v: Option<f64>) -> String {
    v.map(|b| human_bytes(b.round() as u64)).unwrap_or_else(|| "–".into())
}

fn secs(v: Option<f64>) -> String {
    v.map(|s| format!("{s:.0} s")).unwrap_or_else(|| "–".into())
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// Sample standard deviation (None below two values).
fn std_dev(v: &[f64]) -> Option<f64> {
    let m = mean(v)?;
    (v.len() >= 2).then(|| (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt())
}

/// `results.md`: the setup, a table of the runs, a per-configuration summary over seeds, and the charts.
pub fn results_markdown(spec: &SweepSpec, results: &[RunResult]) -> String {
    let has_dp = spec.epsilons.iter().any(Option::is_some);
    let mut o = String::new();
    let _ = writeln!(o, "# Sweep `{}`\n", spec.name);
    let local = spec.local.describe();
    let _ = writeln!(
        o,
        "{} clients, {} rounds, {} run(s){}.",
        spec.clients,
        spec.rounds,
        results.len(),
        if local.is_empty() { String::new() } else { format!("; every run: `{}`", local.join(" ")) }
    );
    for (m, ov) in &spec.overrides {
        let mut parts = ov.local.describe();
        if let Some(r) = &ov.ranks {
            parts.insert(0, format!("ranks {r:?}"));
        }
        if !parts.is_empty() {
            let _ = writeln!(o, "- `{m}`: `{}`", parts.join(" "));
        }
    }
    o.push_str(
        "\nBytes are adapter payload bytes (tensor data) as the coordinator recorded them; *up/down* are per client \
         per round, *total* is all clients, both directions, all rounds plus the one-time init download. Accuracy is \
         the coordinator's evaluation of the global model after the last round.\n\n## Runs\n\n",
    );
    o.push_str(
        "| run | status | rounds | final acc. | best acc. | up / client / round | down / client / round | init | total \
         | wall |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in results {
        let name = match (r.run.dp_epsilon, r.epsilon_spent) {
            (Some(_), Some(e)) => format!("{} (ε spent {e:.3})", r.run.name),
            _ => r.run.name.clone(),
        };
        let _ = writeln!(
            o,
            "| {} | {} | {}/{} | {} | {} | {} | {} | {} | {} | {} |",
            name,
            r.status.name(),
            r.rounds.len(),
            r.run.rounds,
            pct(r.final_accuracy),
            pct(r.best_accuracy),
            bytes_f(r.up_per_client_round),
            bytes_f(r.down_per_client_round),
            r.init_bytes.map(human_bytes).unwrap_or_else(|| "–".into()),
            if r.rounds.is_empty() { "–".into() } else { human_bytes(r.total_bytes) },
            secs(r.wall_seconds)
        );
    }
    o.push_str(
        "\n## Per method\n\nMean over seeds (± sample standard deviation when there are several) of the runs with \
         results.\n\n| method | rank | split | seeds | final acc. | up / client / round | down / client / round | \
         total | wall |\n|---|---:|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for (key, group) in configurations(results) {
        let with: Vec<&RunResult> = group.iter().copied().filter(|r| !r.rounds.is_empty()).collect();
        let acc: Vec<f64> = with.iter().filter_map(|r| r.final_accuracy).collect();
        let acc_s = match (mean(&acc), std_dev(&acc)) {
            (Some(m), Some(s)) => format!("{:.2} % ± {:.2}", m * 100.0, s * 100.0),
            (Some(m), None) => format!("{:.2} %", m * 100.0),
            _ => "–".into(),
        };
        let f = |g: &dyn Fn(&RunResult) -> Option<f64>| mean(&with.iter().filter_map(|r| g(r)).collect::<Vec<_>>());
        let method = if key.3 == "non-private" && !has_dp { key.0.clone() } else { format!("{} ({})", key.0, key.3) };
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            method,
            key.1,
            key.2.name(),
            with.len(),
            acc_s,
            bytes_f(f(&|r| r.up_per_client_round)),
            bytes_f(f(&|r| r.down_per_client_round)),
            bytes_f(f(&|r| Some(r.total_bytes as f64))),
            secs(f(&|r| r.wall_seconds)),
        );
    }
    if has_dp {
        o.push_str(&privacy_table(spec, results));
    }
    o.push_str(
        "\n## Charts\n\n![Accuracy vs round](accuracy_vs_round.svg)\n\n![Accuracy vs cumulative bytes](accuracy_vs_bytes.svg)\n",
    );
    o
}

/// The accuracy-vs-ε table of a privacy sweep: one row per (method, rank, split), one column per budget
/// (ascending, then non-private); each cell the mean final accuracy over seeds and, for DP, the worst client's
/// spent ε.
fn privacy_table(spec: &SweepSpec, results: &[RunResult]) -> String {
    let mut eps: Vec<f64> = spec.epsilons.iter().flatten().copied().collect();
    eps.sort_by(f64::total_cmp);
    let mut cols: Vec<Option<f64>> = eps.into_iter().map(Some).collect();
    if spec.epsilons.contains(&None) {
        cols.push(None);
    }
    let mut o = String::from(
        "\n## Accuracy vs privacy budget\n\nRecord-level DP-SGD on every client (Poisson sampling, per-sample \
         clipping, Gaussian noise calibrated per client to spend the budget ε in the run's rounds; δ below 1/N). Final \
         accuracy, mean over seeds; in brackets the largest ε any client actually spent.\n\n| method | rank | split |",
    );
    for c in &cols {
        let _ = write!(o, " {} |", c.map_or_else(|| "non-private".to_string(), |e| format!("ε = {e}")));
    }
    o.push_str("\n|---|---:|---|");
    o.push_str(&"---:|".repeat(cols.len()));
    o.push('\n');
    let mut rows: Vec<(String, usize, SplitKind)> = Vec::new();
    for r in results {
        let k = (r.run.method.clone(), r.run.rank, r.run.split);
        if !rows.contains(&k) {
            rows.push(k);
        }
    }
    for (m, rank, split) in rows {
        let _ = write!(o, "| {m} | {rank} | {} |", split.name());
        for c in &cols {
            let runs: Vec<&RunResult> = results
                .iter()
                .filter(|r| r.run.method == m && r.run.rank == rank && r.run.split == split && r.run.dp_epsilon == *c)
                .collect();
            let acc: Vec<f64> = runs.iter().filter_map(|r| r.final_accuracy).collect();
            let spent = runs.iter().filter_map(|r| r.epsilon_spent).reduce(f64::max);
            let cell = match (mean(&acc), spent) {
                (Some(a), Some(e)) => format!("{:.2} % ({e:.2})", a * 100.0),
                (Some(a), None) => format!("{:.2} %", a * 100.0),
                _ => "–".into(),
            };
            let _ = write!(o, " {cell} |");
        }
        o.push('\n');
    }
    o
}

/// A run's configuration without its seed: (method, rank, split, privacy label).
type ConfigKey = (String, usize, SplitKind, String);

/// Results grouped by (method, rank, split, privacy), in run order.
fn configurations(results: &[RunResult]) -> Vec<(ConfigKey, Vec<&RunResult>)> {
    let mut groups: Vec<(ConfigKey, Vec<&RunResult>)> = Vec::new();
    for r in results {
        let key = (r.run.method.clone(), r.run.rank, r.run.split, r.run.privacy_label());
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, g)) => g.push(r),
            None => groups.push((key, vec![r])),
        }
    }
    groups
}

/// The accuracy chart of the runs with results: against the round (`by_bytes` false) or against cumulative
/// payload bytes on a log scale. One line per run; a colour per (method, rank), dashed for non-IID.
pub fn accuracy_chart(spec: &SweepSpec, results: &[RunResult], by_bytes: bool) -> Chart {
    let mut configs: Vec<(&str, usize)> = Vec::new();
    let mut series = Vec::new();
    for r in results {
        let key = (r.run.method.as_str(), r.run.rank);
        let idx = configs.iter().position(|k| *k == key).unwrap_or_else(|| {
            configs.push(key);
            configs.len() - 1
        });
        let points: Vec<(f64, f64)> = r
            .rounds
            .iter()
            .filter_map(|p| {
                let x = if by_bytes { p.cumulative_bytes as f64 } else { p.round as f64 };
                p.accuracy.map(|a| (x, a * 100.0))
            })
            .collect();
        if points.is_empty() {
            continue;
        }
        series.push(Series {
            label: r.run.label(),
            color: PALETTE[idx % PALETTE.len()].to_string(),
            dashed: r.run.split == SplitKind::Dirichlet,
            points,
        });
    }
    if by_bytes {
        Chart {
            title: format!("{}: accuracy vs communication", spec.name),
            x_label: "cumulative payload bytes, all clients, up + down, incl. init (log scale)".into(),
            y_label: "eval accuracy (%)".into(),
            x_scale: Scale::Log10,
            x_format: plot::fmt_si_bytes,
            y_format: plot::fmt_plain,
            series,
        }
    } else {
        Chart {
            title: format!("{}: accuracy vs round", spec.name),
            x_label: "round".into(),
            y_label: "eval accuracy (%)".into(),
            x_scale: Scale::Linear { integer: true },
            x_format: plot::fmt_plain,
            y_format: plot::fmt_plain,
            series,
        }
    }
}

/// The files [`write_reports`] writes into the output folder.
pub const REPORT_FILES: [&str; 5] =
    ["results.csv", "results.md", "rounds.csv", "accuracy_vs_round.svg", "accuracy_vs_bytes.svg"];

/// Reads every run's results under `out` and writes the reports ([`REPORT_FILES`]); returns the results.
pub fn write_reports(spec: &SweepSpec, out: &Path) -> Result<Vec<RunResult>, SweepError> {
    let results = collect_results(spec, out)?;
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let files = [
        results_csv(&results),
        results_markdown(spec, &results),
        rounds_csv(&results),
        accuracy_chart(spec, &results, false).to_svg(),
        accuracy_chart(spec, &results, true).to_svg(),
    ];
    for (name, text) in REPORT_FILES.iter().zip(files) {
        let p = out.join(name);
        std::fs::write(&p, text).map_err(io_err(&p))?;
    }
    Ok(results)
}

/// What a sweep did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SweepSummary {
    /// Runs started (and finished, successfully or not).
    pub ran: Vec<String>,
    /// Runs skipped because they were already complete.
    pub skipped: Vec<String>,
    /// Runs that failed.
    pub failed: Vec<String>,
}

/// The `fedsb-server local` command of `run` (without stdio settings).
pub fn local_command(run: &PlannedRun, opts: &RunnerOptions) -> Command {
    let mut cmd = Command::new(&opts.server_exe);
    cmd.arg("local").args(run.local_args()).arg("--work-dir").arg(run_dir(&opts.out, &run.name));
    if let Some(c) = &opts.client_exe {
        cmd.arg("--client-exe").arg(c);
    }
    if let Some(a) = &opts.assets {
        cmd.arg("--assets").arg(a);
    }
    cmd
}

/// Runs every run of `spec` that is not already complete, one after another, printing a line per run; rewrites
/// the reports after each. A failing run is reported and the sweep goes on (see [`SweepSummary::failed`]).
pub fn run_sweep(spec: &SweepSpec, opts: &RunnerOptions) -> Result<SweepSummary, SweepError> {
    let runs = spec.runs();
    let runs_dir = opts.out.join("runs");
    std::fs::create_dir_all(&runs_dir).map_err(io_err(&runs_dir))?;
    let mut summary = SweepSummary::default();
    let n = runs.len();
    for (i, run) in runs.iter().enumerate() {
        let tag = format!("[{}/{n}] {}", i + 1, run.name);
        let dir = run_dir(&opts.out, &run.name);
        match run_state(run, &opts.out) {
            RunState::Complete => {
                let acc = load_result(run, &opts.out).ok().and_then(|r| r.final_accuracy);
                println!("{tag}: already complete (accuracy {}), skipped", pct(acc));
                summary.skipped.push(run.name.clone());
                continue;
            }
            RunState::Stale(why) => {
                println!("{tag}: {why}; removing {} and running it again", dir.display());
                std::fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
            }
            RunState::Absent => {}
        }
        print!("{tag} … ");
        let _ = std::io::stdout().flush();
        let log_path = run_log(&opts.out, &run.name);
        let log = std::fs::File::create(&log_path).map_err(io_err(&log_path))?;
        let log2 = log.try_clone().map_err(io_err(&log_path))?;
        let start = Instant::now();
        let status = local_command(run, opts).stdin(Stdio::null()).stdout(log).stderr(log2).status();
        let wall_seconds = start.elapsed().as_secs_f64();
        let (success, exit) = match &status {
            Ok(s) => (s.success(), s.to_string()),
            Err(e) => (false, format!("could not start {}: {e}", opts.server_exe.display())),
        };
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let stamp = RunStamp { args: run.local_args(), success, exit: exit.clone(), wall_seconds };
        let stamp_path = dir.join(STAMP_FILE);
        let json = serde_json::to_string_pretty(&stamp).map_err(|e| invalid(e.to_string()))?;
        std::fs::write(&stamp_path, json).map_err(io_err(&stamp_path))?;
        summary.ran.push(run.name.clone());
        let result = load_result(run, &opts.out);
        match (&result, success) {
            (Ok(r), true) if r.status == RunStatus::Completed => {
                println!("accuracy {}, {wall_seconds:.0} s", pct(r.final_accuracy));
            }
            _ => {
                let why = match &result {
                    Ok(r) if success => format!("{} of {} rounds completed", r.rounds.len(), r.run.rounds),
                    Err(e) => e.to_string(),
                    _ => exit,
                };
                println!("FAILED ({why}) after {wall_seconds:.0} s; see {}", log_path.display());
                summary.failed.push(run.name.clone());
            }
        }
        write_reports(spec, &opts.out)?;
    }
    write_reports(spec, &opts.out)?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
name = "minilm-rt"
clients = 4
rounds = 3
methods = ["fedsb", "fedit", "ffa-lora", "fedex-lora", "flora"]
ranks = [16]
seeds = [42]
splits = ["iid", "dirichlet"]
dirichlet_alpha = 0.5
[local]
local_steps = 20
model = "models/tiny"
[method.fedsb]
ranks = [16, 64]
lr = 0.001
"#;

    fn parse(text: &str) -> Result<SweepSpec, SweepError> {
        SweepSpec::parse(text, Path::new("/base"), "file-stem")
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn the_example_expands_to_named_runs_with_overrides() {
        let s = parse(EXAMPLE).unwrap();
        let runs = s.runs();
        let names: Vec<&str> = runs.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "fedsb-r16-iid-s42",
                "fedsb-r64-iid-s42",
                "fedit-r16-iid-s42",
                "ffa-lora-r16-iid-s42",
                "fedex-lora-r16-iid-s42",
                "flora-r16-iid-s42",
                "fedsb-r16-dirichlet-s42",
                "fedsb-r64-dirichlet-s42",
                "fedit-r16-dirichlet-s42",
                "ffa-lora-r16-dirichlet-s42",
                "fedex-lora-r16-dirichlet-s42",
                "flora-r16-dirichlet-s42",
            ]
        );
        let a = runs[6].local_args().join(" ");
        assert_eq!(
            a,
            "--clients 4 --rounds 3 --method fedsb --rank 16 --split dirichlet --dirichlet-alpha 0.5 --seed 42 \
             --local-steps 20 --lr 0.001 --model /base/models/tiny"
        );
        // Methods without a section get [local] only.
        assert_eq!(
            runs[2].local_args().join(" "),
            "--clients 4 --rounds 3 --method fedit --rank 16 --split iid --seed 42 --local-steps 20 --model /base/models/tiny"
        );
        assert_eq!(runs[7].label(), "fedsb r64 non-IID (α=0.5)");
    }

    #[test]
    fn defaults_follow_the_local_command() {
        let s = parse(r#"methods = ["fedit"]"#).unwrap();
        assert_eq!(s.name, "file-stem");
        assert_eq!((s.clients, s.rounds, s.ranks.clone(), s.seeds.clone()), (4, 5, vec![16], vec![42]));
        assert_eq!(s.splits, [SplitKind::Iid]);
        let runs = s.runs();
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].name, "fedit-r16-iid-s42");
        assert_eq!(runs[0].local_args().len(), 12);
    }

    #[test]
    fn seeds_multiply_runs_in_order() {
        let s = parse("methods = [\"fedsb\"]\nseeds = [1, 2, 3]\nranks = [4, 8]").unwrap();
        let names: Vec<String> = s.runs().into_iter().map(|r| r.name).collect();
        assert_eq!(names[..4], ["fedsb-r4-iid-s1", "fedsb-r8-iid-s1", "fedsb-r4-iid-s2", "fedsb-r8-iid-s2"]);
        assert_eq!(names.len(), 6);
    }

    #[test]
    fn bad_files_are_refused_with_clear_messages() {
        let e = err("methods = [\"fedsb\"]\nround = 3");
        assert!(e.contains("unknown field `round`") && e.contains("line 2"), "{e}");
        let e = err("methods = [\"fedsb\"]\n[local]\nrank = 3");
        assert!(e.contains("unknown field `rank`"), "{e}");
        assert!(err("rounds = 3").contains("missing field `methods`"));
        let e = err(r#"methods = ["fedavg"]"#);
        assert!(e.contains("unknown method `fedavg`") && e.contains("flora"), "{e}");
        assert!(err(r#"methods = ["fedsb", "fedsb"]"#).contains("twice"));
        assert!(err("methods = []").contains("`methods` is empty"));
        assert!(err("methods = [\"fedsb\"]\nsplits = [\"noniid\"]").contains("unknown split `noniid`"));
        assert!(err("methods = [\"fedsb\"]\nranks = [0]").contains("positive"));
        assert!(err("methods = [\"fedsb\"]\nclients = 0").contains("`clients` must be positive"));
        assert!(err("methods = [\"fedsb\"]\ndirichlet_alpha = -1.0").contains("dirichlet_alpha"));
        assert!(err("methods = [\"fedsb\"]\nname = \"a/b\"").contains("name `a/b`"));
        let e = err("methods = [\"fedsb\"]\n[method.fedit]\nranks = [4]");
        assert!(e.contains("[method.fedit]") && e.contains("not in `methods`"), "{e}");
        let e = err("methods = [\"fedsb\"]\n[method.fedsb]\nrankz = [4]");
        assert!(e.contains("[method.fedsb]") && e.contains("unknown field `rankz`"), "{e}");
        let e = err("methods = [\"fedsb\"]\n[method.fedsb]\nranks = \"16\"");
        assert!(e.contains("[method.fedsb] ranks"), "{e}");
        let e = err("methods = [\"fedsb\"]\n[local]\nschedule = \"step\"");
        assert!(e.contains("[local] schedule") && e.contains("unknown schedule"), "{e}");
        assert!(err("methods = [\"fedsb\"]\n[local]\nwire_dtype = \"f8\"").contains("[local] wire_dtype"));
        assert!(err("methods = [\"fedsb\"]\n[local]\nlr = 0.0").contains("[local] lr"));
        assert!(err("methods = [\"fedsb\"]\nclients = 2\n[local]\nquorum = 3").contains("quorum"));
        assert!(err("methods = [\"fedsb\"]\n[method.fedsb]\nlocal_steps = 0").contains("[method.fedsb] local_steps"));
    }

    #[test]
    fn load_names_toml_errors_by_file_and_resolves_paths_from_its_folder() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("my-sweep.toml");
        std::fs::write(&p, "methods = [\"fedsb\"]\n[local]\neval = \"data/test.jsonl\"\n").unwrap();
        let s = SweepSpec::load(&p).unwrap();
        assert_eq!(s.name, "my-sweep");
        assert_eq!(s.local.eval.as_deref(), Some(dir.path().join("data/test.jsonl").as_path()));
        std::fs::write(&p, "methods = [\"fedsb\"\n").unwrap();
        let e = SweepSpec::load(&p).unwrap_err().to_string();
        assert!(e.starts_with(&p.display().to_string()) && e.contains("line"), "{e}");
    }

    /// A metrics line like the coordinator's (with fields this module ignores).
    fn line(round: u64, status: &str, acc: f64, up: u64, down: u64) -> String {
        serde_json::json!({
            "round": round, "attempt": 1, "status": status, "sampled": ["client-1", "client-2"],
            "contributed": if status == "completed" { vec!["client-1", "client-2"] } else { vec![] },
            "lost": [], "mean_train_loss": 0.5, "eval": {"loss": 0.4, "count": 10, "examples": 10, "accuracy": acc},
            "seconds": 1.5, "up_payload_per_client": up, "down_payload_per_client": down,
            "up_message_bytes": 0, "down_message_bytes": 0, "up_wire_bytes": 0, "down_wire_bytes": 0,
            "analytic_min_bytes": up
        })
        .to_string()
    }

    /// Writes a run folder as a finished sweep run would leave it.
    fn fake_run(out: &Path, run: &PlannedRun, lines: &[String], success: bool, wall: f64) {
        let dir = run_dir(out, &run.name);
        std::fs::create_dir_all(dir.join("state")).unwrap();
        std::fs::write(dir.join("state/metrics.jsonl"), lines.join("\n") + "\n").unwrap();
        let stamp = RunStamp { args: run.local_args(), success, exit: "exit status: 0".into(), wall_seconds: wall };
        std::fs::write(dir.join(STAMP_FILE), serde_json::to_string(&stamp).unwrap()).unwrap();
    }

    fn two_method_spec() -> SweepSpec {
        parse("name = \"t\"\nclients = 2\nrounds = 2\nmethods = [\"fedsb\", \"fedit\"]\nsplits = [\"iid\", \"dirichlet\"]")
            .unwrap()
    }

    #[test]
    fn privacy_sweeps_add_a_budget_dimension_and_an_accuracy_vs_epsilon_table() {
        let spec = parse(
            "clients = 2\nrounds = 2\nmethods = [\"fedsb\"]\ndp_epsilons = [8.0, 1.0]\n\
             [local]\ndp_delta = 1e-6\ndp_max_grad_norm = 0.5\n",
        )
        .unwrap();
        let runs = spec.runs();
        let names: Vec<&str> = runs.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["fedsb-r16-eps8-iid-s42", "fedsb-r16-eps1-iid-s42", "fedsb-r16-iid-s42"]);
        let args = runs[0].local_args().join(" ");
        assert!(args.contains("--dp-epsilon 8 ") && args.contains("--dp-delta 0.000001"), "{args}");
        assert!(args.contains("--dp-max-grad-norm 0.5"), "{args}");
        let plain = runs[2].local_args().join(" ");
        assert!(!plain.contains("--dp-"), "the non-private run gets no DP flags: {plain}");
        assert_eq!(runs[1].label(), "fedsb r16 iid ε=1");
        // Without the non-private run; bad lists are refused.
        let only = parse("methods = [\"fedsb\"]\ndp_epsilons = [3.0]\ndp_non_private = false").unwrap();
        assert_eq!(only.runs().len(), 1);
        assert!(err("methods = [\"fedsb\"]\ndp_epsilons = [0.0]").contains("dp_epsilons"));
        assert!(err("methods = [\"fedsb\"]\ndp_epsilons = [3.0, 3.0]").contains("twice"));
        assert!(err("methods = [\"fedsb\"]\ndp_non_private = false").contains("dp_epsilons"));
        assert!(err("methods = [\"fedsb\"]\n[local]\ndp_delta = 2.0").contains("dp_delta"));
        // Reports: the spent ε is read from the metrics, and the table has a column per budget.
        let dir = tempfile::tempdir().unwrap();
        let with_eps = |acc: f64, eps: Option<f64>| {
            let mut v: serde_json::Value = serde_json::from_str(&line(2, "completed", acc, 10, 10)).unwrap();
            if let Some(e) = eps {
                v["worst_epsilon"] = serde_json::json!(e);
            }
            v.to_string()
        };
        fake_run(dir.path(), &runs[0], &[line(1, "completed", 0.6, 10, 10), with_eps(0.7, Some(7.95))], true, 1.0);
        fake_run(dir.path(), &runs[1], &[line(1, "completed", 0.5, 10, 10), with_eps(0.55, Some(0.99))], true, 1.0);
        fake_run(dir.path(), &runs[2], &[line(1, "completed", 0.7, 10, 10), with_eps(0.8, None)], true, 1.0);
        let results = write_reports(&spec, dir.path()).unwrap();
        assert_eq!(results[0].epsilon_spent, Some(7.95));
        let md = std::fs::read_to_string(dir.path().join("results.md")).unwrap();
        assert!(md.contains("| method | rank | split | ε = 1 | ε = 8 | non-private |"), "{md}");
        assert!(md.contains("| fedsb | 16 | iid | 55.00 % (0.99) | 70.00 % (7.95) | 80.00 % |"), "{md}");
        let csv = std::fs::read_to_string(dir.path().join("results.csv")).unwrap();
        assert!(csv.lines().nth(1).unwrap().ends_with(",8,7.9500"), "{csv}");
    }

    #[test]
    fn run_states_drive_skip_and_rerun() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        let spec = two_method_spec();
        let runs = spec.runs();
        assert_eq!(run_state(&runs[0], out), RunState::Absent);
        // Complete: stamp with the same args, success, all rounds.
        fake_run(out, &runs[0], &[line(1, "completed", 0.6, 100, 100), line(2, "completed", 0.7, 100, 100)], true, 9.0);
        assert_eq!(run_state(&runs[0], out), RunState::Complete);
        // A failed attempt before a completed one still counts the round once.
        fake_run(
            out,
            &runs[1],
            &[line(1, "failed", 0.0, 0, 0), line(1, "completed", 0.6, 100, 100), line(2, "completed", 0.7, 1, 1)],
            true,
            9.0,
        );
        assert_eq!(run_state(&runs[1], out), RunState::Complete);
        // Only one round of two.
        fake_run(out, &runs[2], &[line(1, "completed", 0.6, 100, 100)], true, 9.0);
        assert!(matches!(run_state(&runs[2], out), RunState::Stale(w) if w.contains("1 of 2")));
        // Failed process.
        fake_run(out, &runs[3], &[], false, 1.0);
        assert!(matches!(run_state(&runs[3], out), RunState::Stale(w) if w.contains("failed")));
        // Other settings: a complete run of another sweep with the same name.
        let mut other = runs[0].clone();
        other.local.local_steps = Some(7);
        assert!(matches!(run_state(&other, out), RunState::Stale(w) if w.contains("other settings")));
        // A folder without a stamp: interrupted.
        std::fs::remove_file(run_dir(out, &runs[0].name).join(STAMP_FILE)).unwrap();
        assert!(matches!(run_state(&runs[0], out), RunState::Stale(w) if w.contains("unfinished")));
    }

    #[test]
    fn a_truncated_last_metrics_line_is_ignored_but_a_bad_middle_line_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("metrics.jsonl");
        std::fs::write(&p, format!("{}\n{{\"round\": 2, \"sta", line(1, "completed", 0.5, 1, 1))).unwrap();
        assert_eq!(read_metrics(&p).unwrap().len(), 1);
        std::fs::write(&p, format!("oops\n{}\n", line(1, "completed", 0.5, 1, 1))).unwrap();
        let e = read_metrics(&p).unwrap_err().to_string();
        assert!(e.contains("metrics.jsonl:1:"), "{e}");
        assert!(read_metrics(&dir.path().join("none.jsonl")).unwrap().is_empty());
    }

    #[test]
    fn reports_from_synthetic_runs() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        let spec = two_method_spec();
        let runs = spec.runs();
        let run = |name: &str| runs.iter().find(|r| r.name == name).unwrap();
        // fedsb iid, fedsb dirichlet: complete; fedit iid: one round only (failed); fedit dirichlet: not run.
        fake_run(
            out,
            run("fedsb-r16-iid-s42"),
            &[line(1, "completed", 0.6, 100, 200), line(2, "completed", 0.8, 100, 200)],
            true,
            12.4,
        );
        fake_run(
            out,
            run("fedsb-r16-dirichlet-s42"),
            &[line(1, "completed", 0.7, 100, 200), line(2, "completed", 0.65, 100, 200)],
            true,
            10.0,
        );
        fake_run(out, run("fedit-r16-iid-s42"), &[line(1, "completed", 0.55, 5000, 5000)], false, 3.0);
        let results = write_reports(&spec, out).unwrap();
        for f in REPORT_FILES {
            assert!(out.join(f).exists(), "{f}");
        }
        assert_eq!(
            results.iter().map(|r| r.status).collect::<Vec<_>>(),
            [RunStatus::Completed, RunStatus::Incomplete, RunStatus::Completed, RunStatus::NotRun]
        );

        let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
        let rows: Vec<&str> = csv.lines().collect();
        assert_eq!(rows.len(), 5);
        assert!(rows[0].starts_with("name,method,rank,split,seed,status,"));
        // Two clients, 100 up and 200 down each, two rounds; no ledger here, so no init bytes.
        assert_eq!(rows[1], "fedsb-r16-iid-s42,fedsb,16,iid,42,completed,2,2,0.800000,0.800000,100,200,,1200,12.40,,");
        assert_eq!(
            rows[2],
            "fedit-r16-iid-s42,fedit,16,iid,42,incomplete,2,1,0.550000,0.550000,5000,5000,,20000,3.00,,"
        );
        assert_eq!(
            rows[3],
            "fedsb-r16-dirichlet-s42,fedsb,16,dirichlet,42,completed,2,2,0.650000,0.700000,100,200,,1200,10.00,,"
        );
        assert_eq!(rows[4], "fedit-r16-dirichlet-s42,fedit,16,dirichlet,42,not run,2,0,,,,,,,,,");

        let rounds = std::fs::read_to_string(out.join("rounds.csv")).unwrap();
        let rows: Vec<&str> = rounds.lines().collect();
        assert_eq!(rows.len(), 1 + 2 + 2 + 1);
        assert_eq!(rows[2], "fedsb-r16-iid-s42,fedsb,16,iid,42,2,0.800000,0.400000,0.500000,600,1200,1.500");

        let md = std::fs::read_to_string(out.join("results.md")).unwrap();
        assert!(md.starts_with("# Sweep `t`"));
        assert!(
            md.contains(
                "| fedsb-r16-iid-s42 | completed | 2/2 | 80.00 % | 80.00 % | 100 B | 200 B | – | 1.17 KiB | 12 s |"
            ),
            "{md}"
        );
        assert!(md.contains("| fedit | 16 | dirichlet | 0 | – |"), "{md}");
        assert!(md.contains("| fedsb | 16 | iid | 1 | 80.00 % |"), "{md}");
        assert!(md.contains("![Accuracy vs round](accuracy_vs_round.svg)"));

        // Charts: one line per run with results (3), a dashed one for the non-IID run.
        for f in ["accuracy_vs_round.svg", "accuracy_vs_bytes.svg"] {
            let svg = std::fs::read_to_string(out.join(f)).unwrap();
            assert_eq!(svg.matches("<polyline").count(), 3, "{f}");
            assert!(svg.contains("fedsb r16 non-IID (α=0.5)"), "{f}");
        }
        let svg = std::fs::read_to_string(out.join("accuracy_vs_bytes.svg")).unwrap();
        assert!(svg.contains(">1 kB</text>") && svg.contains(">100 kB</text>"), "log ticks");
    }

    #[test]
    fn per_method_summary_averages_seeds() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        let spec = parse("methods = [\"fedsb\"]\nrounds = 1\nclients = 2\nseeds = [1, 2]").unwrap();
        let runs = spec.runs();
        fake_run(out, &runs[0], &[line(1, "completed", 0.70, 10, 10)], true, 10.0);
        fake_run(out, &runs[1], &[line(1, "completed", 0.80, 10, 10)], true, 20.0);
        let md = results_markdown(&spec, &collect_results(&spec, out).unwrap());
        // Mean 75 %, sample standard deviation of 70 and 80: 7.07.
        assert!(md.contains("| fedsb | 16 | iid | 2 | 75.00 % ± 7.07 | 10 B | 10 B | 40 B | 15 s |"), "{md}");
        // Both seeds share a legend entry and a colour.
        let svg = accuracy_chart(&spec, &collect_results(&spec, out).unwrap(), false).to_svg();
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.split("<g class=\"legend\">").nth(1).unwrap().matches("<line").count(), 1);
    }

    #[test]
    fn a_stale_run_reports_no_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let spec = two_method_spec();
        let mut other = spec.runs()[0].clone();
        other.seed = 7;
        other.name = spec.runs()[0].name.clone();
        fake_run(dir.path(), &other, &[line(1, "completed", 0.6, 1, 1), line(2, "completed", 0.6, 1, 1)], true, 1.0);
        let r = load_result(&spec.runs()[0], dir.path()).unwrap();
        assert_eq!(r.status, RunStatus::Stale);
        assert!(r.rounds.is_empty() && r.final_accuracy.is_none());
    }

    #[test]
    fn csv_fields_are_quoted_when_needed() {
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("plain"), "plain");
    }
}
