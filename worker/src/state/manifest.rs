//! `manifest.json` (format, owning job, size and SHA-256 of every file), and what is decided
//! from it: which checkpoints a job may resume from, prune, or must refuse to start over.
//!
//! Untrusted input: a manifest is read only when it is a regular file of at most
//! `MANIFEST_MAX` bytes; every entry must name a regular file directly inside its directory
//! (no separators, no `..`, no symlinks), and its size is checked before a byte is hashed, so
//! an entry naming `/dev/zero` or a huge file is refused at once.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use model::checkpoint::{self, WRITER_FILE};
use model::{Error, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{MANIFEST_FILE, STATE_FILE, io, write_synced};

pub const FORMAT: &str = "bert2bert-checkpoint-1";
/// A real manifest lists a handful of files: a few hundred bytes.
const MANIFEST_MAX: u64 = 1 << 20;

/// The job a checkpoint belongs to: its name, and the coordinator's job id when it ran under
/// one. Written into every manifest (and the temp directory's writer file).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobOwner {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

impl JobOwner {
    /// A local run (`bert2bert train`): no coordinator job id.
    pub fn local(name: &str) -> Self {
        JobOwner { name: name.to_owned(), id: None }
    }

    /// Same job: same name, and the same coordinator job id where both have one. A local run
    /// has none, so re-running `train job.yaml` resumes what the same-named job wrote; two
    /// coordinator jobs are never the same job, even with one name.
    pub fn is_same_job(&self, other: &JobOwner) -> bool {
        self.name == other.name && (self.id.is_none() || other.id.is_none() || self.id == other.id)
    }

    /// For error messages: the name and id when they are short plain words, since they come
    /// from a file on disk and messages must not echo arbitrary file contents.
    pub fn describe(&self) -> String {
        let plain = |s: &str| {
            s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:@".contains(&b)) && !s.is_empty()
        };
        let name = if plain(&self.name) { format!("job `{}`", self.name) } else { "a job".to_owned() };
        match &self.id {
            Some(id) if plain(id) => format!("{name} ({id})"),
            _ => name,
        }
    }

    /// The writer-file content of this job's temp directories.
    pub fn writer_tag(&self) -> String {
        serde_json::to_string(self).expect("a JobOwner serialises")
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    /// `None`: written before checkpoints recorded their job (treated as another job's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobOwner>,
    pub files: BTreeMap<String, FileEntry>,
}

impl Manifest {
    /// True when the manifest names `me`'s job.
    pub fn is_owned_by(&self, me: &JobOwner) -> bool {
        self.job.as_ref().is_some_and(|j| j.is_same_job(me))
    }

    /// Who wrote it, for messages.
    pub fn owner_description(&self) -> String {
        match &self.job {
            Some(j) => j.describe(),
            None => "a job of an older bert2bert (no job recorded)".to_owned(),
        }
    }
}

/// A name that `dir.join(name)` keeps inside `dir`.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && name.len() <= 255 && !name.contains(['/', '\\', '\0'])
}

/// Hash `path`, which must be a regular file of exactly `want` bytes (checked before reading).
fn sha256_file(path: &Path, want: Option<u64>) -> Result<(u64, String)> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| match e.kind() {
        // Listed but gone: a damaged checkpoint, like a wrong size.
        std::io::ErrorKind::NotFound => Error::input(path, "listed in manifest.json but missing"),
        _ => Error::io(path, e),
    })?;
    if !meta.is_file() {
        return Err(Error::input(path, "is not a regular file"));
    }
    let f = std::fs::File::open(path).map_err(io(path))?;
    let len = f.metadata().map_err(io(path))?.len();
    if want.is_some_and(|w| w != len) {
        return Err(Error::input(path, "size differs from manifest.json: the checkpoint is damaged"));
    }
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let (mut total, mut r) = (0u64, f.take(len));
    loop {
        let n = r.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    let hex = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok((total, hex))
}

/// Hash every file of `dir` into `manifest.json`, naming `owner`; call it last.
pub fn write_manifest(dir: &Path, owner: &JobOwner) -> Result<()> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == MANIFEST_FILE || !entry.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let (bytes, sha256) = sha256_file(&entry.path(), None)?;
        files.insert(name, FileEntry { bytes, sha256 });
    }
    let manifest = Manifest { format: FORMAT.to_owned(), job: Some(owner.clone()), files };
    write_synced(&dir.join(MANIFEST_FILE), serde_json::to_string_pretty(&manifest).expect("json").as_bytes())
}

