//! Dropout launcher (see dropout.cu).

use cudarc::driver::PushKernelArg;

use super::cost::{F32, LaunchCost};
use super::{Cuda, DevMut, KernelSource, check, dev_err, grid_for};
use crate::{DropoutOps, Result};

const APPLY: &str = "dropout_apply";

pub(crate) const SOURCE: KernelSource =
    KernelSource { file: "dropout.cu", code: include_str!("dropout.cu"), kernels: &[APPLY] };

impl Cuda {
    fn dropout(&self, x: DevMut<'_>, p: f32, seed: u64) -> Result<()> {
        check("dropout", (0.0..1.0).contains(&p), || format!("p = {p} outside [0, 1)"))?;
        if p <= 0.0 || x.len == 0 {
            return Ok(());
        }
        let n = x.len as i64;
        // In place: one read, one write an element; the mask is a hash of (seed, index), so
        // it costs arithmetic (about 8 FLOP-like integer ops) and no memory.
        self.note(LaunchCost::kernel(APPLY, F32 * 2 * n as u64, 8 * n as u64));
        let mut l = self.stream().launch_builder(self.func(APPLY)?);
        l.arg(&x.ptr).arg(&n).arg(&p).arg(&seed);
        // SAFETY: a live exclusive view of n f32s.
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
