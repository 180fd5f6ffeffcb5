#![allow(clippy::excessive_precision)] // reference values are copied verbatim from transformers
//! Numerics of the real pretrained models against independent implementations:
//! candle-transformers' `bert` and `quantized_llama` (same weights, run here), and reference values
//! computed once with Hugging Face transformers (`../shared/bench/torchref/reference.py`).
use candle_core::{DType, Device, IndexOp, Tensor};
use fedsb_common::model::{ChatMessage, LoadOptions, Model, load_model};
use fedsb_tests::{assets, rel_max_diff, tempdir};

/// Reference values from transformers 5.24 (`reference.py`): MiniLM input ids, first 8 mean-pooled values
/// and the L2 norm of the mean-pooled embedding.
const MINILM_REF: &[(&str, &[u32], [f32; 8], f32)] = &[
    (
        "A man is eating food.",
        &[101, 1037, 2158, 2003, 5983, 2833, 1012, 102],
        [0.18723910, 0.02481768, -0.03535609, 0.27250180, -0.78126508, -0.18935589, 0.56962341, -0.30633300],
        5.6326776,
    ),
    (
        "A man is eating a piece of bread.",
        &[101, 1037, 2158, 2003, 5983, 1037, 3538, 1997, 7852, 1012, 102],
        [0.27293394, 0.28708467, -0.05814427, -0.02985884, -0.66109127, -0.11564088, 0.39953220, 0.06852245],
        5.1969209,
    ),
    (
        "The stock market fell sharply today.",
        &[101, 1996, 4518, 3006, 3062, 9249, 2651, 1012, 102],
        [0.35565314, 0.03203394, 0.45043135, 0.31667551, -0.08702645, -0.03586427, -0.17282525, 0.31600377],
        5.8829384,
    ),
];

/// SmolLM2 reference: token ids of the HF tokenizer and mean per-token NLL of HF LlamaForCausalLM on the
/// dequantized, un-permuted weights.
const SMOL_REF: &[(&str, &[u32], f64)] = &[
    (
        "The capital of France is Paris. It is known for the Eiffel Tower, which was built in 1889.",
        &[
            504, 3575, 282, 4649, 314, 7042, 30, 657, 314, 1343, 327, 260, 414, 46682, 18669, 28, 527, 436, 2837, 281,
            216, 33, 40, 40, 41, 30,
        ],
        1.436416,
    ),
    (
        "This movie was absolutely wonderful. The acting was superb and the story kept me engaged from start to finish.",
        &[
            1348, 7704, 436, 10556, 8264, 30, 378, 8947, 436, 33398, 284, 260, 1977, 5454, 549, 6934, 429, 1120, 288,
            9199, 30,
        ],
        3.146217,
    ),
];
const SANITY_TEXT: &str = "To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer The slings and arrows of outrageous fortune, Or to take arms against a sea of troubles";
const SANITY_NLL: f64 = 3.701553;

/// These tests compare with references to f32 precision: products with compact (quantized) weights run in f32
/// here whatever the CPU's bf16 units (`tests/compact_weights.rs` covers bf16 products).
fn exact_f32_products() {
    fedsb_common::frozen::set_compute_dtype(fedsb_common::frozen::ComputeDtype::F32).unwrap();
}

fn mean_nll(model: &Model, ids: &[u32]) -> f64 {
    let Model::CausalLm(lm) = model else { panic!("causal LM expected") };
    let x = Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let labels: Vec<i64> = ids.iter().skip(1).map(|&t| t as i64).chain([-100]).collect();
    let (loss, n) = lm.lm_loss(&x, None, &[labels]).unwrap();
    assert_eq!(n, ids.len() - 1);
    loss.to_scalar::<f32>().unwrap() as f64
}

#[test]
fn minilm_matches_transformers_and_candle_bert() {
    let Some(a) = assets() else { return };
    exact_f32_products();
    let dev = Device::Cpu;
    let loaded = load_model(&a.minilm(), &dev, &LoadOptions::default()).unwrap();
    let Model::Classifier(clf) = &loaded.model else { panic!("BERT should load as a classifier") };
    // Independent implementation on the same weights: candle-transformers' bert.
    let cfg: candle_transformers::models::bert::Config =
        serde_json::from_str(&std::fs::read_to_string(a.minilm().join("config.json")).unwrap()).unwrap();
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(&[a.minilm().join("model.safetensors")], DType::F32, &dev)
            .unwrap()
    };
    let reference = candle_transformers::models::bert::BertModel::load(vb, &cfg).unwrap();
    // One padded batch of all sentences: padding must not change the real tokens' outputs.
    let encoded: Vec<Vec<u32>> = MINILM_REF.iter().map(|(s, ..)| loaded.tokenizer.encode(s, true).unwrap()).collect();
    let t = encoded.iter().map(Vec::len).max().unwrap();
    let mut ids = vec![0u32; encoded.len() * t];
    let mut mask = vec![0u32; encoded.len() * t];
    for (i, e) in encoded.iter().enumerate() {
        ids[i * t..i * t + e.len()].copy_from_slice(e);
        mask[i * t..i * t + e.len()].fill(1);
    }
    let ids = Tensor::from_vec(ids, (encoded.len(), t), &dev).unwrap();
    let mask = Tensor::from_vec(mask, (encoded.len(), t), &dev).unwrap();
    let types = ids.zeros_like().unwrap();
    let ours = clf.encoder.forward(&ids, Some(&types), Some(&mask)).unwrap();
    let theirs = reference.forward(&ids, &types, Some(&mask)).unwrap();
    let mut pooled = Vec::new();
    for (i, (sentence, ref_ids, first8, norm)) in MINILM_REF.iter().enumerate() {
        assert_eq!(&encoded[i], ref_ids, "tokenization of {sentence:?}");
        let n = ref_ids.len();
        let o = ours.i(i).unwrap().narrow(0, 0, n).unwrap();
        let r = theirs.i(i).unwrap().narrow(0, 0, n).unwrap();
        let d = rel_max_diff(&o, &r);
        assert!(d < 1e-4, "hidden states differ from candle-transformers' bert by {d} (relative) for {sentence:?}");
        let e = o.mean(0).unwrap();
        let v: Vec<f32> = e.to_vec1().unwrap();
        for (k, (x, y)) in v.iter().zip(first8).enumerate() {
            assert!((x - y).abs() < 1e-4, "pooled[{k}] = {x}, transformers says {y} ({sentence:?})");
        }
        let l2 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((l2 - norm).abs() < 1e-3 * norm, "norm {l2} vs {norm}");
        pooled.push(e);
    }
    // The sentence-similarity check from the model card: related sentences are close, unrelated ones not.
    let cos = |a: &Tensor, b: &Tensor| -> f32 {
        let d = (a * b).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        let n = |x: &Tensor| x.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
        d / (n(a) * n(b))
    };
    assert!((cos(&pooled[0], &pooled[1]) - 0.755337).abs() < 1e-3);
    assert!((cos(&pooled[0], &pooled[2]) - 0.003728).abs() < 1e-3);
}

