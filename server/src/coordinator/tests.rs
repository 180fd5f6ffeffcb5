//! Unit tests of the coordinator's event handling, on a synthetic run over the in-memory store: no model, no
//! socket, no file.
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedsb_common::TensorSet;
use fedsb_common::comm::ledger::Transfer;

use super::{Coordinator, ServeOptions, UploadSize};
use crate::config::RunConfig;
use crate::round::{Poll, Reject, TaskInfo, UpdateKey, UpdateMeta};
use crate::store::RunStore;
use crate::store::mem::{MemStore, StoreCall};

/// A state folder no test may create: the in-memory run must not touch the file system.
const NO_STATE_DIR: &str = "/nonexistent/fedsb-coordinator-unit-tests";

const UPLOAD: UploadSize = UploadSize { blob: 200, payload: 160, message: 230 };

/// A synthetic run of `rounds` rounds sampling both of 2 clients (every update needed, a miss stops the run),
/// on a fresh in-memory store, with a handle on that store.
fn run(rounds: u64) -> (Arc<Coordinator>, MemStore) {
    let cfg: RunConfig = toml::from_str(&format!(
        r#"
rounds = {rounds}
clients_per_round = 2
on_quorum_miss = "stop"
max_retries = 0
seed = 7
state_dir = "{NO_STATE_DIR}"
[model]
path = ""
[adapter]
rank = 2
[init]
data = ""
"#
    ))
    .unwrap();
    let store = MemStore::new();
    let c =
        Coordinator::synthetic_in(&cfg, ServeOptions::default(), Box::new(store.clone()), None, 1, &["q"], 2).unwrap();
    (Arc::new(c), store)
}

/// The store writes of setting a run up: the init blob, the run, the starting global `g0_sha`.
fn setup_calls(c: &Coordinator, g0_sha: &str) -> Vec<StoreCall> {
    vec![
        StoreCall::PutBlob(c.init_sha256.clone()),
        StoreCall::CreateRun(c.run_id.clone()),
        StoreCall::PutBlob(g0_sha.to_string()),
    ]
}

fn task(c: &Coordinator, client: &str) -> TaskInfo {
    match c.engine().poll(client, super::now_ms()).unwrap() {
        Poll::Task(t) => t,
        other => panic!("{client}: expected a task, got {other:?}"),
    }
}

fn meta() -> UpdateMeta {
    UpdateMeta { num_examples: 10, steps: 2, train_loss: 0.5, dp: None }
}

/// The current global with every value raised by `by`: a well-formed update that moves the global.
fn update(c: &Coordinator, by: f64) -> TensorSet {
    let mut u = TensorSet::new();
    for (n, t) in c.engine().global().0.iter() {
        u.insert(n.clone(), t.affine(1.0, by).unwrap());
    }
    u
}

fn submit(c: &Arc<Coordinator>, client: &str, t: &TaskInfo, update: &TensorSet) -> Result<(), Reject> {
    let key = UpdateKey { run_id: &c.run_id, round: t.round, task_id: &t.task_id };
    c.submit(client, key, update, meta(), UPLOAD)
}

/// What a refused update must not change: the engine's phase and clients, the store's writes.
fn snapshot(c: &Coordinator, store: &MemStore) -> (String, Vec<String>, Vec<StoreCall>) {
    let e = c.engine();
    (e.phase_summary(), e.clients().keys().cloned().collect(), store.calls())
}

