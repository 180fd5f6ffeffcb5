//! The `fedsb-client` binary end to end on the real small models (assets from scripts/fetch-assets.sh):
//! `finetune` writes its outputs, `bench --json` prints the promised fields, and bad input fails clearly.
use std::path::PathBuf;
use std::process::Command;

/// The asset folder of scripts/fetch-assets.sh, or `None` (skipped) when missing and not required.
fn assets() -> Option<PathBuf> {
    fedsb_tests::assets().map(|a| a.root)
}

fn client() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fedsb-client"))
}

#[test]
fn finetune_minilm_writes_adapter_peft_and_summary() {
    let Some(a) = assets() else { return };
    let out = tempfile::tempdir().unwrap();
    let o = client()
        .args(["finetune", "--adapter", "lora-sb", "--rank", "8", "--max-steps", "4", "--batch-size", "8"])
        .args(["--train-limit", "64", "--eval-limit", "16", "--max-len", "48"])
        .arg("--model")
        .arg(a.join("models/all-minilm-l6-v2"))
        .arg("--train")
        .arg(a.join("data/rotten-tomatoes/train.jsonl"))
        .arg("--eval")
        .arg(a.join("data/rotten-tomatoes/test.jsonl"))
        .arg("--out")
        .arg(out.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "finetune failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("fedsb finetune summary"), "{stdout}");
    assert!(stderr.contains("LoRA-SB init"), "{stderr}");
    for f in [
        "adapter.safetensors",
        "lora_sb_init.safetensors",
        "peft/adapter_config.json",
        "peft/adapter_model.safetensors",
    ] {
        assert!(out.path().join(f).is_file(), "{f} missing");
    }
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("summary.json")).unwrap()).unwrap();
    assert_eq!(s["steps"], 4);
    assert_eq!(s["adapted_layers"], 24);
    assert_eq!(s["trainable_params"], 24 * 64 + 2 * 384 + 2);
    assert!(s["eval_after"]["accuracy"].as_f64().is_some());
}

#[test]
fn bad_input_fails_with_a_clear_message() {
    let Some(a) = assets() else { return };
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"fine\", \"label\": 1}\n{\"text\": 3}\n").unwrap();
    let o = client()
        .args(["finetune", "--max-steps", "1"])
        .arg("--model")
        .arg(a.join("models/all-minilm-l6-v2"))
        .arg("--train")
        .arg(&bad)
        .arg("--out")
        .arg(dir.path().join("out"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(stderr.contains("line 2"), "{stderr}");
    // An unknown target module names the valid ones.
    let o = client()
        .args(["finetune", "--max-steps", "1", "--targets", "q_proj"])
        .arg("--model")
        .arg(a.join("models/all-minilm-l6-v2"))
        .arg("--train")
        .arg(a.join("data/rotten-tomatoes/test.jsonl"))
        .arg("--out")
        .arg(dir.path().join("out2"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(stderr.contains("valid: query"), "{stderr}");
}

/// The JSON objects a `--json` command printed, one per line, after checking that it succeeded.
fn json_lines(o: &std::process::Output) -> Vec<serde_json::Value> {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn bench_json_prints_the_promised_fields() {
    let Some(a) = assets() else { return };
    let o = client()
        .args(["bench", "--json", "--models", "minilm", "--steps", "1", "--warmup", "0", "--assets"])
        .arg(&a)
        .output()
        .unwrap();
    let lines = json_lines(&o);
    let step = lines.iter().find(|l| l["what"] == "train_step").expect("a train_step line");
    for k in ["model", "adapter", "batch", "seq_len", "ms_per_step_median", "tokens_per_s", "peak_rss_mib"] {
        assert!(!step[k].is_null(), "missing {k}");
    }
    assert_eq!(step["batch"], 32);
    assert_eq!(step["seq_len"], 64);
    let init = lines.iter().find(|l| l["what"] == "lora_sb_init").expect("an init line");
    assert_eq!(init["matrices"], 24);
}

/// `bench --synthetic` builds a model of a config.json with random weights in the asked format, trains it
/// and reports the frozen weights' bytes by format; a format the shapes cannot take is refused by tensor name.
/// (A small config keeps it fast; the billion-parameter configs are for measuring.)
#[test]
fn bench_synthetic_reports_the_weight_bytes_of_the_asked_format() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("small-llama.json");
    std::fs::write(
        &cfg,
        r#"{"model_type":"llama","hidden_size":128,"intermediate_size":256,"num_hidden_layers":2,
            "num_attention_heads":4,"num_key_value_heads":2,"vocab_size":512,"rms_norm_eps":1e-5,
            "tie_word_embeddings":true}"#,
    )
    .unwrap();
    // Frozen matrices: embedding 512×128, per layer q 128², k/v 64×128, o 128², gate/up/down 3×256×128.
    let params = 512 * 128 + 2 * (2 * 128 * 128 + 2 * 64 * 128 + 3 * 256 * 128);
    for (dtype, bytes) in [("q8_0", params / 32 * 34), ("bf16", params * 2), ("q4_0", params / 32 * 18)] {
        let o = client()
            .args(["bench", "--json", "--steps", "2", "--warmup", "0", "--batch", "2", "--seq-len", "16"])
            .args(["--rank", "4", "--dtype", dtype, "--recompute", "on", "--synthetic"])
            .arg(&cfg)
            .output()
            .unwrap();
        let lines = json_lines(&o);
        let step = lines.iter().find(|l| l["what"] == "train_step").expect("a train_step line");
        assert_eq!(step["weight_bytes"], bytes, "{dtype}");
        assert_eq!(step["weight_formats"][dtype], bytes, "{dtype}");
        assert_eq!(step["adapted_matrices"], 14);
        assert_eq!(step["recompute"], true);
        assert!(step["tokens_per_s"].as_f64().unwrap() > 0.0);
        assert!(step["loss_first"].as_f64().unwrap().is_finite());
    }
    let o = client().args(["bench", "--dtype", "q4_k", "--steps", "1", "--synthetic"]).arg(&cfg).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && stderr.contains("q4_k") && stderr.contains("embed_tokens"), "{stderr}");
    let o = client().args(["bench", "--dtype", "q3_0", "--synthetic"]).arg(&cfg).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && stderr.contains("q3_0") && stderr.contains("q8_0"), "{stderr}");
}

