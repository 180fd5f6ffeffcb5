//! `fedsb-server`: the fedsb coordinator daemon.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use fedsb_server::config::RunConfig;
use fedsb_server::coordinator::{Coordinator, ServeOptions};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

mod local_cmd;
use local_cmd::{LocalArgs, local};

/// fedsb coordinator: runs Fed-SB rounds with clients on other machines.
#[derive(Parser)]
#[command(name = "fedsb-server", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run (or resume) a federated run from a TOML config until its last round.
    Run(RunArgs),
    /// Make a development CA, a server certificate and client certificates.
    Certs(CertsArgs),
    /// Run a whole federation on this machine: the coordinator and N client processes on loopback (TLS),
    /// the training data split across the clients (default: MiniLM and Rotten Tomatoes; a causal LM such as
    /// SmolLM2 with prompt/response data such as GSM8K via --model/--train/--eval).
    Local(Box<LocalArgs>),
    /// Coordinator load benchmark: many concurrent simulated clients submit Fed-SB updates of a large adapter
    /// (default: Llama-3.2-3B-sized, r=64 on 7 modules × 28 layers = 802,816 values) over TLS on loopback;
    /// prints updates/s, MB/s ingested, round close latency and the coordinator's peak RSS.
    Bench(BenchArgs),
    /// Communication planner: per-round values and bytes up/down per client and in total, and the one-time
    /// download, of a federated LoRA method on a model, from its config.json alone (no weights). The last line
    /// is the paper's `# Comm.` figure (parameters per round) as a plain integer.
    Plan(PlanArgs),
    /// Experiment sweep: methods × ranks × seeds × splits from a TOML file, each run as a `local` federation,
    /// results in one folder (results.csv, results.md, rounds.csv, accuracy charts as SVG). Completed runs are
    /// skipped, so an interrupted sweep resumes. See docs/sweeps.md.
    Sweep(SweepArgs),
    /// The load process of `bench` (started by it).
    #[command(hide = true)]
    BenchLoad(BenchLoadArgs),
}

