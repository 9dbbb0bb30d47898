//! Embedding family launchers (see embedding.cu): fp32 table and table gradient, fp32 or bf16
//! `out`/`dout` (activations); with bf16 activations the ops also gather and scatter rows of a
//! bf16 activation (`embedding_gather_bf16`, `embedding_scatter_bf16`).

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::cost::{self, I32, LaunchCost};
use super::{Cuda, DevMut, DevRef, KernelSource, Typed, check, dev_err, grid_for};
use crate::{Dtype, EmbeddingOps, Result};

const FORWARD: Typed = Typed { f32: "embedding_forward", bf16: "embedding_forward_bf16" };
const BACKWARD: Typed = Typed { f32: "embedding_backward", bf16: "embedding_backward_bf16" };
const GATHER_BF16: &str = "embedding_gather_bf16";
const SCATTER_BF16: &str = "embedding_scatter_bf16";

pub(crate) const SOURCE: KernelSource = KernelSource {
    file: "embedding.cu",
    code: include_str!("embedding.cu"),
    kernels: &[FORWARD.f32, FORWARD.bf16, BACKWARD.f32, BACKWARD.bf16, GATHER_BF16, SCATTER_BF16],
};

/// The forward entry for (out, table) dtypes: a lookup in an fp32 table, or a bf16 row gather.
fn forward_entry(out: Dtype, table: Dtype) -> Result<&'static str> {
    match (out, table) {
        (Dtype::F32, Dtype::F32) => Ok(FORWARD.f32),
        (Dtype::Bf16, Dtype::F32) => Ok(FORWARD.bf16),
        (Dtype::Bf16, Dtype::Bf16) => Ok(GATHER_BF16),
        (Dtype::F32, Dtype::Bf16) => {
            Err(crate::KernelError::Shape { op: "embedding_forward", what: "a bf16 table into an fp32 out".into() })
        }
    }
}

/// The backward entry for (dout, dtable) dtypes: into an fp32 gradient, or a bf16 row scatter.
fn backward_entry(dout: Dtype, dtable: Dtype) -> Result<&'static str> {
    match (dout, dtable) {
        (Dtype::F32, Dtype::F32) => Ok(BACKWARD.f32),
        (Dtype::Bf16, Dtype::F32) => Ok(BACKWARD.bf16),
        (Dtype::Bf16, Dtype::Bf16) => Ok(SCATTER_BF16),
        (Dtype::F32, Dtype::Bf16) => {
            Err(crate::KernelError::Shape { op: "embedding_backward", what: "an fp32 dout into a bf16 dtable".into() })
        }
    }
}

/// `embedding_forward` of `n` ids: reads the ids and `n` table rows of `dim` (fp32, or bf16 for a
/// gather), writes out (`dtype`; read too when accumulating, one add an element).
#[cfg(test)]
pub(crate) fn forward_cost(n: usize, dim: usize, accumulate: bool, dtype: Dtype) -> LaunchCost {
    forward_cost_from(n, dim, accumulate, dtype, Dtype::F32)
}

fn forward_cost_from(n: usize, dim: usize, accumulate: bool, dtype: Dtype, table: Dtype) -> LaunchCost {
    let (n, d) = (n as u64, dim as u64);
    let (out_passes, flops) = if accumulate { (2, n * d) } else { (1, 0) };
    let name = forward_entry(dtype, table).unwrap_or(FORWARD.f32);
    LaunchCost::kernel(name, I32 * n + cost::size(table) * n * d + cost::size(dtype) * out_passes * n * d, flops)
}

/// `embedding_backward`: reads the ids and dout (`dtype`), adds into `n` rows of the fp32
/// dtable (read and written; atomics, which the ideal-traffic count ignores).
#[cfg(test)]
pub(crate) fn backward_cost(n: usize, dim: usize, dtype: Dtype) -> LaunchCost {
    backward_cost_into(n, dim, dtype, Dtype::F32)
}

fn backward_cost_into(n: usize, dim: usize, dtype: Dtype, dtable: Dtype) -> LaunchCost {
    let (n, d) = (n as u64, dim as u64);
    let name = backward_entry(dtype, dtable).unwrap_or(BACKWARD.f32);
    LaunchCost::kernel(name, I32 * n + cost::size(dtype) * n * d + cost::size(dtable) * 2 * n * d, n * d)
}

impl EmbeddingOps for Cuda {
    fn embedding_forward(
        &self,
        ids: &CudaSlice<i32>,
        table: DevRef<'_>,
        dim: usize,
        out: DevMut<'_>,
        accumulate: bool,
    ) -> Result<()> {
        let n = out.len / dim.max(1);
        check(
            "embedding_forward",
            dim > 0 && out.len == n * dim && n <= ids.len() && table.len.is_multiple_of(dim),
            || format!("out {} ids {} dim {dim} table {}", out.len, ids.len(), table.len),
        )?;
        let (name, dtype) = (forward_entry(out.dtype, table.dtype)?, out.dtype);
        let (n64, d, rows, acc) = (n as i64, dim as i32, (table.len / dim) as i32, accumulate as i32);
        let idp = self.ids_ptr(ids);
        self.note(forward_cost_from(n, dim, accumulate, dtype, table.dtype));
        let mut l = self.stream().launch_builder(self.func(name)?);
        l.arg(&out.ptr).arg(&idp).arg(&table.ptr).arg(&n64).arg(&d).arg(&rows).arg(&acc);
        // SAFETY: `out` holds n*dim elements of its dtype, `ids` at least n ints, `table`
        // rows*dim f32s.
        unsafe { l.launch(grid_for(n * dim, 256)) }.map(drop).map_err(dev_err)
    }

    fn embedding_backward(&self, ids: &CudaSlice<i32>, dout: DevRef<'_>, dim: usize, dtable: DevMut<'_>) -> Result<()> {
        let n = dout.len / dim.max(1);
        check(
            "embedding_backward",
            dim > 0 && dout.len == n * dim && n <= ids.len() && dtable.len.is_multiple_of(dim),
            || format!("dout {} ids {} dim {dim} dtable {}", dout.len, ids.len(), dtable.len),
        )?;
        let (name, dtype) = (backward_entry(dout.dtype, dtable.dtype)?, dout.dtype);
        let (n64, d, rows) = (n as i64, dim as i32, (dtable.len / dim) as i32);
        let idp = self.ids_ptr(ids);
        self.note(backward_cost_into(n, dim, dtype, dtable.dtype));
        let mut l = self.stream().launch_builder(self.func(name)?);
        l.arg(&dtable.ptr).arg(&idp).arg(&dout.ptr).arg(&n64).arg(&d).arg(&rows);
        // SAFETY: as in forward; `dtable` is exclusive.
        unsafe { l.launch(grid_for(n * dim, 256)) }.map(drop).map_err(dev_err)
    }
}
