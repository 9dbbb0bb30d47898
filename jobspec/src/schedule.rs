//! The optimiser settings a job implies: the learning-rate schedule and AdamW's constants.
//! Plain numbers, here beside the job schema so that [`JobSpec::schedule`] and
//! [`JobSpec::adamw`] need no ML crate; `model::optim` runs them.
//!
//! [`JobSpec::schedule`]: crate::JobSpec::schedule
//! [`JobSpec::adamw`]: crate::JobSpec::adamw

pub use crate::names::ScheduleKind;

#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub peak_lr: f32,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl Schedule {
    /// Learning rate of the update made after `done` completed updates (0-based, as HF's
    /// LambdaLR calls it).
    pub fn lr(&self, done: u64) -> f32 {
        let (s, w, t) = (done as f64, self.warmup_steps as f64, self.total_steps as f64);
        if done < self.warmup_steps {
            return (self.peak_lr as f64 * s / w.max(1.0)) as f32;
        }
        let factor = match self.kind {
            ScheduleKind::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
            ScheduleKind::Cosine => {
                let progress = ((s - w) / (t - w).max(1.0)).min(1.0);
                0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Rsqrt => (w.max(1.0) / s.max(1.0)).sqrt(),
        };
        (self.peak_lr as f64 * factor) as f32
    }
}

#[derive(Clone, Copy, Debug)]
pub struct AdamWConfig {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}
