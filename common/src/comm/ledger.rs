//! [`ByteLedger`]: bytes sent per round, client and direction, at three levels (tensor payload, encoded
//! messages, socket bytes) next to the analytic minimum; plus the analytic-minimum helpers.
use std::collections::{BTreeMap, BTreeSet};

use candle_core::DType;
use serde::{Deserialize, Serialize};

use crate::{Error, Result, TensorSet};

/// Which way bytes went.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    /// Client → coordinator.
    Up,
    /// Coordinator → client.
    Down,
}

/// What the bytes were for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transfer {
    /// The one-time LoRA-SB init download (B, A and R_init; the head comes with the round-1 global).
    Init,
    /// Per-round task/update traffic.
    Round,
}

/// One transfer of one client in one direction.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// The round (0 for [`Transfer::Init`]).
    pub round: u64,
    /// The client's id.
    pub client: String,
    /// Which way the bytes went.
    pub direction: Direction,
    /// Init download or round traffic.
    pub transfer: Transfer,
    /// Tensor bytes only.
    pub payload_bytes: u64,
    /// Encoded protobuf messages plus 5-byte gRPC frame headers.
    pub message_bytes: u64,
    /// Counted on the socket, TLS included; `None` when not measured.
    pub wire_bytes: Option<u64>,
    /// The analytic minimum: number of values × bytes per value (see [`analytic_min_bytes`]).
    pub analytic_min_bytes: u64,
}

/// Sums over the entries of one round (or of the init download).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundTotals {
    /// The round (0 for the init download).
    pub round: u64,
    /// Distinct clients with at least one entry.
    pub clients: usize,
    /// Distinct clients with an upload entry.
    pub up_clients: usize,
    /// Distinct clients with a download entry.
    pub down_clients: usize,
    /// Uploaded tensor bytes.
    pub up_payload_bytes: u64,
    /// Uploaded message bytes.
    pub up_message_bytes: u64,
    /// Uploaded socket bytes; `None` unless every upload entry was measured.
    pub up_wire_bytes: Option<u64>,
    /// Analytic minimum of the uploads, summed over clients.
    pub up_analytic_min_bytes: u64,
    /// Downloaded tensor bytes.
    pub down_payload_bytes: u64,
    /// Downloaded message bytes.
    pub down_message_bytes: u64,
    /// Downloaded socket bytes; `None` unless every download entry was measured.
    pub down_wire_bytes: Option<u64>,
    /// Analytic minimum of the downloads, summed over clients.
    pub down_analytic_min_bytes: u64,
}

impl RoundTotals {
    fn from_entries<'a>(round: u64, entries: impl Iterator<Item = &'a LedgerEntry>) -> Self {
        let mut t = RoundTotals { round, up_wire_bytes: Some(0), down_wire_bytes: Some(0), ..Default::default() };
        let (mut all, mut up, mut down) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
        for e in entries {
            all.insert(e.client.as_str());
            let (clients, payload, message, wire, min) = match e.direction {
                Direction::Up => (
                    &mut up,
                    &mut t.up_payload_bytes,
                    &mut t.up_message_bytes,
                    &mut t.up_wire_bytes,
                    &mut t.up_analytic_min_bytes,
                ),
                Direction::Down => (
                    &mut down,
                    &mut t.down_payload_bytes,
                    &mut t.down_message_bytes,
                    &mut t.down_wire_bytes,
                    &mut t.down_analytic_min_bytes,
                ),
            };
            clients.insert(e.client.as_str());
            *payload += e.payload_bytes;
            *message += e.message_bytes;
            *min += e.analytic_min_bytes;
            *wire = wire.zip(e.wire_bytes).map(|(a, b)| a + b);
        }
        t.clients = all.len();
        t.up_clients = up.len();
        t.down_clients = down.len();
        t
    }

    /// Mean analytic minimum per uploading client (0 when none uploaded).
    pub fn up_analytic_min_per_client(&self) -> f64 {
        per_client(self.up_analytic_min_bytes, self.up_clients)
    }

    /// Mean analytic minimum per downloading client (0 when none downloaded).
    pub fn down_analytic_min_per_client(&self) -> f64 {
        per_client(self.down_analytic_min_bytes, self.down_clients)
    }
}

fn per_client(bytes: u64, clients: usize) -> f64 {
    if clients == 0 { 0.0 } else { bytes as f64 / clients as f64 }
}

/// Communication records of a run: one [`LedgerEntry`] per transfer, in the order recorded.
#[derive(Clone, Debug, Default)]
pub struct ByteLedger {
    entries: Vec<LedgerEntry>,
}

