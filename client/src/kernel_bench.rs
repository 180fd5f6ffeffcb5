//! `fedsb-client bench --kernels`: each fused kernel of `fedsb_common::kernels` alone, forward and
//! forward + backward, against the composite candle ops it replaces (the same `ops` call with the kernels
//! switched off), at the shapes the bench models use.
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use fedsb_common::benchstats::median;
use fedsb_common::frozen::FrozenWeight;
use fedsb_common::{kernels, ops};
use serde_json::json;

/// The op of a [`Case`], applied to its input variables.
type CaseOp = Box<dyn Fn(&[Var]) -> fedsb_common::Result<Tensor>>;

/// One kernel case: a name, the shape it runs at, and the op applied to the input variables.
struct Case {
    name: &'static str,
    shape: String,
    inputs: Vec<Var>,
    run: CaseOp,
}

fn randn(dims: &[usize], seed: u64, std: f32) -> Result<Tensor> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| (rng.random::<f32>() * 2.0 - 1.0) * std).collect();
    Ok(Tensor::from_vec(v, dims, &Device::Cpu)?)
}

fn vars(list: &[(&[usize], u64)]) -> Result<Vec<Var>> {
    list.iter().map(|(d, s)| Ok(Var::from_tensor(&randn(d, *s, 1.0)?)?)).collect()
}

