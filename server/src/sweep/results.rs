//! A run's results, read back from its folder: the completed rounds of its `metrics.jsonl` (accuracy, losses,
//! payload bytes), the init download from its ledger and the stamp the runner wrote ([`load_result`]); and the
//! two CSV reports built from them, `results.csv` (one row per run) and `rounds.csv` (one row per run per
//! completed round). Column names and number formats are what users' scripts read: keep them.
use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::runner::{read_stamp, run_dir};
use super::spec::{PlannedRun, SweepSpec};
use super::{SweepError, io_err};

/// The fields of a `metrics.jsonl` line (see `coordinator::RoundMetrics`) a sweep reads.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct MetricsLine {
    /// Round number.
    pub round: u64,
    /// Attempt.
    #[serde(default)]
    pub attempt: u32,
    /// "completed" or "failed".
    pub status: String,
    /// Sampled clients.
    #[serde(default)]
    pub sampled: Vec<String>,
    /// Clients whose update was aggregated.
    #[serde(default)]
    pub contributed: Vec<String>,
    /// Mean local training loss.
    #[serde(default)]
    pub mean_train_loss: Option<f64>,
    /// The coordinator's evaluation.
    #[serde(default)]
    pub eval: Option<MetricsEval>,
    /// Seconds from opening to closing.
    #[serde(default)]
    pub seconds: f64,
    /// Payload bytes up per contributing client.
    #[serde(default)]
    pub up_payload_per_client: u64,
    /// Payload bytes down per sampled client.
    #[serde(default)]
    pub down_payload_per_client: u64,
    /// DP-SGD: the largest ε any client had spent after the round.
    #[serde(default)]
    pub worst_epsilon: Option<f64>,
}

/// The evaluation part of a metrics line.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct MetricsEval {
    /// Mean loss.
    #[serde(default)]
    pub loss: Option<f64>,
    /// Accuracy in 0..1 (classification).
    #[serde(default)]
    pub accuracy: Option<f64>,
}

/// Reads a `metrics.jsonl` (missing file: no lines). A truncated last line (an interrupted write) is ignored.
pub fn read_metrics(path: &Path) -> Result<Vec<MetricsLine>, SweepError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(path)(e)),
    };
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        if l.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(l) {
            Ok(m) => out.push(m),
            Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => break,
            Err(e) => {
                return Err(SweepError::Metrics { path: path.to_path_buf(), line: i + 1, message: e.to_string() });
            }
        }
    }
    Ok(out)
}

/// The completed rounds, one per round number (the last completed attempt), by round.
pub fn completed_rounds(lines: &[MetricsLine]) -> Vec<&MetricsLine> {
    let mut by_round: BTreeMap<u64, &MetricsLine> = BTreeMap::new();
    for l in lines.iter().filter(|l| l.status == "completed") {
        by_round.insert(l.round, l);
    }
    by_round.into_values().collect()
}

/// The one-time init download (payload bytes, all clients) from a run's ledger, when its state has one.
fn ledger_init_bytes(state_dir: &Path) -> Option<u64> {
    if !state_dir.join("state.sqlite").exists() {
        return None;
    }
    let read = || -> Result<Option<u64>, crate::store::StoreError> {
        let store = crate::store::Store::open(state_dir)?;
        let Some(run) = store.latest_run()? else { return Ok(None) };
        let rows = store.ledger(&run.run_id)?;
        Ok(Some(rows.iter().filter(|r| r.transfer == "init").map(|r| r.payload_bytes).sum()))
    };
    match read() {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!("{}: cannot read the init download from the ledger: {e}", state_dir.display());
            None
        }
    }
}

/// How a run stands in the report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunStatus {
    /// All rounds completed with the planned flags.
    Completed,
    /// Started but not complete (failed or interrupted).
    Incomplete,
    /// Its folder holds a run with other flags (its numbers are not reported).
    Stale,
    /// Not started.
    NotRun,
}

