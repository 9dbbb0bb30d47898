//! Compile checks for the CUDA kernels, without a GPU: NVRTC alone (pip `nvidia-cuda-nvrtc`,
//! installed by `scripts/setup_nvrtc.sh`) compiles every kernel family and checks that
//! - the entry points each `KernelSource` lists are exactly the kernels its PTX defines, on
//!   compute_90 and compute_80, and exactly the `extern "C" __global__` functions of its source;
//! - no kernel spills registers on sm_90 (ptxas report; `MAY_SPILL` lists deliberate exceptions).
//!
//! Without NVRTC the compile tests print a skip note and pass, unless `B2B_REQUIRE_NVRTC=1`
//! (set by `scripts/test.sh`), where they fail. `cargo test -p kernels --test nvrtc -- --nocapture`
//! prints the register/spill table.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use kernels::cuda::SOURCES;
use kernels::cuda::compile::{Compiled, compile, nvrtc_present};

/// Kernels allowed to spill on sm_90 (none today; add a name with a comment saying why).
const MAY_SPILL: &[&str] = &[];

/// Virtual architectures whose PTX must hold every entry point.
const PTX_ARCHS: &[&str] = &["compute_90", "compute_80"];

/// Real architecture for the ptxas register and spill report.
const SASS_ARCH: &str = "sm_90";

/// Whether NVRTC can be used; without it, a skip note, or a failure under `B2B_REQUIRE_NVRTC=1`.
fn nvrtc_or_skip(test: &str) -> bool {
    if nvrtc_present() {
        return true;
    }
    let required = std::env::var("B2B_REQUIRE_NVRTC").is_ok_and(|v| v == "1");
    assert!(
        !required,
        "B2B_REQUIRE_NVRTC=1 but the NVRTC library (libnvrtc.so*) cannot be loaded: run \
         scripts/setup_nvrtc.sh and `. .deps/cuda13/env.sh` (puts its lib dir on LD_LIBRARY_PATH); \
         LD_LIBRARY_PATH is {:?}",
        std::env::var("LD_LIBRARY_PATH").unwrap_or_default()
    );
    eprintln!("{test}: SKIPPED, NVRTC not found (run scripts/setup_nvrtc.sh and source .deps/cuda13/env.sh)");
    false
}

/// Include paths as the backend reads them (`BERT2BERT_CUDA_INCLUDE`, colon separated).
fn include_paths() -> Vec<String> {
    std::env::var("BERT2BERT_CUDA_INCLUDE")
        .map(|p| p.split(':').filter(|s| !s.is_empty()).map(String::from).collect())
        .unwrap_or_default()
}

/// Names of the kernels a PTX module defines (`.visible .entry NAME(` or `.weak .entry NAME(`).
fn ptx_entries(ptx: &str) -> BTreeSet<String> {
    ptx.lines()
        .filter_map(|line| {
            let line = line.trim_start();
            let rest = line.strip_prefix(".visible .entry ").or_else(|| line.strip_prefix(".weak .entry "))?;
            let end = rest.find('(')?;
            Some(rest[..end].trim().to_string())
        })
        .collect()
}

