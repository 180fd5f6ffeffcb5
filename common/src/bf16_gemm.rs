//! bf16 × bf16 → f32 GEMM (placeholder: a scalar reference of the API until the AVX-512 BF16 kernel lands;
//! [`available`] is `false`, so nothing uses it outside tests).

/// Whether this CPU can run the kernels.
pub fn available() -> bool {
    false
}

/// f32 → bf16 (round to nearest even).
pub fn f32_to_bf16(src: &[f32], dst: &mut [u16]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = half::bf16::from_f32(*s).to_bits();
    }
}

/// The right-hand operand B (k × n), row-major bf16.
pub struct PackedB {
    k: usize,
    n: usize,
    data: Vec<u16>,
}

impl PackedB {
    /// B = Tᵀ, T n × k f32 (row stride ld).
    pub fn from_f32_transposed(t: &[f32], n: usize, k: usize, ld: usize) -> Self {
        let mut data = vec![0u16; k * n];
        for j in 0..n {
            for p in 0..k {
                data[p * n + j] = half::bf16::from_f32(t[j * ld + p]).to_bits();
            }
        }
        Self { k, n, data }
    }

    /// B = T, T k × n f32.
    pub fn from_f32(t: &[f32], k: usize, n: usize, ld: usize) -> Self {
        let mut data = vec![0u16; k * n];
        for p in 0..k {
            for j in 0..n {
                data[p * n + j] = half::bf16::from_f32(t[p * ld + j]).to_bits();
            }
        }
        Self { k, n, data }
    }

    /// B = Tᵀ, T n × k bf16.
    pub fn from_bf16_transposed(t: &[u16], n: usize, k: usize, ld: usize) -> Self {
        let mut data = vec![0u16; k * n];
        for j in 0..n {
            for p in 0..k {
                data[p * n + j] = t[j * ld + p];
            }
        }
        Self { k, n, data }
    }

    /// B = T, T k × n bf16.
    pub fn from_bf16(t: &[u16], k: usize, n: usize, ld: usize) -> Self {
        let mut data = vec![0u16; k * n];
        for p in 0..k {
            data[p * n..(p + 1) * n].copy_from_slice(&t[p * ld..p * ld + n]);
        }
        Self { k, n, data }
    }
}

/// C (m × n, ldc) = [C +] A·B, A m × k bf16 (lda).
pub fn gemm(m: usize, a: &[u16], lda: usize, b: &PackedB, c: &mut [f32], ldc: usize, accumulate: bool) {
    assert!(m == 0 || c.len() >= (m - 1) * ldc + b.n);
    // SAFETY: c holds the m × n block (checked above).
    unsafe { gemm_ptr(m, a, lda, b, c.as_mut_ptr(), ldc, accumulate) }
}

/// [`gemm`] through a raw output pointer (threads filling disjoint column blocks of one matrix).
///
/// # Safety
/// `c` must address an m × n block with row stride `ldc` that no other thread touches meanwhile.
pub unsafe fn gemm_ptr(m: usize, a: &[u16], lda: usize, b: &PackedB, c: *mut f32, ldc: usize, accumulate: bool) {
    let bf = |x: u16| f32::from_bits((x as u32) << 16);
    for i in 0..m {
        for j in 0..b.n {
            let mut s = 0f32;
            for p in 0..b.k {
                s += bf(a[i * lda + p]) * bf(b.data[p * b.n + j]);
            }
            // SAFETY: inside the caller's block.
            let o = unsafe { &mut *c.add(i * ldc + j) };
            *o = if accumulate { *o + s } else { s };
        }
    }
}
