//! [`Coordinator`]: one federated run — the round engine, the store, the blobs being served, the byte
//! ledger being filled and the evaluation of each new global model. The gRPC handlers in `service.rs` call
//! it; it never sees tonic types, and the round engine never sees I/O.
//!
//! # Layout
//!
//! - `mod.rs` (here): the [`Coordinator`] type, its state and its locks, the served blobs and base folds.
//! - `setup.rs`: a run from its config — the LoRA-SB (or seeded LoRA) init, the run record, the
//!   start evaluation, the blobs to serve; also a synthetic run for load tests, on any [`RunStore`].
//! - `eval.rs`: the held-out evaluation of a global model.
//! - `events.rs`: the inputs (join, tick, submit, leave, a dead client) and what their engine events lead
//!   to — persisting a closed or failed round, then installing the new global or ending the run.
//! - `traffic.rs`: byte accounting — the open round's ledger entries, wire counters, init downloads.
//! - `report.rs`: what a closed round is reported as (its store record and its metrics line, built together),
//!   the round lines, the privacy summary and the status document.
//!
//! Round closing: the aggregate is encoded as a blob and written durably, evaluated, then the round row and
//! its ledger rows are committed in one transaction, and only then does the engine install the new global
//! (so a crash never leaves a half round; `--resume` continues from the last committed round).
//!
//! # Locks
//!
//! Six `std::sync::Mutex`es, never held across an `.await`. A thread holding one takes only those after it in
//! this order (today only `events` → `engine` nests; the others are held for one call at a time):
//!
//! 1. `events`: held from an engine call that may change the phase until its event is handled (persisted),
//!    so that nobody sees a finished run whose last round is not recorded yet. Held across store writes, so
//!    async code only *tries* it ([`Coordinator::wait_finished`]).
//! 2. `engine`: the round state machine; held for one engine call (an update's aggregation is the longest).
//! 3. `evaluator`: the model that evaluates each new global; held for a whole evaluation, by setup and by the
//!    thread persisting a closed round (one at a time: the engine is `Closing` meanwhile).
//! 4. `store`: the run's durable state ([`RunStore`]); held for one store call.
//! 5. `served`: the blobs being served and the base folds of the committed rounds.
//! 6. `traffic`: the open round's ledger entries and the byte counters of every client's connections.
//!
//! # Blocking
//!
//! Whatever may touch the store blocks: [`Coordinator::tick`], [`join`](Coordinator::join),
//! [`submit`](Coordinator::submit), [`leave`](Coordinator::leave), [`client_died`](Coordinator::client_died),
//! [`record_init_download`](Coordinator::record_init_download), [`ledger`](Coordinator::ledger),
//! [`privacy_summary`](Coordinator::privacy_summary) and [`status_json`](Coordinator::status_json). Async
//! callers run them with `tokio::task::spawn_blocking`. A closed round is persisted (encoded, written,
//! evaluated) on a blocking thread of its own.
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, TryLockError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fedsb_common::TensorSet;
use fedsb_common::aggregate::FLoraAggregator;
use fedsb_common::aggregate::product::base_chain_sha256;
use fedsb_common::spec::ClientSpec;
use serde::Serialize;
use tokio::sync::Notify;

use crate::round::RoundEngine;
use crate::store::RunStore;

mod eval;
mod events;
mod report;
mod setup;
#[cfg(test)]
mod tests;
mod traffic;

pub use eval::describe_eval;
pub use events::tensors_of;
pub use report::{PrivacySummary, RoundMetrics};
pub use traffic::{UploadSize, ledger_row};

use eval::Evaluator;
use traffic::Traffic;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Locks a mutex, recovering the data if a panicking thread poisoned it (state changes are all-or-nothing).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A blob the coordinator serves.
#[derive(Clone, Debug)]
pub struct ServedBlob {
    /// The bytes.
    pub bytes: prost::bytes::Bytes,
    /// Tensor bytes (payload) in it.
    pub payload_bytes: u64,
}

/// One round's fold into the clients' base weights (FedEx-LoRA, FLoRA).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BaseFold {
    /// The round that produced it.
    pub round: u64,
    /// sha256 of the product blob.
    pub product_sha256: String,
    /// sha256 of that round's global blob.
    pub global_sha256: String,
}

/// Settings of the transport around a run.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Plaintext, identities from tokens (tests, trusted networks only).
    pub insecure: bool,
    /// Largest update blob accepted.
    pub max_update_bytes: u64,
    /// Print a line per round to stdout.
    pub print_rounds: bool,
    /// HTTP/2 receive window per stream (bytes): what an upload waiting for an ingest slot may buffer here,
    /// so the coordinator's memory grows by at most this much per concurrently uploading client. Larger
    /// windows help clients on long fat links (bandwidth × round-trip time above it).
    pub h2_window_bytes: u32,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self { insecure: false, max_update_bytes: u64::MAX, print_rounds: false, h2_window_bytes: 256 * 1024 }
    }
}

