//! AdamW and sum-of-squares launchers (see adamw.cu).

use cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};

use super::cost::{self, F32, LaunchCost};
use super::{Cuda, DevMut, DevRef, KernelSource, check, dev_err, grid_for};
use crate::{AdamW, OptimizerOps, Result};

const STEP: &str = "adamw_step";
const SUM_SQUARES: &str = "sum_squares";

pub(crate) const SOURCE: KernelSource =
    KernelSource { file: "adamw.cu", code: include_str!("adamw.cu"), kernels: &[STEP, SUM_SQUARES] };

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

    fn sum_squares(&self, x: DevRef<'_>) -> Result<f64> {
        self.note(cost::memset(2));
        let out = self.stream().alloc_zeros::<f64>(1).map_err(dev_err)?;
        if x.len > 0 {
            let n = x.len as i64;
            let blocks = (x.len.div_ceil(256) as u32).clamp(1, 4 * self.sm_count());
            let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            let (optr, _sync) = out.device_ptr(self.stream());
            self.note(sum_squares_cost(x.len));
            let mut l = self.stream().launch_builder(self.func(SUM_SQUARES)?);
            l.arg(&optr).arg(&x.ptr).arg(&n);
            // SAFETY: `out` holds one f64, `x` n f32s.
            unsafe { l.launch(cfg) }.map(drop).map_err(dev_err)?;
        }
        // Reading the result back is a host sync, once per call.
        self.note(cost::host_copy("memcpy_dtoh", 8));
        let mut host = [0.0f64];
        self.stream().memcpy_dtoh(&out, &mut host).map_err(dev_err)?;
        self.note(cost::sync("sync (sum_squares)"));
        self.stream().synchronize().map_err(dev_err)?;
        Ok(host[0])
    }
}
