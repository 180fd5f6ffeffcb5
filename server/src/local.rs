//! A whole federation on one machine: a coordinator (in this process) and N `fedsb-client join` processes
//! on loopback, TLS with client certificates on, the training data split across the clients (IID or
//! Dirichlet non-IID by label).
//!
//! The work folder gets the certificates, the data shards, the run config, the coordinator's state
//! (SQLite, blobs, `metrics.jsonl`) and one log per client.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use fedsb_common::spec::LocalTraining;
use fedsb_common::train::data::Example;
use fedsb_common::train::partition::{dirichlet_split, iid_split};
use fedsb_common::train::{Dataset, LrSchedule};

use crate::certs::{make_dev_certs, write_dev_certs};
use crate::config::RunConfig;
use crate::coordinator::{Coordinator, ServeOptions};
use fedsb_common::comm::human_bytes;

/// How the training data is split over the clients.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Split {
    /// Shuffled, equal shards.
    Iid,
    /// Per label, Dirichlet(α) proportions over clients.
    Dirichlet(f64),
}

/// A local federation to run.
#[derive(Clone, Debug)]
pub struct LocalFederation {
    /// Number of client processes.
    pub clients: usize,
    /// The model (Hugging Face folder or GGUF).
    pub model: PathBuf,
    /// Training data (JSONL); its first `public_examples` examples are the coordinator's public init data
    /// and are given to no client.
    pub train: PathBuf,
    /// Held-out data the coordinator evaluates on.
    pub eval: Option<PathBuf>,
    /// Public examples for the LoRA-SB init.
    pub public_examples: usize,
    /// The split.
    pub split: Split,
    /// The run's TOML template (everything but paths), already parsed.
    pub config: RunConfig,
    /// The work folder.
    pub work_dir: PathBuf,
    /// The `fedsb-client` executable.
    pub client_exe: PathBuf,
    /// Show the clients' output on this terminal instead of log files.
    pub client_output_inherit: bool,
    /// Extra arguments for every `fedsb-client join` (e.g. `--dtype bf16`).
    pub client_args: Vec<String>,
}

