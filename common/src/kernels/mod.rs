//! Fused CPU kernels with their own backward, as candle custom ops, one concept per file:
//! - `elementwise`: exact (erf) GELU, SwiGLU's `silu(gate) · up`;
//! - `softmax`: softmax over the last dimension, cross-entropy per row (`token_nll`);
//! - `norm`: layer norm, RMSNorm;
//! - `rope`: rotary position embedding (rotate-half layout);
//! - `attention`: scaled dot-product attention, parallel over the batch, keeping its probabilities;
//! - `gemm`: the kernels' GEMM (`gemm_into`: MKL's sgemm where loaded, else faer);
//! - `linear`: frozen linear layers (`x·wᵀ + b`, the LM head) with their input gradient;
//! - `frozen_gemm`: products with a frozen weight in any format (f32, bf16, f16, GGUF blocks), a tile at a
//!   time, on f32 tiles or bf16 units (MKL's AMX GEMM, fedsb's AVX-512 BF16 kernel);
//! - `lora_sb`: the LoRA-SB layer in one op, on the merged weight or the adapter path; `lora_sb_bf16` the
//!   same beside a bf16 W0 on AMX, each direction in one parallel pass over row blocks;
//! - `lm_head`: the LM head and the next-token cross-entropy in one op, without the whole logits.
//!
//! Stock candle builds these from several elementwise ops, each allocating and walking its whole output, and
//! differentiates them through the composite graph (GELU-erf alone: 12.8 ms per (32, 64, 1536) forward here
//! against 0.74 ms in PyTorch; see `../shared/docs/candle-cpu-perf.md`). Each kernel here is one pass over the
//! data (rows or chunks in parallel with rayon), and its backward is one more pass.
//!
//! The kernels run on contiguous f32 CPU tensors; [`crate::ops`] calls them there and falls back to the
//! differentiable composite ops on other devices and dtypes. Norm weights and biases are frozen in fedsb (only
//! adapters and the head train), so the norm kernels give the input gradient only. Every kernel is tested
//! against the composite it replaces, values and gradients (each file's tests give the tolerances).
use candle_core::{CpuStorage, DType, Layout, Tensor};
use rayon::prelude::*;

/// Elements per parallel chunk of the elementwise kernels.
const CHUNK: usize = 16 * 1024;

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else { candle_core::bail!("{what}: f32 only") };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{what}: input must be contiguous"),
    }
}

/// A buffer of `n` f32 for the caller to overwrite: every caller writes all `n` elements before any is read
/// (GEMM outputs with `accumulate = false`, elementwise maps, row kernels that write each element). It skips
/// the memset of `vec![0.0; n]` (6.9% of a MiniLM step in `perf`); candle's CPU backend does the same for its
/// op outputs.
///
/// `clippy::uninit_vec` is allowed here on purpose: the elements are only ever written (by GEMMs through raw
/// pointers, or by `*o = ...` through the slice) before being read, which is the pattern candle's own CPU
/// backend uses for its outputs; the tests compare every kernel's outputs against the composite ops.
#[allow(clippy::uninit_vec)]
fn buffer_for_overwrite(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: the capacity is n; f32 has no invalid bit patterns and every caller writes each element before
    // reading it (see above).
    unsafe { v.set_len(n) };
    v
}

/// `f` applied elementwise to one input, in parallel chunks (8 wide with AVX2, see [`crate::simd`]).
fn map1(x: &[f32], f: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
    let mut out = buffer_for_overwrite(x.len());
    out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(o, x)| crate::simd::apply1(o, x, &f));
    out
}

/// `f` applied elementwise to two inputs of one length, in parallel chunks.
fn map2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    let mut out = buffer_for_overwrite(a.len());
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(o, (a, b))| crate::simd::apply2(o, a, b, &f));
    out
}

