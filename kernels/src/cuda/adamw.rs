//! AdamW and sum-of-squares launchers (see adamw.cu): per tensor (`adamw`), and over the whole
//! flat buffer with the norm and clipping on the device (`adamw_flat`: memset + `sum_squares` +
//! `adamw_flat`, three stream-ordered operations and no host sync).

use cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};

use super::cost::{self, F32, LaunchCost};
use super::{Cuda, DevMut, DevRef, KernelSource, check, dev_err, grid_for, require_f32};
use crate::{AdamW, FlatSegments, OptimizerOps, Result};

const STEP: &str = "adamw_step";
const SUM_SQUARES: &str = "sum_squares";
const FLAT: &str = "adamw_flat";

pub(crate) const SOURCE: KernelSource =
    KernelSource { file: "adamw.cu", code: include_str!("adamw.cu"), kernels: &[STEP, SUM_SQUARES, FLAT] };

/// `adamw_flat` over `elems` updated elements in `chunks` chunks: the 7 passes of
/// `adamw_step` on each, the chunk table (12 bytes a chunk), the f64 sum read by every block and
/// the f32 norm written; 15 FLOPs an element (`adamw_step`'s and the clipping multiply).
fn flat_cost(elems: usize, chunks: usize, with_copy: bool) -> LaunchCost {
    let (n, c) = (elems as u64, chunks as u64);
    let copy = if with_copy { 2 * n } else { 0 };
    LaunchCost::kernel(FLAT, F32 * 7 * n + copy + 12 * c + 8 + F32, 15 * n)
}

/// `adamw_step` over `n` parameters: reads params, grads, m and v, writes params, m and v
/// (7 passes); about 14 FLOPs an element (two moment updates, sqrt, divide, decay, step).
/// Launched once per parameter tensor today, so a model pays ~400 launch overheads here.
fn step_cost(n: usize) -> LaunchCost {
    let n = n as u64;
    LaunchCost::kernel(STEP, F32 * 7 * n, 14 * n)
}

/// `sum_squares` over `n` floats: reads them once, one f64 result; 2 FLOPs an element.
fn sum_squares_cost(n: usize) -> LaunchCost {
    let n = n as u64;
    LaunchCost::kernel(SUM_SQUARES, F32 * n + 8, 2 * n)
}

impl OptimizerOps for Cuda {
    fn adamw(&self, h: AdamW, params: DevMut<'_>, grads: DevRef<'_>, m: DevMut<'_>, v: DevMut<'_>) -> Result<()> {
        let n = params.len;
        check("adamw", grads.len == n && m.len == n && v.len == n && h.step >= 1, || {
            format!("params {n} grads {} m {} v {} step {}", grads.len, m.len, v.len, h.step)
        })?;
        // Master weights, their gradients and the moments are fp32 (never activations).
        require_f32("adamw", &[params.dtype, grads.dtype, m.dtype, v.dtype])?;
        if n == 0 {
            return Ok(());
        }
        let bc1 = 1.0 - h.beta1.powi(h.step as i32);
        let bc2_sqrt = (1.0 - h.beta2.powi(h.step as i32)).sqrt();
        let (step_size, decay, n64) = (h.lr / bc1, 1.0 - h.lr * h.weight_decay, n as i64);
        self.note(step_cost(n));
        let mut l = self.stream().launch_builder(self.func(STEP)?);
        l.arg(&params.ptr)
            .arg(&grads.ptr)
            .arg(&m.ptr)
            .arg(&v.ptr)
            .arg(&n64)
            .arg(&h.beta1)
            .arg(&h.beta2)
            .arg(&h.eps)
            .arg(&decay)
            .arg(&step_size)
            .arg(&bc2_sqrt);
        // SAFETY: four live views of n f32s; params/m/v exclusive.
        unsafe { l.launch(grid_for(n, 256)) }.map(drop).map_err(dev_err)
    }

