//! AttentionOps and CrossEntropyOps: fused attention forward and backward (key padding, a fully
//! masked row, causal masks, dropout on the probabilities, a BERT-sized head dimension, q, k and
//! v read from strided views), and the
//! cross-entropy loss with ignored rows and label smoothing, with and without its gradient.

use kernels::{AttentionShape, Backend, IGNORE_INDEX, reference};

use super::{Case, Draw, Outputs, Tolerances, act, all, all_mut, get};

/// q, k, v, out, dout, dq, dk and dv are activations (`act`: bf16 on a device in mixed
/// precision); the key mask and the saved state stay fp32.
pub(crate) struct AttentionCase {
    label: &'static str,
    backward: bool,
    /// From the device's GEMM precision (`Tolerances::attention*`): attention runs on GEMMs.
    tol: f64,
    s: AttentionShape,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    mask: Vec<f32>,
    dout: Vec<f32>,
    /// Initial contents of out, of dq (and the columns between a strided q's heads), and of the
    /// saved state (a prefix of it, at the backend's length).
    garbage_out: Vec<f32>,
    garbage_q: Vec<f32>,
    garbage_p: Vec<f32>,
    dk0: Vec<f32>,
    dv0: Vec<f32>,
}

impl AttentionCase {
    /// `masked[b]` keys at the end of batch item b are padding (all of them: a fully masked row).
    pub(crate) fn new(
        r: &mut Draw,
        label: &'static str,
        s: AttentionShape,
        masked: &[usize],
        backward: bool,
        tols: Tolerances,
    ) -> Self {
        let (nq, nk, nout) = (s.q_len(), s.kv_len(), s.out_len());
        let mask = (0..s.batch * s.tk)
            .map(|i| {
                let (b, j) = (i / s.tk, i % s.tk);
                if j + masked.get(b).copied().unwrap_or(0) >= s.tk { 0.0 } else { 1.0 }
            })
            .collect();
        AttentionCase {
            label,
            backward,
            tol: if backward { tols.attention_grad } else { tols.attention },
            s,
            q: r.normal(nq, 1.0),
            k: r.normal(nk, 1.0),
            v: r.normal(nk, 1.0),
            mask,
            dout: r.normal(nout, 1.0),
            garbage_out: r.normal(nout, 5.0),
            garbage_q: r.normal(nq, 5.0),
            garbage_p: r.normal(s.probs_len().max(s.batch * s.heads * s.tq), 5.0),
            dk0: r.normal(nk, 1.0),
            dv0: r.normal(nk, 1.0),
        }
    }
}

impl Case for AttentionCase {
    fn family(&self) -> &'static str {
        "AttentionOps"
    }
    fn op(&self) -> &'static str {
        self.label
    }
    fn shape(&self) -> String {
        let s = &self.s;
        let pad = self.mask.iter().filter(|&&m| m == 0.0).count();
        format!(
            "b{} h{} d{} tq{} tk{}{}{}{} pad{pad}",
            s.batch,
            s.heads,
            s.head_dim,
            s.tq,
            s.tk,
            if s.causal { " causal" } else { "" },
            if s.dropout > 0.0 { format!(" drop{}", s.dropout) } else { String::new() },
            if s.q_stride != s.width() || s.kv_stride != s.width() {
                format!(" ld{}/{}", s.q_stride, s.kv_stride)
            } else {
                String::new()
            },
        )
    }
    fn tol(&self) -> f64 {
        self.tol
    }
    fn run<D: Backend>(&self, d: &D) -> kernels::Result<Outputs> {
        let q = act(d, &self.q)?;
        let k = act(d, &self.k)?;
        let v = act(d, &self.v)?;
        let mask = d.upload(&self.mask)?;
        let mut saved = d.upload(&self.garbage_p[..d.attention_saved_len(&self.s)])?;
        let mut out = act(d, &self.garbage_out)?;
        d.attention_forward(
            self.s,
            all(d, &q),
            all(d, &k),
            all(d, &v),
            all(d, &mask),
            all_mut(d, &mut saved),
            all_mut(d, &mut out),
        )?;
        if !self.backward {
            // The saved state is backend-defined (probabilities or a log-sum-exp): backward
            // checks it.
            return Ok(vec![("out", get(d, &out)?)]);
        }
        let dout = act(d, &self.dout)?;
        let mut dq = act(d, &self.garbage_q)?;
        let mut dk = act(d, &self.dk0)?;
        let mut dv = act(d, &self.dv0)?;
        d.attention_backward(
            self.s,
            all(d, &dout),
            all(d, &q),
            all(d, &k),
            all(d, &v),
            all(d, &mask),
            all(d, &out),
            all(d, &saved),
            all_mut(d, &mut dq),
            all_mut(d, &mut dk),
            all_mut(d, &mut dv),
        )?;
        Ok(vec![("dq", get(d, &dq)?), ("dk", get(d, &dk)?), ("dv", get(d, &dv)?)])
    }
    fn reference(&self) -> Outputs {
        let (mut probs, mut out) = (self.garbage_p[..self.s.probs_len()].to_vec(), self.garbage_out.clone());
        reference::attention_forward(self.s, &self.q, &self.k, &self.v, &self.mask, &mut probs, &mut out);
        if !self.backward {
            return vec![("out", out)];
        }
        let (mut dq, mut dk, mut dv) = (self.garbage_q.clone(), self.dk0.clone(), self.dv0.clone());
        reference::attention_backward(self.s, &self.dout, &self.q, &self.k, &self.v, &probs, &mut dq, &mut dk, &mut dv);
        vec![("dq", dq), ("dk", dk), ("dv", dv)]
    }
}
// CrossEntropyOps

