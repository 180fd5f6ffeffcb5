//! `fedsb-client privacy`: the RDP accountant of the Poisson-subsampled Gaussian mechanism as commands, for
//! planning a private run (the same code the clients account with, matching Opacus' RDP accountant).
//!
//! The last line of each command's output is a plain number (ε, or σ), so scripts can read it with `tail -1`.
use anyhow::Result;
use clap::{Args, Subcommand};
use fedsb_common::dp::accountant::{epsilon_for, noise_multiplier_for};

/// Arguments of `fedsb-client privacy`.
#[derive(Args, Debug)]
pub struct PrivacyArgs {
    #[command(subcommand)]
    command: PrivacyCommand,
}

#[derive(Subcommand, Debug)]
enum PrivacyCommand {
    /// ε spent by `--steps` DP-SGD steps at sampling rate q and noise multiplier σ, for δ.
    Epsilon {
        /// Poisson sampling rate q (expected batch / local dataset size), in [0, 1].
        #[arg(long)]
        sample_rate: f64,
        /// Noise multiplier σ (noise std = σ·C).
        #[arg(long)]
        noise_multiplier: f64,
        /// Number of DP-SGD steps.
        #[arg(long)]
        steps: u64,
        /// δ (below 1/N for N records).
        #[arg(long)]
        delta: f64,
    },
    /// The noise multiplier σ that spends at most `--target-epsilon` in `--steps` steps (bisection to within
    /// `--epsilon-tolerance` below the target, as Opacus' `get_noise_multiplier`).
    Noise {
        /// The ε to spend.
        #[arg(long)]
        target_epsilon: f64,
        /// δ.
        #[arg(long)]
        delta: f64,
        /// Poisson sampling rate q.
        #[arg(long)]
        sample_rate: f64,
        /// Number of DP-SGD steps.
        #[arg(long)]
        steps: u64,
        /// How far below the target the ε of the returned σ may be.
        #[arg(long, default_value_t = 0.01)]
        epsilon_tolerance: f64,
    },
}

/// Runs `fedsb-client privacy`.
pub fn run(a: PrivacyArgs) -> Result<()> {
    match a.command {
        PrivacyCommand::Epsilon { sample_rate, noise_multiplier, steps, delta } => {
            let (eps, order) = epsilon_for(sample_rate, noise_multiplier, steps, delta)?;
            println!(
                "RDP accountant (Poisson-subsampled Gaussian): q = {sample_rate}, σ = {noise_multiplier}, \
                 {steps} steps, δ = {delta:e}"
            );
            println!("best RDP order α = {order}");
            println!("{eps}");
        }
        PrivacyCommand::Noise { target_epsilon, delta, sample_rate, steps, epsilon_tolerance } => {
            let sigma = noise_multiplier_for(target_epsilon, delta, sample_rate, steps, epsilon_tolerance)?;
            let (eps, order) = epsilon_for(sample_rate, sigma, steps, delta)?;
            println!(
                "noise for ε ≤ {target_epsilon} at δ = {delta:e}: q = {sample_rate}, {steps} steps (tolerance \
                 {epsilon_tolerance})"
            );
            println!("achieved ε = {eps} (best RDP order α = {order})");
            println!("{sigma}");
        }
    }
    Ok(())
}
