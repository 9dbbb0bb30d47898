//! The weight files of a checkpoint directory: one model.safetensors, or the shards that
//! model.safetensors.index.json lists (how transformers saves models above its shard size).
//! Both loaders read tensors through here, so sharding, duplicate tensors and the index's
//! promises are handled once.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::path::{Component, Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::TensorView;
use serde_json::Value;

use super::tensors::{map_file, parse};
use crate::error::{Error, Result};

pub(super) const SINGLE: &str = "model.safetensors";
pub(super) const INDEX: &str = "model.safetensors.index.json";
/// PyTorch pickles, which we do not read (unpickling runs code); named to tell how to convert.
const PICKLES: [&str; 2] = ["pytorch_model.bin", "pytorch_model.bin.index.json"];

/// Which loader asks: the conversion command for a PyTorch-only directory loads it with the
/// transformers class that keeps every tensor this loader reads.
#[derive(Clone, Copy, Debug)]
pub(super) enum DirKind {
    Bert,
    Model,
}

/// Every weight file of a directory, memory-mapped (maps cost address space, not memory).
pub(super) struct WeightFiles {
    /// model.safetensors, or the index: what errors about the set as a whole name.
    pub source: PathBuf,
    maps: Vec<(PathBuf, Mmap)>,
    /// (tensor, position in `maps` of the shard the index puts it in); empty for one file.
    listed: Vec<(String, usize)>,
}

/// One tensor of a checkpoint and the file it was found in (for error messages).
pub(super) struct Tensor<'a> {
    pub path: &'a Path,
    pub name: String,
    pub view: TensorView<'a>,
}

impl WeightFiles {
    /// model.safetensors if present, else the shards of model.safetensors.index.json. A
    /// directory with only PyTorch weights gets an input error with the command converting it;
    /// one with no weights at all, model.safetensors's own not-found error.
    pub fn open(dir: &Path, kind: DirKind) -> Result<Self> {
        let single = dir.join(SINGLE);
        let not_found = match map_file(&single) {
            Ok(map) => return Ok(WeightFiles { source: single.clone(), maps: vec![(single, map)], listed: vec![] }),
            Err(Error::Io { file, err }) if err.kind() == ErrorKind::NotFound => Error::Io { file, err },
            Err(e) => return Err(e),
        };
        let index = dir.join(INDEX);
        if exists(&index) {
            return open_sharded(dir, index);
        }
        if let Some(pickle) = PICKLES.iter().map(|f| dir.join(f)).find(|p| exists(p)) {
            return Err(Error::input(&pickle, convert_message(dir, kind)));
        }
        Err(not_found)
    }

    /// Bytes in all the files together: what the config's parameter count is checked against.
    pub fn bytes(&self) -> u64 {
        self.maps.iter().map(|(_, m)| m.len() as u64).fold(0, u64::saturating_add)
    }

