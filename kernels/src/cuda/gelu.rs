//! Bias + GELU launchers (see gelu.cu): fp32 or bf16 activations, fp32 bias and bias gradient.

use cudarc::driver::PushKernelArg;

use super::cost::{self, F32, LaunchCost};
use super::{Cuda, DevMut, DevRef, KernelSource, Typed, check, dev_err, grid_for, require_f32};
use crate::{Dtype, GeluOps, Memory, Result};

const FORWARD: Typed = Typed { f32: "gelu_bias_forward", bf16: "gelu_bias_forward_bf16" };
const BACKWARD: Typed = Typed { f32: "gelu_backward", bf16: "gelu_backward_bf16" };
const PLAIN: Typed = Typed { f32: "gelu_forward", bf16: "gelu_forward_bf16" };

pub(crate) const SOURCE: KernelSource = KernelSource {
    file: "gelu.cu",
    code: include_str!("gelu.cu"),
    kernels: &[FORWARD.f32, FORWARD.bf16, PLAIN.f32, PLAIN.bf16, BACKWARD.f32, BACKWARD.bf16],
};

/// `gelu_bias_forward` over `n` elements of `dtype` with a `c`-bias (fp32): reads pre and the
/// bias, writes `pre + bias` back and its GELU; about 10 FLOPs an element (erf counted as a few).
pub(crate) fn forward_cost(n: usize, c: usize, dtype: Dtype) -> LaunchCost {
    let (n, c) = (n as u64, c as u64);
    let name = if dtype == Dtype::Bf16 { FORWARD.bf16 } else { FORWARD.f32 };
    LaunchCost::kernel(name, cost::size(dtype) * 3 * n + F32 * c, 10 * n)
}

/// `gelu_forward`: reads pre, writes out (both `dtype`); about 10 FLOPs an element.
pub(crate) fn plain_cost(n: usize, dtype: Dtype) -> LaunchCost {
    let n = n as u64;
    let name = if dtype == Dtype::Bf16 { PLAIN.bf16 } else { PLAIN.f32 };
    LaunchCost::kernel(name, cost::size(dtype) * 2 * n, 10 * n)
}

/// `gelu_backward`: reads pre and dout, writes dpre (all `dtype`); about 12 FLOPs an element
/// (erf and exp).
pub(crate) fn backward_cost(n: usize, dtype: Dtype) -> LaunchCost {
    let n = n as u64;
    let name = if dtype == Dtype::Bf16 { BACKWARD.bf16 } else { BACKWARD.f32 };
    LaunchCost::kernel(name, cost::size(dtype) * 3 * n, 12 * n)
}

impl GeluOps for Cuda {
    fn bias_gelu_forward(&self, pre: DevMut<'_>, bias: DevRef<'_>, out: DevMut<'_>) -> Result<()> {
        let c = bias.len;
        check("bias_gelu_forward", c > 0 && pre.len.is_multiple_of(c) && out.len == pre.len, || {
            format!("pre {} out {} bias {c}", pre.len, out.len)
        })?;
        require_f32("bias_gelu_forward", &[bias.dtype])?;
        let (name, dtype) = FORWARD.pick("bias_gelu_forward", &[pre.dtype, out.dtype])?;
        let (n, ci) = (pre.len as i64, c as i32);
        self.note(forward_cost(pre.len, c, dtype));
        let mut l = self.stream().launch_builder(self.func(name)?);
        l.arg(&pre.ptr).arg(&out.ptr).arg(&bias.ptr).arg(&n).arg(&ci);
        // SAFETY: shapes and dtypes checked; pre/out exclusive.
        unsafe { l.launch(grid_for(pre.len, 256)) }.map(drop).map_err(dev_err)
    }

    fn gelu_forward(&self, pre: DevRef<'_>, out: DevMut<'_>) -> Result<()> {
        check("gelu_forward", out.len == pre.len, || format!("pre {} out {}", pre.len, out.len))?;
        let (name, dtype) = PLAIN.pick("gelu_forward", &[pre.dtype, out.dtype])?;
        let n = pre.len as i64;
        self.note(plain_cost(pre.len, dtype));
        let mut l = self.stream().launch_builder(self.func(name)?);
        l.arg(&pre.ptr).arg(&out.ptr).arg(&n);
        // SAFETY: lengths and dtypes checked; out exclusive.
        unsafe { l.launch(grid_for(pre.len.max(1), 256)) }.map(drop).map_err(dev_err)
    }

    fn gelu_backward(&self, pre: DevRef<'_>, dout: DevRef<'_>, dpre: DevMut<'_>) -> Result<()> {
        check("gelu_backward", dout.len == pre.len && dpre.len == pre.len, || {
            format!("pre {} dout {} dpre {}", pre.len, dout.len, dpre.len)
        })?;
        let (name, dtype) = BACKWARD.pick("gelu_backward", &[pre.dtype, dout.dtype, dpre.dtype])?;
        let n = pre.len as i64;
        self.note(backward_cost(pre.len, dtype));
        let mut l = self.stream().launch_builder(self.func(name)?);
        l.arg(&dpre.ptr).arg(&pre.ptr).arg(&dout.ptr).arg(&n);
        // SAFETY: lengths and dtypes checked; dpre exclusive.
        unsafe { l.launch(grid_for(pre.len.max(1), 256)) }.map(drop).map_err(dev_err)
    }

    fn bias_gelu_backward(&self, pre: DevRef<'_>, dout: DevRef<'_>, dpre: DevMut<'_>, dbias: DevMut<'_>) -> Result<()> {
        let c = dbias.len;
        check(
            "bias_gelu_backward",
            c > 0 && pre.len.is_multiple_of(c) && dout.len == pre.len && dpre.len == pre.len,
            || format!("pre {} dout {} dpre {} dbias {c}", pre.len, dout.len, dpre.len),
        )?;
        require_f32("bias_gelu_backward", &[dbias.dtype])?;
        let (name, dtype) = BACKWARD.pick("bias_gelu_backward", &[pre.dtype, dout.dtype, dpre.dtype])?;
        let n = pre.len as i64;
        self.note(backward_cost(pre.len, dtype));
        let mut l = self.stream().launch_builder(self.func(name)?);
        l.arg(&dpre.ptr).arg(&pre.ptr).arg(&dout.ptr).arg(&n);
        // SAFETY: shapes and dtypes checked; dpre exclusive.
        unsafe { l.launch(grid_for(pre.len, 256)) }.map(drop).map_err(dev_err)?;
        self.launch_column_sum(dbias, self.as_ref(&dpre), pre.len / c, c)
    }
}
