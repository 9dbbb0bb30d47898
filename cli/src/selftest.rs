//! `bert2bert selftest`: every op family of a backend against the CPU fp32 oracle, forward and
//! backward, on fresh random inputs with odd shapes (no multiple of any block size), then a
//! whole tiny-model training step (loss, every gradient by name, gradient norm, AdamW update).
//!
//! Each check uploads the same host inputs to both backends, runs the op, downloads every output
//! and reports `max_abs = max |dev - ref|` and `rel = max_abs / max |ref|` against a per-op
//! tolerance (fp32: the device backend is opened with exact fp32 GEMMs). Accumulating outputs
//! start from non-zero values, assigned outputs from garbage, and elementwise ops run on a view
//! in the middle of a larger buffer so that writes outside the view show up as errors.
//! `--device cpu` runs the CPU against itself: every error must then be exactly zero, which
//! makes it a test of this harness.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use kernels::{AdamW, AttentionShape, Backend, Cpu, GemmShape, IGNORE_INDEX, Memory, Operand, clip_grad_norm, rng};
use model::net::{Bert2Bert, Inputs, PassOptions};
use model::optim::{AdamWConfig, Optimizer};
use model::{BertConfig, ModelConfig, ParamTable};

use crate::device::{self, Device, GemmPrecision};
use crate::{CliError, CliResult};

#[derive(clap::Args)]
pub struct Args {
    /// The backend to test against the CPU oracle (`cpu` tests the harness itself).
    #[arg(long, default_value = "cuda")]
    device: Device,
    /// Seed of the random inputs (default: from the clock; printed either way).
    #[arg(long)]
    seed: Option<u64>,
    /// GEMM precision of the device backend: fp32 (exact, fp32 tolerances everywhere) or bf16
    /// (the precision `bench` and training use: looser tolerances for GEMMs and the model step).
    #[arg(long, default_value = "fp32", value_parser = ["fp32", "bf16"])]
    precision: String,
    /// Print one JSON object on stdout instead of the table.
    #[arg(long)]
    json: bool,
}

/// One comparison: an output of an op (or of the model step) against the oracle.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Check {
    /// The `kernels` trait the op belongs to (`model` for the training step).
    pub family: &'static str,
    pub op: String,
    pub shape: String,
    pub max_abs: f64,
    pub rel: f64,
    pub tol: f64,
    pub pass: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `(max |x - r|, max |x - r| / max |r|)`; any NaN, infinity or length mismatch is infinite.
fn errors(r: &[f32], x: &[f32], floor: f64) -> (f64, f64) {
    if r.len() != x.len() {
        return (f64::INFINITY, f64::INFINITY);
    }
    let (mut max_abs, mut max_ref) = (0.0f64, 0.0f64);
    for (&a, &b) in r.iter().zip(x) {
        let d = (a as f64 - b as f64).abs();
        if !d.is_finite() {
            return (f64::INFINITY, f64::INFINITY);
        }
        max_abs = max_abs.max(d);
        max_ref = max_ref.max((a as f64).abs());
    }
    let denom = max_ref.max(floor);
    let rel = if max_abs == 0.0 {
        0.0
    } else if denom > 0.0 {
        max_abs / denom
    } else {
        f64::INFINITY
    };
    (max_abs, rel)
}

impl Check {
    fn compare(family: &'static str, op: String, shape: String, tol: f64, r: &[f32], x: &[f32], floor: f64) -> Self {
        let (max_abs, rel) = errors(r, x, floor);
        Check { family, op, shape, max_abs, rel, tol, pass: rel <= tol, error: None }
    }
    fn failed(family: &'static str, op: String, shape: String, tol: f64, error: String) -> Self {
        let inf = f64::INFINITY;
        Check { family, op, shape, max_abs: inf, rel: inf, tol, pass: false, error: Some(error) }
    }
}

/// The tolerances that depend on the device's GEMM precision (everything else is fp32 on
/// every backend: reductions, softmax, norms and the optimizer never run in bf16).
#[derive(Clone, Copy, Debug)]
pub struct Tolerances {
    pub gemm: f64,
    pub loss: f64,
    pub grad: f64,
}

impl Tolerances {
    pub fn new(bf16: bool) -> Self {
        if bf16 {
            // bf16 keeps 8 significant bits (relative rounding 2^-9 per input).
            Tolerances { gemm: 2e-2, loss: 2e-2, grad: 1e-1 }
        } else {
            // fp32 everywhere; gradients go through 2+2 layers of fp32 ops.
            Tolerances { gemm: 1e-5, loss: 1e-5, grad: 1e-3 }
        }
    }
}

/// Named host outputs of one run of a case.
type Outputs = Vec<(&'static str, Vec<f32>)>;

/// One op on one set of host inputs, runnable on any backend.
trait Case {
    fn family(&self) -> &'static str;
    fn op(&self) -> &'static str;
    fn shape(&self) -> String;
    /// Relative tolerance (of `max |ref|`) at fp32.
    fn tol(&self) -> f64;
    fn run<D: Backend>(&self, d: &D) -> kernels::Result<Outputs>;
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

/// Run `case` on the oracle and on `dev`; one check per output. Errors and panics are failures.
fn check_case<C: Case, B: Backend>(out: &mut Vec<Check>, dev: &B, case: &C) {
    let (fam, op, shape, tol) = (case.family(), case.op(), case.shape(), case.tol());
    let reference = match case.run(&Cpu) {
        Ok(r) => r,
        Err(e) => return out.push(Check::failed(fam, op.into(), shape, tol, format!("cpu oracle: {e}"))),
    };
    let got = match catch_unwind(AssertUnwindSafe(|| case.run(dev))) {
        Ok(Ok(g)) => g,
        Ok(Err(e)) => return out.push(Check::failed(fam, op.into(), shape, tol, e.to_string())),
        Err(p) => return out.push(Check::failed(fam, op.into(), shape, tol, format!("panicked: {}", panic_text(p)))),
    };
    let many = reference.len() > 1;
    for ((name, r), (_, x)) in reference.iter().zip(&got) {
        let label = if many { format!("{op}.{name}") } else { op.to_string() };
        out.push(Check::compare(fam, label, shape.clone(), tol, r, x, 0.0));
    }
}

/// Counter-based random host data: stream `k` of the run's seed.
struct Draw {
    seed: u64,
    stream: u64,
}

impl Draw {
    fn next(&mut self) -> u64 {
        self.stream += 1;
        rng::derive(self.seed, self.stream)
    }
    fn normal(&mut self, n: usize, scale: f32) -> Vec<f32> {
        let s = self.next();
        (0..n).map(|i| scale * rng::normal(s, i as u64)).collect()
    }
    fn shifted(&mut self, n: usize, mean: f32, scale: f32) -> Vec<f32> {
        self.normal(n, scale).into_iter().map(|x| x + mean).collect()
    }
    fn uniform(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        let s = self.next();
        (0..n).map(|i| lo + (hi - lo) * rng::uniform(s, i as u64)).collect()
    }
    fn ids(&mut self, n: usize, hi: usize) -> Vec<i32> {
        let s = self.next();
        (0..n).map(|i| (rng::mix(s, i as u64) % hi as u64) as i32).collect()
    }
}

fn all<'a, D: Backend>(d: &D, b: &'a D::Buf) -> D::Ref<'a> {
    d.view(b, 0..d.len(b))
}
fn all_mut<'a, D: Backend>(d: &D, b: &'a mut D::Buf) -> D::Mut<'a> {
    let n = d.len(b);
    d.view_mut(b, 0..n)
}
fn get<D: Backend>(d: &D, b: &D::Buf) -> kernels::Result<Vec<f32>> {
    d.download(all(d, b))
}

