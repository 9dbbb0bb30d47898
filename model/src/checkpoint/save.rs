//! Writing model and checkpoint directories without ever deleting what bert2bert did not write.
//!
//! Two ways in:
//! - `save_model_dir_opts` (`bert2bert init`): the target is new, empty, or a model directory
//!   (config.json + model.safetensors); anything else is refused unless `force`. An existing
//!   directory is written into file by file (temp file in the same directory, fsync, rename), so
//!   files that are not ours stay where they are.
//! - `save_model_dir_with` (checkpoints): the whole directory is built in `DIR.tmp.<writer>` and
//!   renamed over `DIR`, so a crash leaves the old checkpoint or the new one. An existing `DIR` is
//!   replaced only when it holds nothing but files of the names we write.
//!
//! Nothing here deletes recursively: a directory is emptied of the files we can name, then
//! removed with `rmdir`, which fails (and we leave it) when anything else is inside.

use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use super::{Checkpoint, write_safetensors};
use crate::error::{Error, Result};
use crate::tokenizer::{DECODER_TOKENIZER_FILE, Tokenizer};

/// The files a model save writes.
pub const MODEL_FILES: [&str; 4] = ["config.json", "model.safetensors", "tokenizer.json", DECODER_TOKENIZER_FILE];

/// Written first into every temp directory (and kept in checkpoints), holding the writer's
/// identity: a partial directory is only ever removed when this file says it is ours.
pub const WRITER_FILE: &str = ".bert2bert-writer";

/// The writer file is tiny; a larger one is not ours.
const WRITER_FILE_MAX: u64 = 4096;

/// `save_model_dir_opts` without `force`.
pub fn save_model_dir(dir: &Path, ck: &Checkpoint, tokenizer: Option<&Tokenizer>) -> Result<()> {
    save_model_dir_opts(dir, ck, tokenizer, false)
}

/// A directory holding config.json and model.safetensors as regular files (ours or HF's).
pub fn is_model_dir(dir: &Path) -> bool {
    ["config.json", "model.safetensors"].iter().all(|f| std::fs::metadata(dir.join(f)).is_ok_and(|m| m.is_file()))
}

/// Write a model directory for `bert2bert init`. A new path gets a directory built aside and
/// renamed in. An existing empty or model directory gets our files replaced one by one; any
/// other directory only with `force`, and a non-directory never. Files we do not write are left.
pub fn save_model_dir_opts(dir: &Path, ck: &Checkpoint, tokenizer: Option<&Tokenizer>, force: bool) -> Result<()> {
    check_params(ck)?;
    match std::fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let parent = parent_of(dir);
            std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
            build_aside(
                dir,
                "bert2bert init",
                |tmp| write_model_files(ck, tokenizer, &|n| tmp.join(n)).map(drop),
                |tmp| {
                    std::fs::remove_file(tmp.join(WRITER_FILE)).map_err(|e| Error::io(tmp, e))?;
                    sync_dir(tmp)?;
                    std::fs::rename(tmp, dir).map_err(|e| Error::io(dir, e))?;
                    sync_dir(&parent)
                },
            )
        }
        Err(e) => Err(Error::io(dir, e)),
        Ok(m) if !m.is_dir() => Err(Error::input(
            dir,
            "exists and is not a directory; refusing to replace it with a model directory (choose another path)",
        )),
        Ok(_) => {
            let empty = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?.next().is_none();
            if !(empty || force || is_model_dir(dir)) {
                return Err(Error::input(
                    dir,
                    "exists and is neither empty nor a model directory (config.json + model.safetensors); \
                     refusing to write into it (--force writes the model files into it and leaves the other files)",
                ));
            }
            write_in_place(dir, ck, tokenizer)
        }
    }
}

/// Write a checkpoint directory atomically: everything goes to `DIR.tmp.<writer>` first (the
/// writer file `writer` first of all), `extra` may add files there (training state, manifest),
/// and the directory is renamed over `DIR`. A crash leaves the old directory or the new one; a
/// failed write removes its temp directory. An existing `DIR` is replaced only if it holds
/// nothing but regular files named like the ones written now.
pub fn save_model_dir_with(
    dir: &Path,
    ck: &Checkpoint,
    tokenizer: Option<&Tokenizer>,
    writer: &str,
    extra: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    check_params(ck)?;
    let parent = parent_of(dir);
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    build_aside(
        dir,
        writer,
        |tmp| {
            write_model_files(ck, tokenizer, &|n| tmp.join(n))?;
            extra(tmp)?;
            sync_dir(tmp)
        },
        |tmp| swap_in(dir, tmp, &parent),
    )
}

