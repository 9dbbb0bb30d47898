//! Attention launchers (see attention.cu for the math): head-major copies, cuBLAS batched GEMMs
//! over B*H heads, and the masked softmax kernels. Scratch comes from the stream-ordered pool.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::cost::{F32, LaunchCost};
use super::{Cuda, DevMut, DevRef, KernelSource, check, dev_err, grid_for};
use crate::{AttentionOps, AttentionShape, GemmShape, Operand, Result};

const SPLIT: &str = "attention_split_heads";
const MERGE: &str = "attention_merge_heads";
const SOFTMAX_FWD: &str = "attention_softmax_forward";
const SOFTMAX_BWD: &str = "attention_softmax_backward";

pub(crate) const SOURCE: KernelSource = KernelSource {
    file: "attention.cu",
    code: include_str!("attention.cu"),
    kernels: &[SPLIT, MERGE, SOFTMAX_FWD, SOFTMAX_BWD],
};

const WARPS: u32 = 8;

/// `attention_split_heads` / `attention_merge_heads` of `n` floats: a permuting copy (one read,
/// one write), plus a read of the destination when merge accumulates; no arithmetic.
fn permute_cost(kernel: &'static str, n: usize, accumulate: bool) -> LaunchCost {
    let passes = if accumulate { 3 } else { 2 };
    LaunchCost::kernel(kernel, F32 * passes * n as u64, if accumulate { n as u64 } else { 0 })
}

/// `attention_softmax_forward` over `n = B*H*Tq*Tk` scores with a `B*Tk` key mask: reads and
/// writes the scores in place, writes the dropped-out copy when dropout is on; about 5 FLOPs a
/// score (mask, max, exp, sum, scale).
pub(crate) fn softmax_forward_cost(n: usize, mask: usize, dropout: bool) -> LaunchCost {
    let (n, mask) = (n as u64, mask as u64);
    let passes = if dropout { 3 } else { 2 };
    LaunchCost::kernel(SOFTMAX_FWD, F32 * (passes * n + mask), 5 * n)
}

/// `attention_softmax_backward` over `n` scores: reads dP and P, writes dS over dP; about 4
/// FLOPs a score (the dropout mask is recomputed from its hash, no memory).
pub(crate) fn softmax_backward_cost(n: usize) -> LaunchCost {
    LaunchCost::kernel(SOFTMAX_BWD, F32 * 3 * n as u64, 4 * n as u64)
}

fn ptr(buf: &CudaSlice<f32>, cuda: &Cuda) -> u64 {
    cuda.whole(buf).ptr
}

impl Cuda {
    fn split_heads(&self, dst: u64, src: u64, s: &AttentionShape, t: usize) -> Result<()> {
        let (b, t, h, d) = (s.batch as i32, t as i32, s.heads as i32, s.head_dim as i32);
        self.note(permute_cost(SPLIT, s.batch * t as usize * s.heads * s.head_dim, false));
        let mut l = self.stream().launch_builder(self.func(SPLIT)?);
        l.arg(&dst).arg(&src).arg(&b).arg(&t).arg(&h).arg(&d);
        // SAFETY: both buffers hold B*T*H*D f32s (checked by the callers' shape checks).
        unsafe { l.launch(grid_for(s.batch * t as usize * s.heads * s.head_dim, 256)) }.map(drop).map_err(dev_err)
    }

    fn merge_heads(&self, dst: u64, src: u64, s: &AttentionShape, t: usize, accumulate: bool) -> Result<()> {
        let (b, t, h, d, acc) = (s.batch as i32, t as i32, s.heads as i32, s.head_dim as i32, accumulate as i32);
        self.note(permute_cost(MERGE, s.batch * t as usize * s.heads * s.head_dim, accumulate));
        let mut l = self.stream().launch_builder(self.func(MERGE)?);
        l.arg(&dst).arg(&src).arg(&b).arg(&t).arg(&h).arg(&d).arg(&acc);
        // SAFETY: both buffers hold B*T*H*D f32s; `dst` is an exclusive view.
        unsafe { l.launch(grid_for(s.batch * t as usize * s.heads * s.head_dim, 256)) }.map(drop).map_err(dev_err)
    }

