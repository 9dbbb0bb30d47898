//! The virtual GPU catches what a GPU would make go wrong, and says which kernel did it.
//!
//! Each case calls a kernel of `kernels/emu_checks.cu` wrongly on purpose (a swapped launch
//! argument, a write past the end, a missing barrier, a missing cross-stream event wait, a
//! misaligned vector load, launch limits). A failure inside a kernel is sticky for the whole
//! process, as on a GPU, so every case runs in a child process: the test re-runs this binary
//! with `--ignored --exact cases::NAME`, and the case asserts what the emulator reported.
//!
//! Needs NVRTC (for the PTX the module is loaded from); without it the tests skip, unless
//! `B2B_REQUIRE_NVRTC=1` (scripts/test.sh), where they fail.

use std::process::Command;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, LaunchConfig, PushKernelArg};
use kernels::cuda::KernelSource;

const CHECKS: KernelSource = KernelSource {
    file: "emu_checks.cu",
    code: include_str!("../kernels/emu_checks.cu"),
    kernels: &[
        "emu_check_axpy",
        "emu_check_write_at",
        "emu_check_neighbour",
        "emu_check_vector_copy",
        "emu_check_slow_fill",
        "emu_check_copy",
        "emu_check_dynamic_shared",
        "emu_check_mma",
    ],
};

/// Run `cases::NAME` in a child process; returns its combined output, asserting it passed.
fn in_child(name: &str) -> String {
    if !kernels::cuda::compile::nvrtc_or_skip() {
        return String::new();
    }
    let exe = std::env::current_exe().expect("test binary path");
    let out = Command::new(exe)
        .args(["--ignored", "--exact", "--nocapture", "--test-threads=1", &format!("cases::{name}")])
        .output()
        .expect("re-running the test binary");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "case {name} failed:\n{text}");
    assert!(text.contains("1 passed"), "case {name} did not run:\n{text}");
    text
}

struct Emu {
    _ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    module: Arc<CudaModule>,
}

impl Emu {
    fn open() -> Emu {
        cuda_emu::install().expect("virtual GPU");
        let ctx = CudaContext::new(0).expect("emulated device 0");
        // Ordering across streams is the test's business here, as it is the backend's.
        // SAFETY: the cases order their own work with explicit events.
        unsafe { ctx.disable_event_tracking() };
        let ptx = kernels::cuda::compile::compile(&CHECKS, "compute_90", false, &[]).expect("NVRTC").ptx;
        let module = ctx.load_module(cudarc::nvrtc::Ptx::from_src(ptx)).expect("module load");
        Emu { stream: ctx.default_stream(), module, _ctx: ctx }
    }
    fn f(&self, name: &str) -> CudaFunction {
        self.module.load_function(name).expect(name)
    }
}

fn cfg(grid: u32, block: u32, smem: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: smem }
}

#[test]
fn a_correct_launch_computes_the_right_answer() {
    in_child("correct_axpy");
}

#[test]
fn a_swapped_launch_argument_is_caught_naming_the_kernel() {
    let out = in_child("swapped_argument");
    assert!(out.contains("kernel `emu_check_axpy` argument 0"), "{out}");
}

#[test]
fn an_out_of_bounds_write_is_caught_naming_the_kernel() {
    let out = in_child("write_just_past_the_end");
    assert!(out.contains("kernel `emu_check_write_at` wrote outside argument 0"), "{out}");
    let out = in_child("write_far_past_the_end");
    assert!(out.contains("kernel `emu_check_write_at`") && out.contains("past the end of allocation"), "{out}");
}

#[test]
fn a_missing_syncthreads_makes_the_schedules_disagree() {
    in_child("missing_barrier");
}

#[test]
fn a_missing_cross_stream_event_wait_gives_a_wrong_result() {
    in_child("missing_event_wait");
}

