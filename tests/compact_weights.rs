//! Compact frozen weights on the real models: checkpoints written from the real weights in every format the
//! loaders read (bf16/f16 safetensors; GGUF in f16, bf16 and the block formats) load without widening to f32,
//! and give the same forward as an f32 copy of the same values (exactly with f32 products, to bf16's precision
//! with bf16 products). `--dtype` conversions from the real checkpoints, and the refusals.
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use fedsb_common::frozen::{ComputeDtype, WeightDtype, with_compute_dtype};
use fedsb_common::model::{LoadOptions, LoadedModel, Model, load_model};
use fedsb_tests::{assets, rel_max_diff, rewrite_gguf, rewrite_hf_folder, tempdir};

fn load(path: &std::path::Path, dtype: &str) -> LoadedModel {
    let dtype: WeightDtype = dtype.parse().unwrap();
    load_model(path, &Device::Cpu, &LoadOptions { dtype, ..LoadOptions::default() }).unwrap()
}

fn formats(m: &Model) -> Vec<String> {
    m.weight_bytes().by_format.keys().cloned().collect()
}

/// MiniLM's mean-pooled hidden states of a few sentences.
fn pooled(l: &LoadedModel) -> Tensor {
    let Model::Classifier(c) = &l.model else { panic!("MiniLM loads as a classifier") };
    let texts = ["A man is eating food.", "The stock market fell sharply today.", "what a dull, silly film"];
    let rows: Vec<Tensor> = texts
        .iter()
        .map(|t| {
            let ids = l.tokenizer.encode(t, true).unwrap();
            let x = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
            c.encoder.forward(&x, None, None).unwrap().mean(1).unwrap()
        })
        .collect();
    Tensor::cat(&rows, 0).unwrap()
}

/// Smallest cosine similarity between matching rows.
fn min_cosine(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b) = (a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
    a.iter()
        .zip(&b)
        .map(|(x, y)| {
            let dot: f32 = x.iter().zip(y).map(|(p, q)| p * q).sum();
            let n = |v: &[f32]| v.iter().map(|p| p * p).sum::<f32>().sqrt();
            dot / (n(x) * n(y))
        })
        .fold(1.0, f32::min)
}

fn mean_nll(l: &LoadedModel, text: &str) -> f64 {
    let Model::CausalLm(lm) = &l.model else { panic!("causal LM expected") };
    let ids = l.tokenizer.encode(text, false).unwrap();
    let x = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let labels: Vec<i64> = ids.iter().skip(1).map(|&t| t as i64).chain([-100]).collect();
    lm.lm_loss(&x, None, &[labels]).unwrap().0.to_scalar::<f32>().unwrap() as f64
}

const TEXT: &str = "The capital of France is Paris. It is known for the Eiffel Tower, which was built in 1889. \
                    Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.";

#[test]
fn minilm_bf16_and_f16_checkpoints_stay_compact_and_match_their_f32_copy() {
    let Some(a) = assets() else { return };
    let f32_model = load(&a.minilm(), "auto");
    let f32_bytes = f32_model.model.weight_bytes().total;
    let reference = with_compute_dtype(ComputeDtype::F32, || pooled(&f32_model));
    for (dtype, name) in [(DType::BF16, "bf16"), (DType::F16, "f16")] {
        let dir = tempdir();
        rewrite_hf_folder(&a.minilm(), dir.path(), dtype).unwrap();
        let compact = load(dir.path(), "auto");
        assert_eq!(formats(&compact.model), vec![name.to_string()], "a {name} checkpoint stays {name}");
        assert_eq!(compact.model.weight_bytes().total * 2, f32_bytes);
        // The same values widened to f32 on load: identical products in f32.
        let widened = load(dir.path(), "f32");
        assert_eq!(formats(&widened.model), vec!["f32".to_string()]);
        let (c, w) = with_compute_dtype(ComputeDtype::F32, || (pooled(&compact), pooled(&widened)));
        let d = rel_max_diff(&c, &w);
        assert!(d < 1e-5, "{name} weights with f32 products differ from their f32 copy by {d}");
        // bf16 products (where the CPU has bf16 units; else these are f32 too): bf16's precision.
        let auto = with_compute_dtype(ComputeDtype::Auto, || pooled(&compact));
        let cos = min_cosine(&auto, &w);
        assert!(cos > 0.999, "{name} with {} products: cosine {cos}", fedsb_common::kernels::compact_engine_name());
        // And against the original f32 checkpoint: only the weights' rounding.
        let cos = min_cosine(&c, &reference);
        assert!(cos > 0.999, "{name} checkpoint vs the f32 original: cosine {cos}");
    }
}