/// Removes the partial directories `<base>.tmp.<writer>` / `<base>.old.<writer>` in `parent`
/// (left by a killed or failed save) that are provably ours: `base` passes `is_base`, the
/// writer file's content passes `is_ours`, and every entry is a regular file named like one we
/// write (`MODEL_FILES`, `known`, the writer file, or the safetensors crate's `.tmpXXXXXX`).
/// Anything else is left alone. Returns what was removed.
pub fn remove_stale_partials(
    parent: &Path,
    is_base: impl Fn(&str) -> bool,
    is_ours: impl Fn(&str) -> bool,
    known: &[&str],
) -> Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(parent) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(parent, e)),
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(base) = partial_base(&name) else { continue };
        let path = entry.path();
        if !is_base(base) || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let writer = read_writer_file(&path);
        let names = match writer.as_deref().filter(|w| is_ours(w)).map(|_| plain_file_names(&path)) {
            Some(Ok(names)) if names.iter().all(|n| is_our_file_name(n, known)) => names,
            _ => {
                tracing::warn!("{}: looks like a partial checkpoint but is not provably ours; left", path.display());
                continue;
            }
        };
        if remove_named_then_dir(&path, &names)? {
            removed.push(path);
        }
    }
    Ok(removed)
}

// ---- helpers ----

fn check_params(ck: &Checkpoint) -> Result<()> {
    if ck.params.len() == ck.table.storage_len {
        return Ok(());
    }
    Err(Error::Other(format!(
        "checkpoint holds {} parameters but its table needs {}",
        ck.params.len(),
        ck.table.storage_len
    )))
}

fn parent_of(dir: &Path) -> PathBuf {
    match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Creates `DIR.tmp.<unique>` with the writer file, runs `fill` then `finish` on it, and on any
/// error removes what it wrote there.
fn build_aside(
    dir: &Path,
    writer: &str,
    fill: impl FnOnce(&Path) -> Result<()>,
    finish: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    // Two processes may save the same directory at once (a stopped rank 0 that wakes up while its
    // replacement checkpoints the same step), so each writer gets temp names of its own.
    let tmp = sibling(dir, &format!("tmp.{}", writer_suffix()))?;
    std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let result =
        write_synced(&tmp.join(WRITER_FILE), writer.as_bytes()).and_then(|()| fill(&tmp)).and_then(|()| finish(&tmp));
    if result.is_err() {
        // Ours alone (a fresh unique name): whatever regular files it holds, we wrote.
        if let Ok(names) = plain_file_names(&tmp) {
            let _ = remove_named_then_dir(&tmp, &names);
        }
    }
    result
}

/// config.json, model.safetensors and tokenizer.json (and the decoder's tokenizer when it has
/// its own vocabulary), each at `path(name)`.
fn write_model_files(
    ck: &Checkpoint,
    tokenizer: Option<&Tokenizer>,
    path: &dyn Fn(&str) -> PathBuf,
) -> Result<Vec<&'static str>> {
    let cfg = serde_json::to_string_pretty(&ck.config.to_value()).expect("a JSON value serialises");
    // Aliases are written too (same values) so transformers finds every key it expects; the
    // tied LM projection is not in the table, so it is left out as transformers does.
    let tensors: Vec<(String, Vec<usize>, &[f32])> =
        ck.table.entries.iter().map(|e| (e.name.clone(), e.shape.clone(), &ck.params[e.range()])).collect();
    write_safetensors(&path("model.safetensors"), &tensors)?;
    let mut written = vec!["model.safetensors"];
    if let Some(tok) = tokenizer {
        write_synced(&path("tokenizer.json"), tok.to_json_string()?.as_bytes())?;
        written.push("tokenizer.json");
        if let Some(decoder) = tok.decoder_json_string()? {
            write_synced(&path(DECODER_TOKENIZER_FILE), decoder.as_bytes())?;
            written.push(DECODER_TOKENIZER_FILE);
        }
    }
    // The config last: the rename order below follows this list, so a crash part way leaves the
    // old config, which then disagrees with the new weights loudly (shapes) or not at all.
    write_synced(&path("config.json"), cfg.as_bytes())?;
    written.push("config.json");
    Ok(written)
}