/// Watches the client processes until they have all exited (or, once the run is over, 60 s have passed; the
/// stragglers are then killed). A client that fails while the run goes on is reported to the coordinator
/// ([`Coordinator::client_died`]) with the end of its log, so the run does not wait for it until a deadline.
/// Returns each client's exit status (`None`: killed).
fn watch_clients(
    mut children: Vec<Child>,
    coord: &Arc<Coordinator>,
    work_dir: &Path,
) -> Result<Vec<Option<std::process::ExitStatus>>> {
    let mut status: Vec<Option<std::process::ExitStatus>> = vec![None; children.len()];
    let mut reported = vec![false; children.len()];
    let mut ended_at: Option<std::time::Instant> = None;
    loop {
        for (i, ch) in children.iter_mut().enumerate() {
            if status[i].is_none() {
                status[i] = ch.try_wait()?;
            }
            if let Some(s) = status[i]
                && !s.success()
                && !reported[i]
            {
                let log = work_dir.join(format!("client-{}.log", i + 1));
                let reason = format!("its process exited with {s}; {}", log_tail(&log));
                reported[i] = coord.client_died(&format!("client-{}", i + 1), &reason);
            }
        }
        if status.iter().all(Option::is_some) {
            return Ok(status);
        }
        if coord.engine().outcome().is_some() {
            // Clients leave by themselves once they learn the outcome; do not wait for ever.
            let t = *ended_at.get_or_insert_with(std::time::Instant::now);
            if t.elapsed() > Duration::from_secs(60) {
                for (i, ch) in children.iter_mut().enumerate() {
                    if status[i].is_none() {
                        ch.kill()?;
                        ch.wait()?;
                    }
                }
                return Ok(status);
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What a client's log says about its end, for a message: its last error (`Error: …` with its causes, without
/// a backtrace), else its last lines; and where the log is.
fn log_tail(log: &Path) -> String {
    let Ok(text) = std::fs::read_to_string(log) else { return format!("see {}", log.display()) };
    let end = match text.rfind("Error: ") {
        Some(i) => {
            let err = &text[i..];
            err.find("Stack backtrace:").map_or(err, |j| &err[..j]).to_string()
        }
        None => {
            let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
            lines[lines.len().saturating_sub(3)..].join(" | ")
        }
    };
    let end = end.split_whitespace().collect::<Vec<_>>().join(" ");
    let end: String = if end.chars().count() > 400 {
        format!("…{}", end.chars().skip(end.chars().count() - 400).collect::<String>())
    } else {
        end
    };
    format!("{end} (log: {})", log.display())
}

/// The LoRA-SB init's step size η that the paper's code would use if the clients' `examples` training examples
/// were one dataset: the first learning rate of `local`'s schedule (peak, warm-up ratio, shape) stretched over
/// one pass of them in batches of `local.batch_size`, i.e. `lr / ⌈warmup_ratio · examples / batch_size⌉` (the
/// peak rate without warm-up). The coordinator's default, the first rate of one round's schedule, is the peak
/// rate on rounds of a few steps.
pub fn paper_init_eta(local: &LocalTraining, examples: usize) -> f64 {
    let steps = examples.div_ceil(local.batch_size.max(1)).max(1);
    LrSchedule::new(local.lr, local.warmup_ratio, steps, local.schedule).first_lr()
}

fn write_jsonl(path: &Path, examples: &[&Example]) -> Result<()> {
    let mut out = String::new();
    for e in examples {
        out.push_str(&serde_json::to_string(e)?);
        out.push('\n');
    }
    std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))
}

impl LocalFederation {
    /// Prepares the work folder (certificates, shards, config) and returns the config to run.
    pub fn prepare(&self) -> Result<RunConfig> {
        let w = &self.work_dir;
        std::fs::create_dir_all(w.join("data")).with_context(|| format!("creating {}", w.display()))?;
        let names: Vec<String> = (1..=self.clients).map(|i| format!("client-{i}")).collect();
        let certs = make_dev_certs(&["localhost".to_string(), "127.0.0.1".to_string()], &names, 7)?;
        write_dev_certs(&certs, &w.join("certs"))?;
        let ds = Dataset::load_jsonl(&self.train)?;
        if ds.len() <= self.public_examples + self.clients {
            bail!(
                "{} has {} examples: too few for {} public examples and {} clients",
                self.train.display(),
                ds.len(),
                self.public_examples,
                self.clients
            );
        }
        let (public, private) = ds.examples.split_at(self.public_examples);
        write_jsonl(&w.join("data/public.jsonl"), &public.iter().collect::<Vec<_>>())?;
        let seed = self.config.seed;
        let shards = match self.split {
            Split::Iid => iid_split(private.len(), self.clients, seed)?,
            Split::Dirichlet(alpha) => {
                let labels: Vec<usize> = private
                    .iter()
                    .map(|e| match e {
                        Example::Classification { label, .. } => Ok(*label),
                        _ => Err(anyhow::anyhow!(
                            "a Dirichlet split skews the shards by label, and {} has unlabelled (prompt/response or \
                             text) examples: split it IID",
                            self.train.display()
                        )),
                    })
                    .collect::<Result<_>>()?;
                dirichlet_split(&labels, self.clients, alpha, seed)?
            }
        };
        for (i, idx) in shards.iter().enumerate() {
            let ex: Vec<&Example> = idx.iter().map(|&j| &private[j]).collect();
            write_jsonl(&w.join(format!("data/shard-{}.jsonl", i + 1)), &ex)?;
            let labels = ex
                .iter()
                .filter_map(|e| match e {
                    Example::Classification { label, .. } => Some(*label),
                    _ => None,
                })
                .fold(std::collections::BTreeMap::<usize, usize>::new(), |mut m, l| {
                    *m.entry(l).or_default() += 1;
                    m
                });
            if labels.is_empty() {
                tracing::info!("client-{}: {} examples", i + 1, ex.len());
            } else {
                tracing::info!("client-{}: {} examples, labels {:?}", i + 1, ex.len(), labels);
            }
        }
        let mut cfg = self.config.clone();
        if let Some(dp) = &mut cfg.dp
            && dp.delta.is_nan()
        {
            // δ left to us: 1/N² for the smallest shard, safely below the 1/N every client needs.
            let n = shards.iter().map(Vec::len).min().unwrap_or(1).max(1) as f64;
            dp.delta = 1.0 / (n * n);
            tracing::info!("DP δ = {:e} (1/N² for the smallest shard, N = {n})", dp.delta);
        }
        cfg.model.path = self.model.clone();
        cfg.init.data = w.join("data/public.jsonl");
        cfg.state_dir = w.join("state");
        if let Some(e) = &self.eval {
            match &mut cfg.eval {
                Some(ev) => ev.data = e.clone(),
                None => cfg.eval = Some(crate::config::EvalSection::new(e.clone(), None, 32)),
            }
        }
        cfg.validate()?;
        std::fs::write(w.join("run.toml"), toml::to_string_pretty(&cfg)?)?;
        Ok(cfg)
    }

    fn spawn_client(&self, i: usize, addr: std::net::SocketAddr) -> Result<Child> {
        let w = &self.work_dir;
        let name = format!("client-{i}");
        let mut cmd = Command::new(&self.client_exe);
        cmd.arg("join")
            .arg("--server")
            .arg(format!("https://127.0.0.1:{}", addr.port()))
            .arg("--ca")
            .arg(w.join("certs/ca.pem"))
            .arg("--cert")
            .arg(w.join(format!("certs/clients/{name}.pem")))
            .arg("--key")
            .arg(w.join(format!("certs/clients/{name}.key")))
            .arg("--model")
            .arg(&self.model)
            .arg("--data")
            .arg(w.join(format!("data/shard-{i}.jsonl")))
            .arg("--work-dir")
            .arg(w.join(&name))
            .args(&self.client_args);
        // Each client trains with one thread: N processes share the machine's cores.
        let threads = (std::thread::available_parallelism().map_or(2, |n| n.get()) / self.clients).max(1);
        cmd.env("RAYON_NUM_THREADS", threads.to_string());
        if !self.client_output_inherit {
            let log = std::fs::File::create(w.join(format!("{name}.log")))?;
            cmd.stdout(Stdio::from(log.try_clone()?)).stderr(Stdio::from(log));
        }
        cmd.spawn().with_context(|| format!("starting {}", self.client_exe.display()))
    }

    /// Runs the federation to its end: coordinator here, clients as child processes. Returns the outcome.
    pub async fn run(&self, cfg: RunConfig) -> Result<crate::round::RunOutcome> {
        let w = &self.work_dir;
        let opts = ServeOptions { print_rounds: true, ..Default::default() };
        let cfg2 = cfg.clone();
        let coord = Arc::new(tokio::task::spawn_blocking(move || Coordinator::prepare(&cfg2, false, opts)).await??);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let read = |p: &str| std::fs::read(w.join(p)).with_context(|| format!("reading {p}"));
        let tls = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(read("certs/server.pem")?, read("certs/server.key")?))
            .client_ca_root(tonic::transport::Certificate::from_pem(read("certs/ca.pem")?));
        println!(
            "local federation ({}): run {}, {} clients, {} rounds, coordinator on {addr} (TLS, client certificates); work folder {}",
            coord.spec.method,
            coord.run_id,
            self.clients,
            cfg.rounds,
            w.display()
        );
        let server = {
            let c = coord.clone();
            tokio::spawn(async move { crate::serve(c, listener, Some(tls), Duration::from_secs(3)).await })
        };
        let mut children = Vec::new();
        for i in 1..=self.clients {
            children.push(self.spawn_client(i, addr)?);
        }
        let watcher = {
            let (c, w) = (coord.clone(), w.clone());
            tokio::task::spawn_blocking(move || watch_clients(children, &c, &w))
        };
        let served = server.await.map_err(anyhow::Error::from).and_then(|r| r);
        if let Err(e) = &served {
            // The clients cannot finish without it: end the run so the watcher stops them.
            coord.engine().abort(format!("the coordinator stopped serving: {e:#}"));
        }
        let statuses = watcher.await??;
        served?;
        for (i, status) in statuses.into_iter().enumerate() {
            match status {
                Some(s) if s.success() => {}
                Some(s) => tracing::warn!(
                    "client-{} exited with {s} (see {})",
                    i + 1,
                    w.join(format!("client-{}.log", i + 1)).display()
                ),
                None => tracing::warn!("client-{} did not exit; killed", i + 1),
            }
        }
        let outcome = coord.engine().outcome().cloned().ok_or_else(|| anyhow::anyhow!("the run did not finish"))?;
        let ledger = coord.ledger()?;
        println!(
            "\nbyte ledger (per round, all clients; payload = tensor bytes, message = protobuf + gRPC framing, wire = socket incl. TLS):"
        );
        println!("{}", ledger.table());
        std::fs::write(w.join("ledger.jsonl"), ledger.to_jsonl())?;
        println!(
            "analytic minimum per client per direction per round: {} ({}: {} per adapted layer + the head)",
            human_bytes(coord.analytic_min_bytes()),
            coord.spec.method,
            coord.spec.method.update_values()
        );
        let privacy = coord.privacy_summary()?;
        println!("privacy: {}", privacy.init);
        if let Some(dp) = &privacy.dp {
            println!(
                "privacy: DP-SGD required (record-level, per client): C = {}, budget ε = {} at δ = {:e}",
                dp.max_grad_norm, dp.target_epsilon, dp.delta
            );
            for (c, r) in &privacy.clients {
                println!(
                    "  {c}: ε = {:.4} after {} steps (σ = {:.4}, q = {:.5}{})",
                    r.epsilon,
                    r.steps,
                    r.noise_multiplier,
                    r.sample_rate,
                    if r.secure_noise { "" } else { ", TEST-MODE NOISE" }
                );
            }
            for (c, why) in &privacy.left {
                println!("  {c} left the run: {why}");
            }
            match privacy.worst_epsilon {
                Some(e) => {
                    println!("privacy: the run's guarantee is the worst client's: (ε, δ) = ({e:.4}, {:e})", dp.delta)
                }
                None => println!("privacy: no DP report was recorded"),
            }
        }
        println!("run {}: {}", outcome.status, outcome.message);
        println!("metrics: {}, ledger: {}", w.join("state/metrics.jsonl").display(), w.join("ledger.jsonl").display());
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_clients_log_gives_its_error_without_the_backtrace() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("client-1.log");
        std::fs::write(
            &log,
            "[client-1] joined run r (12 examples)\nError: --dtype\n\nCaused by:\n    unknown weight format `x`\n\n\
             Stack backtrace:\n   0: std::backtrace\n   1: main\n",
        )
        .unwrap();
        let t = log_tail(&log);
        assert!(t.starts_with("Error: --dtype Caused by: unknown weight format `x` (log: "), "{t}");
        std::fs::write(&log, "a\n\nb\nc\nd\n").unwrap();
        assert!(log_tail(&log).starts_with("b | c | d (log: "), "{}", log_tail(&log));
        assert!(log_tail(&dir.path().join("missing.log")).starts_with("see "));
    }

    #[test]
    fn the_paper_init_step_warms_up_over_one_pass_of_the_clients_data() {
        let local = LocalTraining { lr: 2e-3, warmup_ratio: 0.06, batch_size: 4, ..Default::default() };
        // 936 examples in batches of 4: 234 steps, ⌈0.06 · 234⌉ = 15 warm-up steps.
        assert!((paper_init_eta(&local, 936) - 2e-3 / 15.0).abs() < 1e-15);
        // The paper's GSM8K setting: 1,000 problems in batches of 3, 5% warm-up → ⌈16.7⌉ = 17 steps.
        let paper = LocalTraining { warmup_ratio: 0.05, batch_size: 3, ..local.clone() };
        assert!((paper_init_eta(&paper, 1000) - 2e-3 / 17.0).abs() < 1e-15);
        // No warm-up, or no data: Adam's first step is the peak rate.
        assert_eq!(paper_init_eta(&LocalTraining { warmup_ratio: 0.0, ..local.clone() }, 936), 2e-3);
        assert_eq!(paper_init_eta(&local, 0), 2e-3);
    }
}
