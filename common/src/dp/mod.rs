//! Differential privacy for local training (record-level DP-SGD on each client):
//! - [`accountant`]: the RDP accountant of the Poisson-subsampled Gaussian mechanism, and noise calibration;
//! - [`noise`]: Gaussian noise from a cryptographically secure generator;
//! - [`per_sample`]: exact per-sample gradients from per-sample copies of the trainable tensors;
//! - [`sgd`]: the DP-SGD step (Poisson sampling, clipping, noise) and the local DP training loop;
//! - [`report`]: what a client reports about its privacy spending with each update, and the run's DP spec.
pub mod accountant;
pub mod noise;
pub mod per_sample;
pub mod report;
pub mod sgd;

pub use accountant::RdpAccountant;
pub use noise::NoiseRng;
pub use per_sample::{PerSampleScope, per_sample};
pub use report::{DpReport, DpSpec};
pub use sgd::{DpSgdConfig, DpStepStats, train_dp};
