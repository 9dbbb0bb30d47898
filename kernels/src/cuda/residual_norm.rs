//! Residual + dropout + LayerNorm launchers (the kernels are in layernorm.cu, beside the plain
//! LayerNorm they share their row code with). Forward is one launch instead of dropout,
//! residual add and LayerNorm; backward is the LayerNorm backward writing both the skip
//! gradient and the dropout-masked block-output gradient, plus the parameter-gradient reduction,
//! instead of LayerNorm backward, a copy and a dropout.
//!
//! sum, skip, out, d_out, d_skip and d_x are activations (fp32 or bf16, one dtype an op, which
//! picks `NAME` or `NAME_bf16`); gamma, beta, mean, rstd and the parameter gradients are fp32.
//! With bf16 the forward's statistics are those of the sum as stored (rounded to bf16), which
//! is what the backward reads back.

use cudarc::driver::PushKernelArg;

use super::cost::{self, F32, LaunchCost};
use super::layernorm::{BackwardGrid, entry, forward_config, vectorizable};
use super::{Cuda, DevMut, DevRef, Typed, check, dev_err, require_f32};
use crate::{Dtype, ResidualNormOps, Result};

pub(crate) const FORWARD: Typed = Typed { f32: "residual_norm_forward", bf16: "residual_norm_forward_bf16" };
pub(crate) const BACKWARD: Typed = Typed { f32: "residual_norm_backward", bf16: "residual_norm_backward_bf16" };

/// The dropout mask is a hash of (seed, index): about 8 integer operations an element, counted
/// as FLOPs, and no memory.
fn dropout_flops(p: f32) -> u64 {
    if p > 0.0 { 8 } else { 0 }
}

/// `residual_norm_forward` over `rows x c` with activations of `dtype`: reads the block output
/// and the skip, writes the sum (in place) and out, reads the fp32 gamma and beta, writes the
/// fp32 mean and rstd; the dropout, one add and LayerNorm's 8 FLOPs an element.
pub(crate) fn forward_cost(rows: usize, c: usize, p: f32, dtype: Dtype) -> LaunchCost {
    let (r, c, a) = (rows as u64, c as u64, cost::size(dtype));
    let bytes = a * 4 * r * c + F32 * (2 * c + 2 * r);
    LaunchCost::kernel(entry(FORWARD, dtype), bytes, (9 + dropout_flops(p)) * r * c)
}

/// `residual_norm_backward` with activations of `dtype`: reads dout and the saved sum, gamma,
/// mean and rstd; writes d_skip (read too when accumulating) and d_x, and its block's fp32
/// `[2c]` row of partials; LayerNorm backward's 10 FLOPs an element and the dropout.
pub(crate) fn backward_cost(
    rows: usize,
    c: usize,
    accumulate_skip: bool,
    p: f32,
    blocks: usize,
    dtype: Dtype,
) -> LaunchCost {
    let (r, c, b, a) = (rows as u64, c as u64, blocks as u64, cost::size(dtype));
    let skip_passes = if accumulate_skip { 2 } else { 1 };
    let bytes = a * (3 + skip_passes) * r * c + F32 * (c + 2 * r + 2 * b * c);
    LaunchCost::kernel(entry(BACKWARD, dtype), bytes, (10 + dropout_flops(p)) * r * c)
}