    /// Every tensor of every file, sorted by name. A name found in two files, or one the index
    /// puts in a shard that does not hold it, is an input error naming the index and the tensor.
    pub fn tensors(&self) -> Result<Vec<Tensor<'_>>> {
        let mut found: HashMap<String, (usize, TensorView<'_>)> = HashMap::new();
        for (i, (path, map)) in self.maps.iter().enumerate() {
            for (name, view) in parse(path, map)?.tensors() {
                if let Some((j, _)) = found.get(&name) {
                    let (a, b) = (file_name(&self.maps[*j].0), file_name(path));
                    let msg = format!("tensor `{}` appears in two shards, `{a}` and `{b}`", shown(&name));
                    return Err(Error::input(&self.source, msg));
                }
                found.insert(name, (i, view));
            }
        }
        for (name, shard) in &self.listed {
            if found.get(name).map(|(i, _)| i) != Some(shard) {
                let msg = format!(
                    "`weight_map` puts tensor `{}` in `{}`, which does not hold it",
                    shown(name),
                    file_name(&self.maps[*shard].0)
                );
                return Err(Error::input(&self.source, msg));
            }
        }
        let mut out: Vec<Tensor<'_>> =
            found.into_iter().map(|(name, (i, view))| Tensor { path: &self.maps[i].0, name, view }).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
}

/// Maps every shard the index lists. Shard names come from the user's file, so each must be a
/// plain file name: the index must not make us read outside its directory.
fn open_sharded(dir: &Path, index: PathBuf) -> Result<WeightFiles> {
    let entries = read_index(&index)?;
    let mut position: HashMap<&str, usize> = HashMap::new();
    let mut maps = Vec::new();
    let mut listed = Vec::with_capacity(entries.len());
    for (tensor, shard) in &entries {
        check_shard_name(&index, tensor, shard)?;
        let i = match position.get(shard.as_str()) {
            Some(&i) => i,
            None => {
                let path = dir.join(shard);
                let map = map_file(&path).map_err(|e| match e {
                    Error::Io { err, .. } if err.kind() == ErrorKind::NotFound => Error::input(
                        &index,
                        format!("`weight_map` entry `{}`: shard `{}` does not exist", shown(tensor), shown(shard)),
                    ),
                    other => other,
                })?;
                maps.push((path, map));
                position.insert(shard, maps.len() - 1);
                maps.len() - 1
            }
        };
        listed.push((tensor.clone(), i));
    }
    Ok(WeightFiles { source: index, maps, listed })
}

/// The (tensor, shard file name) pairs of an index's `weight_map`, sorted by tensor. The file
/// is read with config.json's size cap, so its size bounds everything built from it.
fn read_index(index: &Path) -> Result<Vec<(String, String)>> {
    let v = crate::config::read_json(index)?;
    let map = v
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::input(index, "`weight_map` is missing or not an object"))?;
    if map.is_empty() {
        return Err(Error::input(index, "`weight_map` lists no tensors"));
    }
    let mut entries = Vec::with_capacity(map.len());
    for (tensor, shard) in map {
        let shard = shard.as_str().ok_or_else(|| {
            let kind = crate::data::json_kind(shard);
            Error::input(index, format!("`weight_map` entry `{}`: expected a file name, found {kind}", shown(tensor)))
        })?;
        entries.push((tensor.clone(), shard.to_owned()));
    }
    entries.sort();
    Ok(entries)
}

/// A shard must be named by one plain component: no root, no `..`, no separator of any
/// platform (a `\` is a name character on Unix but a separator where the index may come from).
fn check_shard_name(index: &Path, tensor: &str, shard: &str) -> Result<()> {
    let mut parts = Path::new(shard).components();
    let plain = matches!((parts.next(), parts.next()), (Some(Component::Normal(c)), None) if c.to_str() == Some(shard))
        && !shard.contains(['/', '\\', '\0']);
    if plain {
        return Ok(());
    }
    let msg = format!(
        "`weight_map` entry `{}`: shard `{}` is not a plain file name in the index's directory",
        shown(tensor),
        shown(shard)
    );
    Err(Error::input(index, msg))
}

/// Whether something is at `path`; an error other than not-found counts as there, so that
/// reading it reports the error.
fn exists(path: &Path) -> bool {
    !matches!(std::fs::metadata(path), Err(e) if e.kind() == ErrorKind::NotFound)
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned())
}

/// A name from a file, with control characters escaped so a message cannot rewrite the terminal.
fn shown(s: &str) -> String {
    s.chars().flat_map(|c| if c.is_control() { c.escape_default().collect() } else { vec![c] }).collect()
}

/// What to do with a PyTorch-only directory: the one-line command that writes model.safetensors
/// next to the pickle, with the directory filled in.
fn convert_message(dir: &Path, kind: DirKind) -> String {
    let class = match kind {
        DirKind::Bert => "AutoModel",
        DirKind::Model => "EncoderDecoderModel",
    };
    format!(
        "bert2bert reads only safetensors weights ({SINGLE} or {INDEX}), not PyTorch pickles; \
         convert the directory with: {}",
        convert_command(&dir.display().to_string(), class)
    )
}

/// `dir` goes into a Python string inside a shell double-quoted argument. A path with a
/// character special to either is passed as an argument in shell single quotes instead, so the
/// printed command can never run something the path spells.
pub(super) fn convert_command(dir: &str, class: &str) -> String {
    let load = format!("from transformers import {class}; {class}.from_pretrained");
    if !dir.is_empty() && !dir.contains(|c: char| "'\"\\$`!".contains(c) || c.is_control()) {
        return format!("python -c \"{load}('{dir}').save_pretrained('{dir}', safe_serialization=True)\"");
    }
    let quoted = format!("'{}'", dir.replace('\'', r"'\''"));
    format!(
        "python -c \"import sys; {load}(sys.argv[1]).save_pretrained(sys.argv[1], safe_serialization=True)\" {quoted}"
    )
}
