//! The CUDA backend's tensor-core (bf16 mma, fp32 accumulate) fused attention on the virtual GPU
//! against the CPU fp32 oracle, at bf16 tolerances: the cases of flash_attention.rs (self 37 and
//! 129 tokens, cross 37 x 53, head dims 32 and 64, padding with fully padded rows, causal rows
//! that see only padding, dropout, strided fused-QKV views, dk/dv assigned over garbage), plus which
//! kernels each precision and head dim selects (fp32 keeps the SIMT kernels, exact to fp32).
//! Every case runs with fp32 and with bf16 activation storage (the `_bf16` entries, whose mma
//! fragments take the stored bits as they are), the latter against the oracle on the same
//! bf16-rounded inputs.
//! Needs NVRTC; without it the tests skip, unless `B2B_REQUIRE_NVRTC=1`.

use std::sync::{Mutex, MutexGuard, OnceLock};

use kernels::cuda::{Cuda, GemmPrecision};
use kernels::{AttentionOps, AttentionShape, Cpu, Dtype, Memory, rng};

/// Operands rounded to bf16 (8 significant bits) in dot products of up to 64 + 32 terms with
/// fp32 accumulation: a few 1e-3 of the output's scale; bounded at 2e-2. With bf16 storage the
/// inputs are bf16 already (their fragments are exact), the outputs are rounded to bf16 once and
/// backward reads the rounded out. Measured worst (`worst relative error` lines) over these
/// cases with 21 seed sets: 1.4e-2 with fp32 storage, 8.2e-3 with bf16 storage.
const BF16_TOL: f64 = 2e-2;

/// bf16 storage on the SIMT kernels (fp32 dot products): flash_attention.rs's bound (measured
/// worst 8.3e-3 there).
const BF16_STORAGE_TOL: f64 = 1.5e-2;

/// One virtual GPU (bf16 precision) for every test of this file, one test at a time: a test
/// may switch the precision or record the launches' costs, and `compare` sets the activation
/// storage for each run.
fn device() -> Option<MutexGuard<'static, Cuda>> {
    static DEV: OnceLock<Option<Mutex<Cuda>>> = OnceLock::new();
    let dev = DEV.get_or_init(|| {
        if !kernels::cuda::compile::nvrtc_or_skip() {
            return None;
        }
        cuda_emu::install().expect("starting the virtual GPU");
        Some(Mutex::new(Cuda::new(0, GemmPrecision::Bf16).expect("the virtual GPU's CUDA backend")))
    });
    dev.as_ref().map(|m| m.lock().unwrap_or_else(|p| p.into_inner()))
}

