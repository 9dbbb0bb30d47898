//! A cuBLASLt with no kernel for our epilogues, as a real GPU's may be: the virtual GPU refuses
//! them (`B2B_EMU_CUBLASLT_REFUSE`) in the heuristic or only when the matmul is queued, and the
//! fused linear ops must fall back to the unfused GEMM + bias kernels with the same results.
//! Its own test binary: the variable is process-wide.

use kernels::cuda::{Cuda, GemmPrecision};
use kernels::{Cpu, GemmOps, GemmShape, Operand};

/// `gemm_bias` and `gemm_bias_grad` on one fresh backend: (y, dW, dbias, kernels launched).
fn linear_ops<B: GemmOps>(dev: &B, x: &[f32], w: &[f32], b: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (rows, i, o) = (37, 20, 13);
    let (xb, wb, bb, dyb) =
        (dev.upload(x).unwrap(), dev.upload(w).unwrap(), dev.upload(b).unwrap(), dev.upload(dy).unwrap());
    let mut y = dev.upload(&vec![f32::NAN; rows * o]).unwrap();
    let mut grads = dev.upload(&vec![f32::NAN; o * i + o]).unwrap();
    let all = |buf| dev.view(buf, 0..dev.len(buf));
    let n = dev.len(&y);
    dev.gemm_bias(
        GemmShape::plain(rows, o, i),
        all(&xb),
        Operand::n(i),
        all(&wb),
        Operand::t(i),
        all(&bb),
        dev.view_mut(&mut y, 0..n),
    )
    .unwrap();
    let (dw, db) = dev.view_mut2(&mut grads, 0..o * i, o * i..o * i + o);
    dev.gemm_bias_grad(GemmShape::plain(o, i, rows), all(&dyb), Operand::t(o), all(&xb), Operand::n(i), dw, db)
        .unwrap();
    let g = dev.download(all(&grads)).unwrap();
    (dev.download(all(&y)).unwrap(), g[..o * i].to_vec(), g[o * i..].to_vec())
}

fn close(a: &[f32], b: &[f32], what: &str) {
    let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    for (k, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= 1e-5 * scale, "{what}[{k}]: {x} vs {y}");
    }
}

#[test]
fn refused_epilogues_fall_back_to_the_unfused_pair() {
    if !kernels::cuda::compile::nvrtc_or_skip() {
        return;
    }
    cuda_emu::install().expect("starting the virtual GPU");
    let draw = |seed, n| (0..n as u64).map(|i| kernels::rng::normal(seed, i)).collect::<Vec<f32>>();
    let (x, w, b, dy) = (draw(1, 37 * 20), draw(2, 13 * 20), draw(3, 13), draw(4, 37 * 13));
    let want = linear_ops(&Cpu, &x, &w, &b, &dy);
    for mode in ["heuristic", "matmul"] {
        // SAFETY (of the process): this binary's only test sets it, before any thread reads it.
        unsafe { std::env::set_var("B2B_EMU_CUBLASLT_REFUSE", mode) };
        let dev = Cuda::new(0, GemmPrecision::Fp32).expect("the virtual GPU's CUDA backend");
        for call in 0..2 {
            dev.record_costs(true);
            let got = linear_ops(&dev, &x, &w, &b, &dy);
            let kernels: Vec<&str> = dev.take_costs().iter().map(|c| c.kernel).collect();
            dev.record_costs(false);
            close(&got.0, &want.0, "y");
            close(&got.1, &want.1, "dW");
            close(&got.2, &want.2, "dbias");
            for k in ["bias_add", "bias_column_sum"] {
                assert!(kernels.contains(&k), "{mode} call {call}: no fallback {k} in {kernels:?}");
            }
            // The refusal is remembered: a second call does not ask cuBLASLt again.
            if call == 1 || mode == "heuristic" {
                assert!(!kernels.iter().any(|k| k.starts_with("cublaslt")), "{mode} call {call}: {kernels:?}");
            }
        }
    }
    unsafe { std::env::remove_var("B2B_EMU_CUBLASLT_REFUSE") };
}
