//! The CPU backend against the independent f64 reference (ops from the math, the model step by
//! finite differences) passes, on fresh inputs every run; and the harness catches a wrong op:
//! a CPU whose bias gradient is off by half fails that op's check and the model step's bias
//! gradients, and nothing else.

use std::ops::Range;

use conformance::{Check, Reference, Tolerances};
use kernels::{
    AdamW, AttentionOps, AttentionShape, Cpu, CrossEntropyOps, DropoutOps, EmbeddingOps, FlatSegments, GeluOps,
    GemmOps, GemmShape, LayerNormOps, Memory, Operand, OptimizerOps, ResidualNormOps, ResidualOps, Result,
};

fn clock_seed() -> u64 {
    let seed =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1);
    eprintln!("seed {seed}");
    seed
}

fn failures(checks: &[Check]) -> Vec<&Check> {
    checks.iter().filter(|c| !c.pass).collect()
}

#[test]
fn cpu_matches_the_f64_reference() {
    let seed = clock_seed();
    let checks = conformance::run(&Cpu, Reference::F64, seed, Tolerances::new(false));
    assert!(failures(&checks).is_empty(), "seed {seed}: {:#?}", failures(&checks));
    // Not zero by construction: the fp32 CPU differs from the f64 reference somewhere.
    assert!(checks.iter().any(|c| c.rel > 0.0), "every error is exactly zero: nothing was compared");
    let has = |op: &str| checks.iter().any(|c| c.op.starts_with(op));
    for op in ["gemm_tt", "attention_d64.dq", "layernorm_backward+=.dx", "cross_entropy+grad.dlogits", "adamw.v"] {
        assert!(has(op), "no {op} check");
    }
    // The model step: every tensor's gradient by finite differences, the loss from the logits.
    let grads = checks.iter().filter(|c| c.family == "model" && c.op.starts_with("grad ")).count();
    assert!(grads > 50, "only {grads} gradient checks");
    assert!(checks.iter().any(|c| c.op == "grad decoder.bert.encoder.layer.1.crossattention.self.key.weight"));
    assert!(checks.iter().any(|c| c.op == "loss step 2 (per token)"));
}

#[test]
fn a_wrong_bias_gradient_fails_its_op_and_the_model_step() {
    let seed = clock_seed();
    let checks = conformance::run(&BiasGradOffByHalf, Reference::F64, seed, Tolerances::new(false));
    let failed = failures(&checks);
    assert!(failed.iter().any(|c| c.op == "bias_grad"), "bias_grad passed: {failed:#?}");
    // The fused linear backward's default is built on bias_grad, so it fails with it.
    assert!(failed.iter().any(|c| c.op == "gemm_bias_grad.dbias"), "gemm_bias_grad passed: {failed:#?}");
    assert!(
        failed.iter().any(|c| c.family == "model" && c.op.starts_with("grad ") && c.op.ends_with(".bias")),
        "no model bias gradient failed: {failed:#?}"
    );
    // Only what depends on the bias gradient fails: ops, losses and the update from the
    // backend's own gradients still pass.
    for c in &failed {
        let bias = c.op == "bias_grad"
            || c.op == "gemm_bias_grad.dbias"
            || (c.op.starts_with("grad ") && c.op.ends_with(".bias"));
        assert!(bias, "unrelated check failed: {c:#?}");
    }
}

/// The CPU, but `bias_grad` adds 1.5 times the column sums instead of once.
struct BiasGradOffByHalf;