fn cases() -> Result<Vec<Case>> {
    let mut out = Vec::new();
    // MiniLM: 32 × 64 tokens, hidden 384, FFN 1536, 12 heads of 32; r = 16.
    let (rows, h, ffn) = (2048usize, 384usize, 1536usize);
    let w_up = FrozenWeight::dense("w", randn(&[ffn, h], 1, 0.05)?)?;
    let b_up = randn(&[ffn], 2, 0.05)?;
    for fmt in ["f32", "bf16", "q8_0", "q4_0"] {
        let w = w_up.convert("w", fmt.parse()?)?;
        let b = b_up.clone();
        out.push(Case {
            name: match fmt {
                "f32" => "frozen linear + bias (MiniLM FFN up)",
                "bf16" => "frozen linear + bias, bf16 weight",
                "q8_0" => "frozen linear + bias, q8_0 weight",
                _ => "frozen linear + bias, q4_0 weight",
            },
            shape: format!("[{rows}, {h}] · [{ffn}, {h}]ᵀ"),
            inputs: vars(&[(&[rows, h], 3)])?,
            run: Box::new(move |v| ops::linear(v[0].as_tensor(), &w, Some(&b))),
        });
    }
    let (w0, b0) = (FrozenWeight::dense("w0", randn(&[h, h], 4, 0.05)?)?, randn(&[h], 5, 0.05)?);
    let (a, b) = (randn(&[16, h], 6, 0.05)?, randn(&[h, 16], 7, 0.05)?);
    out.push(Case {
        name: "LoRA-SB linear (MiniLM query, r 16)",
        shape: format!("[{rows}, {h}] → [{rows}, {h}]"),
        inputs: vec![Var::from_tensor(&randn(&[rows, h], 8, 1.0)?)?, Var::from_tensor(&randn(&[16, 16], 9, 0.1)?)?],
        run: Box::new(move |v| {
            let (x, r) = (v[0].as_tensor(), v[1].as_tensor());
            if kernels::applies(x) {
                return Ok(kernels::lora_sb_linear(x, &w0, Some(&b0), &a, &b, r, 1.0)?);
            }
            // The composite AdaptedLinear uses without the kernel.
            let base = ops::linear(x, &w0, Some(&b0))?;
            let side = ops::frozen_matmul(&ops::frozen_matmul(x, &a)?.matmul(&r.t()?)?, &b)?;
            Ok((base + side)?)
        }),
    });
    out.push(Case {
        name: "GELU erf (MiniLM FFN)",
        shape: format!("[{rows}, {ffn}]"),
        inputs: vars(&[(&[rows, ffn], 10)])?,
        run: Box::new(|v| ops::gelu_erf(v[0].as_tensor())),
    });
    let (lw, lb) = (randn(&[h], 11, 1.0)?, randn(&[h], 12, 1.0)?);
    out.push(Case {
        name: "layer norm (MiniLM)",
        shape: format!("[{rows}, {h}]"),
        inputs: vars(&[(&[rows, h], 13)])?,
        run: Box::new(move |v| ops::layer_norm(v[0].as_tensor(), &lw, &lb, 1e-12)),
    });
    out.push(Case {
        name: "softmax (MiniLM attention scores)",
        shape: "[32, 12, 64, 64]".into(),
        inputs: vars(&[(&[32, 12, 64, 64], 14)])?,
        run: Box::new(|v| ops::softmax_last_dim(v[0].as_tensor())),
    });
    let key_mask = {
        let mut m = vec![1u32; 32 * 64];
        for (i, row) in m.chunks_mut(64).enumerate() {
            row[20 + i..].iter_mut().for_each(|x| *x = 0);
        }
        Tensor::from_vec(m, (32, 64), &Device::Cpu)?
    };
    let mask = ops::attention_mask(Some(&key_mask), 32, 64, 64, false, 0, &Device::Cpu)?;
    out.push(Case {
        name: "attention, padding mask (MiniLM, [b, t, h, d])",
        shape: "q, k, v [32, 64, 12, 32]".into(),
        inputs: vars(&[(&[32, 64, 12, 32], 15), (&[32, 64, 12, 32], 16), (&[32, 64, 12, 32], 17)])?,
        run: Box::new(move |v| {
            ops::attention_seq_major(
                v[0].as_tensor(),
                v[1].as_tensor(),
                v[2].as_tensor(),
                mask.as_ref(),
                32f64.powf(-0.5),
            )
        }),
    });
    // SmolLM2-135M: 4 × 128 tokens, hidden 576, MLP 1536, 9 heads (3 kv) of 64.
    let srows = 512usize;
    let rw = randn(&[576], 18, 1.0)?;
    out.push(Case {
        name: "RMSNorm (SmolLM2)",
        shape: format!("[{srows}, 576]"),
        inputs: vars(&[(&[srows, 576], 19)])?,
        run: Box::new(move |v| ops::rms_norm(v[0].as_tensor(), &rw, 1e-5)),
    });
    out.push(Case {
        name: "SiLU · gate (SmolLM2 MLP)",
        shape: format!("[{srows}, 1536] × 2"),
        inputs: vars(&[(&[srows, 1536], 20), (&[srows, 1536], 21)])?,
        run: Box::new(|v| ops::silu_mul(v[0].as_tensor(), v[1].as_tensor())),
    });
    // The LoRA-SB layers of SmolLM2's bf16 bench step: MLP up (576 → 1536) and down (1536 → 576), r = 32.
    for (name, k, n) in [
        ("LoRA-SB linear, bf16 weight (SmolLM2 MLP up, r 32)", 576usize, 1536usize),
        ("LoRA-SB linear, bf16 weight (SmolLM2 MLP down)", 1536, 576),
    ] {
        let w0 = FrozenWeight::dense("w0", randn(&[n, k], 30, 0.05)?)?.convert("w0", "bf16".parse()?)?;
        let (a, b) = (randn(&[32, k], 31, 0.05)?, randn(&[n, 32], 32, 0.05)?);
        out.push(Case {
            name,
            shape: format!("[{srows}, {k}] → [{srows}, {n}]"),
            inputs: vec![
                Var::from_tensor(&randn(&[srows, k], 33, 1.0)?)?,
                Var::from_tensor(&randn(&[32, 32], 34, 0.1)?)?,
            ],
            run: Box::new(move |v| {
                let (x, r) = (v[0].as_tensor(), v[1].as_tensor());
                if kernels::applies(x) {
                    return Ok(kernels::lora_sb_linear(x, &w0, None, &a, &b, r, 2.0)?);
                }
                let side = ops::frozen_matmul(&ops::frozen_matmul(x, &a)?.matmul(&r.t()?)?, &b)?;
                Ok((ops::linear(x, &w0, None)? + (side * 2.0)?)?)
            }),
        });
    }
    let (cos, sin) = {
        let (mut c, mut s) = (Vec::new(), Vec::new());
        for p in 0..128 {
            for i in 0..32 {
                let th = p as f32 / 10000f32.powf(i as f32 / 32.0);
                c.push(th.cos());
                s.push(th.sin());
            }
        }
        (Tensor::from_vec(c, (128, 32), &Device::Cpu)?, Tensor::from_vec(s, (128, 32), &Device::Cpu)?)
    };
    out.push(Case {
        name: "RoPE (SmolLM2 queries)",
        shape: "[4, 9, 128, 64]".into(),
        inputs: vars(&[(&[4, 9, 128, 64], 22)])?,
        run: Box::new(move |v| ops::rope(v[0].as_tensor(), &cos, &sin)),
    });
    let causal = ops::attention_mask(None, 4, 128, 128, true, 0, &Device::Cpu)?;
    out.push(Case {
        name: "attention, causal, GQA 9/3 (SmolLM2)",
        shape: "q [4, 9, 128, 64], k, v [4, 3, 128, 64]".into(),
        inputs: vars(&[(&[4, 9, 128, 64], 23), (&[4, 3, 128, 64], 24), (&[4, 3, 128, 64], 25)])?,
        run: Box::new(move |v| {
            ops::attention(v[0].as_tensor(), v[1].as_tensor(), v[2].as_tensor(), causal.as_ref(), 0.125)
        }),
    });
    let targets = {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(26);
        let t: Vec<u32> = (0..srows).map(|_| rng.random_range(0..49152u32)).collect();
        Tensor::from_vec(t, srows, &Device::Cpu)?
    };
    out.push(Case {
        name: "token cross-entropy (SmolLM2 vocab)",
        shape: format!("[{srows}, 49152]"),
        inputs: vars(&[(&[srows, 49152], 27)])?,
        run: Box::new(move |v| fedsb_common::model::llama::token_nll(v[0].as_tensor(), &targets)),
    });
    Ok(out)
}

