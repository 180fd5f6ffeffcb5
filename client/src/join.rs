//! `fedsb-client join`: take part in a federated run.
//!
//! Join (the coordinator checks the base model's hash) → download the LoRA-SB init blob once (chunks,
//! resumable, hash-verified) → loop: long-poll a task, download the global tensors, train locally, submit
//! the update (with the hash of the frozen B and A it was trained with). Only outbound connections, so a
//! client behind NAT works. Lost connections are retried with backoff (bounded, logged).
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use fedsb_common::aggregate::FLoraAggregator;
use fedsb_common::aggregate::product::{base_chain_sha256, base_deltas};
use fedsb_common::dp::report::ClientPrivacy;
use fedsb_common::dp::{DpReport, NoiseRng, train_dp};
use fedsb_common::model::load::{model_weight_files, weights_sha256};
use fedsb_common::model::{LoadOptions, Model, load_model};
use fedsb_common::spec::ClientSpec;
use fedsb_common::train::{Dataset, Encoder, TrainSummary, train};
use fedsb_common::wire::{CHUNK_SIZE, decode_blob, encode_blob, sha256_hex};
use fedsb_proto::v1 as pb;
use fedsb_proto::v1::coordinator_client::CoordinatorClient;
use serde::Serialize;
use tonic::Request;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::device::parse_device;
use crate::progress::StepProgress;

/// Metadata key of the client identity in token mode.
const TOKEN_HEADER: &str = "x-fedsb-client";
/// Largest gRPC message (a chunk plus headroom), as on the coordinator.
const MAX_MESSAGE_BYTES: usize = 2 * CHUNK_SIZE + 64 * 1024;

/// How to reach the coordinator (shared by `join` and `status`).
#[derive(Args, Debug, Clone)]
pub struct ConnectArgs {
    /// The coordinator, e.g. https://coordinator.example.org:7443 (http:// with --insecure).
    #[arg(long)]
    pub server: String,
    /// CA certificate that signed the coordinator's certificate (PEM).
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// This client's certificate (PEM), for mutual TLS; its CN is the client's identity.
    #[arg(long, requires = "key")]
    pub cert: Option<PathBuf>,
    /// This client's private key (PEM).
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
    /// Identity token when the coordinator does not use client certificates (or runs --insecure).
    #[arg(long)]
    pub token: Option<String>,
    /// Server name to verify in the coordinator's certificate (default: the host of --server).
    #[arg(long)]
    pub server_name: Option<String>,
    /// Plaintext connection (the coordinator must run with --insecure).
    #[arg(long)]
    pub insecure: bool,
}

/// Arguments of `fedsb-client status`.
#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    #[command(flatten)]
    conn: ConnectArgs,
}

/// Arguments of `fedsb-client join`.
#[derive(Args, Debug, Clone)]
pub struct JoinArgs {
    #[command(flatten)]
    conn: ConnectArgs,
    /// The base model (must be the run's: same weights, checked by sha256).
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    weights: crate::device::WeightArgs,
    /// This client's private training data (JSONL).
    #[arg(long)]
    data: PathBuf,
    /// Where to keep the final adapter and a summary.
    #[arg(long, default_value = "fedsb-client-work")]
    work_dir: PathBuf,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Give up after this many seconds without reaching the coordinator.
    #[arg(long, default_value_t = 300)]
    retry_secs: u64,
    /// Leave the run after this many rounds (default: stay until it ends).
    #[arg(long)]
    max_rounds: Option<u64>,
}

type Rpc = CoordinatorClient<InterceptedService<Channel, TokenInterceptor>>;

/// Adds the identity token to every request.
#[derive(Clone)]
struct TokenInterceptor(Option<MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for TokenInterceptor {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut().insert(TOKEN_HEADER, t.clone());
        }
        Ok(req)
    }
}

