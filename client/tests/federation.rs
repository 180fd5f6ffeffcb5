//! End-to-end federation tests.
//!
//! - Real model, real processes: a coordinator (in this process) and 3 `fedsb-client join` processes over
//!   mutual TLS on loopback, 2 rounds of MiniLM + Rotten Tomatoes; the aggregate equals the independently
//!   computed mean of the submitted R and head, B and A hashes agree on every client, and the ledger's upload
//!   payload equals the analytic minimum.
//! - Protocol: with a tiny random model and hand-driven clients, every bad update is refused with a clear
//!   status and changes nothing; rounds close at their deadline with a quorum and fail cleanly without one;
//!   a coordinator restarted with `--resume` finishes with the same adapter as an uninterrupted run.
//! - Crash: a coordinator process killed with SIGKILL after round 1 and restarted with resume; the real
//!   `fedsb-client join` processes reconnect by themselves and the run ends with the same adapter as an
//!   uninterrupted one.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use fedsb_common::TensorSet;
use fedsb_common::wire::{WireDtype, decode_blob, encode_blob, sha256_hex};
use fedsb_proto::v1 as pb;
use fedsb_proto::v1::coordinator_client::CoordinatorClient;
use fedsb_server::config::{
    AdapterSection, ClientsPerRound, EvalSection, InitSection, ModelSection, QuorumMiss, RunConfig,
};
use fedsb_server::coordinator::{Coordinator, ServeOptions};
use fedsb_server::local::{LocalFederation, Split};
use fedsb_server::store::Store;
use tonic::Code;
use tonic::transport::Channel;

/// The asset folder of scripts/fetch-assets.sh, or `None` (skipped) when missing and not required.
fn assets() -> Option<PathBuf> {
    fedsb_tests::assets().map(|a| a.root)
}

fn base_config(model: &Path, init: &Path, state: &Path, clients: usize, rounds: u64) -> RunConfig {
    RunConfig {
        rounds,
        clients_per_round: ClientsPerRound::Count(clients),
        min_clients: Some(clients),
        quorum: None,
        round_deadline_secs: 600,
        on_quorum_miss: QuorumMiss::Stop,
        max_retries: 0,
        seed: 7,
        method: fedsb_common::Method::FedSb,
        weighting: fedsb_common::aggregate::Weighting::Uniform,
        wire_dtype: WireDtype::F32,
        max_update_bytes: None,
        state_dir: state.to_path_buf(),
        model: ModelSection { path: model.to_path_buf(), sha256: None, num_labels: 2, dtype: "auto".into() },
        adapter: AdapterSection { rank: 4, alpha: None, targets: None },
        local: fedsb_common::spec::LocalTraining { steps: Some(2), batch_size: 8, max_len: 32, ..Default::default() },
        init: InitSection {
            data: init.to_path_buf(),
            samples: Some(8),
            batch_size: 8,
            eta: None,
            power_iters: 4,
            oversample: 4,
            private: false,
            grad_memory_mib: fedsb_common::adapter::init::DEFAULT_GRAD_MEMORY_MIB,
        },
        eval: None,
        dp: None,
    }
}

fn read_set(path: &Path) -> TensorSet {
    decode_blob(&std::fs::read(path).unwrap(), &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &TensorSet, b: &TensorSet) -> f32 {
    assert_eq!(a.names().collect::<Vec<_>>(), b.names().collect::<Vec<_>>());
    a.iter()
        .map(|(n, t)| {
            let u = b.require(n).unwrap();
            (t - u).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
        })
        .fold(0.0, f32::max)
}

fn mean(sets: &[TensorSet]) -> TensorSet {
    let mut out = TensorSet::new();
    for name in sets[0].names() {
        let mut acc = sets[0].require(name).unwrap().to_dtype(DType::F64).unwrap();
        for s in &sets[1..] {
            acc = (acc + s.require(name).unwrap().to_dtype(DType::F64).unwrap()).unwrap();
        }
        out.insert(name.clone(), (acc / sets.len() as f64).unwrap().to_dtype(DType::F32).unwrap());
    }
    out
}

/// Runs a 3-client local federation (IID split, the test-built client binary) in `w` and asserts it completed,
/// showing the clients' logs otherwise.
fn run_three_clients(
    model: PathBuf,
    train: PathBuf,
    eval: PathBuf,
    public_examples: usize,
    config: RunConfig,
    w: &Path,
) {
    let fed = LocalFederation {
        clients: 3,
        model,
        train,
        eval: Some(eval),
        public_examples,
        split: Split::Iid,
        config,
        work_dir: w.to_path_buf(),
        client_exe: PathBuf::from(env!("CARGO_BIN_EXE_fedsb-client")),
        client_output_inherit: false,
        client_args: vec![],
    };
    let cfg = fed.prepare().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let outcome = rt.block_on(fed.run(cfg)).unwrap();
    let logs: String =
        (1..=3).map(|i| std::fs::read_to_string(w.join(format!("client-{i}.log"))).unwrap_or_default()).collect();
    assert_eq!(outcome.status, "completed", "{}\n{logs}", outcome.message);
}

#[test]
fn three_clients_two_rounds_over_mutual_tls() {
    let Some(a) = assets() else { return };
    let work = tempfile::tempdir().unwrap();
    let w = work.path().to_path_buf();
    let model = a.join("models/all-minilm-l6-v2");
    // A small slice of the real data keeps the test short: 64 public examples + 3 × 40 private.
    let train = w.join("train-slice.jsonl");
    let text = std::fs::read_to_string(a.join("data/rotten-tomatoes/train.jsonl")).unwrap();
    std::fs::write(&train, text.lines().take(64 + 120).collect::<Vec<_>>().join("\n")).unwrap();
    let mut cfg = base_config(&model, &w.join("data/public.jsonl"), &w.join("state"), 3, 2);
    cfg.eval = Some(EvalSection::new(a.join("data/rotten-tomatoes/test.jsonl"), Some(32), 32));
    run_three_clients(model, train, a.join("data/rotten-tomatoes/test.jsonl"), 64, cfg, &w);

    let store = Store::open(&w.join("state")).unwrap();
    let run = store.latest_run().unwrap().unwrap();
    let rounds = store.rounds(&run.run_id).unwrap();
    assert_eq!(rounds.len(), 2);
    // Every client checked the same init blob and trained with bit-identical B and A.
    let summaries: Vec<serde_json::Value> = (1..=3)
        .map(|i| {
            serde_json::from_str(&std::fs::read_to_string(w.join(format!("client-{i}/client_summary.json"))).unwrap())
                .unwrap()
        })
        .collect();
    for s in &summaries {
        assert_eq!(s["init_sha256"], run.init_sha256.as_str());
        assert_eq!(s["frozen_sha256"], summaries[0]["frozen_sha256"]);
        assert_eq!(s["status"], "completed");
        assert_eq!(s["rounds_trained"], serde_json::json!([1, 2]));
    }
    for r in &rounds {
        assert_eq!(r.status, "completed");
        assert_eq!(r.contributed.len(), 3);
        // The aggregate equals the mean of what the clients sent, computed here independently.
        let updates: Vec<TensorSet> =
            (1..=3).map(|i| read_set(&w.join(format!("client-{i}/updates/round-{}.safetensors", r.round)))).collect();
        let global = decode_blob(&store.get_blob(r.global_sha256.as_deref().unwrap()).unwrap(), &Device::Cpu).unwrap();
        let d = max_abs_diff(&global, &mean(&updates));
        assert!(d < 1e-6, "round {}: aggregate differs from the mean by {d}", r.round);
        assert!(max_abs_diff(&updates[0], &updates[1]) > 0.0, "clients trained on different data");
        // On the real adapters: B·mean(Rᵢ)·A = mean(B·Rᵢ·A) for every adapted layer.
        let init = decode_blob(&store.get_blob(&run.init_sha256).unwrap(), &Device::Cpu).unwrap();
        let mut layers = 0;
        for name in global.names().filter(|n| n.ends_with(".lora_R.weight")) {
            let module = name.trim_end_matches(".lora_R.weight");
            let b = init.require(&format!("{module}.lora_B.weight")).unwrap();
            let a = init.require(&format!("{module}.lora_A.weight")).unwrap();
            let full = |r: &Tensor| b.matmul(r).unwrap().matmul(a).unwrap();
            let lhs = full(global.require(name).unwrap());
            let parts: Vec<Tensor> = updates.iter().map(|u| full(u.require(name).unwrap())).collect();
            let rhs = (Tensor::stack(&parts, 0).unwrap().sum(0).unwrap() / 3.0).unwrap();
            let scale = rhs.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let diff = (lhs - &rhs).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(scale > 0.0 && diff <= 1e-5 * scale, "{module}: |B·R̄·A − mean(B·Rᵢ·A)| = {diff} (scale {scale})");
            layers += 1;
        }
        assert_eq!(layers, 24, "every adapted layer checked");
        assert!(r.eval_json.as_deref().unwrap().contains("accuracy"));
    }
    // The ledger: Fed-SB's upload payload per client per round is exactly r² values per adapted layer plus the
    // head, in f32; messages and the socket add a little.
    let expected = (24 * 4 * 4 + 2 * 384 + 2) as u64 * 4;
    let ledger = store.ledger(&run.run_id).unwrap();
    let ups: Vec<_> = ledger.iter().filter(|l| l.transfer == "round" && l.direction == "up").collect();
    assert_eq!(ups.len(), 6);
    for l in ups {
        assert_eq!(l.payload_bytes, expected, "{l:?}");
        assert_eq!(l.analytic_min_bytes, expected);
        assert!(l.message_bytes > l.payload_bytes);
        assert!(l.wire_bytes.unwrap() > l.message_bytes, "TLS and HTTP/2 framing are counted on the socket");
    }
    let inits: Vec<_> = ledger.iter().filter(|l| l.transfer == "init").collect();
    assert_eq!(inits.len(), 3, "each client downloaded the init once");
    // The communication planner, from config.json alone, agrees with the ledger byte for byte on payload.
    use fedsb_common::comm::planner::{Method, ModelShape, Plan, PlanSpec};
    let shape = ModelShape::from_file(&a.join("models/all-minilm-l6-v2/config.json")).unwrap();
    let spec = PlanSpec {
        method: Method::FedSb,
        rank: 4,
        targets: shape.default_targets(),
        clients: 3,
        bytes_per_value: 4,
        num_labels: 2,
    };
    let plan = Plan::new(&shape, &spec).unwrap();
    assert_eq!(plan.up_bytes(), expected);
    assert_eq!(plan.down_bytes(), expected);
    for l in &inits {
        assert_eq!(l.payload_bytes, plan.init_bytes(), "init download: B, A and R0");
    }
}

/// Up to `n` GSM8K problems of `file` whose prompt is short enough to leave room for a response in a short
/// `max_len`, as JSONL.
fn short_gsm8k(file: &Path, skip: usize, n: usize) -> String {
    let text = std::fs::read_to_string(file).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["prompt"].as_str().unwrap().len() < 200
        })
        .skip(skip)
        .take(n)
        .collect();
    assert_eq!(lines.len(), n, "not enough short problems in {}", file.display());
    lines.join("\n") + "\n"
}

