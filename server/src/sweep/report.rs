//! The human-readable reports of a sweep's results: `results.md` (the setup, a table of the runs, a summary per
//! method, rank and split over the seeds, and for privacy sweeps an accuracy-vs-ε table) and the two accuracy
//! charts ([`accuracy_chart`]: against the round, and against cumulative payload bytes). Pure functions of the
//! spec and the [`RunResult`]s; [`super::write_reports`] writes them.
use std::fmt::Write as _;

use fedsb_common::Method;
use fedsb_common::comm::human_bytes;

use super::chart::{self, Chart, PALETTE, Scale, Series};
use super::results::RunResult;
use super::spec::{SplitKind, SweepSpec};

/// An accuracy in 0..1 as a percentage with two decimals (`–` when there is none).
pub(super) fn pct(v: Option<f64>) -> String {
    v.map(|a| format!("{:.2} %", a * 100.0)).unwrap_or_else(|| "–".into())
}

fn bytes_f(v: Option<f64>) -> String {
    v.map(|b| human_bytes(b.round() as u64)).unwrap_or_else(|| "–".into())
}

fn secs(v: Option<f64>) -> String {
    v.map(|s| format!("{s:.0} s")).unwrap_or_else(|| "–".into())
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// Sample standard deviation (None below two values).
fn std_dev(v: &[f64]) -> Option<f64> {
    let m = mean(v)?;
    (v.len() >= 2).then(|| (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt())
}

/// `results.md`: the setup, a table of the runs, a per-configuration summary over seeds, and the charts.
pub fn results_markdown(spec: &SweepSpec, results: &[RunResult]) -> String {
    let has_dp = spec.epsilons.iter().any(Option::is_some);
    let mut o = String::new();
    let _ = writeln!(o, "# Sweep `{}`\n", spec.name);
    let local = spec.local.describe();
    let _ = writeln!(
        o,
        "{} clients, {} rounds, {} run(s){}.",
        spec.clients,
        spec.rounds,
        results.len(),
        if local.is_empty() { String::new() } else { format!("; every run: `{}`", local.join(" ")) }
    );
    for (m, ov) in &spec.overrides {
        let mut parts = ov.local.describe();
        if let Some(r) = &ov.ranks {
            parts.insert(0, format!("ranks {r:?}"));
        }
        if !parts.is_empty() {
            let _ = writeln!(o, "- `{m}`: `{}`", parts.join(" "));
        }
    }
    o.push_str(
        "\nBytes are adapter payload bytes (tensor data) as the coordinator recorded them; *up/down* are per client \
         per round, *total* is all clients, both directions, all rounds plus the one-time init download. Accuracy is \
         the coordinator's evaluation of the global model after the last round.\n\n## Runs\n\n",
    );
    o.push_str(
        "| run | status | rounds | final acc. | best acc. | up / client / round | down / client / round | init | total \
         | wall |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in results {
        let name = match (r.run.dp_epsilon, r.epsilon_spent) {
            (Some(_), Some(e)) => format!("{} (ε spent {e:.3})", r.run.name),
            _ => r.run.name.clone(),
        };
        let _ = writeln!(
            o,
            "| {} | {} | {}/{} | {} | {} | {} | {} | {} | {} | {} |",
            name,
            r.status.name(),
            r.rounds.len(),
            r.run.rounds,
            pct(r.final_accuracy),
            pct(r.best_accuracy),
            bytes_f(r.up_per_client_round),
            bytes_f(r.down_per_client_round),
            r.init_bytes.map(human_bytes).unwrap_or_else(|| "–".into()),
            if r.rounds.is_empty() { "–".into() } else { human_bytes(r.total_bytes) },
            secs(r.wall_seconds)
        );
    }
    o.push_str(
        "\n## Per method\n\nMean over seeds (± sample standard deviation when there are several) of the runs with \
         results.\n\n| method | rank | split | seeds | final acc. | up / client / round | down / client / round | \
         total | wall |\n|---|---:|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for (key, group) in configurations(results) {
        let with: Vec<&RunResult> = group.iter().copied().filter(|r| !r.rounds.is_empty()).collect();
        let acc: Vec<f64> = with.iter().filter_map(|r| r.final_accuracy).collect();
        let acc_s = match (mean(&acc), std_dev(&acc)) {
            (Some(m), Some(s)) => format!("{:.2} % ± {:.2}", m * 100.0, s * 100.0),
            (Some(m), None) => format!("{:.2} %", m * 100.0),
            _ => "–".into(),
        };
        let f = |g: &dyn Fn(&RunResult) -> Option<f64>| mean(&with.iter().filter_map(|r| g(r)).collect::<Vec<_>>());
        let method =
            if key.3 == "non-private" && !has_dp { key.0.to_string() } else { format!("{} ({})", key.0, key.3) };
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            method,
            key.1,
            key.2.name(),
            with.len(),
            acc_s,
            bytes_f(f(&|r| r.up_per_client_round)),
            bytes_f(f(&|r| r.down_per_client_round)),
            bytes_f(f(&|r| Some(r.total_bytes as f64))),
            secs(f(&|r| r.wall_seconds)),
        );
    }
    if has_dp {
        o.push_str(&privacy_table(spec, results));
    }
    o.push_str(
        "\n## Charts\n\n![Accuracy vs round](accuracy_vs_round.svg)\n\n![Accuracy vs cumulative bytes](accuracy_vs_bytes.svg)\n",
    );
    o
}

/// The accuracy-vs-ε table of a privacy sweep: one row per (method, rank, split), one column per budget
/// (ascending, then non-private); each cell the mean final accuracy over seeds and, for DP, the worst client's
/// spent ε.
fn privacy_table(spec: &SweepSpec, results: &[RunResult]) -> String {
    let mut eps: Vec<f64> = spec.epsilons.iter().flatten().copied().collect();
    eps.sort_by(f64::total_cmp);
    let mut cols: Vec<Option<f64>> = eps.into_iter().map(Some).collect();
    if spec.epsilons.contains(&None) {
        cols.push(None);
    }
    let mut o = String::from(
        "\n## Accuracy vs privacy budget\n\nRecord-level DP-SGD on every client (Poisson sampling, per-sample \
         clipping, Gaussian noise calibrated per client to spend the budget ε in the run's rounds; δ below 1/N). Final \
         accuracy, mean over seeds; in brackets the largest ε any client actually spent.\n\n| method | rank | split |",
    );
    for c in &cols {
        let _ = write!(o, " {} |", c.map_or_else(|| "non-private".to_string(), |e| format!("ε = {e}")));
    }
    o.push_str("\n|---|---:|---|");
    o.push_str(&"---:|".repeat(cols.len()));
    o.push('\n');
    let mut rows: Vec<(Method, usize, SplitKind)> = Vec::new();
    for r in results {
        let k = (r.run.method, r.run.rank, r.run.split);
        if !rows.contains(&k) {
            rows.push(k);
        }
    }
    for (m, rank, split) in rows {
        let _ = write!(o, "| {m} | {rank} | {} |", split.name());
        for c in &cols {
            let runs: Vec<&RunResult> = results
                .iter()
                .filter(|r| r.run.method == m && r.run.rank == rank && r.run.split == split && r.run.dp_epsilon == *c)
                .collect();
            let acc: Vec<f64> = runs.iter().filter_map(|r| r.final_accuracy).collect();
            let spent = runs.iter().filter_map(|r| r.epsilon_spent).reduce(f64::max);
            let cell = match (mean(&acc), spent) {
                (Some(a), Some(e)) => format!("{:.2} % ({e:.2})", a * 100.0),
                (Some(a), None) => format!("{:.2} %", a * 100.0),
                _ => "–".into(),
            };
            let _ = write!(o, " {cell} |");
        }
        o.push('\n');
    }
    o
}

/// A run's configuration without its seed: (method, rank, split, privacy label).
type ConfigKey = (Method, usize, SplitKind, String);

/// Results grouped by (method, rank, split, privacy), in run order.
fn configurations(results: &[RunResult]) -> Vec<(ConfigKey, Vec<&RunResult>)> {
    let mut groups: Vec<(ConfigKey, Vec<&RunResult>)> = Vec::new();
    for r in results {
        let key = (r.run.method, r.run.rank, r.run.split, r.run.privacy_label());
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, g)) => g.push(r),
            None => groups.push((key, vec![r])),
        }
    }
    groups
}

