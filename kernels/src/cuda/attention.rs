//! Attention launchers (see attention.cu for the math): one fused forward kernel that saves a
//! log-sum-exp per query row, and two backward kernels (dk/dv over key tiles, dq over query
//! tiles) that recompute the probabilities. No scratch memory, no atomics. Each comes in two
//! variants: fp32 SIMT (GemmPrecision::Fp32, the oracle-exact path) and bf16 tensor cores for the
//! dot products (GemmPrecision::Bf16 and a head dim that is a multiple of 16).
//!
//! Every kernel has an fp32-storage and a bf16-storage entry (`_bf16`), picked by the dtype of
//! the activation operands (q, k, v, out, dout, dq, dk, dv: one dtype for all); the key mask and
//! the saved log-sum-exps are fp32 either way.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::cost::{self, F32, LaunchCost};
use super::{Cuda, DevMut, DevRef, GemmPrecision, KernelSource, Typed, dev_err, require_f32};
use crate::{AttentionOps, AttentionShape, Dtype, KernelError, Result, check_len};

const FORWARD: Typed = Typed { f32: "attention_flash_forward", bf16: "attention_flash_forward_bf16" };
const BACKWARD_DKDV: Typed = Typed { f32: "attention_flash_backward_dkdv", bf16: "attention_flash_backward_dkdv_bf16" };
const BACKWARD_DQ: Typed = Typed { f32: "attention_flash_backward_dq", bf16: "attention_flash_backward_dq_bf16" };
const FORWARD_MMA: Typed = Typed { f32: "attention_flash_forward_mma", bf16: "attention_flash_forward_mma_bf16" };
const BACKWARD_DKDV_MMA: Typed =
    Typed { f32: "attention_flash_backward_dkdv_mma", bf16: "attention_flash_backward_dkdv_mma_bf16" };
const BACKWARD_DQ_MMA: Typed =
    Typed { f32: "attention_flash_backward_dq_mma", bf16: "attention_flash_backward_dq_mma_bf16" };

pub(crate) const SOURCE: KernelSource = KernelSource {
    file: "attention.cu",
    code: include_str!("attention.cu"),
    kernels: &[
        FORWARD.f32,
        FORWARD.bf16,
        BACKWARD_DKDV.f32,
        BACKWARD_DKDV.bf16,
        BACKWARD_DQ.f32,
        BACKWARD_DQ.bf16,
        FORWARD_MMA.f32,
        FORWARD_MMA.bf16,
        BACKWARD_DKDV_MMA.f32,
        BACKWARD_DKDV_MMA.bf16,
        BACKWARD_DQ_MMA.f32,
        BACKWARD_DQ_MMA.bf16,
    ],
};

/// The entry of `kernel` for activations of `dtype`.
fn entry(kernel: Typed, dtype: Dtype) -> &'static str {
    if dtype == Dtype::Bf16 { kernel.bf16 } else { kernel.f32 }
}

/// Which kernels run an attention: fp32 SIMT dot products, or bf16 tensor-core (mma.sync) ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Variant {
    Simt,
    Mma,
}

impl Variant {
    /// Tensor cores when the backend's GEMMs run in bf16 and the head dim is a multiple of the
    /// MMA's k of 16 (the fp32 precision keeps the oracle-exact SIMT kernels).
    pub(crate) fn pick(precision: GemmPrecision, head_dim: usize) -> Self {
        if precision == GemmPrecision::Bf16 && head_dim > 0 && head_dim.is_multiple_of(16) {
            Self::Mma
        } else {
            Self::Simt
        }
    }

    fn name(self, simt: Typed, mma: Typed) -> Typed {
        match self {
            Self::Simt => simt,
            Self::Mma => mma,
        }
    }

    /// The cost of a launch doing `flops` in all, `softmax_flops` of them outside dot products.
    fn cost(self, kernel: &'static str, bytes: u64, flops: u64, softmax_flops: u64) -> LaunchCost {
        match self {
            Self::Simt => LaunchCost::kernel(kernel, bytes, flops),
            Self::Mma => LaunchCost::tensor_kernel(kernel, bytes, flops, softmax_flops),
        }
    }
}

/// Largest head dimension the kernels take (`FA_DMAX` in attention.cu).
pub(crate) const MAX_HEAD_DIM: usize = 64;
/// Query rows per block (`FA_BQ`) and keys per tile (`FA_BK`).
const QUERY_TILE: usize = 16;
const KEY_TILE: usize = 32;
const THREADS: u32 = 128;