/// Elements a GEMM operand spans: `rows x cols` as read, stored with row stride `ld`.
fn operand_span(op: Operand, rows: usize, cols: usize, batch: usize) -> usize {
    let (sr, sc) = if op.trans { (cols, rows) } else { (rows, cols) };
    (batch - 1) * op.batch_stride + (sr - 1) * op.ld + sc
}

// ---------------------------------------------------------------------------------------------
// GemmOps

struct GemmCase {
    label: &'static str,
    tol: f64,
    s: GemmShape,
    alpha: f32,
    beta: f32,
    op_a: Operand,
    op_b: Operand,
    /// A is read from this offset of its buffer (a view, as the model reads parameters).
    a_off: usize,
    a: Vec<f32>,
    b: Vec<f32>,
    c0: Vec<f32>,
}

impl GemmCase {
    #[allow(clippy::too_many_arguments)]
    fn new(
        r: &mut Draw,
        label: &'static str,
        tol: f64,
        s: GemmShape,
        op_a: Operand,
        op_b: Operand,
        a_off: usize,
        alpha: f32,
        beta: f32,
    ) -> Self {
        let a_len = a_off + operand_span(op_a, s.m, s.k, s.batch) + 3;
        let b_len = operand_span(op_b, s.k, s.n, s.batch);
        let c_len = (s.batch - 1) * s.batch_stride_c + (s.m - 1) * s.ldc + s.n + 2;
        GemmCase {
            label,
            tol,
            s,
            alpha,
            beta,
            op_a,
            op_b,
            a_off,
            a: r.normal(a_len, 1.0),
            b: r.normal(b_len, 1.0),
            c0: r.normal(c_len, 1.0),
        }
    }
}

impl Case for GemmCase {
    fn family(&self) -> &'static str {
        "GemmOps"
    }
    fn op(&self) -> &'static str {
        self.label
    }
    fn shape(&self) -> String {
        let t = |o: Operand| if o.trans { 'T' } else { 'N' };
        let s = &self.s;
        let batch = if s.batch > 1 { format!("{}x ", s.batch) } else { String::new() };
        format!("{batch}{}x{}x{} {}{} a={} b={}", s.m, s.n, s.k, t(self.op_a), t(self.op_b), self.alpha, self.beta)
    }
    fn tol(&self) -> f64 {
        self.tol
    }
    fn run<D: Backend>(&self, d: &D) -> kernels::Result<Outputs> {
        let a = d.upload(&self.a)?;
        let b = d.upload(&self.b)?;
        let mut c = d.upload(&self.c0)?;
        let av = d.view(&a, self.a_off..self.a.len());
        d.gemm(self.s, self.alpha, av, self.op_a, all(d, &b), self.op_b, self.beta, all_mut(d, &mut c))?;
        Ok(vec![("c", get(d, &c)?)])
    }
}

struct AddBiasCase {
    rows: usize,
    cols: usize,
    y: Vec<f32>,
    bias: Vec<f32>,
}

impl Case for AddBiasCase {
    fn family(&self) -> &'static str {
        "GemmOps"
    }
    fn op(&self) -> &'static str {
        "add_bias"
    }
    fn shape(&self) -> String {
        format!("{}x{}", self.rows, self.cols)
    }
    fn tol(&self) -> f64 {
        1e-6
    }
    fn run<D: Backend>(&self, d: &D) -> kernels::Result<Outputs> {
        let mut y = d.upload(&self.y)?;
        let bias = d.upload(&self.bias)?;
        d.add_bias(all_mut(d, &mut y), all(d, &bias), self.cols)?;
        Ok(vec![("y", get(d, &y)?)])
    }
}

struct BiasGradCase {
    rows: usize,
    cols: usize,
    dy: Vec<f32>,
    dbias0: Vec<f32>,
}

impl Case for BiasGradCase {
    fn family(&self) -> &'static str {
        "GemmOps"
    }
    fn op(&self) -> &'static str {
        "bias_grad"
    }
    fn shape(&self) -> String {
        format!("{}x{} (+=)", self.rows, self.cols)
    }
    fn tol(&self) -> f64 {
        1e-5
    }
    fn run<D: Backend>(&self, d: &D) -> kernels::Result<Outputs> {
        let dy = d.upload(&self.dy)?;
        let mut db = d.upload(&self.dbias0)?;
        d.bias_grad(all(d, &dy), all_mut(d, &mut db), self.cols)?;
        Ok(vec![("dbias", get(d, &db)?)])
    }
}

// ---------------------------------------------------------------------------------------------
// EmbeddingOps

struct EmbeddingCase {
    backward: bool,
    accumulate: bool,
    rows: usize,
    dim: usize,
    ids: Vec<i32>,
    table: Vec<f32>,
    /// forward: the initial `out`; backward: `dout`.
    x: Vec<f32>,
}

