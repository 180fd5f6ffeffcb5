//! fedsb-common: the library shared by the fedsb coordinator and clients. No networking lives here.
//!
//! Layout:
//! - [`ops`]: the differentiable operations models are built from (swappable for faster kernels).
//! - [`model`]: Llama and BERT models with adapter slots; loading from Hugging Face folders and GGUF.
//! - [`adapter`]: LoRA-SB, LoRA and FFA-LoRA adapters; the LoRA-SB initialization; randomized SVD.
//! - [`tensors`]: [`TensorSet`], named tensors as saved, hashed and sent.
//! - [`assets`]: the asset folder of `scripts/fetch-assets.sh`.
//! - [`benchstats`]: peak RSS and medians for the bench commands.
//! - [`method`]: [`Method`], the federated LoRA method of a run, parsed once at the edges.
pub mod adapter;
pub mod aggregate;
pub mod assets;
pub mod benchstats;
pub mod bf16_gemm;
pub mod comm;
pub mod dp;
pub mod error;
pub mod export;
pub mod frozen;
pub mod kernels;
pub mod method;
pub mod mkl;
pub mod model;
pub mod ops;
pub mod profile;
pub mod recompute;
pub mod simd;
pub mod spec;
pub mod tensors;
pub mod train;
pub mod wire;

pub use error::{Error, Result};
pub use method::Method;
pub use tensors::TensorSet;
