//! Cross-entropy launcher (see cross_entropy.cu): fp32 or bf16 logits (an activation, whose
//! gradient replaces it), fp32 losses.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::cost::{self, F32, I32, LaunchCost};
use super::{Cuda, DevMut, KernelSource, Typed, check, dev_err, require_f32};
use crate::{CrossEntropyOps, Dtype, Result};

const FUSED: Typed = Typed { f32: "cross_entropy_forward_backward", bf16: "cross_entropy_forward_backward_bf16" };

pub(crate) const SOURCE: KernelSource = KernelSource {
    file: "cross_entropy.cu",
    code: include_str!("cross_entropy.cu"),
    kernels: &[FUSED.f32, FUSED.bf16],
};

/// The fused loss over `rows x vocab` logits of `dtype`: reads the logits and labels, writes
/// the fp32 per-row losses and, when asked, the gradient over the logits (`dtype`); about 5
/// FLOPs a logit (max, exp, sum, gradient).
pub(crate) fn cost(rows: usize, vocab: usize, write_grad: bool, dtype: Dtype) -> LaunchCost {
    let (r, v) = (rows as u64, vocab as u64);
    let logit_passes = if write_grad { 2 } else { 1 };
    let name = if dtype == Dtype::Bf16 { FUSED.bf16 } else { FUSED.f32 };
    LaunchCost::kernel(name, cost::size(dtype) * logit_passes * r * v + F32 * r + I32 * r, 5 * r * v)
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
        require_f32("cross_entropy", &[losses.dtype])?;
        let (name, dtype) = FUSED.pick("cross_entropy", &[logits.dtype])?;
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
        self.note(cost(rows, vocab, write == 1, dtype));
        let mut l = self.stream().launch_builder(self.func(name)?);
        l.arg(&losses.ptr).arg(&logits.ptr).arg(&lp).arg(&v).arg(&ls).arg(&scale).arg(&write);
        // SAFETY: shapes and the label range checked; the kernel reads each row before it
        // overwrites it (write flag), one block per row.
        unsafe { l.launch(cfg) }.map(drop).map_err(dev_err)
    }
}
