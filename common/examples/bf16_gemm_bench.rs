//! GFLOP/s of the AVX-512 BF16 GEMM ([`fedsb_common::bf16_gemm`]) against f32 GEMMs (faer's; MKL's where it
//! loads) on the forward shapes `x·Wᵀ` of the fine-tuned models, on one thread and on two (C's columns split in
//! two halves, each thread with its own packed B).
//!
//! `cargo run --release -p fedsb-common --example bf16_gemm_bench [-- [OPTIONS] [MxNxK ...]]`, options:
//! `--quick` (0.2 s per measurement, not 1 s), `--threads 1|2` (one of the two tables), `--cpu` (time by the
//! thread's CPU time: for one thread on a machine busy with other work), `--only bf16,faer,..` (those columns),
//! `--no-pack` (skip the packing table).
//!
//! Columns (GFLOP/s = 2·m·n·k / median time):
//! - `bf16`: bf16 A, B packed beforehand (the kernel alone);
//! - `+packB`: packing B from f32 W in the call (`repack_f32_transposed`), bf16 A;
//! - `+packB+A32`: packing B from f32 W and A given in f32 (`gemm_f32a`: rounded while packed) — the whole cost
//!   from f32 inputs;
//! - `+packB16+A32`: packing B from bf16 W (the bf16 weights' path), A in f32;
//! - `faer`, `mkl`: f32 `A·Wᵀ` (faer's `matmul` with `Par::Seq`; MKL's sequential `cblas_sgemm`);
//! - `mkl-bf16`: MKL's `cblas_gemm_bf16bf16f32` on the bf16 A and W (AMX where the CPU has it), where MKL has it.
//!
//! Then the packing rates alone (ns per element of B) for the four packers.
use faer::{Accum, MatMut, MatRef, Par};
use fedsb_common::bf16_gemm::{self, PackedB};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const SHAPES: &[(usize, usize, usize)] = &[
    (2048, 384, 384),
    (2048, 1536, 384),
    (2048, 384, 1536),
    (512, 576, 576),
    (512, 1536, 576),
    (512, 576, 1536),
    (256, 2048, 2048),
    (256, 8192, 2048),
    (256, 2048, 8192),
    (512, 49152, 576),
    (1, 2048, 2048),
    (16, 2048, 2048),
];

/// A C pointer that may cross to the other thread (each thread writes its own columns).
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: the two threads write disjoint column blocks of one C, borrowed mutably for the duration.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer offset by `j` columns (a method, so closures capture the `Send` wrapper).
    fn at(self, j: usize) -> *mut f32 {
        self.0.wrapping_add(j)
    }
}

/// Whether to time by this thread's CPU time rather than wall time (`--cpu`: for one thread on a busy machine).
static CPU_TIME: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Seconds on the clock `--cpu` picks.
fn now() -> f64 {
    if CPU_TIME.load(std::sync::atomic::Ordering::Relaxed) {
        let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: a valid timespec to fill.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
        t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
    } else {
        static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        START.get_or_init(Instant::now).elapsed().as_secs_f64()
    }
}

