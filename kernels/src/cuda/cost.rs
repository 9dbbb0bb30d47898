//! Declared costs of the CUDA backend's work, for the cost model (`bert2bert bench --predict`).
//!
//! Every launcher states, next to its kernel, what one launch must move through global memory
//! and how many floating-point operations it does; cuBLAS calls, memsets, copies and host
//! synchronisations are declared the same way. When recording is on ([`super::Cuda::record_costs`])
//! each launch appends its [`LaunchCost`]; [`super::roofline`] turns the list into a predicted
//! step time on a given GPU.
//!
//! Bytes are the *ideal* traffic at each operand's storage dtype (4 bytes an fp32 element, 2 a
//! bf16 one: activations are bf16 in mixed precision, the rest fp32): each
//! input read once, each output written once (read too when the kernel accumulates into it),
//! no cache effects, no re-reads. A kernel that re-reads its input (e.g. layernorm's two passes
//! over a row) is still charged once: the row fits in L1/L2, and the model is a lower bound.
//! FLOPs are exact for GEMMs (`2*m*n*k` per batch entry) and approximate for the elementwise
//! kernels (a few per element, stated per kernel); those are memory bound at any plausible
//! count, so the approximation does not move the roofline.

use std::sync::Mutex;

use super::GemmPrecision;
use crate::Dtype;

/// fp32 storage: bytes per element.
pub const F32: u64 = 4;

/// Bytes per element of `dtype`.
pub fn size(dtype: Dtype) -> u64 {
    dtype.size() as u64
}
/// i32 ids and labels: bytes per element.
pub const I32: u64 = 4;

/// What kind of work a recorded entry is; the roofline prices each differently.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Work {
    /// One of our NVRTC kernels (fp32 CUDA cores).
    Kernel,
    /// One of our NVRTC kernels whose dot products run on bf16 tensor cores (mma.sync), with the
    /// share of its FLOPs that stays on fp32 CUDA cores (softmax, exp, masks): the tensor-core
    /// FLOPs are priced at the bf16 peak, the rest at the fp32 peak.
    TensorKernel { simt_flops: u64 },
    /// A cuBLAS GEMM, with the compute type it ran at (bf16 or fp32 tensor-core-less).
    Gemm(GemmPrecision),
    /// A device memset or device-to-device copy: pure memory traffic.
    Memory,
    /// A host-to-device or device-to-host copy over PCIe (`bytes` crossed the bus).
    HostCopy,
    /// The host waits for the stream (synchronize, or reading a value back): a pipeline bubble.
    Sync,
}

/// One recorded launch (or copy, or sync) and its declared cost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchCost {
    pub kernel: &'static str,
    pub work: Work,
    pub bytes: u64,
    pub flops: u64,
}

impl LaunchCost {
    pub fn kernel(kernel: &'static str, bytes: u64, flops: u64) -> Self {
        Self { kernel, work: Work::Kernel, bytes, flops }
    }

    /// A kernel doing `flops` in all, of which `simt_flops` on CUDA cores and the rest on bf16
    /// tensor cores.
    pub fn tensor_kernel(kernel: &'static str, bytes: u64, flops: u64, simt_flops: u64) -> Self {
        Self { kernel, work: Work::TensorKernel { simt_flops: simt_flops.min(flops) }, bytes, flops }
    }
}

/// The storage of a GEMM's operands: A and B share one dtype, C may differ (bf16 A and B
/// accumulate into fp32 weight gradients).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmDtypes {
    pub ab: Dtype,
    pub c: Dtype,
}

impl GemmDtypes {
    pub const F32: GemmDtypes = GemmDtypes { ab: Dtype::F32, c: Dtype::F32 };
}

