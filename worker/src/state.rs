//! Checkpoint directories: the model (HF layout) plus `training_state.safetensors` (AdamW moments,
//! step, seed, data cursor) and `manifest.json` (size and SHA-256 of every file).
//!
//! A checkpoint is written to a temp sibling `DIR.tmp.<writer>`, fsynced and renamed (model::checkpoint), with the
//! manifest written last inside it. Loading verifies the manifest, so a torn or tampered
//! directory is never taken for a valid one; resume picks the newest directory that verifies.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use model::pipeline::Cursor;
use model::{Error, Result};
use safetensors::tensor::TensorView;
use sha2::{Digest, Sha256};

pub const STATE_FILE: &str = "training_state.safetensors";
pub const MANIFEST_FILE: &str = "manifest.json";

/// What besides the model an exact resume needs.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainingState {
    /// Optimiser updates done.
    pub step: u64,
    /// Where the data order continues.
    pub cursor: Cursor,
    /// The job seed: data order and dropout masks are functions of (seed, step), so this and
    /// `step` are the whole RNG state.
    pub seed: u64,
    pub adam_m: Vec<f32>,
    pub adam_v: Vec<f32>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::io(path, e)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f32_view<'a>(name: &str, bytes: &'a [u8], n: usize) -> Result<(String, TensorView<'a>)> {
    let view = TensorView::new(safetensors::Dtype::F32, vec![n], bytes).map_err(|e| Error::Other(format!("{e}")))?;
    Ok((name.to_string(), view))
}

pub fn write_state(dir: &Path, st: &TrainingState) -> Result<()> {
    let path = dir.join(STATE_FILE);
    let (m, v) = (f32_bytes(&st.adam_m), f32_bytes(&st.adam_v));
    let tensors = vec![f32_view("adam.m", &m, st.adam_m.len())?, f32_view("adam.v", &v, st.adam_v.len())?];
    let meta: HashMap<String, String> = [
        ("step", st.step.to_string()),
        ("seed", st.seed.to_string()),
        ("cursor_epoch", st.cursor.epoch.to_string()),
        ("cursor_step_in_epoch", st.cursor.step_in_epoch.to_string()),
        ("format", "bert2bert-training-state-1".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let bytes =
        safetensors::serialize(tensors, Some(meta)).map_err(|e| Error::Other(format!("{}: {e}", path.display())))?;
    write_synced(&path, &bytes)
}

pub fn read_state(dir: &Path) -> Result<TrainingState> {
    let path = dir.join(STATE_FILE);
    let bytes = std::fs::read(&path).map_err(io(&path))?;
    let bad = |msg: String| Error::input(&path, msg);
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let meta = meta.metadata().clone().unwrap_or_default();
    let num = |key: &str| -> Result<u64> {
        meta.get(key)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| bad(format!("metadata `{key}` missing or not a number")))
    };
    let vec = |name: &str| -> Result<Vec<f32>> {
        let t = st.tensor(name).map_err(|_| bad(format!("missing tensor `{name}`")))?;
        if t.dtype() != safetensors::Dtype::F32 {
            return Err(bad(format!("tensor `{name}` is {:?}, expected F32", t.dtype())));
        }
        Ok(t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    };
    Ok(TrainingState {
        step: num("step")?,
        seed: num("seed")?,
        cursor: Cursor { epoch: num("cursor_epoch")?, step_in_epoch: num("cursor_step_in_epoch")? },
        adam_m: vec("adam.m")?,
        adam_v: vec("adam.v")?,
    })
}

fn sha256_file(path: &Path) -> Result<(u64, String)> {
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    let hex = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok((total, hex))
}

/// Hash every file of `dir` into `manifest.json`; call it last, after everything else is written.
pub fn write_manifest(dir: &Path) -> Result<()> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == MANIFEST_FILE || !entry.path().is_file() {
            continue;
        }
        let (bytes, sha256) = sha256_file(&entry.path())?;
        files.insert(name, serde_json::json!({ "bytes": bytes, "sha256": sha256 }));
    }
    let manifest = serde_json::json!({ "format": "bert2bert-checkpoint-1", "files": files });
    write_synced(&dir.join(MANIFEST_FILE), serde_json::to_string_pretty(&manifest).expect("json").as_bytes())
}