#[derive(Args, Debug)]
struct BenchArgs {
    /// Simulated clients; a comma-separated list runs each count in a fresh coordinator process.
    #[arg(long, value_delimiter = ',', default_values_t = [8usize, 32])]
    clients: Vec<usize>,
    /// Rounds per measurement.
    #[arg(long, default_value_t = 3)]
    rounds: u64,
    /// Transformer layers.
    #[arg(long, default_value_t = 28)]
    layers: usize,
    /// Adapted modules per layer (only their count matters).
    #[arg(long, value_delimiter = ',', default_values_t = ["q", "k", "v", "o", "gate", "up", "down"].map(String::from))]
    modules: Vec<String>,
    /// LoRA-SB rank.
    #[arg(long, default_value_t = 64)]
    rank: usize,
    /// Wire dtype of updates: f32, bf16, f16.
    #[arg(long, default_value = "f32")]
    wire_dtype: String,
    /// Plaintext instead of TLS with client certificates.
    #[arg(long)]
    insecure: bool,
    /// One JSON object per measurement instead of a table row.
    #[arg(long)]
    json: bool,
    /// The coordinator's HTTP/2 receive window per client stream, KiB.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(64..=1_048_576))]
    h2_window_kib: u32,
    /// Folder for certificates and state (default: a temporary folder, removed afterwards).
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct PlanArgs {
    /// A Hugging Face config.json (or a model folder holding one).
    #[arg(long)]
    model_config: PathBuf,
    /// fedsb, fedit, ffa-lora, fedex-lora, flora, or `all` for a comparison table.
    #[arg(long, default_value = "fedsb")]
    method: PlanMethods,
    /// Rank r.
    #[arg(long)]
    rank: u64,
    /// Target modules (default: q,k,v,o,gate,up,down for decoders; query,value,attention.output.dense,output.dense
    /// for encoders).
    #[arg(long, value_delimiter = ',')]
    target_modules: Option<Vec<String>>,
    /// Clients per round.
    #[arg(long, default_value_t = 1)]
    clients: u64,
    /// Wire dtype: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Classes of a trainable classification head (encoders).
    #[arg(long, default_value_t = 0)]
    num_labels: u64,
    /// One JSON object per method instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct SweepArgs {
    /// The sweep (TOML, see docs/sweeps.md).
    #[arg(long)]
    config: PathBuf,
    /// Output folder: runs/ (one work folder and log per run), results.csv, results.md, rounds.csv and the charts.
    #[arg(long)]
    out: PathBuf,
    /// Print the planned runs (and which are already complete) and their commands; run nothing.
    #[arg(long, conflicts_with = "report_only")]
    dry_run: bool,
    /// Rebuild results and charts from the run folders already in --out; run nothing.
    #[arg(long)]
    report_only: bool,
    /// The fedsb-client executable for every run (default: next to this one).
    #[arg(long)]
    client_exe: Option<PathBuf>,
    /// Asset folder for every run (default: `local`'s, $FEDSB_ASSETS or ~/.cache/fedsb/assets).
    #[arg(long)]
    assets: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct BenchLoadArgs {
    #[arg(long)]
    addr: String,
    #[arg(long)]
    certs: PathBuf,
    #[arg(long)]
    clients: usize,
    #[arg(long)]
    run_id: String,
    #[arg(long)]
    frozen_sha256: String,
    #[arg(long)]
    template: PathBuf,
    #[arg(long, default_value = "f32")]
    wire_dtype: String,
    #[arg(long)]
    insecure: bool,
}

/// Transport flags shared by the commands that serve.
#[derive(Args, Debug, Clone)]
pub struct TlsArgs {
    /// Server certificate (PEM).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA whose client certificates are required (mutual TLS; identity = certificate CN). Without it,
    /// clients identify with a token.
    #[arg(long)]
    client_ca: Option<PathBuf>,
    /// Plaintext HTTP/2, identities from tokens: for tests and trusted networks only.
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key", "client_ca"])]
    insecure: bool,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// The run configuration (TOML).
    #[arg(long)]
    config: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:7443")]
    listen: SocketAddr,
    #[command(flatten)]
    tls: TlsArgs,
    /// Continue the latest run in the state folder from its last completed round.
    #[arg(long)]
    resume: bool,
    /// What the products with bf16/f16/quantized frozen weights compute in: auto (bf16 where the CPU has fast bf16
    /// units: AMX, or AVX-512 BF16 on AMD), f32, bf16. The weights' format is `[model] dtype` of the config.
    #[arg(long, default_value = "auto", env = "FEDSB_COMPUTE_DTYPE")]
    compute_dtype: String,
    /// Override `rounds` of the config.
    #[arg(long)]
    rounds: Option<u64>,
    /// Override `state_dir` of the config.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// HTTP/2 receive window per client stream, KiB: bounds what each uploading client can make the
    /// coordinator buffer; raise it for clients on links with a large bandwidth × round-trip time.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(64..=1_048_576))]
    h2_window_kib: u32,
    /// Seconds to keep serving after the run ends, so clients learn the outcome.
    #[arg(long, default_value_t = 5)]
    linger_secs: u64,
}

#[derive(Args, Debug)]
struct CertsArgs {
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
    /// DNS names or IP addresses the server certificate is valid for.
    #[arg(long = "server-name", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
    server_names: Vec<String>,
    /// Client names (certificate CN = client identity), comma-separated.
    #[arg(long, value_delimiter = ',')]
    clients: Vec<String>,
    /// Validity in days.
    #[arg(long, default_value_t = 30)]
    days: u32,
}

/// Builds the server TLS config from the flags (`None` with --insecure).
fn server_tls(t: &TlsArgs) -> Result<Option<ServerTlsConfig>> {
    if t.insecure {
        return Ok(None);
    }
    let (Some(cert), Some(key)) = (&t.tls_cert, &t.tls_key) else {
        bail!(
            "TLS is on by default: pass --tls-cert and --tls-key (make them with `fedsb-server certs`), or --insecure"
        );
    };
    let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let mut cfg = ServerTlsConfig::new().identity(Identity::from_pem(read(cert)?, read(key)?));
    if let Some(ca) = &t.client_ca {
        cfg = cfg.client_ca_root(Certificate::from_pem(read(ca)?));
    }
    Ok(Some(cfg))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // The benchmark's own output is its figures; per-update logs would only slow it down.
    let default_filter = match cli.command {
        Command::Bench(_) | Command::BenchLoad(_) => "warn",
        _ => "warn,fedsb_server=info,fedsb=info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Command::Run(a) => run(a),
        Command::Local(a) => local(*a),
        Command::Bench(a) => bench(a),
        Command::BenchLoad(a) => bench_load(a),
        Command::Plan(a) => plan(a),
        Command::Sweep(a) => sweep(a),
        Command::Certs(a) => {
            let c = fedsb_server::certs::make_dev_certs(&a.server_names, &a.clients, a.days)?;
            fedsb_server::certs::write_dev_certs(&c, &a.out)?;
            println!(
                "wrote a development CA, a server certificate for {:?} and {} client certificates to {}",
                a.server_names,
                a.clients.len(),
                a.out.display()
            );
            Ok(())
        }
    }
}

fn run(a: RunArgs) -> Result<()> {
    fedsb_common::frozen::set_compute_dtype(a.compute_dtype.parse()?)?;
    let mut cfg = RunConfig::load(&a.config)?;
    if let Some(r) = a.rounds {
        cfg.rounds = r;
    }
    if let Some(d) = a.state_dir {
        cfg.state_dir = d;
    }
    cfg.validate()?;
    let tls = server_tls(&a.tls)?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let opts = ServeOptions {
        insecure: a.tls.insecure,
        print_rounds: true,
        h2_window_bytes: a.h2_window_kib * 1024,
        ..Default::default()
    };
    let coord = Arc::new(Coordinator::prepare(&cfg, a.resume, opts)?);
    let outcome = rt.block_on(async move {
        let listener =
            tokio::net::TcpListener::bind(a.listen).await.with_context(|| format!("binding {}", a.listen))?;
        tracing::info!(
            "run {} listening on {} ({})",
            coord.run_id,
            listener.local_addr()?,
            if tls.is_some() { "TLS" } else { "plaintext, --insecure" }
        );
        fedsb_server::serve(coord.clone(), listener, tls, Duration::from_secs(a.linger_secs)).await?;
        anyhow::Ok(coord.engine().outcome().cloned())
    })?;
    match outcome {
        Some(o) if o.status == "completed" => {
            println!("run completed: {}; final global adapter blob {}", o.message, o.global_sha256);
            Ok(())
        }
        Some(o) => bail!("run failed: {}", o.message),
        None => bail!("the coordinator stopped before the run ended"),
    }
}

fn sweep(a: SweepArgs) -> Result<()> {
    use fedsb_server::sweep::{RunState, RunnerOptions, SweepSpec, local_command, run_state, run_sweep, write_reports};
    let spec = SweepSpec::load(&a.config)?;
    let runs = spec.runs();
    let opts = RunnerOptions {
        out: a.out.clone(),
        server_exe: std::env::current_exe().context("locating this executable")?,
        client_exe: a.client_exe.clone(),
        assets: a.assets.clone(),
    };
    if a.dry_run {
        println!("sweep {}: {} runs into {}", spec.name, runs.len(), a.out.display());
        for (i, run) in runs.iter().enumerate() {
            let state = match run_state(run, &a.out) {
                RunState::Absent => "to run".to_string(),
                RunState::Complete => "complete, would be skipped".to_string(),
                RunState::Stale(why) => format!("{why}: would be removed and run again"),
            };
            let cmd = local_command(run, &opts);
            let args: Vec<String> = cmd.get_args().map(|s| s.to_string_lossy().into_owned()).collect();
            println!(
                "[{}/{}] {} ({state})\n    {} {}",
                i + 1,
                runs.len(),
                run.name,
                opts.server_exe.display(),
                args.join(" ")
            );
        }
        return Ok(());
    }
    if a.report_only {
        let results = write_reports(&spec, &a.out)?;
        let with = results.iter().filter(|r| !r.rounds.is_empty()).count();
        println!("reports for {with} of {} runs written to {}", results.len(), a.out.display());
        return Ok(());
    }
    let client_exe = match &a.client_exe {
        Some(p) => p.clone(),
        None => opts.server_exe.with_file_name("fedsb-client"),
    };
    if !client_exe.exists() {
        bail!(
            "{} not found: build it (`cargo build --release -p fedsb-client`) or pass --client-exe",
            client_exe.display()
        );
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    // A copy of the config for the record (unless it is that copy: resuming with --config OUT/sweep.toml).
    let copy = a.out.join("sweep.toml");
    if std::fs::canonicalize(&a.config).ok() != std::fs::canonicalize(&copy).ok() {
        std::fs::copy(&a.config, &copy).with_context(|| format!("copying the config to {}", copy.display()))?;
    }
    println!("sweep {}: {} runs into {}", spec.name, runs.len(), a.out.display());
    let summary = run_sweep(&spec, &opts)?;
    println!(
        "{} run, {} skipped (already complete), {} failed; results: {}",
        summary.ran.len(),
        summary.skipped.len(),
        summary.failed.len(),
        a.out.join("results.md").display()
    );
    if !summary.failed.is_empty() {
        bail!("{} of {} runs failed: {}", summary.failed.len(), runs.len(), summary.failed.join(", "));
    }
    Ok(())
}

fn bench(a: BenchArgs) -> Result<()> {
    use fedsb_server::loadbench::{LoadShape, print_report, run_coordinator_side};
    let exe = std::env::current_exe()?;
    if a.clients.is_empty() || a.clients.contains(&0) || a.rounds == 0 || a.rank == 0 || a.layers == 0 {
        bail!("--clients, --rounds, --layers and --rank must be positive");
    }
    let distinct: std::collections::BTreeSet<&String> = a.modules.iter().collect();
    if distinct.len() != a.modules.len() || a.modules.is_empty() {
        bail!("--modules must name distinct modules");
    }
    if a.clients.len() > 1 {
        // One fresh coordinator process per client count, so each peak RSS is measured alone.
        for n in &a.clients {
            let mut cmd = std::process::Command::new(&exe);
            cmd.args(["bench", "--clients", &n.to_string(), "--rounds", &a.rounds.to_string()])
                .args(["--layers", &a.layers.to_string(), "--rank", &a.rank.to_string()])
                .args(["--modules", &a.modules.join(","), "--wire-dtype", &a.wire_dtype])
                .args(["--h2-window-kib", &a.h2_window_kib.to_string()]);
            if a.insecure {
                cmd.arg("--insecure");
            }
            if a.json {
                cmd.arg("--json");
            }
            if let Some(w) = &a.work_dir {
                cmd.arg("--work-dir").arg(w.join(format!("clients-{n}")));
            }
            let st = cmd.status().context("starting a bench process")?;
            if !st.success() {
                bail!("the measurement with {n} clients failed ({st})");
            }
        }
        return Ok(());
    }
    let shape = LoadShape {
        clients: a.clients[0],
        rounds: a.rounds,
        layers: a.layers,
        modules: a.modules.clone(),
        rank: a.rank,
        wire_dtype: a.wire_dtype.parse()?,
        insecure: a.insecure,
        h2_window_bytes: a.h2_window_kib * 1024,
    };
    let tmp = tempfile::tempdir()?;
    let work = a.work_dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    if !a.json {
        eprintln!(
            "bench: {} clients × {} rounds, {} values per update ({} layers × {} modules × r={}²), {}",
            shape.clients,
            shape.rounds,
            shape.values(),
            shape.layers,
            shape.modules.len(),
            shape.rank,
            if shape.insecure { "plaintext" } else { "TLS with client certificates" }
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let report = rt.block_on(run_coordinator_side(&shape, &work, &exe))?;
    print_report(&report, a.json)
}

fn bench_load(a: BenchLoadArgs) -> Result<()> {
    use fedsb_server::loadbench::{LoadClients, run_load_clients};
    let args = LoadClients {
        addr: a.addr,
        certs: a.certs,
        clients: a.clients,
        run_id: a.run_id,
        frozen_sha256: a.frozen_sha256,
        template: a.template,
        wire_dtype: a.wire_dtype.parse()?,
        insecure: a.insecure,
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let timings = rt.block_on(run_load_clients(args))?;
    for t in timings {
        println!("{}", serde_json::to_string(&t)?);
    }
    Ok(())
}

/// `plan --method`: one method, or `all` of them for the comparison table.
#[derive(Clone, Copy, Debug)]
enum PlanMethods {
    /// Every method, in the paper's table order.
    All,
    /// This one.
    One(fedsb_common::Method),
}

impl std::str::FromStr for PlanMethods {
    type Err = fedsb_common::Error;
    fn from_str(s: &str) -> fedsb_common::Result<Self> {
        if s == "all" { Ok(PlanMethods::All) } else { s.parse().map(PlanMethods::One) }
    }
}

fn plan(a: PlanArgs) -> Result<()> {
    use fedsb_common::comm::human_bytes;
    use fedsb_common::comm::planner::{Method, ModelShape, Plan, PlanSpec};
    let shape = ModelShape::from_file(&a.model_config)?;
    let dtype: fedsb_common::wire::WireDtype = a.dtype.parse()?;
    let methods: Vec<Method> = match a.method {
        PlanMethods::All => Method::ALL.to_vec(),
        PlanMethods::One(m) => vec![m],
    };
    let targets = a.target_modules.clone().unwrap_or_else(|| shape.default_targets());
    let plans = methods
        .iter()
        .map(|&method| {
            let spec = PlanSpec {
                method,
                rank: a.rank,
                targets: targets.clone(),
                clients: a.clients,
                bytes_per_value: dtype.bytes_per_value(),
                num_labels: a.num_labels,
            };
            Plan::new(&shape, &spec)
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    if a.json {
        for p in &plans {
            let mut v = serde_json::to_value(p)?;
            v["paper_comm"] = p.paper_comm().into();
            println!("{v}");
        }
        return Ok(());
    }
    println!(
        "{} ({} layers), r = {}, targets {}, {} clients per round, {} ({} adapted matrices{})",
        a.model_config.display(),
        shape.layers,
        a.rank,
        targets.join(","),
        a.clients,
        a.dtype,
        plans[0].adapted_matrices,
        if plans[0].head_values > 0 { format!(", head {} values", plans[0].head_values) } else { String::new() }
    );
    println!(
        "{:<11} | {:>14} | {:>14} | {:>10} | {:>10} | {:>12} | {:>12} | {:>14}",
        "method", "up values", "down values", "up bytes", "down bytes", "all clients", "init once", "# Comm."
    );
    for p in &plans {
        println!(
            "{:<11} | {:>14} | {:>14} | {:>10} | {:>10} | {:>12} | {:>12} | {:>14}",
            p.method.name(),
            p.up_per_client,
            p.down_per_client,
            human_bytes(p.up_bytes()),
            human_bytes(p.down_bytes()),
            human_bytes((p.up_bytes() + p.down_bytes()) * p.clients),
            human_bytes(p.init_bytes()),
            p.paper_comm()
        );
    }
    for p in &plans {
        if let Some(n) = p.paper_note() {
            println!("note: {}: {n}", p.method.name());
        }
    }
    if let [p] = plans.as_slice() {
        println!("{}", p.paper_comm());
    }
    Ok(())
}
