//! NVRTC: compile a kernel family's source for an architecture, keep the program log (ptxas
//! register and spill counts when compiling for a real `sm_XX`), and cache PTX on disk by content.

use std::ffi::CStr;
use std::path::PathBuf;

use cudarc::nvrtc::{result, sys};

use super::KernelSource;
use crate::{KernelError, Result};

/// Helpers shared by every kernel file (counter-based RNG, warp reductions), prepended to each.
pub const COMMON: &str = include_str!("common.cuh");

/// The full text NVRTC compiles for one family.
pub fn full_source(src: &KernelSource) -> String {
    format!("{COMMON}\n#line 1 \"{}\"\n{}", src.file, src.code)
}

#[derive(Debug)]
pub struct Compiled {
    /// PTX text (empty when `arch` is a real `sm_XX`, where NVRTC makes a cubin instead).
    pub ptx: String,
    /// The program log: warnings, and with `verbose_ptxas` the ptxas register/spill report.
    pub log: String,
}

/// True when the NVRTC library can be loaded (pip `nvidia-cuda-nvrtc` on LD_LIBRARY_PATH).
pub fn nvrtc_present() -> bool {
    // SAFETY: only probes whether the shared library can be opened.
    unsafe { sys::is_culib_present() }
}

/// For tests that need NVRTC: true when it loads; otherwise a skip note (false), or a panic when
/// `B2B_REQUIRE_NVRTC=1` (scripts/test.sh), where a missing NVRTC must fail CI rather than skip.
pub fn nvrtc_or_skip() -> bool {
    if nvrtc_present() {
        return true;
    }
    assert!(
        std::env::var("B2B_REQUIRE_NVRTC").as_deref() != Ok("1"),
        "B2B_REQUIRE_NVRTC=1 but NVRTC cannot be loaded (scripts/setup_nvrtc.sh, . .deps/cuda13/env.sh)"
    );
    eprintln!("SKIPPED: NVRTC not found");
    false
}

/// Compile `src` for `arch` (`compute_90` for PTX, `sm_90` for a cubin and a ptxas report).
pub fn compile(src: &KernelSource, arch: &str, verbose_ptxas: bool, include_paths: &[String]) -> Result<Compiled> {
    if !nvrtc_present() {
        return Err(KernelError::Unavailable(
            "NVRTC library not found (pip install nvidia-cuda-nvrtc==13.0.88)".into(),
        ));
    }
    let code = std::ffi::CString::new(full_source(src)).map_err(|e| KernelError::Device(e.to_string()))?;
    let name = std::ffi::CString::new(src.file).map_err(|e| KernelError::Device(e.to_string()))?;
    let prog =
        result::create_program(&code, Some(&name)).map_err(|e| KernelError::Device(format!("{}: {e:?}", src.file)))?;
    let mut opts = vec![format!("--gpu-architecture={arch}"), "--std=c++17".to_string(), "-default-device".to_string()];
    if verbose_ptxas {
        opts.push("--ptxas-options=--verbose".into());
    }
    opts.extend(include_paths.iter().map(|p| format!("--include-path={p}")));
    // SAFETY: `prog` was just created and is destroyed exactly once below.
    let compiled = unsafe { result::compile_program(prog, &opts) };
    // SAFETY: `prog` is live.
    let log = unsafe { result::get_program_log(prog) }
        .map(|raw| {
            // SAFETY: NVRTC returns a NUL-terminated log.
            unsafe { CStr::from_ptr(raw.as_ptr()) }.to_string_lossy().into_owned()
        })
        .unwrap_or_default();
    let ptx = match compiled {
        Err(e) => {
            // SAFETY: `prog` is live and not used again.
            let _ = unsafe { result::destroy_program(prog) };
            return Err(KernelError::Device(format!("NVRTC failed on {} for {arch}: {e:?}\n{log}", src.file)));
        }
        Ok(()) if arch.starts_with("compute_") => {
            // SAFETY: compilation succeeded for a virtual architecture, so PTX exists.
            let raw = unsafe { result::get_ptx(prog) }.map_err(|e| KernelError::Device(format!("{e:?}")))?;
            // SAFETY: NVRTC returns NUL-terminated PTX.
            unsafe { CStr::from_ptr(raw.as_ptr()) }.to_string_lossy().into_owned()
        }
        Ok(()) => String::new(),
    };
    // SAFETY: `prog` is live and not used again.
    let _ = unsafe { result::destroy_program(prog) };
    Ok(Compiled { ptx, log })
}

/// Where compiled PTX is cached: `$BERT2BERT_CACHE` or `~/.cache/bert2bert/ptx`.
fn cache_dir() -> Option<PathBuf> {
    if let Ok(d) = std::env::var("BERT2BERT_CACHE") {
        return Some(PathBuf::from(d).join("ptx"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/bert2bert/ptx"))
}

/// FNV-1a over the source and options: stable across runs and Rust versions.
fn content_hash(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0)) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// PTX for `src` on `arch`, from the disk cache when the same source was compiled before.
pub fn cached_ptx(src: &KernelSource, arch: &str, include_paths: &[String]) -> Result<String> {
    // The key covers everything that changes the output we control; a different NVRTC build is
    // not in it (NVRTC has no version query in cudarc), so clear the cache after changing NVRTC.
    let includes = include_paths.join(":");
    let key =
        format!("{}-{:016x}.ptx", src.file.trim_end_matches(".cu"), content_hash(&[COMMON, src.code, arch, &includes]));
    let path = cache_dir().map(|d| d.join(&key));
    if let Some(Ok(ptx)) = path.as_ref().map(std::fs::read_to_string) {
        return Ok(ptx);
    }
    let ptx = compile(src, arch, false, include_paths)?.ptx;
    if let Some(p) = &path {
        // A cache write failure only costs a recompile next time.
        if let Some(dir) = p.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let tmp = p.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, &ptx).is_ok() {
            let _ = std::fs::rename(&tmp, p);
        }
    }
    Ok(ptx)
}

/// Compile every kernel family for `arch` into the PTX cache, so a machine without NVRTC (or
/// with a newer NVRTC than its driver accepts) can load them: copy the cache directory there and
/// point `BERT2BERT_CACHE` at it. Returns the cache directory.
pub fn precompile_all(arch: &str) -> Result<PathBuf> {
    let dir = cache_dir().ok_or_else(|| KernelError::Unavailable("no cache directory: set BERT2BERT_CACHE".into()))?;
    for src in super::SOURCES {
        cached_ptx(src, arch, &super::include_paths())?;
    }
    Ok(dir)
}
