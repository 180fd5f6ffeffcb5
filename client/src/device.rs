//! Choosing the compute device (`--device`) and how the frozen weights are held and multiplied (`--dtype`,
//! `--compute-dtype`).
use anyhow::{Context, Result, bail};
use candle_core::Device;
use fedsb_common::frozen::{ComputeDtype, WeightDtype};

/// How the frozen base weights are held and multiplied.
#[derive(clap::Args, Debug, Clone)]
pub struct WeightArgs {
    /// Format of the frozen base weights: `auto` (as the checkpoint stores them: f32, bf16, f16, or GGUF
    /// blocks), or converted to f32, bf16, f16 or a GGUF block format (q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k,
    /// q4_k, q5_k, q6_k). Adapters, norms, the head and optimizer state are always f32.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// What the products with bf16/f16/quantized weights compute in: `auto` (bf16 inputs with f32
    /// accumulation where the CPU has bf16 units faster than its f32 ones — AMX through MKL, or AVX-512 BF16
    /// on AMD — else f32), `f32`, or `bf16` (on any bf16 units).
    #[arg(long, default_value = "auto", env = "FEDSB_COMPUTE_DTYPE")]
    pub compute_dtype: String,
    /// Recompute each transformer block in the backward instead of keeping its activations: `auto` (on for
    /// causal LMs of 0.5 B+ linear parameters), `on`, `off`. About a third more work per step; one block's
    /// activations in memory instead of every block's.
    #[arg(long, default_value = "auto")]
    pub recompute: String,
}

impl WeightArgs {
    /// Applies `--recompute` to `model`; returns whether it recomputes.
    pub fn apply_recompute(&self, model: &mut fedsb_common::model::Model) -> Result<bool> {
        let on = match self.recompute.as_str() {
            "auto" => model.recompute_by_default(),
            "on" => true,
            "off" => false,
            other => bail!("--recompute `{other}` is not one of auto, on, off"),
        };
        let done = model.set_recompute(on);
        if on && !done {
            tracing::warn!("--recompute: only causal LMs recompute their blocks; this model keeps its activations");
        }
        if done {
            tracing::info!("recomputing each block in the backward (--recompute {})", self.recompute);
        }
        Ok(done)
    }

    /// Sets the process's compute dtype and returns the weight format to load with.
    pub fn apply(&self) -> Result<WeightDtype> {
        let c: ComputeDtype = self.compute_dtype.parse()?;
        fedsb_common::frozen::set_compute_dtype(c)?;
        self.dtype.parse::<WeightDtype>().context("--dtype")
    }
}

/// Parses `cpu`, `cuda` or `cuda:N`. CUDA needs a build with `--features cuda`.
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal: usize = match s.strip_prefix("cuda:") {
                Some(n) => n.parse().map_err(|_| anyhow::anyhow!("bad CUDA device `{s}` (expected cuda:N)"))?,
                None => 0,
            };
            if !candle_core::utils::cuda_is_available() {
                bail!("this fedsb-client was built without CUDA support; rebuild with `--features cuda` (needs nvcc)");
            }
            Ok(Device::new_cuda(ordinal)?)
        }
        other => bail!("unknown device `{other}` (cpu, cuda or cuda:N)"),
    }
}
