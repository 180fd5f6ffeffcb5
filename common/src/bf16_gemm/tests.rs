//! Against plain f64 references on bf16-rounded inputs: the GEMM over a grid of odd shapes, both packing
//! orientations, f32 and bf16 sources, bf16 and f32 A, accumulate on and off, padded strides; the packers'
//! vector paths against their scalar loop; the conversion against an independent round-to-nearest-even.
use super::pack::{Src, Tile};
use super::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Whether the AVX-512 tests must be skipped (said loudly and counted: a skip is not a pass), unless
/// `FEDSB_REQUIRE_AVX512BF16=1`, which makes a CPU without AVX-512 BF16 a failure.
fn skip_without_avx512() -> bool {
    if available() {
        return false;
    }
    let msg = "this CPU lacks AVX-512 BF16; the bf16 GEMM's AVX-512 kernels were NOT tested";
    crate::testing::skip_unless_required("FEDSB_REQUIRE_AVX512BF16", msg);
    true
}

/// One GEMM case: shape, packing orientation and source, A's type, accumulation, block sizes.
#[derive(Clone, Copy, Debug)]
struct Case {
    m: usize,
    n: usize,
    k: usize,
    transposed: bool,
    b_bf16: bool,
    a_f32: bool,
    accumulate: bool,
    blk: Blocking,
}

/// Runs `case` on the AVX-512 path (or the scalar fallback when `scalar`) and checks C against an f64 sum of the
/// bf16-rounded products within f32 summation error, and that C's padding columns are untouched.
fn check(rng: &mut ChaCha8Rng, case: Case, scalar: bool) {
    let Case { m, n, k, transposed, b_bf16, a_f32, accumulate, blk } = case;
    let (lda, ldc) = (k + rng.random_range(0..3), n + rng.random_range(0..3));
    let (rows, cols) = if transposed { (n, k) } else { (k, n) };
    let ldt = cols + rng.random_range(0..3);
    let a32: Vec<f32> = (0..m * lda).map(|_| rng.random_range(-1.0..1.0)).collect();
    let t32: Vec<f32> = (0..rows * ldt).map(|_| rng.random_range(-1.0..1.0)).collect();
    let a16: Vec<u16> = a32.iter().map(|&x| f32_to_bf16_one(x)).collect();
    let t16: Vec<u16> = t32.iter().map(|&x| f32_to_bf16_one(x)).collect();
    let src = if b_bf16 { Src::Bf16(&t16) } else { Src::F32(&t32) };
    let mut b = PackedB::new();
    b.pack(Tile { src, ld: ldt, transposed }, k, n, true);
    let bval = |kk: usize, j: usize| bf16_to_f32(if transposed { t16[j * ldt + kk] } else { t16[kk * ldt + j] });
    let c0: Vec<f32> = (0..m.max(1) * ldc).map(|_| rng.random_range(-2.0..2.0)).collect();
    let mut c = c0.clone();
    let lhs = if a_f32 { Lhs::F32(&a32) } else { Lhs::Bf16(&a16) };
    if scalar {
        // SAFETY: A's bounds checked; c holds m rows of ldc ≥ n.
        unsafe {
            check_lhs(m, lhs, lda, &b);
            gemm_scalar(m, lhs, lda, &b, c.as_mut_ptr(), ldc, accumulate);
        }
    } else {
        gemm_checked(m, lhs, lda, &b, &mut c, ldc, accumulate, blk);
    }
    for i in 0..m {
        for j in 0..ldc {
            let got = c[i * ldc + j];
            if j >= n {
                assert_eq!(got.to_bits(), c0[i * ldc + j].to_bits(), "{case:?}: padding C[{i}][{j}] written");
                continue;
            }
            let (mut want, mut mag) = (0f64, 0f64);
            for kk in 0..k {
                let p = f64::from(bf16_to_f32(a16[i * lda + kk])) * f64::from(bval(kk, j));
                want += p;
                mag += p.abs();
            }
            if accumulate {
                want += f64::from(c0[i * ldc + j]);
                mag += f64::from(c0[i * ldc + j]).abs();
            }
            // k + 1 rounded f32 additions, each off by at most 2⁻²⁴ of the running magnitude.
            let tol = (k as f64 + 2.0) * f64::from(f32::EPSILON) / 2.0 * mag + 1e-30;
            let err = (f64::from(got) - want).abs();
            assert!(
                err <= tol,
                "{case:?} lda {lda} ldc {ldc}: C[{i}][{j}] = {got}, want {want} (err {err:e} > {tol:e})"
            );
        }
    }
}

