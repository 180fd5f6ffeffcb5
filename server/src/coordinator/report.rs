//! What the coordinator reports about a run: each closed round attempt as a store record and a metrics line
//! (built together by [`round_report`], so the two never disagree), the round lines printed or logged, the
//! privacy summary and the status document served by `GetStatus`.
use std::collections::BTreeMap;

use anyhow::{Context, Result};
use fedsb_common::comm::human_bytes;
use fedsb_common::comm::ledger::{Direction, LedgerEntry};
use fedsb_common::dp::DpReport;
use fedsb_common::train::eval::EvalReport;
use serde::Serialize;

use super::{Coordinator, describe_eval};
use crate::store::RoundRecord;

/// One line of `metrics.jsonl` and of the coordinator's round log.
#[derive(Clone, Debug, Serialize)]
pub struct RoundMetrics {
    /// Round number.
    pub round: u64,
    /// Attempt.
    pub attempt: u32,
    /// "completed" or "failed".
    pub status: String,
    /// Sampled clients.
    pub sampled: Vec<String>,
    /// Clients whose update was aggregated.
    pub contributed: Vec<String>,
    /// Sampled clients that sent nothing.
    pub lost: Vec<String>,
    /// Mean local training loss of the contributors.
    pub mean_train_loss: Option<f64>,
    /// The coordinator's evaluation of the new global model.
    pub eval: Option<EvalReport>,
    /// Seconds from opening to closing.
    pub seconds: f64,
    /// Bytes up per contributing client (payload), and the analytic minimum.
    pub up_payload_per_client: u64,
    /// Bytes down per sampled client (payload).
    pub down_payload_per_client: u64,
    /// Sum of up/down message and wire bytes over the round's clients.
    pub up_message_bytes: u64,
    /// Sum of down message bytes.
    pub down_message_bytes: u64,
    /// Sum of up wire bytes.
    pub up_wire_bytes: u64,
    /// Sum of down wire bytes.
    pub down_wire_bytes: u64,
    /// The analytic minimum per client per direction.
    pub analytic_min_bytes: u64,
    /// DP-SGD: the contributors' privacy reports (ε so far, δ, steps, σ, q, C).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub privacy: BTreeMap<String, DpReport>,
    /// DP-SGD: the largest ε any client of the run has reported so far (the run's guarantee).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worst_epsilon: Option<f64>,
}

/// The privacy side of a run, for the status endpoint and the run summary.
#[derive(Clone, Debug, Serialize)]
pub struct PrivacySummary {
    /// How the adapter's initialization relates to private data.
    pub init: String,
    /// The DP-SGD the run requires (none: no DP).
    pub dp: Option<fedsb_common::dp::DpSpec>,
    /// Each client's latest report (ε is cumulative over its rounds).
    pub clients: BTreeMap<String, DpReport>,
    /// The largest ε of any client: the run's record-level guarantee at δ.
    pub worst_epsilon: Option<f64>,
    /// Clients that left the run, and why.
    pub left: BTreeMap<String, String>,
}

/// A closed attempt of a round: what its record and its metrics line say.
pub(super) struct Attempt {
    /// Round number.
    pub round: u64,
    /// Attempt.
    pub attempt: u32,
    /// Sampled clients.
    pub sampled: Vec<String>,
    /// Clients whose update was received.
    pub contributed: Vec<String>,
    /// Sampled clients that sent nothing.
    pub lost: Vec<String>,
    /// Opened at (unix ms).
    pub opened_ms: u64,
    /// Closed at (unix ms).
    pub closed_ms: u64,
    /// What a completed attempt produced (None: it failed).
    pub completed: Option<Completed>,
}

/// What only a completed attempt has.
pub(super) struct Completed {
    /// sha256 of the new global blob.
    pub global_sha256: String,
    /// FedEx-LoRA, FLoRA: sha256 of the product blob.
    pub product_sha256: Option<String>,
    /// Mean local training loss of the contributors.
    pub mean_train_loss: Option<f64>,
    /// The evaluation of the new global.
    pub eval: Option<EvalReport>,
    /// DP-SGD: the contributors' privacy reports.
    pub privacy: BTreeMap<String, DpReport>,
}

