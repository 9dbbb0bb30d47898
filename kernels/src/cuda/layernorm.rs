//! LayerNorm family launchers (see layernorm.cu, which also holds the residual + dropout +
//! LayerNorm kernels that `residual_norm.rs` launches, so both share one row implementation),
//! and the shared launch geometry of the backward and its deterministic parameter-gradient
//! reduction.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::cost::{F32, LaunchCost};
use super::{Cuda, DevMut, DevRef, KernelSource, check, dev_err, residual_norm};
use crate::{LayerNormOps, Result};

const FORWARD: &str = "layernorm_forward";
const BACKWARD: &str = "layernorm_backward";
const PARAM_GRAD: &str = "layernorm_param_grad";

pub(crate) const SOURCE: KernelSource = KernelSource {
    file: "layernorm.cu",
    code: include_str!("layernorm.cu"),
    kernels: &[FORWARD, BACKWARD, residual_norm::FORWARD, residual_norm::BACKWARD, PARAM_GRAD],
};

/// Warps (rows in flight) per block of the forward kernels.
const FORWARD_WARPS: u32 = 8;
/// Most warps per block of the backward kernels; fewer for wide rows (shared-memory slices).
const BACKWARD_WARPS: usize = 8;
/// Static shared memory a block may use without opting in: the backward's `[warps][2c]` slices.
const SHARED_BYTES: usize = 48 * 1024;

/// Whether a row op over `c` columns can use 16-byte vector access: `c` a multiple of 4 and
/// every pointer 16-byte aligned (views into the flat parameter buffer need not be).
pub(crate) fn vectorizable(c: usize, ptrs: &[u64]) -> bool {
    c % 4 == 0 && ptrs.iter().all(|p| p % 16 == 0)
}

/// One warp per row, `FORWARD_WARPS` rows per block.
pub(crate) fn forward_config(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.div_ceil(FORWARD_WARPS as usize).max(1) as u32, 1, 1),
        block_dim: (32 * FORWARD_WARPS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Launch geometry of a LayerNorm backward over `rows x c`: warps per block (each with a
/// `[2c]` slice of shared memory) and blocks (each writing one `[2c]` row of partials).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BackwardGrid {
    pub warps: usize,
    pub blocks: usize,
}

impl BackwardGrid {
    /// At most two blocks per SM: enough to fill the GPU, and few partial rows to reduce.
    pub(crate) fn new(op: &'static str, rows: usize, c: usize, sm_count: usize) -> Result<Self> {
        let warps = (SHARED_BYTES / (F32 as usize * 2 * c.max(1))).min(BACKWARD_WARPS);
        check(op, warps > 0, || format!("hidden size {c} needs more than {SHARED_BYTES} bytes of shared memory"))?;
        Ok(Self { warps, blocks: rows.div_ceil(warps).clamp(1, 2 * sm_count.max(1)) })
    }
    pub(crate) fn partials(&self, c: usize) -> usize {
        self.blocks * 2 * c
    }
    pub(crate) fn config(&self, c: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (self.blocks as u32, 1, 1),
            block_dim: (32 * self.warps as u32, 1, 1),
            shared_mem_bytes: (self.warps * 2 * c * F32 as usize) as u32,
        }
    }
}

/// `layernorm_forward` over `rows x c`: reads x and the two `c`-vectors, writes out and the
/// per-row mean and rstd; about 8 FLOPs an element (mean, variance, normalise, scale, shift).
pub(crate) fn forward_cost(rows: usize, c: usize) -> LaunchCost {
    let (r, c) = (rows as u64, c as u64);
    LaunchCost::kernel(FORWARD, F32 * (2 * r * c + 2 * c + 2 * r), 8 * r * c)
}

/// `layernorm_backward`: reads dout, x (`rows x c`), gamma, mean and rstd; writes dx (and reads
/// it when accumulating) and its block's `[2c]` row of partials; about 10 FLOPs an element.
pub(crate) fn backward_cost(rows: usize, c: usize, accumulate_dx: bool, blocks: usize) -> LaunchCost {
    let (r, c, b) = (rows as u64, c as u64, blocks as u64);
    let dx_passes = if accumulate_dx { 2 } else { 1 };
    LaunchCost::kernel(BACKWARD, F32 * ((2 + dx_passes) * r * c + c + 2 * r + 2 * b * c), 10 * r * c)
}

/// `layernorm_param_grad`: reads the `blocks x 2c` partials once, reads and writes dgamma and
/// dbeta (they accumulate); one add per partial.
pub(crate) fn param_grad_cost(c: usize, blocks: usize) -> LaunchCost {
    let (c, b) = (c as u64, blocks as u64);
    LaunchCost::kernel(PARAM_GRAD, F32 * (2 * b * c + 4 * c), 2 * b * c)
}

