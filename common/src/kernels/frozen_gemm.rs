//! Matrix products with a frozen weight `W` (`n × k`) in any [`WeightFormat`], a tile at a time: the forward
//! `x·(W + ΔW)ᵀ` and the input gradient `dy·(W + ΔW)`, with an optional rank-r update `ΔW = B·(R·A)` merged
//! into each tile (the merged LoRA-SB path). A compact weight is never expanded whole: each thread dequantizes
//! one tile (≤ [`TILE_BYTES`]) into its own scratch, adds the update, and multiplies it.
//!
//! The engine that multiplies a tile ([`Engine`]):
//! - f32 weights: the kernels' GEMM on the weight itself (no tiles);
//! - compact weights, [`ComputeDtype::F32`] or a CPU without bf16 units: f32 tiles on the kernels' GEMM;
//! - compact weights with bf16 units: bf16 GEMMs with f32 accumulation (inputs rounded to bf16, as PyTorch's
//!   autocast does) — on AMX through MKL's `cblas_gemm_bf16bf16f32`, on AVX-512 BF16 through
//!   [`crate::bf16_gemm`]. bf16 weights go to the bf16 engines without an f32 round trip.
//!
//! Work is split over rayon's threads by disjoint output blocks: column panels of the output for the forward
//! (rows of `W`), column chunks of the input gradient for the backward (columns of `W`, whole blocks of a
//! quantized format), so no two threads write one element and no reduction is needed.
use rayon::prelude::*;

use super::*;
use crate::frozen::{ComputeDtype, FrozenWeight, WeightData};

/// Scratch per thread for one dequantized tile.
const TILE_BYTES: usize = 1 << 20;

/// How a product with a compact weight is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Engine {
    /// f32 tiles on the kernels' GEMM (MKL or faer).
    F32,
    /// bf16 tiles on [`crate::bf16_gemm`] (AVX-512 BF16).
    Bf16Avx512,
    /// bf16 tiles on MKL's `cblas_gemm_bf16bf16f32` (AMX).
    Bf16Mkl,
}

impl Engine {
    /// The name the benches print.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Engine::F32 => "f32 tiles",
            Engine::Bf16Avx512 => "bf16 (AVX-512 BF16)",
            Engine::Bf16Mkl => "bf16 (MKL, AMX)",
        }
    }
}

/// Whether MKL's bf16 GEMM can run on AMX here (the CPU has AMX bf16, MKL is loaded and has the function).
pub fn amx_bf16_available() -> bool {
    crate::mkl::cpu_has_amx_bf16() && crate::mkl::load().as_ref().is_ok_and(|m| m.has_gemm_bf16())
}

#[cfg(test)]
thread_local! {
    /// Tests: force an engine for compact weights on this thread.
    static FORCE: std::cell::Cell<Option<Engine>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with compact weights multiplied on `engine` (tests: every engine on any CPU that can run it).
#[cfg(test)]
pub(crate) fn with_engine<R>(engine: Engine, f: impl FnOnce() -> R) -> R {
    let prev = FORCE.with(|c| c.replace(Some(engine)));
    let r = f();
    FORCE.with(|c| c.set(prev));
    r
}

/// The engine for compact weights under the process's [`ComputeDtype`] on this CPU.
pub(crate) fn engine() -> Engine {
    #[cfg(test)]
    if let Some(e) = FORCE.with(|c| c.get()) {
        return e;
    }
    // fedsb's AVX-512 BF16 kernel: where asked for bf16 and it runs, or by default where it beats f32.
    let own_kernel = match crate::frozen::compute_dtype() {
        ComputeDtype::F32 => return Engine::F32,
        ComputeDtype::Auto => crate::bf16_gemm::beats_f32(),
        ComputeDtype::Bf16 => crate::bf16_gemm::available(),
    };
    if amx_bf16_available() {
        Engine::Bf16Mkl
    } else if own_kernel {
        Engine::Bf16Avx512
    } else {
        Engine::F32
    }
}

/// A rank-r update merged into every tile: `ΔW = B·RA`, `b` `n × r` and `ra` `r × k`, row-major (the
/// scale already applied to one of them).
#[derive(Clone, Copy)]
pub(crate) struct LowRank<'a> {
    pub b: &'a [f32],
    pub ra: &'a [f32],
    pub r: usize,
}