#[derive(Serialize)]
struct ClientSummary {
    client_id: String,
    run_id: String,
    init_sha256: String,
    frozen_sha256: String,
    rounds_trained: Vec<u64>,
    status: String,
    message: String,
    final_global_sha256: Option<String>,
    /// FedEx-LoRA / FLoRA: the product blobs folded into the base weights, in round order.
    base_folds: Vec<String>,
    /// DP-SGD: the privacy spent so far (the last report sent).
    #[serde(skip_serializing_if = "Option::is_none")]
    privacy: Option<DpReport>,
}

/// Environment variable that turns on the seeded, **insecure** DP noise of test mode (its value is the seed).
pub const INSECURE_NOISE_SEED_ENV: &str = "FEDSB_DP_INSECURE_TEST_SEED";

/// The DP noise generator: OS-seeded ChaCha20, or in explicit test mode a seeded one (with a loud warning;
/// the seed is mixed with `salt`, the client's id, so that clients draw different noise).
pub fn noise_rng(salt: &str) -> Result<NoiseRng> {
    match std::env::var(INSECURE_NOISE_SEED_ENV) {
        Ok(v) => {
            let seed: u64 = v.parse().with_context(|| format!("{INSECURE_NOISE_SEED_ENV} must be an integer"))?;
            let seed = salt.bytes().fold(seed, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
            eprintln!(
                "WARNING: {INSECURE_NOISE_SEED_ENV} is set: DP noise comes from a seeded generator (test mode). It \
                 gives NO privacy against anyone who knows the seed; reports say so, and a coordinator refuses them \
                 unless its [dp] section sets allow_insecure_noise."
            );
            Ok(NoiseRng::insecure_seeded(seed))
        }
        Err(_) => Ok(NoiseRng::from_os()?),
    }
}

/// The client's privacy accounting for `run_id`: continued from `work_dir/privacy.json` when it belongs to the
/// same run and spec (a restarted client does not start again from ε = 0), else planned afresh.
fn load_or_plan_privacy(
    work_dir: &Path,
    run_id: &str,
    spec: &ClientSpec,
    num_examples: usize,
) -> Result<Option<ClientPrivacy>> {
    let Some(dp) = &spec.dp else { return Ok(None) };
    let path = work_dir.join("privacy.json");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let saved: ClientPrivacy =
            serde_json::from_str(&text).with_context(|| format!("{}: not a privacy ledger", path.display()))?;
        if saved.run_id == run_id && &saved.spec == dp && saved.num_examples == num_examples as u64 {
            return Ok(Some(saved));
        }
        tracing::warn!("{} belongs to another run or data; starting a new privacy ledger", path.display());
    }
    let steps = spec.local.train_config(spec.seed, 1).total_steps(num_examples) as u64;
    let expected_batch = spec.local.batch_size * spec.local.grad_accum;
    let p = ClientPrivacy::plan(run_id, dp, num_examples as u64, expected_batch, steps)
        .context("this run requires DP-SGD")?;
    Ok(Some(p))
}

async fn connect(a: &ConnectArgs) -> Result<Rpc> {
    let (ep, token) = endpoint(a)?;
    let channel = ep.connect().await?;
    Ok(rpc_client(channel, token))
}

