//! The CUDA backend: hand-written kernels compiled at run time by NVRTC (through cudarc) for
//! the device's architecture, and GEMMs through cuBLAS.
//!
//! Buffers are fp32 or bf16 ([`DevBuf`]); every view carries its buffer's [`Dtype`], and each
//! launcher picks the kernel instantiation for the dtype of its activation operands (parameters,
//! their gradients, statistics and masks stay fp32). Activations are bf16 when the backend is
//! in mixed precision ([`Cuda::set_activation_dtype`]), else fp32, so the same backend is a
//! drop-in for the CPU oracle. GEMMs can run on bf16 tensor cores with fp32 accumulation
//! (`GemmPrecision::Bf16`), or in exact fp32 for the self-test. Everything runs on one stream, so views need no event tracking: a view is a raw
//! device pointer whose lifetime is tied to the buffer it came from.
//!
//! Kernel names have one source of truth: each family's `KernelSource` lists the entry points its
//! launchers use, and CI (`kernels/tests/nvrtc.rs`) checks that each exists in the PTX.

mod adamw;
mod attention;
mod bias;
pub mod compile;
mod convert;
pub mod cost;
mod cross_entropy;
mod dropout;
mod embedding;
mod gelu;
mod gemm_lt;
mod layernorm;
mod matmul;
pub mod nccl;
mod residual;
mod residual_norm;
pub mod roofline;

use std::collections::HashMap;
use std::marker::PhantomData;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig};

use crate::{Dtype, KernelError, Memory, Result};

/// One kernel family: its `.cu` file and the entry points the Rust side launches.
#[derive(Clone, Copy, Debug)]
pub struct KernelSource {
    pub file: &'static str,
    pub code: &'static str,
    pub kernels: &'static [&'static str],
}

/// Every kernel family, the registry that loading and the CI name check both read.
pub const SOURCES: &[KernelSource] = &[
    residual::SOURCE,
    bias::SOURCE,
    convert::SOURCE,
    embedding::SOURCE,
    layernorm::SOURCE,
    gelu::SOURCE,
    attention::SOURCE,
    cross_entropy::SOURCE,
    dropout::SOURCE,
    adamw::SOURCE,
];

/// Message for machines without a driver; the CLI shows it as is.
pub const NO_DRIVER: &str = "no CUDA driver found; use --device cpu";

/// The backend's precision: what `Cuda::new` and `set_precision` set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmPrecision {
    /// Full fp32 (the self-test compares against the CPU at fp32 tolerances).
    Fp32,
    /// Mixed precision: bf16 activations and GEMM operands on tensor cores with fp32
    /// accumulation; fp32 master weights, gradients, optimizer and reductions. Buffers from
    /// `activations` are bf16 (`set_activation_dtype` can still choose fp32 ones, as the
    /// self-test does to check bf16 GEMMs on fp32 storage: CUBLAS_COMPUTE_32F_FAST_16BF).
    Bf16,
}

pub struct Cuda {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: matmul::Blas,
    lt: gemm_lt::Lt,
    functions: HashMap<&'static str, CudaFunction>,
    sm_count: u32,
    /// The GEMM precision, bf16 when set. An atomic rather than a plain field because a worker
    /// opens the device once (NVRTC compiles every kernel) and shares it in an `Arc` across the
    /// jobs it runs one after another, each with its own `training.precision`: `set_precision`
    /// switches it per job through a shared reference. cuBLAS takes the compute type with each
    /// call, so a switch affects only GEMMs queued after it.
    bf16: AtomicBool,
    /// Whether `activations` makes bf16 buffers (an atomic for the same reason as `bf16`).
    bf16_activations: AtomicBool,
    /// Declared costs of the launches queued while recording is on (the cost model).
    costs: cost::Recorder,
    /// While measuring: a timing event recorded on the stream before each recorded entry, or
    /// the error that stopped it (see `measure_launches`).
    marks: Mutex<Option<std::result::Result<Vec<CudaEvent>, String>>>,
    /// Scratch that kernels overwrite in full before reading it (see `with_workspace`).
    workspace: Mutex<Option<CudaSlice<f32>>>,
    /// The f64 accumulator of the global gradient norm (`sum_squares`, `adamw_flat`), made once.
    norm_acc: Mutex<Option<CudaSlice<f64>>>,
}