/// Rows `r0..r1`, columns `c0..c1` of `W` into `dst` (row stride `ld`) as f32, plus the merged update.
fn fill_tile(
    data: &WeightData<'_>,
    k: usize,
    (r0, r1): (usize, usize),
    (c0, c1): (usize, usize),
    dst: &mut [f32],
    ld: usize,
    merge: Option<&LowRank<'_>>,
) {
    use half::slice::HalfFloatSliceExt;
    let _p = crate::profile::span("dequantize");
    let w = c1 - c0;
    match data {
        WeightData::F32(v) => {
            for (i, r) in (r0..r1).enumerate() {
                dst[i * ld..i * ld + w].copy_from_slice(&v[r * k + c0..r * k + c1]);
            }
        }
        WeightData::Bf16(v) => {
            let bits: &[u16] = v.reinterpret_cast();
            for (i, r) in (r0..r1).enumerate() {
                crate::bf16_gemm::bf16_to_f32_slice(&bits[r * k + c0..r * k + c1], &mut dst[i * ld..i * ld + w]);
            }
        }
        WeightData::F16(v) => {
            for (i, r) in (r0..r1).enumerate() {
                v[r * k + c0..r * k + c1].convert_to_f32_slice(&mut dst[i * ld..i * ld + w]);
            }
        }
        WeightData::Quant(q) => q.dequantize_tile((r0, r1), (c0, c1), dst, ld),
    }
    if let Some(m) = merge {
        // SAFETY: B rows r0..r1 (r1−r0 × r), RA columns c0..c1 (r × w, row stride k), dst (r1−r0 × w, ld).
        unsafe {
            gemm_into(dst, ld, (r1 - r0, w, m.r), true, &m.b[r0 * m.r..], (m.r, 1), &m.ra[c0..], (k, 1), 1);
        }
    }
}

/// The bf16 bit patterns of a bf16 weight (for the bf16 engines without an f32 round trip).
fn bf16_bits<'a>(data: &WeightData<'a>) -> Option<&'a [u16]> {
    use half::slice::HalfFloatSliceExt;
    match data {
        WeightData::Bf16(v) => Some(v.reinterpret_cast()),
        _ => None,
    }
}

/// The granularity of column chunks: whole blocks of a quantized format (and of 16 otherwise, so bf16
/// packing stays aligned).
fn column_unit(data: &WeightData<'_>) -> usize {
    match data {
        WeightData::Quant(q) => q.kind().block_size().max(16),
        _ => 16,
    }
}

/// Rounds `x` up to a multiple of `unit`, at least `unit`.
fn round_up(x: usize, unit: usize) -> usize {
    x.div_ceil(unit).max(1) * unit
}