impl ByteLedger {
    /// An empty ledger.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends one entry.
    pub fn record(&mut self, e: LedgerEntry) {
        self.entries.push(e);
    }

    /// All entries, in the order recorded.
    pub fn entries(&self) -> &[LedgerEntry] {
        &self.entries
    }

    /// The [`Transfer::Round`] entries of `round` (the init download is never included; see [`Self::init`]).
    pub fn round(&self, round: u64) -> Vec<&LedgerEntry> {
        self.entries.iter().filter(|e| e.transfer == Transfer::Round && e.round == round).collect()
    }

    /// The [`Transfer::Init`] entries.
    pub fn init(&self) -> Vec<&LedgerEntry> {
        self.entries.iter().filter(|e| e.transfer == Transfer::Init).collect()
    }

    /// Per-round sums of the [`Transfer::Round`] entries, by increasing round: clients, up/down payload,
    /// message and wire bytes, analytic minimum.
    pub fn round_totals(&self) -> Vec<RoundTotals> {
        let mut by_round: BTreeMap<u64, Vec<&LedgerEntry>> = BTreeMap::new();
        for e in self.entries.iter().filter(|e| e.transfer == Transfer::Round) {
            by_round.entry(e.round).or_default().push(e);
        }
        by_round.into_iter().map(|(r, es)| RoundTotals::from_entries(r, es.into_iter())).collect()
    }

    /// Sums of the [`Transfer::Init`] entries (round 0), or `None` when there are none.
    pub fn init_totals(&self) -> Option<RoundTotals> {
        let init = self.init();
        (!init.is_empty()).then(|| RoundTotals::from_entries(0, init.into_iter()))
    }

    /// One JSON object per entry per line (each line ends with `\n`).
    pub fn to_jsonl(&self) -> String {
        let mut out = String::new();
        for e in &self.entries {
            out.push_str(&serde_json::to_string(e).expect("a ledger entry always serializes"));
            out.push('\n');
        }
        out
    }

    /// Parses [`Self::to_jsonl`]'s output (blank lines are skipped).
    pub fn from_jsonl(text: &str) -> Result<Self> {
        let mut entries = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let e = serde_json::from_str(line)
                .map_err(|source| Error::Json { context: format!("ledger line {}", i + 1), source })?;
            entries.push(e);
        }
        Ok(Self { entries })
    }

    /// A human-readable table: one line per round (payload/message/wire bytes each way, analytic minimum per
    /// client each way) and the init download on its own line first, in B/KiB/MiB/GiB with 2 decimals.
    /// Wire bytes show `-` when not measured for every entry.
    pub fn table(&self) -> String {
        const HEAD: [&str; 10] = [
            "round",
            "clients",
            "up payload",
            "up message",
            "up wire",
            "down payload",
            "down message",
            "down wire",
            "min up/client",
            "min down/client",
        ];
        let row = |label: String, t: &RoundTotals| -> [String; 10] {
            [
                label,
                t.clients.to_string(),
                fmt_bytes(t.up_payload_bytes as f64),
                fmt_bytes(t.up_message_bytes as f64),
                t.up_wire_bytes.map_or("-".into(), |b| fmt_bytes(b as f64)),
                fmt_bytes(t.down_payload_bytes as f64),
                fmt_bytes(t.down_message_bytes as f64),
                t.down_wire_bytes.map_or("-".into(), |b| fmt_bytes(b as f64)),
                fmt_bytes(t.up_analytic_min_per_client()),
                fmt_bytes(t.down_analytic_min_per_client()),
            ]
        };
        let mut rows: Vec<[String; 10]> = vec![HEAD.map(String::from)];
        if let Some(t) = self.init_totals() {
            rows.push(row("init".into(), &t));
        }
        for t in self.round_totals() {
            rows.push(row(t.round.to_string(), &t));
        }
        let mut widths = [0usize; 10];
        for r in &rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let mut out = String::new();
        for r in &rows {
            let cells: Vec<String> = r
                .iter()
                .zip(widths)
                .enumerate()
                .map(|(i, (c, w))| if i == 0 { format!("{c:<w$}") } else { format!("{c:>w$}") })
                .collect();
            out.push_str(cells.join(" | ").trim_end());
            out.push('\n');
        }
        out
    }
}

/// `bytes` in B (whole), KiB, MiB or GiB (2 decimals), e.g. `1234567` → `1.18 MiB`.
pub fn human_bytes(bytes: u64) -> String {
    fmt_bytes(bytes as f64)
}

