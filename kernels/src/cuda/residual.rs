//! Residual family launchers (see residual.cu): fp32 or bf16 operands, one dtype a launch.

use cudarc::driver::PushKernelArg;

use super::cost::{self, LaunchCost};
use super::{Cuda, DevMut, DevRef, KernelSource, Typed, check, dev_err, grid_for};
use crate::{Dtype, ResidualOps, Result};

const ADD: Typed = Typed { f32: "residual_add", bf16: "residual_add_bf16" };
const ADD_ASSIGN: Typed = Typed { f32: "residual_add_assign", bf16: "residual_add_assign_bf16" };
const SCALE: Typed = Typed { f32: "residual_scale", bf16: "residual_scale_bf16" };

pub(crate) const SOURCE: KernelSource = KernelSource {
    file: "residual.cu",
    code: include_str!("residual.cu"),
    kernels: &[ADD.f32, ADD.bf16, ADD_ASSIGN.f32, ADD_ASSIGN.bf16, SCALE.f32, SCALE.bf16],
};

/// Which residual kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Add,
    AddAssign,
    Scale,
}

/// `residual_add` (`out = a + b`) and `residual_add_assign` (`dst += src`): two reads and one
/// write an element, one add. `residual_scale` (`x *= s`): one read, one write, one multiply.
/// Every operand is `dtype`.
pub(crate) fn cost(kind: Kind, n: usize, dtype: Dtype) -> LaunchCost {
    let n = n as u64;
    let (typed, passes) = match kind {
        Kind::Add => (ADD, 3),
        Kind::AddAssign => (ADD_ASSIGN, 3),
        Kind::Scale => (SCALE, 2),
    };
    let name = if dtype == Dtype::Bf16 { typed.bf16 } else { typed.f32 };
    LaunchCost::kernel(name, cost::size(dtype) * passes * n, n)
}

impl ResidualOps for Cuda {
    fn add(&self, a: DevRef<'_>, b: DevRef<'_>, out: DevMut<'_>) -> Result<()> {
        check("add", a.len == b.len && out.len == a.len, || format!("a {} b {} out {}", a.len, b.len, out.len))?;
        let (name, dtype) = ADD.pick("add", &[a.dtype, b.dtype, out.dtype])?;
        let n = a.len as i64;
        self.note(cost(Kind::Add, a.len, dtype));
        let mut l = self.stream().launch_builder(self.func(name)?);
        l.arg(&out.ptr).arg(&a.ptr).arg(&b.ptr).arg(&n);
        // SAFETY: three live views of n elements of one dtype; `out` is exclusive.
        unsafe { l.launch(grid_for(a.len, 256)) }.map(drop).map_err(dev_err)
    }
    fn add_assign(&self, dst: DevMut<'_>, src: DevRef<'_>) -> Result<()> {
        check("add_assign", dst.len == src.len, || format!("dst {} src {}", dst.len, src.len))?;
        let (name, dtype) = ADD_ASSIGN.pick("add_assign", &[dst.dtype, src.dtype])?;
        let n = src.len as i64;
        self.note(cost(Kind::AddAssign, src.len, dtype));
        let mut l = self.stream().launch_builder(self.func(name)?);
        l.arg(&dst.ptr).arg(&src.ptr).arg(&n);
        // SAFETY: two live views of n elements of one dtype; `dst` is exclusive.
        unsafe { l.launch(grid_for(src.len, 256)) }.map(drop).map_err(dev_err)
    }
    fn scale(&self, x: DevMut<'_>, s: f32) -> Result<()> {
        let (name, dtype) = SCALE.pick("scale", &[x.dtype])?;
        let n = x.len as i64;
        self.note(cost(Kind::Scale, x.len, dtype));
        let mut l = self.stream().launch_builder(self.func(name)?);
        l.arg(&x.ptr).arg(&s).arg(&n);
        // SAFETY: a live exclusive view of n elements of its dtype.
        unsafe { l.launch(grid_for(x.len, 256)) }.map(drop).map_err(dev_err)
    }
}