    fn adamw_flat(
        &self,
        h: AdamW,
        max_norm: f32,
        segs: &FlatSegments<cudarc::driver::CudaSlice<i32>>,
        params: DevMut<'_>,
        grads: DevRef<'_>,
        m: DevMut<'_>,
        v: DevMut<'_>,
        norm: DevMut<'_>,
        copy: Option<DevMut<'_>>,
    ) -> Result<()> {
        let n = segs.len;
        if let Some(c) = &copy {
            check("adamw_flat", c.len == n && c.dtype == crate::Dtype::Bf16, || {
                format!("the weight copy must be {n} bf16s, got {} {:?}", c.len, c.dtype)
            })?;
        }
        let copy_ptr: u64 = copy.as_ref().map_or(0, |c| c.ptr);
        let ok = params.len == n
            && grads.len == n
            && m.len == n
            && v.len == n
            && norm.len == 1
            && segs.table.len() >= 3 * segs.chunks
            && segs.chunks <= i32::MAX as usize
            && h.step >= 1;
        check("adamw_flat", ok, || {
            format!(
                "segments over {n}: params {} grads {} m {} v {} norm {} table {} ({} chunks) step {}",
                params.len,
                grads.len,
                m.len,
                v.len,
                norm.len,
                segs.table.len(),
                segs.chunks,
                h.step
            )
        })?;
        require_f32("adamw_flat", &[params.dtype, grads.dtype, m.dtype, v.dtype, norm.dtype])?;
        // The squared norm stays on the device, read by `adamw_flat` (same stream, so ordered).
        let sptr = self.queue_sum_squares(grads)?;
        let bc1 = 1.0 - h.beta1.powi(h.step as i32);
        let bc2_sqrt = (1.0 - h.beta2.powi(h.step as i32)).sqrt();
        let (step_size, decay) = (h.lr / bc1, 1.0 - h.lr * h.weight_decay);
        let n_chunks = segs.chunks as i32;
        let (tptr, _tsync) = segs.table.device_ptr(self.stream());
        let cfg =
            LaunchConfig { grid_dim: (segs.chunks.max(1) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        self.note(flat_cost(segs.elems, segs.chunks, copy.is_some()));
        let mut l = self.stream().launch_builder(self.func(FLAT)?);
        l.arg(&params.ptr)
            .arg(&grads.ptr)
            .arg(&m.ptr)
            .arg(&v.ptr)
            .arg(&tptr)
            .arg(&n_chunks)
            .arg(&sptr)
            .arg(&norm.ptr)
            .arg(&max_norm)
            .arg(&h.beta1)
            .arg(&h.beta2)
            .arg(&h.eps)
            .arg(&decay)
            .arg(&step_size)
            .arg(&bc2_sqrt)
            .arg(&copy_ptr);
        // SAFETY: params/grads/m/v are live views of n f32s (params/m/v exclusive), `copy` null
        // or an exclusive view of n bf16s, the table
        // holds 3*chunks i32s whose chunks lie inside 0..n (FlatSegments::host_table checks),
        // `sum` one f64 and `norm` one exclusive f32.
        unsafe { l.launch(cfg) }.map(drop).map_err(dev_err)
    }

    fn sum_squares(&self, x: DevRef<'_>) -> Result<f64> {
        require_f32("sum_squares", &[x.dtype])?;
        let out = self.queue_sum_squares(x)?;
        // Reading the result back is a host sync, once per call.
        self.note(cost::host_copy("memcpy_dtoh", 8));
        let mut host = [0.0f64];
        // SAFETY: `out` is the backend's live f64 accumulator; the stream is synchronised below
        // before `host` is read.
        unsafe { cudarc::driver::result::memcpy_dtoh_async(&mut host, out, self.stream().cu_stream()) }
            .map_err(dev_err)?;
        self.note(cost::sync("sync (sum_squares)"));
        self.stream().synchronize().map_err(dev_err)?;
        Ok(host[0])
    }
}

impl Cuda {
    /// The backend's f64 accumulator (allocated once, so a step allocates nothing), zeroed and,
    /// queued after that, `sum_squares` of `x` into it: the squared norm for `sum_squares` (read
    /// back) and `adamw_flat` (kept on the device). Returns its device address; the one stream
    /// orders every reuse after the previous reader.
    fn queue_sum_squares(&self, x: DevRef<'_>) -> Result<u64> {
        let optr = self.norm_accumulator()?;
        self.note(cost::memset(2, crate::Dtype::F32));
        // SAFETY: `optr` is the live 8-byte accumulator, written on this stream only.
        unsafe { cudarc::driver::sys::cuMemsetD32Async(optr, 0, 2, self.stream().cu_stream()) }
            .result()
            .map_err(dev_err)?;
        if x.len > 0 {
            let n = x.len as i64;
            let blocks = (x.len.div_ceil(256) as u32).clamp(1, 4 * self.sm_count());
            let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            self.note(sum_squares_cost(x.len));
            let mut l = self.stream().launch_builder(self.func(SUM_SQUARES)?);
            l.arg(&optr).arg(&x.ptr).arg(&n);
            // SAFETY: `out` holds one f64, `x` n f32s.
            unsafe { l.launch(cfg) }.map(drop).map_err(dev_err)?;
        }
        Ok(optr)
    }
}
