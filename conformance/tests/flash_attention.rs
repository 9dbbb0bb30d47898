//! The CUDA backend's fused (flash) attention on the virtual GPU against the CPU oracle, in fp32:
//! self-attention of 37 and 129 tokens, cross-attention 37 x 53, head dims 64 and 32 (and an odd
//! one), padding with fully padded rows, causal masks, dropout, q/k/v read from strided views (a
//! fused QKV layout), dk and dv accumulating onto nonzero buffers, dq assigned over garbage.
//! Needs NVRTC; without it the tests skip, unless `B2B_REQUIRE_NVRTC=1`.

use std::sync::OnceLock;

use kernels::cuda::{Cuda, GemmPrecision};
use kernels::{AttentionOps, AttentionShape, Cpu, KernelError, Memory, rng};

/// One virtual GPU for every test of this file (the tests run on threads of one process).
fn device() -> Option<&'static Cuda> {
    static DEV: OnceLock<Option<Cuda>> = OnceLock::new();
    DEV.get_or_init(|| {
        if !kernels::cuda::compile::nvrtc_or_skip() {
            return None;
        }
        cuda_emu::install().expect("starting the virtual GPU");
        Some(Cuda::new(0, GemmPrecision::Fp32).expect("the virtual GPU's CUDA backend"))
    })
    .as_ref()
}

fn normal(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    (0..n as u64).map(|i| rng::normal(seed, i) * scale).collect()
}

/// Batch item b's last `padded[b]` keys are padding.
fn key_mask(s: &AttentionShape, padded: &[usize]) -> Vec<f32> {
    (0..s.batch * s.tk).map(|i| if i % s.tk + padded[i / s.tk] >= s.tk { 0.0 } else { 1.0 }).collect()
}

struct Outputs {
    out: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

struct Inputs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    mask: Vec<f32>,
    dout: Vec<f32>,
    dq0: Vec<f32>,
    dk0: Vec<f32>,
    dv0: Vec<f32>,
}

impl Inputs {
    fn draw(s: &AttentionShape, padded: &[usize], seed: u64) -> Self {
        let (nq, nkv, nout) = (s.q_len(), s.kv_len(), s.out_len());
        Inputs {
            q: normal(nq, seed, 1.5),
            k: normal(nkv, seed + 1, 1.5),
            v: normal(nkv, seed + 2, 1.0),
            mask: key_mask(s, padded),
            dout: normal(nout, seed + 3, 1.0),
            dq0: normal(nq, seed + 4, 7.0),
            dk0: normal(nkv, seed + 5, 1.0),
            dv0: normal(nkv, seed + 6, 1.0),
        }
    }
}

fn all<'a, B: Memory>(b: &'a B, buf: &'a B::Buf) -> B::Ref<'a> {
    b.view(buf, 0..b.len(buf))
}

/// Forward then backward on any backend, from the same inputs.
fn run<B: AttentionOps>(b: &B, s: AttentionShape, x: &Inputs) -> kernels::Result<Outputs> {
    let (q, k, v, mask, dout) =
        (b.upload(&x.q)?, b.upload(&x.k)?, b.upload(&x.v)?, b.upload(&x.mask)?, b.upload(&x.dout)?);
    let mut saved = b.upload(&vec![f32::NAN; b.attention_saved_len(&s)])?;
    let mut out = b.upload(&vec![f32::NAN; s.out_len()])?;
    let (n_saved, n_out) = (b.len(&saved), b.len(&out));
    let (saved_w, out_w) = (b.view_mut(&mut saved, 0..n_saved), b.view_mut(&mut out, 0..n_out));
    b.attention_forward(s, all(b, &q), all(b, &k), all(b, &v), all(b, &mask), saved_w, out_w)?;
    let (mut dq, mut dk, mut dv) = (b.upload(&x.dq0)?, b.upload(&x.dk0)?, b.upload(&x.dv0)?);
    let (nq, nkv) = (x.dq0.len(), x.dk0.len());
    b.attention_backward(
        s,
        all(b, &dout),
        all(b, &q),
        all(b, &k),
        all(b, &v),
        all(b, &mask),
        all(b, &out),
        all(b, &saved),
        b.view_mut(&mut dq, 0..nq),
        b.view_mut(&mut dk, 0..nkv),
        b.view_mut(&mut dv, 0..nkv),
    )?;
    Ok(Outputs {
        out: b.download(all(b, &out))?,
        dq: b.download(all(b, &dq))?,
        dk: b.download(all(b, &dk))?,
        dv: b.download(all(b, &dv))?,
    })
}

