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

/// Memory management: owned f32 buffers, views into them, and id buffers.
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
    fn zeros(&self, n: usize) -> Result<Self::Buf>;
    fn upload(&self, host: &[f32]) -> Result<Self::Buf>;
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
    fn fill(&self, dst: Self::Mut<'_>, value: f32) -> Result<()>;
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
}

/// Shape and options of multi-head scaled-dot-product attention.
///
/// q is `[batch, tq, heads*head_dim]`, k and v are `[batch, tk, heads*head_dim]` (heads
/// interleaved, as a linear layer writes them). `key_mask` is `[batch, tk]` with 1.0 for real
/// keys and 0.0 for padding; `causal` also hides keys after the query position.
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
}

impl AttentionShape {
    pub fn probs_len(&self) -> usize {
        self.batch * self.heads * self.tq * self.tk
    }

    /// Check buffer lengths against the shape (every backend's attention ops call this).
    pub fn check(&self, op: &'static str, q: usize, k: usize, v: usize, mask: usize, probs: usize) -> Result<()> {
        let c = self.heads * self.head_dim;
        let ok = q == self.batch * self.tq * c
            && k == self.batch * self.tk * c
            && v == k
            && mask == self.batch * self.tk
            && probs == self.probs_len();
        if !ok {
            return Err(KernelError::Shape {
                op,
                what: format!("{self:?}: q {q} k {k} v {v} mask {mask} probs {probs}"),
            });
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(KernelError::Shape { op, what: format!("dropout {} outside [0, 1)", self.dropout) });
        }
        Ok(())
    }
}

pub trait AttentionOps: Memory {
    /// `out = dropout(softmax(q k^T / sqrt(d) + mask)) v`; saves the pre-dropout probabilities
    /// `[batch, heads, tq, tk]` in `probs` for backward.
    #[allow(clippy::too_many_arguments)]
    fn attention_forward(
        &self,
        s: AttentionShape,
        q: Self::Ref<'_>,
        k: Self::Ref<'_>,
        v: Self::Ref<'_>,
        key_mask: Self::Ref<'_>,
        probs: Self::Mut<'_>,
        out: Self::Mut<'_>,
    ) -> Result<()>;
    /// Assigns `dq`; ACCUMULATES into `dk` and `dv` (cross-attention K/V of several layers share
    /// one encoder output, and self-attention callers zero them first).
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        s: AttentionShape,
        dout: Self::Ref<'_>,
        q: Self::Ref<'_>,
        k: Self::Ref<'_>,
        v: Self::Ref<'_>,
        probs: Self::Ref<'_>,
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
}

/// Every op family. The model is written against this trait alone.
pub trait Backend:
    Memory
    + GemmOps
    + EmbeddingOps
    + LayerNormOps
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
    if max_norm > 0.0 && norm.is_finite() {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            b.scale(b.view_mut(grads, 0..n), coef)?;
        }
    }
    Ok(norm)
}