/// Median seconds of `f` over `iters` runs after one warm-up run.
fn time(iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut t = Vec::with_capacity(iters);
    for _ in 0..iters {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64());
    }
    Ok(median(&mut t))
}

fn measure(c: &Case, iters: usize) -> Result<(f64, f64)> {
    let fwd = time(iters, || {
        let y = (c.run)(&c.inputs)?;
        drop(y);
        Ok(())
    })?;
    let both = time(iters, || {
        let y = (c.run)(&c.inputs)?;
        let g = y.sum_all()?.backward()?;
        for v in &c.inputs {
            if g.get(v.as_tensor()).is_none() {
                anyhow::bail!("{}: no gradient reached an input", c.name);
            }
        }
        Ok(())
    })?;
    Ok((fwd, both))
}

/// Runs every case with and without the kernels and prints the medians (ms) and speed-ups.
pub fn run(json: bool, iters: usize) -> Result<()> {
    if !kernels::enabled() {
        anyhow::bail!("FEDSB_KERNELS=off: the kernels cannot be compared with themselves");
    }
    let threads = candle_core::utils::get_num_threads();
    if !json {
        println!("kernel vs. the composite candle ops it replaces (median of {iters}, {threads} threads; ms)");
        println!(
            "  {:<48} {:<40} {:>9} {:>9} {:>7} {:>9} {:>9} {:>7}",
            "kernel", "shape", "fwd", "composite", "×", "fwd+bwd", "composite", "×"
        );
    }
    for c in cases()? {
        debug_assert!(c.inputs.iter().all(|v| v.dtype() == DType::F32));
        let (kf, kb) = measure(&c, iters)?;
        let (cf, cb) = kernels::without(|| measure(&c, iters))?;
        if json {
            println!(
                "{}",
                json!({"what": "kernel", "kernel": c.name, "shape": c.shape, "iters": iters, "threads": threads, "gemm": fedsb_common::mkl::backend().name(),
                       "kernel_fwd_ms": kf * 1e3, "composite_fwd_ms": cf * 1e3,
                       "kernel_fwd_bwd_ms": kb * 1e3, "composite_fwd_bwd_ms": cb * 1e3,
                       "speedup_fwd": cf / kf, "speedup_fwd_bwd": cb / kb})
            );
        } else {
            println!(
                "  {:<48} {:<40} {:>9.2} {:>9.2} {:>6.1}× {:>9.2} {:>9.2} {:>6.1}×",
                c.name,
                c.shape,
                kf * 1e3,
                cf * 1e3,
                cf / kf,
                kb * 1e3,
                cb * 1e3,
                cb / kb
            );
        }
    }
    Ok(())
}