#[test]
fn smollm2_on_gsm8k_three_clients_report_held_out_loss_and_bytes() {
    let Some(a) = assets() else { return };
    let work = tempfile::tempdir().unwrap();
    let w = work.path().to_path_buf();
    let model = a.join("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    // A small slice of the real data: 4 public problems for the init and 3 × 4 for the clients; 4 held out.
    let train = w.join("train-slice.jsonl");
    std::fs::write(&train, short_gsm8k(&a.join("data/gsm8k/train.jsonl"), 0, 16)).unwrap();
    let eval = w.join("eval-slice.jsonl");
    std::fs::write(&eval, short_gsm8k(&a.join("data/gsm8k/eval.jsonl"), 0, 4)).unwrap();
    let mut cfg = base_config(&model, &w.join("data/public.jsonl"), &w.join("state"), 3, 2);
    // r = 4 on q and v only, 2 local steps of 2 × ≤128 tokens: seconds per round on 2 cores.
    cfg.adapter.targets = Some(vec!["q".into(), "v".into()]);
    cfg.local = fedsb_common::spec::LocalTraining {
        steps: Some(2),
        batch_size: 2,
        max_len: 128,
        lr: 2e-3,
        ..Default::default()
    };
    cfg.init.samples = Some(2);
    cfg.init.batch_size = 2;
    cfg.init.eta = Some(1.2e-4);
    let mut ev = EvalSection::new(eval.clone(), None, 4);
    ev.exact_match = 1;
    ev.max_new_tokens = 8;
    cfg.eval = Some(ev);
    run_three_clients(model, train, eval, 4, cfg, &w);

    // Before round 1: the base model and the starting global (LoRA-SB init), both on the 4 held-out problems.
    let start: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(w.join("state/eval_start.json")).unwrap()).unwrap();
    let start_loss = start["start"]["loss"].as_f64().unwrap();
    let base_loss = start["base"]["loss"].as_f64().unwrap();
    assert!(start_loss.is_finite() && start_loss > 0.0 && base_loss.is_finite() && base_loss > 0.0, "{start}");
    assert_eq!(start["start"]["exact_match"]["total"], 1, "{start}");

    let store = Store::open(&w.join("state")).unwrap();
    let run = store.latest_run().unwrap().unwrap();
    let rounds = store.rounds(&run.run_id).unwrap();
    assert_eq!(rounds.len(), 2);
    // Every round: the held-out response loss of the new global (no accuracy: not a classifier), the exact
    // match of the one decoded problem, the mean local loss, and the aggregate is the mean of the updates.
    let metrics: Vec<serde_json::Value> = std::fs::read_to_string(w.join("state/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(metrics.len(), 2);
    let mut losses = vec![start_loss];
    for (r, m) in rounds.iter().zip(&metrics) {
        assert_eq!(r.status, "completed");
        assert_eq!(r.contributed.len(), 3);
        assert_eq!(m["round"], r.round);
        let e = &m["eval"];
        let loss = e["loss"].as_f64().unwrap_or(f64::NAN);
        assert!(loss.is_finite() && loss > 0.0, "round {}: {e}", r.round);
        assert!(e["count"].as_u64().unwrap() > 4, "response tokens are counted: {e}");
        assert_eq!(e["examples"], 4);
        assert!(e["accuracy"].is_null(), "{e}");
        assert_eq!(e["exact_match"]["total"], 1, "{e}");
        assert!(e["exact_match"]["generated_tokens"].as_u64().unwrap() >= 1, "{e}");
        assert!(m["mean_train_loss"].as_f64().unwrap().is_finite());
        let stored: serde_json::Value = serde_json::from_str(r.eval_json.as_deref().unwrap()).unwrap();
        assert_eq!(stored["loss"], e["loss"]);
        losses.push(loss);
        let updates: Vec<TensorSet> =
            (1..=3).map(|i| read_set(&w.join(format!("client-{i}/updates/round-{}.safetensors", r.round)))).collect();
        let global = decode_blob(&store.get_blob(r.global_sha256.as_deref().unwrap()).unwrap(), &Device::Cpu).unwrap();
        assert_eq!(global.len(), 30 * 2, "an R per adapted layer, no head");
        let d = max_abs_diff(&global, &mean(&updates));
        assert!(d < 1e-6, "round {}: aggregate differs from the mean by {d}", r.round);
    }
    assert!(losses.windows(2).all(|p| p[0] != p[1]), "each round changed the evaluated model: {losses:?}");
    // The ledger: per client and round, r² values per adapted layer up and down (30 layers × q, v; f32).
    let expected = (30 * 2 * 4 * 4) as u64 * 4;
    assert_eq!(metrics[0]["analytic_min_bytes"], expected);
    let ledger = store.ledger(&run.run_id).unwrap();
    for dir in ["up", "down"] {
        let rows: Vec<_> = ledger.iter().filter(|l| l.transfer == "round" && l.direction == dir).collect();
        assert_eq!(rows.len(), 6, "{dir}: 3 clients × 2 rounds");
        for l in rows {
            assert_eq!(l.payload_bytes, expected, "{l:?}");
            assert!(l.message_bytes > l.payload_bytes, "{l:?}");
            assert!(l.wire_bytes.unwrap() > l.message_bytes, "{l:?}");
            // ... but not the init download (~1 MB) that the first round opened during.
            assert!(l.wire_bytes.unwrap() < 2 * l.message_bytes, "{l:?}");
        }
    }
    assert_eq!(ledger.iter().filter(|l| l.transfer == "init").count(), 3, "each client downloaded the init once");
    assert!(std::fs::read_to_string(w.join("ledger.jsonl")).unwrap().lines().count() >= 15);
}

#[test]
fn a_local_federation_refuses_a_dirichlet_split_of_unlabelled_data() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path().to_path_buf();
    let train = w.join("train.jsonl");
    let line = r#"{"prompt": "What is 2 + 2?", "response": "2 + 2 = 4\n#### 4", "answer": "4"}"#;
    std::fs::write(&train, format!("{line}\n").repeat(12)).unwrap();
    let fed = LocalFederation {
        clients: 3,
        model: w.join("unused-model"),
        train: train.clone(),
        eval: None,
        public_examples: 2,
        split: Split::Dirichlet(0.5),
        config: base_config(&w.join("unused-model"), &w.join("data/public.jsonl"), &w.join("state"), 3, 1),
        work_dir: w.clone(),
        client_exe: PathBuf::from(env!("CARGO_BIN_EXE_fedsb-client")),
        client_output_inherit: false,
        client_args: vec![],
    };
    let e = format!("{:#}", fed.prepare().unwrap_err());
    assert!(e.contains("IID") && e.contains("train.jsonl"), "{e}");
}

/// A local federation of the tiny model whose clients all get `client_args`.
fn tiny_local(f: &Fixture, clients: usize, client_args: &[&str], work: &str) -> LocalFederation {
    let work = f.dir.join(work);
    let train = f.dir.join("train.jsonl");
    std::fs::write(&train, fedsb_common::model::testing::tiny_classification_jsonl(40, 2)).unwrap();
    let mut cfg = base_config(&f.model, &work.join("data/public.jsonl"), &work.join("state"), clients, 2);
    // As `fedsb-server local` sets them: every client is needed in every round.
    cfg.quorum = Some(clients);
    cfg.round_deadline_secs = 600;
    LocalFederation {
        clients,
        model: f.model.clone(),
        train,
        eval: None,
        public_examples: 8,
        split: Split::Iid,
        config: cfg,
        work_dir: work,
        client_exe: PathBuf::from(env!("CARGO_BIN_EXE_fedsb-client")),
        client_output_inherit: false,
        client_args: client_args.iter().map(|s| s.to_string()).collect(),
    }
}

#[test]
fn a_local_client_that_dies_ends_the_run_at_once_instead_of_at_the_deadline() {
    let f = fixture();
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Before joining (a device it cannot use), and after joining (a weight format it cannot parse, read once
    // the init is downloaded): the run fails within seconds, not at the 600 s deadline, and says which client
    // and why.
    for (i, (args, says)) in
        [(["--device", "nonsense"], "before joining"), (["--dtype", "nonsense"], "left the run")].iter().enumerate()
    {
        let fed = tiny_local(&f, 2, args, &format!("local-{i}"));
        let cfg = fed.prepare().unwrap();
        let t = std::time::Instant::now();
        let outcome = rt.block_on(fed.run(cfg)).unwrap();
        assert!(t.elapsed() < Duration::from_secs(120), "{:?}", t.elapsed());
        assert_eq!(outcome.status, "failed", "{}", outcome.message);
        let m = &outcome.message;
        // The client's own error, not a backtrace.
        assert!(m.contains("client-") && m.contains("exited with") && m.contains("`nonsense`"), "{args:?}: {m}");
        assert!(!m.contains("backtrace"), "{m}");
        assert!(m.contains(says), "{args:?}: {m}");
    }
}

// ---------------------------------------------------------------------------------------------------------
// Protocol tests on a tiny random model with hand-driven clients (no assets needed).

struct Fixture {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    model: PathBuf,
    init: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().to_path_buf();
    fedsb_common::model::testing::write_tiny_bert(&p.join("model"), 3).unwrap();
    std::fs::write(p.join("public.jsonl"), fedsb_common::model::testing::tiny_classification_jsonl(16, 1)).unwrap();
    Fixture { model: p.join("model"), init: p.join("public.jsonl"), dir: p, _dir: dir }
}

struct Running {
    coord: Arc<Coordinator>,
    addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn start(cfg: &RunConfig, resume: bool) -> Running {
    let opts = ServeOptions { insecure: true, ..Default::default() };
    let cfg = cfg.clone();
    let coord =
        Arc::new(tokio::task::spawn_blocking(move || Coordinator::prepare(&cfg, resume, opts)).await.unwrap().unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let c = coord.clone();
    let server = tokio::spawn(async move {
        fedsb_server::serve_until(c, listener, None, Duration::from_millis(500), async {
            let _ = rx.await;
        })
        .await
    });
    Running { coord, addr, stop: Some(tx), server }
}

#[derive(Clone)]
struct FakeClient {
    rpc: CoordinatorClient<Channel>,
    token: String,
}

impl FakeClient {
    async fn new(addr: std::net::SocketAddr, token: &str) -> Self {
        let ch = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
        Self {
            rpc: CoordinatorClient::new(ch).max_decoding_message_size(8 << 20).max_encoding_message_size(8 << 20),
            token: token.into(),
        }
    }

    fn req<T>(&self, m: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(m);
        r.metadata_mut().insert("x-fedsb-client", self.token.parse().unwrap());
        r
    }

    async fn join(&mut self, base: &str) -> Result<pb::JoinReply, tonic::Status> {
        let m = pb::JoinRequest {
            base_model_sha256: base.into(),
            num_examples: 10,
            client_version: "test".into(),
            token: self.token.clone(),
        };
        let r = self.req(m);
        self.rpc.join(r).await.map(|r| r.into_inner())
    }

    async fn task(&mut self, run: &str) -> Result<pb::get_task_reply::Reply, tonic::Status> {
        let r = self.req(pb::GetTaskRequest { run_id: run.into(), wait_ms: 3000 });
        Ok(self.rpc.get_task(r).await?.into_inner().reply.unwrap())
    }

    async fn fetch(&mut self, b: &pb::BlobRef) -> Vec<u8> {
        let r = self.req(pb::FetchBlobRequest { sha256: b.sha256.clone(), offset: 0 });
        let mut s = self.rpc.fetch_blob(r).await.unwrap().into_inner();
        let mut out = Vec::new();
        while let Some(c) = s.message().await.unwrap() {
            out.extend(c.data);
        }
        out
    }

    async fn submit_raw(&mut self, msgs: Vec<pb::UpdateChunk>) -> Result<pb::SubmitReply, tonic::Status> {
        let mut r = tonic::Request::new(tokio_stream::iter(msgs));
        r.metadata_mut().insert("x-fedsb-client", self.token.parse().unwrap());
        self.rpc.submit_update(r).await.map(|r| r.into_inner())
    }

    async fn submit(
        &mut self,
        t: &pb::Task,
        update: &TensorSet,
        frozen: &str,
    ) -> Result<pb::SubmitReply, tonic::Status> {
        let blob = encode_blob(update, WireDtype::F32).unwrap();
        let h = header(t, &blob.bytes, frozen);
        self.submit_raw(vec![hdr(h), data(blob.bytes)]).await
    }
}

fn header(t: &pb::Task, bytes: &[u8], frozen: &str) -> pb::UpdateHeader {
    pb::UpdateHeader {
        run_id: t.run_id.clone(),
        round: t.round,
        task_id: t.task_id.clone(),
        num_examples: 10,
        steps: 1,
        train_loss: 0.5,
        blob: Some(pb::BlobRef { sha256: sha256_hex(bytes), size: bytes.len() as u64 }),
        frozen_sha256: frozen.into(),
        dp: None,
    }
}

fn hdr(h: pb::UpdateHeader) -> pb::UpdateChunk {
    pb::UpdateChunk { part: Some(pb::update_chunk::Part::Header(h)) }
}

fn data(b: Vec<u8>) -> pb::UpdateChunk {
    pb::UpdateChunk { part: Some(pb::update_chunk::Part::Data(b.into())) }
}

/// A deterministic "trained" update: the global plus `delta` everywhere.
fn shifted(global: &TensorSet, delta: f32) -> TensorSet {
    global.iter().map(|(n, t)| (n.clone(), (t + delta as f64).unwrap())).collect()
}

async fn expect_task(c: &mut FakeClient, run: &str) -> pb::Task {
    for _ in 0..20 {
        match c.task(run).await.unwrap() {
            pb::get_task_reply::Reply::Task(t) => return t,
            pb::get_task_reply::Reply::Wait(_) => continue,
            pb::get_task_reply::Reply::Finished(f) => panic!("run finished: {}", f.message),
        }
    }
    panic!("no task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_updates_are_refused_with_clear_statuses_and_change_nothing() {
    let f = fixture();
    let cfg = base_config(&f.model, &f.init, &f.dir.join("state"), 2, 1);
    let mut run = start(&cfg, false).await;
    let base = run.coord.spec.base_model_sha256.clone();
    let frozen = run.coord.frozen_sha256.clone();
    let mut a = FakeClient::new(run.addr, "alice").await;
    let mut b = FakeClient::new(run.addr, "bob").await;
    let e = a.join(&"0".repeat(64)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("sha256"), "{}", e.message());
    let j = a.join(&base).await.unwrap();
    b.join(&base).await.unwrap();
    let ta = expect_task(&mut a, &j.run_id).await;
    let tb = expect_task(&mut b, &j.run_id).await;
    let global = decode_blob(&a.fetch(ta.global.as_ref().unwrap()).await, &Device::Cpu).unwrap();

    // Unknown client.
    let mut eve = FakeClient::new(run.addr, "eve").await;
    assert_eq!(eve.task(&j.run_id).await.unwrap_err().code(), Code::PermissionDenied);
    assert_eq!(eve.submit(&ta, &shifted(&global, 1.0), &frozen).await.unwrap_err().code(), Code::PermissionDenied);
    // Wrong shape, NaN, missing tensor.
    let mut wrong = global.clone();
    let (name, t) = global.iter().next().map(|(n, t)| (n.clone(), t.clone())).unwrap();
    wrong.insert(name.clone(), Tensor::zeros((t.dims()[0] + 1,), DType::F32, &Device::Cpu).unwrap());
    let e = a.submit(&ta, &wrong, &frozen).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains(&name), "{}", e.message());
    let mut nan = shifted(&global, 1.0);
    let t0 = nan.require(&name).unwrap().clone();
    nan.insert(name.clone(), (t0 * f64::NAN).unwrap());
    assert_eq!(a.submit(&ta, &nan, &frozen).await.unwrap_err().code(), Code::InvalidArgument);
    let mut missing = shifted(&global, 1.0);
    missing.remove(&name);
    assert_eq!(a.submit(&ta, &missing, &frozen).await.unwrap_err().code(), Code::InvalidArgument);
    // Trained with other B/A, a forged task, a stale round, bytes that do not match the hash.
    assert_eq!(
        a.submit(&ta, &shifted(&global, 1.0), &"1".repeat(64)).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    let forged = pb::Task { task_id: tb.task_id.clone(), ..ta.clone() };
    assert_eq!(a.submit(&forged, &shifted(&global, 1.0), &frozen).await.unwrap_err().code(), Code::InvalidArgument);
    let stale = pb::Task { round: 2, ..ta.clone() };
    assert_eq!(a.submit(&stale, &shifted(&global, 1.0), &frozen).await.unwrap_err().code(), Code::FailedPrecondition);
    let blob = encode_blob(&shifted(&global, 1.0), WireDtype::F32).unwrap();
    let mut h = header(&ta, &blob.bytes, &frozen);
    h.blob.as_mut().unwrap().sha256 = "2".repeat(64);
    assert_eq!(a.submit_raw(vec![hdr(h), data(blob.bytes.clone())]).await.unwrap_err().code(), Code::DataLoss);
    // Too large: a declared size over the limit, and a single message over the gRPC limit.
    let mut h = header(&ta, &blob.bytes, &frozen);
    h.blob.as_mut().unwrap().size = 1 << 40;
    assert_eq!(a.submit_raw(vec![hdr(h)]).await.unwrap_err().code(), Code::ResourceExhausted);
    let h = header(&ta, &blob.bytes, &frozen);
    // A single gRPC message over the server's decoding limit: tonic refuses it as OutOfRange ("message too large").
    let e = a.submit_raw(vec![hdr(h), data(vec![0u8; 3 << 20])]).await.unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e}");
    assert!(e.message().contains("too large"), "{e}");
    // None of that counted: a valid update, then a duplicate.
    a.submit(&ta, &shifted(&global, 1.0), &frozen).await.unwrap();
    assert_eq!(a.submit(&ta, &shifted(&global, 5.0), &frozen).await.unwrap_err().code(), Code::AlreadyExists);
    b.submit(&tb, &shifted(&global, 3.0), &frozen).await.unwrap();
    run.coord.wait_finished(Duration::from_millis(100)).await;
    let (g, _) = {
        let e = run.coord.engine();
        let (g, s) = e.global();
        (g.clone(), s.to_string())
    };
    let d = max_abs_diff(&g, &shifted(&global, 2.0));
    assert!(d < 1e-6, "the global is the mean of the two valid updates only (diff {d})");
    // The status endpoint: one completed round, and only the two accepted updates in the ledger's uploads.
    let r = a.req(pb::StatusRequest {});
    let st: serde_json::Value = serde_json::from_str(&a.rpc.get_status(r).await.unwrap().into_inner().json).unwrap();
    assert_eq!(st["completed_rounds"], 1, "{st}");
    assert_eq!(st["outcome"]["status"], "completed", "{st}");
    let ups = st["ledger"].as_array().unwrap().iter().filter(|e| e["direction"] == "up").count();
    assert_eq!(ups, 2, "{st}");
    let _ = run.stop.take().unwrap().send(());
    run.server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rounds_close_at_the_deadline_with_quorum_and_fail_cleanly_without() {
    let f = fixture();
    let mut cfg = base_config(&f.model, &f.init, &f.dir.join("state"), 2, 2);
    cfg.quorum = Some(1);
    cfg.round_deadline_secs = 2;
    let run = start(&cfg, false).await;
    let base = run.coord.spec.base_model_sha256.clone();
    let frozen = run.coord.frozen_sha256.clone();
    let mut a = FakeClient::new(run.addr, "alice").await;
    let mut b = FakeClient::new(run.addr, "bob").await;
    let j = a.join(&base).await.unwrap();
    b.join(&base).await.unwrap();
    // Round 1: alice answers, bob vanishes. The round closes at its deadline with quorum 1.
    let ta = expect_task(&mut a, &j.run_id).await;
    let global = decode_blob(&a.fetch(ta.global.as_ref().unwrap()).await, &Device::Cpu).unwrap();
    a.submit(&ta, &shifted(&global, 1.0), &frozen).await.unwrap();
    drop(b);
    // Round 2: nobody answers; quorum missed, on_quorum_miss = stop: the run fails, it does not hang.
    let finished =
        tokio::time::timeout(Duration::from_secs(30), run.coord.wait_finished(Duration::from_millis(100))).await;
    assert!(finished.is_ok(), "the coordinator hung");
    let o = run.coord.engine().outcome().cloned().unwrap();
    assert_eq!(o.status, "failed");
    assert!(o.message.contains("quorum"), "{}", o.message);
    let rounds = run.coord.store().rounds(&run.coord.run_id).unwrap();
    assert_eq!(rounds[0].status, "completed");
    assert_eq!(rounds[0].lost, vec!["bob".to_string()]);
    assert_eq!(rounds[1].status, "failed");
    match a.task(&j.run_id).await.unwrap() {
        pb::get_task_reply::Reply::Finished(f) => assert_eq!(f.status, "failed"),
        other => panic!("expected the end of the run, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_init_downloaded_while_a_round_is_open_is_not_counted_again_in_its_wire_bytes() {
    let f = fixture();
    let cfg = base_config(&f.model, &f.init, &f.dir.join("state"), 2, 1);
    let run = start(&cfg, false).await;
    let base = run.coord.spec.base_model_sha256.clone();
    let frozen = run.coord.frozen_sha256.clone();
    let mut a = FakeClient::new(run.addr, "alice").await;
    let mut b = FakeClient::new(run.addr, "bob").await;
    let j = a.join(&base).await.unwrap();
    b.join(&base).await.unwrap();
    // The round is open (both have a task) before bob downloads the init; alice got hers before.
    let ta = expect_task(&mut a, &j.run_id).await;
    let tb = expect_task(&mut b, &j.run_id).await;
    let init = b.fetch(j.init_blob.as_ref().unwrap()).await;
    // The coordinator books the download once its last frames have left (50 ms).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let global = decode_blob(&a.fetch(ta.global.as_ref().unwrap()).await, &Device::Cpu).unwrap();
    b.fetch(tb.global.as_ref().unwrap()).await;
    a.submit(&ta, &shifted(&global, 1.0), &frozen).await.unwrap();
    b.submit(&tb, &shifted(&global, 2.0), &frozen).await.unwrap();
    run.coord.wait_finished(Duration::from_millis(100)).await;
    let ledger = run.coord.store().ledger(&run.coord.run_id).unwrap();
    let init_row = ledger.iter().find(|l| l.transfer == "init" && l.client == "bob").unwrap();
    assert!(init_row.wire_bytes.unwrap() >= init.len() as u64, "{init_row:?}");
    let down = |c: &str| {
        ledger.iter().find(|l| l.transfer == "round" && l.direction == "down" && l.client == c).unwrap().clone()
    };
    let (da, db) = (down("alice"), down("bob"));
    assert_eq!(da.payload_bytes, db.payload_bytes);
    // Bob's round traffic is what alice's is (within framing), not that plus the init.
    let (wa, wb) = (da.wire_bytes.unwrap(), db.wire_bytes.unwrap());
    assert!(wb < wa + init.len() as u64 / 2 && 4 * wb > 3 * wa, "alice {wa} B, bob {wb} B, init {} B", init.len());
}

/// Drives `clients` through rounds until the run ends, each submitting global + (round · 0.1 + index).
async fn drive(addr: std::net::SocketAddr, base: &str, frozen: &str, clients: &[&str], stop_after: Option<u64>) {
    let mut cs = Vec::new();
    for c in clients {
        let mut fc = FakeClient::new(addr, c).await;
        fc.join(base).await.unwrap();
        cs.push(fc);
    }
    let run_id = cs[0].join(base).await.unwrap().run_id;
    loop {
        let mut round = 0;
        for (i, c) in cs.iter_mut().enumerate() {
            match c.task(&run_id).await.unwrap() {
                pb::get_task_reply::Reply::Task(t) => {
                    round = t.round;
                    let g = decode_blob(&c.fetch(t.global.as_ref().unwrap()).await, &Device::Cpu).unwrap();
                    c.submit(&t, &shifted(&g, t.round as f32 * 0.1 + i as f32), frozen).await.unwrap();
                }
                pb::get_task_reply::Reply::Wait(_) => {}
                pb::get_task_reply::Reply::Finished(_) => return,
            }
        }
        if stop_after.is_some_and(|s| round >= s) {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_run_ends_with_the_same_adapter_as_an_uninterrupted_one() {
    let f = fixture();
    // Uninterrupted.
    let cfg = base_config(&f.model, &f.init, &f.dir.join("state-a"), 2, 3);
    let run = start(&cfg, false).await;
    let (base, frozen) = (run.coord.spec.base_model_sha256.clone(), run.coord.frozen_sha256.clone());
    drive(run.addr, &base, &frozen, &["alice", "bob"], None).await;
    run.coord.wait_finished(Duration::from_millis(100)).await;
    let want = run.coord.engine().outcome().cloned().unwrap();
    assert_eq!(want.status, "completed");
    // Interrupted after round 1, resumed from the state folder.
    let cfg = base_config(&f.model, &f.init, &f.dir.join("state-b"), 2, 3);
    let mut first = start(&cfg, false).await;
    drive(first.addr, &base, &frozen, &["alice", "bob"], Some(1)).await;
    for _ in 0..100 {
        if first.coord.engine().completed_rounds() >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = first.stop.take().unwrap().send(());
    let Running { server, coord, .. } = first;
    server.await.unwrap().unwrap();
    drop(coord);
    let second = start(&cfg, true).await;
    assert_eq!(second.coord.engine().completed_rounds(), 1);
    drive(second.addr, &base, &frozen, &["alice", "bob"], None).await;
    second.coord.wait_finished(Duration::from_millis(100)).await;
    let got = second.coord.engine().outcome().cloned().unwrap();
    assert_eq!(got.status, "completed");
    assert_eq!(got.global_sha256, want.global_sha256, "same final adapter, bit for bit");
}

// ---------------------------------------------------------------------------------------------------------
// A coordinator process killed with SIGKILL after round 1 and restarted with resume, with real
// `fedsb-client join` processes that reconnect by themselves.

const CHILD_CONFIG_ENV: &str = "FEDSB_TEST_COORDINATOR_CONFIG_JSON";

/// Not a test: the coordinator process of `a_killed_coordinator_resumes_and_real_clients_reconnect`, which
/// runs this test binary again with `--ignored --exact` and the run config in the environment. It serves until
/// the run ends or the process is killed.
#[test]
#[ignore = "helper process of a_killed_coordinator_resumes_and_real_clients_reconnect"]
fn helper_coordinator_process() {
    let Ok(json) = std::env::var(CHILD_CONFIG_ENV) else {
        eprintln!("helper process only: started by a_killed_coordinator_resumes_and_real_clients_reconnect");
        return;
    };
    let cfg: RunConfig = serde_json::from_str(&json).unwrap();
    let resume = std::env::var("FEDSB_TEST_RESUME").is_ok_and(|v| v == "1");
    let addr: std::net::SocketAddr = std::env::var("FEDSB_TEST_ADDR").unwrap().parse().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let opts = ServeOptions { insecure: true, ..Default::default() };
        let coord = Arc::new(Coordinator::prepare(&cfg, resume, opts).unwrap());
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        fedsb_server::serve_until(coord, listener, None, Duration::from_secs(2), std::future::pending()).await.unwrap();
    });
}

fn spawn_coordinator(cfg: &RunConfig, addr: std::net::SocketAddr, resume: bool) -> std::process::Child {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "helper_coordinator_process", "--nocapture", "--test-threads", "1"])
        .env(CHILD_CONFIG_ENV, serde_json::to_string(cfg).unwrap())
        .env("FEDSB_TEST_RESUME", if resume { "1" } else { "0" })
        .env("FEDSB_TEST_ADDR", addr.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// `fedsb-client join` for `name` on `data` against an insecure coordinator at `addr`, logging to `work/NAME.log`.
fn join_command(
    addr: std::net::SocketAddr,
    name: &str,
    f: &Fixture,
    work: &Path,
    data: &Path,
) -> std::process::Command {
    let log = std::fs::File::create(work.join(format!("{name}.log"))).unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_fedsb-client"));
    cmd.args(["join", "--insecure", "--server", &format!("http://{addr}"), "--token", name, "--retry-secs", "60"])
        .arg("--model")
        .arg(&f.model)
        .arg("--data")
        .arg(data)
        .arg("--work-dir")
        .arg(work.join(name))
        .stdout(std::process::Stdio::null())
        .stderr(log);
    cmd
}

fn spawn_client(addr: std::net::SocketAddr, name: &str, f: &Fixture, work: &Path) -> std::process::Child {
    let data = work.join(format!("{name}.jsonl"));
    let seed = name.len() as u64 + name.bytes().map(u64::from).sum::<u64>();
    std::fs::write(&data, fedsb_common::model::testing::tiny_classification_jsonl(48, seed)).unwrap();
    join_command(addr, name, f, work, &data).spawn().unwrap()
}

fn free_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// The final global of the latest run in `state`, once it has ended.
fn final_global(state: &Path) -> (String, String) {
    let store = Store::open(state).unwrap();
    let run = store.latest_run().unwrap().unwrap();
    let last = store.last_completed_round(&run.run_id).unwrap().unwrap();
    (run.status, last.global_sha256.unwrap())
}

fn wait_ok(mut c: std::process::Child, what: &str, work: &Path) {
    let st = c.wait().unwrap();
    let logs: String = ["alice", "bob"]
        .iter()
        .map(|n| std::fs::read_to_string(work.join(format!("{n}.log"))).unwrap_or_default())
        .collect();
    assert!(st.success(), "{what} failed ({st}):\n{logs}");
}

#[test]
fn a_killed_coordinator_resumes_and_real_clients_reconnect() {
    let f = fixture();
    let rounds = 4;
    let config = |state: &str| {
        let mut cfg = base_config(&f.model, &f.init, &f.dir.join(state), 2, rounds);
        cfg.local.steps = Some(30);
        cfg
    };
    // Uninterrupted, with the same seeds.
    let work_a = f.dir.join("procs-a");
    std::fs::create_dir_all(&work_a).unwrap();
    let addr = free_addr();
    let mut coord = spawn_coordinator(&config("state-a"), addr, false);
    let clients: Vec<_> = ["alice", "bob"].iter().map(|n| spawn_client(addr, n, &f, &work_a)).collect();
    for c in clients {
        wait_ok(c, "a client of the uninterrupted run", &work_a);
    }
    let _ = coord.kill();
    let _ = coord.wait();
    let (status, want) = final_global(&f.dir.join("state-a"));
    assert_eq!(status, "completed");

    // Killed (SIGKILL) once round 1 is committed, restarted with resume on the same address.
    let work_b = f.dir.join("procs-b");
    std::fs::create_dir_all(&work_b).unwrap();
    let cfg = config("state-b");
    let addr = free_addr();
    let mut coord = spawn_coordinator(&cfg, addr, false);
    let clients: Vec<_> = ["alice", "bob"].iter().map(|n| spawn_client(addr, n, &f, &work_b)).collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let completed = loop {
        let done = Store::open(&cfg.state_dir)
            .ok()
            .and_then(|s| {
                let run = s.latest_run().ok()??;
                s.last_completed_round(&run.run_id).ok()?
            })
            .map_or(0, |r| r.round);
        if done >= 1 {
            break done;
        }
        assert!(std::time::Instant::now() < deadline, "round 1 never completed");
        std::thread::sleep(Duration::from_millis(5));
    };
    coord.kill().unwrap();
    coord.wait().unwrap();
    assert!(completed < rounds, "the run must still be going when the coordinator dies");
    let mut coord = spawn_coordinator(&cfg, addr, true);
    for c in clients {
        wait_ok(c, "a client that outlived its coordinator", &work_b);
    }
    let _ = coord.kill();
    let _ = coord.wait();
    let (status, got) = final_global(&cfg.state_dir);
    assert_eq!(status, "completed");
    assert_eq!(got, want, "the resumed run ends with the same adapter, bit for bit");
    for n in ["alice", "bob"] {
        let s = client_summary(&work_b, n);
        assert_eq!(s["final_global_sha256"], got.as_str(), "{n} learned the final adapter");
    }
}

#[test]
fn baselines_fedit_and_ffa_lora_federate_real_clients_and_match_the_planner() {
    use fedsb_common::comm::planner::Method;
    let f = fixture();
    let rt = tokio::runtime::Runtime::new().unwrap();
    for (method, planned) in [("fedit", Method::FedIt), ("ffa-lora", Method::FfaLora)] {
        let mut cfg = base_config(&f.model, &f.init, &f.dir.join(format!("state-{method}")), 2, 2);
        cfg.method = method.parse().unwrap();
        let work = f.dir.join(format!("procs-{method}"));
        std::fs::create_dir_all(&work).unwrap();
        let run = rt.block_on(start(&cfg, false));
        let clients: Vec<_> = ["alice", "bob"].iter().map(|n| spawn_client(run.addr, n, &f, &work)).collect();
        for c in clients {
            wait_ok(c, &format!("a {method} client"), &work);
        }
        rt.block_on(run.coord.wait_finished(Duration::from_millis(50)));
        let outcome = run.coord.engine().outcome().cloned().unwrap();
        assert_eq!(outcome.status, "completed", "{method}: {}", outcome.message);
        let global = run.coord.engine().global().0.clone();
        let adapters: Vec<&String> = global.names().filter(|n| n.contains(".lora_")).collect();
        let (a, b) = (adapters.iter().filter(|n| n.ends_with("lora_A.weight")).count(), adapters.len());
        match method {
            "fedit" => assert!(a > 0 && a * 2 == b, "{method} averages A and B"),
            _ => assert!(a == 0 && b > 0, "{method} averages B only"),
        }
        // Every client trained from the same frozen tensors (FFA-LoRA's A; none for FedIT).
        let frozen: Vec<String> = ["alice", "bob"]
            .iter()
            .map(|n| {
                let s = client_summary(&work, n);
                s["frozen_sha256"].as_str().unwrap().to_string()
            })
            .collect();
        assert_eq!(frozen[0], frozen[1]);
        assert_eq!(frozen[0], run.coord.frozen_sha256);
        // The ledger's upload payload is the planner's figure for the method, byte for byte.
        let plan = tiny_plan(&f.model, planned);
        let ledger = run.coord.ledger().unwrap();
        let ups: Vec<_> = ledger
            .entries()
            .iter()
            .filter(|e| {
                e.direction == fedsb_common::comm::Direction::Up && e.transfer == fedsb_common::comm::Transfer::Round
            })
            .collect();
        assert_eq!(ups.len(), 4);
        for e in ups {
            assert_eq!(e.payload_bytes, plan.up_bytes(), "{method}");
        }
        let mut run = run;
        let _ = run.stop.take().unwrap().send(());
        rt.block_on(run.server).unwrap().unwrap();
    }
}

#[test]
fn fedex_lora_and_flora_fold_exactly_with_real_clients_and_match_the_planner() {
    use fedsb_common::aggregate::product::base_deltas;
    use fedsb_common::comm::planner::Method;
    use fedsb_common::comm::{Direction, Transfer};
    let f = fixture();
    let rt = tokio::runtime::Runtime::new().unwrap();
    for (method, planned) in [("fedex-lora", Method::FedExLora), ("flora", Method::FLora)] {
        let state = f.dir.join(format!("state-{method}"));
        let mut cfg = base_config(&f.model, &f.init, &state, 2, 2);
        cfg.method = method.parse().unwrap();
        cfg.local.steps = Some(4);
        // Large enough steps that FedEx-LoRA's residual (second order in the updates) is far above the tolerance.
        cfg.local.lr = 2e-2;
        let work = f.dir.join(format!("procs-{method}"));
        std::fs::create_dir_all(&work).unwrap();
        let run = rt.block_on(start(&cfg, false));
        let clients: Vec<_> = ["alice", "bob"].iter().map(|n| spawn_client(run.addr, n, &f, &work)).collect();
        for c in clients {
            wait_ok(c, &format!("a {method} client"), &work);
        }
        rt.block_on(run.coord.wait_finished(Duration::from_millis(50)));
        let outcome = run.coord.engine().outcome().cloned().unwrap();
        assert_eq!(outcome.status, "completed", "{method}: {}", outcome.message);
        // Both clients' round-2 updates were accepted, so both had folded round 1's product (the coordinator
        // checks the chained hash of the frozen tensors and the folds).
        let folds = run.coord.base_folds();
        assert_eq!(folds.iter().map(|f| f.round).collect::<Vec<_>>(), vec![1, 2]);
        let store = Store::open(&state).unwrap();
        let rounds = store.rounds(&run.coord.run_id).unwrap();
        assert!(rounds.iter().all(|r| r.contributed.len() == 2), "{method}: every update accepted");

        // Exactness on the real traffic of round 2: fold₂ + s·(global adapter) = s·mean(Bᵢ·Aᵢ) of the updates.
        let blob = |sha: &str| decode_blob(&store.get_blob(sha).unwrap(), &Device::Cpu).unwrap();
        let (product, global) = (blob(&folds[1].product_sha256), blob(&folds[1].global_sha256));
        let updates: Vec<TensorSet> =
            ["alice", "bob"].iter().map(|n| read_set(&work.join(n).join("updates/round-2.safetensors"))).collect();
        let scale = run.coord.spec.adapter.scale();
        let fedex = method == "fedex-lora";
        let adapter = if fedex { global.clone() } else { read_set_from_init(&run.coord, &store) };
        if !fedex {
            assert!(global.names().all(|n| !n.contains(".lora_")), "FLoRA serves only the head");
        }
        let deltas = base_deltas(&product, fedex.then_some(&global), scale).unwrap();
        assert!(!deltas.is_empty());
        // The fold is not negligible (else the exactness check below would say little).
        let fold_size = deltas
            .iter()
            .map(|(_, d)| d.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap())
            .fold(0f32, f32::max);
        assert!(fold_size > 1e-3, "{method}: the fold is {fold_size}, too small to test against 1e-5");
        for (module, fold) in &deltas {
            let ba = |s: &TensorSet| {
                s.require(&format!("{module}.lora_B.weight"))
                    .unwrap()
                    .matmul(s.require(&format!("{module}.lora_A.weight")).unwrap())
                    .unwrap()
            };
            let want = ((ba(&updates[0]) + ba(&updates[1])).unwrap() * (scale / 2.0)).unwrap();
            let got = (fold + (ba(&adapter) * scale).unwrap()).unwrap();
            let err = (&got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let size = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(size > 0.0 && err <= 1e-5 * size.max(1.0), "{method} {module}: {err} of {size}");
        }

        // Bytes: uploads are the planner's per round; the round-2 download (global + round 1's product) is the
        // planner's steady-state download, byte for byte.
        let plan = tiny_plan(&f.model, planned);
        let ledger = run.coord.ledger().unwrap();
        let round = |dir: Direction, r: u64| -> Vec<u64> {
            ledger
                .entries()
                .iter()
                .filter(|e| e.direction == dir && e.transfer == Transfer::Round && e.round == r)
                .map(|e| e.payload_bytes)
                .collect()
        };
        for r in [1, 2] {
            assert_eq!(round(Direction::Up, r), vec![plan.up_bytes(); 2], "{method} round {r} up");
        }
        assert_eq!(round(Direction::Down, 2), vec![plan.down_bytes(); 2], "{method} round 2 down");
        let product_bytes = blob(&folds[0].product_sha256).num_values() as u64 * 4;
        assert_eq!(round(Direction::Down, 1), vec![plan.down_bytes() - product_bytes; 2], "{method} round 1 down");

        // At the end every client folded all rounds, the last included, and wrote what it folded.
        let products: Vec<&str> = folds.iter().map(|f| f.product_sha256.as_str()).collect();
        let client_deltas: Vec<TensorSet> = ["alice", "bob"]
            .iter()
            .map(|n| {
                let s = client_summary(&work, n);
                let folded: Vec<&str> =
                    s["base_folds"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
                assert_eq!(folded, products, "{method} {n}");
                TensorSet::load(&work.join(n).join("final_base_delta.safetensors"), &Device::Cpu).unwrap()
            })
            .collect();
        assert_eq!(client_deltas[0].len(), deltas.len(), "{method}: one delta per adapted layer");
        assert!(max_abs_diff(&client_deltas[0], &client_deltas[1]) < 1e-6, "{method}: the same base on both");

        let mut run = run;
        let _ = run.stop.take().unwrap().send(());
        rt.block_on(run.server).unwrap().unwrap();
    }
}

/// The planner's figures for the tiny model of the fixture: rank 4, 2 clients, f32, 2 labels.
fn tiny_plan(model: &Path, method: fedsb_common::comm::planner::Method) -> fedsb_common::comm::planner::Plan {
    use fedsb_common::comm::planner::{ModelShape, Plan, PlanSpec};
    let shape = ModelShape::from_file(model).unwrap();
    let spec =
        PlanSpec { method, rank: 4, targets: shape.default_targets(), clients: 2, bytes_per_value: 4, num_labels: 2 };
    Plan::new(&shape, &spec).unwrap()
}

/// A client's `client_summary.json` in its work folder under `work`.
fn client_summary(work: &Path, name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(work.join(name).join("client_summary.json")).unwrap()).unwrap()
}

/// The run's init adapter (FLoRA's clients restart from it every round).
fn read_set_from_init(coord: &Coordinator, store: &Store) -> TensorSet {
    decode_blob(&store.get_blob(&coord.init_sha256).unwrap(), &Device::Cpu).unwrap()
}

// ---------------------------------------------------------------------------------------------------------
// Differential privacy: DP-SGD required by the run spec.

fn dp_spec(target_epsilon: f64, delta: f64, sigma: f64) -> fedsb_common::dp::DpSpec {
    fedsb_common::dp::DpSpec {
        max_grad_norm: 1.0,
        target_epsilon,
        delta,
        noise_multiplier: Some(sigma),
        rounds: 0,
        allow_insecure_noise: true,
    }
}

fn dp_report(q: f64, sigma: f64, steps: u64, delta: f64) -> pb::DpReport {
    let (epsilon, best_order) = fedsb_common::dp::accountant::epsilon_for(q, sigma, steps, delta).unwrap();
    pb::DpReport {
        epsilon,
        delta,
        best_order,
        steps,
        noise_multiplier: sigma,
        sample_rate: q,
        max_grad_norm: 1.0,
        secure_noise: true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_dp_required_updates_without_a_matching_report_are_refused() {
    let f = fixture();
    // 10 examples per fake client, batch 8: q = 0.8; σ = 1 and 2 local steps spend ε ≈ 4.85 at δ = 1e-3.
    let mut cfg = base_config(&f.model, &f.init, &f.dir.join("state"), 1, 1);
    cfg.dp = Some(dp_spec(5.0, 0.2, 1.0));
    let mut run = start(&cfg, false).await;
    let base = run.coord.spec.base_model_sha256.clone();
    let mut a = FakeClient::new(run.addr, "alice").await;
    let e = a.join(&base).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("1/N") && e.message().contains("requires DP-SGD"), "{}", e.message());
    let _ = run.stop.take().unwrap().send(());
    run.server.await.unwrap().unwrap();

    let mut cfg = base_config(&f.model, &f.init, &f.dir.join("state2"), 1, 1);
    cfg.dp = Some(dp_spec(5.0, 1e-3, 1.0));
    let mut run = start(&cfg, false).await;
    let frozen = run.coord.frozen_sha256.clone();
    let mut a = FakeClient::new(run.addr, "alice").await;
    let j = a.join(&base).await.unwrap();
    let spec: fedsb_common::spec::ClientSpec = serde_json::from_str(&j.run_spec_json).unwrap();
    assert_eq!(spec.dp.as_ref().map(|d| d.rounds), Some(1), "the budget's horizon is sent to clients");
    let t = expect_task(&mut a, &j.run_id).await;
    let global = decode_blob(&a.fetch(t.global.as_ref().unwrap()).await, &Device::Cpu).unwrap();
    let blob = encode_blob(&shifted(&global, 1.0), WireDtype::F32).unwrap();
    let submit = |dp: Option<pb::DpReport>| {
        let mut h = header(&t, &blob.bytes, &frozen);
        h.dp = dp;
        vec![hdr(h), data(blob.bytes.clone())]
    };
    let refused = |e: tonic::Status, needle: &str| {
        assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
        assert!(e.message().contains(needle), "expected `{needle}` in: {}", e.message());
    };
    refused(a.submit_raw(submit(None)).await.unwrap_err(), "no DP report");
    let good = dp_report(0.8, 1.0, 2, 1e-3);
    refused(a.submit_raw(submit(Some(pb::DpReport { epsilon: 0.5, ..good }))).await.unwrap_err(), "gives ε");
    refused(a.submit_raw(submit(Some(pb::DpReport { max_grad_norm: 5.0, ..good }))).await.unwrap_err(), "clipping");
    refused(a.submit_raw(submit(Some(pb::DpReport { noise_multiplier: 0.5, ..good }))).await.unwrap_err(), "σ");
    refused(a.submit_raw(submit(Some(dp_report(0.8, 1.0, 4, 1e-3)))).await.unwrap_err(), "budget");
    // The matching report is accepted and recorded: status, metrics and the store show it.
    a.submit_raw(submit(Some(good))).await.unwrap();
    run.coord.wait_finished(Duration::from_millis(100)).await;
    let st: serde_json::Value = serde_json::from_str(&run.coord.status_json().unwrap()).unwrap();
    let eps = st["privacy"]["clients"]["alice"]["epsilon"].as_f64().unwrap();
    assert!((eps - good.epsilon).abs() < 1e-12, "{st}");
    assert_eq!(st["privacy"]["worst_epsilon"].as_f64(), Some(eps));
    assert!(st["privacy"]["init"].as_str().unwrap().contains("public/proxy data"), "{st}");
    let metrics = std::fs::read_to_string(f.dir.join("state2/metrics.jsonl")).unwrap();
    assert!(metrics.contains("\"worst_epsilon\""), "{metrics}");
    let _ = run.stop.take().unwrap().send(());
    run.server.await.unwrap().unwrap();
}

fn spawn_dp_client(addr: std::net::SocketAddr, name: &str, f: &Fixture, work: &Path, n: usize) -> std::process::Child {
    let data = work.join(format!("{name}.jsonl"));
    std::fs::write(&data, fedsb_common::model::testing::tiny_classification_jsonl(n, name.len() as u64)).unwrap();
    join_command(addr, name, f, work, &data)
        // Seeded noise (test mode, which the run's spec allows) keeps the test repeatable.
        .env("FEDSB_DP_INSECURE_TEST_SEED", "11")
        .spawn()
        .unwrap()
}

#[test]
fn real_dp_clients_account_every_round_and_one_over_budget_leaves_while_the_run_goes_on() {
    let f = fixture();
    let work = f.dir.join("dp");
    std::fs::create_dir_all(&work).unwrap();
    // σ = 1 fixed, 2 local steps of expected batch 8 per round, δ = 1e-3. Alice has 24 examples (q = 1/3):
    // ε = 2.94 after round 1, 3.93 after round 2 > the budget 3.5, so she leaves before training round 2.
    // Bob has 120 (q = 1/15): ε = 1.32 after all 3 rounds. Quorum 1: the run goes on with Bob.
    let mut cfg = base_config(&f.model, &f.init, &work.join("state"), 2, 3);
    cfg.quorum = Some(1);
    cfg.dp = Some(dp_spec(3.5, 1e-3, 1.0));
    let addr = free_addr();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (outcome, status) = rt.block_on(async {
        let opts = ServeOptions { insecure: true, ..Default::default() };
        let c = cfg.clone();
        let coord = Arc::new(
            tokio::task::spawn_blocking(move || Coordinator::prepare(&c, false, opts)).await.unwrap().unwrap(),
        );
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let c = coord.clone();
        let server = tokio::spawn(async move { fedsb_server::serve(c, listener, None, Duration::from_secs(2)).await });
        let alice = spawn_dp_client(addr, "alice", &f, &work, 24);
        let bob = spawn_dp_client(addr, "bob", &f, &work, 120);
        server.await.unwrap().unwrap();
        for (mut ch, name) in [(alice, "alice"), (bob, "bob")] {
            let st = tokio::task::spawn_blocking(move || ch.wait()).await.unwrap().unwrap();
            let log = std::fs::read_to_string(work.join(format!("{name}.log"))).unwrap_or_default();
            assert!(st.success(), "{name} exited with {st}:\n{log}");
        }
        let outcome = coord.engine().outcome().cloned().unwrap();
        (outcome, coord.status_json().unwrap())
    });
    let logs = ["alice", "bob"].map(|n| std::fs::read_to_string(work.join(format!("{n}.log"))).unwrap_or_default());
    assert_eq!(outcome.status, "completed", "{}\n{}\n{}", outcome.message, logs[0], logs[1]);
    // Alice stopped with a clear message, after one round.
    let alice = client_summary(&work, "alice");
    assert_eq!(alice["status"], "left", "{alice}");
    assert!(alice["message"].as_str().unwrap().contains("privacy budget"), "{alice}");
    assert_eq!(alice["rounds_trained"], serde_json::json!([1]));
    assert!(logs[0].contains("stops taking tasks"), "{}", logs[0]);
    // Bob trained all three rounds; his ledger charged every step, at q = 8/120.
    let bob = client_summary(&work, "bob");
    assert_eq!(bob["rounds_trained"], serde_json::json!([1, 2, 3]), "{bob}");
    let ledger: fedsb_common::dp::report::ClientPrivacy =
        serde_json::from_str(&std::fs::read_to_string(work.join("bob/privacy.json")).unwrap()).unwrap();
    assert_eq!((ledger.accountant.steps(), ledger.rounds.clone()), (6, vec![1, 2, 3]));
    let (expected, _) = fedsb_common::dp::accountant::epsilon_for(8.0 / 120.0, 1.0, 6, 1e-3).unwrap();
    // The coordinator recorded each client's latest report, the worst ε, and Alice's departure.
    let st: serde_json::Value = serde_json::from_str(&status).unwrap();
    let p = &st["privacy"];
    assert!((p["clients"]["bob"]["epsilon"].as_f64().unwrap() - expected).abs() < 1e-9, "{p}");
    assert_eq!(p["clients"]["bob"]["steps"], 6);
    assert_eq!(p["clients"]["alice"]["steps"], 2);
    let worst = p["worst_epsilon"].as_f64().unwrap();
    assert!(worst > 2.9 && worst <= 3.5, "alice's 2.94 is the worst: {p}");
    assert!(p["left"]["alice"].as_str().unwrap().contains("privacy budget"), "{p}");
    let store = Store::open(&work.join("state")).unwrap();
    let run = store.latest_run().unwrap().unwrap();
    let rounds = store.rounds(&run.run_id).unwrap();
    assert_eq!(rounds.iter().map(|r| r.contributed.len()).collect::<Vec<_>>(), [2, 1, 1]);
    assert!(rounds.iter().all(|r| r.privacy_json.is_some()));
}
