//! [`QuantMatrix`]: a 2-D weight kept in one of GGUF's block formats (Q4_0, Q8_0, Q4_K, Q6_K, ...), read a tile
//! at a time.
//!
//! Each row of `cols` values is `cols / block_size` blocks of the format, rows one after another, exactly as a
//! GGUF file stores them; candle's `k_quants` block types and their `to_float` / `from_float` (the ggml
//! reference code) do the per-block work. Rows can be permuted (llama.cpp's Q/K row order is undone on load)
//! and any block-aligned tile can be dequantized without touching the rest of the matrix.
use candle_core::quantized::GgmlDType;
use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K, BlockQ8_0, GgmlType,
};
use rayon::prelude::*;

use crate::{Error, Result};

/// The GGUF block formats a frozen weight can be kept in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantKind {
    /// 32 values: f16 scale + 4-bit values.
    Q4_0,
    /// 32 values: f16 scale and minimum + 4-bit values.
    Q4_1,
    /// 32 values: f16 scale + 5-bit values.
    Q5_0,
    /// 32 values: f16 scale and minimum + 5-bit values.
    Q5_1,
    /// 32 values: f16 scale + 8-bit values.
    Q8_0,
    /// 256 values, 2-bit k-quant.
    Q2K,
    /// 256 values, 3-bit k-quant.
    Q3K,
    /// 256 values, 4-bit k-quant.
    Q4K,
    /// 256 values, 5-bit k-quant.
    Q5K,
    /// 256 values, 6-bit k-quant.
    Q6K,
}

impl QuantKind {
    /// Every supported format, in the order error messages list them.
    pub const ALL: &'static [QuantKind] = &[
        QuantKind::Q4_0,
        QuantKind::Q4_1,
        QuantKind::Q5_0,
        QuantKind::Q5_1,
        QuantKind::Q8_0,
        QuantKind::Q2K,
        QuantKind::Q3K,
        QuantKind::Q4K,
        QuantKind::Q5K,
        QuantKind::Q6K,
    ];

    /// The lower-case name (`q4_0`, `q4_k`), as `--dtype` takes it and llama.cpp names it.
    pub fn name(self) -> &'static str {
        match self {
            QuantKind::Q4_0 => "q4_0",
            QuantKind::Q4_1 => "q4_1",
            QuantKind::Q5_0 => "q5_0",
            QuantKind::Q5_1 => "q5_1",
            QuantKind::Q8_0 => "q8_0",
            QuantKind::Q2K => "q2_k",
            QuantKind::Q3K => "q3_k",
            QuantKind::Q4K => "q4_k",
            QuantKind::Q5K => "q5_k",
            QuantKind::Q6K => "q6_k",
        }
    }

    /// The format of a GGUF tensor type, if it is one of these.
    pub fn from_ggml(t: GgmlDType) -> Option<Self> {
        Some(match t {
            GgmlDType::Q4_0 => QuantKind::Q4_0,
            GgmlDType::Q4_1 => QuantKind::Q4_1,
            GgmlDType::Q5_0 => QuantKind::Q5_0,
            GgmlDType::Q5_1 => QuantKind::Q5_1,
            GgmlDType::Q8_0 => QuantKind::Q8_0,
            GgmlDType::Q2K => QuantKind::Q2K,
            GgmlDType::Q3K => QuantKind::Q3K,
            GgmlDType::Q4K => QuantKind::Q4K,
            GgmlDType::Q5K => QuantKind::Q5K,
            GgmlDType::Q6K => QuantKind::Q6K,
            _ => return None,
        })
    }

    /// The GGUF tensor type.
    pub fn ggml(self) -> GgmlDType {
        match self {
            QuantKind::Q4_0 => GgmlDType::Q4_0,
            QuantKind::Q4_1 => GgmlDType::Q4_1,
            QuantKind::Q5_0 => GgmlDType::Q5_0,
            QuantKind::Q5_1 => GgmlDType::Q5_1,
            QuantKind::Q8_0 => GgmlDType::Q8_0,
            QuantKind::Q2K => GgmlDType::Q2K,
            QuantKind::Q3K => GgmlDType::Q3K,
            QuantKind::Q4K => GgmlDType::Q4K,
            QuantKind::Q5K => GgmlDType::Q5K,
            QuantKind::Q6K => GgmlDType::Q6K,
        }
    }

    /// Values per block.
    pub fn block_size(self) -> usize {
        self.ggml().block_size()
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        self.ggml().type_size()
    }
}

/// The blocks of a matrix, typed by format.
#[derive(Clone)]
enum Blocks {
    Q4_0(Vec<BlockQ4_0>),
    Q4_1(Vec<BlockQ4_1>),
    Q5_0(Vec<BlockQ5_0>),
    Q5_1(Vec<BlockQ5_1>),
    Q8_0(Vec<BlockQ8_0>),
    Q2K(Vec<BlockQ2K>),
    Q3K(Vec<BlockQ3K>),
    Q4K(Vec<BlockQ4K>),
    Q5K(Vec<BlockQ5K>),
    Q6K(Vec<BlockQ6K>),
}