/// `code` without comments, without the text of string and char literals (but `"C"` stays, for
/// `extern "C"`), and without preprocessor lines (a kernel made by a macro is caught by the PTX check instead).
fn strip_comments_and_directives(code: &str) -> String {
    let bytes = code.as_bytes();
    let mut out = String::with_capacity(code.len());
    let mut i = 0;
    let mut line_start = true;
    let mut in_directive = false;
    while i < bytes.len() {
        let c = bytes[i];
        if c == b'/' && bytes.get(i + 1) == Some(&b'/') {
            while i < bytes.len() && bytes[i] != b'\n' {
                i += 1;
            }
            continue;
        }
        if c == b'/' && bytes.get(i + 1) == Some(&b'*') {
            i += 2;
            while i < bytes.len() && !(bytes[i] == b'*' && bytes.get(i + 1) == Some(&b'/')) {
                i += 1;
            }
            i += 2;
            out.push(' ');
            continue;
        }
        if c == b'"' || c == b'\'' {
            let start = i;
            i += 1;
            while i < bytes.len() && bytes[i] != c {
                i += if bytes[i] == b'\\' { 2 } else { 1 };
            }
            i = (i + 1).min(bytes.len());
            // Keep `"C"` (for `extern "C"`); other literals lose their text, so a brace or a
            // parenthesis inside a string cannot upset the matching below.
            if !in_directive {
                let literal = &code[start..i];
                out.push_str(if literal == "\"C\"" {
                    literal
                } else if c == b'"' {
                    "\"\""
                } else {
                    "' '"
                });
            }
            line_start = false;
            continue;
        }
        if line_start && c == b'#' {
            in_directive = true;
        }
        if c == b'\n' {
            // A directive goes on past a line that ends in a backslash.
            if in_directive && code[..i].trim_end_matches([' ', '\t', '\r']).ends_with('\\') {
                i += 1;
                continue;
            }
            in_directive = false;
            line_start = true;
            out.push('\n');
            i += 1;
            continue;
        }
        if !c.is_ascii_whitespace() {
            line_start = false;
        }
        if !in_directive {
            out.push(c as char);
        }
        i += 1;
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Byte offsets of `word` in `text` as a whole identifier.
fn find_word(text: &str, word: &str) -> Vec<usize> {
    text.match_indices(word)
        .map(|(at, _)| at)
        .filter(|&at| {
            let before = text[..at].chars().next_back().is_none_or(|c| !is_ident(c));
            let after = text[at + word.len()..].chars().next().is_none_or(|c| !is_ident(c));
            before && after
        })
        .collect()
}

/// Index just past the `)` matching the `(` at `open`.
fn matching_paren(text: &str, open: usize) -> Option<usize> {
    let mut depth = 0usize;
    for (i, c) in text[open..].char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return Some(open + i + 1);
                }
            }
            _ => {}
        }
    }
    None
}

/// Byte ranges of the bodies of `extern "C" { ... }` blocks.
fn extern_c_blocks(text: &str) -> Vec<(usize, usize)> {
    let mut blocks = Vec::new();
    for at in find_word(text, "extern") {
        let rest = text[at + "extern".len()..].trim_start();
        let Some(rest) = rest.strip_prefix("\"C\"") else { continue };
        let rest_trim = rest.trim_start();
        if !rest_trim.starts_with('{') {
            continue;
        }
        let open = text.len() - rest_trim.len();
        let mut depth = 0usize;
        for (i, c) in text[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        blocks.push((open, open + i));
                        break;
                    }
                }
                _ => {}
            }
        }
    }
    blocks
}

/// A `__global__` function found in source text.
#[derive(Debug)]
struct SourceKernel {
    name: String,
    extern_c: bool,
}

/// Every `__global__` function *defined* (not just declared) in `code`, with its linkage.
fn source_kernels(code: &str) -> Vec<SourceKernel> {
    let text = strip_comments_and_directives(code);
    let blocks = extern_c_blocks(&text);
    let mut found = Vec::new();
    for at in find_word(&text, "__global__") {
        // The declaration starts after the previous `;`, `{` or `}`.
        let decl_start = text[..at].rfind([';', '{', '}']).map_or(0, |p| p + 1);
        let prefix = &text[decl_start..at];
        let extern_c = prefix.split_whitespace().collect::<Vec<_>>().windows(2).any(|w| w == ["extern", "\"C\""])
            || blocks.iter().any(|&(s, e)| s < at && at < e);
        // The name is the identifier before the first `(` that is not an attribute's argument
        // list (`__launch_bounds__(256)`, `__attribute__((...))`, `__declspec(...)`).
        let mut pos = at + "__global__".len();
        let mut name = None;
        while let Some(rel) = text[pos..].find('(') {
            let open = pos + rel;
            let ident: String = text[..open].trim_end().chars().rev().take_while(|&c| is_ident(c)).collect();
            let ident: String = ident.chars().rev().collect();
            let Some(close) = matching_paren(&text, open) else { break };
            if (ident.starts_with("__") && ident.ends_with("__")) || ident == "alignas" {
                pos = close;
                continue;
            }
            // A definition has its body next (`{`), possibly after trailing qualifiers.
            let after = text[close..].trim_start();
            if after.starts_with('{') {
                name = Some(ident);
            }
            break;
        }
        if let Some(name) = name.filter(|n| !n.is_empty()) {
            found.push(SourceKernel { name, extern_c });
        }
    }
    found
}

