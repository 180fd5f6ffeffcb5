//! `fedsb-server bench` end to end on a small shape: both processes start, every update is accepted over TLS
//! with client certificates, every round closes, and the figures are consistent with the shape.
use std::process::Command;

#[test]
fn bench_runs_a_small_synthetic_federation_and_reports_consistent_figures() {
    let out = Command::new(env!("CARGO_BIN_EXE_fedsb-server"))
        .args(["bench", "--clients", "3", "--rounds", "2", "--layers", "2", "--rank", "8", "--json"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed: {stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let r: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(r["clients"], 3);
    assert_eq!(r["rounds"], 2);
    assert_eq!(r["values_per_update"], 2 * 7 * 8 * 8);
    assert_eq!(r["tls"], true);
    // A safetensors blob: the f32 values plus a JSON header.
    let bytes = r["update_bytes"].as_u64().unwrap();
    assert!(bytes > 2 * 7 * 64 * 4 && bytes < 2 * 7 * 64 * 4 + 16 * 1024, "{r}");
    for k in ["updates_per_s", "ingest_mb_per_s", "peak_rss_mib"] {
        assert!(r[k].as_f64().unwrap() > 0.0, "{k}: {r}");
    }
    // Closing a round writes and fsyncs a blob and commits a transaction: never free.
    assert!(r["round_close_ms_median"].as_f64().unwrap() > 0.0, "{r}");
    // Protobuf framing and TLS only add bytes.
    assert!(r["up_message_over_payload"].as_f64().unwrap() > 1.0, "{r}");
    assert!(r["up_wire_over_payload"].as_f64().unwrap() > r["up_message_over_payload"].as_f64().unwrap(), "{r}");
}
