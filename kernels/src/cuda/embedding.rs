//! Embedding family launchers (see embedding.cu): fp32 table and table gradient, fp32 or bf16
//! `out`/`dout` (activations).

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::cost::{self, F32, I32, LaunchCost};
use super::{Cuda, DevMut, DevRef, KernelSource, Typed, check, dev_err, grid_for, require_f32};
use crate::{Dtype, EmbeddingOps, Result};

const FORWARD: Typed = Typed { f32: "embedding_forward", bf16: "embedding_forward_bf16" };
const BACKWARD: Typed = Typed { f32: "embedding_backward", bf16: "embedding_backward_bf16" };

pub(crate) const SOURCE: KernelSource = KernelSource {
    file: "embedding.cu",
    code: include_str!("embedding.cu"),
    kernels: &[FORWARD.f32, FORWARD.bf16, BACKWARD.f32, BACKWARD.bf16],
};

/// `embedding_forward` of `n` ids: reads the ids and `n` fp32 table rows of `dim`, writes out
/// (`dtype`; read too when accumulating, one add an element).
pub(crate) fn forward_cost(n: usize, dim: usize, accumulate: bool, dtype: Dtype) -> LaunchCost {
    let (n, d) = (n as u64, dim as u64);
    let (out_passes, flops) = if accumulate { (2, n * d) } else { (1, 0) };
    let name = if dtype == Dtype::Bf16 { FORWARD.bf16 } else { FORWARD.f32 };
    LaunchCost::kernel(name, I32 * n + F32 * n * d + cost::size(dtype) * out_passes * n * d, flops)
}

/// `embedding_backward`: reads the ids and dout (`dtype`), adds into `n` rows of the fp32
/// dtable (read and written; atomics, which the ideal-traffic count ignores).
pub(crate) fn backward_cost(n: usize, dim: usize, dtype: Dtype) -> LaunchCost {
    let (n, d) = (n as u64, dim as u64);
    let name = if dtype == Dtype::Bf16 { BACKWARD.bf16 } else { BACKWARD.f32 };
    LaunchCost::kernel(name, I32 * n + cost::size(dtype) * n * d + F32 * 2 * n * d, n * d)
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
        require_f32("embedding_forward", &[table.dtype])?;
        let (name, dtype) = FORWARD.pick("embedding_forward", &[out.dtype])?;
        let (n64, d, rows, acc) = (n as i64, dim as i32, (table.len / dim) as i32, accumulate as i32);
        let idp = self.ids_ptr(ids);
        self.note(forward_cost(n, dim, accumulate, dtype));
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
        require_f32("embedding_backward", &[dtable.dtype])?;
        let (name, dtype) = BACKWARD.pick("embedding_backward", &[dout.dtype])?;
        let (n64, d, rows) = (n as i64, dim as i32, (dtable.len / dim) as i32);
        let idp = self.ids_ptr(ids);
        self.note(backward_cost(n, dim, dtype));
        let mut l = self.stream().launch_builder(self.func(name)?);
        l.arg(&dtable.ptr).arg(&idp).arg(&dout.ptr).arg(&n64).arg(&d).arg(&rows);
        // SAFETY: as in forward; `dtable` is exclusive.
        unsafe { l.launch(grid_for(n * dim, 256)) }.map(drop).map_err(dev_err)
    }
}