/// Check every file listed in the manifest (and that the manifest lists the model and state).
pub fn verify_manifest(dir: &Path) -> Result<()> {
    let path = dir.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::input(&path, format!("invalid JSON: {e}")))?;
    let files = v.get("files").and_then(|f| f.as_object()).ok_or_else(|| Error::input(&path, "no `files` object"))?;
    for required in ["config.json", "model.safetensors", STATE_FILE] {
        if !files.contains_key(required) {
            return Err(Error::input(&path, format!("does not list `{required}`")));
        }
    }
    for (name, want) in files {
        let file = dir.join(name);
        let (bytes, sha) = sha256_file(&file)?;
        if want.get("bytes").and_then(|b| b.as_u64()) != Some(bytes)
            || want.get("sha256").and_then(|s| s.as_str()) != Some(sha.as_str())
        {
            return Err(Error::input(&file, "size or SHA-256 differs from manifest.json: the checkpoint is damaged"));
        }
    }
    Ok(())
}

/// Checkpoint directories `step-NNNNNNNN` under `root`, oldest first.
pub fn list_checkpoints(root: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("step-")?.parse().ok()?;
            e.path().is_dir().then(|| (step, e.path()))
        })
        .collect();
    out.sort();
    out
}

pub fn checkpoint_dir(root: &Path, step: u64) -> PathBuf {
    root.join(format!("step-{step:08}"))
}

/// The newest checkpoint whose manifest verifies; damaged ones are reported and skipped.
pub fn latest_valid(root: &Path) -> Option<PathBuf> {
    for (_, dir) in list_checkpoints(root).into_iter().rev() {
        match verify_manifest(&dir) {
            Ok(()) => return Some(dir),
            Err(e) => tracing::warn!("skipping checkpoint: {e}"),
        }
    }
    None
}

/// Delete all but the newest `keep` checkpoints.
pub fn prune(root: &Path, keep: usize) -> Result<()> {
    let all = list_checkpoints(root);
    for (_, dir) in all.iter().take(all.len().saturating_sub(keep.max(1))) {
        std::fs::remove_dir_all(dir).map_err(io(dir))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> TrainingState {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
        TrainingState {
            step: t % 1000 + 1,
            cursor: Cursor { epoch: 3, step_in_epoch: t % 17 },
            seed: t,
            adam_m: (0..37).map(|i| kernels::rng::normal(t, i)).collect(),
            adam_v: (0..37).map(|i| kernels::rng::normal(t ^ 1, i).abs()).collect(),
        }
    }

    #[test]
    fn state_round_trips_and_manifest_catches_damage() {
        let d = tempfile::tempdir().unwrap();
        let st = state();
        write_state(d.path(), &st).unwrap();
        assert_eq!(read_state(d.path()).unwrap(), st);
        std::fs::write(d.path().join("config.json"), "{}").unwrap();
        std::fs::write(d.path().join("model.safetensors"), [1u8, 2, 3]).unwrap();
        write_manifest(d.path()).unwrap();
        verify_manifest(d.path()).unwrap();
        // Flip one byte of the model: the manifest must reject the directory.
        std::fs::write(d.path().join("model.safetensors"), [1u8, 2, 4]).unwrap();
        let e = verify_manifest(d.path()).unwrap_err().to_string();
        assert!(e.contains("model.safetensors") && e.contains("damaged"), "{e}");
    }

    #[test]
    fn latest_valid_skips_damaged_and_prune_keeps_newest() {
        let root = tempfile::tempdir().unwrap();
        for step in [10u64, 20, 30] {
            let dir = checkpoint_dir(root.path(), step);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("config.json"), "{}").unwrap();
            std::fs::write(dir.join("model.safetensors"), step.to_le_bytes()).unwrap();
            write_state(&dir, &state()).unwrap();
            write_manifest(&dir).unwrap();
        }
        std::fs::create_dir_all(root.path().join("step-00000040.tmp")).unwrap();
        std::fs::write(checkpoint_dir(root.path(), 30).join("model.safetensors"), b"torn").unwrap();
        assert_eq!(latest_valid(root.path()), Some(checkpoint_dir(root.path(), 20)));
        prune(root.path(), 2).unwrap();
        let left: Vec<u64> = list_checkpoints(root.path()).iter().map(|c| c.0).collect();
        assert_eq!(left, vec![20, 30]);
    }
}