/// The median seconds of `f` over at least 3 runs and `min_time`, after one warm-up run.
fn median_secs(min_time: Duration, mut f: impl FnMut()) -> f64 {
    f();
    let (start, mut times) = (Instant::now(), Vec::new());
    while times.len() < 3 || (start.elapsed() < min_time && times.len() < 25) {
        let t = now();
        f();
        times.push(now() - t);
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// One shape's inputs: A (m × k) and W (n × k) in f32 and bf16.
struct Inputs {
    m: usize,
    n: usize,
    k: usize,
    a32: Vec<f32>,
    a16: Vec<u16>,
    w32: Vec<f32>,
    w16: Vec<u16>,
}

impl Inputs {
    fn new((m, n, k): (usize, usize, usize), rng: &mut ChaCha8Rng) -> Self {
        let a32: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        let w32: Vec<f32> = (0..n * k).map(|_| rng.random_range(-0.1..0.1)).collect();
        let (mut a16, mut w16) = (vec![0u16; m * k], vec![0u16; n * k]);
        bf16_gemm::f32_to_bf16(&a32, &mut a16);
        bf16_gemm::f32_to_bf16(&w32, &mut w16);
        Self { m, n, k, a32, a16, w32, w16 }
    }

    /// Column halves `[0, n0)`, `[n0, n)` with n0 a multiple of 32 (one part when `parts` is 1).
    fn parts(&self, parts: usize) -> Vec<(usize, usize)> {
        if parts == 1 || self.n < 64 {
            return vec![(0, self.n)];
        }
        let n0 = (self.n / 2).next_multiple_of(bf16_gemm::NR).min(self.n);
        vec![(0, n0), (n0, self.n)]
    }
}

/// The variants of the table, in order.
#[derive(Clone, Copy)]
enum Variant {
    Packed,
    PackB,
    PackBA32,
    PackB16A32,
    Faer,
    Mkl,
    MklBf16,
}

/// Median GFLOP/s of one variant on `parts` column parts (each on its own thread of the two-thread `pool`).
fn run(x: &Inputs, v: Variant, parts: usize, pool: &rayon::ThreadPool, min_time: Duration) -> f64 {
    let (m, n, k) = (x.m, x.n, x.k);
    let parts = x.parts(parts);
    let mut c = vec![0f32; m * n];
    let cp = SendPtr(c.as_mut_ptr());
    // One packed B per part (prepacked for `Packed`, the allocation reused by the others); each part's thread
    // locks its own, so the lock is never contended.
    let packed: Vec<Mutex<PackedB>> = parts
        .iter()
        .map(|&(s, e)| Mutex::new(PackedB::from_bf16_transposed(&x.w16[s * k..e * k], e - s, k, k)))
        .collect();
    let mkl = fedsb_common::mkl::load().as_ref().ok();
    let body = |(s, e): (usize, usize), pb: &mut PackedB| {
        let w32 = &x.w32[s * k..e * k];
        // SAFETY (all arms): each part writes its own columns s..e of C (m × n, row stride n), borrowed mutably
        // by `c` for the whole run.
        match v {
            Variant::Packed => unsafe { bf16_gemm::gemm_ptr(m, &x.a16, k, pb, cp.at(s), n, false) },
            Variant::PackB => {
                pb.repack_f32_transposed(w32, e - s, k, k);
                unsafe { bf16_gemm::gemm_ptr(m, &x.a16, k, pb, cp.at(s), n, false) }
            }
            Variant::PackBA32 => {
                pb.repack_f32_transposed(w32, e - s, k, k);
                unsafe { bf16_gemm::gemm_f32a_ptr(m, &x.a32, k, pb, cp.at(s), n, false) }
            }
            Variant::PackB16A32 => {
                pb.repack_bf16_transposed(&x.w16[s * k..e * k], e - s, k, k);
                unsafe { bf16_gemm::gemm_f32a_ptr(m, &x.a32, k, pb, cp.at(s), n, false) }
            }
            Variant::Faer => {
                let (dst, lhs, rhs) = unsafe {
                    (
                        MatMut::from_raw_parts_mut(cp.at(s), m, e - s, n as isize, 1),
                        MatRef::from_row_major_slice(&x.a32, m, k),
                        MatRef::from_row_major_slice(w32, e - s, k).transpose(),
                    )
                };
                faer::linalg::matmul::matmul(dst, Accum::Replace, lhs, rhs, 1.0f32, Par::Seq);
                fedsb_common::simd::clear_upper_simd_state();
            }
            Variant::Mkl => {
                let mkl = mkl.expect("MKL loaded");
                unsafe {
                    mkl.sgemm_rm(
                        m,
                        e - s,
                        k,
                        1.0,
                        x.a32.as_ptr(),
                        (k, false),
                        w32.as_ptr(),
                        (k, true),
                        0.0,
                        cp.at(s),
                        n,
                    )
                };
                fedsb_common::simd::clear_upper_simd_state();
            }
            Variant::MklBf16 => {
                let mkl = mkl.expect("MKL loaded");
                unsafe {
                    mkl.gemm_bf16_rm(
                        m,
                        e - s,
                        k,
                        1.0,
                        x.a16.as_ptr(),
                        (k, false),
                        x.w16[s * k..].as_ptr(),
                        (k, true),
                        0.0,
                        cp.at(s),
                        n,
                    )
                };
                fedsb_common::simd::clear_upper_simd_state();
            }
        }
    };
    let one = |i: usize| body(parts[i], &mut packed[i].lock().expect("unpoisoned"));
    let secs = median_secs(min_time, || {
        if parts.len() == 1 {
            one(0);
        } else {
            // Each of the pool's two threads runs its own part, as the callers split a GEMM. (`rayon::join`
            // would run both parts on one thread whenever the other, asleep, is slow to wake: on a VM that is
            // often the case for calls of a millisecond or two.)
            pool.broadcast(|ctx| one(ctx.index()));
        }
    });
    std::hint::black_box(&c);
    2.0 * (m * n * k) as f64 / secs / 1e9
}

/// Checks the bf16 GEMM against faer's f32 product on the bf16-rounded inputs (a sanity check of the bench).
fn sanity(x: &Inputs) {
    let (m, n, k) = (x.m.min(64), x.n.min(256), x.k);
    let b = PackedB::from_bf16_transposed(&x.w16[..n * k], n, k, k);
    let mut c = vec![0f32; m * n];
    bf16_gemm::gemm(m, &x.a16, k, &b, &mut c, n, false);
    let up = |h: &[u16]| h.iter().map(|&h| bf16_gemm::bf16_to_f32(h)).collect::<Vec<f32>>();
    let (a, w) = (up(&x.a16[..m * k]), up(&x.w16[..n * k]));
    let mut want = vec![0f32; m * n];
    faer::linalg::matmul::matmul(
        MatMut::from_row_major_slice_mut(&mut want, m, n),
        Accum::Replace,
        MatRef::from_row_major_slice(&a, m, k),
        MatRef::from_row_major_slice(&w, n, k).transpose(),
        1.0f32,
        Par::Seq,
    );
    let worst = c.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst < 1e-4 * (k as f32).sqrt(), "bf16 GEMM disagrees with faer by {worst}");
}

/// GFLOP/s of the 12 × 32 microkernel's inner loop with its operands in L1 (the same B lines and A words every
/// step; 24 accumulators): the ceiling of the GEMM on this core.
#[cfg(target_arch = "x86_64")]
#[clippy::msrv = "1.89"] // AVX-512 intrinsics, as in bf16_gemm
fn dpbf16_peak() -> f64 {
    use std::arch::x86_64::*;
    #[repr(C, align(64))]
    struct Lines([u32; 32]);
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    fn bh(x: __m512i) -> __m512bh {
        // SAFETY: both are 64 plain bytes.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(x) }
    }
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    fn steps(iters: usize, a: &[u32; 12], b: &Lines) -> f32 {
        let mut acc = [[_mm512_setzero_ps(); 2]; 12];
        for _ in 0..iters {
            // SAFETY: two aligned 64-byte lines.
            let (b0, b1) =
                unsafe { (_mm512_load_si512(b.0.as_ptr().cast()), _mm512_load_si512(b.0[16..].as_ptr().cast())) };
            let (b0, b1) = (bh(b0), bh(b1));
            for (row, &w) in acc.iter_mut().zip(a) {
                let ai = bh(_mm512_set1_epi32(w as i32));
                row[0] = _mm512_dpbf16_ps(row[0], ai, b0);
                row[1] = _mm512_dpbf16_ps(row[1], ai, b1);
            }
        }
        let mut sum = _mm512_setzero_ps();
        for row in &acc {
            sum = _mm512_add_ps(sum, _mm512_add_ps(row[0], row[1]));
        }
        _mm512_reduce_add_ps(sum)
    }
    let (a, b) = ([0x3f80_3f80u32; 12], Lines([0x2f80_2f80; 32]));
    let iters = 1_000_000;
    // SAFETY: only called where bf16_gemm::available() (AVX-512 F, BW, BF16).
    let secs = median_secs(Duration::from_millis(300), || {
        std::hint::black_box(unsafe { steps(iters, std::hint::black_box(&a), std::hint::black_box(&b)) });
    });
    (iters * 24 * 64) as f64 / secs / 1e9
}

#[cfg(not(target_arch = "x86_64"))]
fn dpbf16_peak() -> f64 {
    0.0
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    if args.iter().any(|a| a == "--cpu") {
        CPU_TIME.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    let threads: Vec<usize> = match args.iter().position(|a| a == "--threads") {
        Some(i) => vec![args[i + 1].parse().expect("--threads 1 or 2")],
        None => vec![1, 2],
    };
    let picked: Vec<(usize, usize, usize)> = args
        .iter()
        .filter_map(|a| {
            let d: Vec<usize> = a.split('x').map(|d| d.parse().ok()).collect::<Option<_>>()?;
            (d.len() == 3).then(|| (d[0], d[1], d[2]))
        })
        .collect();
    let shapes = if picked.is_empty() { SHAPES.to_vec() } else { picked };
    if !bf16_gemm::available() {
        println!("this CPU lacks AVX-512 BF16: nothing to measure (the bf16 GEMM would run its scalar fallback)");
        return;
    }
    let min_time = Duration::from_millis(if quick { 200 } else { 1000 });
    println!("12×32 microkernel, operands in L1 (one thread): {:.1} GFLOP/s", dpbf16_peak());
    let mkl = fedsb_common::mkl::load();
    println!("f32 GEMMs beside it: faer 0.24 (Par::Seq); {}", fedsb_common::mkl::describe());
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().expect("2-thread pool");
    let mut variants = vec![
        ("bf16", Variant::Packed),
        ("+packB", Variant::PackB),
        ("+packB+A32", Variant::PackBA32),
        ("+packB16+A32", Variant::PackB16A32),
        ("faer", Variant::Faer),
    ];
    if let Ok(m) = mkl {
        variants.push(("mkl", Variant::Mkl));
        if m.has_gemm_bf16() {
            variants.push(("mkl-bf16", Variant::MklBf16));
        }
    }
    if let Some(i) = args.iter().position(|a| a == "--only") {
        let keep: Vec<&str> = args[i + 1].split(',').collect();
        variants.retain(|(name, _)| keep.contains(name));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let inputs: Vec<Inputs> = shapes.iter().map(|&s| Inputs::new(s, &mut rng)).collect();
    inputs.iter().for_each(sanity);
    for &t in &threads {
        println!("\n{t} thread(s), GFLOP/s (total over the threads; median)");
        print!("{:>20}", "m × n × k");
        variants.iter().for_each(|(name, _)| print!(" {name:>13}"));
        println!();
        for x in &inputs {
            print!("{:>20}", format!("{}×{}×{}", x.m, x.n, x.k));
            for &(_, v) in &variants {
                print!(" {:>13.1}", run(x, v, t, &pool, min_time));
                use std::io::Write;
                std::io::stdout().flush().ok();
            }
            println!();
        }
    }
    if args.iter().any(|a| a == "--no-pack") {
        return;
    }
    println!("\npacking B alone (one thread), ns per element of B");
    println!("{:>20} {:>10} {:>10} {:>10} {:>10}", "n × k", "f32 Wᵀ", "f32 W", "bf16 Wᵀ", "bf16 W");
    let mut seen = Vec::new();
    for x in &inputs {
        if seen.contains(&(x.n, x.k)) {
            continue;
        }
        seen.push((x.n, x.k));
        let (n, k) = (x.n, x.k);
        let mut pb = PackedB::new();
        let per = |s: f64| s * 1e9 / (n * k) as f64;
        // Wᵀ: W is n × k; W: the same data read as a k × n tile (the input gradient's orientation).
        let a = per(median_secs(min_time, || pb.repack_f32_transposed(&x.w32, n, k, k)));
        let b = per(median_secs(min_time, || pb.repack_f32(&x.w32, k, n, n)));
        let c = per(median_secs(min_time, || pb.repack_bf16_transposed(&x.w16, n, k, k)));
        let d = per(median_secs(min_time, || pb.repack_bf16(&x.w16, k, n, n)));
        println!("{:>20} {a:>10.3} {b:>10.3} {c:>10.3} {d:>10.3}", format!("{n}×{k}"));
    }
}