/// Parse `dir/manifest.json` and check its shape (format, plain names, the files a checkpoint
/// needs), without reading the files it lists.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST_FILE);
    let meta = std::fs::symlink_metadata(&path).map_err(io(&path))?;
    if !meta.is_file() || meta.len() > MANIFEST_MAX {
        return Err(Error::input(&path, format!("not a regular file of at most {MANIFEST_MAX} bytes")));
    }
    let mut bytes = Vec::new();
    std::fs::File::open(&path).map_err(io(&path))?.take(MANIFEST_MAX + 1).read_to_end(&mut bytes).map_err(io(&path))?;
    if bytes.len() as u64 > MANIFEST_MAX {
        return Err(Error::input(&path, format!("larger than {MANIFEST_MAX} bytes")));
    }
    // serde_json's messages can quote the file's strings: give the position only.
    let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| {
        Error::input(&path, format!("not a checkpoint manifest (line {}, column {})", e.line(), e.column()))
    })?;
    if m.format != FORMAT {
        return Err(Error::input(&path, format!("unknown `format` (expected {FORMAT})")));
    }
    if let Some(bad) = m.files.keys().find(|n| !is_plain_name(n)) {
        let shown = if bad.len() <= 64 { bad.as_str() } else { "(a long name)" };
        return Err(Error::input(&path, format!("entry `{shown}` is not a file name inside the checkpoint")));
    }
    for required in ["config.json", "model.safetensors", STATE_FILE] {
        if !m.files.contains_key(required) {
            return Err(Error::input(&path, format!("does not list `{required}`")));
        }
    }
    Ok(m)
}

/// `read_manifest`, then check the size and SHA-256 of every file it lists.
pub fn verify_manifest(dir: &Path) -> Result<Manifest> {
    let m = read_manifest(dir)?;
    verify_files(dir, &m)?;
    Ok(m)
}

/// Checks the size and SHA-256 of every file `m` (read from `dir`) lists.
fn verify_files(dir: &Path, m: &Manifest) -> Result<()> {
    for (name, want) in &m.files {
        let file = dir.join(name);
        let (bytes, sha) = sha256_file(&file, Some(want.bytes))?;
        if bytes != want.bytes || sha != want.sha256 {
            return Err(Error::input(&file, "size or SHA-256 differs from manifest.json: the checkpoint is damaged"));
        }
    }
    Ok(())
}

/// What a verified checkpoint looked like on disk: size and mtime of its manifest and of every
/// file the manifest lists.
type Fingerprint = Vec<(String, u64, Option<SystemTime>)>;

/// Checkpoints this process has verified, by directory. Pruning runs after every save and must
/// only count checkpoints that verify; without this it would re-hash `keep` checkpoints (a few
/// GB for a real model) at every save. A checkpoint whose files changed size or mtime since is
/// hashed again. Resuming (`latest_owned`) never uses the cache.
static VERIFIED: Mutex<Option<HashMap<PathBuf, Fingerprint>>> = Mutex::new(None);

fn fingerprint(dir: &Path, m: &Manifest) -> Option<Fingerprint> {
    let names = m.files.keys().map(String::as_str).chain([MANIFEST_FILE]);
    names
        .map(|name| {
            let meta = std::fs::symlink_metadata(dir.join(name)).ok().filter(|m| m.is_file())?;
            Some((name.to_owned(), meta.len(), meta.modified().ok()))
        })
        .collect()
}

/// The cache of verified checkpoints (a poisoned lock only means another thread panicked
/// mid-insert; the map is still usable).
fn verified() -> std::sync::MutexGuard<'static, Option<HashMap<PathBuf, Fingerprint>>> {
    VERIFIED.lock().unwrap_or_else(|p| p.into_inner())
}

/// `verify_manifest`, skipping the hashing when this process already verified the directory
/// and none of its files changed size or mtime since.
fn verify_manifest_cached(dir: &Path, m: &Manifest) -> bool {
    let now = fingerprint(dir, m);
    if now.is_some() && verified().get_or_insert_with(HashMap::new).get(dir) == now.as_ref() {
        return true;
    }
    let ok = verify_files(dir, m).is_ok();
    let mut cache = verified();
    let cache = cache.get_or_insert_with(HashMap::new);
    match now {
        Some(f) if ok => cache.insert(dir.to_path_buf(), f),
        _ => cache.remove(dir),
    };
    ok
}