/// Waits (up to 10 s) for the round being persisted on its blocking thread.
async fn wait_for(what: &str, done: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !done() {
        assert!(t0.elapsed() < Duration::from_secs(10), "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_goes_from_join_to_a_new_global_persisted_first() {
    let (c, store) = run(1);
    let (g0, g0_sha) = {
        let e = c.engine();
        (e.global().0.clone(), e.global().1.to_string())
    };
    assert_eq!(store.calls(), setup_calls(&c, &g0_sha));

    c.join("alice", 10);
    c.join("bob", 30);
    assert!(c.engine().phase_summary().starts_with("waiting"), "{}", c.engine().phase_summary());
    c.tick();
    assert!(c.engine().phase_summary().starts_with("round 1 open"), "{}", c.engine().phase_summary());

    // Both clients are sampled; the first update is accepted and the round waits for the second.
    let (ta, tb) = (task(&c, "alice"), task(&c, "bob"));
    assert_eq!((ta.round, ta.global_sha256.as_str()), (1, g0_sha.as_str()));
    submit(&c, "alice", &ta, &update(&c, 1.0)).unwrap();
    assert!(c.engine().phase_summary().contains("1/2 updates"), "{}", c.engine().phase_summary());
    submit(&c, "bob", &tb, &update(&c, 1.0)).unwrap();
    wait_for("the run to finish", || c.engine().outcome().is_some()).await;

    // The global advanced to the aggregate (the mean of two equal updates), under a new hash.
    let (g1, g1_sha, completed) = {
        let e = c.engine();
        (e.global().0.clone(), e.global().1.to_string(), e.completed_rounds())
    };
    assert_eq!(completed, 1);
    assert_ne!(g1_sha, g0_sha);
    for (n, t) in g0.iter() {
        let want: Vec<f32> = t.affine(1.0, 1.0).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let got: Vec<f32> = g1.require(n).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert!(got.iter().zip(&want).all(|(g, w)| (g - w).abs() < 1e-6), "{n}: {got:?} vs {want:?}");
    }
    assert!(c.blob(&g1_sha).is_some(), "the new global is served");
    let outcome = c.engine().outcome().cloned().unwrap();
    assert_eq!((outcome.status.as_str(), outcome.global_sha256.as_str()), ("completed", g1_sha.as_str()));

    // Persisted in order: the blob before the round that names it, the round before the run's end.
    let mut want = setup_calls(&c, &g0_sha);
    want.extend([
        StoreCall::UpsertClient("alice".into()),
        StoreCall::UpsertClient("bob".into()),
        StoreCall::PutBlob(g1_sha.clone()),
        StoreCall::CommitRound { round: 1, attempt: 0, status: "completed".into(), ledger_rows: 2 },
        StoreCall::SetRunStatus("completed".into()),
    ]);
    assert_eq!(store.calls(), want);
    let rounds = store.rounds(&c.run_id).unwrap();
    assert_eq!(rounds.len(), 1);
    assert_eq!(rounds[0].global_sha256.as_deref(), Some(g1_sha.as_str()));
    assert_eq!((rounds[0].contributed.clone(), rounds[0].lost.clone()), (vec!["alice".into(), "bob".into()], vec![]));
    assert_eq!(rounds[0].mean_train_loss, Some(0.5));
    let ledger = store.ledger(&c.run_id).unwrap();
    assert_eq!(ledger.len(), 2);
    for (row, client) in ledger.iter().zip(["alice", "bob"]) {
        assert_eq!((row.client.as_str(), row.direction.as_str(), row.transfer.as_str()), (client, "up", "round"));
        assert_eq!((row.payload_bytes, row.message_bytes, row.wire_bytes), (160, 230, Some(0)));
    }
    assert_eq!(store.run(&c.run_id).unwrap().unwrap().status, "completed");
    assert!(!std::path::Path::new(NO_STATE_DIR).exists(), "an in-memory run writes no file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_or_unknown_update_is_refused_and_changes_nothing() {
    let (c, store) = run(2);
    c.join("alice", 10);
    c.join("bob", 10);
    c.tick();
    let (ta, tb) = (task(&c, "alice"), task(&c, "bob"));
    let u = update(&c, 1.0);
    let before = snapshot(&c, &store);

    assert_eq!(submit(&c, "mallory", &ta, &u), Err(Reject::UnknownClient("mallory".into())));
    let stale = TaskInfo { round: 2, ..ta.clone() };
    assert_eq!(submit(&c, "alice", &stale, &u), Err(Reject::StaleRound { got: 2, current: 1 }));
    assert_eq!(submit(&c, "alice", &tb, &u), Err(Reject::WrongTask(tb.task_id.clone())));
    let key = UpdateKey { run_id: "another-run", round: 1, task_id: &ta.task_id };
    assert_eq!(c.submit("alice", key, &u, meta(), UPLOAD), Err(Reject::UnknownRun("another-run".into())));
    assert_eq!(c.leave("mallory", "bored"), Err(Reject::UnknownClient("mallory".into())));
    assert_eq!(snapshot(&c, &store), before);

    // A duplicate is refused too; the round then closes on the two real updates, whose bytes alone it counts.
    submit(&c, "alice", &ta, &u).unwrap();
    assert_eq!(submit(&c, "alice", &ta, &u), Err(Reject::Duplicate("alice".into())));
    submit(&c, "bob", &tb, &u).unwrap();
    wait_for("round 1 to be committed", || c.engine().completed_rounds() == 1).await;
    let ledger = store.ledger(&c.run_id).unwrap();
    let up: Vec<(&str, u64)> = ledger.iter().map(|r| (r.client.as_str(), r.payload_bytes)).collect();
    assert_eq!(up, vec![("alice", 160), ("bob", 160)]);
    assert!(c.engine().outcome().is_none(), "one round of two done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_that_loses_its_quorum_is_recorded_as_failed_and_ends_the_run() {
    let (c, store) = run(1);
    let g0_sha = c.engine().global().1.to_string();
    c.join("alice", 10);
    c.join("bob", 10);
    c.tick();
    let ta = task(&c, "alice");
    submit(&c, "alice", &ta, &update(&c, 1.0)).unwrap();
    // Bob leaves: the round cannot make its quorum of 2 any more, and a miss stops the run.
    c.leave("bob", "budget spent").unwrap();
    let outcome = c.engine().outcome().cloned().expect("the run stopped");
    assert_eq!(outcome.status, "failed");
    assert!(outcome.message.contains("missed its quorum"), "{}", outcome.message);

    let mut want = setup_calls(&c, &g0_sha);
    want.extend([
        StoreCall::UpsertClient("alice".into()),
        StoreCall::UpsertClient("bob".into()),
        StoreCall::CommitRound { round: 1, attempt: 0, status: "failed".into(), ledger_rows: 1 },
        StoreCall::SetRunStatus("failed".into()),
    ]);
    assert_eq!(store.calls(), want);
    let r = &store.rounds(&c.run_id).unwrap()[0];
    assert_eq!((r.status.as_str(), r.global_sha256.clone()), ("failed", None));
    assert_eq!((r.contributed.clone(), r.lost.clone()), (vec!["alice".to_string()], vec!["bob".to_string()]));
    assert_eq!(c.engine().completed_rounds(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_init_download_is_in_the_ledger_at_once_and_in_the_status() {
    let (c, store) = run(1);
    c.join("alice", 10);
    c.record_init_download("alice", 1000, 1100, Some(1500));
    assert_eq!(store.calls().last(), Some(&StoreCall::AddLedger(1)));
    let ledger = c.ledger().unwrap();
    let e = &ledger.entries()[0];
    assert_eq!((e.round, e.client.as_str(), e.transfer), (0, "alice", Transfer::Init));
    assert_eq!((e.payload_bytes, e.message_bytes, e.wire_bytes, e.analytic_min_bytes), (1000, 1100, Some(1500), 1000));

    let status: serde_json::Value = serde_json::from_str(&c.status_json().unwrap()).unwrap();
    assert_eq!(status["run_id"], c.run_id.as_str());
    assert_eq!(status["completed_rounds"], 0);
    assert_eq!(status["clients"], serde_json::json!(["alice"]));
    assert_eq!(status["ledger"].as_array().unwrap().len(), 1);
    assert_eq!(status["analytic_min_bytes_per_client"], c.analytic_min_bytes());
}
