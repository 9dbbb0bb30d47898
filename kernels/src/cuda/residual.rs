//! Residual family launchers (see residual.cu).

use cudarc::driver::PushKernelArg;

use super::cost::{F32, LaunchCost};
use super::{Cuda, DevMut, DevRef, KernelSource, check, dev_err, grid_for};
use crate::{ResidualOps, Result};

const ADD: &str = "residual_add";
const ADD_ASSIGN: &str = "residual_add_assign";
const SCALE: &str = "residual_scale";

pub(crate) const SOURCE: KernelSource =
    KernelSource { file: "residual.cu", code: include_str!("residual.cu"), kernels: &[ADD, ADD_ASSIGN, SCALE] };

/// `residual_add` (`out = a + b`) and `residual_add_assign` (`dst += src`): two reads and one
/// write an element, one add. `residual_scale` (`x *= s`): one read, one write, one multiply.
fn cost(kernel: &'static str, n: usize) -> LaunchCost {
    let n = n as u64;
    let passes = if kernel == SCALE { 2 } else { 3 };
    LaunchCost::kernel(kernel, F32 * passes * n, n)
}

impl ResidualOps for Cuda {
    fn add(&self, a: DevRef<'_>, b: DevRef<'_>, out: DevMut<'_>) -> Result<()> {
        check("add", a.len == b.len && out.len == a.len, || format!("a {} b {} out {}", a.len, b.len, out.len))?;
        let n = a.len as i64;
        self.note(cost(ADD, a.len));
        let mut l = self.stream().launch_builder(self.func(ADD)?);
        l.arg(&out.ptr).arg(&a.ptr).arg(&b.ptr).arg(&n);
        // SAFETY: three live views of n f32s; `out` is exclusive.
        unsafe { l.launch(grid_for(a.len, 256)) }.map(drop).map_err(dev_err)
    }
    fn add_assign(&self, dst: DevMut<'_>, src: DevRef<'_>) -> Result<()> {
        check("add_assign", dst.len == src.len, || format!("dst {} src {}", dst.len, src.len))?;
        let n = src.len as i64;
        self.note(cost(ADD_ASSIGN, src.len));
        let mut l = self.stream().launch_builder(self.func(ADD_ASSIGN)?);
        l.arg(&dst.ptr).arg(&src.ptr).arg(&n);
        // SAFETY: two live views of n f32s; `dst` is exclusive.
        unsafe { l.launch(grid_for(src.len, 256)) }.map(drop).map_err(dev_err)
    }
    fn scale(&self, x: DevMut<'_>, s: f32) -> Result<()> {
        let n = x.len as i64;
        self.note(cost(SCALE, x.len));
        let mut l = self.stream().launch_builder(self.func(SCALE)?);
        l.arg(&x.ptr).arg(&s).arg(&n);
        // SAFETY: a live exclusive view of n f32s.
        unsafe { l.launch(grid_for(x.len, 256)) }.map(drop).map_err(dev_err)
    }
}