fn rpc_client(channel: Channel, token: Option<MetadataValue<tonic::metadata::Ascii>>) -> Rpc {
    CoordinatorClient::with_interceptor(channel, TokenInterceptor(token))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// The endpoint and token from the flags, with no network access: every mistake here (a bad URL, a missing
/// certificate file, http:// with TLS on) is reported at once, never retried.
fn endpoint(a: &ConnectArgs) -> Result<(Endpoint, Option<MetadataValue<tonic::metadata::Ascii>>)> {
    let mut ep = Endpoint::from_shared(a.server.clone())
        .with_context(|| format!("bad --server `{}`", a.server))?
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    if !a.insecure {
        if a.server.starts_with("http://") {
            bail!(
                "--server uses http:// but TLS is on; use https:// (or --insecure against an --insecure coordinator)"
            );
        }
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = &a.ca {
            tls = tls.ca_certificate(Certificate::from_pem(
                std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?,
            ));
        } else {
            tls = tls.with_native_roots();
        }
        if let (Some(c), Some(k)) = (&a.cert, &a.key) {
            let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
            tls = tls.identity(Identity::from_pem(read(c)?, read(k)?));
        }
        if let Some(n) = &a.server_name {
            tls = tls.domain_name(n.clone());
        }
        ep = ep.tls_config(tls)?;
    }
    let token = match &a.token {
        Some(t) => Some(t.parse().map_err(|_| anyhow!("--token must be ASCII"))?),
        None => None,
    };
    Ok((ep, token))
}

/// The first connection: the coordinator may not be up yet (or restarting), so transport failures are retried
/// with backoff for up to `--retry-secs`, each logged.
async fn connect_with_retry(a: &JoinArgs) -> Result<Rpc> {
    let (ep, token) = endpoint(&a.conn)?;
    let start = Instant::now();
    let mut delay = Duration::from_millis(250);
    loop {
        match ep.connect().await {
            Ok(channel) => return Ok(rpc_client(channel, token)),
            Err(e) if start.elapsed() < Duration::from_secs(a.retry_secs) => {
                tracing::warn!("connecting to {}: {e:#} — retrying in {:.1}s", a.conn.server, delay.as_secs_f64());
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            Err(e) => {
                return Err(anyhow::Error::new(e)
                    .context(format!("connecting to {} (gave up after {}s)", a.conn.server, a.retry_secs)));
            }
        }
    }
}

/// Whether an RPC error means "the connection is gone, try again" rather than a refusal.
fn transient(s: &tonic::Status) -> bool {
    matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled)
}

/// Retries `f` on transient errors with exponential backoff until `budget` elapses, reconnecting.
async fn with_retry<T, F, Fut>(a: &JoinArgs, rpc: &mut Rpc, what: &str, mut f: F) -> Result<T>
where
    F: FnMut(Rpc) -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let start = Instant::now();
    let mut delay = Duration::from_millis(250);
    loop {
        match f(rpc.clone()).await {
            Ok(v) => return Ok(v),
            Err(s) if transient(&s) && start.elapsed() < Duration::from_secs(a.retry_secs) => {
                tracing::warn!("{what}: {} — retrying in {:.1}s", s.message(), delay.as_secs_f64());
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
                match connect(&a.conn).await {
                    Ok(c) => *rpc = c,
                    Err(e) => tracing::warn!("reconnecting: {e:#}"),
                }
            }
            Err(s) => bail!("{what}: {} ({:?})", s.message(), s.code()),
        }
    }
}

/// Downloads a blob (resuming at the last offset after a lost connection) and checks its sha256.
async fn fetch_blob(a: &JoinArgs, rpc: &mut Rpc, blob: &pb::BlobRef) -> Result<Vec<u8>> {
    let mut bytes: Vec<u8> = Vec::with_capacity(blob.size as usize);
    let start = Instant::now();
    while (bytes.len() as u64) < blob.size {
        let offset = bytes.len() as u64;
        let req = pb::FetchBlobRequest { sha256: blob.sha256.clone(), offset };
        let mut stream = with_retry(a, rpc, "fetching a blob", |mut c| {
            let req = req.clone();
            async move { c.fetch_blob(req).await.map(|r| r.into_inner()) }
        })
        .await?;
        loop {
            match stream.message().await {
                Ok(Some(chunk)) => {
                    if chunk.offset != bytes.len() as u64 {
                        bail!("blob chunk at offset {} but {} bytes were received", chunk.offset, bytes.len());
                    }
                    bytes.extend_from_slice(&chunk.data);
                    if bytes.len() as u64 > blob.size {
                        bail!("the coordinator sent more than the blob's {} bytes", blob.size);
                    }
                }
                Ok(None) => break,
                Err(s) if transient(&s) && start.elapsed() < Duration::from_secs(a.retry_secs) => {
                    tracing::warn!("download interrupted at {} bytes: {}", bytes.len(), s.message());
                    break;
                }
                Err(s) => bail!("fetching a blob: {}", s.message()),
            }
        }
    }
    let got = sha256_hex(&bytes);
    if got != blob.sha256 {
        bail!("downloaded blob has sha256 {got}, expected {}: refusing to use it", blob.sha256);
    }
    Ok(bytes)
}