/// The store record and the metrics line of a closed attempt, whose ledger entries are `ledger`. A failed
/// attempt's line counts no bytes (its ledger rows are committed all the same). `worst_epsilon` is left
/// `None`: it reads the committed rounds, so the caller fills it in after committing the record.
pub(super) fn round_report(
    a: Attempt,
    ledger: &[LedgerEntry],
    analytic_min_bytes: u64,
) -> Result<(RoundRecord, RoundMetrics)> {
    let (status, c) = match a.completed {
        Some(c) => ("completed", Some(c)),
        None => ("failed", None),
    };
    let (global_sha256, product_sha256, mean_train_loss, eval, privacy) = match c {
        Some(c) => (Some(c.global_sha256), c.product_sha256, c.mean_train_loss, c.eval, c.privacy),
        None => (None, None, None, None, BTreeMap::new()),
    };
    let counted: &[LedgerEntry] = if status == "completed" { ledger } else { &[] };
    let sum = |dir: Direction, f: &dyn Fn(&LedgerEntry) -> u64| -> u64 {
        counted.iter().filter(|e| e.direction == dir).map(f).sum()
    };
    let per_client = |dir: Direction| -> u64 {
        counted.iter().filter(|e| e.direction == dir && e.payload_bytes > 0).map(|e| e.payload_bytes).max().unwrap_or(0)
    };
    let record = RoundRecord {
        round: a.round,
        attempt: a.attempt,
        status: status.into(),
        global_sha256,
        opened_unix_ms: a.opened_ms,
        closed_unix_ms: a.closed_ms,
        sampled: a.sampled.clone(),
        contributed: a.contributed.clone(),
        lost: a.lost.clone(),
        mean_train_loss,
        eval_json: eval.as_ref().map(serde_json::to_string).transpose()?,
        product_sha256,
        privacy_json: if privacy.is_empty() { None } else { Some(serde_json::to_string(&privacy)?) },
    };
    let metrics = RoundMetrics {
        round: a.round,
        attempt: a.attempt,
        status: status.into(),
        sampled: a.sampled,
        contributed: a.contributed,
        lost: a.lost,
        mean_train_loss,
        eval,
        seconds: (a.closed_ms.saturating_sub(a.opened_ms)) as f64 / 1e3,
        up_payload_per_client: per_client(Direction::Up),
        down_payload_per_client: per_client(Direction::Down),
        up_message_bytes: sum(Direction::Up, &|e| e.message_bytes),
        down_message_bytes: sum(Direction::Down, &|e| e.message_bytes),
        up_wire_bytes: sum(Direction::Up, &|e| e.wire_bytes.unwrap_or(0)),
        down_wire_bytes: sum(Direction::Down, &|e| e.wire_bytes.unwrap_or(0)),
        analytic_min_bytes,
        privacy,
        worst_epsilon: None,
    };
    Ok((record, metrics))
}

impl Coordinator {
    /// Appends `m` to `metrics.jsonl` (a failure is logged, not fatal).
    pub(super) fn write_metrics(&self, m: &RoundMetrics) {
        use std::io::Write;
        let Some(path) = &self.metrics_path else { return };
        let line = match serde_json::to_string(m) {
            Ok(l) => l,
            Err(e) => return tracing::warn!("metrics: {e}"),
        };
        let r =
            std::fs::OpenOptions::new().create(true).append(true).open(path).and_then(|mut f| writeln!(f, "{line}"));
        if let Err(e) = r {
            tracing::warn!("could not append to {}: {e}", path.display());
        }
    }

