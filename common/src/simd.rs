//! SIMD for the CPU kernels: run-time dispatch to AVX2 + FMA code, a branch-free `exp` that vectorizes, and
//! the upper-register cleanup that faer's GEMM needs on Intel cores.
//!
//! Rust compiles for the `x86-64` baseline (SSE2, 4 floats) unless told otherwise, and a binary must still run
//! on any x86-64. The elementwise maps here ([`apply1`], [`apply2`], [`apply3`]) and the kernels' hot row loops
//! (through [`has_avx2`]) have a second copy compiled with AVX2 and FMA (8 floats), chosen at run time. Such a
//! copy is a `#[target_feature]` function whose body is an `#[inline(always)]` function: LLVM then always
//! builds the loop inside the AVX2 function (a closure merely *called* from one is not reliably inlined).
//! `f32::exp` is a libm call per element, which no loop around it can vectorize: [`exp_f32`] is a polynomial
//! with no branches and no calls. The results are the same bits either way: Rust never contracts `a * b + c`
//! into an FMA, and vectorizing an elementwise loop reorders no arithmetic.

/// Whether this CPU has AVX2 and FMA (read once; `false` off x86-64).
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

#[inline(always)]
fn apply1_loop<F: Fn(f32) -> f32>(o: &mut [f32], a: &[f32], f: &F) {
    for (o, &x) in o.iter_mut().zip(a) {
        *o = f(x);
    }
}

#[inline(always)]
fn apply2_loop<F: Fn(f32, f32) -> f32>(o: &mut [f32], a: &[f32], b: &[f32], f: &F) {
    for ((o, &x), &y) in o.iter_mut().zip(a).zip(b) {
        *o = f(x, y);
    }
}

#[inline(always)]
fn apply3_loop<F: Fn(f32, f32, f32) -> f32>(o: &mut [f32], a: &[f32], b: &[f32], c: &[f32], f: &F) {
    for (((o, &x), &y), &z) in o.iter_mut().zip(a).zip(b).zip(c) {
        *o = f(x, y, z);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn apply1_avx2<F: Fn(f32) -> f32>(o: &mut [f32], a: &[f32], f: &F) {
    apply1_loop(o, a, f)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn apply2_avx2<F: Fn(f32, f32) -> f32>(o: &mut [f32], a: &[f32], b: &[f32], f: &F) {
    apply2_loop(o, a, b, f)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn apply3_avx2<F: Fn(f32, f32, f32) -> f32>(o: &mut [f32], a: &[f32], b: &[f32], c: &[f32], f: &F) {
    apply3_loop(o, a, b, c, f)
}

/// `oᵢ = f(aᵢ)` over the common length, 8 wide where the CPU has AVX2 (write `f` from `#[inline(always)]`
/// helpers such as [`exp_f32`] so it vectorizes).
pub fn apply1<F: Fn(f32) -> f32>(o: &mut [f32], a: &[f32], f: &F) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { apply1_avx2(o, a, f) };
    }
    apply1_loop(o, a, f)
}

/// `oᵢ = f(aᵢ, bᵢ)` over the common length (see [`apply1`]).
pub fn apply2<F: Fn(f32, f32) -> f32>(o: &mut [f32], a: &[f32], b: &[f32], f: &F) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { apply2_avx2(o, a, b, f) };
    }
    apply2_loop(o, a, b, f)
}

/// `oᵢ = f(aᵢ, bᵢ, cᵢ)` over the common length (see [`apply1`]).
pub fn apply3<F: Fn(f32, f32, f32) -> f32>(o: &mut [f32], a: &[f32], b: &[f32], c: &[f32], f: &F) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { apply3_avx2(o, a, b, c, f) };
    }
    apply3_loop(o, a, b, c, f)
}