/// A row-major strided-batched GEMM `C = alpha op(A) op(B) + beta C`: reads A (`m x k`) and B
/// (`k x n`) once, writes C (`m x n`) once and reads it too when `beta != 0`; `2*m*n*k` FLOPs,
/// all per batch entry.
pub fn gemm(
    m: usize,
    n: usize,
    k: usize,
    batch: usize,
    accumulate: bool,
    precision: GemmPrecision,
    dtypes: GemmDtypes,
) -> LaunchCost {
    let (m, n, k, b) = (m as u64, n as u64, k as u64, batch as u64);
    let c_passes = if accumulate { 2 } else { 1 };
    let kernel = match precision {
        GemmPrecision::Bf16 => "cublas_gemm_bf16",
        GemmPrecision::Fp32 => "cublas_gemm_fp32",
    };
    LaunchCost {
        kernel,
        work: Work::Gemm(precision),
        bytes: b * (size(dtypes.ab) * (m * k + k * n) + size(dtypes.c) * c_passes * m * n),
        flops: 2 * m * n * k * b,
    }
}

/// A GEMM with a cuBLASLt epilogue (see gemm_lt.rs): the GEMM's traffic with C written once,
/// plus the fp32 bias read (`Bias`, length n) or the fp32 bias gradient written (`BiasGradOfA`,
/// length m, summed from A as it streams through). The epilogue's adds are not counted as GEMM
/// FLOPs: they hide under the tensor-core work.
pub(crate) fn gemm_epilogue(
    m: usize,
    n: usize,
    k: usize,
    precision: GemmPrecision,
    dtypes: GemmDtypes,
    epilogue: super::gemm_lt::Epilogue,
) -> LaunchCost {
    use super::gemm_lt::Epilogue;
    let mut c = gemm(m, n, k, 1, false, precision, dtypes);
    let (extra_bytes, kernel) = match (epilogue, precision) {
        (Epilogue::Bias, GemmPrecision::Bf16) => (F32 * n as u64, "cublaslt_gemm_bias_bf16"),
        (Epilogue::Bias, GemmPrecision::Fp32) => (F32 * n as u64, "cublaslt_gemm_bias_fp32"),
        (Epilogue::BiasGradOfA, GemmPrecision::Bf16) => (F32 * m as u64, "cublaslt_gemm_bgrad_bf16"),
        (Epilogue::BiasGradOfA, GemmPrecision::Fp32) => (F32 * m as u64, "cublaslt_gemm_bgrad_fp32"),
    };
    c.kernel = kernel;
    c.bytes += extra_bytes;
    c
}

/// A memset over `n` elements of `dtype` (`fill`, and the zeroing of every `alloc_zeros`).
pub fn memset(n: usize, dtype: Dtype) -> LaunchCost {
    LaunchCost { kernel: "memset", work: Work::Memory, bytes: size(dtype) * n as u64, flops: 0 }
}

/// A device-to-device copy of `n` elements of `dtype`: read once, written once.
pub fn copy_dtod(n: usize, dtype: Dtype) -> LaunchCost {
    LaunchCost { kernel: "memcpy_dtod", work: Work::Memory, bytes: 2 * size(dtype) * n as u64, flops: 0 }
}

/// A copy of `bytes` over PCIe.
pub fn host_copy(kernel: &'static str, bytes: usize) -> LaunchCost {
    LaunchCost { kernel, work: Work::HostCopy, bytes: bytes as u64, flops: 0 }
}

/// The host waiting for the stream.
pub fn sync(kernel: &'static str) -> LaunchCost {
    LaunchCost { kernel, work: Work::Sync, bytes: 0, flops: 0 }
}

/// The backend's recording switch and its list: `None` when not recording, so a launch pays one
/// uncontended lock and nothing else.
#[derive(Default)]
pub(crate) struct Recorder(Mutex<Option<Vec<LaunchCost>>>);

impl Recorder {
    pub(crate) fn set(&self, on: bool) {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *g = if on { Some(g.take().unwrap_or_default()) } else { None };
    }

