//! `fedsb-server plan` as scripts use it: the last line is the paper's `# Comm.` figure as a plain integer.
use std::process::Command;

fn plan(args: &[&str]) -> (bool, String, String) {
    let cfg = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/model-configs/llama-3.2-3b.json");
    let out = Command::new(env!("CARGO_BIN_EXE_fedsb-server"))
        .args(["plan", "--model-config", cfg])
        .args(args)
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8(out.stdout).unwrap(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn the_last_line_is_the_paper_comm_figure() {
    let (ok, out, err) = plan(&["--method", "fedsb", "--rank", "200", "--clients", "5"]);
    assert!(ok, "{err}");
    assert_eq!(out.lines().last(), Some("7840000"), "{out}");
    let (ok, out, err) = plan(&["--method", "fedit", "--rank", "32", "--dtype", "bf16"]);
    assert!(ok, "{err}");
    assert_eq!(out.lines().last(), Some("48627712"), "{out}");
    assert!(out.contains("92.75 MiB"), "48,627,712 bf16 values: {out}");
}

#[test]
fn all_methods_compare_and_bad_input_is_refused() {
    let (ok, out, err) = plan(&["--method", "all", "--rank", "32", "--clients", "5", "--json"]);
    assert!(ok, "{err}");
    let rows: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let names: Vec<&str> = rows.iter().map(|r| r["method"].as_str().unwrap()).collect();
    assert_eq!(names, ["fedit", "ffa-lora", "fedex-lora", "flora", "fedsb"]);
    assert_eq!(rows[4]["up_per_client"], 196 * 32 * 32);
    let (ok, _, err) = plan(&["--method", "fedavg", "--rank", "32"]);
    assert!(!ok && err.contains("unknown method"), "{err}");
    let (ok, _, err) = plan(&["--rank", "32", "--target-modules", "query"]);
    assert!(!ok && err.contains("unknown target module"), "{err}");
}
