//! The coordinator load benchmark: many concurrent simulated clients submit Fed-SB updates of a large
//! synthetic adapter to a real coordinator (the gRPC service, TLS with client certificates, the round engine,
//! the streaming aggregator, the durable round commit) on loopback.
//!
//! Two processes, so that the coordinator's memory is measured alone: this one serves
//! ([`run_coordinator_side`]) and spawns `fedsb-server bench-load` ([`run_load_clients`]), which opens one
//! connection per simulated client, joins, and in every round submits a precomputed update as soon as its task
//! arrives. The load process prints one JSON line per submission (wall-clock start and end); the coordinator
//! side records when each round closed and its own peak RSS while serving.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use candle_core::Device;
use fedsb_common::benchstats::{median, peak_rss_mib, reset_peak_rss, rss_mib};
use fedsb_common::comm::ledger::{Direction, Transfer};
use fedsb_common::wire::{CHUNK_SIZE, WireDtype, decode_blob, encode_blob};
use fedsb_proto::v1 as pb;
use fedsb_proto::v1::coordinator_client::CoordinatorClient;
use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

use crate::config::{AdapterSection, ClientsPerRound, InitSection, ModelSection, QuorumMiss, RunConfig};
use crate::coordinator::{Coordinator, ServeOptions};
use crate::service::MAX_MESSAGE_BYTES;

/// The adapter and federation a load benchmark simulates.
#[derive(Clone, Debug)]
pub struct LoadShape {
    /// Simulated clients (all sampled every round).
    pub clients: usize,
    /// Rounds.
    pub rounds: u64,
    /// Transformer layers.
    pub layers: usize,
    /// Adapted modules per layer.
    pub modules: Vec<String>,
    /// LoRA-SB rank: each update holds `layers × modules × rank²` values.
    pub rank: usize,
    /// The dtype updates travel in.
    pub wire_dtype: WireDtype,
    /// Plaintext instead of TLS with client certificates.
    pub insecure: bool,
    /// The coordinator's HTTP/2 receive window per stream (see `ServeOptions::h2_window_bytes`).
    pub h2_window_bytes: u32,
}

impl LoadShape {
    /// Values in one update.
    pub fn values(&self) -> usize {
        self.layers * self.modules.len() * self.rank * self.rank
    }
}

/// One submission as the load process saw it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SubmitTiming {
    /// The round.
    pub round: u64,
    /// The simulated client.
    pub client: String,
    /// When the client started sending (unix µs).
    pub start_us: u64,
    /// When the coordinator's "accepted" reply arrived (unix µs).
    pub end_us: u64,
    /// Size of the update blob.
    pub bytes: u64,
}

