//! Op families for bert2bert, behind one `Backend` trait.
//!
//! Every family has a forward and a backward. The CPU fp32 implementation in [`cpu`] is the
//! numerical oracle that every other backend is tested against.
//!
//! Conventions shared by all backends:
//! - Matrices are row-major and contiguous unless a stride says otherwise.
//! - Parameter gradients ACCUMULATE (`+=`): a step zeroes the flat gradient buffer once, and
//!   tied or shared weights then sum their uses for free.
//! - Activation gradients are ASSIGNED (`=`) unless an op says otherwise.
//! - Token ids and labels are `i32`; a label equal to [`IGNORE_INDEX`] is skipped by the loss.

pub mod collective;
pub mod cpu;
pub mod cuda;
pub mod reference;
pub mod rng;

pub use cpu::Cpu;

/// Label value that the loss ignores (PyTorch's `ignore_index` default).
pub const IGNORE_INDEX: i32 = -100;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{op}: {what}")]
    Shape { op: &'static str, what: String },
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    #[error("device error: {0}")]
    Device(String),
}

pub type Result<T> = std::result::Result<T, KernelError>;

/// How a buffer stores its elements. Every value crosses the trait as f32 (uploads, downloads,
/// fills); a backend may keep activations in a narrower type (see [`Memory::activations`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    F32,
    /// bfloat16: fp32's exponent with 8 significant bits, rounded to nearest even.
    Bf16,
}

/// The bf16 bits of `x`, rounded to nearest even (NaN stays NaN): the rounding every backend
/// and kernel uses (`b2b_bf16_bits` in kernels/src/cuda/common.cuh).
pub fn bf16_bits(x: f32) -> u16 {
    let u = x.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        return ((u >> 16) | 0x40) as u16;
    }
    (u.wrapping_add(0x7fff + ((u >> 16) & 1)) >> 16) as u16
}

/// The f32 value of bf16 bits (exact).
pub fn bf16_value(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// `x` rounded to the nearest bf16 value.
pub fn round_bf16(x: f32) -> f32 {
    bf16_value(bf16_bits(x))
}

impl Dtype {
    /// Bytes an element takes.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 => 2,
        }
    }
}

/// Memory management: owned buffers (f32 unless made by `activations`), views into them, and
/// id buffers.
pub trait Memory {
    /// An owned buffer of f32.
    type Buf: Send + Sync;
    /// A shared view of (part of) a buffer.
    type Ref<'a>: Copy
    where
        Self: 'a;
    /// An exclusive view of (part of) a buffer.
    type Mut<'a>
    where
        Self: 'a;
    /// An owned buffer of i32 (token ids, labels).
    type Ids: Send + Sync;

    fn name(&self) -> String;
    /// `n` zeros, stored as f32: parameters, their gradients and optimizer state, statistics
    /// (LayerNorm mean and 1/std, attention log-sum-exps), masks and losses.
    fn zeros(&self, n: usize) -> Result<Self::Buf>;
    /// `n` zeros at [`Memory::activation_dtype`]: activations, activation gradients and the
    /// GEMM copy of the weights. The CPU oracle stores them as f32; a GPU backend in mixed
    /// precision as bf16, which every op it has reads and writes with fp32 arithmetic.
    fn activations(&self, n: usize) -> Result<Self::Buf> {
        self.zeros(n)
    }
    /// The storage type of `activations`.
    fn activation_dtype(&self) -> Dtype {
        Dtype::F32
    }
    /// A new f32 buffer holding `host`.
    fn upload(&self, host: &[f32]) -> Result<Self::Buf>;
    /// The view's values, widened to f32 when stored narrower.
    fn download(&self, view: Self::Ref<'_>) -> Result<Vec<f32>>;
    fn upload_ids(&self, host: &[i32]) -> Result<Self::Ids>;
    fn len(&self, buf: &Self::Buf) -> usize;
    fn view<'a>(&self, buf: &'a Self::Buf, range: std::ops::Range<usize>) -> Self::Ref<'a>;
    fn view_mut<'a>(&self, buf: &'a mut Self::Buf, range: std::ops::Range<usize>) -> Self::Mut<'a>;
    /// Two disjoint exclusive views of one buffer (e.g. LayerNorm's dgamma and dbeta).
    fn view_mut2<'a>(
        &self,
        buf: &'a mut Self::Buf,
        a: std::ops::Range<usize>,
        b: std::ops::Range<usize>,
    ) -> (Self::Mut<'a>, Self::Mut<'a>);
    /// Reborrow an exclusive view as a shared one.
    fn as_ref<'a>(&self, m: &'a Self::Mut<'_>) -> Self::Ref<'a>;
    /// Reborrow an exclusive view for one call, keeping it for the next.
    fn reborrow<'a>(&self, m: &'a mut Self::Mut<'_>) -> Self::Mut<'a>;
    /// Every element of `dst` set to `value` (rounded to the buffer's dtype).
    fn fill(&self, dst: Self::Mut<'_>, value: f32) -> Result<()>;
    /// `dst = src`, converting (rounding to nearest even) when their dtypes differ.
    fn copy(&self, src: Self::Ref<'_>, dst: Self::Mut<'_>) -> Result<()>;
    /// Wait for all queued work (a no-op on the CPU).
    fn synchronize(&self) -> Result<()>;
    /// The most f32 values a model should hold at once for an intermediate as wide as the
    /// vocabulary (the LM head's logits): the head then computes its label rows in chunks that
    /// fit. `None` (the default, and the CPU oracle's): no bound, all rows in one chunk.
    fn logits_chunk_floats(&self) -> Option<usize> {
        None
    }
}

