//! The CUDA backend's fused (flash) attention on the virtual GPU against the CPU oracle, with
//! fp32 GEMMs (the SIMT kernels): self-attention of 37 and 129 tokens, cross-attention 37 x 53,
//! head dims 64 and 32 (and an odd one), padding with fully padded rows, causal masks, dropout,
//! q/k/v read from strided views (a fused QKV layout, whose other columns must keep their
//! values), dq, dk and dv assigned over garbage.
//! Every case runs twice: with fp32 activations (exact to fp32), and with bf16 activation
//! storage (q, k, v, out, dout, dq, dk, dv; the kernels' `_bf16` entries), there against the
//! oracle on the same bf16-rounded inputs.
//! Needs NVRTC; without it the tests skip, unless `B2B_REQUIRE_NVRTC=1`.

use std::sync::OnceLock;

use kernels::cuda::{Cuda, GemmPrecision};
use kernels::{AttentionOps, AttentionShape, Cpu, Dtype, KernelError, Memory, rng};

/// fp32 storage: the SIMT kernels compute in fp32 as the CPU does, in another order.
const FP32_TOL: f64 = 2e-5;

/// bf16 storage, relative to each output's largest magnitude. The device rounds out, dq, dk and
/// dv to bf16 once (up to 2^-8 = 3.9e-3 of an element: bf16 keeps 8 significant bits), and its
/// backward reads the rounded out for Dsum = dout . out where the oracle uses its exact
/// probabilities; dq = scale sum_j P (dP - Dsum) k can cancel, most in the uniform rows of a
/// fully padded item. Measured worst (`BF16_MEASURED` lines) over these cases with 21 seed sets:
/// out 3.2e-3, dk 6.3e-3, dv 3.7e-3, dq 8.3e-3 (d7); a missed rounding or a wrong dtype is off
/// by order 1.
const BF16_STORAGE_TOL: f64 = 1.5e-2;