/// The accuracy chart of the runs with results: against the round (`by_bytes` false) or against cumulative
/// payload bytes on a log scale. One line per run; a colour per (method, rank), dashed for non-IID.
pub fn accuracy_chart(spec: &SweepSpec, results: &[RunResult], by_bytes: bool) -> Chart {
    let mut configs: Vec<(Method, usize)> = Vec::new();
    let mut series = Vec::new();
    for r in results {
        let key = (r.run.method, r.run.rank);
        let idx = configs.iter().position(|k| *k == key).unwrap_or_else(|| {
            configs.push(key);
            configs.len() - 1
        });
        let points: Vec<(f64, f64)> = r
            .rounds
            .iter()
            .filter_map(|p| {
                let x = if by_bytes { p.cumulative_bytes as f64 } else { p.round as f64 };
                p.accuracy.map(|a| (x, a * 100.0))
            })
            .collect();
        if points.is_empty() {
            continue;
        }
        series.push(Series {
            label: r.run.label(),
            color: PALETTE[idx % PALETTE.len()],
            dashed: r.run.split == SplitKind::Dirichlet,
            points,
        });
    }
    if by_bytes {
        Chart {
            title: format!("{}: accuracy vs communication", spec.name),
            x_label: "cumulative payload bytes, all clients, up + down, incl. init (log scale)".into(),
            y_label: "eval accuracy (%)".into(),
            x_scale: Scale::Log10,
            x_format: chart::fmt_si_bytes,
            y_format: chart::fmt_plain,
            series,
        }
    } else {
        Chart {
            title: format!("{}: accuracy vs round", spec.name),
            x_label: "round".into(),
            y_label: "eval accuracy (%)".into(),
            x_scale: Scale::Linear { integer: true },
            x_format: chart::fmt_plain,
            y_format: chart::fmt_plain,
            series,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::chart::LINE_WIDTH;
    use super::super::results::collect_results;
    use super::super::testing::{elements, fake_run, line, parse, polylines, privacy_spec, synthetic_runs, texts};
    use super::super::write_reports;
    use super::*;
    use plotters::style::RGBColor;

    /// The results and CSV of the same runs are checked in `results`' tests.
    #[test]
    fn markdown_and_charts_from_synthetic_runs() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        let spec = synthetic_runs(out);
        let results = collect_results(&spec, out).unwrap();

        let md = results_markdown(&spec, &results);
        assert!(md.starts_with("# Sweep `t`"));
        assert!(
            md.contains(
                "| fedsb-r16-iid-s42 | completed | 2/2 | 80.00 % | 80.00 % | 100 B | 200 B | – | 1.17 KiB | 12 s |"
            ),
            "{md}"
        );
        assert!(md.contains("| fedit | 16 | dirichlet | 0 | – |"), "{md}");
        assert!(md.contains("| fedsb | 16 | iid | 1 | 80.00 % |"), "{md}");
        assert!(md.contains("![Accuracy vs round](accuracy_vs_round.svg)"));

        // Charts: one line per run with results (3), a dashed one for the non-IID run; a marker per round.
        for by_bytes in [false, true] {
            let chart = accuracy_chart(&spec, &results, by_bytes);
            let lines: Vec<(&str, RGBColor, bool)> =
                chart.series.iter().map(|s| (s.label.as_str(), s.color, s.dashed)).collect();
            assert_eq!(
                lines,
                [
                    ("fedsb r16 iid", PALETTE[0], false),
                    ("fedit r16 iid", PALETTE[1], false),
                    ("fedsb r16 non-IID (α=0.5)", PALETTE[0], true)
                ],
                "by bytes: {by_bytes}"
            );
            let svg = chart.to_svg().unwrap();
            // fedit: one solid polyline; fedsb: its IID line and the dashes of its non-IID line.
            assert_eq!(polylines(&svg, PALETTE[1], LINE_WIDTH).len(), 1, "by bytes: {by_bytes}");
            assert!(polylines(&svg, PALETTE[0], LINE_WIDTH).len() >= 3, "by bytes: {by_bytes}");
            assert_eq!(elements(&svg, "circle").len(), 2 + 1 + 2, "by bytes: {by_bytes}");
            assert!(texts(&svg).contains(&"fedsb r16 non-IID (α=0.5)"), "by bytes: {by_bytes}");
        }
        let svg = accuracy_chart(&spec, &results, true).to_svg().unwrap();
        let texts = texts(&svg);
        assert!(texts.contains(&"1 kB") && texts.contains(&"100 kB"), "log ticks: {texts:?}");
    }

    #[test]
    fn per_method_summary_averages_seeds() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        let spec = parse("methods = [\"fedsb\"]\nrounds = 1\nclients = 2\nseeds = [1, 2]").unwrap();
        let runs = spec.runs();
        fake_run(out, &runs[0], &[line(1, "completed", 0.70, 10, 10)], true, 10.0);
        fake_run(out, &runs[1], &[line(1, "completed", 0.80, 10, 10)], true, 20.0);
        let md = results_markdown(&spec, &collect_results(&spec, out).unwrap());
        // Mean 75 %, sample standard deviation of 70 and 80: 7.07.
        assert!(md.contains("| fedsb | 16 | iid | 2 | 75.00 % ± 7.07 | 10 B | 10 B | 40 B | 15 s |"), "{md}");
        // Both seeds share a legend entry and a colour.
        let chart = accuracy_chart(&spec, &collect_results(&spec, out).unwrap(), false);
        assert_eq!(chart.series.len(), 2);
        assert!(chart.series.iter().all(|s| s.label == "fedsb r16 iid" && s.color == PALETTE[0] && !s.dashed));
        let svg = chart.to_svg().unwrap();
        assert_eq!(polylines(&svg, PALETTE[0], LINE_WIDTH).len(), 2);
        assert_eq!(polylines(&svg, PALETTE[0], LINE_WIDTH + 1).len(), 1);
        assert_eq!(texts(&svg).iter().filter(|t| **t == "fedsb r16 iid").count(), 1);
    }

    /// The runs of a privacy sweep are checked in `spec`'s tests.
    #[test]
    fn privacy_sweeps_report_the_spent_epsilon_and_an_accuracy_vs_epsilon_table() {
        let spec = privacy_spec();
        let runs = spec.runs();
        // Reports: the spent ε is read from the metrics, and the table has a column per budget.
        let dir = tempfile::tempdir().unwrap();
        let with_eps = |acc: f64, eps: Option<f64>| {
            let mut v: serde_json::Value = serde_json::from_str(&line(2, "completed", acc, 10, 10)).unwrap();
            if let Some(e) = eps {
                v["worst_epsilon"] = serde_json::json!(e);
            }
            v.to_string()
        };
        fake_run(dir.path(), &runs[0], &[line(1, "completed", 0.6, 10, 10), with_eps(0.7, Some(7.95))], true, 1.0);
        fake_run(dir.path(), &runs[1], &[line(1, "completed", 0.5, 10, 10), with_eps(0.55, Some(0.99))], true, 1.0);
        fake_run(dir.path(), &runs[2], &[line(1, "completed", 0.7, 10, 10), with_eps(0.8, None)], true, 1.0);
        let results = write_reports(&spec, dir.path()).unwrap();
        assert_eq!(results[0].epsilon_spent, Some(7.95));
        let md = std::fs::read_to_string(dir.path().join("results.md")).unwrap();
        assert!(md.contains("| method | rank | split | ε = 1 | ε = 8 | non-private |"), "{md}");
        assert!(md.contains("| fedsb | 16 | iid | 55.00 % (0.99) | 70.00 % (7.95) | 80.00 % |"), "{md}");
        let csv = std::fs::read_to_string(dir.path().join("results.csv")).unwrap();
        assert!(csv.lines().nth(1).unwrap().ends_with(",8,7.9500"), "{csv}");
    }
}