    fn rows_cfg(rows: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: ((rows as u32).div_ceil(WARPS).max(1), 1, 1),
            block_dim: (32 * WARPS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Head-major copies of q, k, v.
    fn heads(&self, s: &AttentionShape, q: u64, k: u64, v: u64) -> Result<[CudaSlice<f32>; 3]> {
        let (nq, nk) = (s.batch * s.heads * s.tq * s.head_dim, s.batch * s.heads * s.tk * s.head_dim);
        let (qh, kh, vh) = (self.scratch(nq)?, self.scratch(nk)?, self.scratch(nk)?);
        self.split_heads(ptr(&qh, self), q, s, s.tq)?;
        self.split_heads(ptr(&kh, self), k, s, s.tk)?;
        self.split_heads(ptr(&vh, self), v, s, s.tk)?;
        Ok([qh, kh, vh])
    }
}

impl AttentionOps for Cuda {
    fn attention_forward(
        &self,
        s: AttentionShape,
        q: DevRef<'_>,
        k: DevRef<'_>,
        v: DevRef<'_>,
        key_mask: DevRef<'_>,
        probs: DevMut<'_>,
        out: DevMut<'_>,
    ) -> Result<()> {
        s.check("attention_forward", q.len, k.len, v.len, key_mask.len, probs.len)?;
        check("attention_forward", out.len == q.len, || format!("out {} != q {}", out.len, q.len))?;
        let (bh, tq, tk, d) = (s.batch * s.heads, s.tq, s.tk, s.head_dim);
        let scale = 1.0 / (d as f32).sqrt();
        let [qh, kh, vh] = self.heads(&s, q.ptr, k.ptr, v.ptr)?;
        let scores = GemmShape { m: tq, n: tk, k: d, batch: bh, ldc: tk, batch_stride_c: tq * tk };
        self.gemm_raw(
            scores,
            scale,
            ptr(&qh, self),
            Operand { trans: false, ld: d, batch_stride: tq * d },
            ptr(&kh, self),
            Operand { trans: true, ld: d, batch_stride: tk * d },
            0.0,
            probs.ptr,
        )?;
        let pd = if s.dropout > 0.0 { Some(self.scratch(bh * tq * tk)?) } else { None };
        let pd_ptr = pd.as_ref().map(|b| ptr(b, self)).unwrap_or(0);
        let (bh_i, h_i, tq_i, tk_i, causal) = (bh as i32, s.heads as i32, tq as i32, tk as i32, s.causal as i32);
        self.note(softmax_forward_cost(bh * tq * tk, s.batch * tk, pd.is_some()));
        let mut l = self.stream().launch_builder(self.func(SOFTMAX_FWD)?);
        l.arg(&probs.ptr)
            .arg(&pd_ptr)
            .arg(&key_mask.ptr)
            .arg(&bh_i)
            .arg(&h_i)
            .arg(&tq_i)
            .arg(&tk_i)
            .arg(&causal)
            .arg(&s.dropout)
            .arg(&s.seed);
        // SAFETY: probs and pd hold B*H*Tq*Tk f32s, key_mask B*Tk; shapes checked above.
        unsafe { l.launch(Self::rows_cfg(bh * tq)) }.map(drop).map_err(dev_err)?;
        let ctx = self.scratch(bh * tq * d)?;
        let a = if pd_ptr != 0 { pd_ptr } else { probs.ptr };
        let pv = GemmShape { m: tq, n: d, k: tk, batch: bh, ldc: d, batch_stride_c: tq * d };
        self.gemm_raw(
            pv,
            1.0,
            a,
            Operand { trans: false, ld: tk, batch_stride: tq * tk },
            ptr(&vh, self),
            Operand { trans: false, ld: d, batch_stride: tk * d },
            0.0,
            ptr(&ctx, self),
        )?;
        self.merge_heads(out.ptr, ptr(&ctx, self), &s, tq, false)
    }

    fn attention_backward(
        &self,
        s: AttentionShape,
        dout: DevRef<'_>,
        q: DevRef<'_>,
        k: DevRef<'_>,
        v: DevRef<'_>,
        probs: DevRef<'_>,
        dq: DevMut<'_>,
        dk: DevMut<'_>,
        dv: DevMut<'_>,
    ) -> Result<()> {
        s.check("attention_backward", q.len, k.len, v.len, s.batch * s.tk, probs.len)?;
        check(
            "attention_backward",
            dout.len == q.len && dq.len == q.len && dk.len == k.len && dv.len == v.len,
            || format!("dout {} dq {} dk {} dv {}", dout.len, dq.len, dk.len, dv.len),
        )?;
        let (bh, tq, tk, d) = (s.batch * s.heads, s.tq, s.tk, s.head_dim);
        let scale = 1.0 / (d as f32).sqrt();
        let [qh, kh, vh] = self.heads(&s, q.ptr, k.ptr, v.ptr)?;
        let gh = self.scratch(bh * tq * d)?;
        self.split_heads(ptr(&gh, self), dout.ptr, &s, tq)?;
        // Pd: the dropped-out probabilities, recomputed from P with the forward's mask.
        let mut pd = None;
        if s.dropout > 0.0 {
            let mut buf = self.scratch(bh * tq * tk)?;
            let mut view = self.whole_mut(&mut buf);
            self.copy_raw(probs.ptr, &mut view)?;
            crate::DropoutOps::dropout_forward(self, view, s.dropout, s.seed)?;
            pd = Some(buf);
        }
        let pd_ptr = pd.as_ref().map(|b| ptr(b, self)).unwrap_or(probs.ptr);
        let hq = |m: usize| Operand { trans: false, ld: d, batch_stride: m * d };
        let p_op = |trans: bool| Operand { trans, ld: tk, batch_stride: tq * tk };
        let dp = self.scratch(bh * tq * tk)?;
        self.gemm_raw(
            GemmShape { m: tq, n: tk, k: d, batch: bh, ldc: tk, batch_stride_c: tq * tk },
            1.0,
            ptr(&gh, self),
            hq(tq),
            ptr(&vh, self),
            Operand { trans: true, ..hq(tk) },
            0.0,
            ptr(&dp, self),
        )?;
        let dvh = self.scratch(bh * tk * d)?;
        self.gemm_raw(
            GemmShape { m: tk, n: d, k: tq, batch: bh, ldc: d, batch_stride_c: tk * d },
            1.0,
            pd_ptr,
            p_op(true),
            ptr(&gh, self),
            hq(tq),
            0.0,
            ptr(&dvh, self),
        )?;
        let rows = (bh * tq) as i64;
        let tk_i = tk as i32;
        self.note(softmax_backward_cost(bh * tq * tk));
        let mut l = self.stream().launch_builder(self.func(SOFTMAX_BWD)?);
        let dp_ptr = ptr(&dp, self);
        l.arg(&dp_ptr).arg(&probs.ptr).arg(&rows).arg(&tk_i).arg(&s.dropout).arg(&s.seed);
        // SAFETY: dp and probs hold B*H*Tq*Tk f32s.
        unsafe { l.launch(Self::rows_cfg(bh * tq)) }.map(drop).map_err(dev_err)?;
        let dqh = self.scratch(bh * tq * d)?;
        self.gemm_raw(
            GemmShape { m: tq, n: d, k: tk, batch: bh, ldc: d, batch_stride_c: tq * d },
            scale,
            dp_ptr,
            p_op(false),
            ptr(&kh, self),
            hq(tk),
            0.0,
            ptr(&dqh, self),
        )?;
        let dkh = self.scratch(bh * tk * d)?;
        self.gemm_raw(
            GemmShape { m: tk, n: d, k: tq, batch: bh, ldc: d, batch_stride_c: tk * d },
            scale,
            dp_ptr,
            p_op(true),
            ptr(&qh, self),
            hq(tq),
            0.0,
            ptr(&dkh, self),
        )?;
        self.merge_heads(dq.ptr, ptr(&dqh, self), &s, tq, false)?;
        self.merge_heads(dk.ptr, ptr(&dkh, self), &s, tk, true)?;
        self.merge_heads(dv.ptr, ptr(&dvh, self), &s, tk, true)
    }
}