#[test]
fn hardware_limits_are_errors_naming_the_kernel() {
    let out = in_child("misaligned_vector_load");
    assert!(out.contains("kernel `emu_check_vector_copy`") && out.contains("misaligned"), "{out}");
    in_child("launch_limits");
}

#[test]
fn the_tensor_core_helper_follows_the_documented_fragment_layout() {
    in_child("tensor_core_mma");
}

/// Inline PTX has no emulated twin unless it sits in a common.cuh helper: none anywhere else.
#[test]
fn no_inline_ptx_outside_the_common_helpers() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut seen = 0;
    for dir in [root.join("../kernels/src/cuda"), root.join("kernels")] {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|x| x == "cu") {
                let text = std::fs::read_to_string(&path).unwrap();
                assert!(!text.contains("asm(") && !text.contains("asm volatile"), "inline PTX in {}", path.display());
                seen += 1;
            }
        }
    }
    assert!(seen >= 10, "found only {seen} .cu files");
}

#[test]
fn cublas_gemm_with_bf16_storage_matches_the_cpu() {
    in_child("bf16_storage_gemm");
}

#[test]
fn fresh_memory_is_poisoned_with_nan() {
    in_child("poisoned_allocation");
}

#[test]
fn skipped_bodies_still_check_launches_but_compute_and_copy_nothing() {
    in_child("skipped_bodies");
}

mod cases {
    use super::*;

    fn upload(e: &Emu, v: &[f32]) -> cudarc::driver::CudaSlice<f32> {
        e.stream.clone_htod(v).unwrap()
    }

    #[test]
    #[ignore = "run by its parent test in a child process"]
    fn correct_axpy() {
        let e = Emu::open();
        let n = 1003i32;
        let x: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let mut y = upload(&e, &vec![1.0; n as usize]);
        let xd = upload(&e, &x);
        let f = e.f("emu_check_axpy");
        let mut l = e.stream.launch_builder(&f);
        l.arg(&mut y).arg(&xd).arg(&2.0f32).arg(&n);
        // SAFETY: arguments match the kernel's signature.
        unsafe { l.launch(cfg(3, 128, 0)) }.unwrap();
        let out = e.stream.clone_dtoh(&y).unwrap();
        assert!(out.iter().enumerate().all(|(i, &v)| v == 1.0 + 2.0 * i as f32));
    }

    #[test]
    #[ignore = "run by its parent test in a child process"]
    fn swapped_argument() {
        let e = Emu::open();
        let n = 1003i32;
        let mut y = upload(&e, &vec![1.0; n as usize]);
        let xd = upload(&e, &vec![1.0; n as usize]);
        let f = e.f("emu_check_axpy");
        let mut l = e.stream.launch_builder(&f);
        l.arg(&n).arg(&xd).arg(&2.0f32).arg(&mut y); // y and n swapped
        // SAFETY: deliberately wrong; the emulator must refuse to run it.
        unsafe { l.launch(cfg(3, 128, 0)) }.unwrap();
        let err = e.stream.synchronize().expect_err("a swapped argument must fail the launch");
        eprintln!("reported: {err:?}");
    }

    fn write_at(past: i32) {
        let e = Emu::open();
        let n = 1000i32;
        let mut y = upload(&e, &vec![0.0; n as usize]);
        let f = e.f("emu_check_write_at");
        let mut l = e.stream.launch_builder(&f);
        l.arg(&mut y).arg(&n).arg(&past);
        // SAFETY: deliberately out of bounds when past > 0.
        unsafe { l.launch(cfg(1, 32, 0)) }.unwrap();
        let err = e.stream.synchronize().expect_err("an out-of-bounds write must fail");
        eprintln!("reported: {err:?}");
    }

    #[test]
    #[ignore = "run by its parent test in a child process"]
    fn write_just_past_the_end() {
        write_at(1);
    }

    #[test]
    #[ignore = "run by its parent test in a child process"]
    fn write_far_past_the_end() {
        write_at(300); // lands in the inaccessible page after the allocation
    }

