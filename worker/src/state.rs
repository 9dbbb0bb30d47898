//! Checkpoint directories: the model (HF layout) plus `training_state.safetensors` (AdamW moments,
//! step, seed, data cursor) and `manifest.json` (size and SHA-256 of every file).
//!
//! A checkpoint is written to a temp sibling `DIR.tmp.<writer>`, fsynced and renamed (model::checkpoint), with the
//! manifest written last inside it. Loading verifies the manifest, so a torn or tampered
//! directory is never taken for a valid one; resume picks the newest directory that verifies.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::Path;

use model::checkpoint::safetensors_error;
use model::pipeline::Cursor;
use model::{Error, Result};
use safetensors::tensor::TensorView;

mod manifest;
pub use manifest::{
    FORMAT, FileEntry, JobOwner, Manifest, checkpoint_dir, foreign_checkpoints, latest_owned, list_checkpoints, prune,
    read_manifest, remove_stale_partials, verify_manifest, write_manifest,
};

pub const STATE_FILE: &str = "training_state.safetensors";
pub const MANIFEST_FILE: &str = "manifest.json";
const STATE_FORMAT: &str = "bert2bert-training-state-1";

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

// The moments are stored as their in-memory bytes, which safetensors defines as little-endian.
#[cfg(target_endian = "big")]
compile_error!("worker::state writes f32 memory as little-endian safetensors data");

fn f32_view<'a>(name: &str, bytes: &'a [u8], n: usize) -> Result<(String, TensorView<'a>)> {
    let view = TensorView::new(safetensors::Dtype::F32, vec![n], bytes).map_err(|e| Error::Other(format!("{e}")))?;
    Ok((name.to_string(), view))
}

pub fn write_state(dir: &Path, st: &TrainingState) -> Result<()> {
    let path = dir.join(STATE_FILE);
    let (m, v): (&[u8], &[u8]) = (bytemuck::cast_slice(&st.adam_m), bytemuck::cast_slice(&st.adam_v));
    let tensors = vec![f32_view("adam.m", m, st.adam_m.len())?, f32_view("adam.v", v, st.adam_v.len())?];
    let meta: HashMap<String, String> = [
        ("step", st.step.to_string()),
        ("seed", st.seed.to_string()),
        ("cursor_epoch", st.cursor.epoch.to_string()),
        ("cursor_step_in_epoch", st.cursor.step_in_epoch.to_string()),
        ("format", STATE_FORMAT.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let bytes =
        safetensors::serialize(tensors, Some(meta)).map_err(|e| Error::Other(format!("{}: {e}", path.display())))?;
    write_synced(&path, &bytes)
}

/// Read `dir`'s training state, a regular file of at most `max_bytes` (the caller knows how
/// many parameters to expect: two f32 moments each, plus a small header).
pub fn read_state(dir: &Path, max_bytes: u64) -> Result<TrainingState> {
    let path = dir.join(STATE_FILE);
    let bad = |msg: String| Error::input(&path, msg);
    let meta = std::fs::symlink_metadata(&path).map_err(io(&path))?;
    if !meta.is_file() || meta.len() > max_bytes {
        return Err(bad(format!("not a regular file of at most {max_bytes} bytes")));
    }
    let mut bytes = Vec::new();
    std::fs::File::open(&path).map_err(io(&path))?.take(max_bytes + 1).read_to_end(&mut bytes).map_err(io(&path))?;
    if bytes.len() as u64 > max_bytes {
        return Err(bad(format!("larger than {max_bytes} bytes")));
    }
    parse_state(&path, &bytes)
}

/// The state from a safetensors file's bytes; every error names `path`.
pub fn parse_state(path: &Path, bytes: &[u8]) -> Result<TrainingState> {
    let bad = |msg: String| Error::input(path, msg);
    let not_st = |e: safetensors::SafeTensorError| bad(format!("not a safetensors file: {}", safetensors_error(&e)));
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(not_st)?;
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(not_st)?;
    let meta = meta.metadata().clone().unwrap_or_default();
    if meta.get("format").map(String::as_str) != Some(STATE_FORMAT) {
        return Err(bad(format!("metadata `format` is not {STATE_FORMAT}")));
    }
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
        // Copied into an f32 buffer viewed as bytes: the file's data need not be 4-aligned.
        let mut out = vec![0f32; t.data().len() / 4];
        let bytes = bytemuck::cast_slice_mut::<f32, u8>(&mut out);
        bytes.copy_from_slice(&t.data()[..bytes.len()]);
        Ok(out)
    };
    Ok(TrainingState {
        step: num("step")?,
        seed: num("seed")?,
        cursor: Cursor { epoch: num("cursor_epoch")?, step_in_epoch: num("cursor_step_in_epoch")? },
        adam_m: vec("adam.m")?,
        adam_v: vec("adam.v")?,
    })
}

#[cfg(test)]
mod tests;
