//! Learning-rate schedules: linear warm-up, then cosine, linear or constant.
use serde::{Deserialize, Serialize};

/// The shape of the learning rate after warm-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScheduleKind {
    /// Half a cosine from the peak down to 0.
    Cosine,
    /// A straight line from the peak down to 0.
    Linear,
    /// The peak throughout.
    Constant,
}

impl std::str::FromStr for ScheduleKind {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s {
            "cosine" => Ok(Self::Cosine),
            "linear" => Ok(Self::Linear),
            "constant" => Ok(Self::Constant),
            o => Err(crate::Error::Config(format!("unknown schedule `{o}` (cosine, linear, constant)"))),
        }
    }
}

/// A learning-rate schedule over `total` optimizer steps, numbered from 1.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    /// Peak learning rate.
    pub peak: f64,
    /// Number of warm-up steps.
    pub warmup: usize,
    /// Total number of optimizer steps.
    pub total: usize,
    /// Shape after warm-up.
    pub kind: ScheduleKind,
}

impl LrSchedule {
    /// A schedule whose warm-up is `ceil(warmup_ratio · total)` steps.
    pub fn new(peak: f64, warmup_ratio: f64, total: usize, kind: ScheduleKind) -> Self {
        let warmup = ((warmup_ratio.clamp(0.0, 1.0) * total as f64).ceil() as usize).min(total);
        Self { peak, warmup, total, kind }
    }

    /// The learning rate of optimizer step `step` (1-based). Step 1 of a warm-up uses `peak / warmup`
    /// (not 0, as a 0-based schedule would), which is also the step size the LoRA-SB init approximates.
    pub fn lr(&self, step: usize) -> f64 {
        let step = step.max(1);
        if step <= self.warmup {
            return self.peak * step as f64 / self.warmup as f64;
        }
        // Decay steps are numbered from 0, so the first one uses the peak and the last one stays above 0.
        let rest = self.total.saturating_sub(self.warmup).max(1) as f64;
        let progress = ((step - self.warmup - 1) as f64 / rest).clamp(0.0, 1.0);
        match self.kind {
            ScheduleKind::Constant => self.peak,
            ScheduleKind::Linear => self.peak * (1.0 - progress),
            ScheduleKind::Cosine => self.peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        }
    }

    /// The learning rate of the first step.
    pub fn first_lr(&self) -> f64 {
        self.lr(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay() {
        let s = LrSchedule::new(1e-3, 0.1, 100, ScheduleKind::Cosine);
        assert_eq!(s.warmup, 10);
        assert!((s.lr(1) - 1e-4).abs() < 1e-12);
        assert!((s.lr(10) - 1e-3).abs() < 1e-12);
        assert!(s.lr(55) < 1e-3 && s.lr(55) > 0.0);
        assert!((s.lr(11) - 1e-3).abs() < 1e-12, "the first decay step uses the peak");
        assert!(s.lr(100) > 0.0 && s.lr(100) < 1e-5);
        let l = LrSchedule::new(1.0, 0.0, 4, ScheduleKind::Linear);
        assert_eq!([l.lr(1), l.lr(2), l.lr(4)], [1.0, 0.75, 0.25]);
        assert_eq!(LrSchedule::new(1.0, 0.0, 1, ScheduleKind::Cosine).lr(1), 1.0, "a one-step run is not wasted");
        assert_eq!(LrSchedule::new(2.0, 0.0, 3, ScheduleKind::Constant).lr(3), 2.0);
    }
}