/// What the benchmark prints.
#[derive(Clone, Debug, Serialize)]
pub struct LoadReport {
    /// Simulated clients.
    pub clients: usize,
    /// Rounds.
    pub rounds: u64,
    /// Values per update.
    pub values_per_update: usize,
    /// Bytes of one update blob (safetensors: header + tensor bytes).
    pub update_bytes: u64,
    /// Wire dtype.
    pub wire_dtype: String,
    /// TLS with client certificates (false: --insecure).
    pub tls: bool,
    /// Updates accepted per second during the upload phase of a round (median over rounds).
    pub updates_per_s: f64,
    /// Update bytes ingested per second (MB = 10⁶ bytes), same window (median over rounds).
    pub ingest_mb_per_s: f64,
    /// The slowest round's ingest rate.
    pub ingest_mb_per_s_min: f64,
    /// From the last accepted update of a round to the round's commit (median over rounds), in ms.
    pub round_close_ms_median: f64,
    /// The slowest round close, in ms.
    pub round_close_ms_max: f64,
    /// Upload bytes on the socket (TLS included) over update payload bytes, from the coordinator's ledger.
    pub up_wire_over_payload: f64,
    /// Upload message bytes (protobuf + gRPC framing) over payload bytes.
    pub up_message_over_payload: f64,
    /// The coordinator process's peak RSS while serving the rounds (MiB).
    pub peak_rss_mib: f64,
    /// The coordinator process's RSS after setup, before any client connected (MiB).
    pub setup_rss_mib: f64,
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

fn client_name(i: usize) -> String {
    format!("load-{i:04}")
}

/// Runs the benchmark for one shape: sets up a synthetic run in `work_dir`, serves it on loopback, spawns the
/// load process (`load_exe bench-load ...`) and returns the figures.
pub async fn run_coordinator_side(shape: &LoadShape, work_dir: &Path, load_exe: &Path) -> Result<LoadReport> {
    std::fs::create_dir_all(work_dir).with_context(|| format!("creating {}", work_dir.display()))?;
    let certs_dir = work_dir.join("certs");
    let names: Vec<String> = (0..shape.clients).map(client_name).collect();
    let certs = crate::certs::make_dev_certs(&["localhost".into(), "127.0.0.1".into()], &names, 1)?;
    crate::certs::write_dev_certs(&certs, &certs_dir)?;
    let cfg = RunConfig {
        rounds: shape.rounds,
        clients_per_round: ClientsPerRound::Count(shape.clients),
        min_clients: Some(shape.clients),
        quorum: Some(shape.clients),
        // Short: a load process that died must not keep the benchmark waiting.
        round_deadline_secs: 120,
        on_quorum_miss: QuorumMiss::Stop,
        max_retries: 0,
        seed: 1,
        method: fedsb_common::Method::FedSb,
        weighting: fedsb_common::aggregate::Weighting::Uniform,
        wire_dtype: shape.wire_dtype,
        max_update_bytes: None,
        state_dir: work_dir.join("state"),
        model: ModelSection { path: PathBuf::new(), sha256: None, num_labels: 0, dtype: "auto".into() },
        adapter: AdapterSection { rank: shape.rank, alpha: None, targets: None },
        local: Default::default(),
        init: InitSection {
            data: PathBuf::new(),
            samples: None,
            batch_size: 1,
            eta: None,
            power_iters: 0,
            oversample: 0,
            private: false,
            grad_memory_mib: fedsb_common::adapter::init::DEFAULT_GRAD_MEMORY_MIB,
        },
        eval: None,
        dp: None,
    };
    let opts = ServeOptions { insecure: shape.insecure, h2_window_bytes: shape.h2_window_bytes, ..Default::default() };
    let modules: Vec<&str> = shape.modules.iter().map(String::as_str).collect();
    let coord = Arc::new(Coordinator::synthetic(&cfg, opts, shape.layers, &modules, shape.rank)?);
    let template = work_dir.join("global0.safetensors");
    let g0 = encode_blob(coord.engine().global().0, WireDtype::F32)?;
    std::fs::write(&template, &g0.bytes).with_context(|| format!("writing {}", template.display()))?;

    let tls = if shape.insecure {
        None
    } else {
        Some(
            ServerTlsConfig::new()
                .identity(Identity::from_pem(&certs.server.cert_pem, &certs.server.key_pem))
                .client_ca_root(Certificate::from_pem(&certs.ca.cert_pem)),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = {
        let c = coord.clone();
        tokio::spawn(async move {
            crate::serve_until(c, listener, tls, Duration::from_millis(200), async {
                let _ = stop_rx.await;
            })
            .await
        })
    };
    let setup_rss_mib = rss_mib();
    if !reset_peak_rss() {
        tracing::warn!("cannot reset the peak RSS counter: the peak includes the setup");
    }

    let mut cmd = tokio::process::Command::new(load_exe);
    cmd.arg("bench-load")
        .arg("--addr")
        .arg(addr.to_string())
        .arg("--certs")
        .arg(&certs_dir)
        .arg("--clients")
        .arg(shape.clients.to_string())
        .arg("--run-id")
        .arg(&coord.run_id)
        .arg("--frozen-sha256")
        .arg(&coord.frozen_sha256)
        .arg("--template")
        .arg(&template)
        .arg("--wire-dtype")
        .arg(shape.wire_dtype.to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true);
    if shape.insecure {
        cmd.arg("--insecure");
    }
    let child = cmd.spawn().with_context(|| format!("starting {} bench-load", load_exe.display()))?;

    // Record when each round commits (the engine's completed count moves after the durable commit).
    let mut closed_us: Vec<u64> = Vec::new();
    let watcher = {
        let c = coord.clone();
        let rounds = shape.rounds;
        tokio::spawn(async move {
            let mut seen = c.engine().completed_rounds();
            let mut out = Vec::new();
            loop {
                let (done, finished) = {
                    let e = c.engine();
                    (e.completed_rounds(), e.outcome().is_some())
                };
                while seen < done {
                    out.push(now_us());
                    seen += 1;
                }
                if finished || seen >= rounds {
                    return out;
                }
                tokio::time::sleep(Duration::from_micros(500)).await;
            }
        })
    };
    // The load process's exit comes first; if it failed, the rounds will never close: stop at once.
    let output = child.wait_with_output().await?;
    if !output.status.success() {
        watcher.abort();
        let _ = stop_tx.send(());
        let _ = server.await;
        bail!("the load process failed ({})", output.status);
    }
    closed_us.extend(watcher.await?);
    let peak_rss_mib = peak_rss_mib();
    let outcome = coord.engine().outcome().cloned();
    let (mut payload, mut message, mut wire) = (0u64, 0u64, 0u64);
    for e in coord.ledger()?.entries() {
        if e.direction == Direction::Up && e.transfer == Transfer::Round {
            payload += e.payload_bytes;
            message += e.message_bytes;
            wire += e.wire_bytes.unwrap_or(0);
        }
    }
    let _ = stop_tx.send(());
    server.await??;
    match outcome {
        Some(o) if o.status == "completed" => {}
        Some(o) => bail!("the benchmark run failed: {}", o.message),
        None => bail!("the benchmark run did not finish"),
    }
    let timings: Vec<SubmitTiming> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<std::result::Result<_, _>>()
        .context("parsing the load process's output")?;
    if closed_us.len() as u64 != shape.rounds {
        bail!("saw {} of {} rounds close", closed_us.len(), shape.rounds);
    }
    let mut rates = Vec::new();
    let mut update_rates = Vec::new();
    let mut close_ms = Vec::new();
    let mut update_bytes = 0;
    for round in 1..=shape.rounds {
        let t: Vec<&SubmitTiming> = timings.iter().filter(|t| t.round == round).collect();
        if t.len() != shape.clients {
            bail!("round {round}: {} of {} updates timed", t.len(), shape.clients);
        }
        let first = t.iter().map(|t| t.start_us).min().unwrap_or(0);
        let last = t.iter().map(|t| t.end_us).max().unwrap_or(0);
        let bytes: u64 = t.iter().map(|t| t.bytes).sum();
        update_bytes = t[0].bytes;
        let secs = (last.saturating_sub(first)).max(1) as f64 / 1e6;
        rates.push(bytes as f64 / 1e6 / secs);
        update_rates.push(t.len() as f64 / secs);
        close_ms.push(closed_us[round as usize - 1].saturating_sub(last) as f64 / 1e3);
    }
    let min_rate = rates.iter().copied().fold(f64::INFINITY, f64::min);
    let max_close = close_ms.iter().copied().fold(0.0, f64::max);
    Ok(LoadReport {
        clients: shape.clients,
        rounds: shape.rounds,
        values_per_update: shape.values(),
        update_bytes,
        wire_dtype: shape.wire_dtype.to_string(),
        tls: !shape.insecure,
        updates_per_s: median(&mut update_rates),
        ingest_mb_per_s: median(&mut rates),
        ingest_mb_per_s_min: min_rate,
        round_close_ms_median: median(&mut close_ms),
        round_close_ms_max: max_close,
        up_wire_over_payload: wire as f64 / payload.max(1) as f64,
        up_message_over_payload: message as f64 / payload.max(1) as f64,
        peak_rss_mib,
        setup_rss_mib,
    })
}

/// Arguments of the load process.
#[derive(Clone, Debug)]
pub struct LoadClients {
    /// The coordinator's address.
    pub addr: String,
    /// The certificates folder (`ca.pem`, `clients/<name>.pem|.key`).
    pub certs: PathBuf,
    /// Simulated clients.
    pub clients: usize,
    /// The run.
    pub run_id: String,
    /// The frozen hash updates declare.
    pub frozen_sha256: String,
    /// The starting global (an f32 safetensors blob) the updates are derived from.
    pub template: PathBuf,
    /// The dtype updates travel in.
    pub wire_dtype: WireDtype,
    /// Plaintext.
    pub insecure: bool,
}

async fn connect(a: &LoadClients, name: &str) -> Result<CoordinatorClient<Channel>> {
    let scheme = if a.insecure { "http" } else { "https" };
    let mut ep = Endpoint::from_shared(format!("{scheme}://{}", a.addr))?.connect_timeout(Duration::from_secs(30));
    if !a.insecure {
        let read = |p: PathBuf| std::fs::read(&p).with_context(|| format!("reading {}", p.display()));
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(a.certs.join("ca.pem"))?))
            .identity(Identity::from_pem(
                read(a.certs.join(format!("clients/{name}.pem")))?,
                read(a.certs.join(format!("clients/{name}.key")))?,
            ))
            .domain_name("localhost");
        ep = ep.tls_config(tls)?;
    }
    let ch = ep.connect().await.with_context(|| format!("{name}: connecting to {}", a.addr))?;
    Ok(CoordinatorClient::new(ch)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

fn request<T>(m: T, name: &str, insecure: bool) -> Result<tonic::Request<T>> {
    let mut r = tonic::Request::new(m);
    if insecure {
        r.metadata_mut().insert("x-fedsb-client", name.parse().map_err(|_| anyhow!("bad client name"))?);
    }
    Ok(r)
}

/// The load process: `clients` concurrent simulated clients that join and submit one precomputed update per
/// round (the template plus a per-client offset) until the run finishes. Returns every submission's timing.
pub async fn run_load_clients(a: LoadClients) -> Result<Vec<SubmitTiming>> {
    let template = decode_blob(&std::fs::read(&a.template)?, &Device::Cpu)?;
    let a = Arc::new(a);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..a.clients {
        let name = client_name(i);
        // Each client's update: the template shifted by a small client-specific offset.
        let update: fedsb_common::TensorSet =
            template.iter().map(|(n, t)| Ok((n.clone(), (t + (i as f64 + 1.0) * 1e-3)?))).collect::<Result<_>>()?;
        let blob = encode_blob(&update, a.wire_dtype)?;
        let sha = blob.sha256.clone();
        let bytes = prost::bytes::Bytes::from(blob.bytes);
        let a = a.clone();
        tasks.spawn(async move {
            let mut rpc = connect(&a, &name).await?;
            let join = pb::JoinRequest {
                base_model_sha256: "synthetic".into(),
                num_examples: 100,
                client_version: "bench-load".into(),
                token: name.clone(),
            };
            rpc.join(request(join, &name, a.insecure)?).await.with_context(|| format!("{name}: join"))?;
            let mut out = Vec::new();
            loop {
                let req = pb::GetTaskRequest { run_id: a.run_id.clone(), wait_ms: 30_000 };
                let reply = rpc.get_task(request(req, &name, a.insecure)?).await?.into_inner().reply;
                let task = match reply {
                    Some(pb::get_task_reply::Reply::Task(t)) => t,
                    Some(pb::get_task_reply::Reply::Wait(_)) => continue,
                    Some(pb::get_task_reply::Reply::Finished(_)) | None => return anyhow::Ok(out),
                };
                let header = pb::UpdateHeader {
                    run_id: task.run_id.clone(),
                    round: task.round,
                    task_id: task.task_id.clone(),
                    num_examples: 100,
                    steps: 1,
                    train_loss: 0.5,
                    blob: Some(pb::BlobRef { sha256: sha.clone(), size: bytes.len() as u64 }),
                    frozen_sha256: a.frozen_sha256.clone(),
                    dp: None,
                };
                let mut msgs = vec![pb::UpdateChunk { part: Some(pb::update_chunk::Part::Header(header)) }];
                msgs.extend((0..bytes.len()).step_by(CHUNK_SIZE).map(|s| pb::UpdateChunk {
                    part: Some(pb::update_chunk::Part::Data(bytes.slice(s..(s + CHUNK_SIZE).min(bytes.len())))),
                }));
                let start_us = now_us();
                let req = request(tokio_stream::iter(msgs), &name, a.insecure)?;
                rpc.submit_update(req).await.with_context(|| format!("{name}: round {} submit", task.round))?;
                out.push(SubmitTiming {
                    round: task.round,
                    client: name.clone(),
                    start_us,
                    end_us: now_us(),
                    bytes: bytes.len() as u64,
                });
            }
        });
    }
    // The first failing client fails the load process (and so the benchmark) at once.
    let mut all = Vec::new();
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(t)) => all.extend(t),
            Ok(Err(e)) => return Err(e),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(all)
}

/// Prints a report as a table row (`--json`: one JSON object).
pub fn print_report(r: &LoadReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(r)?);
    } else {
        println!(
            "{:>4} clients × {} rounds, {} values ({:.2} MB {}) per update, {}: {:>7.1} updates/s, {:>7.1} MB/s \
             ingested (slowest round {:.1}), round close {:.1} ms (max {:.1}), wire/payload up {:.4}, \
             coordinator peak RSS {:.0} MiB (after setup {:.0})",
            r.clients,
            r.rounds,
            r.values_per_update,
            r.update_bytes as f64 / 1e6,
            r.wire_dtype,
            if r.tls { "TLS+client certs" } else { "plaintext" },
            r.updates_per_s,
            r.ingest_mb_per_s,
            r.ingest_mb_per_s_min,
            r.round_close_ms_median,
            r.round_close_ms_max,
            r.up_wire_over_payload,
            r.peak_rss_mib,
            r.setup_rss_mib,
        );
    }
    Ok(())
}