#[test]
fn smollm2_gguf_matches_quantized_llama_and_transformers() {
    let Some(a) = assets() else { return };
    exact_f32_products();
    let dev = Device::Cpu;
    let loaded = load_model(&a.smollm_gguf(), &dev, &LoadOptions::default()).unwrap();
    for (text, ref_ids, ref_nll) in SMOL_REF {
        let ids = loaded.tokenizer.encode(text, false).unwrap();
        assert_eq!(&ids, ref_ids, "GGUF tokenizer vs the Hugging Face tokenizer on {text:?}");
        let nll = mean_nll(&loaded.model, &ids);
        assert!((nll - ref_nll).abs() < 2e-3, "mean NLL {nll} vs transformers' {ref_nll} on {text:?}");
    }
    // Plain English: about 3-4 nats (about 5.3 when the RoPE layout is wrong).
    let ids = loaded.tokenizer.encode(SANITY_TEXT, false).unwrap();
    let nll = mean_nll(&loaded.model, &ids);
    assert!((3.0..4.0).contains(&nll), "NLL on plain English is {nll}");
    assert!((nll - SANITY_NLL).abs() < 2e-3, "NLL {nll} vs transformers' {SANITY_NLL}");

    // Independent implementation on the same file: candle-transformers' quantized_llama (interleaved RoPE on
    // the permuted weights), with every tensor dequantized to f32. Fed one token at a time with its KV cache,
    // so every position's logits are compared.
    // SAFETY: set before any thread reads it; this test binary reads it only here.
    unsafe { std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1") };
    let mut f = std::fs::File::open(a.smollm_gguf()).unwrap();
    let ct = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let mut reference =
        candle_transformers::models::quantized_llama::ModelWeights::from_gguf(ct, &mut f, &dev).unwrap();
    let ids = &SMOL_REF[0].1;
    let Model::CausalLm(lm) = &loaded.model else { panic!() };
    let ours = lm.forward(&Tensor::new(*ids, &dev).unwrap().unsqueeze(0).unwrap(), None).unwrap().i(0).unwrap();
    let mut worst = 0f32;
    for (p, &tok) in ids.iter().enumerate() {
        let theirs =
            reference.forward(&Tensor::new(&[tok], &dev).unwrap().unsqueeze(0).unwrap(), p).unwrap().i(0).unwrap();
        worst = worst.max(rel_max_diff(&ours.i(p).unwrap(), &theirs));
    }
    assert!(worst < 1e-4, "logits differ from quantized_llama by {worst} (relative)");
}

#[test]
fn smollm2_chat_template_and_gguf_to_hf_roundtrip() {
    let Some(a) = assets() else { return };
    exact_f32_products();
    let dev = Device::Cpu;
    let loaded = load_model(&a.smollm_gguf(), &dev, &LoadOptions::default()).unwrap();
    let msgs = [ChatMessage { role: "user".into(), content: "What is 2+2?".into() }];
    let text = loaded.tokenizer.apply_chat_template(&msgs, true).unwrap().unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = loaded.tokenizer.encode("<|im_start|>user", false).unwrap();
    assert_eq!(ids[0], 1, "control tokens are single special tokens");
    // GGUF -> Hugging Face folder (config.json, safetensors, tokenizer.json) -> the same logits.
    let dir = tempdir();
    fedsb_common::export::export_merged(&loaded.model, &loaded.tokenizer, &loaded.arch, dir.path()).unwrap();
    let hf = load_model(dir.path(), &dev, &LoadOptions::default()).unwrap();
    let ids = SMOL_REF[1].1;
    assert_eq!(hf.tokenizer.encode(SMOL_REF[1].0, false).unwrap(), ids);
    let x = Tensor::new(ids, &dev).unwrap().unsqueeze(0).unwrap();
    let (Model::CausalLm(m1), Model::CausalLm(m2)) = (&loaded.model, &hf.model) else { panic!() };
    let d = rel_max_diff(&m2.forward(&x, None).unwrap(), &m1.forward(&x, None).unwrap());
    assert!(d < 1e-6, "HF-folder reload differs by {d}");
    assert_eq!(hf.tokenizer.apply_chat_template(&msgs, true).unwrap().unwrap(), text);
}
