//! The coordinator's inputs and what their engine events lead to. Each input — a client joining, the ticker,
//! an update, a client leaving or dying — is one engine call made under the `events` lock, followed by
//! [`handle`](Coordinator::handle) of the event it returned, still under that lock:
//!
//! - `Opened`: the round's ledger starts (wire counters from now), pollers are woken.
//! - `Closed`: on a blocking thread of its own, the new global (and product) blob is written, evaluated, the
//!   round record and its ledger rows committed, the blobs served, the metrics line written, and only then is
//!   the new global installed in the engine ([`RoundEngine::commit`](crate::round::RoundEngine::commit)).
//! - `Failed`: the failed attempt and its ledger rows are committed and reported.
//! - an engine error: the run stops as failed.
//!
//! After a phase change a finished run's status is written to the store. Every input here blocks (store
//! writes): async callers use `spawn_blocking`.
use std::collections::BTreeMap;
use std::sync::{Arc, MutexGuard};

use anyhow::Result;
use candle_core::Device;
use fedsb_common::TensorSet;
use fedsb_common::aggregate::product::base_deltas;
use fedsb_common::comm::ledger::{Direction, LedgerEntry};
use fedsb_common::dp::DpReport;
use fedsb_common::wire::{WireDtype, encode_blob};

use super::report::{Attempt, Completed, round_report};
use super::traffic::{UploadSize, ledger_row};
use super::{BaseFold, Coordinator, ServedBlob, lock, now_ms};
use crate::round::{ClosedRound, Event, Reject, UpdateKey, UpdateMeta};
use crate::store::{ClientRecord, LedgerRow};

impl Coordinator {
    /// Advances the engine's clock; call every ~100 ms. Blocks (a failed round is written to the store).
    pub fn tick(self: &Arc<Self>) {
        let _events = self.event_guard();
        let ev = self.engine().tick(now_ms());
        self.handle(ev);
    }

    /// Registers (or refreshes) `client` with its dataset size, in the engine and in the store. Blocks (a
    /// store write; a failure is logged, the client is in the run all the same).
    pub fn join(&self, client: &str, num_examples: u64) {
        let now = now_ms();
        self.engine().join(client, num_examples, now);
        let rec =
            ClientRecord { client_id: client.to_string(), num_examples, joined_unix_ms: now, last_seen_unix_ms: now };
        if let Err(e) = self.store().upsert_client(&self.run_id, &rec) {
            tracing::warn!("could not record client {client}: {e}");
        }
    }

    /// Adds `client`'s update for `key` (its tensors decoded, its DP report checked) to the open round and
    /// counts its bytes; the last update the round waited for closes it. Refused, changing nothing, as the
    /// engine refuses. Blocks (the aggregation; a round that fails is written to the store).
    pub fn submit(
        self: &Arc<Self>,
        client: &str,
        key: UpdateKey<'_>,
        update: &TensorSet,
        meta: UpdateMeta,
        size: UploadSize,
    ) -> Result<(), Reject> {
        let _events = self.event_guard();
        let ev = self.engine().submit(client, key, update, meta, now_ms())?;
        self.record_round_traffic(key.round, client, Direction::Up, size.payload, size.message);
        tracing::info!("round {}: update from {client} accepted ({} bytes)", key.round, size.blob);
        self.handle(Ok(ev));
        Ok(())
    }

    /// `client` leaves the run for good, for `reason` (see [`RoundEngine::leave`](crate::round::RoundEngine::leave)).
    /// Blocks (a round that fails or closes for it is persisted).
    pub fn leave(self: &Arc<Self>, client: &str, reason: &str) -> Result<(), Reject> {
        let events = self.event_guard();
        let ev = self.engine().leave(client, reason, now_ms())?;
        tracing::warn!("client {client} left the run: {reason}");
        self.handle(Ok(ev));
        drop(events);
        self.notify.notify_waiters();
        Ok(())
    }

    /// A client process this coordinator started itself died (a local federation, see `local.rs`): a client
    /// that had joined leaves the run as if it had called `Leave` with `reason` (the others go on when they still
    /// make the quorum, else the run stops saying why); one that never joined stops the run, whose rounds would
    /// otherwise wait for it. Returns false, changing nothing, while a round is being persisted: call again.
    /// Blocks.
    pub fn client_died(self: &Arc<Self>, client: &str, reason: &str) -> bool {
        let _events = self.event_guard();
        let mut engine = self.engine();
        if engine.outcome().is_some() {
            return true;
        }
        if engine.is_closing() {
            return false;
        }
        if engine.clients().contains_key(client) {
            let ev = engine.leave(client, reason, now_ms());
            drop(engine);
            tracing::warn!("{client} left the run: {reason}");
            self.handle(ev);
        } else {
            engine.abort(format!("{client} stopped before joining the run: {reason}"));
            drop(engine);
            tracing::error!("{client} stopped before joining the run: {reason}");
        }
        self.after_phase_change();
        true
    }

