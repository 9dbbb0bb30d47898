//! Bias family launchers (see bias.cu); `column_sum` is shared with the GELU backward.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::cost::{F32, LaunchCost};
use super::{Cuda, KernelSource, dev_err, grid_for};
use crate::Result;

pub(crate) const ADD: &str = "bias_add";
pub(crate) const COLUMN_SUM: &str = "bias_column_sum";

pub(crate) const SOURCE: KernelSource =
    KernelSource { file: "bias.cu", code: include_str!("bias.cu"), kernels: &[ADD, COLUMN_SUM] };

/// `bias_add`: reads and writes `y` (`rows x cols`), reads the bias once; one add an element.
pub(crate) fn add_cost(rows: usize, cols: usize) -> LaunchCost {
    let (r, c) = (rows as u64, cols as u64);
    LaunchCost::kernel(ADD, F32 * (2 * r * c + c), r * c)
}

/// `bias_column_sum`: reads `x` (`rows x cols`) once, reads and writes `out` (it accumulates);
/// one add an element.
pub(crate) fn column_sum_cost(rows: usize, cols: usize) -> LaunchCost {
    let (r, c) = (rows as u64, cols as u64);
    LaunchCost::kernel(COLUMN_SUM, F32 * (r * c + 2 * c), r * c)
}

impl Cuda {
    /// `y[r, :] += bias` over `rows` rows of `cols` (pointers to live device memory).
    pub(crate) fn launch_bias_add(&self, y: u64, bias: u64, rows: usize, cols: usize) -> Result<()> {
        let (r, c) = (rows as i64, cols as i32);
        self.note(add_cost(rows, cols));
        let mut l = self.stream().launch_builder(self.func(ADD)?);
        l.arg(&y).arg(&bias).arg(&r).arg(&c);
        // SAFETY: callers pass live buffers of rows*cols and cols f32s.
        unsafe { l.launch(grid_for(rows * cols, 256)) }.map(drop).map_err(dev_err)
    }

    /// `out[c] += sum_r x[r, c]`.
    pub(crate) fn launch_column_sum(&self, out: u64, x: u64, rows: usize, cols: usize) -> Result<()> {
        let (r, c) = (rows as i64, cols as i32);
        let col_blocks = cols.div_ceil(32) as u32;
        let row_blocks = rows.div_ceil(8).clamp(1, (4 * self.sm_count() as usize / col_blocks as usize).max(1)) as u32;
        let cfg = LaunchConfig { grid_dim: (col_blocks, row_blocks, 1), block_dim: (32, 8, 1), shared_mem_bytes: 0 };
        self.note(column_sum_cost(rows, cols));
        let mut l = self.stream().launch_builder(self.func(COLUMN_SUM)?);
        l.arg(&out).arg(&x).arg(&r).arg(&c);
        // SAFETY: callers pass live buffers of cols and rows*cols f32s.
        unsafe { l.launch(cfg) }.map(drop).map_err(dev_err)
    }
}
