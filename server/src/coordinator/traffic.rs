//! Byte accounting: every byte a round moves passes the ledger. The open round's entries (task replies,
//! global downloads, updates) add up here per client and direction, and when the round closes they are taken,
//! with each client's wire bytes since the round opened, to be committed with the round. A client's one-time
//! init download is written to the store at once (round 0). [`ledger_row`] is the one mapping from a ledger
//! entry to the store's row, and [`Coordinator::ledger`] the way back.
use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Result;
use fedsb_common::comm::ledger::{ByteLedger, Direction, LedgerEntry, Transfer};

use super::{Coordinator, lock};
use crate::net::Counters;
use crate::store::LedgerRow;

/// The byte accounting of a run (lock 6 of the coordinator): the ledger of the open round, and the byte
/// counters of every client's connections.
#[derive(Default)]
pub(super) struct Traffic {
    /// The round the entries are for.
    round: u64,
    /// The open round's entries, one per client and direction.
    entries: Vec<LedgerEntry>,
    /// Wire bytes (read, written) of each sampled client's connections when the round opened.
    wire_at_open: HashMap<String, (u64, u64)>,
    /// Every connection a client has used, to sum its wire bytes.
    conns: HashMap<String, Vec<Arc<Counters>>>,
}

impl Traffic {
    /// Wire bytes (read, written) of `client`'s connections so far.
    fn wire_totals(&self, client: &str) -> (u64, u64) {
        self.conns.get(client).map_or((0, 0), |v| v.iter().fold((0, 0), |(r, w), c| (r + c.read(), w + c.written())))
    }

    /// Adds traffic of the open round `round` (ignored for any other round).
    fn add(&mut self, round: u64, client: &str, direction: Direction, payload: u64, message: u64, min: u64) {
        if self.round != round {
            return;
        }
        match self.entries.iter_mut().find(|e| e.client == client && e.direction == direction) {
            Some(e) => {
                e.payload_bytes += payload;
                e.message_bytes += message;
            }
            None => self.entries.push(LedgerEntry {
                round,
                client: client.to_string(),
                direction,
                transfer: Transfer::Round,
                payload_bytes: payload,
                message_bytes: message,
                wire_bytes: None,
                analytic_min_bytes: min,
            }),
        }
    }
}

/// The bytes of one accepted update, for the ledger and the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UploadSize {
    /// Size of the update blob.
    pub blob: u64,
    /// Tensor bytes in it.
    pub payload: u64,
    /// Bytes of the messages that carried it (protobuf and gRPC framing).
    pub message: u64,
}

impl Coordinator {
    /// Associates a connection's counters with a client (wire bytes are counted per client).
    pub fn register_connection(&self, client: &str, counters: &Arc<Counters>) {
        let mut t = lock(&self.traffic);
        let v = t.conns.entry(client.to_string()).or_default();
        if !v.iter().any(|c| Arc::ptr_eq(c, counters)) {
            v.push(counters.clone());
        }
    }

    /// Wire bytes (read, written) of `client`'s connections so far.
    pub fn client_wire(&self, client: &str) -> (u64, u64) {
        lock(&self.traffic).wire_totals(client)
    }

    /// Starts the ledger of round `round`, whose sampled clients' wire bytes are counted from now.
    pub(super) fn open_round_ledger(&self, round: u64, sampled: &[String]) {
        let mut t = lock(&self.traffic);
        let wire_at_open = sampled.iter().map(|c| (c.clone(), t.wire_totals(c))).collect();
        t.round = round;
        t.entries = Vec::new();
        t.wire_at_open = wire_at_open;
    }

    /// Records traffic of the open round (task reply and download of the global, upload of an update);
    /// repeated calls for the same client and direction add up.
    pub fn record_round_traffic(&self, round: u64, client: &str, direction: Direction, payload: u64, message: u64) {
        lock(&self.traffic).add(round, client, direction, payload, message, self.analytic_min_bytes);
    }

    /// Records a download of a global blob by a client sampled in the open round.
    pub fn record_global_download(&self, client: &str, sha256: &str, payload: u64, message: u64) {
        let mut t = lock(&self.traffic);
        match t.wire_at_open.contains_key(client).then_some(t.round) {
            Some(r) => t.add(r, client, Direction::Down, payload, message, self.analytic_min_bytes),
            None => tracing::debug!("{client} downloaded {sha256} outside a round it is sampled in"),
        }
    }