/// Per (b, h, i, j) pair, beyond the `2*D` FLOPs of each dot product: scale and mask, the
/// online-softmax exp and rescale, the dropout test (forward); exp, keep and dS (backward).
const SOFTMAX_FLOPS_PER_PAIR: u64 = 5;

/// `attention_flash_forward`: reads q, k, v and the key mask once, writes out and lse;
/// `q k^T` and `P v` are `2*D` FLOPs a (query, key) pair each.
/// The same counts for either variant; the tensor-core one prices the dot products at the bf16
/// peak. q, k, v and out move at `dtype`'s size (the activations' storage), mask and lse at 4
/// bytes (in every cost fn here).
pub(crate) fn forward_cost(s: &AttentionShape, variant: Variant, dtype: Dtype) -> LaunchCost {
    let (pairs, d) = (query_tile_pairs(s), s.head_dim as u64);
    let act = ideal_q(s) + 2 * ideal_kv(s) + out_len(s);
    let bytes = cost::size(dtype) * act + F32 * (mask_len(s) + lse_len(s));
    let softmax = pairs * SOFTMAX_FLOPS_PER_PAIR;
    variant.cost(entry(variant.name(FORWARD, FORWARD_MMA), dtype), bytes, pairs * 4 * d + softmax, softmax)
}

/// `attention_flash_backward_dkdv`: reads q, k, v, mask, out, dout and lse once, writes dk and
/// dv (assigned); per pair it recomputes `q.k` and `dout.v` and adds into the dv and dk
/// accumulators (`2*D` each), plus `D` a query row for Dsum.
pub(crate) fn backward_dkdv_cost(s: &AttentionShape, variant: Variant, dtype: Dtype) -> LaunchCost {
    let (pairs, d) = (key_tile_pairs(s), s.head_dim as u64);
    let act = ideal_q(s) + 2 * ideal_kv(s) + 2 * out_len(s) + 2 * ideal_kv(s);
    let bytes = cost::size(dtype) * act + F32 * (mask_len(s) + lse_len(s));
    let simt = pairs * SOFTMAX_FLOPS_PER_PAIR + 2 * out_len(s); // softmax and Dsum
    let kernel = entry(variant.name(BACKWARD_DKDV, BACKWARD_DKDV_MMA), dtype);
    variant.cost(kernel, bytes, pairs * 8 * d + simt, simt)
}

/// `attention_flash_backward_dq`: reads as the dk/dv kernel, writes dq (assigned); per pair it
/// recomputes `q.k` and `dout.v` and adds into dq (`2*D` each), plus Dsum.
pub(crate) fn backward_dq_cost(s: &AttentionShape, variant: Variant, dtype: Dtype) -> LaunchCost {
    let (pairs, d) = (query_tile_pairs(s), s.head_dim as u64);
    let act = ideal_q(s) + 2 * ideal_kv(s) + 2 * out_len(s) + ideal_q(s);
    let bytes = cost::size(dtype) * act + F32 * (mask_len(s) + lse_len(s));
    let simt = pairs * SOFTMAX_FLOPS_PER_PAIR + 2 * out_len(s);
    let kernel = entry(variant.name(BACKWARD_DQ, BACKWARD_DQ_MMA), dtype);
    variant.cost(kernel, bytes, pairs * 6 * d + simt, simt)
}

/// (query, key) pairs the forward and dq kernels compute over all heads: all of them, or with a
/// causal mask those of the key tiles up to each query tile's last row (assuming no row sees
/// only padding; such a row makes its block go on over all keys).
fn query_tile_pairs(s: &AttentionShape) -> u64 {
    let per_head: usize = if !s.causal {
        s.tq * s.tk
    } else {
        (0..s.tq)
            .step_by(QUERY_TILE)
            .map(|i0| {
                let rows = QUERY_TILE.min(s.tq - i0);
                let keys = s.tk.min((i0 + QUERY_TILE).min(s.tk).next_multiple_of(KEY_TILE));
                rows * keys
            })
            .sum()
    };
    (s.batch * s.heads * per_head) as u64
}