impl Case for EmbeddingCase {
    fn family(&self) -> &'static str {
        "EmbeddingOps"
    }
    fn op(&self) -> &'static str {
        if self.backward { "embedding_backward" } else { "embedding_forward" }
    }
    fn shape(&self) -> String {
        let mode = if self.backward || self.accumulate { "+=" } else { "=" };
        format!("{} ids into {}x{} ({mode})", self.ids.len(), self.rows, self.dim)
    }
    fn tol(&self) -> f64 {
        if self.backward { 1e-5 } else { 1e-6 }
    }
    fn run<D: Backend>(&self, d: &D) -> kernels::Result<Outputs> {
        let ids = d.upload_ids(&self.ids)?;
        let mut table = d.upload(&self.table)?;
        let mut x = d.upload(&self.x)?;
        if self.backward {
            d.embedding_backward(&ids, all(d, &x), self.dim, all_mut(d, &mut table))?;
            Ok(vec![("dtable", get(d, &table)?)])
        } else {
            d.embedding_forward(&ids, all(d, &table), self.dim, all_mut(d, &mut x), self.accumulate)?;
            Ok(vec![("out", get(d, &x)?)])
        }
    }
}

// ---------------------------------------------------------------------------------------------
// LayerNormOps

struct LayerNormCase {
    backward: bool,
    accumulate_dx: bool,
    rows: usize,
    c: usize,
    eps: f32,
    x: Vec<f32>,
    gamma: Vec<f32>,
    beta: Vec<f32>,
    dout: Vec<f32>,
    /// Saved statistics for backward, from the oracle's forward (backward is tested alone).
    mean: Vec<f32>,
    rstd: Vec<f32>,
    garbage: Vec<f32>,
    dx0: Vec<f32>,
    dgamma0: Vec<f32>,
    dbeta0: Vec<f32>,
}

impl LayerNormCase {
    fn new(r: &mut Draw, rows: usize, c: usize, backward: bool, accumulate_dx: bool) -> Self {
        let x = r.shifted(rows * c, 3.0, 2.0);
        let gamma = r.shifted(c, 1.0, 0.3);
        let beta = r.normal(c, 0.3);
        let (mut mean, mut rstd, mut out) = (vec![0.0; rows], vec![0.0; rows], vec![0.0; rows * c]);
        let eps = 1e-12;
        kernels::LayerNormOps::layernorm_forward(&Cpu, &x, &gamma, &beta, eps, &mut out, &mut mean, &mut rstd)
            .expect("oracle layernorm");
        LayerNormCase {
            backward,
            accumulate_dx,
            rows,
            c,
            eps,
            x,
            gamma,
            beta,
            dout: r.normal(rows * c, 1.0),
            mean,
            rstd,
            garbage: r.normal(rows * c, 5.0),
            dx0: r.normal(rows * c, 1.0),
            dgamma0: r.normal(c, 1.0),
            dbeta0: r.normal(c, 1.0),
        }
    }
}

impl Case for LayerNormCase {
    fn family(&self) -> &'static str {
        "LayerNormOps"
    }
    fn op(&self) -> &'static str {
        match (self.backward, self.accumulate_dx) {
            (false, _) => "layernorm_forward",
            (true, false) => "layernorm_backward",
            (true, true) => "layernorm_backward+=",
        }
    }
    fn shape(&self) -> String {
        let dx = if !self.backward {
            ""
        } else if self.accumulate_dx {
            " (dx +=)"
        } else {
            " (dx =)"
        };
        format!("{}x{}{dx}", self.rows, self.c)
    }
    fn tol(&self) -> f64 {
        if self.backward { 1e-4 } else { 1e-5 }
    }
    fn run<D: Backend>(&self, d: &D) -> kernels::Result<Outputs> {
        let x = d.upload(&self.x)?;
        let gamma = d.upload(&self.gamma)?;
        if !self.backward {
            let beta = d.upload(&self.beta)?;
            let mut out = d.upload(&self.garbage)?;
            let mut mean = d.upload(&self.garbage[..self.rows])?;
            let mut rstd = d.upload(&self.garbage[self.rows..2 * self.rows])?;
            d.layernorm_forward(
                all(d, &x),
                all(d, &gamma),
                all(d, &beta),
                self.eps,
                all_mut(d, &mut out),
                all_mut(d, &mut mean),
                all_mut(d, &mut rstd),
            )?;
            return Ok(vec![("out", get(d, &out)?), ("mean", get(d, &mean)?), ("rstd", get(d, &rstd)?)]);
        }
        let dout = d.upload(&self.dout)?;
        let mean = d.upload(&self.mean)?;
        let rstd = d.upload(&self.rstd)?;
        let mut dx = d.upload(if self.accumulate_dx { &self.dx0 } else { &self.garbage })?;
        // dgamma and dbeta as two views of one buffer, as the model passes them.
        let c = self.c;
        let mut dgb = d.upload(&[self.dgamma0.as_slice(), &self.dbeta0].concat())?;
        {
            let (dg, db) = d.view_mut2(&mut dgb, 0..c, c..2 * c);
            d.layernorm_backward(
                all(d, &dout),
                all(d, &x),
                all(d, &gamma),
                all(d, &mean),
                all(d, &rstd),
                all_mut(d, &mut dx),
                self.accumulate_dx,
                dg,
                db,
            )?;
        }
        let dgb = get(d, &dgb)?;
        Ok(vec![("dx", get(d, &dx)?), ("dgamma", dgb[..c].to_vec()), ("dbeta", dgb[c..].to_vec())])
    }
}

// ---------------------------------------------------------------------------------------------
// GeluOps

struct GeluCase {
    backward: bool,
    rows: usize,
    c: usize,
    pre: Vec<f32>,
    bias: Vec<f32>,
    dout: Vec<f32>,
    garbage: Vec<f32>,
    dbias0: Vec<f32>,
}