    /// Records a client's one-time init download (with the wire bytes its connection carried meanwhile), in
    /// the store at once. Blocks (a store write).
    pub fn record_init_download(&self, client: &str, payload: u64, message: u64, wire: Option<u64>) {
        let entry = LedgerEntry {
            round: 0,
            client: client.to_string(),
            direction: Direction::Down,
            transfer: Transfer::Init,
            payload_bytes: payload,
            message_bytes: message,
            wire_bytes: wire,
            analytic_min_bytes: payload,
        };
        // A round that opened while this client was still downloading the init must not count that download a
        // second time in its wire bytes: the round's baseline for the client moves to now (a client asks for its
        // task only once it has the init).
        {
            let mut t = lock(&self.traffic);
            let now = t.wire_totals(client);
            if let Some(at_open) = t.wire_at_open.get_mut(client) {
                *at_open = (at_open.0.max(now.0), at_open.1.max(now.1));
            }
        }
        if let Err(e) = self.store().add_ledger(&self.run_id, &[ledger_row(&entry)]) {
            tracing::warn!("could not record the init download of {client}: {e}");
        }
    }

    /// Takes the ledger entries of `round` plus wire deltas since it opened, for the clients in `clients`
    /// (none if `round` is not the round being accounted).
    pub(super) fn take_round_ledger(&self, round: u64, clients: &[String]) -> Vec<LedgerEntry> {
        let mut t = lock(&self.traffic);
        if t.round != round {
            return Vec::new();
        }
        let mut entries = std::mem::take(&mut t.entries);
        for c in clients {
            let (r0, w0) = t.wire_at_open.get(c).copied().unwrap_or((0, 0));
            let (r1, w1) = t.wire_totals(c);
            for (dir, bytes) in [(Direction::Up, r1.saturating_sub(r0)), (Direction::Down, w1.saturating_sub(w0))] {
                match entries.iter_mut().find(|e| &e.client == c && e.direction == dir) {
                    Some(e) => e.wire_bytes = Some(bytes),
                    None if bytes > 0 => entries.push(LedgerEntry {
                        round,
                        client: c.clone(),
                        direction: dir,
                        transfer: Transfer::Round,
                        payload_bytes: 0,
                        message_bytes: 0,
                        wire_bytes: Some(bytes),
                        analytic_min_bytes: self.analytic_min_bytes,
                    }),
                    None => {}
                }
            }
        }
        entries
    }

    /// The whole ledger so far (init downloads and committed rounds), from the store. Blocks (a store read).
    pub fn ledger(&self) -> Result<ByteLedger> {
        let rows = self.store().ledger(&self.run_id)?;
        let mut l = ByteLedger::new();
        for r in rows {
            l.record(ledger_entry(r));
        }
        Ok(l)
    }
}

/// The store's row for a ledger entry.
pub fn ledger_row(e: &LedgerEntry) -> LedgerRow {
    LedgerRow {
        round: e.round,
        client: e.client.clone(),
        direction: match e.direction {
            Direction::Up => "up".into(),
            Direction::Down => "down".into(),
        },
        transfer: match e.transfer {
            Transfer::Init => "init".into(),
            Transfer::Round => "round".into(),
        },
        payload_bytes: e.payload_bytes,
        message_bytes: e.message_bytes,
        wire_bytes: e.wire_bytes,
        analytic_min_bytes: e.analytic_min_bytes,
    }
}

/// The ledger entry of a store row (the inverse of [`ledger_row`]).
fn ledger_entry(r: LedgerRow) -> LedgerEntry {
    LedgerEntry {
        round: r.round,
        client: r.client,
        direction: if r.direction == "up" { Direction::Up } else { Direction::Down },
        transfer: if r.transfer == "init" { Transfer::Init } else { Transfer::Round },
        payload_bytes: r.payload_bytes,
        message_bytes: r.message_bytes,
        wire_bytes: r.wire_bytes,
        analytic_min_bytes: r.analytic_min_bytes,
    }
}