/// One matrix operand of a GEMM: `trans` reads the stored row-major matrix transposed, `ld` is
/// its row stride in elements and `batch_stride` the distance between consecutive batch items.
#[derive(Clone, Copy, Debug)]
pub struct Operand {
    pub trans: bool,
    pub ld: usize,
    pub batch_stride: usize,
}

impl Operand {
    /// A contiguous row-major `rows x cols` matrix, read as stored.
    pub fn n(cols: usize) -> Self {
        Self { trans: false, ld: cols, batch_stride: 0 }
    }
    /// A contiguous row-major `rows x cols` matrix, read transposed.
    pub fn t(cols: usize) -> Self {
        Self { trans: true, ld: cols, batch_stride: 0 }
    }
    pub fn batched(self, batch_stride: usize) -> Self {
        Self { batch_stride, ..self }
    }
}

/// Shape of `C[b] = alpha * op(A[b]) @ op(B[b]) + beta * C[b]`, with op(A) `m x k`, op(B) `k x n`,
/// C `m x n` (row stride `ldc`, batch stride `batch_stride_c`).
#[derive(Clone, Copy, Debug)]
pub struct GemmShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub batch: usize,
    pub ldc: usize,
    pub batch_stride_c: usize,
}

impl GemmShape {
    pub fn plain(m: usize, n: usize, k: usize) -> Self {
        Self { m, n, k, batch: 1, ldc: n, batch_stride_c: m * n }
    }
}

/// GEMM family: strided-batched matrix products, plus the bias broadcast and its gradient.
pub trait GemmOps: Memory {
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        shape: GemmShape,
        alpha: f32,
        a: Self::Ref<'_>,
        op_a: Operand,
        b: Self::Ref<'_>,
        op_b: Operand,
        beta: f32,
        c: Self::Mut<'_>,
    ) -> Result<()>;
    /// `y[r, :] += bias` for every row of the `rows x bias.len()` matrix y.
    fn add_bias(&self, y: Self::Mut<'_>, bias: Self::Ref<'_>, cols: usize) -> Result<()>;
    /// `dbias += sum over rows of dy` (parameter gradient: accumulates).
    fn bias_grad(&self, dy: Self::Ref<'_>, dbias: Self::Mut<'_>, cols: usize) -> Result<()>;

    /// `C = op(A) op(B) + bias` (C assigned): a linear layer's output, with the fp32 `bias`
    /// (length n) added to every row before C's one rounding. One batch entry, `ldc == n`. A GPU
    /// backend fuses the bias into the GEMM's epilogue; this default is the GEMM, then `add_bias`.
    #[allow(clippy::too_many_arguments)]
    fn gemm_bias(
        &self,
        s: GemmShape,
        a: Self::Ref<'_>,
        op_a: Operand,
        b: Self::Ref<'_>,
        op_b: Operand,
        bias: Self::Ref<'_>,
        mut c: Self::Mut<'_>,
    ) -> Result<()> {
        check_epilogue_shape("gemm_bias", s, op_a)?;
        self.gemm(s, 1.0, a, op_a, b, op_b, 0.0, self.reborrow(&mut c))?;
        self.add_bias(c, bias, s.n)
    }

    /// `C = op(A) op(B)` and `dbias[i] = sum_k op(A)[i, k]`, both ASSIGNED (not accumulated): a
    /// linear layer's weight gradient `dW = dy^T x` and bias gradient `colsum(dy)` in one pass,
    /// for the first write of those gradients (later writes use `gemm` and `bias_grad`, which
    /// accumulate). A is read transposed and holds exactly `k` rows of `m` (`dy`); C and dbias
    /// are fp32. One batch entry, `ldc == n`. A GPU backend computes dbias in the GEMM's
    /// epilogue; this default is the GEMM, then a zero fill and `bias_grad`.
    #[allow(clippy::too_many_arguments)]
    fn gemm_bias_grad(
        &self,
        s: GemmShape,
        a: Self::Ref<'_>,
        op_a: Operand,
        b: Self::Ref<'_>,
        op_b: Operand,
        c: Self::Mut<'_>,
        mut dbias: Self::Mut<'_>,
    ) -> Result<()> {
        check_epilogue_shape("gemm_bias_grad", s, op_a)?;
        if !op_a.trans || op_a.ld != s.m {
            return Err(KernelError::Shape {
                op: "gemm_bias_grad",
                what: format!("A must be read transposed, ld = m: {op_a:?} {s:?}"),
            });
        }
        self.gemm(s, 1.0, a, op_a, b, op_b, 0.0, c)?;
        self.fill(self.reborrow(&mut dbias), 0.0)?;
        self.bias_grad(a, dbias, s.m)
    }
}