#[test]
fn smollm2_gguf_in_every_format_stays_compact_and_matches_its_f32_copy() {
    let Some(a) = assets() else { return };
    let original = load(&a.smollm_gguf(), "auto");
    assert_eq!(formats(&original.model), vec!["q4_1".to_string(), "q8_0".to_string()], "Q4_1 + Q8_0 embeddings");
    let nll_original = with_compute_dtype(ComputeDtype::F32, || mean_nll(&original, TEXT));
    // Matrices in the format where their rows split into its blocks, else Q8_0 (as llama.cpp's quantizer falls
    // back); vectors (norms) F32. Bound: how far the NLL may move from the Q4_1 original's.
    let cases: &[(&str, GgmlDType, f64)] = &[
        ("f16", GgmlDType::F16, 0.01),
        ("bf16", GgmlDType::BF16, 0.01),
        ("q8_0", GgmlDType::Q8_0, 0.03),
        ("q4_0", GgmlDType::Q4_0, 0.5),
        ("q5_0", GgmlDType::Q5_0, 0.2),
        ("q5_1", GgmlDType::Q5_1, 0.2),
        ("q4_k", GgmlDType::Q4K, 0.5),
        ("q5_k", GgmlDType::Q5K, 0.2),
        ("q6_k", GgmlDType::Q6K, 0.1),
    ];
    for &(name, ty, bound) in cases {
        let dir = tempdir();
        let file = dir.path().join(format!("smollm2-{name}.gguf"));
        rewrite_gguf(&a.smollm_gguf(), &file, |_, dims| match dims {
            [_, cols] if cols % ty.block_size() == 0 => ty,
            [_, _] => GgmlDType::Q8_0,
            _ => GgmlDType::F32,
        })
        .unwrap();
        let compact = load(&file, "auto");
        let fm = formats(&compact.model);
        assert!(fm.contains(&name.to_string()), "{name}: the weights load as {fm:?}");
        assert!(!fm.contains(&"f32".to_string()), "{name}: nothing is widened to f32 ({fm:?})");
        let widened = load(&file, "f32");
        let (nc, nw) = with_compute_dtype(ComputeDtype::F32, || (mean_nll(&compact, TEXT), mean_nll(&widened, TEXT)));
        assert!((nc - nw).abs() < 1e-4, "{name}: NLL {nc} vs {nw} of its f32 copy");
        let na = with_compute_dtype(ComputeDtype::Auto, || mean_nll(&compact, TEXT));
        assert!((na - nc).abs() / nc < 0.01, "{name}: NLL with bf16 products {na} vs f32 products {nc}");
        assert!((nc - nll_original).abs() < bound, "{name}: NLL {nc} vs the original's {nll_original}");
        eprintln!("SmolLM2 as {name} ({fm:?}): NLL {nc:.4} (f32 products), {na:.4} (auto), original {nll_original:.4}");
    }
}

#[test]
fn dtype_conversions_of_the_real_checkpoints_and_what_is_refused() {
    let Some(a) = assets() else { return };
    let f32_model = load(&a.minilm(), "auto");
    let reference = with_compute_dtype(ComputeDtype::F32, || pooled(&f32_model));
    for (dtype, min_cos) in [("bf16", 0.999), ("q8_0", 0.995), ("q4_0", 0.95)] {
        let m = load(&a.minilm(), dtype);
        assert_eq!(formats(&m.model), vec![dtype.to_string()]);
        let cos = with_compute_dtype(ComputeDtype::F32, || min_cosine(&pooled(&m), &reference));
        assert!(cos > min_cos, "MiniLM --dtype {dtype}: cosine {cos} to f32");
    }
    // 384-wide rows are not whole Q4_K blocks (256): refused by tensor name, not silently kept in f32.
    let opts = LoadOptions { dtype: "q4_k".parse().unwrap(), ..LoadOptions::default() };
    let e = load_model(&a.minilm(), &Device::Cpu, &opts).unwrap_err().to_string();
    assert!(e.contains("q4_k") && e.contains("weight"), "{e}");
    // SmolLM2 (Q4_1 and Q8_0 blocks): to bf16 and f32 by dequantizing; to another block format refused.
    let b = load(&a.smollm_gguf(), "bf16");
    assert_eq!(formats(&b.model), vec!["bf16".to_string()]);
    let opts = LoadOptions { dtype: "q4_0".parse().unwrap(), ..LoadOptions::default() };
    let e = load_model(&a.smollm_gguf(), &Device::Cpu, &opts).unwrap_err().to_string();
    assert!(e.contains("q4_0") && e.contains("second time") && e.contains("auto"), "{e}");
    assert!("q3_0".parse::<WeightDtype>().unwrap_err().to_string().contains("q8_0"));
    // A GGUF architecture that is not supported is refused by name with the supported list.
    let dir = tempdir();
    let file = dir.path().join("gpt2.gguf");
    {
        use candle_core::quantized::{QTensor, gguf_file};
        let x = Tensor::zeros((2, 32), DType::F32, &Device::Cpu).unwrap();
        let q = QTensor::quantize(&x, GgmlDType::F32).unwrap();
        let arch = gguf_file::Value::String("gpt2".into());
        let mut out = std::fs::File::create(&file).unwrap();
        gguf_file::write(&mut out, &[("general.architecture", &arch)], &[("token_embd.weight", &q)]).unwrap();
    }
    let e = load_model(&file, &Device::Cpu, &LoadOptions::default()).unwrap_err().to_string();
    assert!(e.contains("gpt2") && e.contains("llama") && e.contains("qwen2"), "{e}");
}