/// Checkpoint directories `step-NNNNNNNN` under `root` (real directories, not symlinks),
/// oldest first.
pub fn list_checkpoints(root: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = step_of(&name)?;
            e.file_type().is_ok_and(|t| t.is_dir()).then(|| (step, e.path()))
        })
        .collect();
    out.sort();
    out
}

fn step_of(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())).then(|| digits.parse().ok())?
}

pub fn checkpoint_dir(root: &Path, step: u64) -> PathBuf {
    root.join(format!("step-{step:08}"))
}

/// The newest checkpoint of `me`'s job whose manifest verifies; damaged ones are reported and
/// skipped, other jobs' ignored.
pub fn latest_owned(root: &Path, me: &JobOwner) -> Option<PathBuf> {
    for (_, dir) in list_checkpoints(root).into_iter().rev() {
        let checked = read_manifest(&dir)
            .and_then(|m| if m.is_owned_by(me) { verify_files(&dir, &m).map(|()| true) } else { Ok(false) });
        match checked {
            Ok(true) => return Some(dir),
            Ok(false) => {}
            Err(e) => tracing::warn!("skipping checkpoint: {e}"),
        }
    }
    None
}

/// Checkpoints in `root` whose manifest reads and names another job (or none), with who wrote
/// them, oldest first. Directories without a readable manifest are not checkpoints of anyone.
pub fn foreign_checkpoints(root: &Path, me: &JobOwner) -> Vec<(PathBuf, String)> {
    list_checkpoints(root)
        .into_iter()
        .filter_map(|(_, dir)| {
            let m = read_manifest(&dir).ok()?;
            (!m.is_owned_by(me)).then(|| (dir, m.owner_description()))
        })
        .collect()
}

/// Deletes `me`'s checkpoints beyond the newest `keep` (at least 1) that verify. Only
/// directories whose manifest verifies and names `me`'s job count or are deleted, and only the
/// files their manifest lists go (then the directory, if nothing else is inside). Returns the
/// directories deleted.
pub fn prune(root: &Path, keep: usize, me: &JobOwner) -> Result<Vec<PathBuf>> {
    let mut kept = 0usize;
    let mut deleted = Vec::new();
    for (_, dir) in list_checkpoints(root).into_iter().rev() {
        let m = match read_manifest(&dir) {
            Ok(m) if m.is_owned_by(me) => m,
            _ => continue,
        };
        if !verify_manifest_cached(&dir, &m) {
            continue;
        }
        if kept < keep.max(1) {
            kept += 1;
            continue;
        }
        // Renamed aside first: a crash part way leaves a `.old.` directory that the next start
        // removes (`remove_stale_partials`), never a half-deleted `step-` directory.
        let names: Vec<String> = m.files.keys().cloned().chain([MANIFEST_FILE.to_owned()]).collect();
        verified().get_or_insert_with(HashMap::new).remove(&dir);
        if checkpoint::remove_checkpoint_dir(&dir, &names)? {
            deleted.push(dir);
        } else {
            tracing::warn!("{}: pruned; files it did not list are left in place", dir.display());
        }
    }
    Ok(deleted)
}

/// Removes this job's partial checkpoint directories (`step-NNNNNNNN.tmp.<writer>` and
/// `.old.<writer>`) left by a killed or failed save: only those whose writer file names this job
/// and that hold nothing but files a checkpoint save writes.
pub fn remove_stale_partials(root: &Path, me: &JobOwner) -> Result<Vec<PathBuf>> {
    let is_ours = |tag: &str| serde_json::from_str::<JobOwner>(tag).is_ok_and(|o| o.is_same_job(me));
    let removed = checkpoint::remove_stale_partials(
        root,
        |base| step_of(base).is_some(),
        is_ours,
        &[STATE_FILE, MANIFEST_FILE, WRITER_FILE],
    )?;
    for dir in &removed {
        tracing::info!("removed partial checkpoint {}", dir.display());
    }
    Ok(removed)
}
