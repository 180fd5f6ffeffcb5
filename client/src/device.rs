//! Choosing the compute device from `--device`.
use anyhow::{Result, bail};
use candle_core::Device;

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