fn normal(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    (0..n as u64).map(|i| rng::normal(seed, i) * scale).collect()
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
    /// Batch item b's last `padded[b]` keys are padding.
    fn draw(s: &AttentionShape, padded: &[usize], seed: u64) -> Self {
        let (nq, nkv, nout) = (s.q_len(), s.kv_len(), s.out_len());
        let mask = (0..s.batch * s.tk).map(|i| if i % s.tk + padded[i / s.tk] >= s.tk { 0.0 } else { 1.0 }).collect();
        Inputs {
            q: normal(nq, seed, 1.5),
            k: normal(nkv, seed + 1, 1.5),
            v: normal(nkv, seed + 2, 1.0),
            mask,
            dout: normal(nout, seed + 3, 1.0),
            dq0: normal(nq, seed + 4, 7.0),
            dk0: normal(nkv, seed + 5, 1.0),
            dv0: normal(nkv, seed + 6, 1.0),
        }
    }

    /// Every activation rounded to bf16 (the mask is 0 or 1 already).
    fn rounded(&self) -> Self {
        let r = |x: &[f32]| x.iter().map(|&v| kernels::round_bf16(v)).collect();
        Inputs {
            q: r(&self.q),
            k: r(&self.k),
            v: r(&self.v),
            mask: self.mask.clone(),
            dout: r(&self.dout),
            dq0: r(&self.dq0),
            dk0: r(&self.dk0),
            dv0: r(&self.dv0),
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

/// Forward then backward on any backend (activations at its activation dtype, mask and saved
/// state fp32): out, dq, dk, dv.
fn run<B: AttentionOps>(b: &B, s: AttentionShape, x: &Inputs) -> kernels::Result<[Vec<f32>; 4]> {
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
    Ok([b.download(all(b, &out))?, b.download(all(b, &dq))?, b.download(all(b, &dk))?, b.download(all(b, &dv))?])
}

/// Runs the CPU and the virtual GPU (activations stored as `storage`) on the same inputs
/// (rounded to bf16 first for bf16 storage), checks every output within `tol` of the oracle
/// (relative to its largest magnitude) and returns the worst relative error, and the kernels
/// the GPU launched.
fn compare(
    dev: &Cuda,
    label: &str,
    s: AttentionShape,
    x: &Inputs,
    storage: Dtype,
    tol: f64,
) -> (f64, Vec<&'static str>) {
    let rounded;
    let x = if storage == Dtype::Bf16 {
        rounded = x.rounded();
        &rounded
    } else {
        x
    };
    dev.set_activation_dtype(storage);
    let want = run(&Cpu, s, x).expect("cpu");
    dev.record_costs(true);
    let got = run(dev, s, x).expect("virtual GPU");
    let kernels = dev.take_costs().iter().map(|c| c.kernel).filter(|k| k.starts_with("attention")).collect();
    dev.record_costs(false);
    let mut worst = 0.0f64;
    for (name, w, g) in ["out", "dq", "dk", "dv"].iter().zip(&want).zip(&got).map(|((n, w), g)| (n, w, g)) {
        let (abs, rel) = conformance::errors(w, g, 1e-3);
        assert!(rel <= tol, "{label} {storage:?} {name}: max abs {abs:.3e}, rel {rel:.3e} ({s:?})");
        worst = worst.max(rel);
    }
    // Accumulation really happened onto the nonzero buffers (and dq's garbage was replaced).
    assert!(got[2].iter().zip(&x.dk0).any(|(a, b)| a != b), "{label}: dk unchanged");
    assert!(got[1].iter().zip(&x.dq0).any(|(a, b)| a != b), "{label}: dq unchanged");
    (worst, kernels)
}

const MMA_KERNELS: [&str; 3] =
    ["attention_flash_forward_mma", "attention_flash_backward_dkdv_mma", "attention_flash_backward_dq_mma"];
const SIMT_KERNELS: [&str; 3] =
    ["attention_flash_forward", "attention_flash_backward_dkdv", "attention_flash_backward_dq"];

/// The entries of `kernels` for `storage`.
fn entries(kernels: [&str; 3], storage: Dtype) -> Vec<String> {
    let suffix = if storage == Dtype::Bf16 { "_bf16" } else { "" };
    kernels.iter().map(|k| format!("{k}{suffix}")).collect()
}

/// The bf16 check with each storage: within BF16_TOL, on the tensor-core kernels (the storage's
/// entries), and visibly not fp32-exact (the operands really were rounded to bf16).
fn check(label: &str, s: AttentionShape, padded: &[usize], seed: u64) {
    let Some(dev) = device() else { return };
    let x = Inputs::draw(&s, padded, seed);
    for storage in [Dtype::F32, Dtype::Bf16] {
        let (worst, kernels) = compare(&dev, label, s, &x, storage, BF16_TOL);
        eprintln!("{label} {storage:?}: worst relative error {worst:.3e}");
        assert_eq!(kernels, entries(MMA_KERNELS, storage), "{label}");
        assert!(worst > 1e-5, "{label}: {worst:.3e} is fp32-exact; were the tensor-core kernels run?");
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
    // As in flash_attention.rs: rows that see only padding are uniform over all 37 keys.
    let s = shape(2, 2, 64, 37, 37).with_causal(true);
    let Some(dev) = device() else { return };
    let mut x = Inputs::draw(&s, &[0, 0], 400);
    x.mask[..5].fill(0.0);
    x.mask[37..37 + 21].fill(0.0);
    for storage in [Dtype::F32, Dtype::Bf16] {
        let (worst, kernels) = compare(&dev, "unseen", s, &x, storage, BF16_TOL);
        eprintln!("unseen {storage:?}: worst relative error {worst:.3e}");
        assert_eq!(kernels, entries(MMA_KERNELS, storage));
    }
}

#[test]
fn strided_views_of_a_fused_qkv_projection() {
    let s = shape(2, 2, 32, 37, 37).with_causal(true).with_dropout(0.1, 5).with_strides(3 * 64, 3 * 64);
    check("fused-qkv", s, &[2, 11], 500);
    let s = shape(2, 1, 64, 37, 53).with_strides(64 + 3, 2 * 64 + 1);
    check("odd-strides", s, &[0, 30], 600);
}

#[test]
fn fp32_precision_and_head_dims_off_the_mma_grid_keep_the_simt_kernels() {
    let Some(dev) = device() else { return };
    // Head dim 40 is not a multiple of 16: the SIMT kernels, exact to fp32 with fp32 storage,
    // even at bf16 (and the bf16-storage SIMT entries with bf16 storage).
    let s = shape(2, 2, 40, 37, 29);
    let x = Inputs::draw(&s, &[0, 29], 700);
    for (storage, tol) in [(Dtype::F32, 2e-5), (Dtype::Bf16, BF16_STORAGE_TOL)] {
        let (_, kernels) = compare(&dev, "d40", s, &x, storage, tol);
        assert_eq!(kernels, entries(SIMT_KERNELS, storage));
    }
    // fp32 precision: the SIMT kernels, for a head dim the mma kernels take.
    dev.set_precision(GemmPrecision::Fp32);
    let s = shape(2, 2, 64, 37, 37).with_causal(true).with_dropout(0.1, 9);
    let x = Inputs::draw(&s, &[3, 0], 701);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        [(Dtype::F32, 2e-5), (Dtype::Bf16, BF16_STORAGE_TOL)].map(|(storage, tol)| {
            let (_, kernels) = compare(&dev, "fp32", s, &x, storage, tol);
            assert_eq!(kernels, entries(SIMT_KERNELS, storage));
        })
    }));
    dev.set_precision(GemmPrecision::Bf16);
    result.expect("fp32 precision runs");
}
