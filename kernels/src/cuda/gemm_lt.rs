//! GEMMs with a fused epilogue, through cuBLASLt: a linear layer's bias added as its output is
//! written (`gemm_bias`), and its bias gradient summed from the operand the weight gradient
//! already reads (`gemm_bias_grad`). Each saves a pass over an activation-sized matrix and a
//! launch against the unfused GEMM + `bias_add` / `bias_column_sum` pair.
//!
//! Row-major to cuBLASLt's column-major, as in matmul.rs: our `C[m, n] = op(A) op(B)` is
//! cuBLASLt's `D'[n, m] = op(B') op(A')`, so its A is our B and its B is our A. Then
//! - our bias over the `n` columns of C is cuBLASLt's `BIAS` (length = rows of D');
//! - our `dbias[i] = sum_k op(A)[i, k]` (length m) is cuBLASLt's `BGRADB` (length = columns of
//!   D', reduced over k of its B, which is our A). It is written, not accumulated.
//!
//! Biases and bias gradients are fp32 (`BIAS_DATA_TYPE` set explicitly, also when D is bf16).
//! cuBLASLt may have no kernel for a combination (bf16 D with an fp32 bias, an unaligned bias):
//! its heuristic then finds nothing (or the matmul refuses with NOT_SUPPORTED), the answer is
//! cached per shape, and the caller falls back to the unfused pair, which computes the same
//! thing. conformance/tests/cublaslt_fallback.rs drives both refusals on the virtual GPU.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::cublaslt::{result as lt, sys as lsys};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use super::cost::GemmDtypes;
use super::{Cuda, GemmPrecision, dev_err};
use crate::{Dtype, GemmShape, Operand, Result};

/// What the epilogue does, in our row-major terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Epilogue {
    /// `C[r, :] += bias` (bias length n), before C's one rounding.
    Bias,
    /// `bias[i] = sum_k op(A)[i, k]` (bias length m), assigned.
    BiasGradOfA,
}

/// Workspace cuBLASLt may use (what PyTorch gives it on Hopper).
const WORKSPACE_BYTES: usize = 32 << 20;

/// Everything the algorithm choice depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
    ld: (usize, usize, usize),
    dtypes: (Dtype, Dtype),
    compute: u32,
    epilogue: Epilogue,
    /// Pointer alignments of A, B, C and the bias, in bytes (capped at 256).
    align: [u32; 4],
}

pub(crate) struct Lt {
    handle: lsys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    /// The heuristic's pick per key; `None`: cuBLASLt has no kernel for it (use the fallback).
    algos: Mutex<HashMap<Key, Option<lsys::cublasLtMatmulAlgo_t>>>,
}

// SAFETY: the handle is used only through `&Cuda`, whose work is serialised on one stream.
unsafe impl Send for Lt {}
// SAFETY: as above; the algorithm cache is behind a mutex.
unsafe impl Sync for Lt {}

impl Lt {
    pub(crate) fn new(stream: &Arc<CudaStream>) -> Result<Self> {
        let handle = lt::create_handle().map_err(dev_err)?;
        // SAFETY: the workspace is scratch cuBLASLt overwrites before reading.
        let workspace = unsafe { stream.alloc::<u8>(WORKSPACE_BYTES) }.map_err(dev_err)?;
        Ok(Self { handle, workspace, algos: Mutex::new(HashMap::new()) })
    }
}

impl Drop for Lt {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

/// Owned cuBLASLt descriptors, destroyed on every path out.
struct Desc(lsys::cublasLtMatmulDesc_t);
struct Layout(lsys::cublasLtMatrixLayout_t);
struct Pref(lsys::cublasLtMatmulPreference_t);

impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created by `create_matmul_desc`, destroyed once.
        let _ = unsafe { lt::destroy_matmul_desc(self.0) };
    }
}
impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created by `create_matrix_layout`, destroyed once.
        let _ = unsafe { lt::destroy_matrix_layout(self.0) };
    }
}
impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: created by `create_matmul_pref`, destroyed once.
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
}

fn cuda_type(d: Dtype) -> lsys::cudaDataType {
    match d {
        Dtype::F32 => lsys::cudaDataType::CUDA_R_32F,
        Dtype::Bf16 => lsys::cudaDataType::CUDA_R_16BF,
    }
}

fn alignment(ptr: u64) -> u32 {
    if ptr == 0 { 256 } else { (1u64 << ptr.trailing_zeros().min(8)) as u32 }
}

fn set_desc<T>(d: &Desc, attr: lsys::cublasLtMatmulDescAttributes_t, v: &T) -> Result<()> {
    // SAFETY: `v` is a live value of the attribute's C type (4-byte enums and ints, 8-byte
    // pointers), read during the call only.
    unsafe { lt::set_matmul_desc_attribute(d.0, attr, v as *const T as *const c_void, size_of::<T>()) }.map_err(dev_err)
}

fn set_pref<T>(p: &Pref, attr: lsys::cublasLtMatmulPreferenceAttributes_t, v: &T) -> Result<()> {
    // SAFETY: as in `set_desc`.
    unsafe { lt::set_matmul_pref_attribute(p.0, attr, v as *const T as *const c_void, size_of::<T>()) }.map_err(dev_err)
}

/// The pointers of one fused GEMM (callers checked extents and dtypes).
pub(crate) struct LtCall {
    pub s: GemmShape,
    pub a: u64,
    pub op_a: Operand,
    pub b: u64,
    pub op_b: Operand,
    pub c: u64,
    pub bias: u64,
    pub dtypes: GemmDtypes,
    pub epilogue: Epilogue,
}