/// Runs the CPU and the virtual GPU on fresh inputs and compares every output at fp32
/// tolerances (relative to the output's largest magnitude).
fn check(label: &str, s: AttentionShape, padded: &[usize], seed: u64) {
    let Some(dev) = device() else { return };
    let x = Inputs::draw(&s, padded, seed);
    let want = run(&Cpu, s, &x).expect("cpu");
    let got = run(dev, s, &x).expect("virtual GPU");
    for (name, w, g) in
        [("out", &want.out, &got.out), ("dq", &want.dq, &got.dq), ("dk", &want.dk, &got.dk), ("dv", &want.dv, &got.dv)]
    {
        let (abs, rel) = conformance::errors(w, g, 1e-3);
        assert!(rel <= 2e-5, "{label} {name}: max abs {abs:.3e}, rel {rel:.3e} ({s:?})");
    }
    // Accumulation really happened onto the nonzero buffers (and dq's garbage was replaced).
    assert!(got.dk.iter().zip(&x.dk0).any(|(a, b)| a != b), "{label}: dk unchanged");
    assert!(got.dq.iter().zip(&x.dq0).any(|(a, b)| a != b), "{label}: dq unchanged");
}

fn shape(b: usize, h: usize, d: usize, tq: usize, tk: usize) -> AttentionShape {
    AttentionShape::new(b, h, d, tq, tk)
}

#[test]
fn self_attention_37_tokens_head_dim_64_with_a_fully_padded_item() {
    check("self37", shape(3, 2, 64, 37, 37), &[0, 9, 37], 100);
}

#[test]
fn causal_self_attention_129_tokens_head_dim_32_with_dropout() {
    check("causal129", shape(2, 2, 32, 129, 129).with_causal(true).with_dropout(0.2, 0xD00D), &[3, 0], 200);
}

#[test]
fn cross_attention_37_by_53_with_padding_and_dropout() {
    check("cross37x53", shape(2, 3, 32, 37, 53).with_dropout(0.1, 77), &[53, 20], 300);
}

#[test]
fn causal_rows_whose_visible_keys_are_all_padding() {
    // Item 0's first 5 keys are padding: its first 5 causal rows see nothing and are uniform
    // over all 37 keys, future ones included, so the kernels must not skip the tiles after the
    // diagonal for them. Item 1's first 21: rows 16..21 of the second query tile likewise.
    let s = shape(2, 2, 64, 37, 37).with_causal(true);
    let Some(dev) = device() else { return };
    let mut x = Inputs::draw(&s, &[0, 0], 400);
    for j in 0..5 {
        x.mask[j] = 0.0;
    }
    for j in 0..21 {
        x.mask[37 + j] = 0.0;
    }
    let want = run(&Cpu, s, &x).expect("cpu");
    let got = run(dev, s, &x).expect("virtual GPU");
    for (name, w, g) in
        [("out", &want.out, &got.out), ("dq", &want.dq, &got.dq), ("dk", &want.dk, &got.dk), ("dv", &want.dv, &got.dv)]
    {
        let (abs, rel) = conformance::errors(w, g, 1e-3);
        assert!(rel <= 2e-5, "{name}: max abs {abs:.3e}, rel {rel:.3e}");
    }
}

#[test]
fn strided_views_of_a_fused_qkv_projection() {
    // q, k, v are the column blocks 0, C, 2C of [B, T, 3C]: views starting at those offsets.
    let s = shape(2, 2, 32, 37, 37).with_causal(true).with_dropout(0.1, 5).with_strides(3 * 64, 3 * 64);
    check("fused-qkv", s, &[2, 11], 500);
    // Cross-attention with a k/v stride that is not a multiple of anything.
    let s = shape(2, 1, 64, 37, 53).with_strides(64 + 3, 2 * 64 + 1);
    check("odd-strides", s, &[0, 30], 600);
}

#[test]
fn an_odd_head_dim_and_a_single_query() {
    check("d7", shape(2, 3, 7, 37, 29), &[0, 29], 700);
    check("tq1", shape(3, 2, 64, 1, 129), &[5, 129, 0], 800);
}

#[test]
fn shapes_the_kernels_cannot_take_are_errors() {
    let Some(dev) = device() else { return };
    let s = shape(1, 1, 65, 3, 3);
    let x = Inputs::draw(&s, &[0], 900);
    match run(dev, s, &x) {
        Err(KernelError::Shape { op, what }) => {
            assert!(op == "attention_forward" && what.contains("head_dim"), "{what}")
        }
        other => panic!("head dim 65: {:?}", other.err()),
    }
    // A q view one element short.
    let s = shape(1, 2, 32, 5, 5).with_strides(96, 64);
    let mut x = Inputs::draw(&s, &[0], 901);
    x.q.pop();
    assert!(matches!(run(dev, s, &x), Err(KernelError::Shape { .. })));
}