/// An owned device buffer: fp32, or bf16 stored as its raw 16 bits.
#[derive(Debug)]
pub enum DevBuf {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<u16>),
}

impl DevBuf {
    pub fn len(&self) -> usize {
        match self {
            DevBuf::F32(s) => s.len(),
            DevBuf::Bf16(s) => s.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn dtype(&self) -> Dtype {
        match self {
            DevBuf::F32(_) => Dtype::F32,
            DevBuf::Bf16(_) => Dtype::Bf16,
        }
    }
}

/// A shared view of device memory: pointer, length in elements and dtype, borrowed from a
/// buffer.
#[derive(Clone, Copy, Debug)]
pub struct DevRef<'a> {
    pub(crate) ptr: u64,
    pub(crate) len: usize,
    pub(crate) dtype: Dtype,
    _buf: PhantomData<&'a [f32]>,
}

/// An exclusive view of device memory.
#[derive(Debug)]
pub struct DevMut<'a> {
    pub(crate) ptr: u64,
    pub(crate) len: usize,
    pub(crate) dtype: Dtype,
    _buf: PhantomData<&'a mut [f32]>,
}

impl DevRef<'_> {
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }
}

impl DevMut<'_> {
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }
}

/// The one dtype of an op's activation operands, or a shape error naming the op: an op runs
/// all its activations at one dtype (its kernel instantiation).
pub(crate) fn activation_dtype_of(op: &'static str, dtypes: &[Dtype]) -> Result<Dtype> {
    let first = dtypes.first().copied().unwrap_or(Dtype::F32);
    check(op, dtypes.iter().all(|&d| d == first), || format!("activation operands of mixed dtypes {dtypes:?}"))?;
    Ok(first)
}

/// The two entry points of a kernel templated on its activation type (see common.cuh): `f32`
/// for fp32 activations, `bf16` (the same name with `_bf16`) for bf16 ones.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Typed {
    pub f32: &'static str,
    pub bf16: &'static str,
}

impl Typed {
    /// The entry point for the activation operands' one dtype, and that dtype.
    pub(crate) fn pick(self, op: &'static str, dtypes: &[Dtype]) -> Result<(&'static str, Dtype)> {
        let d = activation_dtype_of(op, dtypes)?;
        Ok((if d == Dtype::Bf16 { self.bf16 } else { self.f32 }, d))
    }
}

/// `op` only takes fp32 operands (parameters, gradients, optimizer state, statistics).
pub(crate) fn require_f32(op: &'static str, dtypes: &[Dtype]) -> Result<()> {
    check(op, dtypes.iter().all(|&d| d == Dtype::F32), || format!("needs fp32 operands, got {dtypes:?}"))
}

pub(crate) fn dev_err(e: impl std::fmt::Debug) -> KernelError {
    KernelError::Device(format!("{e:?}"))
}

/// `n` threads in blocks of `block`, capped so grid-stride loops cover the rest.
pub(crate) fn grid_for(n: usize, block: u32) -> LaunchConfig {
    let blocks = n.div_ceil(block as usize).clamp(1, 65_535 * 8) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 }
}

