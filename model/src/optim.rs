//! AdamW over the flat parameter buffer, and learning-rate schedules.
//!
//! As HF's Trainer: no weight decay on biases and LayerNorm weights. Tensors that get no
//! gradient (the encoder pooler) are skipped entirely, as torch.optim skips `grad is None`.

use kernels::{AdamW, Backend};

use crate::error::Result;
use crate::params::ParamTable;

// The schedule and AdamW's constants are job settings (the `jobspec` crate): plain numbers the
// coordinator shares without this crate.
pub use jobspec::schedule::{AdamWConfig, Schedule, ScheduleKind};

/// AdamW moments (same layout as the parameters) and the number of updates made.
pub struct Optimizer<B: Backend> {
    pub config: AdamWConfig,
    pub m: B::Buf,
    pub v: B::Buf,
    pub step: u64,
}

impl<B: Backend> Optimizer<B> {
    pub fn new(b: &B, table: &ParamTable, config: AdamWConfig) -> Result<Self> {
        Ok(Self { config, m: b.zeros(table.storage_len)?, v: b.zeros(table.storage_len)?, step: 0 })
    }

    /// One update of every trainable tensor at learning rate `lr`.
    pub fn update(&mut self, b: &B, table: &ParamTable, params: &mut B::Buf, grads: &B::Buf, lr: f32) -> Result<()> {
        self.step += 1;
        for e in table.owned().filter(|e| !e.frozen) {
            let h = AdamW {
                lr,
                beta1: self.config.beta1,
                beta2: self.config.beta2,
                eps: self.config.eps,
                weight_decay: if e.no_decay { 0.0 } else { self.config.weight_decay },
                step: self.step,
            };
            let r = e.range();
            b.adamw(
                h,
                b.view_mut(params, r.clone()),
                b.view(grads, r.clone()),
                b.view_mut(&mut self.m, r.clone()),
                b.view_mut(&mut self.v, r),
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(kind: ScheduleKind) -> Schedule {
        Schedule { kind, peak_lr: 1e-3, warmup_steps: 10, total_steps: 110 }
    }

    #[test]
    fn warmup_is_linear_for_every_kind() {
        for k in [ScheduleKind::Linear, ScheduleKind::Cosine, ScheduleKind::Constant, ScheduleKind::Rsqrt] {
            let s = sched(k);
            assert_eq!(s.lr(0), 0.0);
            assert!((s.lr(5) - 5e-4).abs() < 1e-9);
            assert!((s.lr(10) - 1e-3).abs() < 1e-9, "{k:?} peaks at the end of warmup");
        }
    }

    #[test]
    fn decays_follow_their_formulas() {
        assert!((sched(ScheduleKind::Linear).lr(60) - 5e-4).abs() < 1e-9);
        assert_eq!(sched(ScheduleKind::Linear).lr(200), 0.0);
        assert!((sched(ScheduleKind::Cosine).lr(60) - 5e-4).abs() < 1e-9);
        assert!(sched(ScheduleKind::Cosine).lr(110).abs() < 1e-9);
        assert_eq!(sched(ScheduleKind::Constant).lr(100), 1e-3);
        assert!((sched(ScheduleKind::Rsqrt).lr(40) - 5e-4).abs() < 1e-9);
    }
}