impl Memory for BiasGradOffByHalf {
    type Buf = Vec<f32>;
    type Ref<'a> = &'a [f32];
    type Mut<'a> = &'a mut [f32];
    type Ids = Vec<i32>;
    fn name(&self) -> String {
        "cpu with a wrong bias_grad".into()
    }
    fn zeros(&self, n: usize) -> Result<Vec<f32>> {
        Cpu.zeros(n)
    }
    fn upload(&self, host: &[f32]) -> Result<Vec<f32>> {
        Cpu.upload(host)
    }
    fn download(&self, view: &[f32]) -> Result<Vec<f32>> {
        Cpu.download(view)
    }
    fn upload_ids(&self, host: &[i32]) -> Result<Vec<i32>> {
        Cpu.upload_ids(host)
    }
    fn len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }
    fn view<'a>(&self, buf: &'a Vec<f32>, range: Range<usize>) -> &'a [f32] {
        Cpu.view(buf, range)
    }
    fn view_mut<'a>(&self, buf: &'a mut Vec<f32>, range: Range<usize>) -> &'a mut [f32] {
        Cpu.view_mut(buf, range)
    }
    fn view_mut2<'a>(&self, buf: &'a mut Vec<f32>, a: Range<usize>, b: Range<usize>) -> (&'a mut [f32], &'a mut [f32]) {
        Cpu.view_mut2(buf, a, b)
    }
    fn as_ref<'a>(&self, m: &'a &mut [f32]) -> &'a [f32] {
        m
    }
    fn reborrow<'a>(&self, m: &'a mut &mut [f32]) -> &'a mut [f32] {
        m
    }
    fn fill(&self, dst: &mut [f32], value: f32) -> Result<()> {
        Cpu.fill(dst, value)
    }
    fn copy(&self, src: &[f32], dst: &mut [f32]) -> Result<()> {
        Cpu.copy(src, dst)
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}

impl GemmOps for BiasGradOffByHalf {
    fn gemm(
        &self,
        s: GemmShape,
        alpha: f32,
        a: &[f32],
        op_a: Operand,
        b: &[f32],
        op_b: Operand,
        beta: f32,
        c: &mut [f32],
    ) -> Result<()> {
        Cpu.gemm(s, alpha, a, op_a, b, op_b, beta, c)
    }
    fn add_bias(&self, y: &mut [f32], bias: &[f32], cols: usize) -> Result<()> {
        Cpu.add_bias(y, bias, cols)
    }
    fn bias_grad(&self, dy: &[f32], dbias: &mut [f32], cols: usize) -> Result<()> {
        let mut sums = vec![0.0; dbias.len()];
        Cpu.bias_grad(dy, &mut sums, cols)?;
        dbias.iter_mut().zip(sums).for_each(|(d, s)| *d += 1.5 * s);
        Ok(())
    }
}

impl EmbeddingOps for BiasGradOffByHalf {
    fn embedding_forward(&self, ids: &Vec<i32>, t: &[f32], dim: usize, out: &mut [f32], acc: bool) -> Result<()> {
        Cpu.embedding_forward(ids, t, dim, out, acc)
    }
    fn embedding_backward(&self, ids: &Vec<i32>, dout: &[f32], dim: usize, dtable: &mut [f32]) -> Result<()> {
        Cpu.embedding_backward(ids, dout, dim, dtable)
    }
}

impl LayerNormOps for BiasGradOffByHalf {
    fn layernorm_forward(
        &self,
        x: &[f32],
        g: &[f32],
        b: &[f32],
        eps: f32,
        out: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
    ) -> Result<()> {
        Cpu.layernorm_forward(x, g, b, eps, out, mean, rstd)
    }
    fn layernorm_backward(
        &self,
        dout: &[f32],
        x: &[f32],
        g: &[f32],
        mean: &[f32],
        rstd: &[f32],
        dx: &mut [f32],
        acc: bool,
        dg: &mut [f32],
        db: &mut [f32],
    ) -> Result<()> {
        Cpu.layernorm_backward(dout, x, g, mean, rstd, dx, acc, dg, db)
    }
}

impl ResidualNormOps for BiasGradOffByHalf {
    fn residual_norm_forward(
        &self,
        sum: &mut [f32],
        skip: &[f32],
        g: &[f32],
        b: &[f32],
        eps: f32,
        p: f32,
        seed: u64,
        out: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
    ) -> Result<()> {
        Cpu.residual_norm_forward(sum, skip, g, b, eps, p, seed, out, mean, rstd)
    }
    fn residual_norm_backward(
        &self,
        dout: &[f32],
        sum: &[f32],
        g: &[f32],
        mean: &[f32],
        rstd: &[f32],
        p: f32,
        seed: u64,
        d_skip: &mut [f32],
        acc: bool,
        d_x: &mut [f32],
        dg: &mut [f32],
        db: &mut [f32],
    ) -> Result<()> {
        Cpu.residual_norm_backward(dout, sum, g, mean, rstd, p, seed, d_skip, acc, d_x, dg, db)
    }
}