impl Cuda {
    /// Open device `ordinal`, compile (or load from cache) every kernel for its architecture.
    /// Never panics when no driver is installed: that is `KernelError::Unavailable(NO_DRIVER)`.
    pub fn new(ordinal: usize, precision: GemmPrecision) -> Result<Self> {
        // SAFETY: only probes whether libcuda can be opened.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(KernelError::Unavailable(NO_DRIVER.into()));
        }
        let count =
            CudaContext::device_count().map_err(|e| KernelError::Unavailable(format!("{NO_DRIVER} ({e:?})")))?;
        if ordinal >= count.max(0) as usize {
            return Err(KernelError::Unavailable(format!("CUDA device {ordinal} requested but {count} found")));
        }
        let ctx = CudaContext::new(ordinal).map_err(dev_err)?;
        // SAFETY: one stream does all the work, so cudarc's cross-stream events are not needed.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let (major, minor) = ctx.compute_capability().map_err(dev_err)?;
        let arch: &'static str = Box::leak(format!("compute_{major}{minor}").into_boxed_str());
        let sm_count = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(dev_err)? as u32;
        let include = include_paths();
        let mut functions = HashMap::new();
        for src in SOURCES {
            let ptx = compile::cached_ptx(src, arch, &include)?;
            let module = ctx.load_module(cudarc::nvrtc::Ptx::from_src(ptx)).map_err(dev_err)?;
            for &name in src.kernels {
                functions.insert(name, module.load_function(name).map_err(dev_err)?);
            }
        }
        let blas = matmul::Blas::new(&stream)?;
        let lt = gemm_lt::Lt::new(&stream)?;
        let bf16 = AtomicBool::new(precision == GemmPrecision::Bf16);
        Ok(Self {
            ctx,
            stream,
            blas,
            lt,
            functions,
            sm_count,
            bf16,
            bf16_activations: AtomicBool::new(precision == GemmPrecision::Bf16),
            costs: cost::Recorder::default(),
            marks: Mutex::new(None),
            workspace: Mutex::new(None),
            norm_acc: Mutex::new(None),
        })
    }

    /// Start (or stop) recording the declared cost of every launch, copy and sync this backend
    /// queues from now on; see [`cost`]. Stopping drops what was recorded and not taken.
    pub fn record_costs(&self, on: bool) {
        self.costs.set(on);
    }

    /// The costs recorded since recording started or since the last take, in queue order.
    pub fn take_costs(&self) -> Vec<cost::LaunchCost> {
        self.costs.take()
    }

    /// With recording on, also time every recorded entry with CUDA events (`take_measured`):
    /// an event is recorded on the stream before each entry, so an entry's time runs from its
    /// event to the next one, launch gap and host bubbles included. Each event costs the host a
    /// `cuEventRecord`, so measured gaps come out a little longer than in an unmeasured run.
    pub fn measure_launches(&self, on: bool) {
        *self.marks.lock().unwrap_or_else(|p| p.into_inner()) = on.then(|| Ok(Vec::new()));
    }

    /// The recorded costs, each with its measured seconds; waits for the stream. Measuring stays
    /// on for the entries recorded next. An error when measuring was not on or an event failed.
    pub fn take_measured(&self) -> Result<Vec<(cost::LaunchCost, f64)>> {
        let mut guard = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        let marks = match guard.replace(Ok(Vec::new())) {
            Some(Ok(marks)) => marks,
            Some(Err(e)) => return Err(KernelError::Device(format!("timing launches: {e}"))),
            None => return Err(KernelError::Device("take_measured without measure_launches".into())),
        };
        let costs = self.costs.take();
        check("take_measured", marks.len() == costs.len(), || {
            format!("{} events for {} recorded entries", marks.len(), costs.len())
        })?;
        let end = self.timing_event().map_err(dev_err)?;
        self.stream.synchronize().map_err(dev_err)?;
        let mut out = Vec::with_capacity(costs.len());
        for (i, c) in costs.into_iter().enumerate() {
            let next = marks.get(i + 1).unwrap_or(&end);
            out.push((c, marks[i].elapsed_ms(next).map_err(dev_err)? as f64 / 1e3));
        }
        Ok(out)
    }

    fn timing_event(&self) -> std::result::Result<CudaEvent, cudarc::driver::DriverError> {
        self.stream.record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
    }

    pub(crate) fn note(&self, c: cost::LaunchCost) {
        if !self.costs.note(c) {
            return;
        }
        let mut guard = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(Ok(marks)) = guard.as_mut() {
            match self.timing_event() {
                Ok(e) => marks.push(e),
                Err(e) => *guard = Some(Err(format!("{e:?}"))),
            }
        }
    }

    /// How GEMMs queued from now on multiply.
    pub fn precision(&self) -> GemmPrecision {
        if self.bf16.load(Ordering::Relaxed) { GemmPrecision::Bf16 } else { GemmPrecision::Fp32 }
    }

    /// Set the precision of the GEMMs queued from now on (e.g. per job: see the field `bf16`),
    /// and with it the activation dtype: `Bf16` is mixed precision (bf16 activations, fp32
    /// master weights, gradients and optimizer), `Fp32` fp32 throughout.
    pub fn set_precision(&self, precision: GemmPrecision) {
        self.bf16.store(precision == GemmPrecision::Bf16, Ordering::Relaxed);
        let activations = if precision == GemmPrecision::Bf16 { Dtype::Bf16 } else { Dtype::F32 };
        self.set_activation_dtype(activations);
    }

    /// The dtype of the buffers `activations` makes from now on (buffers made before keep
    /// theirs: every op dispatches on the dtype of the views it is given).
    pub fn set_activation_dtype(&self, dtype: Dtype) {
        self.bf16_activations.store(dtype == Dtype::Bf16, Ordering::Relaxed);
    }

    pub fn device_name(&self) -> String {
        self.ctx.name().unwrap_or_else(|_| "CUDA device".into())
    }

    /// Bytes in use on the device (total minus free), for memory reports.
    pub fn used_bytes(&self) -> Option<u64> {
        self.ctx.mem_get_info().ok().map(|(free, total)| (total - free) as u64)
    }

    pub(crate) fn func(&self, name: &'static str) -> Result<&CudaFunction> {
        self.functions.get(name).ok_or_else(|| KernelError::Device(format!("kernel `{name}` not loaded")))
    }

    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub(crate) fn sm_count(&self) -> u32 {
        self.sm_count
    }

    fn base(&self, buf: &DevBuf) -> u64 {
        let (ptr, _sync) = match buf {
            DevBuf::F32(s) => s.device_ptr(&self.stream),
            DevBuf::Bf16(s) => s.device_ptr(&self.stream),
        };
        ptr
    }

    fn slice_ptr(&self, buf: &CudaSlice<f32>) -> u64 {
        let (ptr, _sync) = buf.device_ptr(&self.stream);
        ptr
    }

    /// Run `f` with a device buffer of at least `n` floats that the launches queued inside `f`
    /// overwrite in full before reading (e.g. LayerNorm's per-block partial sums). The buffer is
    /// kept and reused, allocated uninitialised and grown only when too small, so those launches
    /// pay neither an allocation nor a memset per call; the single stream orders every use.
    pub(crate) fn with_workspace<R>(&self, n: usize, f: impl FnOnce(u64) -> Result<R>) -> Result<R> {
        let mut guard = self.workspace.lock().unwrap_or_else(|p| p.into_inner());
        if guard.as_ref().is_none_or(|b| b.len() < n) {
            // SAFETY: the contents are never read before the caller's kernels write them (and the
            // virtual GPU fills fresh memory with NaN, so a kernel that did would show it).
            *guard = Some(unsafe { self.stream.alloc::<f32>(n.max(1)) }.map_err(dev_err)?);
        }
        let buf = guard.as_ref().expect("allocated above");
        f(self.slice_ptr(buf))
    }

    /// The device address of the one f64 norm accumulator (allocated on first use).
    pub(crate) fn norm_accumulator(&self) -> Result<u64> {
        let mut guard = self.norm_acc.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            *guard = Some(self.stream.alloc_zeros::<f64>(1).map_err(dev_err)?);
        }
        let (ptr, _sync) = guard.as_ref().expect("allocated above").device_ptr(&self.stream);
        Ok(ptr)
    }

    pub(crate) fn ids_ptr(&self, ids: &CudaSlice<i32>) -> u64 {
        let (ptr, _sync) = ids.device_ptr(&self.stream);
        ptr
    }
}