/// (query, key) pairs the dk/dv kernel computes: with a causal mask each key tile skips the
/// query tiles that end before its first key.
fn key_tile_pairs(s: &AttentionShape) -> u64 {
    let per_head: usize = if !s.causal {
        s.tq * s.tk
    } else {
        (0..s.tk)
            .step_by(KEY_TILE)
            .map(|j0| {
                let keys = KEY_TILE.min(s.tk - j0);
                keys * s.tq.saturating_sub(j0 / QUERY_TILE * QUERY_TILE)
            })
            .sum()
    };
    (s.batch * s.heads * per_head) as u64
}

/// Elements of q's heads (strided columns between them are not read).
fn ideal_q(s: &AttentionShape) -> u64 {
    (s.batch * s.tq * s.width()) as u64
}

fn ideal_kv(s: &AttentionShape) -> u64 {
    (s.batch * s.tk * s.width()) as u64
}

fn out_len(s: &AttentionShape) -> u64 {
    s.out_len() as u64
}

fn mask_len(s: &AttentionShape) -> u64 {
    (s.batch * s.tk) as u64
}

fn lse_len(s: &AttentionShape) -> u64 {
    (s.batch * s.heads * s.tq) as u64
}

/// The launch grid: x over the B*H heads, y over `t`'s tiles of `tile`.
fn grid(s: &AttentionShape, t: usize, tile: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((s.batch * s.heads) as u32, t.div_ceil(tile) as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// What the kernels cannot take: head dims above 64, grids past the device's limits, i32 strides.
fn check_kernel_limits(op: &'static str, s: &AttentionShape) -> Result<()> {
    let fits_i32 = |x: usize| i32::try_from(x).is_ok();
    let fail = |what: String| Err(KernelError::Shape { op, what });
    if s.head_dim > MAX_HEAD_DIM {
        return fail(format!("head_dim {} above the fused kernels' {MAX_HEAD_DIM}", s.head_dim));
    }
    let tiles = s.tq.div_ceil(QUERY_TILE).max(s.tk.div_ceil(KEY_TILE));
    if !fits_i32(s.batch * s.heads) || tiles > 65535 {
        return fail(format!("{s:?}: grid of {} heads x {tiles} tiles too large", s.batch * s.heads));
    }
    if ![s.tq, s.tk, s.q_stride, s.kv_stride, s.heads * s.head_dim].into_iter().all(fits_i32) {
        return fail(format!("{s:?}: a length or stride does not fit in i32"));
    }
    Ok(())
}

/// The kernels' trailing scalar arguments: heads, head dim, lengths, strides, causal, scale,
/// dropout rate and seed, in that order.
struct ShapeArgs {
    heads: i32,
    head_dim: i32,
    tq: i32,
    tk: i32,
    ldq: i32,
    ldkv: i32,
    causal: i32,
    scale: f32,
    dropout: f32,
    seed: u64,
}

impl ShapeArgs {
    fn push<'a>(&'a self, l: &mut cudarc::driver::LaunchArgs<'a>) {
        l.arg(&self.heads).arg(&self.head_dim).arg(&self.tq).arg(&self.tk).arg(&self.ldq).arg(&self.ldkv);
        l.arg(&self.causal).arg(&self.scale).arg(&self.dropout).arg(&self.seed);
    }

    fn new(s: &AttentionShape) -> Self {
        Self {
            heads: s.heads as i32,
            head_dim: s.head_dim as i32,
            tq: s.tq as i32,
            tk: s.tk as i32,
            ldq: s.q_stride as i32,
            ldkv: s.kv_stride as i32,
            causal: s.causal as i32,
            // As the CPU computes it, so both backends scale scores by the same f32.
            scale: 1.0 / (s.head_dim as f32).sqrt(),
            dropout: s.dropout,
            seed: s.seed,
        }
    }
}

impl AttentionOps for Cuda {
    fn attention_saved_len(&self, s: &AttentionShape) -> usize {
        s.batch * s.heads * s.tq
    }

    fn attention_forward(
        &self,
        s: AttentionShape,
        q: DevRef<'_>,
        k: DevRef<'_>,
        v: DevRef<'_>,
        key_mask: DevRef<'_>,
        saved: DevMut<'_>,
        out: DevMut<'_>,
    ) -> Result<()> {
        const OP: &str = "attention_forward";
        s.check(OP, q.len, k.len, v.len, key_mask.len)?;
        check_len(OP, "saved lse", saved.len, self.attention_saved_len(&s))?;
        check_len(OP, "out", out.len, s.out_len())?;
        check_kernel_limits(OP, &s)?;
        require_f32(OP, &[key_mask.dtype, saved.dtype])?;
        let variant = Variant::pick(self.precision(), s.head_dim);
        let (kernel, dtype) = variant.name(FORWARD, FORWARD_MMA).pick(OP, &[q.dtype, k.dtype, v.dtype, out.dtype])?;
        if s.out_len() == 0 {
            return Ok(());
        }
        let a = ShapeArgs::new(&s);
        self.note(forward_cost(&s, variant, dtype));
        let mut l = self.stream().launch_builder(self.func(kernel)?);
        l.arg(&out.ptr).arg(&saved.ptr).arg(&q.ptr).arg(&k.ptr).arg(&v.ptr).arg(&key_mask.ptr);
        a.push(&mut l);
        // SAFETY: every view's length was checked against the shape and its strides above, and
        // the entry's element types are the views' dtypes (activations `dtype`, mask and lse
        // fp32); the kernel reads and writes only the heads' columns of the tokens inside them.
        unsafe { l.launch(grid(&s, s.tq, QUERY_TILE)) }.map(drop).map_err(dev_err)
    }

    fn attention_backward(
        &self,
        s: AttentionShape,
        dout: DevRef<'_>,
        q: DevRef<'_>,
        k: DevRef<'_>,
        v: DevRef<'_>,
        key_mask: DevRef<'_>,
        out: DevRef<'_>,
        saved: DevRef<'_>,
        dq: DevMut<'_>,
        dk: DevMut<'_>,
        dv: DevMut<'_>,
    ) -> Result<()> {
        const OP: &str = "attention_backward";
        s.check(OP, q.len, k.len, v.len, key_mask.len)?;
        check_len(OP, "saved lse", saved.len, self.attention_saved_len(&s))?;
        check_len(OP, "dout", dout.len, s.out_len())?;
        check_len(OP, "out", out.len, s.out_len())?;
        s.check_q(OP, "dq", dq.len)?;
        s.check_kv(OP, "dk", dk.len)?;
        s.check_kv(OP, "dv", dv.len)?;
        check_kernel_limits(OP, &s)?;
        require_f32(OP, &[key_mask.dtype, saved.dtype])?;
        let variant = Variant::pick(self.precision(), s.head_dim);
        let acts = [dout.dtype, q.dtype, k.dtype, v.dtype, out.dtype, dq.dtype, dk.dtype, dv.dtype];
        let (_, dtype) = variant.name(BACKWARD_DQ, BACKWARD_DQ_MMA).pick(OP, &acts)?;
        if s.out_len() == 0 {
            return Ok(());
        }
        let a = ShapeArgs::new(&s);
        // With no keys there is nothing to add to dk and dv (and no key tile to launch), but dq
        // is still assigned (zeros).
        if s.tk > 0 {
            self.note(backward_dkdv_cost(&s, variant, dtype));
            let kernel = entry(variant.name(BACKWARD_DKDV, BACKWARD_DKDV_MMA), dtype);
            let mut l = self.stream().launch_builder(self.func(kernel)?);
            l.arg(&dk.ptr).arg(&dv.ptr).arg(&q.ptr).arg(&k.ptr).arg(&v.ptr).arg(&key_mask.ptr);
            l.arg(&out.ptr).arg(&dout.ptr).arg(&saved.ptr);
            a.push(&mut l);
            // SAFETY: lengths and dtypes checked above; dk and dv are exclusive views, each
            // element written by one thread.
            unsafe { l.launch(grid(&s, s.tk, KEY_TILE)) }.map(drop).map_err(dev_err)?;
        }
        self.note(backward_dq_cost(&s, variant, dtype));
        let kernel = entry(variant.name(BACKWARD_DQ, BACKWARD_DQ_MMA), dtype);
        let mut l = self.stream().launch_builder(self.func(kernel)?);
        l.arg(&dq.ptr).arg(&q.ptr).arg(&k.ptr).arg(&v.ptr).arg(&key_mask.ptr);
        l.arg(&out.ptr).arg(&dout.ptr).arg(&saved.ptr);
        a.push(&mut l);
        // SAFETY: as above; dq is an exclusive view.
        unsafe { l.launch(grid(&s, s.tq, QUERY_TILE)) }.map(drop).map_err(dev_err)
    }
}