/// ptxas figures for one function.
#[derive(Clone, Debug, Default)]
struct Usage {
    registers: Option<u32>,
    shared: u64,
    stack: u64,
    spill_stores: u64,
    spill_loads: u64,
    entry: bool,
    /// This function's lines of the log, for failure messages.
    lines: Vec<String>,
}

/// The number before `unit` in `text` (`"1088 bytes stack frame"` with unit `bytes stack frame`).
fn number_before(text: &str, unit: &str) -> Option<u64> {
    let at = text.find(unit)?;
    text[..at].split([' ', ',', ':', '.']).rfind(|s| !s.is_empty())?.parse().ok()
}

/// Per-function usage from a `--ptxas-options=--verbose` log. The format (NVRTC 13.0):
/// ```text
/// ptxas info    : Compiling entry function 'spill_k' for 'sm_90'
/// ptxas info    : Function properties for spill_k
/// ptxas         .     1088 bytes stack frame, 124 bytes spill stores, 132 bytes spill loads
/// ptxas info    : Used 255 registers, used 0 barriers, 1088 bytes cumulative stack size
/// ```
/// `Function properties` also appears for non-inlined device functions (no `Used` line).
fn parse_ptxas(log: &str) -> BTreeMap<String, Usage> {
    let mut usage: BTreeMap<String, Usage> = BTreeMap::new();
    let mut entry: Option<String> = None;
    let mut props: Option<String> = None;
    for line in log.lines() {
        let Some(body) = line.strip_prefix("ptxas") else { continue };
        if line.contains("Compiling entry function '") {
            props = None;
        }
        let body = body.trim_start_matches([' ', '.']).trim_start_matches("info").trim_start();
        let body = body.strip_prefix(':').unwrap_or(body).trim();
        if let Some(rest) = body.strip_prefix("Compiling entry function '") {
            let name = rest.split('\'').next().unwrap_or_default().to_string();
            usage.entry(name.clone()).or_default().entry = true;
            entry = Some(name);
        } else if let Some(rest) = body.strip_prefix("Function properties for ") {
            let name = rest.trim().to_string();
            usage.entry(name.clone()).or_default();
            props = Some(name);
        } else if body.contains("bytes stack frame") {
            if let Some(u) = props.as_ref().and_then(|p| usage.get_mut(p)) {
                u.stack = number_before(body, "bytes stack frame").unwrap_or(0);
                u.spill_stores = number_before(body, "bytes spill stores").unwrap_or(0);
                u.spill_loads = number_before(body, "bytes spill loads").unwrap_or(0);
            }
        } else if body.starts_with("Used ")
            && body.contains(" registers")
            && let Some(u) = entry.as_ref().and_then(|e| usage.get_mut(e))
        {
            u.registers = number_before(body, "registers").map(|r| r as u32);
            u.shared = number_before(body, "bytes smem").unwrap_or(0);
        }
        if let Some(u) = props.as_ref().or(entry.as_ref()).and_then(|n| usage.get_mut(n)) {
            u.lines.push(line.to_string());
        }
    }
    usage
}

