//! GEMM family on CUDA: cuBLAS strided-batched GEMMs on row-major data, plus the bias kernels.
//!
//! cuBLAS is column-major. A row-major `C = op(A) op(B)` is the column-major
//! `C^T = op(B)^T op(A)^T`, so we call it with the operands swapped and m/n exchanged; a stored
//! row-major matrix read as column-major is its own transpose, so each operand's flag carries over.
//!
//! Operands are fp32, or bf16 (mixed precision): A and B share a dtype, and C is fp32 or bf16
//! with bf16 A and B (weight gradients accumulate in fp32), fp32 with fp32 A and B, the pairs
//! cuBLAS takes with an fp32 compute type. bf16 operands multiply exactly as stored, with fp32
//! accumulation (`CUBLAS_COMPUTE_32F`); fp32 ones are rounded to bf16 inside cuBLAS when the
//! precision is `Bf16` (`CUBLAS_COMPUTE_32F_FAST_16BF`).

use std::ffi::c_void;

use cudarc::cublas::{result as blas, sys as bsys};
use cudarc::driver::CudaStream;

use super::cost::GemmDtypes;
use super::gemm_lt::{Epilogue, LtCall};
use super::{Cuda, DevMut, DevRef, GemmPrecision, check, cost, dev_err, require_f32};
use crate::{Dtype, GemmOps, GemmShape, Memory, Operand, Result};

pub(crate) struct Blas {
    handle: bsys::cublasHandle_t,
}

// SAFETY: the handle is only used from the thread that owns `Cuda`, on its one stream.
unsafe impl Send for Blas {}
// SAFETY: as above; `Cuda`'s ops take `&self` but cuBLAS calls are serialised on one stream.
unsafe impl Sync for Blas {}

impl Blas {
    pub(crate) fn new(stream: &CudaStream) -> Result<Self> {
        let handle = blas::create_handle().map_err(dev_err)?;
        // SAFETY: fresh handle; the stream outlives it (both owned by `Cuda`).
        unsafe { blas::set_stream(handle, stream.cu_stream() as _) }.map_err(dev_err)?;
        Ok(Self { handle })
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once.
        let _ = unsafe { blas::destroy_handle(self.handle) };
    }
}

fn span(rows: usize, cols: usize, ld: usize) -> usize {
    if rows == 0 || cols == 0 { 0 } else { (rows - 1) * ld + cols }
}

/// Elements the operand occupies: op(X) is `rows x cols`, stored transposed when `trans`.
fn operand_span(op: Operand, rows: usize, cols: usize, batch: usize) -> usize {
    let one = if op.trans { span(cols, rows, op.ld) } else { span(rows, cols, op.ld) };
    if batch == 0 { 0 } else { (batch - 1) * op.batch_stride + one }
}

