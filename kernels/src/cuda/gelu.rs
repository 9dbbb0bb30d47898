//! Bias + GELU launchers (see gelu.cu).

use cudarc::driver::PushKernelArg;

use super::cost::{F32, LaunchCost};
use super::{Cuda, DevMut, DevRef, KernelSource, check, dev_err, grid_for};
use crate::{GeluOps, Result};

const FORWARD: &str = "gelu_bias_forward";
const BACKWARD: &str = "gelu_backward";

pub(crate) const SOURCE: KernelSource =
    KernelSource { file: "gelu.cu", code: include_str!("gelu.cu"), kernels: &[FORWARD, BACKWARD] };

/// `gelu_bias_forward` over `n` elements with a `c`-bias: reads pre and the bias, writes
/// `pre + bias` back and its GELU; about 10 FLOPs an element (erf counted as a few).
fn forward_cost(n: usize, c: usize) -> LaunchCost {
    let (n, c) = (n as u64, c as u64);
    LaunchCost::kernel(FORWARD, F32 * (3 * n + c), 10 * n)
}

/// `gelu_backward`: reads pre and dout, writes dpre; about 12 FLOPs an element (erf and exp).
fn backward_cost(n: usize) -> LaunchCost {
    let n = n as u64;
    LaunchCost::kernel(BACKWARD, F32 * 3 * n, 12 * n)
}

impl GeluOps for Cuda {
    fn bias_gelu_forward(&self, pre: DevMut<'_>, bias: DevRef<'_>, out: DevMut<'_>) -> Result<()> {
        let c = bias.len;
        check("bias_gelu_forward", c > 0 && pre.len.is_multiple_of(c) && out.len == pre.len, || {
            format!("pre {} out {} bias {c}", pre.len, out.len)
        })?;
        let (n, ci) = (pre.len as i64, c as i32);
        self.note(forward_cost(pre.len, c));
        let mut l = self.stream().launch_builder(self.func(FORWARD)?);
        l.arg(&pre.ptr).arg(&out.ptr).arg(&bias.ptr).arg(&n).arg(&ci);
        // SAFETY: shapes checked; pre/out exclusive.
        unsafe { l.launch(grid_for(pre.len, 256)) }.map(drop).map_err(dev_err)
    }

    fn bias_gelu_backward(&self, pre: DevRef<'_>, dout: DevRef<'_>, dpre: DevMut<'_>, dbias: DevMut<'_>) -> Result<()> {
        let c = dbias.len;
        check(
            "bias_gelu_backward",
            c > 0 && pre.len.is_multiple_of(c) && dout.len == pre.len && dpre.len == pre.len,
            || format!("pre {} dout {} dpre {} dbias {c}", pre.len, dout.len, dpre.len),
        )?;
        let n = pre.len as i64;
        self.note(backward_cost(pre.len));
        let mut l = self.stream().launch_builder(self.func(BACKWARD)?);
        l.arg(&dpre.ptr).arg(&pre.ptr).arg(&dout.ptr).arg(&n);
        // SAFETY: shapes checked; dpre exclusive.
        unsafe { l.launch(grid_for(pre.len, 256)) }.map(drop).map_err(dev_err)?;
        self.launch_column_sum(dbias.ptr, dpre.ptr, pre.len / c, c)
    }
}
