//! LayerNorm family launchers (see layernorm.cu, which also holds the residual + dropout +
//! LayerNorm kernels that `residual_norm.rs` launches, so both share one row implementation),
//! and the shared launch geometry of the backward and its deterministic parameter-gradient
//! reduction.
//!
//! Activations (x, out, dout, dx, and the fused kernels' sum, skip and gradients) are fp32 or
//! bf16, one dtype an op, which picks the kernel (`NAME` or `NAME_bf16`); gamma, beta, mean,
//! rstd and the parameter gradients are fp32 either way.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::cost::{self, F32, LaunchCost};
use super::{Cuda, DevMut, DevRef, KernelSource, Typed, check, dev_err, require_f32, residual_norm};
use crate::{Dtype, LayerNormOps, Result};

const FORWARD: Typed = Typed { f32: "layernorm_forward", bf16: "layernorm_forward_bf16" };
const BACKWARD: Typed = Typed { f32: "layernorm_backward", bf16: "layernorm_backward_bf16" };
const PARAM_GRAD: &str = "layernorm_param_grad";

pub(crate) const SOURCE: KernelSource = KernelSource {
    file: "layernorm.cu",
    code: include_str!("layernorm.cu"),
    kernels: &[
        FORWARD.f32,
        FORWARD.bf16,
        BACKWARD.f32,
        BACKWARD.bf16,
        residual_norm::FORWARD.f32,
        residual_norm::FORWARD.bf16,
        residual_norm::BACKWARD.f32,
        residual_norm::BACKWARD.bf16,
        PARAM_GRAD,
    ],
};

/// The entry point of `t` for activations of `dtype` (the name a cost is declared under).
pub(crate) fn entry(t: Typed, dtype: Dtype) -> &'static str {
    if dtype == Dtype::Bf16 { t.bf16 } else { t.f32 }
}

/// Warps (rows in flight) per block of the forward kernels.
const FORWARD_WARPS: u32 = 8;
/// Most warps per block of the backward kernels; fewer for wide rows (shared-memory slices).
const BACKWARD_WARPS: usize = 8;
/// Static shared memory a block may use without opting in: the backward's `[warps][2c]` slices.
const SHARED_BYTES: usize = 48 * 1024;

/// Whether a row op over `c` columns can use 4-element vector access (`b2b_get4`): `c` a
/// multiple of 4, every activation pointer aligned to 4 elements of `dtype` (16 bytes for fp32,
/// 8 for bf16) and every fp32 parameter pointer to 16 bytes (views need not be: the flat
/// parameter buffer, or a view at an odd offset, takes the scalar path).
pub(crate) fn vectorizable(c: usize, dtype: Dtype, activations: &[u64], params: &[u64]) -> bool {
    let act_align = 4 * cost::size(dtype);
    c.is_multiple_of(4)
        && activations.iter().all(|p| p.is_multiple_of(act_align))
        && params.iter().all(|p| p.is_multiple_of(4 * F32))
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

/// `layernorm_forward` over `rows x c` with activations of `dtype`: reads x and the two fp32
/// `c`-vectors, writes out and the fp32 per-row mean and rstd; about 8 FLOPs an element (mean,
/// variance, normalise, scale, shift).
pub(crate) fn forward_cost(rows: usize, c: usize, dtype: Dtype) -> LaunchCost {
    let (r, c, a) = (rows as u64, c as u64, cost::size(dtype));
    LaunchCost::kernel(entry(FORWARD, dtype), a * 2 * r * c + F32 * (2 * c + 2 * r), 8 * r * c)
}

/// `layernorm_backward` with activations of `dtype`: reads dout, x (`rows x c`), gamma, mean
/// and rstd; writes dx (and reads it when accumulating) and its block's fp32 `[2c]` row of
/// partials; about 10 FLOPs an element.
pub(crate) fn backward_cost(rows: usize, c: usize, accumulate_dx: bool, blocks: usize, dtype: Dtype) -> LaunchCost {
    let (r, c, b, a) = (rows as u64, c as u64, blocks as u64, cost::size(dtype));
    let dx_passes = if accumulate_dx { 2 } else { 1 };
    let bytes = a * (2 + dx_passes) * r * c + F32 * (c + 2 * r + 2 * b * c);
    LaunchCost::kernel(entry(BACKWARD, dtype), bytes, 10 * r * c)
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
        let (name, dtype) = FORWARD.pick("layernorm_forward", &[x.dtype, out.dtype])?;
        require_f32("layernorm_forward", &[gamma.dtype, beta.dtype, mean.dtype, rstd.dtype])?;
        let vec = vectorizable(c, dtype, &[x.ptr, out.ptr], &[gamma.ptr, beta.ptr]) as i32;
        let (r, ci) = (rows as i32, c as i32);
        self.note(forward_cost(rows, c, dtype));
        let mut l = self.stream().launch_builder(self.func(name)?);
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
        let op = "layernorm_backward";
        let (name, dtype) = BACKWARD.pick(op, &[dout.dtype, x.dtype, dx.dtype])?;
        require_f32(op, &[gamma.dtype, mean.dtype, rstd.dtype, dgamma.dtype, dbeta.dtype])?;
        let grid = BackwardGrid::new(op, rows, c, self.sm_count() as usize)?;
        let vec = vectorizable(c, dtype, &[dout.ptr, x.ptr, dx.ptr], &[gamma.ptr]) as i32;
        let (r, ci, acc) = (rows as i32, c as i32, accumulate_dx as i32);
        self.with_workspace(grid.partials(c), |partials| {
            self.note(backward_cost(rows, c, accumulate_dx, grid.blocks, dtype));
            let mut l = self.stream().launch_builder(self.func(name)?);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vector_access_needs_four_aligned_elements_of_each_operands_dtype() {
        // fp32 activations: 16-byte aligned; bf16 ones: 8-byte aligned; fp32 params: 16.
        assert!(vectorizable(384, Dtype::F32, &[0x1000, 0x2010], &[0x3000]));
        assert!(!vectorizable(384, Dtype::F32, &[0x1000, 0x2008], &[0x3000]));
        assert!(vectorizable(384, Dtype::Bf16, &[0x1000, 0x2008], &[0x3000]));
        assert!(!vectorizable(384, Dtype::Bf16, &[0x1000, 0x2002], &[0x3000]));
        assert!(!vectorizable(384, Dtype::Bf16, &[0x1000, 0x2008], &[0x3008]));
        assert!(!vectorizable(386, Dtype::Bf16, &[0x1000], &[0x3000]));
    }
}