/// `eˣ` for f32 without branches or calls (so loops over it vectorize): Cody–Waite range reduction
/// `x = n·ln2 + r`, a degree-6 polynomial for `eʳ` on |r| ≤ ln2/2 (the Cephes `expf` coefficients), and `2ⁿ` built
/// from its exponent bits. Relative error below 3e-7 on [-87, 88] (tested against `f32::exp`); below -87 it
/// returns 0 (e⁻⁸⁷ ≈ 1.6e-38), above 88 it returns e⁸⁸ ≈ 1.65e38, NaN stays NaN. No step ever produces a subnormal
/// number: on x86 each one costs a microcode assist of ~150 cycles, and masked attention scores (−3.4e38)
/// would hit it on every masked position.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const LO: f32 = -87.0;
    const HI: f32 = 88.0;
    // Round to nearest by adding 1.5·2²³: the sum's low mantissa bits then hold n as a two's-complement integer.
    // (`f32::round` is a libm call on x86 and a float→int cast needs saturation fix-ups; both would stop the
    // loop from vectorizing.)
    const MAGIC: f32 = 12_582_912.0;
    let tiny = x < LO;
    let x = x.clamp(LO, HI);
    let k = x * LOG2E + MAGIC;
    let n = k - MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_66;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // 2ⁿ from its exponent bits; n is in [-126, 127] after the clamp (and eʳ > 1 when n = -126, so y is normal).
    // Below the range the factor is 0, so no subnormal is formed.
    let ni = (k.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let bits = if tiny { 0 } else { (ni.wrapping_add(127) as u32) << 23 };
    e * f32::from_bits(bits)
}

/// `Σ f(xᵢ)` over eight interleaved partial sums, so that the loop (and `f`) vectorize; the summation order
/// differs from a sequential sum in the last bits.
#[inline(always)]
pub fn sum_map(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let (chunks, rest) = x.as_chunks::<8>();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    let mut total = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for &v in rest {
        total += f(v);
    }
    total
}

/// `Σ f(aᵢ, bᵢ)` over the common length, eight interleaved partial sums (see [`sum_map`]).
#[inline(always)]
pub fn sum_zip(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 8];
    let full = n / 8 * 8;
    for (ca, cb) in a[..full].as_chunks::<8>().0.iter().zip(b[..full].as_chunks::<8>().0) {
        for ((a, &x), &y) in acc.iter_mut().zip(ca).zip(cb) {
            *a += f(x, y);
        }
    }
    let mut total = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (&x, &y) in a[full..].iter().zip(&b[full..]) {
        total += f(x, y);
    }
    total
}

/// `⟨a, b⟩` over the common length (see [`sum_zip`]).
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    sum_zip(a, b, |x, y| x * y)
}

/// The largest element (`-∞` for an empty slice), over eight interleaved partial maxima so the loop vectorizes.
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let (chunks, rest) = x.as_chunks::<8>();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = a.max(v);
        }
    }
    acc.iter().chain(rest).fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

/// Executes `vzeroupper` on this thread (x86-64 with AVX; elsewhere nothing).
///
/// faer's x86 GEMM kernels return with the upper halves of the vector registers dirty. On Intel cores every
/// legacy-SSE instruction that follows then pays a state-transition penalty: the `x86-64` baseline code of
/// candle and of our loops ran up to 60× slower after a faer call (SiLU over 786k floats: 2.8 ms before,
/// 178 ms after, 3.9 ms after `vzeroupper`; 2-core Sapphire Rapids). Every faer call is followed by this.
pub fn clear_upper_simd_state() {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx")]
        fn zero_upper() {
            std::arch::x86_64::_mm256_zeroupper();
        }
        if std::arch::is_x86_feature_detected!("avx") {
            // SAFETY: the CPU has AVX (checked just above).
            unsafe { zero_upper() }
        }
    }
}