/// `bench --profile` breaks the step into phases and the kernels inside them, and they add up to the step.
#[test]
fn bench_profile_accounts_for_the_step() {
    let Some(a) = assets() else { return };
    let o = client()
        .args(["bench", "--json", "--profile", "--models", "minilm", "--steps", "1", "--warmup", "0", "--assets"])
        .arg(&a)
        .output()
        .unwrap();
    let lines = json_lines(&o);
    let p = lines.iter().find(|l| l["what"] == "train_step_profile").expect("a profile line");
    let rows = p["rows"].as_array().unwrap();
    let ms = |phase: &str, op: &str| {
        rows.iter().find(|r| r["phase"] == phase && r["op"] == op).and_then(|r| r["ms_per_step"].as_f64())
    };
    let (fwd, bwd) = (ms("forward", "").expect("forward total"), ms("backward", "").expect("backward total"));
    assert!(ms("forward", "lora-sb-linear").expect("the fused LoRA-SB op in the forward") > 0.0);
    assert!(ms("backward", "lora-sb-linear-grad").expect("its backward") > 0.0);
    let step = p["ms_per_step_mean"].as_f64().unwrap();
    let phases: f64 = rows.iter().filter(|r| r["op"] == "").map(|r| r["ms_per_step"].as_f64().unwrap()).sum();
    assert!(fwd > 0.0 && bwd > 0.0 && phases <= step * 1.001, "{phases} of {step}");
    // Inside a phase, the kernels plus the remainder make the phase (GEMM rows are nested, not added).
    let inside: f64 = rows
        .iter()
        .filter(|r| r["phase"] == "backward" && r["op"] != "" && !r["op"].as_str().unwrap().contains("GEMM"))
        .map(|r| r["ms_per_step"].as_f64().unwrap())
        .sum();
    assert!((inside - bwd).abs() <= 1e-6 * bwd.max(1.0), "{inside} vs {bwd}");
}

