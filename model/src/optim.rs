//! AdamW over the flat parameter buffer, and learning-rate schedules.
//!
//! As HF's Trainer: no weight decay on biases and LayerNorm weights. Tensors that get no
//! gradient (the encoder pooler) are skipped entirely, as torch.optim skips `grad is None`.
//!
//! One step is one `adamw_flat` over the flat buffer (the no-decay mask is a chunk table
//! uploaded once, in `new`), with the global gradient norm and clipping computed on the
//! device: nothing is read back to the host until [`Optimizer::grad_norm`] is asked.

use kernels::{AdamW, Backend, FlatSegments};

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
    /// The trainable ranges with their decay flag, on the backend (built once).
    segments: FlatSegments<B::Ids>,
    /// The last update's global gradient norm (one float, on the backend).
    norm: B::Buf,
}

impl<B: Backend> Optimizer<B> {
    pub fn new(b: &B, table: &ParamTable, config: AdamWConfig) -> Result<Self> {
        let ranges: Vec<_> = table.owned().filter(|e| !e.frozen).map(|e| (e.range(), !e.no_decay)).collect();
        let segments = FlatSegments::new(b, table.storage_len, &ranges)?;
        Ok(Self {
            config,
            m: b.zeros(table.storage_len)?,
            v: b.zeros(table.storage_len)?,
            step: 0,
            segments,
            norm: b.zeros(1)?,
        })
    }

    /// One update of every trainable tensor at learning rate `lr`, without clipping.
    pub fn update(&mut self, b: &B, params: &mut B::Buf, grads: &B::Buf, lr: f32) -> Result<()> {
        self.update_clipped(b, params, grads, lr, 0.0)
    }

    /// One update of every trainable tensor at learning rate `lr`, the gradients first clipped
    /// to a global norm of `max_norm` (0: no clipping), as `kernels::clip_grad_norm` and then
    /// [`Optimizer::update`] would, in one launch with no host read-back. The norm (before
    /// clipping) is kept on the backend for [`Optimizer::grad_norm`]; `grads` is not changed.
    pub fn update_clipped(&mut self, b: &B, params: &mut B::Buf, grads: &B::Buf, lr: f32, max_norm: f32) -> Result<()> {
        self.update_clipped_with_copy(b, params, grads, None, lr, max_norm)
    }

    /// [`Optimizer::update_clipped`], also writing each updated parameter into `copy` (the
    /// model's GEMM copy of `params`, at the activation dtype) in the same launch.
    pub fn update_clipped_with_copy(
        &mut self,
        b: &B,
        params: &mut B::Buf,
        grads: &B::Buf,
        copy: Option<&mut B::Buf>,
        lr: f32,
        max_norm: f32,
    ) -> Result<()> {
        self.step += 1;
        let h = AdamW {
            lr,
            beta1: self.config.beta1,
            beta2: self.config.beta2,
            eps: self.config.eps,
            weight_decay: self.config.weight_decay,
            step: self.step,
        };
        let n = self.segments.len;
        b.adamw_flat(
            h,
            max_norm,
            &self.segments,
            b.view_mut(params, 0..n),
            b.view(grads, 0..n),
            b.view_mut(&mut self.m, 0..n),
            b.view_mut(&mut self.v, 0..n),
            b.view_mut(&mut self.norm, 0..1),
            copy.map(|c| b.view_mut(c, 0..n)),
        )?;
        Ok(())
    }

    /// The global gradient norm of the last update (before clipping); a host read-back.
    pub fn grad_norm(&self, b: &B) -> Result<f32> {
        Ok(b.download(b.view(&self.norm, 0..1))?[0])
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