    /// The line of a completed round: printed with `print_rounds`, else logged.
    pub(super) fn print_round(&self, m: &RoundMetrics) {
        let eval = m.eval.as_ref().map_or_else(|| "no evaluation".into(), describe_eval);
        let line = format!(
            "round {}/{}: {} clients (lost {}), mean local loss {}, {eval}, up {} / down {} per client (min {}), wire up {} down {}, {:.1}s",
            m.round,
            self.rounds,
            m.contributed.len(),
            m.lost.len(),
            m.mean_train_loss.map_or("-".into(), |l| format!("{l:.4}")),
            human_bytes(m.up_payload_per_client),
            human_bytes(m.down_payload_per_client),
            human_bytes(m.analytic_min_bytes),
            human_bytes(m.up_wire_bytes),
            human_bytes(m.down_wire_bytes),
            m.seconds
        );
        let line = match m.worst_epsilon {
            Some(e) => format!("{line}, DP ε ≤ {e:.3} (worst client)"),
            None => line,
        };
        if self.opts.print_rounds {
            println!("{line}");
        } else {
            tracing::info!("{line}");
        }
    }

    /// The line of a failed attempt: printed with `print_rounds`, else logged as a warning.
    pub(super) fn print_failed(&self, m: &RoundMetrics, retry: bool) {
        let line = format!(
            "round {} attempt {} FAILED: {} of {} sampled clients answered before the deadline (lost: {}){}",
            m.round,
            m.attempt,
            m.contributed.len(),
            m.sampled.len(),
            m.lost.join(", "),
            if retry { "; sampling again" } else { "; the run stops" }
        );
        if self.opts.print_rounds {
            println!("{line}");
        } else {
            tracing::warn!("{line}");
        }
    }

    /// The privacy statement of the run: how the init relates to private data, the DP spec, each client's
    /// latest report (from the store, so it survives a restart) and the worst-case ε. Blocks (a store read).
    pub fn privacy_summary(&self) -> Result<PrivacySummary> {
        let mut clients: BTreeMap<String, DpReport> = BTreeMap::new();
        let rounds = self.store().rounds(&self.run_id)?;
        for r in rounds {
            if let Some(j) = &r.privacy_json {
                let reports: BTreeMap<String, DpReport> =
                    serde_json::from_str(j).with_context(|| format!("round {}'s privacy reports", r.round))?;
                for (c, rep) in reports {
                    let newer = clients.get(&c).is_none_or(|old| rep.steps >= old.steps);
                    if newer {
                        clients.insert(c, rep);
                    }
                }
            }
        }
        let worst_epsilon = clients.values().map(|r| r.epsilon).reduce(f64::max);
        Ok(PrivacySummary {
            init: self.init_privacy.clone(),
            dp: self.spec.dp.clone(),
            clients,
            worst_epsilon,
            left: self.engine().left().clone(),
        })
    }

    /// The largest ε any client has reported (None in a run without DP: the store is not read then).
    pub(super) fn worst_epsilon(&self) -> Option<f64> {
        self.spec.dp.as_ref()?;
        self.privacy_summary().ok().and_then(|p| p.worst_epsilon)
    }

    /// The status document served by `GetStatus`. Blocks (store reads).
    pub fn status_json(&self) -> Result<String> {
        let (phase, completed, clients, outcome) = {
            let e = self.engine();
            (
                e.phase_summary(),
                e.completed_rounds(),
                e.clients().keys().cloned().collect::<Vec<_>>(),
                e.outcome().cloned(),
            )
        };
        let rounds = self.store().rounds(&self.run_id)?;
        let ledger = self.ledger()?;
        let v = serde_json::json!({
            "run_id": self.run_id,
            "phase": phase,
            "completed_rounds": completed,
            "clients": clients,
            "outcome": outcome.map(|o| serde_json::json!({"status": o.status, "message": o.message, "global_sha256": o.global_sha256})),
            "rounds": rounds,
            "ledger_totals": ledger.round_totals(),
            "ledger": ledger.entries(),
            "analytic_min_bytes_per_client": self.analytic_min_bytes,
            "base_folds": self.base_folds(),
            "privacy": self.privacy_summary()?,
        });
        Ok(serde_json::to_string_pretty(&v)?)
    }
}

#[cfg(test)]
mod tests {
    use fedsb_common::comm::ledger::Transfer;

    use super::*;