/// `f` applied elementwise to three inputs of one length, in parallel chunks.
fn map3(a: &[f32], b: &[f32], c: &[f32], f: impl Fn(f32, f32, f32) -> f32 + Sync) -> Vec<f32> {
    let mut out = buffer_for_overwrite(a.len());
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK).zip(c.par_chunks(CHUNK))))
        .for_each(|(o, (a, (b, c)))| crate::simd::apply3(o, a, b, c, &f));
    out
}

mod attention;
mod elementwise;
pub(crate) mod frozen_gemm;
mod gemm;
mod linear;
mod lm_head;
mod lora_sb;
mod lora_sb_bf16;
mod norm;
mod rope;
mod softmax;

pub use attention::{attention, attention_seq_major};
pub use elementwise::{gelu_erf, silu_mul};
pub use frozen_gemm::amx_bf16_available;

/// How products with compact (bf16, f16, quantized) frozen weights run under the current settings: `f32 tiles`,
/// `bf16 (AVX-512 BF16)` or `bf16 (MKL, AMX)` (for the benches' reports).
pub fn compact_engine_name() -> &'static str {
    frozen_gemm::engine().name()
}
pub use linear::{WeightGradSink, frozen_linear, frozen_linear_tracking, frozen_matmul};
pub use lm_head::lm_head_nll;
pub use lora_sb::lora_sb_linear;
pub use norm::{layer_norm, rms_norm};
pub use rope::rope;
pub use softmax::{softmax_last_dim, token_nll};

use gemm::*;

/// A raw output pointer that may cross to rayon's threads (each piece writes a disjoint block).
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: only used for disjoint blocks of one output, while the borrow it came from is held.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so that closures capture the whole `Send` wrapper, not its field).
    fn get(self) -> *mut f32 {
        self.0
    }
}

thread_local! {
    static OFF_HERE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The contiguous f32 data of a CPU storage.
fn storage_f32<'a>(s: &'a candle_core::Storage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    match s {
        candle_core::Storage::Cpu(c) => f32_slice(c, l, what),
        _ => candle_core::bail!("{what}: CPU tensors only"),
    }
}

/// Whether the fused kernels apply: f32 on the CPU, not switched off by `FEDSB_KERNELS=off` (every op then uses
/// candle's composite ops: for comparisons and as an escape hatch), nor on this thread by [`without`].
pub fn applies(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32 && enabled() && !OFF_HERE.with(|o| o.get())
}

/// Runs `f` with the kernels off on this thread (the composite ops instead): to compare the two.
pub fn without<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            OFF_HERE.with(|o| o.set(self.0));
        }
    }
    let _restore = Restore(OFF_HERE.with(|o| o.replace(true)));
    f()
}

