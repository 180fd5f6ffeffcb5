//! `fedsb-server sweep` end to end on a tiny random BERT (no assets, no network): a dry run plans four runs,
//! the sweep runs them as real `local` federations (coordinator + `fedsb-client join` processes), writes the
//! CSV, Markdown and SVG reports, skips everything on a second invocation, rebuilds the reports with
//! `--report-only`, and reports a failing run while exiting nonzero.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use fedsb_server::sweep::{SweepSpec, accuracy_chart, collect_results};

const SERVER: &str = env!("CARGO_BIN_EXE_fedsb-server");

/// The `fedsb-client` executable next to `fedsb-server`: this crate's tests cannot name another package's
/// binary, but both live in the same target folder. `cargo test --workspace` (scripts/test.sh) builds it; when
/// it is missing (e.g. `cargo test -p fedsb-server` on a fresh target folder) it is built here.
fn client_exe() -> PathBuf {
    let server = Path::new(SERVER);
    let exe = server.with_file_name(format!("fedsb-client{}", std::env::consts::EXE_SUFFIX));
    if exe.exists() {
        return exe;
    }
    let profile_dir = server.parent().expect("the binary's folder");
    let target_dir = profile_dir.parent().expect("the target folder");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet", "--locked", "-p", "fedsb-client", "--target-dir"])
        .arg(target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let out = cmd.output().expect("running cargo build -p fedsb-client");
    assert!(out.status.success(), "building fedsb-client failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(exe.exists(), "{} missing after the build", exe.display());
    exe
}

fn sweep(args: &[&str], config: &Path, out: &Path, client: &Path) -> (Output, String, String) {
    let o = Command::new(SERVER)
        .arg("sweep")
        .arg("--config")
        .arg(config)
        .arg("--out")
        .arg(out)
        .arg("--client-exe")
        .arg(client)
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    (o, stdout, stderr)
}

const RUNS: [&str; 4] = ["fedsb-r4-iid-s42", "fedit-r4-iid-s42", "fedsb-r4-dirichlet-s42", "fedit-r4-dirichlet-s42"];

#[test]
fn a_tiny_sweep_runs_reports_resumes_and_reports_failures() {
    let client = client_exe();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    fedsb_common::model::testing::write_tiny_bert(&dir.join("model"), 3).unwrap();
    std::fs::write(dir.join("train.jsonl"), fedsb_common::model::testing::tiny_classification_jsonl(160, 1)).unwrap();
    std::fs::write(dir.join("eval.jsonl"), fedsb_common::model::testing::tiny_classification_jsonl(40, 2)).unwrap();
    let config = dir.join("tiny.toml");
    std::fs::write(
        &config,
        r#"
clients = 2
rounds = 2
methods = ["fedsb", "fedit"]
ranks = [4]
splits = ["iid", "dirichlet"]
dirichlet_alpha = 1.0

[local]
local_steps = 2
batch_size = 8
max_len = 16
eval_limit = 0
public_examples = 16
model = "model"
train = "train.jsonl"
eval = "eval.jsonl"
"#,
    )
    .unwrap();
    let out = dir.join("out");

    // Dry run: the plan, nothing run.
    let (o, stdout, stderr) = sweep(&["--dry-run"], &config, &out, &client);
    assert!(o.status.success(), "{stderr}");
    for (i, name) in RUNS.iter().enumerate() {
        assert!(stdout.contains(&format!("[{}/4] {name} (to run)", i + 1)), "{stdout}");
    }
    assert!(stdout.contains("--method fedit --rank 4 --split dirichlet --dirichlet-alpha 1 --seed 42"), "{stdout}");
    assert!(!out.join("runs").exists());

    // The sweep.
    let (o, stdout, stderr) = sweep(&[], &config, &out, &client);
    assert!(o.status.success(), "sweep failed:\n{stdout}\n{stderr}");
    for (i, name) in RUNS.iter().enumerate() {
        let line = stdout.lines().find(|l| l.starts_with(&format!("[{}/4] {name} … ", i + 1))).unwrap_or_default();
        assert!(line.contains("accuracy ") && line.ends_with(" s"), "{stdout}");
        assert!(out.join(format!("runs/{name}.log")).exists());
        assert!(out.join(format!("runs/{name}/state/metrics.jsonl")).exists());
    }
    assert!(out.join("sweep.toml").exists());

    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    let rows: Vec<Vec<&str>> = csv.lines().map(|l| l.split(',').collect()).collect();
    let header = &rows[0];
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap_or_else(|| panic!("column {name}"));
    assert_eq!(rows.len(), 5, "{csv}");
    let num = |row: &[&str], name: &str| -> f64 { row[col(name)].parse().unwrap_or_else(|_| panic!("{name}: {csv}")) };
    for (row, name) in rows[1..].iter().zip(RUNS) {
        assert_eq!(row[col("name")], name);
        assert_eq!(row[col("status")], "completed", "{csv}");
        assert_eq!(row[col("rounds_completed")], "2");
        let acc = num(row, "final_accuracy");
        assert!((0.0..=1.0).contains(&acc), "{csv}");
        assert!(num(row, "init_bytes") > 0.0, "the init download from the ledger: {csv}");
        // Total = init + 2 rounds × 2 clients × (up + down).
        let per_round = 2.0 * (num(row, "up_bytes_per_client_per_round") + num(row, "down_bytes_per_client_per_round"));
        assert_eq!(num(row, "total_bytes"), num(row, "init_bytes") + 2.0 * per_round, "{csv}");
        assert!(num(row, "wall_seconds") > 0.0);
    }
    // Fed-SB sends r² values per adapted matrix, FedIT r·(d+k): fewer bytes up for the same rank.
    assert!(num(&rows[1], "up_bytes_per_client_per_round") < num(&rows[2], "up_bytes_per_client_per_round"), "{csv}");

    let rounds = std::fs::read_to_string(out.join("rounds.csv")).unwrap();
    assert_eq!(rounds.lines().count(), 1 + 4 * 2, "{rounds}");
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    for name in RUNS {
        assert!(md.contains(&format!("| {name} | completed | 2/2 |")), "{md}");
    }
    // Charts: one line per run with a marker per round, the non-IID lines dashed (plotters draws a dashed line
    // as short polylines), a legend entry per run.
    let spec = SweepSpec::load(&config).unwrap();
    let results = collect_results(&spec, &out).unwrap();
    for (f, by_bytes) in [("accuracy_vs_round.svg", false), ("accuracy_vs_bytes.svg", true)] {
        let svg = std::fs::read_to_string(out.join(f)).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "{f}");
        let chart = accuracy_chart(&spec, &results, by_bytes);
        assert_eq!(chart.series.len(), 4, "{f}: one line per run");
        assert_eq!(chart.series.iter().filter(|s| s.dashed).count(), 2, "{f}: the non-IID lines are dashed");
        assert_eq!(svg, chart.to_svg().unwrap(), "{f}: the file draws that chart");
        assert_eq!(svg.matches("<circle").count(), 4 * 2, "{f}: a marker per round of each run");
        assert!(svg.matches("stroke-width=\"2\"").count() >= 2 + 2 * 2, "{f}: two solid lines, two in dashes");
        for label in ["fedsb r4 iid", "fedit r4 iid", "fedsb r4 non-IID (α=1)", "fedit r4 non-IID (α=1)"] {
            assert_eq!(svg.matches(&format!(">\n{label}\n</text>")).count(), 1, "{f}: the legend entry {label}");
        }
    }

    // Again: everything is complete and skipped; the reports are the same.
    let (o, stdout, stderr) = sweep(&[], &config, &out, &client);
    assert!(o.status.success(), "{stderr}");
    assert_eq!(stdout.lines().filter(|l| l.ends_with("), skipped")).count(), 4, "{stdout}");
    assert!(stdout.contains("0 run, 4 skipped"), "{stdout}");
    assert_eq!(std::fs::read_to_string(out.join("results.csv")).unwrap(), csv);

    // --report-only rebuilds the reports from the run folders.
    std::fs::remove_file(out.join("results.csv")).unwrap();
    std::fs::remove_file(out.join("accuracy_vs_bytes.svg")).unwrap();
    let (o, stdout, stderr) = sweep(&["--report-only"], &config, &out, &client);
    assert!(o.status.success(), "{stderr}");
    assert!(stdout.contains("reports for 4 of 4 runs"), "{stdout}");
    assert_eq!(std::fs::read_to_string(out.join("results.csv")).unwrap(), csv);
    assert!(out.join("accuracy_vs_bytes.svg").exists());

    // A run that fails (here: a flag `local` does not know) is reported, the others go on, the exit is nonzero.
    let bad = dir.join("bad.toml");
    let text = std::fs::read_to_string(&config).unwrap().replace("rounds = 2", "rounds = 1");
    let text = text.replace("[local]", "[method.fedsb]\nextra_args = [\"--no-such-flag\"]\n\n[local]");
    std::fs::write(&bad, text.replace("splits = [\"iid\", \"dirichlet\"]", "splits = [\"iid\"]")).unwrap();
    let bad_out = dir.join("bad-out");
    let (o, stdout, stderr) = sweep(&[], &bad, &bad_out, &client);
    assert!(!o.status.success(), "{stdout}");
    assert!(stdout.contains("[1/2] fedsb-r4-iid-s42 … FAILED"), "{stdout}");
    assert!(stdout.contains("[2/2] fedit-r4-iid-s42 … accuracy"), "{stdout}");
    assert!(stderr.contains("1 of 2 runs failed: fedsb-r4-iid-s42"), "{stderr}");
    let log = std::fs::read_to_string(bad_out.join("runs/fedsb-r4-iid-s42.log")).unwrap();
    assert!(log.contains("--no-such-flag"), "{log}");
    let csv = std::fs::read_to_string(bad_out.join("results.csv")).unwrap();
    assert!(csv.contains("fedsb-r4-iid-s42,fedsb,4,iid,42,incomplete,1,0,"), "{csv}");

    // A bad sweep file is refused before anything runs.
    std::fs::write(&bad, "methods = [\"fedsb\"]\nrank = [4]\n").unwrap();
    let (o, _, stderr) = sweep(&["--dry-run"], &bad, &bad_out, &client);
    assert!(!o.status.success());
    assert!(stderr.contains("unknown field `rank`"), "{stderr}");
}