impl Cuda {
    /// Queue `call` as one cuBLASLt matmul; `Ok(false)` when cuBLASLt has no kernel for it (the
    /// caller runs the unfused pair instead). beta is 0: C is written, never read.
    pub(crate) fn gemm_lt(&self, call: &LtCall) -> Result<bool> {
        let (s, op_a, op_b) = (call.s, call.op_a, call.op_b);
        let precision = if call.dtypes.ab == Dtype::Bf16 { GemmPrecision::Bf16 } else { self.precision() };
        let compute = match (precision, call.dtypes.ab) {
            (GemmPrecision::Bf16, Dtype::F32) => lsys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_16BF,
            _ => lsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        };
        let desc = Desc(lt::create_matmul_desc(compute, lsys::cudaDataType::CUDA_R_32F).map_err(dev_err)?);
        let op = |t: bool| {
            if t {
                cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        use lsys::cublasLtMatmulDescAttributes_t as D;
        set_desc(&desc, D::CUBLASLT_MATMUL_DESC_TRANSA, &op(op_b.trans))?;
        set_desc(&desc, D::CUBLASLT_MATMUL_DESC_TRANSB, &op(op_a.trans))?;
        let epilogue = match call.epilogue {
            Epilogue::Bias => lsys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
            Epilogue::BiasGradOfA => lsys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BGRADB,
        };
        set_desc(&desc, D::CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue)?;
        set_desc(&desc, D::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &call.bias)?;
        set_desc(&desc, D::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &lsys::cudaDataType::CUDA_R_32F)?;
        // cuBLASLt's A is our B, its B our A (see the module comment); stored shapes as read.
        let (ab, ct) = (cuda_type(call.dtypes.ab), cuda_type(call.dtypes.c));
        let layout = |t, rows: usize, cols: usize, ld: usize| {
            lt::create_matrix_layout(t, rows as u64, cols as u64, ld as i64).map(Layout).map_err(dev_err)
        };
        let (m, n, k) = (s.m, s.n, s.k);
        let a_l = if op_b.trans { layout(ab, k, n, op_b.ld)? } else { layout(ab, n, k, op_b.ld)? };
        let b_l = if op_a.trans { layout(ab, m, k, op_a.ld)? } else { layout(ab, k, m, op_a.ld)? };
        let d_l = layout(ct, n, m, s.ldc)?;
        let key = Key {
            m,
            n,
            k,
            trans_a: op_a.trans,
            trans_b: op_b.trans,
            ld: (op_a.ld, op_b.ld, s.ldc),
            dtypes: (call.dtypes.ab, call.dtypes.c),
            compute: compute as u32,
            epilogue: call.epilogue,
            align: [alignment(call.a), alignment(call.b), alignment(call.c), alignment(call.bias)],
        };
        let Some(algo) = self.lt_algo(&key, &desc, &a_l, &b_l, &d_l)? else { return Ok(false) };
        self.note(super::cost::gemm_epilogue(m, n, k, precision, call.dtypes, call.epilogue));
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (ws, _sync) = self.lt.workspace.device_ptr(self.stream());
        // SAFETY: pointers come from live views the callers checked against the shape; the
        // descriptors live until after the call; alpha/beta are host scalars read at queue time.
        let queued = unsafe {
            lt::matmul(
                self.lt.handle,
                desc.0,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                call.b as *const c_void,
                a_l.0,
                call.a as *const c_void,
                b_l.0,
                call.c as *const c_void,
                d_l.0,
                call.c as *mut c_void,
                d_l.0,
                &algo,
                ws as *mut c_void,
                WORKSPACE_BYTES,
                self.stream().cu_stream() as _,
            )
        };
        match queued {
            Ok(()) => Ok(true),
            // The heuristic offered a kernel that then refused these operands: remember it and
            // let the caller run the unfused pair (the cost entry noted above stays, unlaunched).
            Err(lt::CublasError(lsys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED)) => {
                self.lt.algos.lock().unwrap_or_else(|p| p.into_inner()).insert(key, None);
                Ok(false)
            }
            Err(e) => Err(dev_err(e)),
        }
    }

    /// The cached heuristic pick for `key`, asking cuBLASLt on first sight.
    fn lt_algo(
        &self,
        key: &Key,
        desc: &Desc,
        a_l: &Layout,
        b_l: &Layout,
        d_l: &Layout,
    ) -> Result<Option<lsys::cublasLtMatmulAlgo_t>> {
        let mut cache = self.lt.algos.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(found) = cache.get(key) {
            return Ok(*found);
        }
        let pref = Pref(lt::create_matmul_pref().map_err(dev_err)?);
        use lsys::cublasLtMatmulPreferenceAttributes_t as P;
        set_pref(&pref, P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &(WORKSPACE_BYTES as u64))?;
        // cuBLASLt assumes 256-byte aligned operands unless told; ours are views at any offset.
        // (The bias has no alignment preference: it is part of the key, so an unaligned one that
        // has no kernel falls back once and is remembered.)
        set_pref(&pref, P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &key.align[1])?;
        set_pref(&pref, P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &key.align[0])?;
        set_pref(&pref, P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &key.align[2])?;
        set_pref(&pref, P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &key.align[2])?;
        // SAFETY: every descriptor is live for the call.
        let found = match unsafe {
            lt::get_matmul_algo_heuristic(self.lt.handle, desc.0, a_l.0, b_l.0, d_l.0, d_l.0, pref.0)
        } {
            Ok(h) => Some(h.algo),
            Err(lt::CublasError(lsys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED)) => None,
            Err(e) => return Err(dev_err(e)),
        };
        cache.insert(*key, found);
        Ok(found)
    }
}
