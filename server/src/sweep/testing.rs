//! Test helpers shared by the sweep modules' tests: sweeps parsed from text, and run folders as a finished
//! `local` run leaves them (a `metrics.jsonl` and the sweep's stamp), so results and reports can be checked
//! without running anything; and a little SVG inspection for the charts.
use std::path::Path;

use plotters::style::RGBColor;

use super::SweepError;
use super::runner::{RunStamp, STAMP_FILE, run_dir};
use super::spec::{PlannedRun, SweepSpec};

/// A sweep from TOML text, relative paths anchored at `/base`, named `file-stem` unless it says otherwise.
pub(crate) fn parse(text: &str) -> Result<SweepSpec, SweepError> {
    SweepSpec::parse(text, Path::new("/base"), "file-stem")
}

/// A metrics line like the coordinator's (with fields the sweep ignores).
pub(crate) fn line(round: u64, status: &str, acc: f64, up: u64, down: u64) -> String {
    serde_json::json!({
        "round": round, "attempt": 1, "status": status, "sampled": ["client-1", "client-2"],
        "contributed": if status == "completed" { vec!["client-1", "client-2"] } else { vec![] },
        "lost": [], "mean_train_loss": 0.5, "eval": {"loss": 0.4, "count": 10, "examples": 10, "accuracy": acc},
        "seconds": 1.5, "up_payload_per_client": up, "down_payload_per_client": down,
        "up_message_bytes": 0, "down_message_bytes": 0, "up_wire_bytes": 0, "down_wire_bytes": 0,
        "analytic_min_bytes": up
    })
    .to_string()
}

/// Writes a run folder as a finished sweep run would leave it.
pub(crate) fn fake_run(out: &Path, run: &PlannedRun, lines: &[String], success: bool, wall: f64) {
    let dir = run_dir(out, &run.name);
    std::fs::create_dir_all(dir.join("state")).unwrap();
    std::fs::write(dir.join("state/metrics.jsonl"), lines.join("\n") + "\n").unwrap();
    let stamp = RunStamp { args: run.local_args(), success, exit: "exit status: 0".into(), wall_seconds: wall };
    std::fs::write(dir.join(STAMP_FILE), serde_json::to_string(&stamp).unwrap()).unwrap();
}

/// Two methods × two splits, two clients, two rounds: four runs.
pub(crate) fn two_method_spec() -> SweepSpec {
    parse("name = \"t\"\nclients = 2\nrounds = 2\nmethods = [\"fedsb\", \"fedit\"]\nsplits = [\"iid\", \"dirichlet\"]")
        .unwrap()
}

/// A privacy sweep: budgets 8 and 1, then without DP, with `[local]` DP keys.
pub(crate) fn privacy_spec() -> SweepSpec {
    parse(
        "clients = 2\nrounds = 2\nmethods = [\"fedsb\"]\ndp_epsilons = [8.0, 1.0]\n\
         [local]\ndp_delta = 1e-6\ndp_max_grad_norm = 0.5\n",
    )
    .unwrap()
}

/// [`two_method_spec`]'s runs under `out`: fedsb iid and fedsb dirichlet complete; fedit iid one round of two
/// (failed); fedit dirichlet not run.
pub(crate) fn synthetic_runs(out: &Path) -> SweepSpec {
    let spec = two_method_spec();
    let runs = spec.runs();
    let run = |name: &str| runs.iter().find(|r| r.name == name).unwrap();
    fake_run(
        out,
        run("fedsb-r16-iid-s42"),
        &[line(1, "completed", 0.6, 100, 200), line(2, "completed", 0.8, 100, 200)],
        true,
        12.4,
    );
    fake_run(
        out,
        run("fedsb-r16-dirichlet-s42"),
        &[line(1, "completed", 0.7, 100, 200), line(2, "completed", 0.65, 100, 200)],
        true,
        10.0,
    );
    fake_run(out, run("fedit-r16-iid-s42"), &[line(1, "completed", 0.55, 5000, 5000)], false, 3.0);
    spec
}

/// The opening tags of an SVG's `tag` elements, in order, without the closing `>` (self-closing ones end in `/`).
pub(crate) fn elements<'a>(svg: &'a str, tag: &str) -> Vec<&'a str> {
    let open = format!("<{tag} ");
    svg.match_indices(&open).map(|(i, _)| &svg[i..i + svg[i..].find('>').unwrap_or(svg.len() - i)]).collect()
}

/// An attribute's value in an opening tag.
pub(crate) fn attr<'a>(element: &'a str, name: &str) -> Option<&'a str> {
    let key = format!(" {name}=\"");
    let start = element.find(&key)? + key.len();
    Some(&element[start..start + element[start..].find('"')?])
}

/// The text of every `<text>` element, trimmed.
pub(crate) fn texts(svg: &str) -> Vec<&str> {
    svg.split("<text ").skip(1).filter_map(|t| Some(t[t.find('>')? + 1..t.find("</text>")?].trim())).collect()
}

/// The `<polyline>`s drawn in `color`, `width` pixels wide: a chart's series lines or dashes at
/// [`LINE_WIDTH`](super::chart::LINE_WIDTH), its legend samples a pixel wider.
pub(crate) fn polylines(svg: &str, color: RGBColor, width: u32) -> Vec<&str> {
    let hex = format!("#{:02X}{:02X}{:02X}", color.0, color.1, color.2);
    let width = width.to_string();
    elements(svg, "polyline")
        .into_iter()
        .filter(|e| attr(e, "stroke") == Some(hex.as_str()) && attr(e, "stroke-width") == Some(width.as_str()))
        .collect()
}