impl ResidualNormOps for Cuda {
    fn residual_norm_forward(
        &self,
        sum: DevMut<'_>,
        skip: DevRef<'_>,
        gamma: DevRef<'_>,
        beta: DevRef<'_>,
        eps: f32,
        p: f32,
        seed: u64,
        out: DevMut<'_>,
        mean: DevMut<'_>,
        rstd: DevMut<'_>,
    ) -> Result<()> {
        let (c, rows) = (gamma.len, mean.len);
        check(
            "residual_norm_forward",
            c > 0
                && beta.len == c
                && sum.len == rows * c
                && skip.len == sum.len
                && out.len == sum.len
                && rstd.len == rows
                && (0.0..1.0).contains(&p),
            || format!("sum {} skip {} out {} gamma {c} rows {rows} p {p}", sum.len, skip.len, out.len),
        )?;
        let op = "residual_norm_forward";
        let (name, dtype) = FORWARD.pick(op, &[sum.dtype, skip.dtype, out.dtype])?;
        require_f32(op, &[gamma.dtype, beta.dtype, mean.dtype, rstd.dtype])?;
        let vec = vectorizable(c, dtype, &[sum.ptr, skip.ptr, out.ptr], &[gamma.ptr, beta.ptr]) as i32;
        let (r, ci) = (rows as i32, c as i32);
        self.note(forward_cost(rows, c, p, dtype));
        let mut l = self.stream().launch_builder(self.func(name)?);
        l.arg(&out.ptr)
            .arg(&mean.ptr)
            .arg(&rstd.ptr)
            .arg(&sum.ptr)
            .arg(&skip.ptr)
            .arg(&gamma.ptr)
            .arg(&beta.ptr)
            .arg(&r)
            .arg(&ci)
            .arg(&eps)
            .arg(&p)
            .arg(&seed)
            .arg(&vec);
        // SAFETY: shapes checked above; sum, out, mean and rstd are exclusive views.
        unsafe { l.launch(forward_config(rows)) }.map(drop).map_err(dev_err)
    }

    fn residual_norm_backward(
        &self,
        d_out: DevRef<'_>,
        sum: DevRef<'_>,
        gamma: DevRef<'_>,
        mean: DevRef<'_>,
        rstd: DevRef<'_>,
        p: f32,
        seed: u64,
        d_skip: DevMut<'_>,
        accumulate_skip: bool,
        d_x: DevMut<'_>,
        dgamma: DevMut<'_>,
        dbeta: DevMut<'_>,
    ) -> Result<()> {
        let (c, rows) = (gamma.len, mean.len);
        check(
            "residual_norm_backward",
            c > 0
                && sum.len == rows * c
                && d_out.len == sum.len
                && d_skip.len == sum.len
                && d_x.len == sum.len
                && rstd.len == rows
                && dgamma.len == c
                && dbeta.len == c
                && (0.0..1.0).contains(&p),
            || {
                format!(
                    "sum {} d_out {} d_skip {} d_x {} gamma {c} rows {rows} p {p}",
                    sum.len, d_out.len, d_skip.len, d_x.len
                )
            },
        )?;
        let op = "residual_norm_backward";
        let (name, dtype) = BACKWARD.pick(op, &[d_out.dtype, sum.dtype, d_skip.dtype, d_x.dtype])?;
        require_f32(op, &[gamma.dtype, mean.dtype, rstd.dtype, dgamma.dtype, dbeta.dtype])?;
        let grid = BackwardGrid::new(op, rows, c, self.sm_count() as usize)?;
        let vec = vectorizable(c, dtype, &[d_out.ptr, sum.ptr, d_skip.ptr, d_x.ptr], &[gamma.ptr]) as i32;
        let (r, ci, acc) = (rows as i32, c as i32, accumulate_skip as i32);
        self.with_workspace(grid.partials(c), |partials| {
            self.note(backward_cost(rows, c, accumulate_skip, p, grid.blocks, dtype));
            let mut l = self.stream().launch_builder(self.func(name)?);
            l.arg(&d_skip.ptr)
                .arg(&d_x.ptr)
                .arg(&partials)
                .arg(&d_out.ptr)
                .arg(&sum.ptr)
                .arg(&gamma.ptr)
                .arg(&mean.ptr)
                .arg(&rstd.ptr)
                .arg(&r)
                .arg(&ci)
                .arg(&acc)
                .arg(&p)
                .arg(&seed)
                .arg(&vec);
            // SAFETY: shapes checked above; d_skip and d_x are exclusive; the workspace holds the
            // partials.
            unsafe { l.launch(grid.config(c)) }.map(drop).map_err(dev_err)?;
            self.launch_param_grad(&dgamma, &dbeta, partials, grid.blocks)
        })
    }
}
