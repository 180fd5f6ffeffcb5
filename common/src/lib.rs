//! fedsb-common: the library shared by the fedsb coordinator and clients. No networking lives here.
//!
//! Layout, in data-path order (ARCHITECTURE.md has the full map):
//! - [`train`]: datasets and batches, client partitions, the trainer, evaluation, greedy generation.
//! - [`model`]: Llama-family (Llama, Mistral, Qwen2, SmolLM2, Gemma-2) and BERT models with adapter slots;
//!   loading from Hugging Face folders and GGUF; tokenizers.
//! - [`frozen`]: frozen base weights kept in the checkpoint's format (f32, bf16, f16, GGUF blocks).
//! - [`ops`]: the differentiable operations models are built from; [`kernels`]: their fused CPU kernels with
//!   their own backward; [`bf16_gemm`], [`mkl`], [`simd`]: what the kernels run on.
//! - [`recompute`]: activation recomputation of whole blocks; [`profile`]: where a step's time goes.
//! - [`adapter`]: LoRA-SB, LoRA and FFA-LoRA adapters; the LoRA-SB initialization; randomized SVD.
//! - [`dp`]: DP-SGD — per-sample gradients, clipping and noise, the RDP accountant, reports and their check.
//! - [`tensors`]: [`TensorSet`], named tensors as saved, hashed and sent; [`wire`]: a set as a blob on the wire.
//! - [`spec`]: the run spec clients receive; [`method`]: [`Method`], the federated LoRA method of a run,
//!   parsed once at the edges; [`aggregate`]: the methods' aggregators;
//!   [`comm`]: the byte ledger and the per-method communication planner.
//! - [`export`]: PEFT and merged Hugging Face folders.
//! - [`assets`]: the asset folder of `scripts/fetch-assets.sh`; [`benchstats`]: peak RSS and medians for the
//!   bench commands; [`error`]: the library's error type.
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
#[cfg(test)]
mod testing;
pub mod train;
pub mod wire;

pub use error::{Error, Result};
pub use method::Method;
pub use tensors::TensorSet;