/// `bench --svd` reports time and an error no better than the optimal rank-r error, and close to it.
#[test]
fn bench_svd_reports_time_and_accuracy() {
    let o = client()
        .args(["bench", "--json", "--svd", "--svd-shapes", "96x64", "--svd-ranks", "8", "--steps", "1"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
    assert_eq!((v["rows"].as_u64(), v["cols"].as_u64(), v["r"].as_u64()), (Some(96), Some(64), Some(8)));
    let (err, opt) = (v["rel_fro_err"].as_f64().unwrap(), v["rel_fro_err_optimal"].as_f64().unwrap());
    assert!(err >= opt * (1.0 - 1e-4) && err <= opt * 1.01, "{err} vs optimal {opt}");
    assert!(v["ms_median"].as_f64().unwrap() > 0.0);
    let bad = client().args(["bench", "--svd", "--svd-shapes", "96by64"]).output().unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("ROWSxCOLS"));
}

/// `bench --kernels` times every kernel against its composite, and the gradients reach every input.
#[test]
fn bench_kernels_covers_every_kernel() {
    let o = client().args(["bench", "--json", "--kernels", "--steps", "1"]).output().unwrap();
    let lines = json_lines(&o);
    // Eleven kernels, the frozen linear also on bf16, q8_0 and q4_0 weights, LoRA-SB also on two bf16 weights.
    assert_eq!(lines.len(), 16);
    let names: Vec<&str> = lines.iter().filter_map(|l| l["kernel"].as_str()).collect();
    for fmt in ["bf16", "q8_0", "q4_0"] {
        assert!(names.iter().any(|n| n.contains(&format!("{fmt} weight"))), "no {fmt} case in {names:?}");
    }
    for l in &lines {
        for k in ["kernel_fwd_ms", "composite_fwd_ms", "kernel_fwd_bwd_ms", "composite_fwd_bwd_ms"] {
            assert!(l[k].as_f64().is_some_and(|x| x > 0.0), "{k} in {l}");
        }
    }
}

/// `fedsb-client privacy` against the real Opacus 1.5.2 (its RDP accountant's outputs, recorded by
/// scripts/opacus-vectors.py): the last line is a plain number, within 1e-4 of Opacus; a live check on random
/// inputs is scripts/check-privacy-cli.py.
#[test]
fn privacy_commands_agree_with_opacus() {
    let v: serde_json::Value =
        serde_json::from_str(include_str!("../../common/tests/data/opacus_rdp_vectors.json")).unwrap();
    let last_number = |out: std::process::Output| -> f64 {
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        text.lines().last().unwrap().trim().parse().unwrap_or_else(|e| panic!("{e}: {text}"))
    };
    let mut checked = 0;
    // Single-history cases (what the command takes), every 10th.
    for c in v["epsilon_cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["history"].as_array().unwrap().len() == 1)
        .step_by(10)
    {
        let (Some(eps), Some(h)) = (c["eps"].as_f64(), c["history"][0].as_array()) else { continue };
        let (sigma, q, steps) = (h[0].as_f64().unwrap(), h[1].as_f64().unwrap(), h[2].as_u64().unwrap());
        if !eps.is_finite() || steps == 0 {
            continue;
        }
        let out = client()
            .args(["privacy", "epsilon", "--sample-rate", &q.to_string(), "--noise-multiplier", &sigma.to_string()])
            .args(["--steps", &steps.to_string(), "--delta", &c["delta"].as_f64().unwrap().to_string()])
            .output()
            .unwrap();
        let got = last_number(out);
        assert!((got - eps).abs() <= 1e-4 * eps.max(1.0), "q {q} σ {sigma} T {steps}: {got} vs Opacus {eps}");
        checked += 1;
    }
    for c in v["noise_cases"].as_array().unwrap().iter().step_by(4) {
        let Some(sigma) = c["sigma"].as_f64() else { continue };
        let out = client()
            .args(["privacy", "noise", "--target-epsilon", &c["target_epsilon"].as_f64().unwrap().to_string()])
            .args(["--delta", &c["delta"].as_f64().unwrap().to_string(), "--sample-rate"])
            .arg(c["q"].as_f64().unwrap().to_string())
            .args(["--steps", &c["steps"].as_u64().unwrap().to_string(), "--epsilon-tolerance"])
            .arg(c["epsilon_tolerance"].as_f64().unwrap().to_string())
            .output()
            .unwrap();
        let got = last_number(out);
        assert!((got - sigma).abs() <= 1e-4 * sigma.max(1.0), "{c}: {got} vs Opacus {sigma}");
        checked += 1;
    }
    assert!(checked >= 30, "only {checked} cases checked");
    // Bad input: a clear error, non-zero exit.
    let out = client()
        .args([
            "privacy",
            "epsilon",
            "--sample-rate",
            "1.5",
            "--noise-multiplier",
            "1",
            "--steps",
            "10",
            "--delta",
            "1e-5",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("sample"), "{}", String::from_utf8_lossy(&out.stderr));
}