    fn entry(client: &str, direction: Direction, payload: u64, message: u64, wire: Option<u64>) -> LedgerEntry {
        LedgerEntry {
            round: 3,
            client: client.into(),
            direction,
            transfer: Transfer::Round,
            payload_bytes: payload,
            message_bytes: message,
            wire_bytes: wire,
            analytic_min_bytes: 64,
        }
    }

    fn attempt(completed: Option<Completed>) -> Attempt {
        Attempt {
            round: 3,
            attempt: 1,
            sampled: vec!["a".into(), "b".into(), "c".into()],
            contributed: vec!["a".into(), "b".into()],
            lost: vec!["c".into()],
            opened_ms: 10_000,
            closed_ms: 12_500,
            completed,
        }
    }

    fn ledger() -> Vec<LedgerEntry> {
        vec![
            entry("a", Direction::Up, 100, 130, Some(200)),
            entry("b", Direction::Up, 100, 130, Some(210)),
            entry("a", Direction::Down, 90, 120, Some(150)),
            entry("b", Direction::Down, 0, 20, None),
            entry("c", Direction::Down, 80, 110, Some(140)),
        ]
    }

    #[test]
    fn a_completed_attempt_has_one_record_and_one_line_that_agree() {
        let privacy = BTreeMap::from([(
            "a".to_string(),
            DpReport {
                epsilon: 1.5,
                delta: 1e-5,
                best_order: 8.0,
                steps: 10,
                noise_multiplier: 1.1,
                sample_rate: 0.01,
                max_grad_norm: 1.0,
                secure_noise: true,
            },
        )]);
        let done = Completed {
            global_sha256: "g".repeat(64),
            product_sha256: None,
            mean_train_loss: Some(0.75),
            eval: None,
            privacy: privacy.clone(),
        };
        let (rec, m) = round_report(attempt(Some(done)), &ledger(), 64).unwrap();
        assert_eq!(rec.status, "completed");
        assert_eq!(m.status, "completed");
        assert_eq!((rec.round, rec.attempt, m.round, m.attempt), (3, 1, 3, 1));
        assert_eq!(rec.global_sha256, Some("g".repeat(64)));
        assert_eq!((rec.opened_unix_ms, rec.closed_unix_ms, m.seconds), (10_000, 12_500, 2.5));
        assert_eq!((&rec.sampled, &rec.contributed, &rec.lost), (&m.sampled, &m.contributed, &m.lost));
        assert_eq!((rec.mean_train_loss, m.mean_train_loss), (Some(0.75), Some(0.75)));
        assert_eq!(rec.eval_json, None);
        let stored: BTreeMap<String, DpReport> = serde_json::from_str(rec.privacy_json.as_deref().unwrap()).unwrap();
        assert_eq!(stored, privacy);
        assert_eq!(m.privacy, privacy);
        // Per client: the largest payload; sums over clients; wire bytes where measured.
        assert_eq!((m.up_payload_per_client, m.down_payload_per_client), (100, 90));
        assert_eq!((m.up_message_bytes, m.down_message_bytes), (260, 250));
        assert_eq!((m.up_wire_bytes, m.down_wire_bytes), (410, 290));
        assert_eq!(m.analytic_min_bytes, 64);
        assert_eq!(m.worst_epsilon, None, "filled in after the commit");
    }

    #[test]
    fn a_failed_attempt_has_no_global_and_its_line_counts_no_bytes() {
        let (rec, m) = round_report(attempt(None), &ledger(), 64).unwrap();
        assert_eq!((rec.status.as_str(), m.status.as_str()), ("failed", "failed"));
        assert_eq!((rec.global_sha256, rec.product_sha256, rec.eval_json, rec.privacy_json), (None, None, None, None));
        assert_eq!((rec.mean_train_loss, m.mean_train_loss), (None, None));
        assert_eq!(rec.lost, vec!["c".to_string()]);
        assert_eq!(m.seconds, 2.5);
        assert_eq!(
            (m.up_payload_per_client, m.down_payload_per_client, m.up_message_bytes, m.down_wire_bytes),
            (0, 0, 0, 0)
        );
        assert!(m.privacy.is_empty());
        assert_eq!(m.analytic_min_bytes, 64);
    }
}