/// Runs `fedsb-client join`.
pub fn run(a: JoinArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().worker_threads(2).build()?;
    rt.block_on(session(a))
}

async fn session(a: JoinArgs) -> Result<()> {
    let device = parse_device(&a.device)?;
    let data = Dataset::load_jsonl(&a.data)?;
    let files = model_weight_files(&a.model)?;
    let base_sha = weights_sha256(&files)?;
    let mut rpc = connect_with_retry(&a).await?;
    let join = pb::JoinRequest {
        base_model_sha256: base_sha.clone(),
        num_examples: data.len() as u64,
        client_version: env!("CARGO_PKG_VERSION").into(),
        token: a.conn.token.clone().unwrap_or_default(),
    };
    let reply = with_retry(&a, &mut rpc, "joining", |mut c| {
        let join = join.clone();
        async move { c.join(join).await.map(|r| r.into_inner()) }
    })
    .await?;
    let spec: ClientSpec = serde_json::from_str(&reply.run_spec_json).context("the run spec")?;
    let client_id = reply.client_id.clone();
    eprintln!("[{client_id}] joined run {} ({} examples)", reply.run_id, data.len());
    let init_ref = reply.init_blob.ok_or_else(|| anyhow!("the coordinator sent no init blob"))?;
    let init_bytes = fetch_blob(&a, &mut rpc, &init_ref).await?;
    let opts =
        LoadOptions { num_labels: spec.num_labels, head_seed: spec.seed, tokenizer: None, dtype: a.weights.apply()? };
    let loaded = load_model(&a.model, &device, &opts)?;
    let mut model: Model = loaded.model.clone();
    a.weights.apply_recompute(&mut model)?;
    let init = decode_blob(&init_bytes, &device)?;
    model.attach_adapters(&spec.adapter, Some(&init))?;
    let frozen_sha256 = model.frozen_adapter_tensors()?.content_hash()?;
    eprintln!(
        "[{client_id}] init blob {}… verified; frozen B/A hash {}…",
        &init_ref.sha256[..12],
        &frozen_sha256[..12]
    );
    let enc = Encoder::new(&loaded.tokenizer, model.task(), spec.local.max_len);
    let local = enc.encode_all(&data).context("tokenizing the local data")?;
    let pad = loaded.tokenizer.pad_id();
    std::fs::create_dir_all(&a.work_dir).with_context(|| format!("creating {}", a.work_dir.display()))?;
    let mut summary = ClientSummary {
        client_id: client_id.clone(),
        run_id: reply.run_id.clone(),
        init_sha256: init_ref.sha256.clone(),
        frozen_sha256: frozen_sha256.clone(),
        rounds_trained: vec![],
        status: "running".into(),
        message: String::new(),
        final_global_sha256: None,
        base_folds: Vec::new(),
        privacy: None,
    };
    let mut privacy = load_or_plan_privacy(&a.work_dir, &reply.run_id, &spec, local.len())?;
    let mut noise = match &privacy {
        Some(p) => {
            let (eps_now, _) = p.epsilon()?;
            let rng = noise_rng(&client_id)?;
            eprintln!(
                "[{client_id}] DP-SGD (record-level, this client's {} examples): budget ε = {} at δ = {:e}; C = {}, \
                 Poisson rate q = {:.5}, σ = {:.4} ({}); spent so far ε = {eps_now:.4}; noise: {}",
                local.len(),
                p.spec.target_epsilon,
                p.spec.delta,
                p.spec.max_grad_norm,
                p.sample_rate,
                p.noise_multiplier,
                if p.spec.noise_multiplier.is_some() {
                    "fixed by the run".to_string()
                } else {
                    format!("calibrated for {} rounds", p.spec.rounds)
                },
                if rng.is_secure() { "ChaCha20 seeded by the OS" } else { "SEEDED TEST GENERATOR (insecure)" }
            );
            Some(rng)
        }
        None => None,
    };
    // FedEx-LoRA / FLoRA: the product blobs folded into this client's base weights so far, in round order.
    let mut folded: Vec<String> = Vec::new();
    loop {
        let req = pb::GetTaskRequest { run_id: reply.run_id.clone(), wait_ms: 20_000 };
        let task = with_retry(&a, &mut rpc, "waiting for a task", |mut c| {
            let req = req.clone();
            async move { c.get_task(req).await.map(|r| r.into_inner()) }
        })
        .await?;
        match task.reply {
            Some(pb::get_task_reply::Reply::Wait(w)) => {
                tracing::debug!("waiting: {}", w.reason);
                tokio::time::sleep(Duration::from_millis(w.retry_after_ms.min(5000) as u64)).await;
            }
            Some(pb::get_task_reply::Reply::Task(t)) => {
                let global_ref = t.global.clone().ok_or_else(|| anyhow!("task without a global blob"))?;
                let global = decode_blob(&fetch_blob(&a, &mut rpc, &global_ref).await?, &device)?;
                let current = (global_ref.sha256.as_str(), &global);
                fold_new_products(&a, &mut rpc, &mut model, &spec, &t.base_folds, current, &mut folded).await?;
                if spec.method.restarts_adapters() {
                    // FLoRA's adapters restart from their initial values every round; the global is the head.
                    model.load_trainable(&FLoraAggregator::round_start(&init, &global))?;
                } else {
                    model.load_trainable(&global)?;
                }
                let cfg = spec.local.train_config(spec.seed, t.round);
                let total = cfg.total_steps(local.len());
                if let Some(p) = &privacy
                    && let Err(over) = p.check_round(total as u64)?
                {
                    eprintln!("[{client_id}] round {}: {over}", t.round);
                    let req = pb::LeaveRequest { run_id: reply.run_id.clone(), reason: over.to_string() };
                    if let Err(e) = rpc.leave(req).await {
                        tracing::warn!("telling the coordinator that this client leaves: {}", e.message());
                    }
                    summary.status = "left".into();
                    summary.message = over.to_string();
                    write_summary(&a.work_dir, &summary)?;
                    return Ok(());
                }
                eprintln!("[{client_id}] round {}: training {total} steps on {} examples", t.round, local.len());
                let (m, l, c) = (model.clone(), local.clone(), cfg.clone());
                let label = format!("{client_id} r{}", t.round);
                let dp_cfg = privacy.as_ref().map(|p| p.sgd_config(spec.local.batch_size));
                let mut nz = noise.take();
                let (summary_t, nz): (TrainSummary, Option<NoiseRng>) = tokio::task::spawn_blocking(move || {
                    let mut prog = StepProgress::new(total, &label);
                    let s = match (&dp_cfg, nz.as_mut()) {
                        (Some(dp), Some(rng)) => {
                            train_dp(&m, &l, &c, dp, rng, pad, &mut |r, _| prog.step(r)).map(|s| s.train)
                        }
                        _ => train(&m, &l, &c, pad, &mut |r| prog.step(r)),
                    };
                    prog.finish();
                    s.map(|s| (s, nz))
                })
                .await??;
                noise = nz;
                // Charged before the update leaves: the steps were taken whether or not it is accepted.
                let dp_report = match (&mut privacy, &noise) {
                    (Some(p), Some(rng)) => {
                        p.charge(t.round, summary_t.steps as u64)?;
                        fedsb_common::tensors::write_atomic(
                            &a.work_dir.join("privacy.json"),
                            serde_json::to_string_pretty(p)?.as_bytes(),
                        )?;
                        let r = p.report(rng.is_secure())?;
                        eprintln!(
                            "[{client_id}] round {}: privacy spent ε = {:.4} of {} (δ = {:e}, {} DP-SGD steps)",
                            t.round, r.epsilon, p.spec.target_epsilon, r.delta, r.steps
                        );
                        summary.privacy = Some(r.clone());
                        Some(r)
                    }
                    _ => None,
                };
                let update = model.trainable_tensors()?;
                let blob = encode_blob(&update, spec.wire_dtype)?;
                // Kept for audits: what this client sent in each round.
                let kept = a.work_dir.join("updates").join(format!("round-{}.safetensors", t.round));
                fedsb_common::tensors::write_atomic(&kept, &blob.bytes)?;
                let header = pb::UpdateHeader {
                    run_id: t.run_id.clone(),
                    round: t.round,
                    task_id: t.task_id.clone(),
                    num_examples: local.len() as u64,
                    steps: summary_t.steps as u32,
                    // NaN only when every Poisson batch of the round was empty (DP-SGD on tiny data).
                    train_loss: if summary_t.final_loss.is_finite() { summary_t.final_loss } else { 0.0 },
                    blob: Some(pb::BlobRef { sha256: blob.sha256.clone(), size: blob.bytes.len() as u64 }),
                    frozen_sha256: base_chain_sha256(&frozen_sha256, &folded),
                    dp: dp_report.as_ref().map(dp_report_to_pb),
                };
                let bytes = prost::bytes::Bytes::from(blob.bytes);
                let res = with_retry(&a, &mut rpc, "submitting the update", |mut c| {
                    let mut msgs = vec![pb::UpdateChunk { part: Some(pb::update_chunk::Part::Header(header.clone())) }];
                    for start in (0..bytes.len()).step_by(CHUNK_SIZE) {
                        let chunk = bytes.slice(start..(start + CHUNK_SIZE).min(bytes.len()));
                        msgs.push(pb::UpdateChunk { part: Some(pb::update_chunk::Part::Data(chunk)) });
                    }
                    async move { c.submit_update(tokio_stream::iter(msgs)).await.map(|r| r.into_inner()) }
                })
                .await;
                match res {
                    Ok(r) => eprintln!(
                        "[{client_id}] round {}: update sent ({} bytes, loss {:.4}): {}",
                        t.round,
                        bytes.len(),
                        summary_t.final_loss,
                        r.message
                    ),
                    // A refused update (deadline passed, round closed) is not fatal: wait for the next task.
                    Err(e) => eprintln!("[{client_id}] round {}: update refused: {e:#}", t.round),
                }
                // A round reopened by a restarted coordinator is trained again but counted once.
                if !summary.rounds_trained.contains(&t.round) {
                    summary.rounds_trained.push(t.round);
                }
                if a.max_rounds.is_some_and(|n| summary.rounds_trained.len() as u64 >= n) {
                    summary.status = "left".into();
                    summary.message = format!("left after {} rounds (--max-rounds)", summary.rounds_trained.len());
                    write_summary(&a.work_dir, &summary)?;
                    return Ok(());
                }
            }
            Some(pb::get_task_reply::Reply::Finished(f)) => {
                if let Some(g) = &f.global {
                    let global = decode_blob(&fetch_blob(&a, &mut rpc, g).await?, &device)?;
                    if spec.method.folds_base() {
                        // The last round's product too: the final model is W0 with every fold, plus the global.
                        let current = (g.sha256.as_str(), &global);
                        fold_new_products(&a, &mut rpc, &mut model, &spec, &f.base_folds, current, &mut folded).await?;
                        let delta = base_delta_since(&loaded.model, &model)?;
                        delta.save(&a.work_dir.join("final_base_delta.safetensors"))?;
                        eprintln!(
                            "[{client_id}] {} base folds: W0 + final_base_delta.safetensors + final_adapter.safetensors \
                             is the federated model",
                            folded.len()
                        );
                    }
                    if spec.method.restarts_adapters() {
                        model.load_trainable(&FLoraAggregator::round_start(&init, &global))?;
                    } else {
                        model.load_trainable(&global)?;
                    }
                    model.adapter_tensors()?.save(&a.work_dir.join("final_adapter.safetensors"))?;
                    summary.final_global_sha256 = Some(g.sha256.clone());
                }
                summary.status = f.status.clone();
                summary.message = f.message.clone();
                summary.base_folds = folded.clone();
                write_summary(&a.work_dir, &summary)?;
                eprintln!("[{client_id}] run {}: {}", f.status, f.message);
                if f.status == "completed" {
                    return Ok(());
                }
                bail!("the run failed: {}", f.message);
            }
            None => bail!("the coordinator sent an empty reply"),
        }
    }
}