/// Every combination of orientation, B's source and accumulation for each shape; A's type alternates.
fn grid(ms: &[usize], ns: &[usize], ks: &[usize], blk: Blocking, scalar: bool, seed: u64) -> usize {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut cases = 0;
    for &m in ms {
        for &n in ns {
            for &k in ks {
                for v in 0..8 {
                    let (transposed, b_bf16, accumulate) = (v & 1 != 0, v & 2 != 0, v & 4 != 0);
                    let a_f32 = (v + m + n + k) % 2 == 1;
                    check(&mut rng, Case { m, n, k, transposed, b_bf16, a_f32, accumulate, blk }, scalar);
                    cases += 1;
                }
            }
        }
    }
    cases
}

#[test]
fn gemm_matches_reference_on_odd_shapes() {
    if skip_without_avx512() {
        return;
    }
    let cases = grid(
        &[1, 2, 7, 8, 9, 31, 65],
        &[1, 15, 16, 17, 33, 100],
        &[1, 2, 3, 31, 64, 255, 300],
        DEFAULT_BLOCKING,
        false,
        1,
    );
    assert_eq!(cases, 7 * 6 * 7 * 8);
}

#[test]
fn gemm_matches_reference_across_k_and_row_blocks() {
    if skip_without_avx512() {
        return;
    }
    // Tiny blocks: several k blocks (some of unequal pairs) and row blocks with edge panels in each.
    let blk = Blocking { kc: 8, mc: 2 * MR };
    grid(&[1, 13, 25, 50], &[17, 40, 70], &[9, 33, 100], blk, false, 2);
    let blk = Blocking { kc: 34, mc: MR };
    grid(&[12, 37], &[64, 65], &[67, 200], blk, false, 3);
    // The default blocks with k and m past one block.
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    for (m, n, k) in [(1000, 50, 600), (13, 300, 1100), (2 * MC + 5, 33, 2 * KC + 3)] {
        for (transposed, a_f32) in [(true, false), (false, true)] {
            let case = Case { m, n, k, transposed, b_bf16: !a_f32, a_f32, accumulate: a_f32, blk: DEFAULT_BLOCKING };
            check(&mut rng, case, false);
        }
    }
}

#[test]
fn scalar_fallback_matches_reference() {
    grid(&[1, 3, 13], &[1, 17, 33], &[1, 2, 31, 64], DEFAULT_BLOCKING, true, 5);
}

#[test]
fn public_entry_points_agree() {
    if skip_without_avx512() {
        return;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let (m, n, k) = (19, 45, 70);
    let a32: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
    let mut a16 = vec![0u16; m * k];
    f32_to_bf16(&a32, &mut a16);
    let w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0)).collect();
    let mut w16 = vec![0u16; n * k];
    f32_to_bf16(&w, &mut w16);
    let b = PackedB::from_f32_transposed(&w, n, k, k);
    assert_eq!((b.k(), b.n()), (k, n));
    let mut want = vec![0f32; m * n];
    gemm(m, &a16, k, &b, &mut want, n, false);
    // The same bits from f32 A, from bf16 W, through the raw pointer, and into a reused allocation.
    let mut c = vec![0f32; m * n];
    gemm_f32a(m, &a32, k, &PackedB::from_bf16_transposed(&w16, n, k, k), &mut c, n, false);
    assert_eq!(c, want);
    let mut c = vec![0f32; m * n];
    // SAFETY: c holds m × n at stride n, borrowed mutably.
    unsafe { gemm_ptr(m, &a16, k, &b, c.as_mut_ptr(), n, false) };
    assert_eq!(c, want);
    let mut c = vec![0f32; m * n];
    // SAFETY: as above.
    unsafe { gemm_f32a_ptr(m, &a32, k, &b, c.as_mut_ptr(), n, false) };
    assert_eq!(c, want);
    // Wᵀ as a row-major k × n tile gives the same B.
    let wt: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
    let mut reused = PackedB::from_f32(&vec![1.0; 200 * 300], 200, 300, 300);
    reused.repack_f32(&wt, k, n, n);
    let mut c = vec![0f32; m * n];
    gemm(m, &a16, k, &reused, &mut c, n, false);
    assert_eq!(c, want);
    // k = 0: C = 0, or unchanged when accumulating.
    let empty = PackedB::from_f32(&[], 0, n, n);
    let mut c = vec![3f32; m * n];
    gemm(m, &[], 0, &empty, &mut c, n, true);
    assert!(c.iter().all(|&x| x == 3.0));
    gemm(m, &[], 0, &empty, &mut c, n, false);
    assert!(c.iter().all(|&x| x == 0.0));
}