    fn neighbour(e: &Emu, with_barrier: i32) -> Vec<f32> {
        let (blocks, threads) = (3u32, 200u32);
        let mut out = upload(&e, &vec![0.0; (blocks * threads) as usize]);
        let f = e.f("emu_check_neighbour");
        let mut l = e.stream.launch_builder(&f);
        l.arg(&mut out).arg(&with_barrier);
        // SAFETY: `out` holds one float per thread.
        unsafe { l.launch(cfg(blocks, threads, 0)) }.unwrap();
        e.stream.clone_dtoh(&out).unwrap()
    }

    #[test]
    #[ignore = "run by its parent test in a child process"]
    fn missing_barrier() {
        let e = Emu::open();
        let expected: Vec<f32> = (0..3 * 200).map(|i| ((i / 200) * 200 + (i % 200 + 1) % 200) as f32).collect();
        cuda_emu::set_schedule(cuda_emu::Schedule::Forward).unwrap();
        let (fwd_ok, fwd_bad) = (neighbour(&e, 1), neighbour(&e, 0));
        cuda_emu::set_schedule(cuda_emu::Schedule::Reversed).unwrap();
        let (rev_ok, rev_bad) = (neighbour(&e, 1), neighbour(&e, 0));
        assert_eq!(fwd_ok, expected, "with the barrier, index order");
        assert_eq!(rev_ok, expected, "with the barrier, reversed order");
        assert_ne!(fwd_bad, rev_bad, "without the barrier the two schedules must disagree");
    }

    #[test]
    #[ignore = "run by its parent test in a child process"]
    fn missing_event_wait() {
        let e = Emu::open();
        let other = e._ctx.new_stream().unwrap();
        let n = 777i32;
        let run = |wait: bool| -> Vec<f32> {
            let mut src = upload(&e, &vec![0.0; n as usize]);
            let mut dst = upload(&e, &vec![0.0; n as usize]);
            e.stream.synchronize().unwrap();
            let fill = e.f("emu_check_slow_fill");
            let mut l = other.launch_builder(&fill);
            l.arg(&mut src).arg(&n).arg(&5.0f32).arg(&150i32);
            // SAFETY: arguments match the signature.
            unsafe { l.launch(cfg(2, 64, 0)) }.unwrap();
            if wait {
                e.stream.wait(&other.record_event(None).unwrap()).unwrap();
            }
            let copy = e.f("emu_check_copy");
            let mut l = e.stream.launch_builder(&copy);
            l.arg(&mut dst).arg(&src).arg(&n);
            // SAFETY: arguments match the signature.
            unsafe { l.launch(cfg(2, 64, 0)) }.unwrap();
            let out = e.stream.clone_dtoh(&dst).unwrap();
            other.synchronize().unwrap();
            out
        };
        assert!(run(true).iter().all(|&v| v == 5.0), "with the event wait the copy sees the fill");
        assert!(run(false).iter().all(|&v| v == 0.0), "without it, the copy runs before the slow fill");
    }

    #[test]
    #[ignore = "run by its parent test in a child process"]
    fn misaligned_vector_load() {
        let e = Emu::open();
        let mut dst = upload(&e, &[0.0; 8]);
        let src = upload(&e, &[1.0; 16]);
        let f = e.f("emu_check_vector_copy");
        let aligned = 4i32;
        let mut l = e.stream.launch_builder(&f);
        l.arg(&mut dst).arg(&src).arg(&aligned);
        // SAFETY: in bounds, 16-byte aligned.
        unsafe { l.launch(cfg(1, 32, 0)) }.unwrap();
        e.stream.synchronize().expect("an aligned vector copy runs");
        let misaligned = 1i32;
        let mut l = e.stream.launch_builder(&f);
        l.arg(&mut dst).arg(&src).arg(&misaligned);
        // SAFETY: deliberately misaligned.
        unsafe { l.launch(cfg(1, 32, 0)) }.unwrap();
        let err = e.stream.synchronize().expect_err("a misaligned float4 load must fail");
        eprintln!("reported: {err:?}");
    }