/// Runs `$body` with `$v` bound to the typed block vector (`$T` its block type).
macro_rules! with_blocks {
    ($blocks:expr, $v:ident, $T:ident => $body:expr) => {
        match $blocks {
            Blocks::Q4_0($v) => {
                type $T = BlockQ4_0;
                $body
            }
            Blocks::Q4_1($v) => {
                type $T = BlockQ4_1;
                $body
            }
            Blocks::Q5_0($v) => {
                type $T = BlockQ5_0;
                $body
            }
            Blocks::Q5_1($v) => {
                type $T = BlockQ5_1;
                $body
            }
            Blocks::Q8_0($v) => {
                type $T = BlockQ8_0;
                $body
            }
            Blocks::Q2K($v) => {
                type $T = BlockQ2K;
                $body
            }
            Blocks::Q3K($v) => {
                type $T = BlockQ3K;
                $body
            }
            Blocks::Q4K($v) => {
                type $T = BlockQ4K;
                $body
            }
            Blocks::Q5K($v) => {
                type $T = BlockQ5K;
                $body
            }
            Blocks::Q6K($v) => {
                type $T = BlockQ6K;
                $body
            }
        }
    };
}

/// Runs `$body` with `$T` the block type of `$kind`.
macro_rules! with_kind {
    ($kind:expr, $T:ident => $body:expr) => {
        match $kind {
            QuantKind::Q4_0 => {
                type $T = BlockQ4_0;
                $body
            }
            QuantKind::Q4_1 => {
                type $T = BlockQ4_1;
                $body
            }
            QuantKind::Q5_0 => {
                type $T = BlockQ5_0;
                $body
            }
            QuantKind::Q5_1 => {
                type $T = BlockQ5_1;
                $body
            }
            QuantKind::Q8_0 => {
                type $T = BlockQ8_0;
                $body
            }
            QuantKind::Q2K => {
                type $T = BlockQ2K;
                $body
            }
            QuantKind::Q3K => {
                type $T = BlockQ3K;
                $body
            }
            QuantKind::Q4K => {
                type $T = BlockQ4K;
                $body
            }
            QuantKind::Q5K => {
                type $T = BlockQ5K;
                $body
            }
            QuantKind::Q6K => {
                type $T = BlockQ6K;
                $body
            }
        }
    };
}

/// Wraps a typed vector as [`Blocks`].
trait IntoBlocks: Sized {
    fn into_blocks(v: Vec<Self>) -> Blocks;
}

macro_rules! into_blocks {
    ($($T:ident => $V:ident),*) => {
        $(impl IntoBlocks for $T {
            fn into_blocks(v: Vec<Self>) -> Blocks {
                Blocks::$V(v)
            }
        })*
    };
}
into_blocks!(BlockQ4_0 => Q4_0, BlockQ4_1 => Q4_1, BlockQ5_0 => Q5_0, BlockQ5_1 => Q5_1, BlockQ8_0 => Q8_0,
    BlockQ2K => Q2K, BlockQ3K => Q3K, BlockQ4K => Q4K, BlockQ5K => Q5K, BlockQ6K => Q6K);

/// Rows per parallel piece of the (de)quantizing loops.
const ROWS_PER_TASK: usize = 16;

/// A `rows × cols` matrix in a GGUF block format.
#[derive(Clone)]
pub struct QuantMatrix {
    kind: QuantKind,
    rows: usize,
    cols: usize,
    blocks: Blocks,
}

impl std::fmt::Debug for QuantMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QuantMatrix({}, {}×{})", self.kind.name(), self.rows, self.cols)
    }
}

impl QuantMatrix {
    /// Checks that rows of `cols` values split into whole blocks of `kind`.
    pub fn check_shape(kind: QuantKind, name: &str, rows: usize, cols: usize) -> Result<()> {
        let bs = kind.block_size();
        if cols == 0 || rows == 0 || !cols.is_multiple_of(bs) {
            return Err(Error::tensor(
                name,
                format!(
                    "a {rows}×{cols} matrix cannot be stored as {}: its rows must be a multiple of {bs} values",
                    kind.name()
                ),
            ));
        }
        Ok(())
    }