/// The shapes the fused-epilogue GEMMs take: one batch entry, C contiguous.
pub fn check_epilogue_shape(op: &'static str, s: GemmShape, op_a: Operand) -> Result<()> {
    if s.batch != 1 || s.ldc != s.n || op_a.batch_stride != 0 {
        return Err(KernelError::Shape { op, what: format!("one batch entry with ldc = n expected: {s:?}") });
    }
    Ok(())
}

/// Embedding family: row lookup and its scatter-add gradient.
pub trait EmbeddingOps: Memory {
    /// `out[i, :] (= or +=) table[ids[i], :]`, `accumulate` choosing `+=`.
    fn embedding_forward(
        &self,
        ids: &Self::Ids,
        table: Self::Ref<'_>,
        dim: usize,
        out: Self::Mut<'_>,
        accumulate: bool,
    ) -> Result<()>;
    /// `dtable[ids[i], :] += dout[i, :]` (parameter gradient: accumulates).
    fn embedding_backward(&self, ids: &Self::Ids, dout: Self::Ref<'_>, dim: usize, dtable: Self::Mut<'_>)
    -> Result<()>;
}

/// LayerNorm family over the last dimension, with saved per-row mean and 1/std.
pub trait LayerNormOps: Memory {
    #[allow(clippy::too_many_arguments)]
    fn layernorm_forward(
        &self,
        x: Self::Ref<'_>,
        gamma: Self::Ref<'_>,
        beta: Self::Ref<'_>,
        eps: f32,
        out: Self::Mut<'_>,
        mean: Self::Mut<'_>,
        rstd: Self::Mut<'_>,
    ) -> Result<()>;
    /// `dx (= or +=) ...`, `dgamma += ...`, `dbeta += ...`.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward(
        &self,
        dout: Self::Ref<'_>,
        x: Self::Ref<'_>,
        gamma: Self::Ref<'_>,
        mean: Self::Ref<'_>,
        rstd: Self::Ref<'_>,
        dx: Self::Mut<'_>,
        accumulate_dx: bool,
        dgamma: Self::Mut<'_>,
        dbeta: Self::Mut<'_>,
    ) -> Result<()>;
}

