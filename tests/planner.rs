//! The communication planner against the Fed-SB paper's `# Comm.` columns (method.md §5), computed from the
//! published `config.json` files of the paper's models (tests/data/model-configs/).
use std::path::PathBuf;

use fedsb_common::comm::planner::{Method, ModelShape, Plan, PlanSpec};

fn shape(name: &str) -> ModelShape {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/model-configs").join(format!("{name}.json"));
    ModelShape::from_file(&p).unwrap()
}

fn comm(shape: &ModelShape, method: Method, rank: u64, clients: u64, targets: Option<&[&str]>, labels: u64) -> u64 {
    let targets = targets.map_or_else(|| shape.default_targets(), |t| t.iter().map(|s| s.to_string()).collect());
    let spec = PlanSpec { method, rank, targets, clients, bytes_per_value: 4, num_labels: labels };
    Plan::new(shape, &spec).unwrap().paper_comm()
}

/// `got` (parameters) equals the paper's figure `want` (in units of `unit`) within `tol` units.
fn close(got: u64, want: f64, unit: f64, tol: f64, what: &str) {
    let g = got as f64 / unit;
    assert!((g - want).abs() <= tol + 1e-9, "{what}: planner {g:.4}, paper {want}");
}

const M: f64 = 1e6;
const K: f64 = 1e3;

#[test]
fn llama_3_2_3b_commonsense_table() {
    let s = shape("llama-3.2-3b");
    assert_eq!(comm(&s, Method::FedIt, 32, 5, None, 0), 48_627_712);
    close(comm(&s, Method::FedIt, 32, 5, None, 0), 48.63, M, 0.01, "FedIT r32");
    for (r, want) in [(120, 2.83), (160, 5.02), (200, 7.85)] {
        close(comm(&s, Method::FedSb, r, 5, None, 0), want, M, 0.01, &format!("Fed-SB r{r}"));
    }
    // FedEx-LoRA / FLoRA: c × FedIT, the paper within 0.01 %.
    for m in [Method::FedExLora, Method::FLora] {
        let got = comm(&s, m, 32, 5, None, 0) as f64 / M;
        assert!((got / 243.15 - 1.0).abs() < 1e-4, "{m:?}: {got}");
    }
}

#[test]
fn mistral_and_gemma_arithmetic_table() {
    let mistral = shape("mistral-7b-v0.1");
    assert_eq!(comm(&mistral, Method::FedIt, 32, 25, None, 0), 83_886_080);
    for (r, want) in [(120, 3.22), (160, 5.73), (200, 8.96)] {
        close(comm(&mistral, Method::FedSb, r, 25, None, 0), want, M, 0.01, &format!("Mistral Fed-SB r{r}"));
    }
    let gemma = shape("gemma-2-9b");
    // Gemma-2's head_dim (256) is not hidden/heads (224): q is 4096 wide, k and v 2048.
    assert_eq!(comm(&gemma, Method::FedIt, 32, 25, None, 0), 108_036_096);
    close(comm(&gemma, Method::FedIt, 32, 25, None, 0), 108.04, M, 0.01, "Gemma FedIT r32");
    for (r, want) in [(120, 4.23), (160, 7.53), (200, 11.76)] {
        close(comm(&gemma, Method::FedSb, r, 25, None, 0), want, M, 0.01, &format!("Gemma Fed-SB r{r}"));
    }
    for (s, want) in [(&mistral, 2097.34), (&gemma, 2701.12)] {
        let got = comm(s, Method::FedExLora, 32, 25, None, 0) as f64 / M;
        assert!((got / want - 1.0).abs() < 1e-4, "FedEx-LoRA: {got} vs {want}");
    }
    // FFA-LoRA: the paper prints half of FedIT (41.94 M); the exact B-only count differs for non-square
    // matrices: Σ d·r = 32 layers × 32 × (4096 + 1024 + 1024 + 4096 + 14336 + 14336 + 4096) = 44,040,192
    // (method.md §4: "the true B-only count for Mistral r=32 is 44.04 M").
    let ffa = comm(&mistral, Method::FfaLora, 32, 25, None, 0);
    assert_eq!(ffa, 32 * 32 * (4096 + 1024 + 1024 + 4096 + 14336 + 14336 + 4096));
    close(ffa, 44.04, M, 0.01, "Mistral FFA-LoRA exact");
    assert_ne!(ffa, 83_886_080 / 2);
}

#[test]
fn bert_base_snli_tables_with_head() {
    let s = shape("bert-base-uncased");
    let qv: &[&str] = &["query", "value"];
    // SNLI: 3 classes, head 768·3 + 3 = 2,307 values, counted once.
    close(comm(&s, Method::FedIt, 32, 3, Some(qv), 3), 1181.96, K, 0.01, "BERT FedIT r32");
    close(comm(&s, Method::FfaLora, 32, 3, Some(qv), 3), 592.13, K, 0.01, "BERT FFA-LoRA r32 (square q, v: exact)");
    assert_eq!(comm(&s, Method::FedSb, 64, 3, Some(qv), 3), 100_611);
    for (r, want) in [(32, 26.88), (48, 57.59), (64, 100.61)] {
        // 57.603 K for r = 48 against the paper's 57.59: within the 0.01 M, a rounding in the paper.
        close(comm(&s, Method::FedSb, r, 3, Some(qv), 3), want, K, 0.02, &format!("BERT Fed-SB r{r}"));
    }
    let fedex = comm(&s, Method::FedExLora, 32, 3, Some(qv), 3) as f64 / K;
    assert!((fedex / 3541.26 - 1.0).abs() < 1e-4, "BERT FedEx-LoRA: {fedex}");
}