impl Case for GeluCase {
    fn family(&self) -> &'static str {
        "GeluOps"
    }
    fn op(&self) -> &'static str {
        if self.backward { "bias_gelu_backward" } else { "bias_gelu_forward" }
    }
    fn shape(&self) -> String {
        format!("{}x{}", self.rows, self.c)
    }
    fn tol(&self) -> f64 {
        1e-5
    }
    fn run<D: Backend>(&self, d: &D) -> kernels::Result<Outputs> {
        let mut pre = d.upload(&self.pre)?;
        if !self.backward {
            let bias = d.upload(&self.bias)?;
            let mut out = d.upload(&self.garbage)?;
            d.bias_gelu_forward(all_mut(d, &mut pre), all(d, &bias), all_mut(d, &mut out))?;
            return Ok(vec![("pre", get(d, &pre)?), ("out", get(d, &out)?)]);
        }
        let dout = d.upload(&self.dout)?;
        let mut dpre = d.upload(&self.garbage)?;
        let mut dbias = d.upload(&self.dbias0)?;
        d.bias_gelu_backward(all(d, &pre), all(d, &dout), all_mut(d, &mut dpre), all_mut(d, &mut dbias))?;
        Ok(vec![("dpre", get(d, &dpre)?), ("dbias", get(d, &dbias)?)])
    }
}

// ---------------------------------------------------------------------------------------------
// AttentionOps

struct AttentionCase {
    label: &'static str,
    backward: bool,
    s: AttentionShape,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    mask: Vec<f32>,
    dout: Vec<f32>,
    garbage_q: Vec<f32>,
    garbage_p: Vec<f32>,
    dk0: Vec<f32>,
    dv0: Vec<f32>,
}

impl AttentionCase {
    /// `masked[b]` keys at the end of batch item b are padding (all of them: a fully masked row).
    fn new(r: &mut Draw, label: &'static str, s: AttentionShape, masked: &[usize], backward: bool) -> Self {
        let c = s.heads * s.head_dim;
        let (nq, nk) = (s.batch * s.tq * c, s.batch * s.tk * c);
        let mask = (0..s.batch * s.tk)
            .map(|i| {
                let (b, j) = (i / s.tk, i % s.tk);
                if j + masked.get(b).copied().unwrap_or(0) >= s.tk { 0.0 } else { 1.0 }
            })
            .collect();
        AttentionCase {
            label,
            backward,
            s,
            q: r.normal(nq, 1.0),
            k: r.normal(nk, 1.0),
            v: r.normal(nk, 1.0),
            mask,
            dout: r.normal(nq, 1.0),
            garbage_q: r.normal(nq, 5.0),
            garbage_p: r.normal(s.probs_len(), 5.0),
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
            "b{} h{} d{} tq{} tk{}{}{} pad{pad}",
            s.batch,
            s.heads,
            s.head_dim,
            s.tq,
            s.tk,
            if s.causal { " causal" } else { "" },
            if s.dropout > 0.0 { format!(" drop{}", s.dropout) } else { String::new() },
        )
    }
    fn tol(&self) -> f64 {
        if self.backward { 1e-4 } else { 1e-5 }
    }
    fn run<D: Backend>(&self, d: &D) -> kernels::Result<Outputs> {
        let q = d.upload(&self.q)?;
        let k = d.upload(&self.k)?;
        let v = d.upload(&self.v)?;
        let mask = d.upload(&self.mask)?;
        let mut probs = d.upload(&self.garbage_p)?;
        let mut out = d.upload(&self.garbage_q)?;
        d.attention_forward(
            self.s,
            all(d, &q),
            all(d, &k),
            all(d, &v),
            all(d, &mask),
            all_mut(d, &mut probs),
            all_mut(d, &mut out),
        )?;
        if !self.backward {
            return Ok(vec![("out", get(d, &out)?), ("probs", get(d, &probs)?)]);
        }
        let dout = d.upload(&self.dout)?;
        let mut dq = d.upload(&self.garbage_q)?;
        let mut dk = d.upload(&self.dk0)?;
        let mut dv = d.upload(&self.dv0)?;
        d.attention_backward(
            self.s,
            all(d, &dout),
            all(d, &q),
            all(d, &k),
            all(d, &v),
            all(d, &probs),
            all_mut(d, &mut dq),
            all_mut(d, &mut dk),
            all_mut(d, &mut dv),
        )?;
        Ok(vec![("dq", get(d, &dq)?), ("dk", get(d, &dk)?), ("dv", get(d, &dv)?)])
    }
}

// ---------------------------------------------------------------------------------------------
// CrossEntropyOps

struct CrossEntropyCase {
    with_grad: bool,
    rows: usize,
    vocab: usize,
    label_smoothing: f32,
    grad_scale: f32,
    logits: Vec<f32>,
    labels: Vec<i32>,
    garbage: Vec<f32>,
}

impl CrossEntropyCase {
    fn new(r: &mut Draw, rows: usize, vocab: usize, ls: f32, with_grad: bool) -> Self {
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
            labels,
            garbage: r.normal(rows * vocab + rows, 5.0),
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
        let ignored = self.labels.iter().filter(|&&y| y == IGNORE_INDEX).count();
        format!("{}x{} ls{} ignore{ignored}", self.rows, self.vocab, self.label_smoothing)
    }
    fn tol(&self) -> f64 {
        1e-5
    }
    fn run<D: Backend>(&self, d: &D) -> kernels::Result<Outputs> {
        let logits = d.upload(&self.logits)?;
        let labels = d.upload_ids(&self.labels)?;
        let n = self.rows * self.vocab;
        let mut losses = d.upload(&self.garbage[n..])?;
        let mut dl = d.upload(&self.garbage[..n])?;
        let dlogits = self.with_grad.then(|| all_mut(d, &mut dl));
        d.cross_entropy(
            all(d, &logits),
            &labels,
            self.vocab,
            self.label_smoothing,
            self.grad_scale,
            all_mut(d, &mut losses),
            dlogits,
        )?;
        let mut outs = vec![("losses", get(d, &losses)?)];
        if self.with_grad {
            outs.push(("dlogits", get(d, &dl)?));
        }
        Ok(outs)
    }
}

// ---------------------------------------------------------------------------------------------
// Elementwise ops (DropoutOps, ResidualOps, OptimizerOps) and Memory, on views in the middle
// of larger buffers.

const PAD_LO: usize = 5;
const PAD_HI: usize = 3;

#[derive(Clone, Copy, Debug)]
enum Elem {
    DropoutForward { p: f32, seed: u64 },
    DropoutBackward { p: f32, seed: u64 },
    Add,
    AddAssign,
    Scale(f32),
    AdamW(AdamW),
    SumSquares,
    Fill(f32),
    Copy,
    ViewMut2,
}

struct ElemCase {
    what: Elem,
    n: usize,
    x: Vec<f32>,
    y: Vec<f32>,
    z: Vec<f32>,
    w: Vec<f32>,
}