    #[test]
    #[ignore = "run by its parent test in a child process"]
    fn launch_limits() {
        let e = Emu::open();
        let mut y = upload(&e, &[0.0; 64]);
        let x = upload(&e, &[0.0; 64]);
        let n = 64i32;
        let f = e.f("emu_check_axpy");
        let bad = [
            (
                LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1025, 1, 1), shared_mem_bytes: 0 },
                "1025 threads per block",
            ),
            (
                LaunchConfig { grid_dim: (1, 1, 1), block_dim: (32, 32, 2), shared_mem_bytes: 0 },
                "2048 threads per block",
            ),
            (LaunchConfig { grid_dim: (1, 65536, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 }, "over the limits"),
            (
                LaunchConfig { grid_dim: (1, 1, 1), block_dim: (32, 1, 1), shared_mem_bytes: 48 * 1024 + 4 },
                "cuFuncSetAttribute",
            ),
        ];
        for (c, words) in bad {
            let mut l = e.stream.launch_builder(&f);
            l.arg(&mut y).arg(&x).arg(&1.0f32).arg(&n);
            // SAFETY: the launch is refused before it runs.
            let err = unsafe { l.launch(c) }.expect_err("over the limit");
            let msg = format!("{err:?}");
            assert!(msg.contains("kernel `emu_check_axpy`") && msg.contains(words), "{c:?}: {msg}");
        }
        // 64 KiB of dynamic shared memory works once the kernel opts in, and not before.
        let g = e.f("emu_check_dynamic_shared");
        let floats = 16 * 1024i32;
        let run = |g: &CudaFunction, y: &mut cudarc::driver::CudaSlice<f32>| {
            let mut l = e.stream.launch_builder(g);
            l.arg(y).arg(&floats);
            // SAFETY: one output float; shared memory sized for `floats`.
            unsafe { l.launch(cfg(1, 96, 4 * floats as u32)) }
        };
        assert!(run(&g, &mut y).is_err());
        g.set_attribute(
            cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            4 * floats,
        )
        .unwrap();
        run(&g, &mut y).unwrap();
        assert_eq!(e.stream.clone_dtoh(&y).unwrap()[0], floats as f32);
    }

    #[test]
    #[ignore = "run by its parent test in a child process"]
    fn skipped_bodies() {
        let e = Emu::open();
        let n = 1003i32;
        cuda_emu::set_skip_bodies(true).unwrap();
        // Neither poisoned, nor uploaded, nor computed: untouched pages read as zeros later.
        // SAFETY: read back without being written, to see that it was not poisoned.
        let fresh = unsafe { e.stream.alloc::<f32>(n as usize) }.unwrap();
        let mut y = upload(&e, &vec![1.0; n as usize]);
        let xd = upload(&e, &vec![3.0; n as usize]);
        let f = e.f("emu_check_axpy");
        let mut l = e.stream.launch_builder(&f);
        l.arg(&mut y).arg(&xd).arg(&2.0f32).arg(&n);
        // SAFETY: arguments match the kernel's signature.
        unsafe { l.launch(cfg(3, 128, 0)) }.unwrap();
        // A read-back copies nothing either: the host buffer keeps its contents.
        let mut host = vec![7.0f32; n as usize];
        e.stream.memcpy_dtoh(&y, &mut host).unwrap();
        e.stream.synchronize().unwrap();
        assert!(host.iter().all(|&v| v == 7.0), "a skipped DtoH copy wrote {:?}", &host[..3]);
        // Launch limits are still enforced.
        let mut l = e.stream.launch_builder(&f);
        l.arg(&mut y).arg(&xd).arg(&2.0f32).arg(&n);
        // SAFETY: deliberately over the block-size limit; refused before anything runs.
        let err = unsafe { l.launch(cfg(1, 2048, 0)) }.expect_err("2048 threads per block must be refused");
        eprintln!("reported: {err:?}");
        cuda_emu::set_skip_bodies(false).unwrap();
        assert!(e.stream.clone_dtoh(&y).unwrap().iter().all(|&v| v == 0.0), "y was written while skipping");
        assert!(e.stream.clone_dtoh(&fresh).unwrap().iter().all(|&v| v == 0.0), "poisoned while skipping");
        // Back to normal: the same launch computes.
        let mut l = e.stream.launch_builder(&f);
        l.arg(&mut y).arg(&xd).arg(&2.0f32).arg(&n);
        // SAFETY: as above.
        unsafe { l.launch(cfg(3, 128, 0)) }.unwrap();
        assert!(e.stream.clone_dtoh(&y).unwrap().iter().all(|&v| v == 0.0), "xd was never uploaded: 0 + 2*0");
        let xd = upload(&e, &vec![3.0; n as usize]);
        let mut l = e.stream.launch_builder(&f);
        l.arg(&mut y).arg(&xd).arg(&2.0f32).arg(&n);
        // SAFETY: as above.
        unsafe { l.launch(cfg(3, 128, 0)) }.unwrap();
        assert!(e.stream.clone_dtoh(&y).unwrap().iter().all(|&v| v == 6.0));
        // Pointer arguments are still checked while skipping: a swapped one fails the launch.
        cuda_emu::set_skip_bodies(true).unwrap();
        let mut l = e.stream.launch_builder(&f);
        l.arg(&n).arg(&xd).arg(&2.0f32).arg(&mut y);
        // SAFETY: deliberately wrong; the emulator must refuse to run it.
        unsafe { l.launch(cfg(3, 128, 0)) }.unwrap();
        let err = e.stream.synchronize().expect_err("a swapped argument must fail even when skipping");
        eprintln!("reported: {err:?}");
    }

    #[test]
    #[ignore = "run by its parent test in a child process"]
    fn poisoned_allocation() {
        let e = Emu::open();
        // SAFETY: read back without being written: exactly what poisoning is for.
        let fresh = unsafe { e.stream.alloc::<f32>(333) }.unwrap();
        assert!(e.stream.clone_dtoh(&fresh).unwrap().iter().all(|v| v.is_nan()));
        let zeros = e.stream.alloc_zeros::<f32>(333).unwrap();
        assert!(e.stream.clone_dtoh(&zeros).unwrap().iter().all(|&v| v == 0.0));
    }

    /// bf16 rounding to nearest even, as common.cuh's b2b_bf16_bits.
    fn bf16(x: f32) -> f32 {
        let u = x.to_bits();
        f32::from_bits((u.wrapping_add(0x7fff + ((u >> 16) & 1))) & 0xffff_0000)
    }

    #[test]
    #[ignore = "run by its parent test in a child process"]
    fn tensor_core_mma() {
        let e = Emu::open();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ std::process::id() as u64;
        let mut rand = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        let a: Vec<f32> = (0..16 * 16).map(|_| rand()).collect();
        let b: Vec<f32> = (0..16 * 8).map(|_| rand()).collect();
        let (ad, bd) = (upload(&e, &a), upload(&e, &b));
        let mut d = upload(&e, &[0.0; 16 * 8]);
        let f = e.f("emu_check_mma");
        let mut l = e.stream.launch_builder(&f);
        l.arg(&mut d).arg(&ad).arg(&bd);
        // SAFETY: one warp; the buffers hold 16x8, 16x16 and 16x8 floats.
        unsafe { l.launch(cfg(1, 32, 0)) }.unwrap();
        let got = e.stream.clone_dtoh(&d).unwrap();
        for i in 0..16 {
            for j in 0..8 {
                let want: f32 = (0..16).map(|k| bf16(a[i * 16 + k]) * bf16(b[k * 8 + j])).sum();
                let g = got[i * 8 + j];
                assert!((g - want).abs() <= 1e-5 * (1.0 + want.abs()), "d[{i}][{j}] = {g}, want {want}");
            }
        }
    }

    #[test]
    #[ignore = "run by its parent test in a child process"]
    fn bf16_storage_gemm() {
        use cudarc::cublas::{result as blas, sys as bsys};
        use cudarc::driver::DevicePtr;
        let e = Emu::open();
        let (m, n, k) = (13usize, 7usize, 19usize);
        let mut seed = 0x2545_f491_4f6c_dd1du64 ^ std::process::id() as u64;
        let mut rand = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        let bits = |x: f32| (bf16(x).to_bits() >> 16) as u16;
        let a: Vec<f32> = (0..m * k).map(|_| bf16(rand())).collect(); // column-major m x k
        let b: Vec<f32> = (0..k * n).map(|_| bf16(rand())).collect(); // column-major k x n
        let ad = e.stream.clone_htod(&a.iter().map(|&x| bits(x)).collect::<Vec<u16>>()).unwrap();
        let bd = e.stream.clone_htod(&b.iter().map(|&x| bits(x)).collect::<Vec<u16>>()).unwrap();
        let c32 = e.stream.alloc_zeros::<f32>(m * n).unwrap();
        let c16 = e.stream.alloc_zeros::<u16>(m * n).unwrap();
        let handle = blas::create_handle().unwrap();
        // SAFETY: fresh handle on the live default stream.
        unsafe { blas::set_stream(handle, e.stream.cu_stream() as _) }.unwrap();
        let (alpha, beta) = (1.0f32, 0.0f32);
        let ptr = |p: u64| p as *const std::ffi::c_void;
        let (pa, pb) = (ad.device_ptr(&e.stream).0, bd.device_ptr(&e.stream).0);
        for (c, ctype) in [
            (c32.device_ptr(&e.stream).0, bsys::cudaDataType::CUDA_R_32F),
            (c16.device_ptr(&e.stream).0, bsys::cudaDataType::CUDA_R_16BF),
        ] {
            // SAFETY: A, B and C hold m*k, k*n and m*n elements of their types.
            unsafe {
                blas::gemm_strided_batched_ex(
                    handle,
                    bsys::cublasOperation_t::CUBLAS_OP_N,
                    bsys::cublasOperation_t::CUBLAS_OP_N,
                    m as i32,
                    n as i32,
                    k as i32,
                    ptr(&alpha as *const f32 as u64),
                    ptr(pa),
                    bsys::cudaDataType::CUDA_R_16BF,
                    m as i32,
                    0,
                    ptr(pb),
                    bsys::cudaDataType::CUDA_R_16BF,
                    k as i32,
                    0,
                    ptr(&beta as *const f32 as u64),
                    c as *mut std::ffi::c_void,
                    ctype,
                    m as i32,
                    0,
                    1,
                    bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .unwrap();
        }
        let got32 = e.stream.clone_dtoh(&c32).unwrap();
        let got16 = e.stream.clone_dtoh(&c16).unwrap();
        for i in 0..m {
            for j in 0..n {
                let want: f32 = (0..k).map(|p| a[i + p * m] * b[p + j * k]).sum();
                let (g32, g16) = (got32[i + j * m], f32::from_bits((got16[i + j * m] as u32) << 16));
                assert!((g32 - want).abs() <= 1e-5 * (1.0 + want.abs()), "C[{i}][{j}] fp32 {g32}, want {want}");
                assert!((g16 - want).abs() <= 8e-3 * (1.0 + want.abs()), "C[{i}][{j}] bf16 {g16}, want {want}");
            }
        }
        // SAFETY: created above, destroyed once.
        unsafe { blas::destroy_handle(handle) }.unwrap();
    }
}