#[test]
#[should_panic(expected = "A has")]
fn short_a_panics() {
    let b = PackedB::from_f32(&[0.0; 6], 3, 2, 2);
    gemm(2, &[0; 5], 3, &b, &mut [0.0; 4], 2, false);
}

#[test]
#[should_panic(expected = "C has")]
fn short_c_panics() {
    let b = PackedB::from_f32(&[0.0; 6], 3, 2, 2);
    gemm(2, &[0; 6], 3, &b, &mut [0.0; 3], 2, false);
}

#[test]
fn packers_vector_paths_match_scalar_loop() {
    if skip_without_avx512() {
        return;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    // One operand reused for every tile, larger and smaller ones in turn: no stale line may survive.
    let mut reused = PackedB::from_f32(&vec![f32::NAN; 160 * 200], 160, 200, 200);
    for (k, n) in [(64, 64), (96, 97), (71, 130), (33, 32), (31, 40), (2, 32), (1, 64)] {
        for transposed in [false, true] {
            let (rows, cols) = if transposed { (n, k) } else { (k, n) };
            let ld = cols + rng.random_range(0..5);
            // Some values round up, some tie, some are NaN, ±∞ or denormal.
            let t32: Vec<f32> = (0..rows * ld)
                .map(|i| match i % 97 {
                    0 => f32::NAN,
                    1 => f32::NEG_INFINITY,
                    2 => 1e-40,
                    3 => f32::from_bits(0x3f80_8000),
                    _ => rng.random_range(-3.0..3.0),
                })
                .collect();
            let t16: Vec<u16> = t32.iter().map(|&x| f32_to_bf16_one(x)).collect();
            for src in [Src::F32(&t32), Src::Bf16(&t16)] {
                let tile = Tile { src, ld, transposed };
                let (mut fast, mut slow) = (PackedB::new(), PackedB::new());
                fast.pack(tile, k, n, true);
                slow.pack(tile, k, n, false);
                assert_eq!(fast.lines_for_test(), slow.lines_for_test(), "k {k} n {n} transposed {transposed}");
                reused.pack(tile, k, n, true);
                assert_eq!(reused.lines_for_test(), slow.lines_for_test(), "reused, k {k} n {n}");
                for kk in 0..k.next_multiple_of(2) {
                    for j in 0..n.next_multiple_of(NR) {
                        let want = match (kk < k && j < n, transposed) {
                            (false, _) => 0,
                            (true, true) => t16[j * ld + kk],
                            (true, false) => t16[kk * ld + j],
                        };
                        assert_eq!(fast.get(kk, j), want, "B[{kk}][{j}] k {k} n {n} transposed {transposed}");
                    }
                }
            }
        }
    }
}

/// Round to nearest even by comparing distances in f64 (independent of the bit trick under test); f32
/// denormals to signed zero, NaN quieted with its sign and leading payload.
fn reference_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = (bits >> 16) as u16 & 0x8000;
    if x.is_nan() {
        return (bits >> 16) as u16 | 0x40;
    }
    if x.is_infinite() || x == 0.0 || x.is_subnormal() {
        return if x.is_infinite() { (bits >> 16) as u16 } else { sign };
    }
    let down = (bits >> 16) as u16; // truncated magnitude
    let up = down + 1;
    let mag = |h: u16| if h & 0x7f80 == 0x7f80 { 2f64.powi(128) } else { f64::from(bf16_to_f32(h)).abs() };
    let v = f64::from(x).abs();
    let (d_down, d_up) = (v - mag(down), mag(up) - v);
    if d_down < d_up || (d_down == d_up && down & 1 == 0) { down } else { up }
}