/// Where a cross-entropy case's rows start in its label list.
const FIRST_LABEL: usize = 3;

pub(crate) struct CrossEntropyCase {
    with_grad: bool,
    rows: usize,
    vocab: usize,
    label_smoothing: f32,
    grad_scale: f32,
    logits: Vec<f32>,
    /// `first_label` labels outside the vocabulary, then the rows' labels, then two more:
    /// reading the wrong ones shows.
    labels: Vec<i32>,
    first_label: usize,
    garbage: Vec<f32>,
}

impl CrossEntropyCase {
    pub(crate) fn new(r: &mut Draw, rows: usize, vocab: usize, ls: f32, with_grad: bool) -> Self {
        let mut labels = r.ids(rows, vocab);
        // Every 5th row (and the last) is ignored.
        for (i, y) in labels.iter_mut().enumerate() {
            if i % 5 == 2 || i + 1 == rows {
                *y = IGNORE_INDEX;
            }
        }
        CrossEntropyCase {
            with_grad,
            rows,
            vocab,
            label_smoothing: ls,
            grad_scale: 1.0 / rows as f32,
            logits: r.normal(rows * vocab, 4.0),
            labels: [vec![vocab as i32; FIRST_LABEL], labels, vec![vocab as i32 + 1; 2]].concat(),
            first_label: FIRST_LABEL,
            garbage: r.normal(rows, 5.0),
        }
    }
}

impl Case for CrossEntropyCase {
    fn family(&self) -> &'static str {
        "CrossEntropyOps"
    }
    fn op(&self) -> &'static str {
        if self.with_grad { "cross_entropy+grad" } else { "cross_entropy" }
    }
    fn shape(&self) -> String {
        let ignored = self.row_labels().iter().filter(|&&y| y == IGNORE_INDEX).count();
        format!(
            "{}x{} ls{} ignore{ignored} labels from {}",
            self.rows, self.vocab, self.label_smoothing, self.first_label
        )
    }
    fn tol(&self) -> f64 {
        1e-5
    }
    /// The logits are overwritten by their gradient (with it) or left alone (without).
    fn run<D: Backend>(&self, d: &D) -> kernels::Result<Outputs> {
        // The logits (an activation, then their gradient) at the activation dtype; fp32 losses.
        let mut logits = act(d, &self.logits)?;
        let labels = d.upload_ids(&self.labels)?;
        let mut losses = d.upload(&self.garbage)?;
        d.cross_entropy(
            all_mut(d, &mut logits),
            &labels,
            self.first_label,
            self.vocab,
            self.label_smoothing,
            self.with_grad.then_some(self.grad_scale),
            all_mut(d, &mut losses),
        )?;
        let name = if self.with_grad { "dlogits" } else { "logits" };
        Ok(vec![("losses", get(d, &losses)?), (name, get(d, &logits)?)])
    }
    fn reference(&self) -> Outputs {
        let (mut losses, mut dl) = (self.garbage.clone(), self.logits.clone());
        let dlogits = self.with_grad.then_some(dl.as_mut_slice());
        let (labels, vocab, ls) = (self.row_labels(), self.vocab, self.label_smoothing);
        reference::cross_entropy(&self.logits, labels, vocab, ls, self.grad_scale, &mut losses, dlogits);
        let name = if self.with_grad { "dlogits" } else { "logits" };
        vec![("losses", losses), (name, dl)]
    }
}

impl CrossEntropyCase {
    fn row_labels(&self) -> &[i32] {
        &self.labels[self.first_label..self.first_label + self.rows]
    }
}