impl RunStatus {
    /// The word in the reports.
    pub fn name(self) -> &'static str {
        match self {
            RunStatus::Completed => "completed",
            RunStatus::Incomplete => "incomplete",
            RunStatus::Stale => "stale",
            RunStatus::NotRun => "not run",
        }
    }
}

/// One completed round of a run, as reported.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundPoint {
    /// Round number.
    pub round: u64,
    /// Eval accuracy (0..1).
    pub accuracy: Option<f64>,
    /// Eval loss.
    pub eval_loss: Option<f64>,
    /// Mean local training loss.
    pub train_loss: Option<f64>,
    /// Payload bytes of the round, all clients, both directions.
    pub bytes: u64,
    /// Payload bytes so far: the init download plus every round up to this one.
    pub cumulative_bytes: u64,
    /// Seconds the round was open.
    pub seconds: f64,
}

/// A run's results.
#[derive(Clone, Debug, PartialEq)]
pub struct RunResult {
    /// The run.
    pub run: PlannedRun,
    /// Its status.
    pub status: RunStatus,
    /// Completed rounds.
    pub rounds: Vec<RoundPoint>,
    /// Accuracy after the last completed round.
    pub final_accuracy: Option<f64>,
    /// Best accuracy over the rounds.
    pub best_accuracy: Option<f64>,
    /// Mean payload bytes up per client per round.
    pub up_per_client_round: Option<f64>,
    /// Mean payload bytes down per client per round.
    pub down_per_client_round: Option<f64>,
    /// The one-time init download, all clients (when the ledger could be read).
    pub init_bytes: Option<u64>,
    /// All payload bytes: init download plus every round, all clients, both directions.
    pub total_bytes: u64,
    /// Wall-clock seconds of the run's process.
    pub wall_seconds: Option<f64>,
    /// DP-SGD: the largest ε any client spent (after the last completed round).
    pub epsilon_spent: Option<f64>,
}

/// Reads a run's results from its folder under `out`.
pub fn load_result(run: &PlannedRun, out: &Path) -> Result<RunResult, SweepError> {
    let dir = run_dir(out, &run.name);
    let mut r = RunResult {
        run: run.clone(),
        status: RunStatus::NotRun,
        rounds: Vec::new(),
        final_accuracy: None,
        best_accuracy: None,
        up_per_client_round: None,
        down_per_client_round: None,
        init_bytes: None,
        total_bytes: 0,
        wall_seconds: None,
        epsilon_spent: None,
    };
    if !dir.exists() {
        return Ok(r);
    }
    let stamp = read_stamp(&dir);
    if stamp.as_ref().is_some_and(|s| s.args != run.local_args()) {
        r.status = RunStatus::Stale;
        return Ok(r);
    }
    r.wall_seconds = stamp.as_ref().map(|s| s.wall_seconds);
    let lines = read_metrics(&dir.join("state/metrics.jsonl"))?;
    let done = completed_rounds(&lines);
    r.status = if stamp.is_some_and(|s| s.success) && done.len() as u64 >= run.rounds {
        RunStatus::Completed
    } else {
        RunStatus::Incomplete
    };
    r.init_bytes = ledger_init_bytes(&dir.join("state"));
    let mut cumulative = r.init_bytes.unwrap_or(0);
    for m in &done {
        let bytes =
            m.up_payload_per_client * m.contributed.len() as u64 + m.down_payload_per_client * m.sampled.len() as u64;
        cumulative += bytes;
        r.rounds.push(RoundPoint {
            round: m.round,
            accuracy: m.eval.as_ref().and_then(|e| e.accuracy),
            eval_loss: m.eval.as_ref().and_then(|e| e.loss),
            train_loss: m.mean_train_loss,
            bytes,
            cumulative_bytes: cumulative,
            seconds: m.seconds,
        });
    }
    r.total_bytes = cumulative;
    r.epsilon_spent = done.last().and_then(|m| m.worst_epsilon);
    r.final_accuracy = r.rounds.last().and_then(|p| p.accuracy);
    r.best_accuracy = r.rounds.iter().filter_map(|p| p.accuracy).reduce(f64::max);
    if !done.is_empty() {
        let n = done.len() as f64;
        r.up_per_client_round = Some(done.iter().map(|m| m.up_payload_per_client as f64).sum::<f64>() / n);
        r.down_per_client_round = Some(done.iter().map(|m| m.down_payload_per_client as f64).sum::<f64>() / n);
    }
    Ok(r)
}