    /// Held from an engine call that may change the phase until its event is [handled](Self::handle).
    fn event_guard(&self) -> MutexGuard<'_, ()> {
        lock(&self.events)
    }

    /// Acts on an engine event (see the module docs). Called with the `events` lock held.
    fn handle(self: &Arc<Self>, ev: Result<Option<Event>, Reject>) {
        match ev {
            Ok(None) => {}
            Err(e) => {
                tracing::error!("round engine: {e}");
                self.engine().abort(format!("the round engine failed: {e}"));
                self.finish_run();
            }
            Ok(Some(Event::Opened { round, attempt, sampled })) => {
                self.open_round_ledger(round, &sampled);
                tracing::info!("round {round} opened (attempt {attempt}): sampled {}", sampled.join(", "));
                self.notify.notify_waiters();
            }
            Ok(Some(Event::Closed(c))) => {
                let me = self.clone();
                // Encoding, writing and evaluating take a while: off the async threads.
                tokio::task::spawn_blocking(move || {
                    if let Err(e) = me.persist_closed(*c) {
                        tracing::error!("could not persist the round: {e:#}");
                        me.engine().abort(format!("could not persist the round: {e:#}"));
                    }
                    me.after_phase_change();
                });
            }
            Ok(Some(Event::Failed { round, attempt, sampled, contributed, opened_ms, retry })) => {
                let lost = sampled.iter().filter(|c| !contributed.contains(c)).cloned().collect();
                let ledger = self.take_round_ledger(round, &sampled);
                let closed_ms = now_ms();
                let a = Attempt { round, attempt, sampled, contributed, lost, opened_ms, closed_ms, completed: None };
                self.persist_failed(a, &ledger, retry);
                self.after_phase_change();
            }
        }
    }

    /// Records a failed attempt and its ledger rows, and reports it (failures to record are logged: the run
    /// goes on, or stops, as the engine decided).
    fn persist_failed(&self, a: Attempt, ledger: &[LedgerEntry], retry: bool) {
        let (rec, mut m) = match round_report(a, ledger, self.analytic_min_bytes) {
            Ok(r) => r,
            Err(e) => return tracing::error!("could not record the failed round: {e}"),
        };
        if let Err(e) = self.store().commit_round(&self.run_id, &rec, &rows(ledger)) {
            tracing::error!("could not record the failed round: {e}");
        }
        self.print_failed(&m, retry);
        m.worst_epsilon = self.worst_epsilon();
        self.write_metrics(&m);
    }

    /// Persists a closed round in the order the module docs give, then installs its global.
    fn persist_closed(&self, c: ClosedRound) -> Result<()> {
        let blob = encode_blob(&c.global, WireDtype::F32)?;
        let sha = self.store().put_blob(&blob.bytes)?;
        let product = match &c.product {
            Some(p) => {
                let pb = encode_blob(p, WireDtype::F32)?;
                let psha = self.store().put_blob(&pb.bytes)?;
                Some((psha, pb))
            }
            None => None,
        };
        let eval = match &self.evaluator {
            Some(ev) => {
                let mut ev = lock(ev);
                if let Some(p) = &c.product {
                    let fedex = self.spec.method.folds_residual();
                    let deltas = base_deltas(p, fedex.then_some(&c.global), self.spec.adapter.scale())?;
                    ev.model.fold_into_base(&deltas)?;
                }
                ev.model.load_trainable(&self.round_start(&c.global))?;
                Some(ev.evaluate(&ev.model)?)
            }
            None => None,
        };
        let ledger = self.take_round_ledger(c.round, &c.sampled);
        let mean_train_loss = if c.contributed.is_empty() {
            None
        } else {
            Some(c.contributed.iter().map(|(_, m)| m.train_loss).sum::<f64>() / c.contributed.len() as f64)
        };
        let privacy: BTreeMap<String, DpReport> =
            c.contributed.iter().filter_map(|(n, m)| m.dp.clone().map(|d| (n.clone(), d))).collect();
        let a = Attempt {
            round: c.round,
            attempt: c.attempt,
            sampled: c.sampled,
            contributed: c.contributed.into_iter().map(|(n, _)| n).collect(),
            lost: c.lost,
            opened_ms: c.opened_ms,
            closed_ms: c.closed_ms,
            completed: Some(Completed {
                global_sha256: sha.clone(),
                product_sha256: product.as_ref().map(|(p, _)| p.clone()),
                mean_train_loss,
                eval,
                privacy,
            }),
        };
        let (rec, mut m) = round_report(a, &ledger, self.analytic_min_bytes)?;
        self.store().commit_round(&self.run_id, &rec, &rows(&ledger))?;
        {
            let mut served = lock(&self.served);
            served
                .blobs
                .insert(sha.clone(), ServedBlob { bytes: blob.bytes.into(), payload_bytes: blob.payload_bytes });
            if let Some((psha, pb)) = product {
                served
                    .blobs
                    .insert(psha.clone(), ServedBlob { bytes: pb.bytes.into(), payload_bytes: pb.payload_bytes });
                served.folds.push(BaseFold { round: c.round, product_sha256: psha, global_sha256: sha.clone() });
            }
        }
        m.worst_epsilon = self.worst_epsilon();
        self.write_metrics(&m);
        self.print_round(&m);
        // Only now does the new global become the run's.
        self.engine().commit(c.round, c.global, sha);
        Ok(())
    }

    /// After a phase change: records a finished run's end, wakes pollers.
    fn after_phase_change(&self) {
        if self.engine().outcome().is_some() {
            self.finish_run();
        }
        self.notify.notify_waiters();
    }

    /// Writes the run's outcome to the store (a failure is logged) and wakes pollers.
    fn finish_run(&self) {
        let outcome = self.engine().outcome().cloned();
        if let Some(o) = outcome
            && let Err(e) = self.store().set_run_status(&self.run_id, &o.status, &o.message)
        {
            tracing::error!("could not record the run's end: {e}");
        }
        self.notify.notify_waiters();
    }
}

/// The store's rows for ledger entries.
fn rows(ledger: &[LedgerEntry]) -> Vec<LedgerRow> {
    ledger.iter().map(ledger_row).collect()
}

/// The update blob's tensors as the engine wants them, with validation errors as strings.
pub fn tensors_of(bytes: &[u8]) -> std::result::Result<TensorSet, String> {
    fedsb_common::wire::decode_blob(bytes, &Device::Cpu).map_err(|e| e.to_string())
}
