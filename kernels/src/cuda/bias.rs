//! Bias family launchers (see bias.cu); `column_sum` is shared with the GELU backward. The
//! activation (`y`, `x`) is fp32 or bf16; the bias and its gradient are fp32.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::cost::{self, F32, LaunchCost};
use super::{Cuda, DevMut, DevRef, KernelSource, Typed, dev_err, grid_for, require_f32};
use crate::{Dtype, Result};

pub(crate) const ADD: Typed = Typed { f32: "bias_add", bf16: "bias_add_bf16" };
pub(crate) const COLUMN_SUM: Typed = Typed { f32: "bias_column_sum", bf16: "bias_column_sum_bf16" };

pub(crate) const SOURCE: KernelSource = KernelSource {
    file: "bias.cu",
    code: include_str!("bias.cu"),
    kernels: &[ADD.f32, ADD.bf16, COLUMN_SUM.f32, COLUMN_SUM.bf16],
};

/// `bias_add`: reads and writes `y` (`rows x cols` of `dtype`), reads the fp32 bias once; one
/// add an element.
pub(crate) fn add_cost(rows: usize, cols: usize, dtype: Dtype) -> LaunchCost {
    let (r, c) = (rows as u64, cols as u64);
    let name = if dtype == Dtype::Bf16 { ADD.bf16 } else { ADD.f32 };
    LaunchCost::kernel(name, cost::size(dtype) * 2 * r * c + F32 * c, r * c)
}

/// `bias_column_sum`: reads `x` (`rows x cols` of `dtype`) once, reads and writes the fp32
/// `out` (it accumulates); one add an element.
pub(crate) fn column_sum_cost(rows: usize, cols: usize, dtype: Dtype) -> LaunchCost {
    let (r, c) = (rows as u64, cols as u64);
    let name = if dtype == Dtype::Bf16 { COLUMN_SUM.bf16 } else { COLUMN_SUM.f32 };
    LaunchCost::kernel(name, cost::size(dtype) * r * c + F32 * 2 * c, r * c)
}

impl Cuda {
    /// `y[r, :] += bias` over `rows` rows of `cols` (callers checked the lengths).
    pub(crate) fn launch_bias_add(&self, y: DevMut<'_>, bias: DevRef<'_>, rows: usize, cols: usize) -> Result<()> {
        require_f32("add_bias", &[bias.dtype])?;
        let (name, dtype) = ADD.pick("add_bias", &[y.dtype])?;
        let (r, c) = (rows as i64, cols as i32);
        self.note(add_cost(rows, cols, dtype));
        let mut l = self.stream().launch_builder(self.func(name)?);
        l.arg(&y.ptr).arg(&bias.ptr).arg(&r).arg(&c);
        // SAFETY: callers checked y holds rows*cols elements of its dtype and the bias cols
        // f32s; y is exclusive.
        unsafe { l.launch(grid_for(rows * cols, 256)) }.map(drop).map_err(dev_err)
    }

    /// `out[c] += sum_r x[r, c]` (callers checked the lengths).
    pub(crate) fn launch_column_sum(&self, out: DevMut<'_>, x: DevRef<'_>, rows: usize, cols: usize) -> Result<()> {
        require_f32("bias_grad", &[out.dtype])?;
        let (name, dtype) = COLUMN_SUM.pick("bias_grad", &[x.dtype])?;
        let (r, c) = (rows as i64, cols as i32);
        let col_blocks = cols.div_ceil(32) as u32;
        let row_blocks = rows.div_ceil(8).clamp(1, (4 * self.sm_count() as usize / col_blocks as usize).max(1)) as u32;
        let cfg = LaunchConfig { grid_dim: (col_blocks, row_blocks, 1), block_dim: (32, 8, 1), shared_mem_bytes: 0 };
        self.note(column_sum_cost(rows, cols, dtype));
        let mut l = self.stream().launch_builder(self.func(name)?);
        l.arg(&out.ptr).arg(&x.ptr).arg(&r).arg(&c);
        // SAFETY: callers checked out holds cols f32s and x rows*cols elements of its dtype;
        // out is exclusive.
        unsafe { l.launch(cfg) }.map(drop).map_err(dev_err)
    }
}