/// The results of every run of `spec` under `out`.
pub fn collect_results(spec: &SweepSpec, out: &Path) -> Result<Vec<RunResult>, SweepError> {
    spec.runs().iter().map(|r| load_result(r, out)).collect()
}

/// A number with a fixed count of decimals in a CSV cell (`0.800000`, `12.40`); empty when there is none.
struct Fixed<const DECIMALS: usize>(Option<f64>);

impl<const DECIMALS: usize> Serialize for Fixed<DECIMALS> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Some(v) => s.collect_str(&format_args!("{v:.prec$}", prec = DECIMALS)),
            None => s.serialize_none(),
        }
    }
}

/// A number as Rust prints it (`8`, `0.5`; serde would write `8.0`); empty when there is none.
struct Shortest(Option<f64>);

impl Serialize for Shortest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Some(v) => s.collect_str(&v),
            None => s.serialize_none(),
        }
    }
}

/// The columns of `results.csv`, in order (the field names of [`ResultRow`]).
const RESULTS_HEADER: [&str; 17] = [
    "name",
    "method",
    "rank",
    "split",
    "seed",
    "status",
    "rounds_planned",
    "rounds_completed",
    "final_accuracy",
    "best_accuracy",
    "up_bytes_per_client_per_round",
    "down_bytes_per_client_per_round",
    "init_bytes",
    "total_bytes",
    "wall_seconds",
    "dp_epsilon_budget",
    "dp_epsilon_spent",
];

/// A row of `results.csv` (docs/sweeps.md says what each column means).
#[derive(Serialize)]
struct ResultRow<'a> {
    name: &'a str,
    method: &'a str,
    rank: usize,
    split: &'static str,
    seed: u64,
    status: &'static str,
    rounds_planned: u64,
    rounds_completed: usize,
    final_accuracy: Fixed<6>,
    best_accuracy: Fixed<6>,
    up_bytes_per_client_per_round: Fixed<0>,
    down_bytes_per_client_per_round: Fixed<0>,
    init_bytes: Option<u64>,
    /// Empty for a run without completed rounds.
    total_bytes: Option<u64>,
    wall_seconds: Fixed<2>,
    dp_epsilon_budget: Shortest,
    dp_epsilon_spent: Fixed<4>,
}

impl<'a> ResultRow<'a> {
    fn new(r: &'a RunResult) -> Self {
        ResultRow {
            name: &r.run.name,
            method: r.run.method.name(),
            rank: r.run.rank,
            split: r.run.split.name(),
            seed: r.run.seed,
            status: r.status.name(),
            rounds_planned: r.run.rounds,
            rounds_completed: r.rounds.len(),
            final_accuracy: Fixed(r.final_accuracy),
            best_accuracy: Fixed(r.best_accuracy),
            up_bytes_per_client_per_round: Fixed(r.up_per_client_round),
            down_bytes_per_client_per_round: Fixed(r.down_per_client_round),
            init_bytes: r.init_bytes,
            total_bytes: (!r.rounds.is_empty()).then_some(r.total_bytes),
            wall_seconds: Fixed(r.wall_seconds),
            dp_epsilon_budget: Shortest(r.run.dp_epsilon),
            dp_epsilon_spent: Fixed(r.epsilon_spent),
        }
    }
}

