//! Running a sweep: each planned run as its own `fedsb-server local` process, one after another, in
//! [`SweepSpec::runs`]'s order, its output in `OUT/runs/NAME.log` and its work folder `OUT/runs/NAME/`. When a
//! run's process exits, [`STAMP_FILE`] records its arguments, exit and wall time; resuming compares that stamp
//! and the run's `metrics.jsonl` with the plan ([`run_state`]): a complete run is skipped, any other folder is
//! removed and the run started again. The reports are rewritten after every run.
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::report::pct;
use super::results::{RunStatus, completed_rounds, load_result, read_metrics};
use super::spec::{PlannedRun, SweepSpec};
use super::{SweepError, invalid, io_err, write_reports};

/// Where a sweep's runs go and which executables and assets they use.
#[derive(Clone, Debug)]
pub struct RunnerOptions {
    /// The output folder.
    pub out: PathBuf,
    /// The `fedsb-server` executable that runs `local` (normally this process's own).
    pub server_exe: PathBuf,
    /// `--client-exe` for every run (default: `local`'s, next to the server executable).
    pub client_exe: Option<PathBuf>,
    /// `--assets` for every run.
    pub assets: Option<PathBuf>,
}

/// A run's work folder: `OUT/runs/NAME`.
pub fn run_dir(out: &Path, name: &str) -> PathBuf {
    out.join("runs").join(name)
}

/// A run's log: `OUT/runs/NAME.log`.
pub fn run_log(out: &Path, name: &str) -> PathBuf {
    out.join("runs").join(format!("{name}.log"))
}

/// The file in a run's folder recording how it was run.
pub const STAMP_FILE: &str = "sweep-run.json";

/// What `OUT/runs/NAME/sweep-run.json` records once a run's process has exited.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunStamp {
    /// [`PlannedRun::local_args`] of the run.
    pub args: Vec<String>,
    /// Whether the process exited successfully.
    pub success: bool,
    /// Its exit status, in words.
    pub exit: String,
    /// Wall-clock seconds of the whole process (setup, init, rounds, evaluation).
    pub wall_seconds: f64,
}