impl Cuda {
    /// Copy `out.len()` elements from device address `src` and wait for them.
    fn dtoh<T: cudarc::driver::DeviceRepr>(&self, out: &mut [T], src: u64) -> Result<()> {
        if !out.is_empty() {
            // SAFETY: callers pass the address of a live view of `out.len()` elements of `T` on
            // this context; the stream is synchronised before `out` is read.
            unsafe { cudarc::driver::result::memcpy_dtoh_async(out, src, self.stream.cu_stream()) }.map_err(dev_err)?;
        }
        self.note(cost::sync("sync (download)"));
        self.stream.synchronize().map_err(dev_err)
    }
}

/// Header directories for NVRTC (`BERT2BERT_CUDA_INCLUDE`, colon-separated; empty parts skipped).
pub(crate) fn include_paths() -> Vec<String> {
    std::env::var("BERT2BERT_CUDA_INCLUDE")
        .map(|p| p.split(':').filter(|s| !s.is_empty()).map(String::from).collect())
        .unwrap_or_default()
}

pub(crate) fn check(op: &'static str, ok: bool, what: impl FnOnce() -> String) -> Result<()> {
    if ok { Ok(()) } else { Err(KernelError::Shape { op, what: what() }) }
}

impl Memory for Cuda {
    type Buf = DevBuf;
    type Ref<'a> = DevRef<'a>;
    type Mut<'a> = DevMut<'a>;
    type Ids = CudaSlice<i32>;

