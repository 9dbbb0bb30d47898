//! Dropout launcher (see dropout.cu): fp32 or bf16 activations.

use cudarc::driver::PushKernelArg;

use super::cost::{self, LaunchCost};
use super::{Cuda, DevMut, KernelSource, Typed, check, dev_err, grid_for};
use crate::{DropoutOps, Dtype, Result};

const APPLY: Typed = Typed { f32: "dropout_apply", bf16: "dropout_apply_bf16" };

pub(crate) const SOURCE: KernelSource =
    KernelSource { file: "dropout.cu", code: include_str!("dropout.cu"), kernels: &[APPLY.f32, APPLY.bf16] };

/// In place over `n` elements of `dtype`: one read, one write an element; the mask is a hash of
/// (seed, index), so it costs arithmetic (about 8 FLOP-like integer ops) and no memory.
pub(crate) fn apply_cost(n: usize, dtype: Dtype) -> LaunchCost {
    let n = n as u64;
    let name = if dtype == Dtype::Bf16 { APPLY.bf16 } else { APPLY.f32 };
    LaunchCost::kernel(name, cost::size(dtype) * 2 * n, 8 * n)
}

impl Cuda {
    fn dropout(&self, x: DevMut<'_>, p: f32, seed: u64) -> Result<()> {
        check("dropout", (0.0..1.0).contains(&p), || format!("p = {p} outside [0, 1)"))?;
        let (name, dtype) = APPLY.pick("dropout", &[x.dtype])?;
        if p <= 0.0 || x.len == 0 {
            return Ok(());
        }
        let n = x.len as i64;
        self.note(apply_cost(x.len, dtype));
        let mut l = self.stream().launch_builder(self.func(name)?);
        l.arg(&x.ptr).arg(&n).arg(&p).arg(&seed);
        // SAFETY: a live exclusive view of n elements of its dtype.
        unsafe { l.launch(grid_for(x.len, 256)) }.map(drop).map_err(dev_err)
    }
}

impl DropoutOps for Cuda {
    fn dropout_forward(&self, x: DevMut<'_>, p: f32, seed: u64) -> Result<()> {
        self.dropout(x, p, seed)
    }
    fn dropout_backward(&self, dx: DevMut<'_>, p: f32, seed: u64) -> Result<()> {
        self.dropout(dx, p, seed)
    }
}
