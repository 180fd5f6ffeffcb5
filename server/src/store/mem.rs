//! [`MemStore`]: the in-memory twin of [`Store`](super::Store), like raft-rs's `MemStorage`. It keeps the
//! same records with the same rules ([`RunStore`]'s failure semantics, the same checks before a round commit,
//! the same orderings) and logs every write as a [`StoreCall`], so tests of the coordinator can check what
//! was persisted, and in which order, without touching a file.
//!
//! Always compiled, not only under `cfg(test)`: a `cfg(test)` item is invisible to integration tests and to
//! the other crates of the workspace (the client's federation tests, benchmarks), and compiling it in every
//! build keeps it in step with the trait. It is small and has no dependency of its own; nothing in the
//! server's binaries constructs it.
//!
//! Where it differs from [`Store`](super::Store), by design: nothing survives the process; a duplicate run id
//! or round attempt, and a write for an unknown run, are refused as [`StoreError::Invalid`] /
//! [`StoreError::NotFound`] rather than as SQLite constraint errors.
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use fedsb_common::wire::{is_sha256_hex, sha256_hex};

use super::{
    ClientRecord, LedgerRow, RoundRecord, RunRecord, RunStore, StoreError, check_commit, check_ledger_row, check_one_of,
};

/// One write made to a [`MemStore`], in the order it was made (reads are not logged).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreCall {
    /// [`RunStore::put_blob`], with the blob's sha256.
    PutBlob(String),
    /// [`RunStore::create_run`], with the run id.
    CreateRun(String),
    /// [`RunStore::set_run_status`], with the status.
    SetRunStatus(String),
    /// [`RunStore::upsert_client`], with the client id.
    UpsertClient(String),
    /// [`RunStore::commit_round`]: round, attempt, status and the number of ledger rows.
    CommitRound {
        /// Round number.
        round: u64,
        /// Attempt.
        attempt: u32,
        /// `"completed"` or `"failed"`.
        status: String,
        /// Ledger rows committed with it.
        ledger_rows: usize,
    },
    /// [`RunStore::add_ledger`], with the number of rows.
    AddLedger(usize),
}

/// What a [`MemStore`] holds.
#[derive(Default)]
struct State {
    /// Blobs by sha256.
    blobs: HashMap<String, Vec<u8>>,
    /// In creation order.
    runs: Vec<RunRecord>,
    /// `(run_id, client)`, in first-join order.
    clients: Vec<(String, ClientRecord)>,
    /// `(run_id, record)`, in commit order.
    rounds: Vec<(String, RoundRecord)>,
    /// `(run_id, row)`, in insertion order.
    ledger: Vec<(String, LedgerRow)>,
    /// Every write, in order.
    calls: Vec<StoreCall>,
}

impl State {
    /// NotFound unless `run_id` was created.
    fn require_run(&self, run_id: &str) -> Result<(), StoreError> {
        match self.runs.iter().any(|r| r.run_id == run_id) {
            true => Ok(()),
            false => Err(StoreError::NotFound(format!("run {run_id:?}"))),
        }
    }
}

/// The in-memory twin of [`Store`](super::Store) (see the module docs). A cheap-clone handle: a test keeps a
/// clone to inspect what the coordinator wrote through the other.
#[derive(Clone, Default)]
pub struct MemStore {
    /// Shared by every clone.
    state: Arc<Mutex<State>>,
}

impl MemStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every write made so far, in order.
    pub fn calls(&self) -> Vec<StoreCall> {
        self.state().calls.clone()
    }

    /// The state, locked (a poisoned lock is recovered: each write is all-or-nothing).
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// SQLite's integers are signed 64-bit: the SQLite store refuses a larger `u64`, and so does its twin.
fn check_ledger_values(rows: &[LedgerRow]) -> Result<(), StoreError> {
    for r in rows {
        let values = [Some(r.round), Some(r.payload_bytes), Some(r.message_bytes), r.wire_bytes];
        if values.into_iter().flatten().chain([r.analytic_min_bytes]).any(|v| v > i64::MAX as u64) {
            return Err(StoreError::Invalid(format!("ledger row of {} holds a value beyond i64::MAX", r.client)));
        }
    }
    Ok(())
}

impl RunStore for MemStore {
    fn put_blob(&self, bytes: &[u8]) -> Result<String, StoreError> {
        let hash = sha256_hex(bytes);
        let mut s = self.state();
        s.blobs.entry(hash.clone()).or_insert_with(|| bytes.to_vec());
        s.calls.push(StoreCall::PutBlob(hash.clone()));
        Ok(hash)
    }

    fn get_blob(&self, sha256: &str) -> Result<Vec<u8>, StoreError> {
        if !is_sha256_hex(sha256) {
            return Err(StoreError::BadHash(sha256.to_string()));
        }
        self.state().blobs.get(sha256).cloned().ok_or_else(|| StoreError::NotFound(format!("blob {sha256}")))
    }

