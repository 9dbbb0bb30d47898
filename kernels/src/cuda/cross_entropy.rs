//! Cross-entropy launcher (see cross_entropy.cu).

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::cost::{F32, I32, LaunchCost};
use super::{Cuda, DevMut, KernelSource, check, dev_err};
use crate::{CrossEntropyOps, Result};

const FUSED: &str = "cross_entropy_forward_backward";

pub(crate) const SOURCE: KernelSource =
    KernelSource { file: "cross_entropy.cu", code: include_str!("cross_entropy.cu"), kernels: &[FUSED] };

/// The fused loss over `rows x vocab` logits: reads the logits and labels, writes the per-row
/// losses and, when asked, the gradient over the logits; about 5 FLOPs a logit (max, exp, sum,
/// gradient).
fn cost(rows: usize, vocab: usize, write_grad: bool) -> LaunchCost {
    let (r, v) = (rows as u64, vocab as u64);
    let logit_passes = if write_grad { 2 } else { 1 };
    LaunchCost::kernel(FUSED, F32 * (logit_passes * r * v + r) + I32 * r, 5 * r * v)
}

impl CrossEntropyOps for Cuda {
    fn cross_entropy(
        &self,
        logits: DevMut<'_>,
        labels: &CudaSlice<i32>,
        first_label: usize,
        vocab: usize,
        ls: f32,
        grad_scale: Option<f32>,
        losses: DevMut<'_>,
    ) -> Result<()> {
        let rows = losses.len;
        let in_range = first_label.checked_add(rows).is_some_and(|end| end <= labels.len());
        check("cross_entropy", vocab > 0 && logits.len == rows * vocab && in_range, || {
            format!("logits {} labels {} from {first_label}, vocab {vocab}, losses {rows}", logits.len, labels.len())
        })?;
        if rows == 0 {
            return Ok(());
        }
        let (scale, write) = match grad_scale {
            Some(s) => (s, 1i32),
            None => (0.0f32, 0i32),
        };
        let v = vocab as i32;
        let lp = self.ids_ptr(labels) + (std::mem::size_of::<i32>() * first_label) as u64;
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        self.note(cost(rows, vocab, write == 1));
        let mut l = self.stream().launch_builder(self.func(FUSED)?);
        l.arg(&losses.ptr).arg(&logits.ptr).arg(&lp).arg(&v).arg(&ls).arg(&scale).arg(&write);
        // SAFETY: shapes and the label range checked; the kernel reads each row before it
        // overwrites it (write flag), one block per row.
        unsafe { l.launch(cfg) }.map(drop).map_err(dev_err)
    }
}