/// One virtual GPU per activation storage for every test of this file (the tests run on
/// threads of one process).
fn device(storage: Dtype) -> Option<&'static Cuda> {
    static DEV: [OnceLock<Option<Cuda>>; 2] = [OnceLock::new(), OnceLock::new()];
    DEV[(storage == Dtype::Bf16) as usize]
        .get_or_init(|| {
            if !kernels::cuda::compile::nvrtc_or_skip() {
                return None;
            }
            cuda_emu::install().expect("starting the virtual GPU");
            let dev = Cuda::new(0, GemmPrecision::Fp32).expect("the virtual GPU's CUDA backend");
            dev.set_activation_dtype(storage);
            Some(dev)
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

    /// Every activation rounded to bf16 (the mask is 0 or 1 already).
    fn rounded(self) -> Self {
        let r = |x: Vec<f32>| x.into_iter().map(kernels::round_bf16).collect();
        Inputs {
            q: r(self.q),
            k: r(self.k),
            v: r(self.v),
            dout: r(self.dout),
            dq0: r(self.dq0),
            dk0: r(self.dk0),
            dv0: r(self.dv0),
            mask: self.mask,
        }
    }
}

fn all<'a, B: Memory>(b: &'a B, buf: &'a B::Buf) -> B::Ref<'a> {
    b.view(buf, 0..b.len(buf))
}

/// `host` in a buffer of the backend's activation dtype.
fn act<B: Memory>(b: &B, host: &[f32]) -> kernels::Result<B::Buf> {
    let mut buf = b.activations(host.len())?;
    let staged = b.upload(host)?;
    let n = host.len();
    b.copy(b.view(&staged, 0..n), b.view_mut(&mut buf, 0..n))?;
    Ok(buf)
}

/// Forward then backward on any backend, from the same inputs: activations at the backend's
/// activation dtype, the mask and saved state fp32.
fn run<B: AttentionOps>(b: &B, s: AttentionShape, x: &Inputs) -> kernels::Result<Outputs> {
    let (q, k, v, mask, dout) = (act(b, &x.q)?, act(b, &x.k)?, act(b, &x.v)?, b.upload(&x.mask)?, act(b, &x.dout)?);
    let mut saved = b.upload(&vec![f32::NAN; b.attention_saved_len(&s)])?;
    let mut out = act(b, &vec![f32::NAN; s.out_len()])?;
    let (n_saved, n_out) = (b.len(&saved), b.len(&out));
    let (saved_w, out_w) = (b.view_mut(&mut saved, 0..n_saved), b.view_mut(&mut out, 0..n_out));
    b.attention_forward(s, all(b, &q), all(b, &k), all(b, &v), all(b, &mask), saved_w, out_w)?;
    let (mut dq, mut dk, mut dv) = (act(b, &x.dq0)?, act(b, &x.dk0)?, act(b, &x.dv0)?);
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

/// Runs the CPU and the virtual GPU with `storage` activations on `x` (rounded to bf16 first
/// for bf16 storage, for both) and compares every output (relative to the output's largest
/// magnitude): within FP32_TOL, or BF16_STORAGE_TOL and visibly rounded.
fn compare(label: &str, s: AttentionShape, x: Inputs, storage: Dtype) {
    let Some(dev) = device(storage) else { return };
    let (x, tol) = if storage == Dtype::Bf16 { (x.rounded(), BF16_STORAGE_TOL) } else { (x, FP32_TOL) };
    let want = run(&Cpu, s, &x).expect("cpu");
    let got = run(dev, s, &x).expect("virtual GPU");
    let mut worst = Vec::new();
    for (name, w, g) in
        [("out", &want.out, &got.out), ("dq", &want.dq, &got.dq), ("dk", &want.dk, &got.dk), ("dv", &want.dv, &got.dv)]
    {
        let (abs, rel) = conformance::errors(w, g, 1e-3);
        assert!(rel <= tol, "{label} {storage:?} {name}: max abs {abs:.3e}, rel {rel:.3e} ({s:?})");
        worst.push(format!("{name} {rel:.2e}"));
        if storage == Dtype::Bf16 {
            assert!(g.iter().all(|&v| v == kernels::round_bf16(v)), "{label} {name}: not bf16 values");
        }
    }
    if storage == Dtype::Bf16 {
        eprintln!("BF16_MEASURED {label}: {}", worst.join(", "));
    }
    // The garbage in dk and dq was replaced.
    assert!(got.dk.iter().zip(&x.dk0).any(|(a, b)| a != b), "{label}: dk unchanged");
    assert!(got.dq.iter().zip(&x.dq0).any(|(a, b)| a != b), "{label}: dq unchanged");
}

/// `compare` on fresh inputs, with fp32 and with bf16 activation storage.
fn check(label: &str, s: AttentionShape, padded: &[usize], seed: u64) {
    for storage in [Dtype::F32, Dtype::Bf16] {
        compare(label, s, Inputs::draw(&s, padded, seed), storage);
    }
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
    for storage in [Dtype::F32, Dtype::Bf16] {
        let mut x = Inputs::draw(&s, &[0, 0], 400);
        x.mask[..5].fill(0.0);
        x.mask[37..37 + 21].fill(0.0);
        compare("unseen", s, x, storage);
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
    let Some(dev) = device(Dtype::F32) else { return };
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

#[test]
fn activations_of_mixed_dtypes_and_a_bf16_lse_are_errors() {
    let Some(dev) = device(Dtype::Bf16) else { return };
    let s = shape(1, 2, 32, 5, 5);
    let x = Inputs::draw(&s, &[0], 902).rounded();
    let (q, k, v, mask) =
        (act(dev, &x.q).unwrap(), act(dev, &x.k).unwrap(), act(dev, &x.v).unwrap(), dev.upload(&x.mask).unwrap());
    let k_fp32 = dev.upload(&x.k).unwrap();
    let forward = |k: &<Cuda as Memory>::Buf, lse_bf16: bool| {
        let n = dev.attention_saved_len(&s);
        let mut lse = if lse_bf16 { dev.activations(n) } else { dev.zeros(n) }.unwrap();
        let mut out = dev.activations(s.out_len()).unwrap();
        let (lse_w, out_w) = (dev.view_mut(&mut lse, 0..n), dev.view_mut(&mut out, 0..s.out_len()));
        dev.attention_forward(s, all(dev, &q), all(dev, k), all(dev, &v), all(dev, &mask), lse_w, out_w)
    };
    forward(&k, false).expect("bf16 activations, fp32 lse and mask");
    match forward(&k_fp32, false) {
        Err(KernelError::Shape { op, what }) => assert!(op == "attention_forward" && what.contains("mixed"), "{what}"),
        other => panic!("fp32 k among bf16 activations: {other:?}"),
    }
    match forward(&k, true) {
        Err(KernelError::Shape { what, .. }) => assert!(what.contains("fp32"), "{what}"),
        other => panic!("bf16 lse: {other:?}"),
    }
}