#[test]
fn conversion_rounds_to_nearest_even() {
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let mut xs: Vec<f32> = vec![
        0.0,
        -0.0,
        1.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        f32::from_bits(0x7f80_0001), // signalling NaN: quieted, still NaN
        f32::from_bits(0xffc1_2345),
        f32::MAX,
        f32::MIN,
        f32::MIN_POSITIVE,
        -f32::MIN_POSITIVE,
        f32::from_bits(1),           // smallest denormal
        f32::from_bits(0x807f_ffff), // largest negative denormal
        f32::from_bits(0x3f80_8000), // tie, 1.0's last bit even: down
        f32::from_bits(0x3f81_8000), // tie, odd: up
        f32::from_bits(0x3f80_8001), // above the tie: up
        f32::from_bits(0x3f80_7fff), // below the tie: down
        f32::from_bits(0x7f7f_8000), // tie at the largest bf16: rounds (odd) to ∞
        f32::from_bits(0x7f7e_8000), // tie, even: stays finite
        f32::from_bits(0x0080_8000), // tie at the smallest normal
        f32::from_bits(0xbf80_ffff), // rounds up across the mantissa into the exponent
    ];
    xs.extend((0..200_000).map(|_| f32::from_bits(rng.random())));
    xs.extend((0..20_000).map(|_| f32::from_bits(rng.random::<u32>() & 0x807f_ffff))); // denormals
    xs.extend((0..20_000).map(|_| f32::from_bits(rng.random::<u32>() & 0xffff_0000 | 0x8000))); // ties
    for &x in &xs {
        let (got, want) = (f32_to_bf16_one(x), reference_bf16(x));
        assert_eq!(got, want, "{x:e} ({:#010x}): {got:#06x}, want {want:#06x}", x.to_bits());
        if x.is_normal() && !bf16_to_f32(got).is_infinite() {
            assert_eq!(got, half::bf16::from_f32(x).to_bits(), "{x:e}: half disagrees");
        }
        assert_eq!(bf16_to_f32(got).is_nan(), x.is_nan());
    }
    // The slice conversion (vectorized where available, in 32s with a scalar tail) gives the same bits.
    for len in [xs.len(), 31, 33, 1] {
        let mut out = vec![0u16; len];
        f32_to_bf16(&xs[..len], &mut out);
        for (i, (&x, &h)) in xs.iter().zip(&out).enumerate() {
            assert_eq!(h, f32_to_bf16_one(x), "element {i}: {x:e} ({:#010x})", x.to_bits());
        }
    }
    if !available() {
        let msg = "this CPU lacks AVX-512 BF16; only the scalar conversion was tested";
        crate::testing::skip_unless_required("FEDSB_REQUIRE_AVX512BF16", msg);
    }
}

#[test]
fn kernel_flushes_denormal_inputs() {
    if skip_without_avx512() {
        return;
    }
    // A denormal bf16 (2⁻¹³³) times 2¹⁰⁰ would be 2⁻³³ ≈ 1.2e-10; vdpbf16ps treats the denormal as zero. The
    // smallest normal (2⁻¹²⁶) is kept.
    let b = PackedB::from_bf16(&[f32_to_bf16_one(2f32.powi(100))], 1, 1, 1);
    let mut c = [5f32; 2];
    gemm(2, &[0x0001, 0x0080], 1, &b, &mut c, 1, false);
    assert_eq!(c, [0.0, 2f32.powi(-26)], "a denormal input's product should be zero, a normal one's exact");
}

#[test]
fn widening_is_exact_for_every_bit_pattern() {
    let src: Vec<u16> = (0..=u16::MAX).chain(0..37).collect();
    // Odd lengths and offsets reach the vector loop's edges.
    for (start, len) in [(0usize, src.len()), (3, 29), (1, 16), (5, 0)] {
        let s = &src[start..start + len];
        let mut dst = vec![0f32; len];
        super::bf16_to_f32_slice(s, &mut dst);
        for (&h, &f) in s.iter().zip(&dst) {
            assert_eq!(f.to_bits(), u32::from(h) << 16, "bf16 {h:#06x}");
        }
    }
}
