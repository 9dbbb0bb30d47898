//! The virtual GPU (`--device cuda-emu`): emulated libcuda, cuBLAS and NCCL libraries that
//! cudarc drives unchanged, so bert2bert's CUDA backend runs, and is tested, without a GPU.
//!
//! [`install`] loads the four libraries build.rs made (embedded in this crate) into the
//! process, each by its own path and each carrying the soname of the first name cudarc asks
//! for (`libcuda.so`, `libcublas.so`, ...). glibc answers a later `dlopen("libcuda.so")` with
//! an already-loaded object of that soname, so every cudarc call then reaches the emulator:
//! no LD_LIBRARY_PATH, no re-exec, nothing on disk. It must run before anything loads CUDA;
//! it refuses when a real driver is already in the process, and nothing calls it unless
//! `cuda-emu` was asked for, so a real GPU machine never picks it up by accident.

use std::ffi::{CStr, CString, c_void};
use std::sync::OnceLock;

const LIBS: [(&str, &[u8]); 4] = [
    ("libcuda.so", include_bytes!(concat!(env!("OUT_DIR"), "/libcuda.so"))),
    ("libcublas.so", include_bytes!(concat!(env!("OUT_DIR"), "/libcublas.so"))),
    ("libcublasLt.so", include_bytes!(concat!(env!("OUT_DIR"), "/libcublasLt.so"))),
    ("libnccl.so", include_bytes!(concat!(env!("OUT_DIR"), "/libnccl.so"))),
];

/// The loaded emulator (its libcuda handle), once installed.
struct Installed(*mut c_void);
// SAFETY: a dlopen handle is a process-wide token, valid from any thread.
unsafe impl Send for Installed {}
// SAFETY: as above.
unsafe impl Sync for Installed {}

static INSTALLED: OnceLock<Result<Installed, String>> = OnceLock::new();

/// Load the virtual GPU into this process (idempotent). After it, `cudarc` sees an sm_90
/// device with H100 limits whose memory is host memory.
pub fn install() -> Result<(), String> {
    INSTALLED.get_or_init(load).as_ref().map(drop).map_err(Clone::clone)
}

/// True when this process runs on the virtual GPU.
pub fn installed() -> bool {
    INSTALLED.get().is_some_and(|r| r.is_ok())
}

fn dlerror() -> String {
    // SAFETY: dlerror returns a thread-local NUL-terminated string or null.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        "unknown dlopen error".into()
    } else {
        // SAFETY: non-null, NUL-terminated, valid until the next dl* call on this thread.
        unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
    }
}

fn already_loaded(name: &str) -> bool {
    let c = CString::new(name).expect("library names have no NUL");
    // SAFETY: RTLD_NOLOAD only probes; a returned handle is closed at once.
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
    if !h.is_null() {
        // SAFETY: `h` came from dlopen just above.
        unsafe { libc::dlclose(h) };
    }
    !h.is_null()
}

fn load() -> Result<Installed, String> {
    for real in ["libcuda.so", "libcuda.so.1", "libnccl.so", "libnccl.so.2"] {
        if already_loaded(real) {
            return Err(format!("a real {real} is already loaded in this process; the virtual GPU must come first"));
        }
    }
    let mut core: *mut c_void = std::ptr::null_mut();
    // Every file stays open until all are loaded: a closed descriptor number is reused, and
    // dlopen would answer "/proc/self/fd/N" with the object already loaded under that name.
    let mut files = Vec::new();
    for (name, bytes) in LIBS {
        let (handle, file) = load_one(name, bytes)?;
        files.push(file);
        if core.is_null() {
            core = handle;
        }
    }
    drop(files);
    // The soname trick must hold, or cudarc would go looking for a real driver.
    let probe = CString::new("libcuda.so").expect("no NUL");
    // SAFETY: probing an object we loaded; the extra reference is harmless.
    let found = unsafe { libc::dlopen(probe.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
    if found != core {
        return Err("the virtual GPU loaded, but dlopen(\"libcuda.so\") does not find it".into());
    }
    Ok(Installed(core))
}

/// Write `bytes` to an anonymous memory file and dlopen it by its /proc path.
fn load_one(name: &str, bytes: &[u8]) -> Result<(*mut c_void, std::fs::File), String> {
    use std::io::Write;
    use std::os::fd::FromRawFd;
    let cname = CString::new(name).expect("no NUL");
    // SAFETY: plain syscall; the fd is owned by `file` below.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(format!("memfd_create for {name}: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.write_all(bytes).map_err(|e| format!("writing {name}: {e}"))?;
    let path = CString::new(format!("/proc/self/fd/{fd}")).expect("no NUL");
    // SAFETY: loads a library we built; its initialisers only register kernels.
    let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if handle.is_null() {
        return Err(format!("loading the virtual GPU's {name}: {}", dlerror()));
    }
    Ok((handle, file))
}

/// Thread schedules the emulator runs blocks in (between barriers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    /// Threads in index order.
    Forward,
    /// Threads in reverse index order.
    Reversed,
}

/// Choose the schedule of later launches (tests use it to expose missing barriers). Also
/// settable with `B2B_EMU_SCHEDULE=reverse`.
pub fn set_schedule(s: Schedule) -> Result<(), String> {
    call_hook(
        "b2bEmuSetSchedule",
        match s {
            Schedule::Forward => 0,
            Schedule::Reversed => 1,
        },
    )
}

/// Cost-model mode (`bench --predict`): from now on kernel launches, GEMMs, copies and memsets
/// are still checked (arguments, launch limits, bounds) and ordered, but their bodies are
/// skipped and fresh memory is not poisoned, so only the launch list means anything. Waits for
/// queued work first. Also settable with `B2B_EMU_SKIP_BODIES=1`.
pub fn set_skip_bodies(on: bool) -> Result<(), String> {
    call_hook("b2bEmuSetSkipBodies", on as i32)
}

/// Call one of the emulator's `void name(int)` test hooks.
fn call_hook(name: &str, arg: i32) -> Result<(), String> {
    let Some(Ok(Installed(h))) = INSTALLED.get() else {
        return Err("the virtual GPU is not installed".into());
    };
    let sym = CString::new(name).expect("no NUL");
    // SAFETY: `h` is our live handle.
    let f = unsafe { libc::dlsym(*h, sym.as_ptr()) };
    if f.is_null() {
        return Err(dlerror());
    }
    // SAFETY: every hook this is called with is `extern "C" void name(int)` (sched.cpp).
    let f: extern "C" fn(i32) = unsafe { std::mem::transmute(f) };
    f(arg);
    Ok(())
}