fn compile_checked(
    src: &kernels::cuda::KernelSource,
    arch: &str,
    verbose: bool,
) -> std::result::Result<Compiled, String> {
    compile(src, arch, verbose, &include_paths()).map_err(|e| format!("{} does not compile for {arch}:\n{e}", src.file))
}

#[test]
fn kernel_names_are_unique() {
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    let mut problems = Vec::new();
    for src in SOURCES {
        for &name in src.kernels {
            if let Some(first) = seen.insert(name, src.file) {
                problems.push(format!("kernel `{name}` is listed by both {first} and {}", src.file));
            }
        }
    }
    let mut files = BTreeSet::new();
    for src in SOURCES {
        if !files.insert(src.file) {
            problems.push(format!("file {} appears twice in SOURCES", src.file));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn source_kernels_are_listed() {
    let mut problems = Vec::new();
    for src in SOURCES {
        let listed: BTreeSet<&str> = src.kernels.iter().copied().collect();
        let found = source_kernels(src.code);
        if found.is_empty() && !src.kernels.is_empty() {
            problems.push(format!("{}: no __global__ definition found in the source (parser out of date?)", src.file));
        }
        for k in found {
            if !k.extern_c {
                problems.push(format!(
                    "{}: __global__ `{}` is not extern \"C\" (its name would be mangled)",
                    src.file, k.name
                ));
            } else if !listed.contains(k.name.as_str()) {
                problems.push(format!(
                    "{}: extern \"C\" __global__ `{}` is not in its KernelSource.kernels {:?}",
                    src.file, k.name, src.kernels
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn ptx_entries_match_kernel_lists() {
    if !nvrtc_or_skip("ptx_entries_match_kernel_lists") {
        return;
    }
    let mut problems = Vec::new();
    for src in SOURCES {
        for &arch in PTX_ARCHS {
            let compiled = match compile_checked(src, arch, false) {
                Ok(c) => c,
                Err(e) => {
                    problems.push(e);
                    continue;
                }
            };
            let entries = ptx_entries(&compiled.ptx);
            for &name in src.kernels {
                if !entries.contains(name) {
                    problems.push(format!(
                        "{} ({arch}): listed kernel `{name}` has no `.entry {name}(` in the PTX (entries: {entries:?})",
                        src.file
                    ));
                }
            }
            for e in &entries {
                if !src.kernels.contains(&e.as_str()) {
                    problems.push(format!("{} ({arch}): PTX entry `{e}` is not in KernelSource.kernels", src.file));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn no_register_spills_on_sm90() {
    if !nvrtc_or_skip("no_register_spills_on_sm90") {
        return;
    }
    let mut problems = Vec::new();
    let mut table = String::new();
    let _ = writeln!(
        table,
        "{:<20} {:<36} {:>5} {:>7} {:>7} {:>7} {:>7}",
        "file", "function", "regs", "smem", "stack", "spill_st", "spill_ld"
    );
    let mut shown_log = false;
    for src in SOURCES {
        let compiled = match compile_checked(src, SASS_ARCH, true) {
            Ok(c) => c,
            Err(e) => {
                problems.push(e);
                continue;
            }
        };
        if !shown_log {
            println!("ptxas log of {} for {SASS_ARCH}:\n{}", src.file, compiled.log.trim_end());
            shown_log = true;
        }
        for line in compiled.log.lines().filter(|l| l.contains("warning")) {
            println!("{}: {line}", src.file);
        }
        let usage = parse_ptxas(&compiled.log);
        for &name in src.kernels {
            if !usage.get(name).is_some_and(|u| u.entry && u.registers.is_some()) {
                let reported: Vec<&String> = usage.iter().filter(|(_, u)| u.entry).map(|(n, _)| n).collect();
                problems.push(format!(
                    "{}: no ptxas report for listed kernel `{name}` (entries reported: {reported:?})",
                    src.file
                ));
            }
        }
        for (name, u) in &usage {
            let regs = u.registers.map_or_else(|| "-".to_string(), |r| r.to_string());
            let label = if u.entry { name.clone() } else { format!("{name} (device fn)") };
            let _ = writeln!(
                table,
                "{:<20} {:<36} {:>5} {:>7} {:>7} {:>8} {:>8}",
                src.file, label, regs, u.shared, u.stack, u.spill_stores, u.spill_loads
            );
            let spills = u.spill_stores + u.spill_loads > 0;
            if spills && !MAY_SPILL.contains(&name.as_str()) {
                let excerpt = &u.lines;
                problems.push(format!(
                    "{}: `{name}` spills on {SASS_ARCH} ({} bytes stores, {} bytes loads, {} registers, {} bytes stack):\n  {}",
                    src.file,
                    u.spill_stores,
                    u.spill_loads,
                    regs,
                    u.stack,
                    excerpt.join("\n  ")
                ));
            }
        }
    }
    println!("ptxas usage on {SASS_ARCH}:\n{table}");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

mod parsing {
    use super::*;

    #[test]
    fn finds_entries_exactly() {
        let ptx = ".visible .entry add_f(\n.param .u64 a\n)\n.visible .entry add_f2(\n)\n.weak .entry _Z1kILi3EEvPf(\n";
        let e = ptx_entries(ptx);
        assert_eq!(e.into_iter().collect::<Vec<_>>(), ["_Z1kILi3EEvPf", "add_f", "add_f2"]);
    }

    #[test]
    fn finds_source_kernels() {
        let code = r#"
// extern "C" __global__ void commented(float* x) {}
/* extern "C" __global__ void block_commented(float* x) {} */
#define MAKE(name) extern "C" __global__ void name(float* x) { x[0] = 1; }
extern "C" __global__ void plain(float* x, int n) { if (n) x[0] = 0; }
extern "C" __global__ void __launch_bounds__(256, 2) bounded(const float* __restrict__ x) {}
extern "C" __global__ __launch_bounds__(128) void bounded_first(float* x)
{
}
extern "C" __global__ void declared_only(float* x);
__global__ void mangled(float* x) {}
extern "C" {
__global__ void in_block(float* x) { const char* s = "}"; }
}
template <int N> __global__ void templ(float* x) {}
"#;
        let ks = source_kernels(code);
        let names: Vec<(&str, bool)> = ks.iter().map(|k| (k.name.as_str(), k.extern_c)).collect();
        assert_eq!(
            names,
            [
                ("plain", true),
                ("bounded", true),
                ("bounded_first", true),
                ("mangled", false),
                ("in_block", true),
                ("templ", false)
            ]
        );
    }

    #[test]
    fn parses_ptxas_log() {
        let log = "ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'spill_k' for 'sm_90'
ptxas info    : Function properties for spill_k
ptxas         .     1088 bytes stack frame, 124 bytes spill stores, 132 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers, 1088 bytes cumulative stack size
ptxas info    : Compile time = 229.906 ms
ptxas info    : Function properties for helper
ptxas         .     16 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
ptxas info    : Compiling entry function 'small_k' for 'sm_90'
ptxas info    : Function properties for small_k
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 8 registers, used 1 barriers, 4096 bytes smem
";
        let u = parse_ptxas(log);
        let s = &u["spill_k"];
        assert!(s.entry);
        assert_eq!((s.registers, s.stack, s.spill_stores, s.spill_loads), (Some(255), 1088, 124, 132));
        let h = &u["helper"];
        assert!(!h.entry);
        assert_eq!((h.registers, h.spill_stores, h.spill_loads), (None, 8, 8));
        assert_eq!(s.lines.len(), 5);
        assert_eq!(h.lines.len(), 2);
        let k = &u["small_k"];
        assert_eq!((k.registers, k.shared, k.spill_stores), (Some(8), 4096, 0));
    }
}