    /// The matrix stored in `bytes` as a GGUF file holds it (rows of blocks, little-endian).
    pub fn from_bytes(kind: QuantKind, rows: usize, cols: usize, bytes: &[u8]) -> Result<Self> {
        Self::check_shape(kind, "quantized tensor", rows, cols)?;
        let nblocks = rows * cols / kind.block_size();
        if bytes.len() != nblocks * kind.block_bytes() {
            return Err(Error::Model(format!(
                "{} data of a {rows}×{cols} matrix: {} bytes, expected {}",
                kind.name(),
                bytes.len(),
                nblocks * kind.block_bytes()
            )));
        }
        fn typed<T: Clone + IntoBlocks>(bytes: &[u8], n: usize) -> Blocks {
            debug_assert_eq!(bytes.len(), n * std::mem::size_of::<T>());
            let mut v: Vec<T> = Vec::with_capacity(n);
            // SAFETY: the block types are `repr(C)` structs of integers and f16 (every bit pattern is a valid
            // value, no padding: their sizes are the GGUF block sizes); `bytes` holds exactly `n` of them and the
            // destination has room for `n`.
            unsafe {
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), v.as_mut_ptr() as *mut u8, bytes.len());
                v.set_len(n);
            }
            T::into_blocks(v)
        }
        let blocks = with_kind!(kind, T => typed::<T>(bytes, nblocks));
        Ok(Self { kind, rows, cols, blocks })
    }

    /// Quantizes a row-major `rows × cols` f32 matrix (ggml's reference quantizers, rows in parallel).
    pub fn quantize(kind: QuantKind, name: &str, rows: usize, cols: usize, data: &[f32]) -> Result<Self> {
        Self::check_shape(kind, name, rows, cols)?;
        if data.len() != rows * cols {
            return Err(Error::tensor(name, format!("{} values for a {rows}×{cols} matrix", data.len())));
        }
        if let Some(bad) = data.iter().position(|v| !v.is_finite()) {
            return Err(Error::tensor(name, format!("value {} at {bad} is not finite", data[bad])));
        }
        fn run<T: GgmlType + IntoBlocks>(rows: usize, cols: usize, data: &[f32]) -> Blocks {
            let per_row = cols / T::BLCK_SIZE;
            let mut v = vec![T::zeros(); rows * per_row];
            v.par_chunks_mut(per_row * ROWS_PER_TASK).zip(data.par_chunks(cols * ROWS_PER_TASK)).for_each(|(b, x)| {
                for (b, x) in b.chunks_mut(per_row).zip(x.chunks(cols)) {
                    T::from_float(x, b);
                }
            });
            T::into_blocks(v)
        }
        let blocks = with_kind!(kind, T => run::<T>(rows, cols, data));
        Ok(Self { kind, rows, cols, blocks })
    }

    /// The format.
    pub fn kind(&self) -> QuantKind {
        self.kind
    }

    /// `(rows, cols)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.rows * self.cols / self.kind.block_size() * self.kind.block_bytes()
    }

    /// Dequantizes the tile of rows `r0..r1` and columns `c0..c1` into `dst` (row stride `ld`). The columns
    /// must start and end on block boundaries (or end at `cols`).
    pub fn dequantize_tile(&self, (r0, r1): (usize, usize), (c0, c1): (usize, usize), dst: &mut [f32], ld: usize) {
        let bs = self.kind.block_size();
        debug_assert!(r1 <= self.rows && c1 <= self.cols && c0.is_multiple_of(bs) && c1.is_multiple_of(bs));
        let per_row = self.cols / bs;
        let (b0, b1) = (c0 / bs, c1 / bs);
        let w = c1 - c0;
        with_blocks!(&self.blocks, v, T => {
            for (i, r) in (r0..r1).enumerate() {
                let blocks = &v[r * per_row + b0..r * per_row + b1];
                T::to_float(blocks, &mut dst[i * ld..i * ld + w]);
            }
        })
    }

    /// The whole matrix as f32, row-major (rows in parallel).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        let cols = self.cols;
        out.par_chunks_mut(cols * ROWS_PER_TASK).enumerate().for_each(|(i, chunk)| {
            let r0 = i * ROWS_PER_TASK;
            let r1 = r0 + chunk.len() / cols;
            self.dequantize_tile((r0, r1), (0, cols), chunk, cols);
        });
        out
    }

    /// The rows `ids` (each `< rows`), dequantized one after another: an embedding lookup.
    pub fn gather_rows(&self, ids: &[u32], dst: &mut [f32]) -> Result<()> {
        let cols = self.cols;
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= self.rows) {
            return Err(Error::Data(format!("token id {bad} is outside the {}-row embedding", self.rows)));
        }
        dst.par_chunks_mut(cols).zip(ids.par_iter()).for_each(|(d, &id)| {
            self.dequantize_tile((id as usize, id as usize + 1), (0, cols), d, cols);
        });
        Ok(())
    }

    /// The same matrix with its rows reordered: row `i` of the result is row `perm[i]` of this one.
    pub fn permute_rows(&self, perm: &[usize]) -> Result<Self> {
        if perm.len() != self.rows || perm.iter().any(|&p| p >= self.rows) {
            return Err(Error::Model(format!("a row permutation of {} entries for {} rows", perm.len(), self.rows)));
        }
        let per_row = self.cols / self.kind.block_size();
        fn run<T: Clone + IntoBlocks>(v: &[T], perm: &[usize], per_row: usize) -> Blocks {
            let mut out = Vec::with_capacity(v.len());
            for &p in perm {
                out.extend_from_slice(&v[p * per_row..(p + 1) * per_row]);
            }
            T::into_blocks(out)
        }
        let blocks = with_blocks!(&self.blocks, v, T => run::<T>(v, perm, per_row));
        Ok(Self { kind: self.kind, rows: self.rows, cols: self.cols, blocks })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn data(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..rows * cols).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    #[test]
    fn every_format_round_trips_within_its_precision_and_tiles_match_the_whole() {
        let (rows, cols) = (5, 512);
        let x = data(rows, cols, 1);
        // Worst relative RMS error of a round trip, per format (ggml's reference quantizers on U(-1, 1)).
        for &kind in QuantKind::ALL {
            let q = QuantMatrix::quantize(kind, "w", rows, cols, &x).unwrap();
            assert_eq!(q.bytes(), rows * cols / kind.block_size() * kind.block_bytes());
            let y = q.dequantize();
            let err = (x.iter().zip(&y).map(|(a, b)| (a - b) * (a - b)).sum::<f32>() / x.len() as f32).sqrt();
            let bits = match kind {
                QuantKind::Q2K => 2,
                QuantKind::Q3K => 3,
                QuantKind::Q4_0 | QuantKind::Q4_1 | QuantKind::Q4K => 4,
                QuantKind::Q5_0 | QuantKind::Q5_1 | QuantKind::Q5K => 5,
                QuantKind::Q6K => 6,
                QuantKind::Q8_0 => 8,
            };
            // A uniform quantizer of 2^bits levels over [-1, 1] has RMS error 2/2^bits/√12; allow 2.5×.
            let bound = 2.5 * 2.0 / (1u32 << bits) as f32 / 12f32.sqrt();
            assert!(err < bound, "{}: RMS error {err} above {bound}", kind.name());
            // A block-aligned tile equals the same part of the whole.
            let bs = kind.block_size();
            let (c0, c1) = (bs, 2 * bs);
            let mut tile = vec![0f32; 3 * bs];
            q.dequantize_tile((1, 4), (c0, c1), &mut tile, bs);
            for i in 0..3 {
                assert_eq!(&tile[i * bs..(i + 1) * bs], &y[(1 + i) * cols + c0..(1 + i) * cols + c1]);
            }
            // Bytes in, the same matrix out.
            let bytes: Vec<u8> = with_blocks!(&q.blocks, v, T => {
                // SAFETY: plain-old-data blocks viewed as bytes.
                unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, v.len() * std::mem::size_of::<T>()) }
                    .to_vec()
            });
            let q2 = QuantMatrix::from_bytes(kind, rows, cols, &bytes).unwrap();
            assert_eq!(q2.dequantize(), y);
            // Gathered and permuted rows.
            let mut g = vec![0f32; 2 * cols];
            q.gather_rows(&[4, 0], &mut g).unwrap();
            assert_eq!(&g[..cols], &y[4 * cols..]);
            assert_eq!(&g[cols..], &y[..cols]);
            let p = q.permute_rows(&[2, 0, 1, 4, 3]).unwrap().dequantize();
            assert_eq!(&p[..cols], &y[2 * cols..3 * cols]);
            assert_eq!(&p[4 * cols..], &y[3 * cols..4 * cols]);
        }
    }

    #[test]
    fn bad_shapes_bytes_and_values_are_refused() {
        let e = QuantMatrix::quantize(QuantKind::Q4K, "model.layers.0.mlp.up_proj.weight", 2, 384, &data(2, 384, 2))
            .unwrap_err()
            .to_string();
        assert!(e.contains("up_proj") && e.contains("q4_k") && e.contains("256"), "{e}");
        assert!(QuantMatrix::quantize(QuantKind::Q8_0, "w", 2, 32, &data(2, 16, 3)).is_err());
        let mut x = data(1, 32, 4);
        x[3] = f32::NAN;
        assert!(QuantMatrix::quantize(QuantKind::Q8_0, "w", 1, 32, &x).is_err());
        assert!(QuantMatrix::from_bytes(QuantKind::Q8_0, 1, 32, &[0u8; 33]).is_err());
        let q = QuantMatrix::quantize(QuantKind::Q8_0, "w", 2, 32, &data(2, 32, 5)).unwrap();
        assert!(q.gather_rows(&[2], &mut [0f32; 32]).is_err());
        assert!(q.permute_rows(&[0]).is_err());
        assert!(q.permute_rows(&[0, 2]).is_err());
    }
}
