//! Experiment sweeps (`fedsb-server sweep`): one TOML file describes methods × ranks × seeds × splits; each
//! combination runs as its own `fedsb-server local` process, and the results land in one folder: `results.csv`,
//! `results.md`, `rounds.csv` and two SVG charts (accuracy vs round, accuracy vs cumulative bytes).
//!
//! ```toml
//! name = "minilm-rt"                   # optional (default: the file's name)
//! clients = 4
//! rounds = 3
//! methods = ["fedsb", "fedit", "ffa-lora", "fedex-lora", "flora"]
//! ranks = [16]                         # every method's ranks, unless [method.NAME] says otherwise
//! seeds = [42]
//! splits = ["iid", "dirichlet"]
//! dirichlet_alpha = 0.5
//!
//! [local]                              # flags of `fedsb-server local` passed to every run
//! local_steps = 20
//!
//! [method.fedsb]                       # per-method: ranks, and any [local] key
//! ranks = [16, 64]
//! ```
//!
//! Privacy sweeps: `dp_epsilons = [1.0, 3.0, 8.0]` runs every configuration once per privacy budget ε (DP-SGD
//! required of every client, `--dp-epsilon`), plus once without DP unless `dp_non_private = false`; `[local]`
//! may set `dp_delta` and `dp_max_grad_norm`. The report then has an accuracy-vs-ε table.
//!
//! The output folder holds `runs/<name>/` (each run's work folder, `state/metrics.jsonl` among others),
//! `runs/<name>.log` (its output) and `runs/<name>/sweep-run.json` (its flags, exit and wall time). A run
//! whose folder shows it completed with the same flags is skipped, so an interrupted sweep resumes; any other
//! run folder is removed and the run started again. See `docs/sweeps.md`.
//!
//! Layout, in data-path order:
//! - [`spec`]: the sweep file, its validation and its expansion into [`PlannedRun`]s.
//! - [`runner`]: the run folders, each run's `local` process, skipping complete runs on resume.
//! - [`results`]: what a run's folder says ([`RunResult`]), `results.csv` and `rounds.csv`.
//! - [`report`]: `results.md` (setup, runs, per-method and privacy tables) and the two accuracy charts.
//! - [`chart`]: the SVG line chart those are drawn with (plotters).
//!
//! [`write_reports`] ties results and report together: the runner calls it after every run, `--report-only`
//! alone.
use std::path::{Path, PathBuf};

pub mod chart;
pub mod report;
pub mod results;
pub mod runner;
pub mod spec;

pub use report::{accuracy_chart, results_markdown};
pub use results::{
    MetricsEval, MetricsLine, RoundPoint, RunResult, RunStatus, collect_results, completed_rounds, load_result,
    read_metrics, results_csv, rounds_csv,
};
pub use runner::{
    RunStamp, RunState, RunnerOptions, STAMP_FILE, SweepSummary, local_command, run_dir, run_log, run_state, run_sweep,
};
pub use spec::{LocalOptions, MethodOverride, PlannedRun, SplitKind, SweepSpec};

/// Errors of a sweep.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    /// The sweep file is not valid TOML or does not match the format.
    #[error("{}: {source}", path.display())]
    Toml {
        /// The sweep file.
        path: PathBuf,
        /// The parser's error (with line and column).
        #[source]
        source: toml::de::Error,
    },
    /// The sweep parses but describes something invalid.
    #[error("invalid sweep: {0}")]
    Invalid(String),
    /// A filesystem operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A run's `metrics.jsonl` has a line that is not a round's metrics.
    #[error("{}:{line}: {message}", path.display())]
    Metrics {
        /// The metrics file.
        path: PathBuf,
        /// The line number (from 1).
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// Writing a CSV report or drawing a chart failed.
    #[error("{file}: {message}")]
    Report {
        /// The report file.
        file: &'static str,
        /// What went wrong.
        message: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SweepError + '_ {
    move |source| SweepError::Io { path: path.to_path_buf(), source }
}

fn invalid(msg: impl Into<String>) -> SweepError {
    SweepError::Invalid(msg.into())
}

/// The files [`write_reports`] writes into the output folder.
pub const REPORT_FILES: [&str; 5] =
    ["results.csv", "results.md", "rounds.csv", "accuracy_vs_round.svg", "accuracy_vs_bytes.svg"];

/// Reads every run's results under `out` and writes the reports ([`REPORT_FILES`]); returns the results.
pub fn write_reports(spec: &SweepSpec, out: &Path) -> Result<Vec<RunResult>, SweepError> {
    let results = collect_results(spec, out)?;
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let files = [
        results_csv(&results)?,
        results_markdown(spec, &results),
        rounds_csv(&results)?,
        chart_svg(spec, &results, false)?,
        chart_svg(spec, &results, true)?,
    ];
    for (name, text) in REPORT_FILES.iter().zip(files) {
        let p = out.join(name);
        std::fs::write(&p, text).map_err(io_err(&p))?;
    }
    Ok(results)
}

/// The accuracy chart against the round (`by_bytes` false) or the bytes, as SVG.
fn chart_svg(spec: &SweepSpec, results: &[RunResult], by_bytes: bool) -> Result<String, SweepError> {
    let file = if by_bytes { "accuracy_vs_bytes.svg" } else { "accuracy_vs_round.svg" };
    accuracy_chart(spec, results, by_bytes).to_svg().map_err(|e| SweepError::Report { file, message: e.to_string() })
}

#[cfg(test)]
pub(crate) mod testing;

#[cfg(test)]
mod tests {
    use super::testing::{fake_run, line, two_method_spec};
    use super::*;

    #[test]
    fn write_reports_writes_every_report_file_from_the_run_folders() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let spec = two_method_spec();
        let runs = spec.runs();
        fake_run(
            &out,
            &runs[0],
            &[line(1, "completed", 0.6, 100, 200), line(2, "completed", 0.8, 100, 200)],
            true,
            1.0,
        );
        let results = write_reports(&spec, &out).unwrap();
        assert_eq!(results, collect_results(&spec, &out).unwrap());
        let expected = [
            results_csv(&results).unwrap(),
            results_markdown(&spec, &results),
            rounds_csv(&results).unwrap(),
            accuracy_chart(&spec, &results, false).to_svg().unwrap(),
            accuracy_chart(&spec, &results, true).to_svg().unwrap(),
        ];
        for (f, want) in REPORT_FILES.iter().zip(expected) {
            assert_eq!(std::fs::read_to_string(out.join(f)).unwrap(), want, "{f}");
        }
    }
}