    /// Appends `cost` when recording; says whether it did.
    pub(crate) fn note(&self, cost: LaunchCost) -> bool {
        match self.0.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            Some(list) => {
                list.push(cost);
                true
            }
            None => false,
        }
    }

    pub(crate) fn take(&self) -> Vec<LaunchCost> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).as_mut().map(std::mem::take).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::attention::Variant::{Mma, Simt};
    use crate::cuda::{attention, bias, layernorm, residual_norm};

    // Expected values are worked out by hand for odd shapes, element counts times 4 bytes.

    #[test]
    fn a_gemm_reads_a_and_b_writes_c_and_reads_c_when_accumulating() {
        // m 37, n 129, k 65, 3 batch entries: A 37*65 = 2405, B 65*129 = 8385, C 37*129 = 4773.
        let g = gemm(37, 129, 65, 3, false, GemmPrecision::Bf16, GemmDtypes::F32);
        assert_eq!(g.bytes, 4 * 3 * (2405 + 8385 + 4773));
        assert_eq!(g.flops, 2 * 37 * 129 * 65 * 3);
        assert_eq!(g.flops, 1_861_470);
        assert_eq!((g.kernel, g.work), ("cublas_gemm_bf16", Work::Gemm(GemmPrecision::Bf16)));
        let acc = gemm(37, 129, 65, 3, true, GemmPrecision::Fp32, GemmDtypes::F32);
        assert_eq!(acc.bytes, 4 * 3 * (2405 + 8385 + 2 * 4773));
        assert_eq!(acc.work, Work::Gemm(GemmPrecision::Fp32));
        // bf16 A and B (2 bytes) accumulating into an fp32 C (4 bytes, read and written).
        let mixed = GemmDtypes { ab: Dtype::Bf16, c: Dtype::F32 };
        assert_eq!(gemm(37, 129, 65, 3, true, GemmPrecision::Bf16, mixed).bytes, 3 * (2 * (2405 + 8385) + 8 * 4773));
        let bf16 = GemmDtypes { ab: Dtype::Bf16, c: Dtype::Bf16 };
        assert_eq!(gemm(37, 129, 65, 3, false, GemmPrecision::Bf16, bf16).bytes, 2 * 3 * (2405 + 8385 + 4773));
    }

    #[test]
    fn layernorm_moves_its_rows_twice_forward_and_four_times_backward() {
        // 37 rows of 129: x 4773 read, out 4773 written, gamma and beta 129 each, mean and
        // rstd 37 each.
        let f = layernorm::forward_cost(37, 129, Dtype::F32);
        assert_eq!(f.bytes, 4 * (4773 + 4773 + 129 + 129 + 37 + 37));
        assert_eq!(f.bytes, 39_512);
        assert_eq!((f.flops, f.kernel), (8 * 4773, "layernorm_forward"));
        // Backward, accumulating dx: dout, x, dx read, dx written; gamma; mean, rstd; 5 blocks'
        // partial rows of 2 * 129 written; the reduction reads them and reads and writes dgamma
        // and dbeta.
        let b = layernorm::backward_cost(37, 129, true, 5, Dtype::F32);
        assert_eq!(b.bytes, 4 * (4 * 4773 + 129 + 2 * 37 + 5 * 258));
        assert_eq!(layernorm::backward_cost(37, 129, false, 5, Dtype::F32).bytes, b.bytes - 4 * 4773);
        assert_eq!(layernorm::param_grad_cost(129, 5).bytes, 4 * (5 * 258 + 4 * 129));
        // bf16 activations (x, out, dout, dx: 2 bytes); gamma, beta, the statistics and the
        // partials stay fp32.
        let f = layernorm::forward_cost(37, 129, Dtype::Bf16);
        assert_eq!(f.bytes, 2 * (4773 + 4773) + 4 * (129 + 129 + 37 + 37));
        assert_eq!((f.bytes, f.flops, f.kernel), (20_420, 8 * 4773, "layernorm_forward_bf16"));
        let b = layernorm::backward_cost(37, 129, true, 5, Dtype::Bf16);
        assert_eq!(b.bytes, 2 * 4 * 4773 + 4 * (129 + 2 * 37 + 5 * 258));
        assert_eq!(b.kernel, "layernorm_backward_bf16");
        assert_eq!(layernorm::backward_cost(37, 129, false, 5, Dtype::Bf16).bytes, b.bytes - 2 * 4773);
    }

    #[test]
    fn residual_norm_moves_four_rows_forward_and_four_or_five_backward() {
        // Forward: block output and skip read, sum and out written; gamma, beta; mean, rstd.
        let f = residual_norm::forward_cost(37, 129, 0.1, Dtype::F32);
        assert_eq!(f.bytes, 4 * (4 * 4773 + 2 * 129 + 2 * 37));
        assert_eq!((f.flops, residual_norm::forward_cost(37, 129, 0.0, Dtype::F32).flops), (17 * 4773, 9 * 4773));
        // Backward: dout and sum read, d_skip and d_x written (d_skip read too when it
        // accumulates); gamma; mean, rstd; 5 blocks' partial rows.
        let b = residual_norm::backward_cost(37, 129, false, 0.1, 5, Dtype::F32);
        assert_eq!(b.bytes, 4 * (4 * 4773 + 129 + 2 * 37 + 5 * 258));
        assert_eq!(residual_norm::backward_cost(37, 129, true, 0.1, 5, Dtype::F32).bytes, b.bytes + 4 * 4773);
        // bf16 activations: the four (or five) row passes at 2 bytes, the rest fp32.
        let f = residual_norm::forward_cost(37, 129, 0.1, Dtype::Bf16);
        assert_eq!(f.bytes, 2 * 4 * 4773 + 4 * (2 * 129 + 2 * 37));
        assert_eq!((f.bytes, f.kernel), (39_512, "residual_norm_forward_bf16"));
        let b = residual_norm::backward_cost(37, 129, false, 0.1, 5, Dtype::Bf16);
        assert_eq!(b.bytes, 2 * 4 * 4773 + 4 * (129 + 2 * 37 + 5 * 258));
        assert_eq!(b.kernel, "residual_norm_backward_bf16");
        assert_eq!(residual_norm::backward_cost(37, 129, true, 0.1, 5, Dtype::Bf16).bytes, b.bytes + 2 * 4773);
    }

    #[test]
    fn the_backward_grid_fits_its_slices_in_shared_memory() {
        use layernorm::BackwardGrid;
        // bert-base: 8 warps of 2 * 768 floats is exactly 48 KiB; 4096 rows on 132 SMs.
        let g = BackwardGrid::new("t", 4096, 768, 132).unwrap();
        assert_eq!((g.warps, g.blocks, g.config(768).shared_mem_bytes), (8, 264, 48 * 1024));
        assert_eq!(BackwardGrid::new("t", 37, 1024, 132).unwrap(), BackwardGrid { warps: 6, blocks: 7 });
        assert_eq!(BackwardGrid::new("t", 37, 6144, 132).unwrap().warps, 1);
        assert!(BackwardGrid::new("t", 37, 6145, 132).is_err());
    }

    #[test]
    fn bias_costs_count_each_operand_once() {
        // 37 x 129 with a 129-bias: y read and written, bias read once.
        assert_eq!(bias::add_cost(37, 129, Dtype::F32).bytes, 4 * (2 * 4773 + 129));
        assert_eq!(bias::column_sum_cost(37, 129, Dtype::F32).bytes, 4 * (4773 + 2 * 129));
        // bf16 activations (2 bytes), the bias and its gradient still fp32.
        let add = bias::add_cost(37, 129, Dtype::Bf16);
        assert_eq!((add.bytes, add.kernel), (2 * 2 * 4773 + 4 * 129, "bias_add_bf16"));
        assert_eq!(bias::column_sum_cost(37, 129, Dtype::Bf16).bytes, 2 * 4773 + 4 * 2 * 129);
    }

    #[test]
    fn elementwise_families_count_activations_at_their_dtype() {
        use crate::cuda::{cross_entropy, dropout, embedding, gelu, residual};
        // GELU over 37 x 129 with a 129-bias: pre read and written, out written; backward
        // reads pre and dout, writes dpre.
        assert_eq!(gelu::forward_cost(4773, 129, Dtype::F32).bytes, 4 * (3 * 4773 + 129));
        assert_eq!(gelu::forward_cost(4773, 129, Dtype::Bf16).bytes, 2 * 3 * 4773 + 4 * 129);
        assert_eq!(gelu::backward_cost(4773, Dtype::F32).bytes, 4 * 3 * 4773);
        assert_eq!(gelu::backward_cost(4773, Dtype::Bf16).bytes, 2 * 3 * 4773);
        // Dropout in place over 4773: read and written.
        assert_eq!(dropout::apply_cost(4773, Dtype::F32).bytes, 4 * 2 * 4773);
        assert_eq!(dropout::apply_cost(4773, Dtype::Bf16).bytes, 2 * 2 * 4773);
        // Residual: add and add_assign three passes, scale two.
        use residual::Kind;
        assert_eq!(residual::cost(Kind::Add, 4773, Dtype::F32).bytes, 4 * 3 * 4773);
        assert_eq!(residual::cost(Kind::AddAssign, 4773, Dtype::Bf16).bytes, 2 * 3 * 4773);
        let scale = residual::cost(Kind::Scale, 4773, Dtype::Bf16);
        assert_eq!((scale.bytes, scale.kernel), (2 * 2 * 4773, "residual_scale_bf16"));
        // Embedding: 37 ids of 129: the ids (4 bytes), 37 fp32 table rows, out written (and
        // read when accumulating); backward reads the ids and dout, reads and writes fp32 rows.
        assert_eq!(embedding::forward_cost(37, 129, false, Dtype::F32).bytes, 4 * 37 + 4 * 2 * 4773);
        assert_eq!(embedding::forward_cost(37, 129, true, Dtype::Bf16).bytes, 4 * 37 + 4 * 4773 + 2 * 2 * 4773);
        assert_eq!(embedding::backward_cost(37, 129, Dtype::F32).bytes, 4 * 37 + 4 * 3 * 4773);
        assert_eq!(embedding::backward_cost(37, 129, Dtype::Bf16).bytes, 4 * 37 + 2 * 4773 + 4 * 2 * 4773);
        // Cross-entropy over 37 x 129 logits: read (and overwritten with the gradient), fp32
        // losses and i32 labels, one each a row.
        assert_eq!(cross_entropy::cost(37, 129, true, Dtype::F32).bytes, 4 * (2 * 4773 + 37) + 4 * 37);
        assert_eq!(cross_entropy::cost(37, 129, true, Dtype::Bf16).bytes, 2 * 2 * 4773 + 4 * 37 + 4 * 37);
        assert_eq!(cross_entropy::cost(37, 129, false, Dtype::Bf16).bytes, 2 * 4773 + 8 * 37);
    }

    #[test]
    fn flash_attention_moves_each_operand_once_and_counts_its_recomputation() {
        // 2 sequences, 3 heads of 5, 7 queries over 11 keys, q rows 40 apart (strides are not
        // traffic): q 2*7*15 = 210, k and v 2*11*15 = 330 each, mask 22, out 210, lse 42;
        // 2*3*7*11 = 462 (query, key) pairs.
        let s = crate::AttentionShape::new(2, 3, 5, 7, 11).with_strides(40, 15);
        let f = attention::forward_cost(&s, Simt, Dtype::F32);
        assert_eq!(f.bytes, 4 * (210 + 2 * 330 + 22 + 210 + 42));
        assert_eq!(f.flops, 462 * (4 * 5 + 5));
        // dk/dv: q, k, v, mask, out, dout, lse read; dk and dv written (assigned).
        let kv = attention::backward_dkdv_cost(&s, Simt, Dtype::F32);
        assert_eq!(kv.bytes, 4 * (210 + 2 * 330 + 22 + 2 * 210 + 42 + 2 * 330));
        assert_eq!(kv.flops, 462 * (8 * 5 + 5) + 2 * 210);
        // dq: the same reads, dq written once.
        let q = attention::backward_dq_cost(&s, Simt, Dtype::F32);
        assert_eq!(q.bytes, 4 * (210 + 2 * 330 + 22 + 2 * 210 + 42 + 210));
        assert_eq!(q.flops, 462 * (6 * 5 + 5) + 2 * 210);
        // The tensor-core variants: same traffic and FLOP count, the softmax (and Dsum) share
        // declared as CUDA-core work.
        let fm = attention::forward_cost(&s, Mma, Dtype::F32);
        assert_eq!((fm.kernel, fm.bytes, fm.flops), ("attention_flash_forward_mma", f.bytes, f.flops));
        assert_eq!(fm.work, Work::TensorKernel { simt_flops: 462 * 5 });
        let kvm = attention::backward_dkdv_cost(&s, Mma, Dtype::F32);
        assert_eq!(
            (kvm.bytes, kvm.flops, kvm.work),
            (kv.bytes, kv.flops, Work::TensorKernel { simt_flops: 462 * 5 + 420 })
        );
        let qm = attention::backward_dq_cost(&s, Mma, Dtype::F32);
        assert_eq!((qm.bytes, qm.flops, qm.work), (q.bytes, q.flops, Work::TensorKernel { simt_flops: 462 * 5 + 420 }));
        // bf16 storage: q, k, v, out, dout, dq, dk and dv at 2 bytes, the mask and lse at 4.
        let fb = attention::forward_cost(&s, Simt, Dtype::Bf16);
        assert_eq!((fb.kernel, fb.flops), ("attention_flash_forward_bf16", f.flops));
        assert_eq!(fb.bytes, 2 * (210 + 2 * 330 + 210) + 4 * (22 + 42));
        let kvb = attention::backward_dkdv_cost(&s, Mma, Dtype::Bf16);
        assert_eq!((kvb.kernel, kvb.flops, kvb.work), ("attention_flash_backward_dkdv_mma_bf16", kvm.flops, kvm.work));
        assert_eq!(kvb.bytes, 2 * (210 + 2 * 330 + 2 * 210 + 2 * 330) + 4 * (22 + 42));
        let qb = attention::backward_dq_cost(&s, Simt, Dtype::Bf16);
        assert_eq!(
            (qb.kernel, qb.bytes),
            ("attention_flash_backward_dq_bf16", 2 * (210 + 2 * 330 + 2 * 210 + 210) + 4 * 64)
        );
        assert_eq!(attention::Variant::pick(GemmPrecision::Bf16, 64), Mma);
        assert_eq!(attention::Variant::pick(GemmPrecision::Bf16, 40), Simt);
        assert_eq!(attention::Variant::pick(GemmPrecision::Fp32, 64), Simt);
        // Causal, 37 x 37 (query tiles of 16, key tiles of 32): query tiles at 0, 16, 32 of 16,
        // 16, 5 rows see key tiles up to 32, 32, 37 keys: 16*32 + 16*32 + 5*37 = 1209 pairs a
        // head; key tiles at 0 (32 keys) and 32 (5 keys) skip the query rows before 0 and 32:
        // 32*37 + 5*5 = 1209 too (both count the same tile pairs here). Six heads.
        let c = crate::AttentionShape::new(2, 3, 5, 37, 37).with_causal(true);
        assert_eq!(attention::forward_cost(&c, Simt, Dtype::F32).flops, 6 * 1209 * (4 * 5 + 5));
        assert_eq!(attention::backward_dkdv_cost(&c, Simt, Dtype::F32).flops, 6 * 1209 * (8 * 5 + 5) + 2 * 2 * 37 * 15);
        let c = crate::AttentionShape::new(1, 1, 5, 70, 70).with_causal(true);
        // Query tiles 0, 16, 32, 48, 64 (6 rows): keys 32, 32, 64, 64, 70 -> 512 + 512 + 1024 +
        // 1024 + 420 = 3492. Key tiles 0, 32, 64 (6 keys): rows from 0, 32, 64 -> 32*70 + 32*38 +
        // 6*6 = 2240 + 1216 + 36 = 3492.
        assert_eq!(attention::forward_cost(&c, Simt, Dtype::F32).flops, 3492 * 25);
        assert_eq!(attention::backward_dkdv_cost(&c, Simt, Dtype::F32).flops, 3492 * 45 + 2 * 70 * 5);
    }

    #[test]
    fn the_recorder_keeps_only_what_comes_while_it_is_on() {
        let r = Recorder::default();
        r.note(memset(5, Dtype::F32));
        assert!(r.take().is_empty(), "off by default");
        r.set(true);
        r.note(memset(5, Dtype::Bf16));
        r.note(sync("s"));
        assert_eq!(r.take(), vec![memset(5, Dtype::Bf16), sync("s")]);
        assert_eq!(memset(5, Dtype::Bf16).bytes, 10);
        assert!(r.take().is_empty(), "take empties the list");
        r.note(memset(1, Dtype::F32));
        r.set(false);
        r.set(true);
        assert!(r.take().is_empty(), "stopping drops the rest");
    }
}