/// The columns of `rounds.csv`, in order (the field names of [`RoundRow`]).
const ROUNDS_HEADER: [&str; 12] = [
    "name",
    "method",
    "rank",
    "split",
    "seed",
    "round",
    "accuracy",
    "eval_loss",
    "train_loss",
    "round_bytes",
    "cumulative_bytes",
    "round_seconds",
];

/// A row of `rounds.csv`: one completed round of a run.
#[derive(Serialize)]
struct RoundRow<'a> {
    name: &'a str,
    method: &'a str,
    rank: usize,
    split: &'static str,
    seed: u64,
    round: u64,
    accuracy: Fixed<6>,
    eval_loss: Fixed<6>,
    train_loss: Fixed<6>,
    round_bytes: u64,
    cumulative_bytes: u64,
    round_seconds: Fixed<3>,
}

impl<'a> RoundRow<'a> {
    fn new(r: &'a RunResult, p: &RoundPoint) -> Self {
        RoundRow {
            name: &r.run.name,
            method: r.run.method.name(),
            rank: r.run.rank,
            split: r.run.split.name(),
            seed: r.run.seed,
            round: p.round,
            accuracy: Fixed(p.accuracy),
            eval_loss: Fixed(p.eval_loss),
            train_loss: Fixed(p.train_loss),
            round_bytes: p.bytes,
            cumulative_bytes: p.cumulative_bytes,
            round_seconds: Fixed(Some(p.seconds)),
        }
    }
}

/// `header`, then `rows`, as CSV text (fields quoted when they hold a comma, quote or newline). The header is
/// written even without rows.
fn to_csv<R: Serialize>(
    file: &'static str,
    header: &[&str],
    rows: impl IntoIterator<Item = R>,
) -> Result<String, SweepError> {
    let err = |e: &dyn std::fmt::Display| SweepError::Report { file, message: e.to_string() };
    let mut w = csv::WriterBuilder::new().has_headers(false).from_writer(Vec::new());
    w.write_record(header).map_err(|e| err(&e))?;
    for row in rows {
        w.serialize(row).map_err(|e| err(&e))?;
    }
    let bytes = w.into_inner().map_err(|e| err(e.error()))?;
    String::from_utf8(bytes).map_err(|e| err(&e))
}

/// `results.csv`: one row per run.
pub fn results_csv(results: &[RunResult]) -> Result<String, SweepError> {
    to_csv("results.csv", &RESULTS_HEADER, results.iter().map(ResultRow::new))
}

/// `rounds.csv`: one row per run per completed round.
pub fn rounds_csv(results: &[RunResult]) -> Result<String, SweepError> {
    let rows = results.iter().flat_map(|r| r.rounds.iter().map(move |p| RoundRow::new(r, p)));
    to_csv("rounds.csv", &ROUNDS_HEADER, rows)
}

#[cfg(test)]
mod tests {
    use super::super::testing::{fake_run, line, synthetic_runs, two_method_spec};
    use super::*;