    fn name(&self) -> String {
        format!("cuda ({})", self.device_name())
    }
    fn zeros(&self, n: usize) -> Result<DevBuf> {
        self.note(cost::memset(n, Dtype::F32));
        self.stream.alloc_zeros::<f32>(n).map(DevBuf::F32).map_err(dev_err)
    }
    fn activations(&self, n: usize) -> Result<DevBuf> {
        match self.activation_dtype() {
            Dtype::F32 => self.zeros(n),
            Dtype::Bf16 => {
                self.note(cost::memset(n, Dtype::Bf16));
                self.stream.alloc_zeros::<u16>(n).map(DevBuf::Bf16).map_err(dev_err)
            }
        }
    }
    fn activation_dtype(&self) -> Dtype {
        if self.bf16_activations.load(Ordering::Relaxed) { Dtype::Bf16 } else { Dtype::F32 }
    }
    fn upload(&self, host: &[f32]) -> Result<DevBuf> {
        self.note(cost::host_copy("memcpy_htod", std::mem::size_of_val(host)));
        self.stream.clone_htod(host).map(DevBuf::F32).map_err(dev_err)
    }
    fn download(&self, view: DevRef<'_>) -> Result<Vec<f32>> {
        self.note(cost::host_copy("memcpy_dtoh", view.dtype.size() * view.len));
        let out = match view.dtype {
            Dtype::F32 => {
                let mut out = vec![0.0f32; view.len];
                self.dtoh(&mut out, view.ptr)?;
                out
            }
            Dtype::Bf16 => {
                let mut bits = vec![0u16; view.len];
                self.dtoh(&mut bits, view.ptr)?;
                bits.into_iter().map(crate::bf16_value).collect()
            }
        };
        Ok(out)
    }
    fn upload_ids(&self, host: &[i32]) -> Result<CudaSlice<i32>> {
        if host.is_empty() {
            self.note(cost::memset(1, Dtype::F32));
            return self.stream.alloc_zeros::<i32>(1).map_err(dev_err);
        }
        self.note(cost::host_copy("memcpy_htod", std::mem::size_of_val(host)));
        self.stream.clone_htod(host).map_err(dev_err)
    }
    fn len(&self, buf: &DevBuf) -> usize {
        buf.len()
    }
    fn view<'a>(&self, buf: &'a DevBuf, range: Range<usize>) -> DevRef<'a> {
        assert!(range.start <= range.end && range.end <= buf.len(), "view {range:?} of {}", buf.len());
        let dtype = buf.dtype();
        let ptr = self.base(buf) + (dtype.size() * range.start) as u64;
        DevRef { ptr, len: range.len(), dtype, _buf: PhantomData }
    }
    fn view_mut<'a>(&self, buf: &'a mut DevBuf, range: Range<usize>) -> DevMut<'a> {
        assert!(range.start <= range.end && range.end <= buf.len(), "view {range:?} of {}", buf.len());
        let dtype = buf.dtype();
        let ptr = self.base(buf) + (dtype.size() * range.start) as u64;
        DevMut { ptr, len: range.len(), dtype, _buf: PhantomData }
    }
    fn view_mut2<'a>(&self, buf: &'a mut DevBuf, a: Range<usize>, b: Range<usize>) -> (DevMut<'a>, DevMut<'a>) {
        assert!(a.end <= b.start || b.end <= a.start, "view_mut2: {a:?} and {b:?} overlap");
        assert!(a.end <= buf.len() && b.end <= buf.len());
        let (base, dtype) = (self.base(buf), buf.dtype());
        let mk = |r: Range<usize>| DevMut {
            ptr: base + (dtype.size() * r.start) as u64,
            len: r.len(),
            dtype,
            _buf: PhantomData,
        };
        (mk(a), mk(b))
    }
    fn as_ref<'a>(&self, m: &'a DevMut<'_>) -> DevRef<'a> {
        DevRef { ptr: m.ptr, len: m.len, dtype: m.dtype, _buf: PhantomData }
    }
    fn reborrow<'a>(&self, m: &'a mut DevMut<'_>) -> DevMut<'a> {
        DevMut { ptr: m.ptr, len: m.len, dtype: m.dtype, _buf: PhantomData }
    }
    fn fill(&self, dst: DevMut<'_>, value: f32) -> Result<()> {
        if dst.len == 0 {
            return Ok(());
        }
        self.note(cost::memset(dst.len, dst.dtype));
        let stream = self.stream.cu_stream();
        // SAFETY: `dst` is a live exclusive view of `len` elements of its dtype on this stream.
        unsafe {
            match dst.dtype {
                Dtype::F32 => cudarc::driver::sys::cuMemsetD32Async(dst.ptr, value.to_bits(), dst.len, stream),
                Dtype::Bf16 => cudarc::driver::sys::cuMemsetD16Async(dst.ptr, crate::bf16_bits(value), dst.len, stream),
            }
        }
        .result()
        .map_err(dev_err)
    }
    fn copy(&self, src: DevRef<'_>, dst: DevMut<'_>) -> Result<()> {
        check("copy", src.len == dst.len, || format!("src {} dst {}", src.len, dst.len))?;
        if src.len == 0 {
            return Ok(());
        }
        if src.dtype != dst.dtype {
            return self.launch_convert(src, dst);
        }
        self.note(cost::copy_dtod(src.len, src.dtype));
        let bytes = src.dtype.size() * src.len;
        // SAFETY: both views are live, of equal length and dtype, on this stream; `dst` is
        // exclusive.
        unsafe { cudarc::driver::result::memcpy_dtod_async(dst.ptr, src.ptr, bytes, self.stream.cu_stream()) }
            .map_err(dev_err)
    }
    fn synchronize(&self) -> Result<()> {
        self.note(cost::sync("sync (synchronize)"));
        self.stream.synchronize().map_err(dev_err)
    }
    /// 256 MiB of fp32 logits: 2198 rows at BERT's 30522 words. The bound keeps the head's
    /// memory flat as batches grow (unchunked, batch 32 x 128 held 1 GB of logits and dlogits).
    /// Each extra chunk re-reads E twice and E's gradient once more (about 0.4 GB at bert-base,
    /// 0.1 ms on an H100), small beside a chunk's own logit traffic (about 6 passes over its
    /// 256 MiB); a smaller bound would pay that E traffic more often for memory an 80 GB card
    /// does not need.
    fn logits_chunk_floats(&self) -> Option<usize> {
        Some(64 << 20)
    }
}