thread_local! {
    static NO_GRAD_HERE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` as inference on this thread: kernels that would compute an input gradient ahead of the backward
/// (the fused LM head) skip it, since no backward follows (evaluation, generation).
pub fn inference<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            NO_GRAD_HERE.with(|o| o.set(self.0));
        }
    }
    let _restore = Restore(NO_GRAD_HERE.with(|o| o.replace(true)));
    f()
}

/// Whether this thread runs inside [`inference`].
pub fn in_inference() -> bool {
    NO_GRAD_HERE.with(|o| o.get())
}

/// Whether the kernels are on for this thread (not off by `FEDSB_KERNELS=off` nor by [`without`]).
pub fn active_here() -> bool {
    enabled() && !OFF_HERE.with(|o| o.get())
}

/// Whether the kernels are on (`FEDSB_KERNELS` is not `off`), read once.
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("FEDSB_KERNELS").map_or(true, |v| v != "off"))
}

/// Helpers shared by the kernels' tests.
#[cfg(test)]
mod test_util {
    use candle_core::{Device, Var};
    use rand::{Rng, SeedableRng};

    use super::*;

    pub(super) fn randn(shape: &[usize], seed: u64, scale: f32) -> Tensor {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// `n` uniform values in [-1, 1), seeded.
    pub(super) fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// Each value rounded to bf16 and back.
    pub(super) fn round_bf16(v: &[f32]) -> Vec<f32> {
        v.iter().map(|x| half::bf16::from_f32(*x).to_f32()).collect()
    }

    /// `a (m×k) · b` in f64, `b` given `k×n`, or `n×k` (read transposed) with `b_t`.
    pub(super) fn matmul_f64(a: &[f32], (m, k): (usize, usize), b: &[f32], n: usize, b_t: bool) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                for p in 0..k {
                    let bv = if b_t { b[j * k + p] } else { b[p * n + j] };
                    c[i * n + j] += a[i * k + p] as f64 * bv as f64;
                }
            }
        }
        c
    }

    pub(super) fn maxdiff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// Values and input gradients of `fused` and `composite` on `x`, with a random upstream gradient.
    pub(super) fn compare(
        x: &Tensor,
        fused: &dyn Fn(&Tensor) -> Tensor,
        composite: &dyn Fn(&Tensor) -> Tensor,
        tol: f32,
        what: &str,
    ) {
        let v = Var::from_tensor(x).unwrap();
        let (yf, yc) = (fused(v.as_tensor()), composite(v.as_tensor()));
        assert!(maxdiff(&yf, &yc) <= tol, "{what}: values differ by {}", maxdiff(&yf, &yc));
        let up = randn(yf.dims(), 99, 1.0);
        let gf = (yf * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (yc * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let (gf, gc) = (gf.get(v.as_tensor()).unwrap(), gc.get(v.as_tensor()).unwrap());
        let d = maxdiff(gf, gc);
        assert!(d <= tol * 10.0, "{what}: gradients differ by {d}");
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::*;
    use super::*;
    use candle_core::{Device, Var};

    /// A few training steps of a tiny BERT classifier and a tiny Llama with LoRA-SB, with the kernels and with
    /// the composite ops: the same losses and the same trained tensors, to float tolerance.
    #[test]
    fn training_with_and_without_the_kernels_gives_the_same_result() {
        use crate::adapter::{AdapterConfig, AdapterKind};
        use crate::model::config::{BertConfig, LlamaConfig};
        use crate::model::{BertClassifier, BertModel, LlamaModel, Model};
        use crate::tensors::TensorSet;
        use crate::train::data::{Batch, Encoded, Target};
        use crate::train::{LrSchedule, ScheduleKind, Trainer};
        let dev = Device::Cpu;
        for classifier in [true, false] {
            let make = || {
                let mut m = if classifier {
                    Model::Classifier(
                        BertClassifier::new(BertModel::random(&BertConfig::tiny(), 2, &dev).unwrap(), 2, 3).unwrap(),
                    )
                } else {
                    Model::CausalLm(LlamaModel::random(&LlamaConfig::tiny(), 2, &dev).unwrap())
                };
                let targets: &[&str] =
                    if classifier { &["query", "value", "output.dense"] } else { &["q", "v", "down"] };
                let cfg = AdapterConfig::new(AdapterKind::LoraSb, 4, targets);
                let mut init = TensorSet::new();
                for (i, l) in m.targeted(&cfg).unwrap().iter().enumerate() {
                    let (o, d) = l.dims();
                    init.insert(format!("{}.lora_A.weight", l.name()), randn(&[4, d], 20 + i as u64, 0.3));
                    init.insert(format!("{}.lora_B.weight", l.name()), randn(&[o, 4], 40 + i as u64, 0.3));
                    init.insert(format!("{}.lora_R.weight", l.name()), randn(&[4, 4], 60 + i as u64, 0.5));
                }
                m.attach_adapters(&cfg, Some(&init)).unwrap();
                m
            };
            let data: Vec<Encoded> = (0..6)
                .map(|i| {
                    let ids: Vec<u32> = (0..5 + i % 3).map(|j| ((i * 7 + j * 3) % 40 + 1) as u32).collect();
                    let target = if classifier {
                        Target::Class((i % 2) as u32)
                    } else {
                        Target::NextTokens(ids.iter().skip(1).map(|&x| x as i64).chain([-100]).collect())
                    };
                    Encoded { type_ids: vec![0; ids.len()], ids, target }
                })
                .collect();
            let batch = Batch::collate(&data.iter().collect::<Vec<_>>(), 0, &dev).unwrap();
            let run = |m: &Model| -> Vec<f64> {
                let mut t =
                    Trainer::new(m, LrSchedule::new(1e-2, 0.0, 4, ScheduleKind::Constant), 0.0, Some(1.0)).unwrap();
                (0..4).map(|_| t.step(std::slice::from_ref(&batch)).unwrap().loss).collect()
            };
            let (fast, slow) = (make(), make());
            let lf = run(&fast);
            let ls = without(|| run(&slow));
            for (a, b) in lf.iter().zip(&ls) {
                assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "classifier={classifier}: losses {lf:?} vs {ls:?}");
            }
            let (tf, ts) = (fast.trainable_tensors().unwrap(), slow.trainable_tensors().unwrap());
            for (name, t) in tf.iter() {
                let d = maxdiff(t, ts.require(name).unwrap());
                assert!(d < 1e-4, "classifier={classifier}: {name} differs by {d}");
            }
        }
    }

    #[test]
    fn silu_gate_and_rope_match_candle() {
        let g = randn(&[3, 5, 17], 40, 4.0);
        let u = randn(&[3, 5, 17], 41, 2.0);
        // Gradients of both inputs.
        let (gv, uv) = (Var::from_tensor(&g).unwrap(), Var::from_tensor(&u).unwrap());
        let yf = silu_mul(gv.as_tensor(), uv.as_tensor()).unwrap();
        let yc = (gv.as_tensor().silu().unwrap() * uv.as_tensor()).unwrap();
        assert!(maxdiff(&yf, &yc) < 1e-5);
        let up = randn(yf.dims(), 42, 1.0);
        let gf = (yf * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (yc * &up).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&gv, &uv] {
            assert!(maxdiff(gf.get(v.as_tensor()).unwrap(), gc.get(v.as_tensor()).unwrap()) < 1e-4);
        }
        assert!(silu_mul(&g, &randn(&[3, 5, 16], 1, 1.0)).is_err());
        // RoPE with position tables as the Llama model makes them, batch of one and of three.
        for (b, h, t, d) in [(1usize, 1usize, 1usize, 2usize), (3, 4, 7, 16)] {
            let pos: Vec<f32> =
                (0..t * d / 2).map(|i| (i / (d / 2)) as f32 * 0.3 + (i % (d / 2)) as f32 * 0.01).collect();
            let f = Tensor::from_vec(pos, (t, d / 2), &Device::Cpu).unwrap();
            let (cos, sin) = (f.cos().unwrap(), f.sin().unwrap());
            let x = randn(&[b, h, t, d], 43, 1.0);
            compare(
                &x,
                &|v| rope(v, &cos, &sin).unwrap(),
                &|v| candle_nn::rotary_emb::rope_slow(&v.contiguous().unwrap(), &cos, &sin).unwrap(),
                1e-5,
                "rope",
            );
        }
        let x = randn(&[1, 2, 3, 5], 44, 1.0);
        let t = Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap();
        assert!(rope(&x, &t, &t).is_err(), "odd head dimension");
    }

    #[test]
    fn bad_inputs_are_errors() {
        let x = Tensor::zeros((2, 3), DType::F64, &Device::Cpu).unwrap();
        assert!(gelu_erf(&x).is_err());
        let x = randn(&[2, 6], 1, 1.0);
        assert!(layer_norm(&x, &randn(&[4], 1, 1.0), &randn(&[4], 1, 1.0), 1e-5).is_err());
        assert!(rms_norm(&x, &randn(&[4], 1, 1.0), 1e-5).is_err());
    }
}