    #[test]
    fn a_truncated_last_metrics_line_is_ignored_but_a_bad_middle_line_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("metrics.jsonl");
        std::fs::write(&p, format!("{}\n{{\"round\": 2, \"sta", line(1, "completed", 0.5, 1, 1))).unwrap();
        assert_eq!(read_metrics(&p).unwrap().len(), 1);
        std::fs::write(&p, format!("oops\n{}\n", line(1, "completed", 0.5, 1, 1))).unwrap();
        let e = read_metrics(&p).unwrap_err().to_string();
        assert!(e.contains("metrics.jsonl:1:"), "{e}");
        assert!(read_metrics(&dir.path().join("none.jsonl")).unwrap().is_empty());
    }

    /// The Markdown and charts of the same runs are checked in `report`'s tests.
    #[test]
    fn results_and_csv_from_synthetic_runs() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        let spec = synthetic_runs(out);
        let results = collect_results(&spec, out).unwrap();
        assert_eq!(
            results.iter().map(|r| r.status).collect::<Vec<_>>(),
            [RunStatus::Completed, RunStatus::Incomplete, RunStatus::Completed, RunStatus::NotRun]
        );

        let csv = results_csv(&results).unwrap();
        let rows: Vec<&str> = csv.lines().collect();
        assert_eq!(rows.len(), 5);
        assert!(rows[0].starts_with("name,method,rank,split,seed,status,"));
        // Two clients, 100 up and 200 down each, two rounds; no ledger here, so no init bytes.
        assert_eq!(rows[1], "fedsb-r16-iid-s42,fedsb,16,iid,42,completed,2,2,0.800000,0.800000,100,200,,1200,12.40,,");
        assert_eq!(
            rows[2],
            "fedit-r16-iid-s42,fedit,16,iid,42,incomplete,2,1,0.550000,0.550000,5000,5000,,20000,3.00,,"
        );
        assert_eq!(
            rows[3],
            "fedsb-r16-dirichlet-s42,fedsb,16,dirichlet,42,completed,2,2,0.650000,0.700000,100,200,,1200,10.00,,"
        );
        assert_eq!(rows[4], "fedit-r16-dirichlet-s42,fedit,16,dirichlet,42,not run,2,0,,,,,,,,,");

        let rounds = rounds_csv(&results).unwrap();
        let rows: Vec<&str> = rounds.lines().collect();
        assert_eq!(rows.len(), 1 + 2 + 2 + 1);
        assert_eq!(rows[2], "fedsb-r16-iid-s42,fedsb,16,iid,42,2,0.800000,0.400000,0.500000,600,1200,1.500");
    }

    #[test]
    fn a_stale_run_reports_no_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let spec = two_method_spec();
        let mut other = spec.runs()[0].clone();
        other.seed = 7;
        other.name = spec.runs()[0].name.clone();
        fake_run(dir.path(), &other, &[line(1, "completed", 0.6, 1, 1), line(2, "completed", 0.6, 1, 1)], true, 1.0);
        let r = load_result(&spec.runs()[0], dir.path()).unwrap();
        assert_eq!(r.status, RunStatus::Stale);
        assert!(r.rounds.is_empty() && r.final_accuracy.is_none());
    }

    #[test]
    fn csv_fields_are_quoted_when_needed() {
        let spec = two_method_spec();
        let mut r = load_result(&spec.runs()[0], Path::new("/no/such/folder")).unwrap();
        r.run.name = "say \"hi\", a,b".into();
        let csv = results_csv(&[r.clone()]).unwrap();
        assert!(csv.lines().nth(1).unwrap().starts_with("\"say \"\"hi\"\", a,b\",fedsb,16,iid,"), "{csv}");
        r.run.name = "plain".into();
        let csv = results_csv(&[r]).unwrap();
        assert!(csv.lines().nth(1).unwrap().starts_with("plain,fedsb,16,iid,"), "{csv}");
    }

    #[test]
    fn csv_headers_are_the_row_fields_and_written_without_rows() {
        let dir = tempfile::tempdir().unwrap();
        let results = collect_results(&synthetic_runs(dir.path()), dir.path()).unwrap();
        fn serde_header(row: impl Serialize) -> String {
            let mut w = csv::Writer::from_writer(Vec::new());
            w.serialize(row).unwrap();
            let text = String::from_utf8(w.into_inner().unwrap()).unwrap();
            text.lines().next().unwrap().to_string()
        }
        assert_eq!(serde_header(ResultRow::new(&results[0])), RESULTS_HEADER.join(","));
        assert_eq!(serde_header(RoundRow::new(&results[0], &results[0].rounds[0])), ROUNDS_HEADER.join(","));
        assert_eq!(rounds_csv(&[]).unwrap(), ROUNDS_HEADER.join(",") + "\n");
        assert_eq!(results_csv(&[]).unwrap(), RESULTS_HEADER.join(",") + "\n");
    }
}
