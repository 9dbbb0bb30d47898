//! LayerNorm family launchers (see layernorm.cu).

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::cost::{F32, LaunchCost};
use super::{Cuda, DevMut, DevRef, KernelSource, check, dev_err};
use crate::{LayerNormOps, Result};

const FORWARD: &str = "layernorm_forward";
const BACKWARD: &str = "layernorm_backward";

pub(crate) const SOURCE: KernelSource =
    KernelSource { file: "layernorm.cu", code: include_str!("layernorm.cu"), kernels: &[FORWARD, BACKWARD] };

const WARPS: u32 = 8;

/// `layernorm_forward` over `rows x c`: reads x and the two `c`-vectors, writes out and the
/// per-row mean and rstd; about 8 FLOPs an element (mean, variance, normalise, scale, shift).
pub(crate) fn forward_cost(rows: usize, c: usize) -> LaunchCost {
    let (r, c) = (rows as u64, c as u64);
    LaunchCost::kernel(FORWARD, F32 * (2 * r * c + 2 * c + 2 * r), 8 * r * c)
}

/// `layernorm_backward`: reads dout, x (`rows x c`), gamma, mean and rstd; writes dx (and reads
/// it when accumulating); dgamma and dbeta are accumulated (read and written once each, the
/// per-block partials stay in shared memory); about 10 FLOPs an element.
pub(crate) fn backward_cost(rows: usize, c: usize, accumulate_dx: bool) -> LaunchCost {
    let (r, c) = (rows as u64, c as u64);
    let dx_passes = if accumulate_dx { 2 } else { 1 };
    LaunchCost::kernel(BACKWARD, F32 * ((2 + dx_passes) * r * c + c + 2 * r + 4 * c), 10 * r * c)
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
        let (r, ci) = (rows as i32, c as i32);
        let cfg = LaunchConfig {
            grid_dim: ((rows as u32).div_ceil(WARPS).max(1), 1, 1),
            block_dim: (32 * WARPS, 1, 1),
            shared_mem_bytes: 0,
        };
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
            .arg(&eps);
        // SAFETY: shapes checked above; outputs are exclusive views.
        unsafe { l.launch(cfg) }.map(drop).map_err(dev_err)
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
        let smem = (2 * c * 4) as u32;
        check("layernorm_backward", smem <= 48 * 1024, || {
            format!("hidden size {c} needs {smem} bytes of shared memory")
        })?;
        let blocks = (rows as u32).div_ceil(WARPS).clamp(1, 2 * self.sm_count());
        let (r, ci, acc) = (rows as i32, c as i32, accumulate_dx as i32);
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (32 * WARPS, 1, 1), shared_mem_bytes: smem };
        self.note(backward_cost(rows, c, accumulate_dx));
        let mut l = self.stream().launch_builder(self.func(BACKWARD)?);
        l.arg(&dx.ptr)
            .arg(&dgamma.ptr)
            .arg(&dbeta.ptr)
            .arg(&dout.ptr)
            .arg(&x.ptr)
            .arg(&gamma.ptr)
            .arg(&mean.ptr)
            .arg(&rstd.ptr)
            .arg(&r)
            .arg(&ci)
            .arg(&acc);
        // SAFETY: shapes checked above; dx/dgamma/dbeta are exclusive views.
        unsafe { l.launch(cfg) }.map(drop).map_err(dev_err)
    }
}
