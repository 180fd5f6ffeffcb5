//! The sweep file (TOML, format in the [module docs](super)): [`SweepSpec::load`] reads and validates it, with
//! defaults from `fedsb-server local`; [`SweepSpec::runs`] expands it into [`PlannedRun`]s, each with its name
//! and its `local` command-line arguments. Nothing here runs anything or reads a run folder.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fedsb_common::comm::planner::Method;
use serde::{Deserialize, Serialize};

use super::{SweepError, invalid, io_err};

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
    pub(super) fn describe(&self) -> Vec<String> {
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
    pub methods: Vec<Method>,
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
    pub overrides: BTreeMap<Method, MethodOverride>,
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
        let methods = f
            .methods
            .iter()
            .map(|m| m.parse::<Method>().map_err(|e| invalid(format!("`methods`: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
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
            let Some(&method) =
                f.methods.iter().zip(&methods).find_map(|(name, method)| (*name == m).then_some(method))
            else {
                return Err(invalid(format!("[{section}]: `{m}` is not in `methods` ({})", f.methods.join(", "))));
            };
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
            overrides.insert(method, MethodOverride { ranks, local: opts });
        }
        Ok(SweepSpec {
            name,
            clients,
            rounds,
            methods,
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
                for &m in &self.methods {
                    let ov = self.overrides.get(&m);
                    let ranks = ov.and_then(|o| o.ranks.clone()).unwrap_or_else(|| self.ranks.clone());
                    let local = ov.map_or_else(|| self.local.clone(), |o| o.local.over(&self.local));
                    for &rank in &ranks {
                        for &dp_epsilon in &self.epsilons {
                            let eps = dp_epsilon.map_or(String::new(), |e| format!("-eps{e}"));
                            out.push(PlannedRun {
                                name: format!("{m}-r{rank}{eps}-{}-s{seed}", split.name()),
                                method: m,
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
    pub method: Method,
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
            ("--method", self.method.to_string()),
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

#[cfg(test)]
mod tests {
    use super::super::testing::{parse, privacy_spec};
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

    /// The reports of a privacy sweep are checked in `report`'s tests.
    #[test]
    fn privacy_sweeps_add_a_budget_dimension() {
        let spec = privacy_spec();
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
    }
}