/// Residual + dropout + LayerNorm, fused: the tail of every encoder and decoder block,
/// `out = LN(dropout(x) + skip)`, with the mask of [`DropoutOps`] (element `i` of stream `seed`
/// kept iff `rng::uniform(seed, i) >= p`, scaled by `1/(1-p)`) and the statistics of
/// [`LayerNormOps`]. Equal to that sequence of ops on every backend (bitwise on the CPU).
pub trait ResidualNormOps: Memory {
    /// `sum = dropout(sum; p, seed) + skip` in place: `sum` holds the block output `x` on entry
    /// and the LayerNorm input (saved for backward) on return; then `out = LN(sum)` with the
    /// per-row `mean` and `rstd` saved.
    #[allow(clippy::too_many_arguments)]
    fn residual_norm_forward(
        &self,
        sum: Self::Mut<'_>,
        skip: Self::Ref<'_>,
        gamma: Self::Ref<'_>,
        beta: Self::Ref<'_>,
        eps: f32,
        p: f32,
        seed: u64,
        out: Self::Mut<'_>,
        mean: Self::Mut<'_>,
        rstd: Self::Mut<'_>,
    ) -> Result<()>;
    /// With `d_sum = LN'(d_out)` (from the saved `sum`, `mean`, `rstd`): `d_skip (= or +=) d_sum`
    /// (`accumulate_skip` choosing `+=`), `d_x = dropout(d_sum; p, seed)` (assigned: the
    /// gradient of the block output), `dgamma += ...`, `dbeta += ...`.
    #[allow(clippy::too_many_arguments)]
    fn residual_norm_backward(
        &self,
        d_out: Self::Ref<'_>,
        sum: Self::Ref<'_>,
        gamma: Self::Ref<'_>,
        mean: Self::Ref<'_>,
        rstd: Self::Ref<'_>,
        p: f32,
        seed: u64,
        d_skip: Self::Mut<'_>,
        accumulate_skip: bool,
        d_x: Self::Mut<'_>,
        dgamma: Self::Mut<'_>,
        dbeta: Self::Mut<'_>,
    ) -> Result<()>;
}

/// Bias + exact (erf) GELU, BERT's "gelu".
pub trait GeluOps: Memory {
    /// `pre += bias` (kept for backward), then `out = gelu(pre)`.
    fn bias_gelu_forward(&self, pre: Self::Mut<'_>, bias: Self::Ref<'_>, out: Self::Mut<'_>) -> Result<()>;
    /// `dpre = dout * gelu'(pre)`, `dbias += sum over rows of dpre`.
    fn bias_gelu_backward(
        &self,
        pre: Self::Ref<'_>,
        dout: Self::Ref<'_>,
        dpre: Self::Mut<'_>,
        dbias: Self::Mut<'_>,
    ) -> Result<()>;
    /// `out = gelu(pre)` (assigned); pre is only read (its bias was added by `gemm_bias`).
    fn gelu_forward(&self, pre: Self::Ref<'_>, out: Self::Mut<'_>) -> Result<()>;
    /// `dpre = dout * gelu'(pre)` (assigned); the bias gradient is the caller's (the next
    /// GEMM's epilogue, `gemm_bias_grad`).
    fn gelu_backward(&self, pre: Self::Ref<'_>, dout: Self::Ref<'_>, dpre: Self::Mut<'_>) -> Result<()>;
}

/// Shape and options of multi-head scaled-dot-product attention.
///
/// q is `[batch, tq, heads*head_dim]`, k and v are `[batch, tk, heads*head_dim]` (heads
/// interleaved, as a linear layer writes them: head h at columns `h*head_dim..`). Consecutive
/// tokens of q (and dq) sit `q_stride` elements apart, of k and v (and dk, dv) `kv_stride`
/// apart, so q, k and v can be column blocks of one fused `[batch, t, 3*heads*head_dim]`
/// projection; `out` and `dout` are always contiguous `[batch, tq, heads*head_dim]`.
/// `key_mask` is `[batch, tk]` with 1.0 for real keys and 0.0 for padding; `causal` also hides
/// keys after the query position.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub batch: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub tq: usize,
    pub tk: usize,
    pub causal: bool,
    /// Dropout on the attention probabilities (0 disables it).
    pub dropout: f32,
    /// Seed of the counter-based dropout stream for this call.
    pub seed: u64,
    /// Elements between consecutive tokens of q and dq (at least `heads*head_dim`).
    pub q_stride: usize,
    /// Elements between consecutive tokens of k, v, dk and dv (at least `heads*head_dim`).
    pub kv_stride: usize,
}

impl AttentionShape {
    /// Non-causal attention without dropout over contiguous q, k, v.
    pub fn new(batch: usize, heads: usize, head_dim: usize, tq: usize, tk: usize) -> Self {
        let c = heads * head_dim;
        Self { batch, heads, head_dim, tq, tk, causal: false, dropout: 0.0, seed: 0, q_stride: c, kv_stride: c }
    }

    pub fn with_causal(self, causal: bool) -> Self {
        Self { causal, ..self }
    }