/// Our files into an existing directory, each through `.NAME.tmp.<writer>` + fsync + rename.
fn write_in_place(dir: &Path, ck: &Checkpoint, tokenizer: Option<&Tokenizer>) -> Result<()> {
    // A decoder tokenizer left by an earlier model of two vocabularies would be loaded with this
    // one-vocabulary model; it may not be ours to delete, so refuse and name it.
    let stale = dir.join(DECODER_TOKENIZER_FILE);
    if tokenizer.is_some_and(|t| !t.two_vocabularies()) && std::fs::symlink_metadata(&stale).is_ok() {
        return Err(Error::input(
            &stale,
            "is the decoder tokenizer of another model, and this model has one vocabulary; \
             move it away or write to another directory",
        ));
    }
    let suffix = writer_suffix();
    let tmp = |name: &str| dir.join(format!(".{name}.tmp.{suffix}"));
    let result = write_model_files(ck, tokenizer, &tmp).and_then(|written| {
        for name in written {
            std::fs::rename(tmp(name), dir.join(name)).map_err(|e| Error::io(dir.join(name), e))?;
        }
        sync_dir(dir)
    });
    if result.is_err() {
        for name in MODEL_FILES {
            let _ = std::fs::remove_file(tmp(name));
        }
    }
    result
}

/// Renames `tmp` over `dir`: the current `dir` (if any, and only if it holds nothing but files
/// named like ours) is moved aside to `DIR.old.<writer>`, ours moved in, the old one emptied of
/// our files and removed.
fn swap_in(dir: &Path, tmp: &Path, parent: &Path) -> Result<()> {
    let ours: HashSet<String> = plain_file_names(tmp)?.into_iter().collect();
    let old = sibling(dir, &format!("old.{}", writer_suffix()))?;
    // A concurrent writer can slip its directory in between our two renames; then ours no
    // longer fits (ENOTEMPTY) and we swap again.
    let mut attempts = 0;
    let mut moved_aside = false;
    loop {
        attempts += 1;
        check_replaceable(dir, &ours)?;
        match std::fs::rename(dir, &old) {
            Ok(()) => moved_aside = true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(dir, e)),
        }
        match std::fs::rename(tmp, dir) {
            Ok(()) => break,
            Err(e)
                if attempts < 16
                    && matches!(
                        e.kind(),
                        std::io::ErrorKind::DirectoryNotEmpty | std::io::ErrorKind::AlreadyExists
                    ) =>
            {
                // `old` is taken now; the next swap needs a fresh name.
                if moved_aside {
                    clear_old(&old, &ours)?;
                    moved_aside = false;
                }
            }
            Err(e) => return Err(Error::io(dir, e)),
        }
    }
    sync_dir(parent)?;
    if moved_aside {
        clear_old(&old, &ours)?;
    }
    Ok(())
}

fn clear_old(old: &Path, ours: &HashSet<String>) -> Result<()> {
    let names: Vec<String> = plain_file_names(old)?.into_iter().filter(|n| ours.contains(n)).collect();
    remove_named_then_dir(old, &names).map(|_| ())
}

/// Ok when `dir` is absent, or a directory holding only regular files named in `ours`.
fn check_replaceable(dir: &Path, ours: &HashSet<String>) -> Result<()> {
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(dir, e)),
        Ok(m) if !m.is_dir() => {
            return Err(Error::input(dir, "exists and is not a directory; refusing to replace it"));
        }
        Ok(_) => {}
    }
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(entry.file_type().is_ok_and(|t| t.is_file()) && ours.contains(&name)) {
            return Err(Error::input(
                dir,
                format!("exists and holds `{name}`, which bert2bert does not write; refusing to replace it"),
            ));
        }
    }
    Ok(())
}

/// Names of the entries of `dir`; an error if any is not a regular file.
fn plain_file_names(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !entry.file_type().is_ok_and(|t| t.is_file()) {
            return Err(Error::input(dir, format!("holds `{name}`, which is not a regular file")));
        }
        names.push(name);
    }
    Ok(names)
}