/// [`human_bytes`] of a float count (per-client averages).
fn fmt_bytes(bytes: f64) -> String {
    const KIB: f64 = 1024.0;
    if bytes < KIB {
        format!("{bytes:.0} B")
    } else if bytes < KIB * KIB {
        format!("{:.2} KiB", bytes / KIB)
    } else if bytes < KIB * KIB * KIB {
        format!("{:.2} MiB", bytes / (KIB * KIB))
    } else {
        format!("{:.2} GiB", bytes / (KIB * KIB * KIB))
    }
}

/// Bytes per value of a float dtype on the wire: f32 4, bf16/f16 2, f64 8; other dtypes are an error.
pub fn bytes_per_value(dtype: DType) -> Result<u64> {
    match dtype {
        DType::F32 => Ok(4),
        DType::BF16 | DType::F16 => Ok(2),
        DType::F64 => Ok(8),
        other => Err(Error::Config(format!("dtype {other:?} is not a transfer dtype (f32, bf16, f16, f64)"))),
    }
}

/// The analytic minimum to send `set` as `dtype`: number of values × bytes per value (for Fed-SB,
/// Σ over adapted layers r² plus the head's values).
pub fn analytic_min_bytes(set: &TensorSet, dtype: DType) -> Result<u64> {
    Ok(set.num_values() as u64 * bytes_per_value(dtype)?)
}