/// What the coordinator serves besides the run spec: blobs by sha256 (the init, the globals, the products) and
/// the base folds of the committed rounds. One lock, so a round's global, product and fold appear together.
#[derive(Default)]
struct Served {
    /// Blobs by sha256.
    blobs: HashMap<String, ServedBlob>,
    /// FedEx-LoRA, FLoRA: the folds of the committed rounds, in round order.
    folds: Vec<BaseFold>,
}

/// One federated run (see the module docs, which also give the order of its locks).
pub struct Coordinator {
    /// The run's id.
    pub run_id: String,
    /// The spec clients receive at Join, as JSON.
    pub spec_json: String,
    /// The spec.
    pub spec: ClientSpec,
    /// sha256 of the init blob.
    pub init_sha256: String,
    /// sha256 of the frozen tensors (B, A) every update must have been trained with.
    pub frozen_sha256: String,
    /// Transport settings.
    pub opts: ServeOptions,
    /// Woken whenever the phase changes (round opened, closed, run finished).
    pub notify: Notify,
    /// Lock 1: held from an engine transition until its event is handled (persisted), so that nobody sees a
    /// finished run whose last round is not recorded yet.
    events: Mutex<()>,
    /// Lock 2: the round state machine.
    engine: Mutex<RoundEngine>,
    /// Lock 3: the evaluation of each new global (None: the config has no `[eval]`).
    evaluator: Option<Mutex<Evaluator>>,
    /// Lock 4: the durable state.
    store: Mutex<Box<dyn RunStore>>,
    /// Lock 5: the blobs being served and the base folds.
    served: Mutex<Served>,
    /// Lock 6: byte accounting of the open round and of every connection.
    traffic: Mutex<Traffic>,
    /// FLoRA: the adapter tensors its clients restart from every round (the init blob's `lora_A`/`lora_B`).
    restart: TensorSet,
    /// The analytic minimum bytes per client per direction of one round.
    analytic_min_bytes: u64,
    /// Rounds the run is to complete (the round lines say `round i/rounds`).
    rounds: u64,
    /// Where each round's metrics line is appended (None: nowhere, as in tests on the in-memory store).
    metrics_path: Option<PathBuf>,
    /// How the adapter's initialization relates to private data (stated at start, in the status and summary).
    init_privacy: String,
}

impl Coordinator {
    /// The round engine, locked.
    pub fn engine(&self) -> MutexGuard<'_, RoundEngine> {
        lock(&self.engine)
    }

    /// The store, locked.
    pub fn store(&self) -> MutexGuard<'_, Box<dyn RunStore>> {
        lock(&self.store)
    }

    /// A blob being served, by sha256.
    pub fn blob(&self, sha256: &str) -> Option<ServedBlob> {
        lock(&self.served).blobs.get(sha256).cloned()
    }

    /// The base folds of the committed rounds (FedEx-LoRA, FLoRA; empty for the other methods).
    pub fn base_folds(&self) -> Vec<BaseFold> {
        lock(&self.served).folds.clone()
    }

    /// The hash an update for `round` must carry as `frozen_sha256`: the frozen adapter tensors' hash, chained
    /// with the product blobs of the rounds before it ([`base_chain_sha256`]).
    pub fn expected_frozen_sha256(&self, round: u64) -> String {
        let products: Vec<String> =
            lock(&self.served).folds.iter().filter(|f| f.round < round).map(|f| f.product_sha256.clone()).collect();
        base_chain_sha256(&self.frozen_sha256, &products)
    }

    /// The trainable tensors a client starts a round from, given the served global (FLoRA adds the restart
    /// adapter; the other methods serve the whole set).
    fn round_start(&self, global: &TensorSet) -> TensorSet {
        if self.spec.method.restarts_adapters() {
            FLoraAggregator::round_start(&self.restart, global)
        } else {
            global.clone()
        }
    }

    /// The analytic minimum bytes per client per direction of one round.
    pub fn analytic_min_bytes(&self) -> u64 {
        self.analytic_min_bytes
    }

    /// Polls until the run is finished and its end handled (for the `run` command and tests). Never waits on
    /// a lock held across store writes: while an event is being handled, it looks again a few ms later.
    pub async fn wait_finished(&self, poll: Duration) {
        loop {
            // None: an event is being handled (at most a store write or two); look again shortly.
            let finished = match self.events.try_lock() {
                Ok(_events) => Some(self.engine().outcome().is_some()),
                Err(TryLockError::Poisoned(p)) => {
                    let _events = p.into_inner();
                    Some(self.engine().outcome().is_some())
                }
                Err(TryLockError::WouldBlock) => None,
            };
            let Some(finished) = finished else {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            };
            if finished {
                return;
            }
            tokio::select! {
                _ = self.notify.notified() => {}
                _ = tokio::time::sleep(poll) => {}
            }
        }
    }
}