/// `out (rows × n) = [out +] x (rows × k) · (W + ΔW)ᵀ`.
pub(crate) fn forward(
    w: &FrozenWeight,
    x: &[f32],
    rows: usize,
    out: &mut [f32],
    accumulate: bool,
    merge: Option<&LowRank<'_>>,
) -> candle_core::Result<()> {
    let (n, k) = w.dims();
    if x.len() != rows * k || out.len() != rows * n {
        candle_core::bail!("frozen product: x [{rows}, {}], W [{n}, {k}], out {}", x.len() / rows.max(1), out.len());
    }
    let threads = candle_core::utils::get_num_threads();
    let r = w.with_data(|data| {
        if let (WeightData::F32(wv), None) = (&data, merge) {
            // SAFETY: x is rows×k, Wᵀ is W (n×k) read with swapped strides, out is rows×n.
            unsafe { gemm_into(out, n, (rows, n, k), accumulate, x, (k, 1), wv, (1, k), threads) };
            return;
        }
        let engine = if matches!(data, WeightData::F32(_)) { Engine::F32 } else { engine() };
        // Panels of W's rows: small enough for the scratch, at least two per thread for balance.
        let by_mem = (TILE_BYTES / 4 / k.max(1)).max(16);
        let nb = round_up(by_mem.min(n.div_ceil(2 * threads)), 16).min(round_up(n, 16));
        let panels = n.div_ceil(nb);
        let dst = SendPtr(out.as_mut_ptr());
        let xb = (engine != Engine::F32).then(|| to_bf16(x));
        (0..panels).into_par_iter().for_each_init(<(Vec<f32>, Vec<u16>)>::default, |(tile, tb), p| {
            let (n0, n1) = (p * nb, ((p + 1) * nb).min(n));
            let h = n1 - n0;
            // SAFETY (all): the output block is columns n0..n1 of out (rows × n), this panel's alone.
            let out_block = SendPtr(unsafe { dst.get().add(n0) });
            match (engine, bf16_bits(&data), merge) {
                (Engine::Bf16Avx512, Some(bits), None) => {
                    let packed = crate::bf16_gemm::PackedB::from_bf16_transposed(&bits[n0 * k..], h, k, k);
                    let xb = xb.as_deref().unwrap_or_default();
                    unsafe { crate::bf16_gemm::gemm_ptr(rows, xb, k, &packed, out_block.get(), n, accumulate) };
                }
                (Engine::Bf16Mkl, Some(bits), None) => unsafe {
                    mkl_bf16(rows, h, k, xb.as_deref().unwrap_or_default(), &bits[n0 * k..], out_block, n, accumulate)
                },
                _ => {
                    tile.resize(h * k, 0.0);
                    fill_tile(&data, k, (n0, n1), (0, k), tile, k, merge);
                    match engine {
                        Engine::F32 => unsafe {
                            gemm_ptr(out_block, n, (rows, h, k), accumulate, x, (k, 1), tile, (1, k), 1)
                        },
                        Engine::Bf16Avx512 => {
                            let packed = crate::bf16_gemm::PackedB::from_f32_transposed(tile, h, k, k);
                            let xb = xb.as_deref().unwrap_or_default();
                            unsafe { crate::bf16_gemm::gemm_ptr(rows, xb, k, &packed, out_block.get(), n, accumulate) };
                        }
                        Engine::Bf16Mkl => {
                            tb.resize(tile.len(), 0);
                            crate::bf16_gemm::f32_to_bf16(tile, tb);
                            unsafe {
                                mkl_bf16(rows, h, k, xb.as_deref().unwrap_or_default(), tb, out_block, n, accumulate)
                            }
                        }
                    }
                }
            }
            crate::simd::clear_upper_simd_state();
        });
    });
    r.map_err(|e| candle_core::Error::Msg(e.to_string()))
}

/// `dx (rows × k) = [dx +] dy (rows × n) · (W + ΔW)`.
pub(crate) fn backward_input(
    w: &FrozenWeight,
    dy: &[f32],
    rows: usize,
    dx: &mut [f32],
    accumulate: bool,
    merge: Option<&LowRank<'_>>,
) -> candle_core::Result<()> {
    let (n, k) = w.dims();
    if dy.len() != rows * n || dx.len() != rows * k {
        candle_core::bail!("frozen input gradient: dy {}, W [{n}, {k}], dx {} for {rows} rows", dy.len(), dx.len());
    }
    let threads = candle_core::utils::get_num_threads();
    let r = w.with_data(|data| {
        if let (WeightData::F32(wv), None) = (&data, merge) {
            // SAFETY: dy is rows×n and W is n×k, both row-major; dx is rows×k.
            unsafe { gemm_into(dx, k, (rows, k, n), accumulate, dy, (n, 1), wv, (k, 1), threads) };
            return;
        }
        let engine = if matches!(data, WeightData::F32(_)) { Engine::F32 } else { engine() };
        // Column chunks of W (of dx), whole blocks; at least two per thread where k allows.
        let unit = column_unit(&data);
        let kb = round_up(k.div_ceil(2 * threads).min(2048), unit).min(round_up(k, unit));
        let chunks = k.div_ceil(kb);
        let nb = round_up((TILE_BYTES / 4 / kb).max(16), 16).min(round_up(n, 16));
        let dst = SendPtr(dx.as_mut_ptr());
        let dyb = (engine != Engine::F32).then(|| to_bf16(dy));
        (0..chunks).into_par_iter().for_each_init(<(Vec<f32>, Vec<u16>)>::default, |(tile, tb), c| {
            let (k0, k1) = (c * kb, ((c + 1) * kb).min(k));
            let wdt = k1 - k0;
            // SAFETY (all): the output block is columns k0..k1 of dx (rows × k), this chunk's alone.
            let dx_block = SendPtr(unsafe { dst.get().add(k0) });
            for (i, n0) in (0..n).step_by(nb).enumerate() {
                let n1 = (n0 + nb).min(n);
                let h = n1 - n0;
                let acc = accumulate || i > 0;
                match (engine, bf16_bits(&data), merge) {
                    (Engine::Bf16Avx512, Some(bits), None) => {
                        let packed = crate::bf16_gemm::PackedB::from_bf16(&bits[n0 * k + k0..], h, wdt, k);
                        let a = &dyb.as_deref().unwrap_or_default()[n0..];
                        unsafe { crate::bf16_gemm::gemm_ptr(rows, a, n, &packed, dx_block.get(), k, acc) };
                    }
                    (Engine::Bf16Mkl, Some(bits), None) => {
                        // W's rows n0..n1, columns k0..k1 read in place (row stride k): no f32 round trip.
                        let a = &dyb.as_deref().unwrap_or_default()[n0..];
                        unsafe { mkl_bf16_nn(rows, wdt, h, a, n, &bits[n0 * k + k0..], k, dx_block, k, acc) };
                    }
                    _ => {
                        tile.resize(h * wdt, 0.0);
                        fill_tile(&data, k, (n0, n1), (k0, k1), tile, wdt, merge);
                        match engine {
                            Engine::F32 => unsafe {
                                gemm_ptr(dx_block, k, (rows, wdt, h), acc, &dy[n0..], (n, 1), tile, (wdt, 1), 1)
                            },
                            Engine::Bf16Avx512 => {
                                let packed = crate::bf16_gemm::PackedB::from_f32(tile, h, wdt, wdt);
                                let a = &dyb.as_deref().unwrap_or_default()[n0..];
                                unsafe { crate::bf16_gemm::gemm_ptr(rows, a, n, &packed, dx_block.get(), k, acc) };
                            }
                            Engine::Bf16Mkl => {
                                tb.resize(tile.len(), 0);
                                crate::bf16_gemm::f32_to_bf16(tile, tb);
                                let a = &dyb.as_deref().unwrap_or_default()[n0..];
                                unsafe { mkl_bf16_nn(rows, wdt, h, a, n, tb, wdt, dx_block, k, acc) };
                            }
                        }
                    }
                }
            }
            crate::simd::clear_upper_simd_state();
        });
    });
    r.map_err(|e| candle_core::Error::Msg(e.to_string()))
}