impl Cuda {
    /// Row-major strided-batched GEMM on raw device pointers (bounds and dtype pairs checked by
    /// callers).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm_raw(
        &self,
        s: GemmShape,
        alpha: f32,
        a: u64,
        op_a: Operand,
        b: u64,
        op_b: Operand,
        beta: f32,
        c: u64,
        dtypes: GemmDtypes,
    ) -> Result<()> {
        if s.m == 0 || s.n == 0 || s.batch == 0 {
            return Ok(());
        }
        let flag =
            |t: bool| if t { bsys::cublasOperation_t::CUBLAS_OP_T } else { bsys::cublasOperation_t::CUBLAS_OP_N };
        // bf16 operands are multiplied as stored: the compute type only has to accumulate in fp32.
        let precision = if dtypes.ab == Dtype::Bf16 { GemmPrecision::Bf16 } else { self.precision() };
        let compute = match (precision, dtypes.ab) {
            (GemmPrecision::Fp32, _) | (GemmPrecision::Bf16, Dtype::Bf16) => {
                bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F
            }
            (GemmPrecision::Bf16, Dtype::F32) => bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_16BF,
        };
        let cuda_type = |d: Dtype| match d {
            Dtype::F32 => bsys::cudaDataType::CUDA_R_32F,
            Dtype::Bf16 => bsys::cudaDataType::CUDA_R_16BF,
        };
        let (abt, ct) = (cuda_type(dtypes.ab), cuda_type(dtypes.c));
        self.note(cost::gemm(s.m, s.n, s.k, s.batch, beta != 0.0, precision, dtypes));
        // SAFETY: pointers come from live views whose extents the callers checked against the
        // shape; alpha/beta are host scalars that outlive the (stream-ordered) call.
        unsafe {
            blas::gemm_strided_batched_ex(
                self.blas.handle,
                flag(op_b.trans),
                flag(op_a.trans),
                s.n as i32,
                s.m as i32,
                s.k as i32,
                &alpha as *const f32 as *const c_void,
                b as *const c_void,
                abt,
                op_b.ld as i32,
                op_b.batch_stride as i64,
                a as *const c_void,
                abt,
                op_a.ld as i32,
                op_a.batch_stride as i64,
                &beta as *const f32 as *const c_void,
                c as *mut c_void,
                ct,
                s.ldc as i32,
                s.batch_stride_c as i64,
                s.batch as i32,
                compute,
                bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(dev_err)
    }
}

impl Cuda {
    /// Operand extents against the shape, and a dtype combination cuBLAS takes.
    #[allow(clippy::too_many_arguments)]
    fn check_gemm(
        &self,
        op: &'static str,
        s: GemmShape,
        a: DevRef<'_>,
        op_a: Operand,
        b: DevRef<'_>,
        op_b: Operand,
        c: &DevMut<'_>,
    ) -> Result<GemmDtypes> {
        check(op, operand_span(op_a, s.m, s.k, s.batch) <= a.len, || {
            format!("A too short: {s:?} {op_a:?} len {}", a.len)
        })?;
        check(op, operand_span(op_b, s.k, s.n, s.batch) <= b.len, || {
            format!("B too short: {s:?} {op_b:?} len {}", b.len)
        })?;
        let c_need = if s.batch == 0 { 0 } else { (s.batch - 1) * s.batch_stride_c + span(s.m, s.n, s.ldc) };
        check(op, c_need <= c.len, || format!("C too short: {s:?} len {}", c.len))?;
        check(op, a.dtype == b.dtype && (a.dtype == Dtype::Bf16 || c.dtype == Dtype::F32), || {
            format!("unsupported dtypes A {:?} B {:?} C {:?}", a.dtype, b.dtype, c.dtype)
        })?;
        Ok(GemmDtypes { ab: a.dtype, c: c.dtype })
    }
}

impl GemmOps for Cuda {
    fn gemm(
        &self,
        s: GemmShape,
        alpha: f32,
        a: DevRef<'_>,
        op_a: Operand,
        b: DevRef<'_>,
        op_b: Operand,
        beta: f32,
        c: DevMut<'_>,
    ) -> Result<()> {
        let dtypes = self.check_gemm("gemm", s, a, op_a, b, op_b, &c)?;
        self.gemm_raw(s, alpha, a.ptr, op_a, b.ptr, op_b, beta, c.ptr, dtypes)
    }

    fn add_bias(&self, y: DevMut<'_>, bias: DevRef<'_>, cols: usize) -> Result<()> {
        check("add_bias", cols == bias.len && cols > 0 && y.len.is_multiple_of(cols), || {
            format!("y {} bias {}", y.len, bias.len)
        })?;
        let rows = y.len / cols;
        self.launch_bias_add(y, bias, rows, cols)
    }

    fn bias_grad(&self, dy: DevRef<'_>, dbias: DevMut<'_>, cols: usize) -> Result<()> {
        check("bias_grad", cols == dbias.len && cols > 0 && dy.len.is_multiple_of(cols), || {
            format!("dy {} dbias {}", dy.len, dbias.len)
        })?;
        self.launch_column_sum(dbias, dy, dy.len / cols, cols)
    }

    fn gemm_bias(
        &self,
        s: GemmShape,
        a: DevRef<'_>,
        op_a: Operand,
        b: DevRef<'_>,
        op_b: Operand,
        bias: DevRef<'_>,
        c: DevMut<'_>,
    ) -> Result<()> {
        crate::check_epilogue_shape("gemm_bias", s, op_a)?;
        check("gemm_bias", bias.len == s.n, || format!("bias {} for n {}", bias.len, s.n))?;
        require_f32("gemm_bias", &[bias.dtype])?;
        let dtypes = self.check_gemm("gemm_bias", s, a, op_a, b, op_b, &c)?;
        let call =
            LtCall { s, a: a.ptr, op_a, b: b.ptr, op_b, c: c.ptr, bias: bias.ptr, dtypes, epilogue: Epilogue::Bias };
        if s.m == 0 || s.n == 0 || self.gemm_lt(&call)? {
            return Ok(());
        }
        // No cuBLASLt kernel for this combination: the same result unfused.
        self.gemm_raw(s, 1.0, a.ptr, op_a, b.ptr, op_b, 0.0, c.ptr, dtypes)?;
        self.launch_bias_add(c, bias, s.m, s.n)
    }

    fn gemm_bias_grad(
        &self,
        s: GemmShape,
        a: DevRef<'_>,
        op_a: Operand,
        b: DevRef<'_>,
        op_b: Operand,
        c: DevMut<'_>,
        dbias: DevMut<'_>,
    ) -> Result<()> {
        crate::check_epilogue_shape("gemm_bias_grad", s, op_a)?;
        check("gemm_bias_grad", op_a.trans && op_a.ld == s.m && a.len == s.k * s.m, || {
            format!("A must be read transposed, exactly k x m: {op_a:?} {s:?} len {}", a.len)
        })?;
        check("gemm_bias_grad", dbias.len == s.m, || format!("dbias {} for m {}", dbias.len, s.m))?;
        require_f32("gemm_bias_grad", &[c.dtype, dbias.dtype])?;
        let dtypes = self.check_gemm("gemm_bias_grad", s, a, op_a, b, op_b, &c)?;
        let call = LtCall {
            s,
            a: a.ptr,
            op_a,
            b: b.ptr,
            op_b,
            c: c.ptr,
            bias: dbias.ptr,
            dtypes,
            epilogue: Epilogue::BiasGradOfA,
        };
        if s.m == 0 || s.n == 0 {
            return Ok(());
        }
        if s.k > 0 && self.gemm_lt(&call)? {
            return Ok(());
        }
        self.gemm_raw(s, 1.0, a.ptr, op_a, b.ptr, op_b, 0.0, c.ptr, dtypes)?;
        let mut dbias = dbias;
        self.fill(self.reborrow(&mut dbias), 0.0)?;
        self.launch_column_sum(dbias, a, s.k, s.m)
    }
}