    pub fn with_dropout(self, dropout: f32, seed: u64) -> Self {
        Self { dropout, seed, ..self }
    }

    /// Row strides of q (and dq) and of k, v (and dk, dv).
    pub fn with_strides(self, q_stride: usize, kv_stride: usize) -> Self {
        Self { q_stride, kv_stride, ..self }
    }

    /// Width of one token's heads, `heads * head_dim`.
    pub fn width(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Elements of `[batch, heads, tq, tk]` probabilities.
    pub fn probs_len(&self) -> usize {
        self.batch * self.heads * self.tq * self.tk
    }

    /// Elements of `[batch, tq, heads*head_dim]` (out, dout).
    pub fn out_len(&self) -> usize {
        self.batch * self.tq * self.width()
    }

    /// Smallest length of a q (or dq) view: up to the last column of its last token.
    pub fn q_len(&self) -> usize {
        strided_len(self.batch * self.tq, self.q_stride, self.width())
    }

    /// Smallest length of a k, v, dk or dv view.
    pub fn kv_len(&self) -> usize {
        strided_len(self.batch * self.tk, self.kv_stride, self.width())
    }

    /// Check the shape and the input lengths (every backend's attention ops call this). A
    /// strided view may run on up to the end of its last token's row (`stride - width` more).
    pub fn check(&self, op: &'static str, q: usize, k: usize, v: usize, mask: usize) -> Result<()> {
        let c = self.width();
        if self.q_stride < c || self.kv_stride < c {
            return Err(KernelError::Shape { op, what: format!("{self:?}: a row stride is below heads*head_dim {c}") });
        }
        self.check_q(op, "q", q)?;
        self.check_kv(op, "k", k)?;
        self.check_kv(op, "v", v)?;
        check_len(op, "key_mask", mask, self.batch * self.tk)?;
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(KernelError::Shape { op, what: format!("dropout {} outside [0, 1)", self.dropout) });
        }
        Ok(())
    }

    /// A view laid out like q (q itself, or dq).
    pub fn check_q(&self, op: &'static str, what: &str, len: usize) -> Result<()> {
        check_strided(op, what, len, self.q_len(), self.q_stride - self.width().min(self.q_stride))
    }

    /// A view laid out like k and v (k, v, dk, dv).
    pub fn check_kv(&self, op: &'static str, what: &str, len: usize) -> Result<()> {
        check_strided(op, what, len, self.kv_len(), self.kv_stride - self.width().min(self.kv_stride))
    }
}

fn strided_len(rows: usize, stride: usize, width: usize) -> usize {
    if rows == 0 { 0 } else { (rows - 1) * stride + width }
}

/// `len` must be `want`, or up to `slack` more (the rest of a strided view's last row).
fn check_strided(op: &'static str, what: &str, len: usize, want: usize, slack: usize) -> Result<()> {
    if len < want || len > want + slack {
        let range = if slack == 0 { format!("{want}") } else { format!("{want}..={}", want + slack) };
        return Err(KernelError::Shape { op, what: format!("{what} has {len} elements, expected {range}") });
    }
    Ok(())
}

/// `len` must be exactly `want`.
pub fn check_len(op: &'static str, what: &str, len: usize, want: usize) -> Result<()> {
    check_strided(op, what, len, want, 0)
}

pub trait AttentionOps: Memory {
    /// Elements of the state that `attention_forward` saves for `attention_backward`; backend
    /// defined (the CPU saves the probabilities `[batch, heads, tq, tk]`, CUDA only a
    /// log-sum-exp per query row, `[batch, heads, tq]`).
    fn attention_saved_len(&self, s: &AttentionShape) -> usize;
    /// `out = dropout(softmax(q k^T / sqrt(d) + mask)) v`; saves what backward needs in
    /// `saved` (of [`Self::attention_saved_len`] elements).
    #[allow(clippy::too_many_arguments)]
    fn attention_forward(
        &self,
        s: AttentionShape,
        q: Self::Ref<'_>,
        k: Self::Ref<'_>,
        v: Self::Ref<'_>,
        key_mask: Self::Ref<'_>,
        saved: Self::Mut<'_>,
        out: Self::Mut<'_>,
    ) -> Result<()>;
    /// Assigns `dq`, `dk` and `dv` (their callers used to zero dk and dv to accumulate into them:
    /// one memset pass each, for nothing). `out` is the forward's output and `saved` its saved
    /// state; `key_mask` is the forward's mask.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        s: AttentionShape,
        dout: Self::Ref<'_>,
        q: Self::Ref<'_>,
        k: Self::Ref<'_>,
        v: Self::Ref<'_>,
        key_mask: Self::Ref<'_>,
        out: Self::Ref<'_>,
        saved: Self::Ref<'_>,
        dq: Self::Mut<'_>,
        dk: Self::Mut<'_>,
        dv: Self::Mut<'_>,
    ) -> Result<()>;
}