/// Fed-SB's analytic minimum per client and direction per round: `(L·r² + head_values) × size(dtype)`.
pub fn fedsb_min_bytes(num_adapted_layers: usize, rank: usize, head_values: usize, dtype: DType) -> u64 {
    (num_adapted_layers as u64 * (rank as u64).pow(2) + head_values as u64) * dtype.size_in_bytes() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn entry(round: u64, client: &str, direction: Direction, transfer: Transfer, base: u64) -> LedgerEntry {
        LedgerEntry {
            round,
            client: client.into(),
            direction,
            transfer,
            payload_bytes: base,
            message_bytes: base + 37,
            wire_bytes: Some(base + 100),
            analytic_min_bytes: base - 8,
        }
    }

    /// Init for two clients, round 1 (both up and down, all measured), round 2 (one wire not measured).
    fn sample() -> ByteLedger {
        let mut l = ByteLedger::new();
        l.record(entry(0, "c0", Direction::Down, Transfer::Init, 5_000_000));
        l.record(entry(0, "c1", Direction::Down, Transfer::Init, 5_000_000));
        for c in ["c0", "c1"] {
            l.record(entry(1, c, Direction::Down, Transfer::Round, 4096));
        }
        l.record(entry(1, "c0", Direction::Up, Transfer::Round, 4096));
        l.record(entry(1, "c1", Direction::Up, Transfer::Round, 2048));
        l.record(entry(2, "c0", Direction::Down, Transfer::Round, 4096));
        l.record(LedgerEntry { wire_bytes: None, ..entry(2, "c0", Direction::Up, Transfer::Round, 4096) });
        l
    }

    #[test]
    fn totals_sum_correctly() {
        let l = sample();
        let t = l.round_totals();
        assert_eq!(t.len(), 2);
        let r1 = &t[0];
        assert_eq!((r1.round, r1.clients, r1.up_clients, r1.down_clients), (1, 2, 2, 2));
        assert_eq!(r1.up_payload_bytes, 4096 + 2048);
        assert_eq!(r1.up_message_bytes, 4096 + 2048 + 2 * 37);
        assert_eq!(r1.up_wire_bytes, Some(4096 + 2048 + 200));
        assert_eq!(r1.up_analytic_min_bytes, 4096 + 2048 - 16);
        assert_eq!(r1.down_payload_bytes, 2 * 4096);
        assert_eq!(r1.down_message_bytes, 2 * (4096 + 37));
        assert_eq!(r1.down_wire_bytes, Some(2 * 4196));
        assert_eq!(r1.down_analytic_min_bytes, 2 * 4088);
        assert_eq!(r1.down_analytic_min_per_client(), 4088.0);
        assert_eq!(r1.up_analytic_min_per_client(), (4088.0 + 2040.0) / 2.0);
        let r2 = &t[1];
        assert_eq!((r2.round, r2.clients, r2.up_clients, r2.down_clients), (2, 1, 1, 1));
        assert_eq!(r2.up_wire_bytes, None, "one upload not measured");
        assert_eq!(r2.down_wire_bytes, Some(4196));
        assert_eq!(l.round(1).len(), 4);
        assert_eq!(l.round(2).len(), 2);
        assert!(l.round(3).is_empty());
    }

    #[test]
    fn init_is_kept_apart_from_rounds() {
        let mut l = sample();
        // A round-0 Round entry must not be mixed with the init download either.
        l.record(entry(0, "c0", Direction::Up, Transfer::Round, 1024));
        let init = l.init_totals().unwrap();
        assert_eq!((init.round, init.clients), (0, 2));
        assert_eq!(init.down_payload_bytes, 10_000_000);
        assert_eq!(init.up_payload_bytes, 0);
        assert_eq!(l.init().len(), 2);
        assert!(l.round(0).iter().all(|e| e.transfer == Transfer::Round));
        assert_eq!(l.round(0).len(), 1);
        let totals = l.round_totals();
        assert_eq!(totals.iter().map(|t| t.round).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!(totals[0].down_payload_bytes, 0);
        assert_eq!(totals[0].up_payload_bytes, 1024);
        let round_down: u64 = totals.iter().map(|t| t.down_payload_bytes).sum();
        assert_eq!(round_down, 3 * 4096, "init bytes are not in the round totals");
        assert!(ByteLedger::new().init_totals().is_none());
    }

    #[test]
    fn jsonl_round_trips() {
        let l = sample();
        let text = l.to_jsonl();
        assert_eq!(text.lines().count(), l.entries().len());
        let parsed: Vec<LedgerEntry> = text.lines().map(|line| serde_json::from_str(line).unwrap()).collect();
        assert_eq!(parsed, l.entries());
        assert!(text.lines().next().unwrap().contains("\"direction\":\"down\""));
        assert!(text.contains("\"transfer\":\"init\"") && text.contains("\"wire_bytes\":null"));
        assert_eq!(ByteLedger::from_jsonl(&text).unwrap().entries(), l.entries());
        let err = ByteLedger::from_jsonl("{\"round\":1}\n").unwrap_err().to_string();
        assert!(err.contains("line 1"), "{err}");
    }

    #[test]
    fn table_lists_init_and_every_round() {
        let table = sample().table();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert!(lines[0].starts_with("round") && lines[0].contains("min up/client"), "{table}");
        assert!(lines[1].starts_with("init") && lines[1].contains("9.54 MiB"), "{table}");
        assert!(lines[2].starts_with("1 ") && lines[2].contains("6.00 KiB"), "{table}");
        assert!(lines[3].starts_with("2 ") && lines[3].contains(" - "), "{table}");
        assert_eq!(fmt_bytes(1000.0), "1000 B");
        assert_eq!(fmt_bytes(1536.0), "1.50 KiB");
        assert_eq!(fmt_bytes(3.0 * 1024.0 * 1024.0 * 1024.0), "3.00 GiB");
    }

    #[test]
    fn bytes_per_value_by_dtype() {
        assert_eq!(bytes_per_value(DType::F32).unwrap(), 4);
        assert_eq!(bytes_per_value(DType::BF16).unwrap(), 2);
        assert_eq!(bytes_per_value(DType::F16).unwrap(), 2);
        assert_eq!(bytes_per_value(DType::F64).unwrap(), 8);
        assert!(bytes_per_value(DType::U32).is_err());
    }

    #[test]
    fn fedsb_min_matches_analytic_min_of_a_set() {
        let (layers, r) = (7, 12);
        let mut set = TensorSet::new();
        for i in 0..layers {
            let t = Tensor::zeros((r, r), DType::F32, &Device::Cpu).unwrap();
            set.insert(format!("model.layers.{i}.self_attn.q_proj.lora_R.weight"), t);
        }
        set.insert("classifier.weight", Tensor::zeros((3, 768), DType::F32, &Device::Cpu).unwrap());
        set.insert("classifier.bias", Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap());
        for dtype in [DType::F32, DType::BF16, DType::F16, DType::F64] {
            let expected = fedsb_min_bytes(layers, r, 2307, dtype);
            assert_eq!(analytic_min_bytes(&set, dtype).unwrap(), expected, "{dtype:?}");
            assert_eq!(expected, (7 * 144 + 2307) * bytes_per_value(dtype).unwrap());
        }
        // The paper's BERT check (method.md §4): 24 R's of r=64 plus a 2307-value head = 100,611 values.
        assert_eq!(fedsb_min_bytes(24, 64, 2307, DType::F32), 100_611 * 4);
    }
}