impl GeluOps for BiasGradOffByHalf {
    fn bias_gelu_forward(&self, pre: &mut [f32], bias: &[f32], out: &mut [f32]) -> Result<()> {
        Cpu.bias_gelu_forward(pre, bias, out)
    }
    fn bias_gelu_backward(&self, pre: &[f32], dout: &[f32], dpre: &mut [f32], dbias: &mut [f32]) -> Result<()> {
        Cpu.bias_gelu_backward(pre, dout, dpre, dbias)
    }
    fn gelu_forward(&self, pre: &[f32], out: &mut [f32]) -> Result<()> {
        Cpu.gelu_forward(pre, out)
    }
    fn gelu_backward(&self, pre: &[f32], dout: &[f32], dpre: &mut [f32]) -> Result<()> {
        Cpu.gelu_backward(pre, dout, dpre)
    }
}

impl AttentionOps for BiasGradOffByHalf {
    fn attention_saved_len(&self, s: &AttentionShape) -> usize {
        Cpu.attention_saved_len(s)
    }
    fn attention_forward(
        &self,
        s: AttentionShape,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        mask: &[f32],
        probs: &mut [f32],
        out: &mut [f32],
    ) -> Result<()> {
        Cpu.attention_forward(s, q, k, v, mask, probs, out)
    }
    fn attention_backward(
        &self,
        s: AttentionShape,
        dout: &[f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        mask: &[f32],
        out: &[f32],
        saved: &[f32],
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
    ) -> Result<()> {
        Cpu.attention_backward(s, dout, q, k, v, mask, out, saved, dq, dk, dv)
    }
}

impl CrossEntropyOps for BiasGradOffByHalf {
    fn cross_entropy(
        &self,
        logits: &mut [f32],
        labels: &Vec<i32>,
        first_label: usize,
        vocab: usize,
        ls: f32,
        grad_scale: Option<f32>,
        losses: &mut [f32],
    ) -> Result<()> {
        Cpu.cross_entropy(logits, labels, first_label, vocab, ls, grad_scale, losses)
    }
}

impl DropoutOps for BiasGradOffByHalf {
    fn dropout_forward(&self, x: &mut [f32], p: f32, seed: u64) -> Result<()> {
        Cpu.dropout_forward(x, p, seed)
    }
    fn dropout_backward(&self, dx: &mut [f32], p: f32, seed: u64) -> Result<()> {
        Cpu.dropout_backward(dx, p, seed)
    }
}

impl ResidualOps for BiasGradOffByHalf {
    fn add(&self, a: &[f32], b: &[f32], out: &mut [f32]) -> Result<()> {
        Cpu.add(a, b, out)
    }
    fn add_assign(&self, dst: &mut [f32], src: &[f32]) -> Result<()> {
        Cpu.add_assign(dst, src)
    }
    fn scale(&self, x: &mut [f32], s: f32) -> Result<()> {
        Cpu.scale(x, s)
    }
}

impl OptimizerOps for BiasGradOffByHalf {
    fn adamw(&self, h: AdamW, params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32]) -> Result<()> {
        Cpu.adamw(h, params, grads, m, v)
    }
    fn sum_squares(&self, x: &[f32]) -> Result<f64> {
        Cpu.sum_squares(x)
    }
    fn adamw_flat(
        &self,
        h: AdamW,
        max_norm: f32,
        segs: &FlatSegments<Vec<i32>>,
        params: &mut [f32],
        grads: &[f32],
        m: &mut [f32],
        v: &mut [f32],
        norm: &mut [f32],
        copy: Option<&mut [f32]>,
    ) -> Result<()> {
        Cpu.adamw_flat(h, max_norm, segs, params, grads, m, v, norm, copy)
    }
}
