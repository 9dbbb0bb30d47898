//! Cross-entropy launcher (see cross_entropy.cu).

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::cost::{F32, I32, LaunchCost};
use super::{Cuda, DevMut, DevRef, KernelSource, check, dev_err};
use crate::{CrossEntropyOps, Result};

const FUSED: &str = "cross_entropy_forward_backward";

pub(crate) const SOURCE: KernelSource =
    KernelSource { file: "cross_entropy.cu", code: include_str!("cross_entropy.cu"), kernels: &[FUSED] };

/// The fused loss over `rows x vocab` logits: reads the logits and labels, writes the per-row
/// losses and, when asked, dlogits; about 5 FLOPs a logit (max, exp, sum, gradient).
fn cost(rows: usize, vocab: usize, write_grad: bool) -> LaunchCost {
    let (r, v) = (rows as u64, vocab as u64);
    let logit_passes = if write_grad { 2 } else { 1 };
    LaunchCost::kernel(FUSED, F32 * (logit_passes * r * v + r) + I32 * r, 5 * r * v)
}

impl CrossEntropyOps for Cuda {
    fn cross_entropy(
        &self,
        logits: DevRef<'_>,
        labels: &CudaSlice<i32>,
        vocab: usize,
        ls: f32,
        grad_scale: f32,
        losses: DevMut<'_>,
        dlogits: Option<DevMut<'_>>,
    ) -> Result<()> {
        let rows = losses.len;
        check("cross_entropy", vocab > 0 && logits.len == rows * vocab && rows <= labels.len(), || {
            format!("logits {} labels {} vocab {vocab} losses {rows}", logits.len, labels.len())
        })?;
        if let Some(d) = &dlogits {
            check("cross_entropy", d.len == logits.len, || format!("dlogits {} != logits {}", d.len, logits.len))?;
        }
        if rows == 0 {
            return Ok(());
        }
        let (dptr, write) = match &dlogits {
            Some(d) => (d.ptr, 1i32),
            None => (0u64, 0i32),
        };
        let (v, lp) = (vocab as i32, self.ids_ptr(labels));
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        self.note(cost(rows, vocab, write == 1));
        let mut l = self.stream().launch_builder(self.func(FUSED)?);
        l.arg(&losses.ptr).arg(&dptr).arg(&logits.ptr).arg(&lp).arg(&v).arg(&ls).arg(&grad_scale).arg(&write);
        // SAFETY: shapes checked; `dlogits` is only written when present (write flag).
        unsafe { l.launch(cfg) }.map(drop).map_err(dev_err)
    }
}