/// Softmax cross-entropy over `[rows, vocab]` logits, fused with its gradient.
pub trait CrossEntropyOps: Memory {
    /// Row `r` of `logits` against label `labels[first_label + r]` (so a caller can take the rows
    /// of a long label list in chunks). Writes the per-row loss (0 for ignored rows) into
    /// `losses` (`rows` long); with `grad_scale`, then REPLACES the logits by
    /// `grad_scale * d(loss_row)/d(logits)` (0 for ignored rows), in place, so the
    /// vocabulary-wide gradient needs no buffer of its own. Without it the logits are unchanged.
    /// The loss of a row is `(1-ls) * nll + ls * mean_v(-log p_v)` (PyTorch's label smoothing).
    #[allow(clippy::too_many_arguments)]
    fn cross_entropy(
        &self,
        logits: Self::Mut<'_>,
        labels: &Self::Ids,
        first_label: usize,
        vocab: usize,
        label_smoothing: f32,
        grad_scale: Option<f32>,
        losses: Self::Mut<'_>,
    ) -> Result<()>;
}

/// Inverted dropout with a counter-based mask: element `i` of stream `seed` is kept iff
/// `rng::uniform(seed, i) >= p`, on every backend.
pub trait DropoutOps: Memory {
    /// `x = x * mask / (1-p)` in place.
    fn dropout_forward(&self, x: Self::Mut<'_>, p: f32, seed: u64) -> Result<()>;
    /// `dx = dx * mask / (1-p)` in place (the mask is recomputed, never stored).
    fn dropout_backward(&self, dx: Self::Mut<'_>, p: f32, seed: u64) -> Result<()>;
}

/// Residual add and scaling.
pub trait ResidualOps: Memory {
    /// `out = a + b`.
    fn add(&self, a: Self::Ref<'_>, b: Self::Ref<'_>, out: Self::Mut<'_>) -> Result<()>;
    /// `dst += src`.
    fn add_assign(&self, dst: Self::Mut<'_>, src: Self::Ref<'_>) -> Result<()>;
    /// `x *= s`.
    fn scale(&self, x: Self::Mut<'_>, s: f32) -> Result<()>;
}

/// AdamW hyper-parameters for one update; `step` counts from 1.
#[derive(Clone, Copy, Debug)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub step: u64,
}

pub trait OptimizerOps: Memory {
    /// Fused decoupled-weight-decay Adam, as torch.optim.AdamW:
    /// `p -= lr*wd*p; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;`
    /// `p -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)`.
    fn adamw(
        &self,
        h: AdamW,
        params: Self::Mut<'_>,
        grads: Self::Ref<'_>,
        m: Self::Mut<'_>,
        v: Self::Mut<'_>,
    ) -> Result<()>;
    /// `sum(x^2)`, accumulated in f64 on the CPU and f32 pairwise elsewhere.
    fn sum_squares(&self, x: Self::Ref<'_>) -> Result<f64>;
    /// One AdamW update of the whole flat buffer, with the global gradient norm and clipping,
    /// and no host read-back (on a device, the norm stays in device memory):
    /// - `norm[0] = sqrt(sum(grads^2))` over all of `grads` (as [`clip_grad_norm`]);
    /// - `coef = max_norm / (norm + 1e-6)` when `max_norm > 0`, the norm is finite and
    ///   `coef < 1` ([`clip_coef`]), else 1: every gradient read is `g * coef`;
    /// - then [`OptimizerOps::adamw`]'s update on each element of `segs`' chunks, with
    ///   `h.weight_decay` on decaying chunks and none on the others (the no-decay mask);
    ///   elements outside every chunk (frozen tensors) are left alone.
    ///
    /// - with `copy` (the GEMM copy of the parameters, at the activation dtype): each updated
    ///   element's new value also goes there, rounded to the copy's dtype, so the next pass need
    ///   not convert the whole buffer; elements outside every chunk are left alone there too.
    ///
    /// `params`, `grads`, `m`, `v` and `copy` have `segs.len` elements; `norm` has 1. `grads` is
    /// read only.
    #[allow(clippy::too_many_arguments)]
    fn adamw_flat(
        &self,
        h: AdamW,
        max_norm: f32,
        segs: &FlatSegments<Self::Ids>,
        params: Self::Mut<'_>,
        grads: Self::Ref<'_>,
        m: Self::Mut<'_>,
        v: Self::Mut<'_>,
        norm: Self::Mut<'_>,
        copy: Option<Self::Mut<'_>>,
    ) -> Result<()>;
}

/// Elements per chunk of a [`FlatSegments`] table: a CUDA block's work, a CPU task's.
pub const FLAT_CHUNK: usize = 1 << 14;

/// The ranges of a flat buffer that [`OptimizerOps::adamw_flat`] updates, with the no-decay
/// mask, as a table of chunks uploaded once: `(start, len, decay)` i32 triples, in ascending,
/// disjoint order, each chunk at most [`FLAT_CHUNK`] long and inside one range.
pub struct FlatSegments<I> {
    /// The `3 * chunks` i32s, on the backend.
    pub table: I,
    pub chunks: usize,
    /// Elements covered (the sum of the chunk lengths).
    pub elems: usize,
    /// Length of the flat buffers the table indexes.
    pub len: usize,
}

impl<I> FlatSegments<I> {
    /// The host table of `segments` (`(range, decay)`, any order, disjoint, inside `0..len`).
    pub fn host_table(len: usize, segments: &[(std::ops::Range<usize>, bool)]) -> Result<Vec<i32>> {
        let bad = |what: String| KernelError::Shape { op: "adamw_flat segments", what };
        if len > i32::MAX as usize {
            return Err(bad(format!("flat length {len} does not fit an i32")));
        }
        let mut segs: Vec<_> = segments.iter().filter(|(r, _)| !r.is_empty()).cloned().collect();
        segs.sort_by_key(|(r, _)| r.start);
        let mut table = Vec::new();
        let mut end = 0;
        for (r, decay) in segs {
            if r.start < end || r.end > len {
                return Err(bad(format!("range {r:?} overlaps the previous one or is outside 0..{len}")));
            }
            end = r.end;
            let mut s = r.start;
            while s < r.end {
                let l = (r.end - s).min(FLAT_CHUNK);
                table.extend([s as i32, l as i32, decay as i32]);
                s += l;
            }
        }
        Ok(table)
    }

    /// Build and upload the table (once; each step then reuses it).
    pub fn new<B: Memory<Ids = I>>(
        b: &B,
        len: usize,
        segments: &[(std::ops::Range<usize>, bool)],
    ) -> Result<FlatSegments<I>> {
        let host = Self::host_table(len, segments)?;
        let elems = host.chunks(3).map(|c| c[1] as usize).sum();
        Ok(FlatSegments { table: b.upload_ids(&host)?, chunks: host.len() / 3, elems, len })
    }
}

/// The clipping factor of [`clip_grad_norm`] for a global norm `norm`, or `None` when the
/// gradients are left alone (`max_norm <= 0`, a non-finite norm, or a norm under the maximum).
pub fn clip_coef(max_norm: f32, norm: f32) -> Option<f32> {
    if max_norm > 0.0 && norm.is_finite() {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            return Some(coef);
        }
    }
    None
}

/// Every op family. The model is written against this trait alone.
pub trait Backend:
    Memory
    + GemmOps
    + EmbeddingOps
    + LayerNormOps
    + ResidualNormOps
    + GeluOps
    + AttentionOps
    + CrossEntropyOps
    + DropoutOps
    + ResidualOps
    + OptimizerOps
    + Sync
{
}

impl<T> Backend for T where
    T: Memory
        + GemmOps
        + EmbeddingOps
        + LayerNormOps
        + ResidualNormOps
        + GeluOps
        + AttentionOps
        + CrossEntropyOps
        + DropoutOps
        + ResidualOps
        + OptimizerOps
        + Sync
{
}

/// Global gradient norm with clipping: returns the norm before clipping and scales `grads` by
/// `max_norm / norm` when the norm exceeds `max_norm` (as torch.nn.utils.clip_grad_norm_, which
/// uses `max_norm / (norm + 1e-6)`).
pub fn clip_grad_norm<B: Backend>(b: &B, grads: &mut B::Buf, max_norm: f32) -> Result<f32> {
    let n = b.len(grads);
    let norm = b.sum_squares(b.view(grads, 0..n))?.sqrt() as f32;
    if let Some(coef) = clip_coef(max_norm, norm) {
        b.scale(b.view_mut(grads, 0..n), coef)?;
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::{bf16_bits, bf16_value, round_bf16};

    #[test]
    fn bf16_rounds_to_nearest_even_and_keeps_nan_nan() {
        // Exact values keep their upper half: 1.0 is 0x3f80_0000, -0.0 is 0x8000_0000.
        assert_eq!((bf16_bits(1.0), bf16_bits(-0.0)), (0x3f80, 0x8000));
        // 1 + 2^-8 (0x3f80_8000) is halfway between 1 and 1 + 2^-7: to the even 0x3f80 (1.0).
        assert_eq!(bf16_bits(f32::from_bits(0x3f80_8000)), 0x3f80);
        // 1 + 3 * 2^-8 (0x3f81_8000) is halfway between 0x3f81 and 0x3f82: to the even one.
        assert_eq!(bf16_bits(f32::from_bits(0x3f81_8000)), 0x3f82);
        assert_eq!(bf16_value(0x3f82), 1.015625);
        // One bit either side of a tie rounds to the nearer.
        assert_eq!(bf16_bits(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert_eq!(bf16_bits(f32::from_bits(0x3f81_7fff)), 0x3f81);
        // The sign does not change the rounding: -(1 + 2^-8) to -1.
        assert_eq!(bf16_bits(f32::from_bits(0xbf80_8000)), 0xbf80);
        // 0.1 is 0x3dcc_cccd: the low half 0xcccd is above the tie, so up to 0x3dcd, which
        // is (1 + 77/128) / 16 = 205/2048.
        assert_eq!(bf16_bits(0.1), 0x3dcd);
        assert_eq!(round_bf16(0.1), 205.0 / 2048.0);
        // Subnormals round like any other value: 2^-149 to +0, 0x0001_8000 (a tie) to 0x0002.
        assert_eq!(bf16_bits(f32::from_bits(1)), 0x0000);
        assert_eq!(bf16_bits(f32::from_bits(0x0001_8000)), 0x0002);
    }

    #[test]
    fn bf16_keeps_infinities_and_rounds_past_the_largest_finite_value_to_infinity() {
        assert_eq!((bf16_bits(f32::INFINITY), bf16_bits(f32::NEG_INFINITY)), (0x7f80, 0xff80));
        assert_eq!(bf16_value(0x7f80), f32::INFINITY);
        // The largest finite bf16, 0x7f7f = (2 - 2^-7) * 2^127, stays; a value just below the
        // halfway point to 2^128 rounds down to it.
        assert_eq!(bf16_bits(f32::from_bits(0x7f7f_0000)), 0x7f7f);
        assert_eq!(bf16_bits(f32::from_bits(0x7f7f_7fff)), 0x7f7f);
        // The halfway point 0x7f7f_8000 ties to the even 0x7f80, infinity; so does f32::MAX
        // (0x7f7f_ffff, above the halfway point), and the negative side alike.
        assert_eq!(bf16_bits(f32::from_bits(0x7f7f_8000)), 0x7f80);
        assert_eq!(bf16_bits(f32::MAX), 0x7f80);
        assert_eq!(round_bf16(f32::MAX), f32::INFINITY);
        assert_eq!(round_bf16(f32::MIN), f32::NEG_INFINITY);
    }

    #[test]
    fn bf16_nan_stays_nan_quiet() {
        // The canonical quiet NaN keeps its bits.
        assert_eq!(bf16_bits(f32::from_bits(0x7fc0_0000)), 0x7fc0);
        // A NaN whose payload is only in the low half would truncate to infinity: the quiet bit
        // is set instead (0x7f80 | 0x40), and the sign kept.
        assert_eq!(bf16_bits(f32::from_bits(0x7f80_0001)), 0x7fc0);
        assert_eq!(bf16_bits(f32::from_bits(0xff80_0001)), 0xffc0);
        // 0x7fff_ffff would carry into the sign bit if rounded: it stays a NaN, 0x7fff.
        assert_eq!(bf16_bits(f32::from_bits(0x7fff_ffff)), 0x7fff);
        assert!(round_bf16(f32::NAN).is_nan() && round_bf16(-f32::NAN).is_nan());
    }
}