impl ElemCase {
    fn new(r: &mut Draw, what: Elem, n: usize) -> Self {
        let len = PAD_LO + n + PAD_HI;
        let (x, y, z) = (r.normal(len, 1.0), r.normal(len, 1.0), r.normal(len, 0.1));
        // AdamW's second moment is non-negative.
        let w = r.uniform(len, 1e-4, 0.02);
        ElemCase { what, n, x, y, z, w }
    }
    fn mid(&self) -> std::ops::Range<usize> {
        PAD_LO..PAD_LO + self.n
    }
}

impl Case for ElemCase {
    fn family(&self) -> &'static str {
        match self.what {
            Elem::DropoutForward { .. } | Elem::DropoutBackward { .. } => "DropoutOps",
            Elem::Add | Elem::AddAssign | Elem::Scale(_) => "ResidualOps",
            Elem::AdamW(_) | Elem::SumSquares => "OptimizerOps",
            Elem::Fill(_) | Elem::Copy | Elem::ViewMut2 => "Memory",
        }
    }
    fn op(&self) -> &'static str {
        match self.what {
            Elem::DropoutForward { .. } => "dropout_forward",
            Elem::DropoutBackward { .. } => "dropout_backward",
            Elem::Add => "add",
            Elem::AddAssign => "add_assign",
            Elem::Scale(_) => "scale",
            Elem::AdamW(_) => "adamw",
            Elem::SumSquares => "sum_squares",
            Elem::Fill(_) => "fill",
            Elem::Copy => "copy",
            Elem::ViewMut2 => "view_mut2",
        }
    }
    fn shape(&self) -> String {
        let what = match self.what {
            Elem::DropoutForward { p, .. } | Elem::DropoutBackward { p, .. } => format!(" p{p}"),
            Elem::Scale(s) => format!(" x{s}"),
            Elem::AdamW(h) => format!(" step{} wd{}", h.step, h.weight_decay),
            _ => String::new(),
        };
        format!("{} at +{PAD_LO}{what}", self.n)
    }
    fn tol(&self) -> f64 {
        match self.what {
            Elem::AdamW(_) | Elem::SumSquares => 1e-5,
            Elem::Fill(_) | Elem::Copy | Elem::ViewMut2 => 0.0,
            _ => 1e-6,
        }
    }
    fn run<D: Backend>(&self, d: &D) -> kernels::Result<Outputs> {
        let mid = self.mid();
        let mut x = d.upload(&self.x)?;
        let mut y = d.upload(&self.y)?;
        match self.what {
            Elem::DropoutForward { p, seed } => d.dropout_forward(d.view_mut(&mut x, mid), p, seed)?,
            Elem::DropoutBackward { p, seed } => d.dropout_backward(d.view_mut(&mut x, mid), p, seed)?,
            Elem::Add => {
                let z = d.upload(&self.z)?;
                d.add(d.view(&y, mid.clone()), d.view(&z, mid.clone()), d.view_mut(&mut x, mid))?;
            }
            Elem::AddAssign => d.add_assign(d.view_mut(&mut x, mid.clone()), d.view(&y, mid))?,
            Elem::Scale(s) => d.scale(d.view_mut(&mut x, mid), s)?,
            Elem::AdamW(h) => {
                // params x, grads z, moments y (m) and w (v).
                let g = d.upload(&self.z)?;
                let mut v = d.upload(&self.w)?;
                d.adamw(
                    h,
                    d.view_mut(&mut x, mid.clone()),
                    d.view(&g, mid.clone()),
                    d.view_mut(&mut y, mid.clone()),
                    d.view_mut(&mut v, mid),
                )?;
                return Ok(vec![("params", get(d, &x)?), ("m", get(d, &y)?), ("v", get(d, &v)?)]);
            }
            Elem::SumSquares => {
                let s = d.sum_squares(d.view(&x, mid))?;
                return Ok(vec![("sum", vec![s as f32])]);
            }
            Elem::Fill(v) => d.fill(d.view_mut(&mut x, mid), v)?,
            Elem::Copy => d.copy(d.view(&y, mid.clone()), d.view_mut(&mut x, mid))?,
            Elem::ViewMut2 => {
                // Two disjoint views, the second before the first: copy one into the other
                // through `as_ref`, then fill the source.
                let h = self.n / 2;
                let (a, b) = (PAD_LO + h..PAD_LO + 2 * h, PAD_LO..PAD_LO + h);
                let (ma, mb) = d.view_mut2(&mut x, a, b);
                d.copy(d.as_ref(&ma), mb)?;
                d.fill(ma, -2.5)?;
                let z = d.zeros(7)?;
                return Ok(vec![("x", get(d, &x)?), ("zeros", get(d, &z)?)]);
            }
        }
        Ok(vec![("x", get(d, &x)?)])
    }
}