    fn create_run(&self, run: &RunRecord) -> Result<(), StoreError> {
        check_one_of("run status", &run.status, &["running", "completed", "failed"])?;
        let mut s = self.state();
        if s.runs.iter().any(|r| r.run_id == run.run_id) {
            return Err(StoreError::Invalid(format!("run {:?} exists already", run.run_id)));
        }
        s.runs.push(run.clone());
        s.calls.push(StoreCall::CreateRun(run.run_id.clone()));
        Ok(())
    }

    fn run(&self, run_id: &str) -> Result<Option<RunRecord>, StoreError> {
        Ok(self.state().runs.iter().find(|r| r.run_id == run_id).cloned())
    }

    fn latest_run(&self) -> Result<Option<RunRecord>, StoreError> {
        // The newest creation time; among equal times, the last created (the SQLite store's rowid order).
        Ok(self.state().runs.iter().max_by_key(|r| r.created_unix_ms).cloned())
    }

    fn set_run_status(&self, run_id: &str, status: &str, message: &str) -> Result<(), StoreError> {
        check_one_of("run status", status, &["running", "completed", "failed"])?;
        let mut s = self.state();
        let run = s
            .runs
            .iter_mut()
            .find(|r| r.run_id == run_id)
            .ok_or_else(|| StoreError::NotFound(format!("run {run_id:?}")))?;
        run.status = status.to_string();
        run.message = message.to_string();
        s.calls.push(StoreCall::SetRunStatus(status.to_string()));
        Ok(())
    }

    fn upsert_client(&self, run_id: &str, c: &ClientRecord) -> Result<(), StoreError> {
        let mut s = self.state();
        s.require_run(run_id)?;
        match s.clients.iter_mut().find(|(r, old)| r == run_id && old.client_id == c.client_id) {
            Some((_, old)) => {
                old.num_examples = c.num_examples;
                old.last_seen_unix_ms = c.last_seen_unix_ms;
            }
            None => s.clients.push((run_id.to_string(), c.clone())),
        }
        s.calls.push(StoreCall::UpsertClient(c.client_id.clone()));
        Ok(())
    }

    fn clients(&self, run_id: &str) -> Result<Vec<ClientRecord>, StoreError> {
        let mut v: Vec<ClientRecord> =
            self.state().clients.iter().filter(|(r, _)| r == run_id).map(|(_, c)| c.clone()).collect();
        v.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        Ok(v)
    }

    fn commit_round(&self, run_id: &str, r: &RoundRecord, ledger: &[LedgerRow]) -> Result<(), StoreError> {
        let mut s = self.state();
        check_commit(r, ledger, |hash| {
            if !is_sha256_hex(hash) {
                return Err(StoreError::BadHash(hash.to_string()));
            }
            Ok(if s.blobs.contains_key(hash) { Ok(()) } else { Err(hash.to_string()) })
        })?;
        check_ledger_values(ledger)?;
        s.require_run(run_id)?;
        if s.rounds.iter().any(|(id, old)| id == run_id && old.round == r.round && old.attempt == r.attempt) {
            return Err(StoreError::Invalid(format!("round {} attempt {} is committed already", r.round, r.attempt)));
        }
        s.rounds.push((run_id.to_string(), r.clone()));
        s.ledger.extend(ledger.iter().map(|row| (run_id.to_string(), row.clone())));
        s.calls.push(StoreCall::CommitRound {
            round: r.round,
            attempt: r.attempt,
            status: r.status.clone(),
            ledger_rows: ledger.len(),
        });
        Ok(())
    }

    fn add_ledger(&self, run_id: &str, rows: &[LedgerRow]) -> Result<(), StoreError> {
        for row in rows {
            check_ledger_row(row)?;
        }
        check_ledger_values(rows)?;
        let mut s = self.state();
        s.require_run(run_id)?;
        s.ledger.extend(rows.iter().map(|row| (run_id.to_string(), row.clone())));
        s.calls.push(StoreCall::AddLedger(rows.len()));
        Ok(())
    }

    fn rounds(&self, run_id: &str) -> Result<Vec<RoundRecord>, StoreError> {
        let mut v: Vec<RoundRecord> =
            self.state().rounds.iter().filter(|(id, _)| id == run_id).map(|(_, r)| r.clone()).collect();
        v.sort_by_key(|r| (r.round, r.attempt));
        Ok(v)
    }

    fn last_completed_round(&self, run_id: &str) -> Result<Option<RoundRecord>, StoreError> {
        Ok(self.rounds(run_id)?.into_iter().rev().find(|r| r.status == "completed"))
    }

    fn ledger(&self, run_id: &str) -> Result<Vec<LedgerRow>, StoreError> {
        let mut v: Vec<LedgerRow> =
            self.state().ledger.iter().filter(|(id, _)| id == run_id).map(|(_, r)| r.clone()).collect();
        // Stable: equal keys keep their insertion order, like the SQLite store's `id` tie-break.
        v.sort_by(|a, b| {
            (a.round, &a.client, &a.direction, &a.transfer).cmp(&(b.round, &b.client, &b.direction, &b.transfer))
        });
        Ok(v)
    }
}