impl Cuda {
    /// `dgamma += sum over blocks of partials[:, :c]`, `dbeta += ...[:, c:]`, in a fixed order.
    pub(crate) fn launch_param_grad(
        &self,
        dgamma: &DevMut<'_>,
        dbeta: &DevMut<'_>,
        partials: u64,
        blocks: usize,
    ) -> Result<()> {
        let c = dgamma.len;
        let cfg = LaunchConfig {
            grid_dim: ((2 * c).div_ceil(32).max(1) as u32, 1, 1),
            block_dim: (32, 8, 1),
            shared_mem_bytes: 0,
        };
        let (b, ci) = (blocks as i32, c as i32);
        self.note(param_grad_cost(c, blocks));
        let mut l = self.stream().launch_builder(self.func(PARAM_GRAD)?);
        l.arg(&dgamma.ptr).arg(&dbeta.ptr).arg(&partials).arg(&b).arg(&ci);
        // SAFETY: dgamma and dbeta hold c f32s each; callers pass blocks * 2c written partials.
        unsafe { l.launch(cfg) }.map(drop).map_err(dev_err)
    }
}

impl LayerNormOps for Cuda {
    fn layernorm_forward(
        &self,
        x: DevRef<'_>,
        gamma: DevRef<'_>,
        beta: DevRef<'_>,
        eps: f32,
        out: DevMut<'_>,
        mean: DevMut<'_>,
        rstd: DevMut<'_>,
    ) -> Result<()> {
        let (c, rows) = (gamma.len, mean.len);
        check(
            "layernorm_forward",
            c > 0 && beta.len == c && x.len == rows * c && out.len == x.len && rstd.len == rows,
            || format!("x {} out {} gamma {c} rows {rows}", x.len, out.len),
        )?;
        let vec = vectorizable(c, &[x.ptr, gamma.ptr, beta.ptr, out.ptr]) as i32;
        let (r, ci) = (rows as i32, c as i32);
        self.note(forward_cost(rows, c));
        let mut l = self.stream().launch_builder(self.func(FORWARD)?);
        l.arg(&out.ptr)
            .arg(&mean.ptr)
            .arg(&rstd.ptr)
            .arg(&x.ptr)
            .arg(&gamma.ptr)
            .arg(&beta.ptr)
            .arg(&r)
            .arg(&ci)
            .arg(&eps)
            .arg(&vec);
        // SAFETY: shapes checked above; outputs are exclusive views.
        unsafe { l.launch(forward_config(rows)) }.map(drop).map_err(dev_err)
    }

    fn layernorm_backward(
        &self,
        dout: DevRef<'_>,
        x: DevRef<'_>,
        gamma: DevRef<'_>,
        mean: DevRef<'_>,
        rstd: DevRef<'_>,
        dx: DevMut<'_>,
        accumulate_dx: bool,
        dgamma: DevMut<'_>,
        dbeta: DevMut<'_>,
    ) -> Result<()> {
        let (c, rows) = (gamma.len, mean.len);
        check(
            "layernorm_backward",
            c > 0
                && x.len == rows * c
                && dout.len == x.len
                && dx.len == x.len
                && rstd.len == rows
                && dgamma.len == c
                && dbeta.len == c,
            || format!("x {} dout {} dx {} gamma {c} rows {rows}", x.len, dout.len, dx.len),
        )?;
        let grid = BackwardGrid::new("layernorm_backward", rows, c, self.sm_count() as usize)?;
        let vec = vectorizable(c, &[dout.ptr, x.ptr, gamma.ptr, dx.ptr]) as i32;
        let (r, ci, acc) = (rows as i32, c as i32, accumulate_dx as i32);
        self.with_workspace(grid.partials(c), |partials| {
            self.note(backward_cost(rows, c, accumulate_dx, grid.blocks));
            let mut l = self.stream().launch_builder(self.func(BACKWARD)?);
            l.arg(&dx.ptr)
                .arg(&partials)
                .arg(&dout.ptr)
                .arg(&x.ptr)
                .arg(&gamma.ptr)
                .arg(&mean.ptr)
                .arg(&rstd.ptr)
                .arg(&r)
                .arg(&ci)
                .arg(&acc)
                .arg(&vec);
            // SAFETY: shapes checked above; dx is exclusive; the workspace holds the partials.
            unsafe { l.launch(grid.config(c)) }.map(drop).map_err(dev_err)?;
            self.launch_param_grad(&dgamma, &dbeta, partials, grid.blocks)
        })
    }
}