/// [`clear_upper_simd_state`] on this thread and on every rayon worker (after faer ran on them). From inside a
/// rayon worker only this thread is cleared.
pub fn clear_upper_simd_state_everywhere() {
    clear_upper_simd_state();
    if rayon::current_thread_index().is_none() {
        rayon::broadcast(|_| clear_upper_simd_state());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std_to_3e7_relative() {
        let mut worst = 0f64;
        let mut x = -86.999f32;
        while x <= 88.0 {
            let (got, want) = (exp_f32(x) as f64, (x as f64).exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_37;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp_f32(0.0), 1.0);
        let mut x = -90.0f32;
        while x < 0.0 {
            let y = exp_f32(x);
            assert!(y == 0.0 || y.is_normal(), "exp({x}) = {y:e} is subnormal");
            x += 0.000_97;
        }
        assert_eq!(exp_f32(-200.0), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert!(exp_f32(200.0).is_finite() && exp_f32(200.0) > 1e38);
        assert_eq!(exp_f32(f32::INFINITY), exp_f32(88.0));
        assert!(exp_f32(f32::NAN).is_nan());
        // The masked-attention value: exp(MIN - max) must be 0, not NaN.
        assert_eq!(exp_f32(f32::MIN), 0.0);
    }

    #[test]
    fn dispatched_maps_give_the_same_bits_as_plain_loops() {
        let x: Vec<f32> = (0..10_001).map(|i| (i as f32 - 5000.0) * 0.0173).collect();
        let y: Vec<f32> = x.iter().map(|v| v * 0.5 + 0.25).collect();
        let f = |v: f32, w: f32| exp_f32(v) * w + 1.0;
        let plain: Vec<f32> = x.iter().zip(&y).map(|(&v, &w)| f(v, w)).collect();
        let mut fast = vec![0f32; x.len()];
        apply2(&mut fast, &x, &y, &f);
        assert!(plain.iter().zip(&fast).all(|(a, b)| a.to_bits() == b.to_bits()));
        apply1(&mut fast, &x, &|v| exp_f32(v));
        assert!(x.iter().zip(&fast).all(|(&v, b)| exp_f32(v).to_bits() == b.to_bits()));
        apply3(&mut fast, &x, &y, &x, &|a, b, c| a * b - c);
        assert!(x.iter().zip(&y).zip(&fast).all(|((&a, &b), r)| (a * b - a).to_bits() == r.to_bits()));
    }

    #[test]
    fn lane_sum_and_max_agree_with_sequential() {
        for n in [0usize, 1, 7, 8, 9, 63, 64, 1000] {
            let x: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.031).collect();
            let seq: f64 = x.iter().map(|&v| (v * v) as f64).sum();
            assert!((sum_map(&x, |v| v * v) as f64 - seq).abs() <= 1e-5 * seq.max(1.0), "n {n}");
            let m = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&x), m, "n {n}");
            let y: Vec<f32> = x.iter().map(|v| v * 0.5 - 1.0).collect();
            let d: f64 = x.iter().zip(&y).map(|(a, b)| (a * b) as f64).sum();
            assert!((dot(&x, &y) as f64 - d).abs() <= 1e-5 * d.abs().max(1.0), "n {n}");
        }
    }

    /// The dispatch takes the AVX2 copy exactly where the CPU has AVX2 and FMA, and that copy gives the scalar
    /// loop's bits, also right after the upper state is cleared: on this thread, on every rayon worker (from
    /// outside the pool) and from inside a worker (which clears that worker only).
    #[test]
    fn dispatch_takes_avx2_where_present_and_clearing_keeps_every_result() {
        #[cfg(target_arch = "x86_64")]
        let best = std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
        #[cfg(not(target_arch = "x86_64"))]
        let best = false;
        assert_eq!(has_avx2(), best, "has_avx2() disagrees with the CPU's features");
        let x: Vec<f32> = (0..4099).map(|i| (i as f32 - 2049.0) * 0.041).collect();
        let f = |v: f32| exp_f32(v) * 0.5 - v;
        let want: Vec<u32> = x.iter().map(|&v| f(v).to_bits()).collect();
        let check = |on: &str| {
            // The dispatched map (the AVX2 copy where present) leaves the upper halves dirty; then clear them and
            // run the baseline loop, then the dispatched map again.
            let (mut fast, mut plain) = (vec![0f32; x.len()], vec![0f32; x.len()]);
            apply1(&mut fast, &x, &f);
            clear_upper_simd_state_everywhere();
            apply1_loop(&mut plain, &x, &f);
            assert!(plain.iter().map(|v| v.to_bits()).eq(want.iter().copied()), "scalar loop on {on}");
            apply1(&mut fast, &x, &f);
            assert!(fast.iter().map(|v| v.to_bits()).eq(want.iter().copied()), "dispatched map on {on}");
        };
        check("the test thread");
        rayon::broadcast(|c| check(&format!("rayon worker {}", c.index())));
        #[cfg(target_arch = "x86_64")]
        if best {
            let mut out = vec![0f32; x.len()];
            // SAFETY: the CPU has AVX2 and FMA (`best`).
            unsafe { apply1_avx2(&mut out, &x, &f) };
            assert!(out.iter().map(|v| v.to_bits()).eq(want.iter().copied()), "the AVX2 copy itself");
        }
        if !best {
            crate::testing::skipped("this CPU lacks AVX2+FMA: only the scalar copies of the SIMD maps were tested");
        }
    }
}
