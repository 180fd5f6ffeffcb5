//! Progress output for long work: a live bar on a terminal, periodic plain lines otherwise (logs, CI).
use std::io::IsTerminal;
use std::time::Duration;

use fedsb_common::train::StepReport;
use indicatif::{ProgressBar, ProgressStyle};

/// Reports training steps: step, loss, learning rate, tokens/s and ETA.
pub struct StepProgress {
    bar: Option<ProgressBar>,
    total: usize,
    every: usize,
    tokens: usize,
    loss_ema: Option<f64>,
}

impl StepProgress {
    /// A reporter for `total` steps.
    pub fn new(total: usize, label: &str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::new(total as u64);
            b.set_style(
                ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            b.set_prefix(label.to_string());
            b.enable_steady_tick(Duration::from_millis(500));
            b
        });
        Self { bar, total, every: (total / 20).max(1), tokens: 0, loss_ema: None }
    }

    /// Records one step.
    pub fn step(&mut self, r: &StepReport) {
        self.tokens += r.tokens;
        let ema = match self.loss_ema {
            None => r.loss,
            Some(e) => 0.9 * e + 0.1 * r.loss,
        };
        self.loss_ema = Some(ema);
        let secs = r.elapsed.as_secs_f64().max(1e-9);
        let tps = self.tokens as f64 / secs;
        let msg = format!("loss {:.4} (avg {ema:.4}) lr {:.2e} | {tps:.0} tok/s", r.loss, r.lr);
        match &self.bar {
            Some(b) => {
                b.set_position(r.step as u64);
                b.set_message(msg);
            }
            None => {
                if r.step.is_multiple_of(self.every) || r.step == 1 || r.step == self.total {
                    let eta = secs / r.step as f64 * (self.total - r.step) as f64;
                    eprintln!("step {}/{} {msg} | elapsed {secs:.0}s ETA {eta:.0}s", r.step, self.total);
                }
            }
        }
    }

    /// Ends the bar.
    pub fn finish(self) {
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
    }
}

/// A simple counter for other long loops (init layers, generation).
pub struct CountProgress {
    bar: Option<ProgressBar>,
    label: String,
    every: usize,
}

impl CountProgress {
    /// A counter labelled `label` up to `total`.
    pub fn new(total: usize, label: &str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::new(total as u64);
            b.set_style(
                ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} ETA {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            b.set_prefix(label.to_string());
            b
        });
        Self { bar, label: label.to_string(), every: (total / 10).max(1) }
    }

    /// Sets the count.
    pub fn set(&self, done: usize, total: usize) {
        match &self.bar {
            Some(b) => b.set_position(done as u64),
            None => {
                if done.is_multiple_of(self.every) || done == total {
                    eprintln!("{}: {done}/{total}", self.label);
                }
            }
        }
    }

    /// Ends the bar.
    pub fn finish(self) {
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
    }
}