/// The stamp in a run's folder (None: none, or unreadable).
pub(super) fn read_stamp(dir: &Path) -> Option<RunStamp> {
    let text = std::fs::read_to_string(dir.join(STAMP_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

/// What a run's folder says about it.
#[derive(Clone, Debug, PartialEq)]
pub enum RunState {
    /// No folder: the run has not started.
    Absent,
    /// Finished all rounds with the planned flags: skipped when resuming.
    Complete,
    /// Anything else (interrupted, failed, other flags): removed and run again. The reason is in words.
    Stale(String),
}

/// The state of `run` under `out` (see [`RunState`]).
pub fn run_state(run: &PlannedRun, out: &Path) -> RunState {
    let dir = run_dir(out, &run.name);
    if !dir.exists() {
        return RunState::Absent;
    }
    let Some(stamp) = read_stamp(&dir) else {
        return RunState::Stale("an unfinished run folder".into());
    };
    if stamp.args != run.local_args() {
        return RunState::Stale("run with other settings".into());
    }
    if !stamp.success {
        return RunState::Stale(format!("failed before ({})", stamp.exit));
    }
    match read_metrics(&dir.join("state/metrics.jsonl")) {
        Ok(m) if completed_rounds(&m).len() as u64 >= run.rounds => RunState::Complete,
        Ok(m) => RunState::Stale(format!("{} of {} rounds completed", completed_rounds(&m).len(), run.rounds)),
        Err(e) => RunState::Stale(format!("unreadable metrics: {e}")),
    }
}

/// What a sweep did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SweepSummary {
    /// Runs started (and finished, successfully or not).
    pub ran: Vec<String>,
    /// Runs skipped because they were already complete.
    pub skipped: Vec<String>,
    /// Runs that failed.
    pub failed: Vec<String>,
}

/// The `fedsb-server local` command of `run` (without stdio settings).
pub fn local_command(run: &PlannedRun, opts: &RunnerOptions) -> Command {
    let mut cmd = Command::new(&opts.server_exe);
    cmd.arg("local").args(run.local_args()).arg("--work-dir").arg(run_dir(&opts.out, &run.name));
    if let Some(c) = &opts.client_exe {
        cmd.arg("--client-exe").arg(c);
    }
    if let Some(a) = &opts.assets {
        cmd.arg("--assets").arg(a);
    }
    cmd
}

/// Runs every run of `spec` that is not already complete, one after another, printing a line per run; rewrites
/// the reports after each. A failing run is reported and the sweep goes on (see [`SweepSummary::failed`]).
pub fn run_sweep(spec: &SweepSpec, opts: &RunnerOptions) -> Result<SweepSummary, SweepError> {
    let runs = spec.runs();
    let runs_dir = opts.out.join("runs");
    std::fs::create_dir_all(&runs_dir).map_err(io_err(&runs_dir))?;
    let mut summary = SweepSummary::default();
    let n = runs.len();
    for (i, run) in runs.iter().enumerate() {
        let tag = format!("[{}/{n}] {}", i + 1, run.name);
        let dir = run_dir(&opts.out, &run.name);
        match run_state(run, &opts.out) {
            RunState::Complete => {
                let acc = load_result(run, &opts.out).ok().and_then(|r| r.final_accuracy);
                println!("{tag}: already complete (accuracy {}), skipped", pct(acc));
                summary.skipped.push(run.name.clone());
                continue;
            }
            RunState::Stale(why) => {
                println!("{tag}: {why}; removing {} and running it again", dir.display());
                std::fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
            }
            RunState::Absent => {}
        }
        print!("{tag} … ");
        let _ = std::io::stdout().flush();
        let log_path = run_log(&opts.out, &run.name);
        let log = std::fs::File::create(&log_path).map_err(io_err(&log_path))?;
        let log2 = log.try_clone().map_err(io_err(&log_path))?;
        let start = Instant::now();
        let status = local_command(run, opts).stdin(Stdio::null()).stdout(log).stderr(log2).status();
        let wall_seconds = start.elapsed().as_secs_f64();
        let (success, exit) = match &status {
            Ok(s) => (s.success(), s.to_string()),
            Err(e) => (false, format!("could not start {}: {e}", opts.server_exe.display())),
        };
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let stamp = RunStamp { args: run.local_args(), success, exit: exit.clone(), wall_seconds };
        let stamp_path = dir.join(STAMP_FILE);
        let json = serde_json::to_string_pretty(&stamp).map_err(|e| invalid(e.to_string()))?;
        std::fs::write(&stamp_path, json).map_err(io_err(&stamp_path))?;
        summary.ran.push(run.name.clone());
        let result = load_result(run, &opts.out);
        match (&result, success) {
            (Ok(r), true) if r.status == RunStatus::Completed => {
                println!("accuracy {}, {wall_seconds:.0} s", pct(r.final_accuracy));
            }
            _ => {
                let why = match &result {
                    Ok(r) if success => format!("{} of {} rounds completed", r.rounds.len(), r.run.rounds),
                    Err(e) => e.to_string(),
                    _ => exit,
                };
                println!("FAILED ({why}) after {wall_seconds:.0} s; see {}", log_path.display());
                summary.failed.push(run.name.clone());
            }
        }
        write_reports(spec, &opts.out)?;
    }
    write_reports(spec, &opts.out)?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::super::testing::{fake_run, line, two_method_spec};
    use super::*;

    #[test]
    fn run_states_drive_skip_and_rerun() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        let spec = two_method_spec();
        let runs = spec.runs();
        assert_eq!(run_state(&runs[0], out), RunState::Absent);
        // Complete: stamp with the same args, success, all rounds.
        fake_run(out, &runs[0], &[line(1, "completed", 0.6, 100, 100), line(2, "completed", 0.7, 100, 100)], true, 9.0);
        assert_eq!(run_state(&runs[0], out), RunState::Complete);
        // A failed attempt before a completed one still counts the round once.
        fake_run(
            out,
            &runs[1],
            &[line(1, "failed", 0.0, 0, 0), line(1, "completed", 0.6, 100, 100), line(2, "completed", 0.7, 1, 1)],
            true,
            9.0,
        );
        assert_eq!(run_state(&runs[1], out), RunState::Complete);
        // Only one round of two.
        fake_run(out, &runs[2], &[line(1, "completed", 0.6, 100, 100)], true, 9.0);
        assert!(matches!(run_state(&runs[2], out), RunState::Stale(w) if w.contains("1 of 2")));
        // Failed process.
        fake_run(out, &runs[3], &[], false, 1.0);
        assert!(matches!(run_state(&runs[3], out), RunState::Stale(w) if w.contains("failed")));
        // Other settings: a complete run of another sweep with the same name.
        let mut other = runs[0].clone();
        other.local.local_steps = Some(7);
        assert!(matches!(run_state(&other, out), RunState::Stale(w) if w.contains("other settings")));
        // A folder without a stamp: interrupted.
        std::fs::remove_file(run_dir(out, &runs[0].name).join(STAMP_FILE)).unwrap();
        assert!(matches!(run_state(&runs[0], out), RunState::Stale(w) if w.contains("unfinished")));
    }
}