/// Deletes the whole checkpoint directory `dir`, whose files are `names`, so that a crash part
/// way leaves nothing that looks like a checkpoint: it is renamed to `DIR.old.<writer>` first
/// (one atomic step), then emptied, its writer file last (so that [`remove_stale_partials`] can
/// still prove it ours and finish), and removed. A directory that also holds anything else is
/// neither moved nor removed: only `names` are unlinked in place, and the result is false.
pub fn remove_checkpoint_dir(dir: &Path, names: &[String]) -> Result<bool> {
    let only_ours = match plain_file_names(dir) {
        Ok(present) => present.iter().all(|n| names.contains(n)),
        Err(_) if !dir.exists() => return Ok(true),
        Err(_) => false,
    };
    if !only_ours {
        return remove_named_then_dir(dir, names);
    }
    let old = sibling(dir, &format!("old.{}", writer_suffix()))?;
    match std::fs::rename(dir, &old) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(true),
        Err(e) => return Err(Error::io(dir, e)),
    }
    sync_dir(&parent_of(dir))?;
    remove_named_then_dir(&old, names)
}

/// Unlinks `names` in `dir` (its writer file last), then `rmdir`s it. False (with a warning)
/// when something else is still inside: it is not ours to delete.
fn remove_named_then_dir(dir: &Path, names: &[String]) -> Result<bool> {
    let (writer, others): (Vec<&String>, Vec<&String>) = names.iter().partition(|n| n.as_str() == WRITER_FILE);
    for name in others.into_iter().chain(writer) {
        match std::fs::remove_file(dir.join(name)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(dir.join(name), e)),
        }
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::DirectoryNotEmpty => {
            tracing::warn!("{}: holds files bert2bert did not write; left in place", dir.display());
            Ok(false)
        }
        Err(e) => Err(Error::io(dir, e)),
    }
}

fn read_writer_file(dir: &Path) -> Option<String> {
    let path = dir.join(WRITER_FILE);
    let meta = std::fs::symlink_metadata(&path).ok()?;
    if !meta.is_file() || meta.len() > WRITER_FILE_MAX {
        return None;
    }
    let mut s = String::new();
    File::open(&path).ok()?.take(WRITER_FILE_MAX).read_to_string(&mut s).ok()?;
    Some(s)
}

fn is_our_file_name(name: &str, known: &[&str]) -> bool {
    // `.tmpXXXXXX`: the safetensors crate writes through a tempfile in the same directory.
    let crate_tmp =
        name.strip_prefix(".tmp").is_some_and(|r| r.len() == 6 && r.bytes().all(|b| b.is_ascii_alphanumeric()));
    name == WRITER_FILE || MODEL_FILES.contains(&name) || known.contains(&name) || crate_tmp
}

/// `base` of `<base>.tmp.<writer>` / `<base>.old.<writer>`, with `<writer>` as `writer_suffix`
/// makes it (three dot-separated decimal numbers).
fn partial_base(name: &str) -> Option<&str> {
    let mut parts = name.rsplitn(5, '.');
    let nums: Vec<&str> = parts.by_ref().take(3).collect();
    let kind = parts.next()?;
    let base = parts.next()?;
    let numeric = nums.len() == 3 && nums.iter().all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    (numeric && (kind == "tmp" || kind == "old") && !base.is_empty()).then_some(base)
}

/// `DIR.suffix` next to `DIR`.
fn sibling(dir: &Path, suffix: &str) -> Result<PathBuf> {
    let name = dir
        .file_name()
        .ok_or_else(|| Error::input(dir, "cannot save a model here; name a directory to create or replace"))?;
    Ok(dir.with_file_name(format!("{}.{suffix}", name.to_string_lossy())))
}

/// `<pid>.<n>.<nanos>`: unique among the writers of one process and, with the pid, of one host.
fn writer_suffix() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    format!("{}.{n}.{nanos}", std::process::id())
}

pub(super) fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(|e| Error::io(path, e))
}

/// Make a rename or a new file's directory entry durable (Linux: fsync on the directory).
pub(super) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|f| f.sync_all()).map_err(|e| Error::io(dir, e))
}

#[cfg(test)]
mod tests {
    use super::partial_base;

    #[test]
    fn partial_names_need_our_writer_suffix() {
        assert_eq!(partial_base("step-00000003.tmp.12.0.345"), Some("step-00000003"));
        assert_eq!(partial_base("ck.old.1.2.3"), Some("ck"));
        for not in ["ck.tmp", "ck.tmp.1.2", "ck.tmp.1.2.x", "ck.new.1.2.3", ".tmp.1.2.3", "ck.tmp.1..3"] {
            assert_eq!(partial_base(not), None, "{not}");
        }
    }
}