/// bf16 bit patterns of `x` (round to nearest even).
pub(crate) fn to_bf16(x: &[f32]) -> Vec<u16> {
    let mut out = vec![0u16; x.len()];
    out.par_chunks_mut(1 << 16).zip(x.par_chunks(1 << 16)).for_each(|(o, x)| crate::bf16_gemm::f32_to_bf16(x, o));
    out
}

/// `c (m × n, ldc) = [c +] a (m × k, bf16) · tᵀ` with `t` `n × k` bf16 rows, on MKL.
///
/// # Safety
/// `c` addresses an m × n block (row stride ldc) that only this call writes; `a` holds m × k, `t` n × k.
#[allow(clippy::too_many_arguments)]
unsafe fn mkl_bf16(m: usize, n: usize, k: usize, a: &[u16], t: &[u16], c: SendPtr, ldc: usize, accumulate: bool) {
    if let Ok(mkl) = crate::mkl::load() {
        let beta = if accumulate { 1.0 } else { 0.0 };
        // SAFETY: as documented above.
        unsafe { mkl.gemm_bf16_rm(m, n, k, 1.0, a.as_ptr(), (k, false), t.as_ptr(), (k, true), beta, c.get(), ldc) };
    }
}

/// `c (m × n, ldc) = [c +] a (m × k, bf16, lda) · t` with `t` `k × n` bf16 (row stride ldt), on MKL.
///
/// # Safety
/// As [`mkl_bf16`].
#[allow(clippy::too_many_arguments)]
unsafe fn mkl_bf16_nn(
    m: usize,
    n: usize,
    k: usize,
    a: &[u16],
    lda: usize,
    t: &[u16],
    ldt: usize,
    c: SendPtr,
    ldc: usize,
    accumulate: bool,
) {
    if let Ok(mkl) = crate::mkl::load() {
        let beta = if accumulate { 1.0 } else { 0.0 };
        // SAFETY: as documented above.
        unsafe {
            mkl.gemm_bf16_rm(m, n, k, 1.0, a.as_ptr(), (lda, false), t.as_ptr(), (ldt, false), beta, c.get(), ldc)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{matmul_f64, rand_vec, round_bf16};
    use super::*;
    use crate::frozen::{QuantKind, WeightFormat};
    use candle_core::{Device, Tensor};

    /// `a (m×k) · (bt ? bᵀ where b is n×k : b k×n)` in f64, rounded to f32.
    fn reference(a: &[f32], mk: (usize, usize), b: &[f32], n: usize, bt: bool) -> Vec<f32> {
        matmul_f64(a, mk, b, n, bt).into_iter().map(|v| v as f32).collect()
    }

    /// Every format and engine against an f64 product of the dequantized weight (and, for bf16 engines, of
    /// bf16-rounded inputs), with and without a merged rank-r update, accumulating or not, at odd sizes.
    #[test]
    fn products_match_the_dequantized_weight_in_every_format_and_engine() {
        let dev = Device::Cpu;
        let (mut engines, mut untested) = (vec![Engine::F32], vec![]);
        if crate::bf16_gemm::available() {
            engines.push(Engine::Bf16Avx512);
        } else {
            let why = "AVX-512 BF16 (this CPU lacks it)";
            crate::testing::fail_if_required("FEDSB_REQUIRE_AVX512BF16", why);
            untested.push(why.to_string());
        }
        match crate::testing::mkl_or_why(true) {
            Ok(_) => engines.push(Engine::Bf16Mkl),
            Err(why) => untested.push(format!("MKL bf16 ({why})")),
        }
        if !untested.is_empty() {
            crate::testing::skipped(&format!("frozen-product engines NOT tested: {}", untested.join("; ")));
        }
        for (rows, n, k) in [(5usize, 70usize, 256usize), (33, 17, 512), (1, 40, 768)] {
            let w0 = Tensor::from_vec(rand_vec(n * k, 1), (n, k), &dev).unwrap();
            let x = rand_vec(rows * k, 2);
            let dy = rand_vec(rows * n, 3);
            let r = 3;
            let b = rand_vec(n * r, 4);
            let ra = rand_vec(r * k, 5);
            for fmt in [
                WeightFormat::F32,
                WeightFormat::Bf16,
                WeightFormat::F16,
                WeightFormat::Quant(QuantKind::Q8_0),
                WeightFormat::Quant(QuantKind::Q4_0),
                WeightFormat::Quant(QuantKind::Q4K),
                WeightFormat::Quant(QuantKind::Q6K),
            ] {
                let w = FrozenWeight::dense("w", w0.clone()).unwrap().convert("w", fmt).unwrap();
                let wd: Vec<f32> = w.to_f32(&dev).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                for &engine in &engines {
                    for merged in [false, true] {
                        let m = LowRank { b: &b, ra: &ra, r };
                        let merge = merged.then_some(&m);
                        let mut weff = wd.clone();
                        if merged {
                            for i in 0..n {
                                for p in 0..k {
                                    weff[i * k + p] += (0..r).map(|t| b[i * r + t] * ra[t * k + p]).sum::<f32>();
                                }
                            }
                        }
                        let bf = engine != Engine::F32 && fmt != WeightFormat::F32;
                        let (xe, dye, we) = if bf {
                            (round_bf16(&x), round_bf16(&dy), round_bf16(&weff))
                        } else {
                            (x.clone(), dy.clone(), weff.clone())
                        };
                        let want_y = reference(&xe, (rows, k), &we, n, true);
                        let want_dx = reference(&dye, (rows, n), &we, k, false);
                        let mut y = vec![1f32; rows * n];
                        let mut dx = vec![1f32; rows * k];
                        with_engine(engine, || {
                            forward(&w, &x, rows, &mut y, true, merge).unwrap();
                            backward_input(&w, &dy, rows, &mut dx, false, merge).unwrap();
                        });
                        let tol = if bf { 2e-2 } else { 1e-3 };
                        let what = format!("{fmt} {} merged={merged} {rows}×{n}×{k}", engine.name());
                        for (got, want) in y.iter().zip(&want_y) {
                            assert!((got - 1.0 - want).abs() < tol * (1.0 + want.abs()), "{what}: y {got} vs {want}+1");
                        }
                        for (got, want) in dx.iter().zip(&want_dx) {
                            assert!((got - want).abs() < tol * (1.0 + want.abs()), "{what}: dx {got} vs {want}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn mismatched_sizes_are_errors() {
        let w = FrozenWeight::dense("w", Tensor::zeros((4, 32), candle_core::DType::F32, &Device::Cpu).unwrap())
            .unwrap()
            .convert("w", WeightFormat::Bf16)
            .unwrap();
        assert!(forward(&w, &[0.0; 31], 1, &mut [0.0; 4], false, None).is_err());
        assert!(backward_input(&w, &[0.0; 4], 1, &mut [0.0; 31], false, None).is_err());
    }
}