/// What FedEx-LoRA / FLoRA folded into the base weights: `W0 − W0_original` of every adapted layer that
/// changed, as `{module}.weight`.
fn base_delta_since(original: &Model, model: &Model) -> Result<fedsb_common::TensorSet> {
    let mut out = fedsb_common::TensorSet::new();
    for (o, m) in original.linears().iter().zip(model.linears()) {
        if !o.weight().same_storage(m.weight()) {
            let dev = m.weight().device();
            out.insert(format!("{}.weight", m.name()), (m.weight().to_f32(&dev)? - o.weight().to_f32(&dev)?)?);
        }
    }
    Ok(out)
}

/// FedEx-LoRA / FLoRA: folds into `model`'s base weights every product of `folds` not folded yet (all of them
/// after a restart), checking that the ones already folded are the coordinator's. `current` is the global
/// just downloaded (sha256, tensors), reused when a fold names it.
async fn fold_new_products(
    a: &JoinArgs,
    rpc: &mut Rpc,
    model: &mut Model,
    spec: &ClientSpec,
    folds: &[pb::BaseFold],
    current: (&str, &fedsb_common::TensorSet),
    folded: &mut Vec<String>,
) -> Result<()> {
    let refs = |f: &pb::BaseFold| -> Result<(pb::BlobRef, pb::BlobRef)> {
        match (&f.product, &f.global) {
            (Some(p), Some(g)) => Ok((p.clone(), g.clone())),
            _ => bail!("round {}'s base fold lacks its product or global blob", f.round),
        }
    };
    for (i, sha) in folded.iter().enumerate() {
        match folds.get(i) {
            Some(f) if f.product.as_ref().is_some_and(|p| &p.sha256 == sha) => {}
            _ => bail!("the coordinator's base folds no longer start with the ones this client folded: rejoin"),
        }
    }
    let device = model.device().clone();
    for f in &folds[folded.len()..] {
        let (p, g) = refs(f)?;
        let product = decode_blob(&fetch_blob(a, rpc, &p).await?, &device)?;
        let round_global = match spec.method.folds_residual() {
            true if current.0 == g.sha256 => Some(current.1.clone()),
            true => Some(decode_blob(&fetch_blob(a, rpc, &g).await?, &device)?),
            false => None,
        };
        let deltas = base_deltas(&product, round_global.as_ref(), spec.adapter.scale())
            .with_context(|| format!("round {}'s product blob", f.round))?;
        model.fold_into_base(&deltas).with_context(|| format!("folding round {}'s product", f.round))?;
        tracing::info!("folded round {}'s product {}… into the base weights", f.round, &p.sha256[..12]);
        folded.push(p.sha256);
    }
    Ok(())
}

/// A DP report for the wire.
fn dp_report_to_pb(r: &DpReport) -> pb::DpReport {
    pb::DpReport {
        epsilon: r.epsilon,
        delta: r.delta,
        best_order: r.best_order,
        steps: r.steps,
        noise_multiplier: r.noise_multiplier,
        sample_rate: r.sample_rate,
        max_grad_norm: r.max_grad_norm,
        secure_noise: r.secure_noise,
    }
}

fn write_summary(dir: &Path, s: &ClientSummary) -> Result<()> {
    let p = dir.join("client_summary.json");
    std::fs::write(&p, serde_json::to_string_pretty(s)?).with_context(|| format!("writing {}", p.display()))
}

/// `fedsb-client status`: prints the coordinator's status (run phase, rounds, byte ledger) as JSON.
pub fn status(a: StatusArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        let mut rpc = connect(&a.conn).await.with_context(|| format!("connecting to {}", a.conn.server))?;
        let reply = rpc.get_status(pb::StatusRequest {}).await.context("GetStatus")?.into_inner();
        println!("{}", reply.json);
        Ok(())
    })
}