/// Every op case, with fresh inputs from `seed`.
fn run_ops<B: Backend>(dev: &B, seed: u64, tol: Tolerances) -> Vec<Check> {
    let mut r = Draw { seed, stream: 0 };
    let mut out = Vec::new();

    // GEMM: the four transpose combinations with non-zero C (beta != 0), then batched strided
    // products laid out as attention uses them (heads interleaved in the rows of q and k).
    let (m, n, k) = (1023, 97, 389);
    for (label, ta, tb) in
        [("gemm_nn", false, false), ("gemm_nt", false, true), ("gemm_tn", true, false), ("gemm_tt", true, true)]
    {
        let op_a = if ta { Operand::t(m) } else { Operand::n(k) };
        let op_b = if tb { Operand::t(k) } else { Operand::n(n) };
        let c = GemmCase::new(&mut r, label, tol.gemm, GemmShape::plain(m, n, k), op_a, op_b, 0, 0.75, 0.5);
        check_case(&mut out, dev, &c);
    }
    let small = GemmCase::new(
        &mut r,
        "gemm_nt",
        tol.gemm,
        GemmShape::plain(37, 20, 7),
        Operand::n(7),
        Operand::t(7),
        11,
        1.0,
        1.0,
    );
    check_case(&mut out, dev, &small);
    // q [tq, H*D] x k^T per head: strided rows, batch stride D, C with a padded row stride.
    let (heads, d, tq, tk) = (3, 7, 37, 29);
    let s = GemmShape { m: tq, n: tk, k: d, batch: heads, ldc: tk + 2, batch_stride_c: tq * (tk + 2) + 1 };
    let qk = GemmCase::new(
        &mut r,
        "gemm_batched",
        tol.gemm,
        s,
        Operand { trans: false, ld: heads * d, batch_stride: d },
        Operand { trans: true, ld: heads * d, batch_stride: d },
        3,
        0.4,
        0.0,
    );
    check_case(&mut out, dev, &qk);
    let s = GemmShape { m: tk, n: d, k: tq, batch: heads, ldc: d, batch_stride_c: tk * d };
    let pv = GemmCase::new(
        &mut r,
        "gemm_batched",
        tol.gemm,
        s,
        Operand { trans: true, ld: tk, batch_stride: tq * tk },
        Operand { trans: false, ld: heads * d, batch_stride: d },
        0,
        1.0,
        1.0,
    );
    check_case(&mut out, dev, &pv);
    for (rows, cols) in [(1023, 389), (37, 1001)] {
        let c = AddBiasCase { rows, cols, y: r.normal(rows * cols, 1.0), bias: r.normal(cols, 1.0) };
        check_case(&mut out, dev, &c);
        let c = BiasGradCase { rows, cols, dy: r.normal(rows * cols, 1.0), dbias0: r.normal(cols, 1.0) };
        check_case(&mut out, dev, &c);
    }

    // Embeddings: 1023 ids (forward: assigned and accumulated); backward with many repeats.
    let (rows, dim) = (1001, 389);
    for accumulate in [false, true] {
        let c = EmbeddingCase {
            backward: false,
            accumulate,
            rows,
            dim,
            ids: r.ids(1023, rows),
            table: r.normal(rows * dim, 1.0),
            x: r.normal(1023 * dim, 1.0),
        };
        check_case(&mut out, dev, &c);
    }
    let c = EmbeddingCase {
        backward: true,
        accumulate: true,
        rows,
        dim,
        ids: r.ids(1023, 37),
        table: r.normal(rows * dim, 1.0),
        x: r.normal(1023 * dim, 1.0),
    };
    check_case(&mut out, dev, &c);

    // LayerNorm (rows with mean 3, so the variance needs care), narrow and wide rows.
    for (rows, c) in [(1023, 389), (37, 20)] {
        check_case(&mut out, dev, &LayerNormCase::new(&mut r, rows, c, false, false));
        check_case(&mut out, dev, &LayerNormCase::new(&mut r, rows, c, true, false));
        check_case(&mut out, dev, &LayerNormCase::new(&mut r, rows, c, true, true));
    }

    // Bias + GELU.
    for backward in [false, true] {
        let (rows, c) = (1023, 389);
        let g = GeluCase {
            backward,
            rows,
            c,
            pre: r.normal(rows * c, 2.0),
            bias: r.normal(c, 0.5),
            dout: r.normal(rows * c, 1.0),
            garbage: r.normal(rows * c, 5.0),
            dbias0: r.normal(c, 1.0),
        };
        check_case(&mut out, dev, &g);
    }

    // Attention: cross-attention shape with key padding (the third item fully masked), causal
    // self-attention, dropout on the probabilities (same seed, same mask by contract), and a
    // BERT-sized head dimension.
    let shape = |batch, heads, head_dim, tq, tk, causal, dropout: f32, seed| AttentionShape {
        batch,
        heads,
        head_dim,
        tq,
        tk,
        causal,
        dropout,
        seed,
    };
    let drop_seed = r.next();
    let cases: [(&str, AttentionShape, &[usize]); 4] = [
        ("attention_padded", shape(3, 3, 7, 37, 29, false, 0.0, 0), &[0, 10, 29]),
        ("attention_causal", shape(2, 3, 7, 130, 130, true, 0.0, 0), &[0, 17]),
        ("attention_dropout", shape(2, 3, 7, 67, 67, false, 0.1, drop_seed), &[3, 0]),
        ("attention_d64", shape(2, 2, 64, 131, 131, true, 0.1, drop_seed ^ 1), &[0, 5]),
    ];
    for (label, s, masked) in cases {
        check_case(&mut out, dev, &AttentionCase::new(&mut r, label, s, masked, false));
        check_case(&mut out, dev, &AttentionCase::new(&mut r, label, s, masked, true));
    }

    // Cross-entropy: ignored rows, label smoothing, with and without the gradient, and a
    // BERT-sized vocabulary.
    check_case(&mut out, dev, &CrossEntropyCase::new(&mut r, 37, 1001, 0.1, false));
    check_case(&mut out, dev, &CrossEntropyCase::new(&mut r, 37, 1001, 0.1, true));
    check_case(&mut out, dev, &CrossEntropyCase::new(&mut r, 37, 1001, 0.0, true));
    check_case(&mut out, dev, &CrossEntropyCase::new(&mut r, 7, 30522, 0.1, true));

    // Elementwise and memory ops.
    let n = 1023 * 389 + 7;
    let seed_d = r.next();
    let h1 = AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, step: 1 };
    let h7 = AdamW { step: 7, weight_decay: 0.0, ..h1 };
    for what in [
        Elem::DropoutForward { p: 0.1, seed: seed_d },
        Elem::DropoutBackward { p: 0.1, seed: seed_d },
        Elem::DropoutForward { p: 0.5, seed: seed_d ^ 3 },
        Elem::Add,
        Elem::AddAssign,
        Elem::Scale(0.37),
        Elem::AdamW(h1),
        Elem::AdamW(h7),
        Elem::SumSquares,
        Elem::Fill(1.25),
        Elem::Copy,
        Elem::ViewMut2,
    ] {
        check_case(&mut out, dev, &ElemCase::new(&mut r, what, n));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The model step.

/// AdamW runs in fp32 on every backend, from the same gradients.
const TOL_UPDATE: f64 = 1e-5;

fn tiny_config() -> ModelConfig {
    let v = serde_json::json!({
        "vocab_size": 97, "hidden_size": 20, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 37, "max_position_embeddings": 32, "type_vocab_size": 2,
        "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1
    });
    let c = BertConfig::from_value(&v, Path::new("selftest")).expect("static config");
    ModelConfig {
        encoder: c.clone(),
        decoder: c,
        tie_encoder_decoder: false,
        decoder_start_token_id: 2,
        pad_token_id: 0,
        eos_token_id: 3,
    }
}

fn model_step<B: Backend>(dev: &B, seed: u64, tols: Tolerances, out: &mut Vec<Check>) -> Result<(), String> {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let fam = "model";
    let cfg = tiny_config();
    let table = ParamTable::new(&cfg);
    let mut r = Draw { seed: rng::derive(seed, 0x5e1f), stream: 0 };
    let mut params = r.normal(table.storage_len, 0.3);
    for en in table.owned().filter(|en| en.name.ends_with("LayerNorm.weight")) {
        params[en.range()].iter_mut().for_each(|p| *p += 1.0);
    }
    // Three examples: full, source and target padding, more padding.
    let (bs, s, t) = (3, 11, 9);
    let (src_pad, tgt_pad) = ([0, 4, 7], [0, 3, 5]);
    let words = r.ids(bs * (s + 2 * t), 93);
    let word = |i: usize| 4 + words[i];
    let src: Vec<i32> = (0..bs * s).map(|i| if i % s + src_pad[i / s] >= s { 0 } else { word(i) }).collect();
    let mask: Vec<f32> = src.iter().map(|&x| if x == 0 { 0.0 } else { 1.0 }).collect();
    let real_t = |i: usize| i % t + tgt_pad[i / t] < t;
    let labels: Vec<i32> = (0..bs * t).map(|i| if real_t(i) { word(bs * s + i) } else { IGNORE_INDEX }).collect();
    let dec: Vec<i32> = (0..bs * t)
        .map(|i| {
            if i % t == 0 {
                2
            } else if real_t(i) {
                labels[i - 1]
            } else {
                0
            }
        })
        .collect();
    let shape = format!("batch {bs} src {s} tgt {t}");

    let cpu = Cpu;
    let mut ref_net = Bert2Bert::new(&cpu, cfg.clone(), table.clone(), &params).map_err(|x| e(&x))?;
    let mut dev_net = Bert2Bert::new(dev, cfg.clone(), table.clone(), &params).map_err(|x| e(&x))?;
    let x_ref = Inputs::new(&cpu, bs, s, t, &src, &mask, &dec, &labels).map_err(|x| e(&x))?;
    let x_dev = Inputs::new(dev, bs, s, t, &src, &mask, &dec, &labels).map_err(|x| e(&x))?;
    let tokens = x_ref.label_tokens();
    let opts = PassOptions {
        train: true,
        seed: rng::derive(seed, 7),
        label_smoothing: 0.1,
        grad_scale: Some(1.0 / tokens as f32),
    };
    ref_net.zero_grads(&cpu).map_err(|x| e(&x))?;
    dev_net.zero_grads(dev).map_err(|x| e(&x))?;
    let l_ref = ref_net.pass(&cpu, &x_ref, opts).map_err(|x| e(&x))?;
    let l_dev = dev_net.pass(dev, &x_dev, opts).map_err(|x| e(&x))?;
    out.push(Check::compare(
        fam,
        "loss (per token)".into(),
        format!("{shape}, {tokens} tokens, ls 0.1"),
        tols.loss,
        &l_ref.token_loss,
        &l_dev.token_loss,
        0.0,
    ));

    // Every gradient by name. Attention key biases have a zero true gradient (rounding noise on
    // both sides): the denominator has a floor of 1e-3 of the largest gradient anywhere.
    let g_ref = ref_net.grads.clone();
    let g_dev = dev.download(dev.view(&dev_net.grads, 0..table.storage_len)).map_err(|x| e(&x))?;
    let global = g_ref.iter().fold(0.0f64, |m, &g| m.max((g as f64).abs()));
    for en in table.owned() {
        let rg = en.range();
        let shape = format!("{:?}", en.shape);
        let tol = if en.frozen { 0.0 } else { tols.grad };
        out.push(Check::compare(
            fam,
            format!("grad {}", en.name),
            shape,
            tol,
            &g_ref[rg.clone()],
            &g_dev[rg],
            1e-3 * global,
        ));
    }

    // Global norm and clipping (to 1.0) on each side's own gradients.
    let n_ref = clip_grad_norm(&cpu, &mut ref_net.grads, 1.0).map_err(|x| e(&x))?;
    let n_dev = clip_grad_norm(dev, &mut dev_net.grads, 1.0).map_err(|x| e(&x))?;
    out.push(Check::compare(fam, "grad norm (clip 1.0)".into(), String::new(), tols.loss, &[n_ref], &[n_dev], 0.0));

    // AdamW over the whole table (no decay on biases and LayerNorm, the pooler skipped). Adam
    // turns gradient rounding noise into a full `lr`-sized step where a gradient is near zero,
    // so the oracle updates from the device's (clipped) gradients: the same inputs on both.
    ref_net.grads = dev.download(dev.view(&dev_net.grads, 0..table.storage_len)).map_err(|x| e(&x))?;
    let mut o_ref = Optimizer::new(&cpu, &table, AdamWConfig::default()).map_err(|x| e(&x))?;
    let mut o_dev = Optimizer::new(dev, &table, AdamWConfig::default()).map_err(|x| e(&x))?;
    o_ref.update(&cpu, &table, &mut ref_net.params, &ref_net.grads, 1e-3).map_err(|x| e(&x))?;
    o_dev.update(dev, &table, &mut dev_net.params, &dev_net.grads, 1e-3).map_err(|x| e(&x))?;
    let whole = |buf: &B::Buf| dev.download(dev.view(buf, 0..table.storage_len));
    for (what, r_buf, d_buf) in
        [("params", &ref_net.params, &dev_net.params), ("adam m", &o_ref.m, &o_dev.m), ("adam v", &o_ref.v, &o_dev.v)]
    {
        let d_host = whole(d_buf).map_err(|x| e(&x))?;
        // Name the worst tensor.
        let worst = table
            .owned()
            .map(|en| (errors(&r_buf[en.range()], &d_host[en.range()], 0.0).0, en.name.as_str()))
            .fold((0.0, ""), |a, b| if b.0 > a.0 { b } else { a });
        let mut c = Check::compare(fam, format!("adamw {what}"), String::new(), TOL_UPDATE, r_buf, &d_host, 0.0);
        c.shape = if worst.0 > 0.0 { format!("worst {}", worst.1) } else { format!("{} values", table.storage_len) };
        out.push(c);
    }
    // Untouched by AdamW: the frozen pooler.
    let frozen_ok = table.owned().filter(|en| en.frozen).all(|en| {
        let (rg, d_host) = (en.range(), whole(&dev_net.params).unwrap_or_default());
        d_host.get(rg.clone()).is_some_and(|p| p == &params[rg])
    });
    out.push(Check {
        family: fam,
        op: "adamw skips frozen".into(),
        shape: "encoder.pooler.*".into(),
        max_abs: 0.0,
        rel: if frozen_ok { 0.0 } else { f64::INFINITY },
        tol: 0.0,
        pass: frozen_ok,
        error: None,
    });

    // A second step from the updated weights (the workspace is reused): the loss again.
    let opts2 = PassOptions { seed: opts.seed ^ 1, ..opts };
    ref_net.zero_grads(&cpu).map_err(|x| e(&x))?;
    dev_net.zero_grads(dev).map_err(|x| e(&x))?;
    let l_ref = ref_net.pass(&cpu, &x_ref, opts2).map_err(|x| e(&x))?;
    let l_dev = dev_net.pass(dev, &x_dev, opts2).map_err(|x| e(&x))?;
    out.push(Check::compare(
        fam,
        "loss step 2 (per token)".into(),
        "after the update".into(),
        tols.loss,
        &l_ref.token_loss,
        &l_dev.token_loss,
        0.0,
    ));
    Ok(())
}

/// Every op check, then the model step, of `dev` against the CPU oracle.
pub fn run_checks<B: Backend>(dev: &B, seed: u64, tol: Tolerances) -> Vec<Check> {
    let mut out = run_ops(dev, seed, tol);
    match catch_unwind(AssertUnwindSafe(|| model_step(dev, seed, tol, &mut out))) {
        Ok(Ok(())) => {}
        Ok(Err(msg)) => out.push(Check::failed("model", "training step".into(), String::new(), 0.0, msg)),
        Err(p) => out.push(Check::failed("model", "training step".into(), String::new(), 0.0, panic_text(p))),
    }
    out
}

fn fmt_num(x: f64) -> String {
    if x.is_finite() { format!("{x:.2e}") } else { "inf".into() }
}

pub fn run(a: Args) -> CliResult {
    let bf16 = a.precision == "bf16";
    match a.device {
        Device::Cpu => run_on(&Cpu, &a),
        // Exact fp32 GEMMs by default, so the comparison is at fp32 tolerances.
        Device::Cuda(i) => {
            let precision = if bf16 { GemmPrecision::Bf16 } else { GemmPrecision::Fp32 };
            run_on(&device::open_cuda(i, precision)?, &a)
        }
    }
}

fn run_on<B: Backend>(dev: &B, a: &Args) -> CliResult {
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    });
    let name = dev.name();
    if !a.json {
        println!(
            "selftest: {name} against the cpu fp32 oracle at {} tolerances, seed {seed} (rerun with --seed {seed})",
            a.precision
        );
        println!("model step: hidden 20, 4 heads, 2+2 layers, intermediate 37, vocab 97, dropout 0.1");
    }
    let t0 = std::time::Instant::now();
    let tol = Tolerances::new(a.precision == "bf16");
    let checks = run_checks(dev, seed, tol);
    let secs = t0.elapsed().as_secs_f64();
    let failed = checks.iter().filter(|c| !c.pass).count();
    if a.json {
        let out = serde_json::json!({
            "device": name, "reference": Cpu.name(), "seed": seed, "precision": a.precision, "checks": checks,
            "passed": failed == 0, "failures": failed, "seconds": secs,
        });
        println!("{out}");
    } else {
        let w_op = checks.iter().map(|c| c.op.len()).max().unwrap_or(2).max(2);
        let w_shape = checks.iter().map(|c| c.shape.len()).max().unwrap_or(5).max(5);
        println!(
            "{:<15} {:<w_op$} {:<w_shape$} {:>9} {:>9} {:>9}  result",
            "family", "op", "shape", "max_abs", "rel", "tol"
        );
        for c in &checks {
            let res = if c.pass { "PASS" } else { "FAIL" };
            println!(
                "{:<15} {:<w_op$} {:<w_shape$} {:>9} {:>9} {:>9}  {res}{}",
                c.family,
                c.op,
                c.shape,
                fmt_num(c.max_abs),
                fmt_num(c.rel),
                fmt_num(c.tol),
                c.error.as_ref().map(|e| format!("  ({e})")).unwrap_or_default()
            );
        }
        println!("{} checks, {failed} failed, {secs:.1}s (seed {seed})", checks.len());
    }
    if failed > 0 {
        return Err(CliError {
            code: 1,
            error: anyhow::anyhow!("selftest: {failed} of {} checks failed on {name} (seed {seed})", checks.len()),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_relative_to_the_largest_reference_value() {
        assert_eq!(errors(&[1.0, -4.0], &[1.0, -4.0], 0.0), (0.0, 0.0));
        let (abs, rel) = errors(&[1.0, -4.0], &[1.5, -4.0], 0.0);
        assert_eq!((abs, rel), (0.5, 0.125));
        // A zero reference: any difference is infinitely wrong, unless a floor is given.
        assert_eq!(errors(&[0.0], &[1e-9], 0.0).1, f64::INFINITY);
        assert!((errors(&[0.0], &[1e-9], 1e-3).1 - 1e-6).abs() < 1e-12);
        // NaN, infinity and length mismatches fail.
        assert_eq!(errors(&[1.0], &[f32::NAN], 0.0).1, f64::INFINITY);
        assert_eq!(errors(&[1.0], &[f32::INFINITY], 0.0).1, f64::INFINITY);
        assert_eq!(errors(&[1.0], &[1.0, 2.0], 0.0).1, f64::INFINITY);
    }

    #[test]
    fn operand_span_covers_strided_batches() {
        // 3 heads of a [37, 21] matrix, each 37x7, batch stride 7.
        let op = Operand { trans: false, ld: 21, batch_stride: 7 };
        assert_eq!(operand_span(op, 37, 7, 3), 2 * 7 + 36 * 21 + 7);
        // Read transposed: a 7x37 operand stored as 37 rows of 7.
        assert_eq!(operand_span(Operand::t(7), 7, 37, 1), 36 * 7 + 7);
    }
}
