//! Embedding family launchers (see embedding.cu).

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::cost::{F32, I32, LaunchCost};
use super::{Cuda, DevMut, DevRef, KernelSource, check, dev_err, grid_for};
use crate::{EmbeddingOps, Result};

const FORWARD: &str = "embedding_forward";
const BACKWARD: &str = "embedding_backward";

pub(crate) const SOURCE: KernelSource =
    KernelSource { file: "embedding.cu", code: include_str!("embedding.cu"), kernels: &[FORWARD, BACKWARD] };

/// `embedding_forward` of `n` ids: reads the ids and `n` table rows of `dim`, writes out (and
/// reads it when accumulating, one add an element).
fn forward_cost(n: usize, dim: usize, accumulate: bool) -> LaunchCost {
    let (n, d) = (n as u64, dim as u64);
    let (out_passes, flops) = if accumulate { (2, n * d) } else { (1, 0) };
    LaunchCost::kernel(FORWARD, I32 * n + F32 * (1 + out_passes) * n * d, flops)
}

/// `embedding_backward`: reads the ids and dout, adds into `n` rows of dtable (read and
/// written; atomics, which the ideal-traffic count ignores).
fn backward_cost(n: usize, dim: usize) -> LaunchCost {
    let (n, d) = (n as u64, dim as u64);
    LaunchCost::kernel(BACKWARD, I32 * n + F32 * 3 * n * d, n * d)
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
        let (n64, d, rows, acc) = (n as i64, dim as i32, (table.len / dim) as i32, accumulate as i32);
        let idp = self.ids_ptr(ids);
        self.note(forward_cost(n, dim, accumulate));
        let mut l = self.stream().launch_builder(self.func(FORWARD)?);
        l.arg(&out.ptr).arg(&idp).arg(&table.ptr).arg(&n64).arg(&d).arg(&rows).arg(&acc);
        // SAFETY: `out` holds n*dim f32s, `ids` at least n ints, `table` rows*dim f32s.
        unsafe { l.launch(grid_for(n * dim, 256)) }.map(drop).map_err(dev_err)
    }

    fn embedding_backward(&self, ids: &CudaSlice<i32>, dout: DevRef<'_>, dim: usize, dtable: DevMut<'_>) -> Result<()> {
        let n = dout.len / dim.max(1);
        check(
            "embedding_backward",
            dim > 0 && dout.len == n * dim && n <= ids.len() && dtable.len.is_multiple_of(dim),
            || format!("dout {} ids {} dim {dim} dtable {}", dout.len, ids.len(), dtable.len),
        )?;
        let (n64, d, rows) = (n as i64, dim as i32, (dtable.len / dim) as i32);
        let idp = self.ids_ptr(ids);
        self.note(backward_cost(n, dim));
        let mut l = self.stream().launch_builder(self.func(BACKWARD)?);
        l.arg(&dtable.ptr).arg(&idp).arg(&dout.ptr).arg(&n64).arg(&d).arg(&rows);
        // SAFETY: as in forward; `dtable` is exclusive.
        unsafe { l.launch(grid_for(n * dim, 256)) }.map(drop).map_err(dev_err)
    }
}
