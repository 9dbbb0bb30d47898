//! Checkpoints in transformers' own layout (safetensors + config.json), so a directory we save
//! loads with `EncoderDecoderModel.from_pretrained` and a BERT from the Hub loads here.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView, View};

use crate::config::{BertConfig, ModelConfig};
use crate::error::{Error, Result};
use crate::params::ParamTable;
use crate::tokenizer::Tokenizer;

/// A whole EncoderDecoderModel: its config and every parameter in the table's flat layout.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub config: ModelConfig,
    pub table: ParamTable,
    pub params: Vec<f32>,
}

/// A pre-trained BERT, by HF BertModel names without prefix (`encoder.layer.0...`), plus
/// `cls.predictions.transform.*` and `cls.predictions.bias` when the file has an MLM head.
#[derive(Clone, Debug)]
pub struct BertWeights {
    pub config: BertConfig,
    pub tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
}

/// Names and shapes of one BERT stack (with pooler), taken from ParamTable's encoder side so the
/// list has a single source of truth.
pub fn bert_shapes(cfg: &BertConfig) -> Vec<(String, Vec<usize>)> {
    let mc = ModelConfig {
        encoder: cfg.clone(),
        decoder: cfg.clone(),
        tie_encoder_decoder: false,
        decoder_start_token_id: 0,
        pad_token_id: 0,
        eos_token_id: 0,
    };
    ParamTable::new(&mc)
        .entries
        .into_iter()
        .filter_map(|e| Some((e.name.strip_prefix("encoder.")?.to_owned(), e.shape)))
        .collect()
}

/// The name a BERT tensor has in BertModel: BertForPreTraining files prefix `bert.`, and
/// checkpoints converted from TensorFlow call LayerNorm's parameters gamma and beta.
fn bert_name(raw: &str) -> String {
    let n = raw.strip_prefix("bert.").unwrap_or(raw);
    if let Some(p) = n.strip_suffix("LayerNorm.gamma") {
        format!("{p}LayerNorm.weight")
    } else if let Some(p) = n.strip_suffix("LayerNorm.beta") {
        format!("{p}LayerNorm.bias")
    } else {
        n.to_owned()
    }
}

/// Read a BERT checkpoint directory (config.json + model.safetensors) and check every tensor
/// the stack needs against the config.
pub fn load_bert_dir(dir: &Path) -> Result<BertWeights> {
    let config = BertConfig::from_file(&dir.join("config.json"))?;
    let path = dir.join("model.safetensors");
    let mut wanted: HashMap<String, (Vec<usize>, bool)> =
        bert_shapes(&config).into_iter().map(|(n, s)| (n.clone(), (s, !n.starts_with("pooler.")))).collect();
    let h = config.hidden_size;
    for (n, s) in [
        ("cls.predictions.transform.dense.weight", vec![h, h]),
        ("cls.predictions.transform.dense.bias", vec![h]),
        ("cls.predictions.transform.LayerNorm.weight", vec![h]),
        ("cls.predictions.transform.LayerNorm.bias", vec![h]),
        ("cls.predictions.bias", vec![config.vocab_size]),
    ] {
        wanted.insert(n.to_owned(), (s, false));
    }
    let map = map_file(&path)?;
    let st = parse(&path, &map)?;
    let mut tensors = HashMap::new();
    let mut unused = 0usize;
    for (raw, view) in sorted(&st) {
        let name = bert_name(&raw);
        let Some((shape, _)) = wanted.get(&name) else {
            // position_ids buffers, the NSP head, the tied MLM decoder: not ours to load.
            let expected_extra =
                name.ends_with("position_ids") || name.ends_with("token_type_ids") || name.starts_with("cls.");
            unused += usize::from(!expected_extra);
            continue;
        };
        check_shape(&path, &raw, view.shape(), shape)?;
        let mut data = vec![0.0; view.shape().iter().product()];
        widen(&path, &raw, &view, &mut data)?;
        if tensors.insert(name.clone(), (shape.clone(), data)).is_some() {
            return Err(Error::input(&path, format!("tensor `{name}` appears twice (with and without `bert.`)")));
        }
    }
    let mut required: Vec<&String> = wanted.iter().filter(|(_, (_, req))| *req).map(|(n, _)| n).collect();
    required.sort();
    if let Some(n) = required.into_iter().find(|n| !tensors.contains_key(*n)) {
        return Err(Error::input(&path, format!("missing tensor `{n}`")));
    }
    if unused > 0 {
        tracing::warn!("{}: {unused} tensors are not part of a BERT of this config; ignored", path.display());
    }
    Ok(BertWeights { config, tensors })
}

/// `save_model_dir_with` without extra files.
pub fn save_model_dir(dir: &Path, ck: &Checkpoint, tokenizer: Option<&Tokenizer>) -> Result<()> {
    save_model_dir_with(dir, ck, tokenizer, |_| Ok(()))
}

/// Write a model directory atomically: everything goes to `DIR.tmp` first, and `extra` may add
/// files there (training state) so they are replaced together with the model. A crash leaves
/// either the old directory or the new one, never a mix.
pub fn save_model_dir_with(
    dir: &Path,
    ck: &Checkpoint,
    tokenizer: Option<&Tokenizer>,
    extra: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    if ck.params.len() != ck.table.storage_len {
        return Err(Error::Other(format!(
            "checkpoint holds {} parameters but its table needs {}",
            ck.params.len(),
            ck.table.storage_len
        )));
    }
    // Two processes may save the same directory at once (a stopped rank 0 that wakes up while its
    // replacement checkpoints the same step), so each writer gets temp names of its own: with one
    // shared `DIR.tmp`, one writer would delete the other's half-written files.
    let unique = writer_suffix();
    let tmp = sibling(dir, &format!("tmp.{unique}"))?;
    let old = sibling(dir, &format!("old.{unique}"))?;
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    remove_stale_siblings(dir)?;
    std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;

    let cfg = serde_json::to_string_pretty(&ck.config.to_value()).expect("a JSON value serialises");
    write_synced(&tmp.join("config.json"), cfg.as_bytes())?;
    // Aliases are written too (same values) so transformers finds every key it expects; the
    // tied LM projection is not in the table, so it is left out as transformers does.
    let tensors: Vec<(String, Vec<usize>, &[f32])> =
        ck.table.entries.iter().map(|e| (e.name.clone(), e.shape.clone(), &ck.params[e.range()])).collect();
    write_safetensors(&tmp.join("model.safetensors"), &tensors)?;
    if let Some(tok) = tokenizer {
        write_synced(&tmp.join("tokenizer.json"), tok.to_json_string()?.as_bytes())?;
    }
    extra(&tmp)?;
    sync_dir(&tmp)?;

    // Move the current directory aside and ours in. A concurrent writer can slip its directory
    // in between our two renames; then ours no longer fits (ENOTEMPTY) and we swap again.
    let mut attempts = 0;
    loop {
        attempts += 1;
        remove_any(&old)?;
        match std::fs::rename(dir, &old) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(dir, e)),
        }
        match std::fs::rename(&tmp, dir) {
            Ok(()) => break,
            Err(e)
                if attempts < 16
                    && matches!(
                        e.kind(),
                        std::io::ErrorKind::DirectoryNotEmpty | std::io::ErrorKind::AlreadyExists
                    ) => {}
            Err(e) => return Err(Error::io(dir, e)),
        }
    }
    sync_dir(&parent)?;
    remove_any(&old)?;
    Ok(())
}

/// Load a directory written by `save_model_dir` or by transformers' `save_pretrained`.
pub fn load_model_dir(dir: &Path) -> Result<Checkpoint> {
    let cfg_path = dir.join("config.json");
    let config = ModelConfig::from_file(&cfg_path)?;
    check_tie(&config, &cfg_path)?;
    let table = ParamTable::new(&config);
    let index: HashMap<&str, usize> = table.entries.iter().enumerate().map(|(i, e)| (e.name.as_str(), i)).collect();
    let mut params = vec![0.0f32; table.storage_len];
    let mut filled = vec![false; table.entries.len()];

    let path = dir.join("model.safetensors");
    let map = map_file(&path)?;
    let st = parse(&path, &map)?;
    let mut aliases = Vec::new();
    for (name, view) in sorted(&st) {
        let ignored = name.starts_with("decoder.cls.predictions.decoder.")
            || name.ends_with(".position_ids")
            || name.ends_with(".token_type_ids");
        if ignored {
            continue;
        }
        let &i = index.get(name.as_str()).ok_or_else(|| Error::input(&path, format!("unknown tensor `{name}`")))?;
        let e = &table.entries[i];
        check_shape(&path, &name, view.shape(), &e.shape)?;
        match e.alias_of {
            None => {
                widen(&path, &name, &view, &mut params[e.range()])?;
                filled[i] = true;
            }
            Some(_) => aliases.push((name, view)),
        }
    }
    // A file that stores only one side of a tied pair (transformers may drop either name)
    // still fills the storage.
    for (name, view) in aliases {
        let owner = table.entries[index[name.as_str()]].alias_of.expect("alias");
        if !filled[owner] {
            widen(&path, &name, &view, &mut params[table.entries[owner].range()])?;
            filled[owner] = true;
        }
    }
    if let Some(e) = table.owned().find(|e| !filled[index[e.name.as_str()]]) {
        return Err(Error::input(&path, format!("missing tensor `{}`", e.name)));
    }
    Ok(Checkpoint { config, table, params })
}

/// Under `tie_encoder_decoder` the decoder's BERT aliases the encoder's, so their shapes must
/// agree; ParamTable assumes it, a hand-edited config may not.
pub(crate) fn check_tie(cfg: &ModelConfig, file: &Path) -> Result<()> {
    if !cfg.tie_encoder_decoder {
        return Ok(());
    }
    const KEYS: [&str; 7] = [
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "max_position_embeddings",
        "type_vocab_size",
    ];
    let dims = |c: &BertConfig| {
        [
            c.vocab_size,
            c.hidden_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.intermediate_size,
            c.max_position_embeddings,
            c.type_vocab_size,
        ]
    };
    let (e, d) = (dims(&cfg.encoder), dims(&cfg.decoder));
    match (0..KEYS.len()).find(|&i| e[i] != d[i]) {
        Some(i) => Err(Error::input(
            file,
            format!(
                "`tie_encoder_decoder` is true but encoder and decoder `{}` differ ({} vs {})",
                KEYS[i], e[i], d[i]
            ),
        )),
        None => Ok(()),
    }
}

/// Write F32 tensors to a safetensors file atomically (temp file, fsync, rename).
pub fn write_tensors(path: &Path, tensors: &[(String, Vec<usize>, &[f32])]) -> Result<()> {
    let name = path.file_name().ok_or_else(|| Error::input(path, "not a file name"))?;
    let tmp = path.with_file_name(format!("{}.tmp", name.to_string_lossy()));
    write_safetensors(&tmp, tensors)?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => sync_dir(p),
        _ => sync_dir(Path::new(".")),
    }
}

/// A tensor read from a file: name, shape, values.
pub type NamedTensor = (String, Vec<usize>, Vec<f32>);

/// Every floating-point tensor of a safetensors file as f32, sorted by name. Integer tensors
/// (token ids in golden fixtures) are skipped: read them with `read_i32_tensor`.
pub fn read_tensors(path: &Path) -> Result<Vec<NamedTensor>> {
    let map = map_file(path)?;
    let st = parse(path, &map)?;
    let mut out = Vec::new();
    for (name, view) in sorted(&st) {
        if matches!(view.dtype(), Dtype::F32 | Dtype::F16 | Dtype::BF16) {
            let mut data = vec![0.0; view.shape().iter().product()];
            widen(path, &name, &view, &mut data)?;
            out.push((name, view.shape().to_vec(), data));
        }
    }
    Ok(out)
}

/// One integer tensor (I32, or I64 as PyTorch writes ids) as i32.
pub fn read_i32_tensor(path: &Path, name: &str) -> Result<(Vec<usize>, Vec<i32>)> {
    let map = map_file(path)?;
    let st = parse(path, &map)?;
    let view = st.tensor(name).map_err(|_| Error::input(path, format!("missing tensor `{name}`")))?;
    let data = match view.dtype() {
        Dtype::I32 => {
            let mut v = vec![0; view.data().len() / 4];
            decode(view.data(), &mut v, i32::from_le_bytes);
            v
        }
        Dtype::I64 => view
            .data()
            .chunks_exact(8)
            .map(|b| {
                let x = i64::from_le_bytes(b.try_into().unwrap());
                i32::try_from(x)
                    .map_err(|_| Error::input(path, format!("tensor `{name}` holds {x}, beyond the i32 range")))
            })
            .collect::<Result<Vec<i32>>>()?,
        d => {
            return Err(Error::input(path, format!("tensor `{name}` has dtype {d:?}; expected I32 or I64")));
        }
    };
    Ok((view.shape().to_vec(), data))
}

// ---- helpers ----

/// (shape, values) of one tensor to write.
struct F32View<'a>(Vec<usize>, &'a [f32]);

impl View for F32View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.0
    }
    fn data(&self) -> Cow<'_, [u8]> {
        // Copied one tensor at a time while writing, so the peak is one tensor, not the model.
        Cow::Owned(self.1.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
    fn data_len(&self) -> usize {
        self.1.len() * 4
    }
}

fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, &[f32])]) -> Result<()> {
    let mut seen = HashSet::new();
    for (name, shape, data) in tensors {
        if shape.iter().product::<usize>() != data.len() || !seen.insert(name.as_str()) {
            return Err(Error::Other(format!(
                "{}: tensor `{name}` is duplicated or its shape {shape:?} does not hold {} values",
                path.display(),
                data.len()
            )));
        }
    }
    let views = tensors.iter().map(|(n, s, d)| (n.as_str(), F32View(s.clone(), d)));
    let meta = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    safetensors::serialize_to_file(views, Some(meta), path)
        .map_err(|e| Error::Other(format!("{}: cannot write safetensors: {e}", path.display())))?;
    // The crate writes through a tempfile, which is created 0600; a model is meant to be read
    // by other users (serving, evaluation), like the config next to it.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).map_err(|e| Error::io(path, e))?;
    }
    File::open(path).and_then(|f| f.sync_all()).map_err(|e| Error::io(path, e))
}

fn map_file(path: &Path) -> Result<memmap2::Mmap> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the map is read-only and lives only while we copy tensors out of it. Another
    // process truncating the file meanwhile could fault us; our own writers never do it (they
    // write a temp file and rename it over), which is the usual contract for safetensors.
    unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))
}

fn parse<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes).map_err(|e| Error::input(path, format!("not a valid safetensors file: {e}")))
}

fn sorted<'a>(st: &SafeTensors<'a>) -> Vec<(String, TensorView<'a>)> {
    let mut t = st.tensors();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

fn check_shape(path: &Path, name: &str, got: &[usize], want: &[usize]) -> Result<()> {
    if got == want {
        return Ok(());
    }
    Err(Error::input(path, format!("tensor `{name}` has shape {got:?}, expected {want:?}")))
}

/// Copy a float tensor into `out` as f32 (shape already checked, so the lengths agree).
fn widen(path: &Path, name: &str, view: &TensorView, out: &mut [f32]) -> Result<()> {
    let b = view.data();
    match view.dtype() {
        Dtype::F32 => decode(b, out, f32::from_le_bytes),
        Dtype::F16 => decode(b, out, |c| half::f16::from_le_bytes(c).to_f32()),
        Dtype::BF16 => decode(b, out, |c| half::bf16::from_le_bytes(c).to_f32()),
        d => {
            let msg = format!("tensor `{name}` has dtype {d:?}; expected F32, F16 or BF16");
            return Err(Error::input(path, msg));
        }
    }
    Ok(())
}

/// Little-endian elements of `N` bytes, converted one by one (the data may be unaligned).
fn decode<const N: usize, T>(bytes: &[u8], out: &mut [T], f: impl Fn([u8; N]) -> T) {
    for (o, c) in out.iter_mut().zip(bytes.chunks_exact(N)) {
        *o = f(c.try_into().expect("chunk of N bytes"));
    }
}

/// `DIR.suffix` next to `DIR`.
fn sibling(dir: &Path, suffix: &str) -> Result<PathBuf> {
    let name = dir
        .file_name()
        .ok_or_else(|| Error::input(dir, "cannot save a model here; name a directory to create or replace"))?;
    Ok(dir.with_file_name(format!("{}.{suffix}", name.to_string_lossy())))
}

/// `<pid>.<n>`: unique among the writers of one process and, with the pid, of one host.
fn writer_suffix() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    format!("{}.{n}.{nanos}", std::process::id())
}

/// A temp or old sibling untouched this long belongs to a writer that crashed: no save takes an
/// hour. Younger ones may be another live writer's (possibly on another host of a shared
/// volume, so pids cannot tell), and are left alone.
const STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(3600);

/// Removes `DIR.tmp*` / `DIR.old*` siblings left by crashed writers.
fn remove_stale_siblings(dir: &Path) -> Result<()> {
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else { return Ok(()) };
    let parent = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
    let name = name.to_string_lossy();
    let (tmp, old) = (format!("{name}.tmp"), format!("{name}.old"));
    let entries = match std::fs::read_dir(parent) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(parent, e)),
    };
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        if !(file.starts_with(&tmp) || file.starts_with(&old)) {
            continue;
        }
        let age = entry.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
        if age.is_some_and(|a| a >= STALE_AFTER) {
            remove_any(&entry.path())?;
        }
    }
    Ok(())
}

fn remove_any(path: &Path) -> Result<()> {
    let r = match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => Err(e),
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
    };
    r.map_err(|e| Error::io(path, e))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(|e| Error::io(path, e))
}

/// Make a rename or a new file's directory entry durable (Linux: fsync on the directory).
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|f| f.sync_all()).map_err(|e| Error::io(dir, e))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    pub(crate) fn tiny_bert_json(init_range: f64) -> serde_json::Value {
        json!({"vocab_size": 50, "hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2,
               "intermediate_size": 12, "max_position_embeddings": 16, "type_vocab_size": 2,
               "initializer_range": init_range, "pad_token_id": 1, "hidden_act": "gelu"})
    }

    pub(crate) fn tiny_bert() -> BertConfig {
        BertConfig::from_value(&tiny_bert_json(0.02), Path::new("test")).unwrap()
    }

    pub(crate) fn randn(seed: u64, n: usize) -> Vec<f32> {
        (0..n as u64).map(|i| kernels::rng::normal(seed, i)).collect()
    }

    /// A BERT directory as the Hub has it: every stack tensor random (biases too, so copies are
    /// visible), names under `prefix`, plus a position_ids buffer to be ignored.
    pub(crate) fn write_bert_dir(
        dir: &Path,
        cfg: &serde_json::Value,
        seed: u64,
        prefix: &str,
    ) -> HashMap<String, Vec<f32>> {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
        let bert = BertConfig::from_value(cfg, Path::new("test")).unwrap();
        let mut values: HashMap<String, Vec<f32>> = HashMap::new();
        for (i, (name, shape)) in bert_shapes(&bert).into_iter().enumerate() {
            values.insert(name, randn(seed + i as u64, shape.iter().product()));
        }
        let shapes: HashMap<String, Vec<usize>> = bert_shapes(&bert).into_iter().collect();
        let pos: Vec<f32> = (0..bert.max_position_embeddings).map(|i| i as f32).collect();
        let mut list: Vec<(String, Vec<usize>, &[f32])> =
            values.iter().map(|(n, v)| (format!("{prefix}{n}"), shapes[n].clone(), v.as_slice())).collect();
        list.push((format!("{prefix}embeddings.position_ids"), vec![1, pos.len()], &pos));
        write_tensors(&dir.join("model.safetensors"), &list).unwrap();
        values
    }

    fn random_checkpoint(tie: bool, seed: u64) -> Checkpoint {
        let config = ModelConfig {
            encoder: tiny_bert(),
            decoder: tiny_bert(),
            tie_encoder_decoder: tie,
            decoder_start_token_id: 2,
            pad_token_id: 1,
            eos_token_id: 3,
        };
        let table = ParamTable::new(&config);
        let params = randn(seed, table.storage_len);
        Checkpoint { config, table, params }
    }

    fn t(name: &str, shape: &[usize], v: Vec<f32>) -> NamedTensor {
        (name.to_owned(), shape.to_vec(), v)
    }

    fn set_shape(ts: &mut [NamedTensor], name: &str, shape: &[usize]) {
        ts.iter_mut().filter(|x| x.0 == name).for_each(|x| x.1 = shape.to_vec());
    }

    fn input_err<T>(r: Result<T>) -> String {
        match r {
            Err(e @ Error::Input { .. }) => e.to_string(),
            Err(e) => panic!("expected an input error, got {e:?}"),
            Ok(_) => panic!("expected an input error, got Ok"),
        }
    }

    #[test]
    fn save_load_round_trip_both_ties() {
        let (_td, tok) = crate::tokenizer::tests::tiny_tokenizer();
        for tie in [false, true] {
            let d = tempfile::tempdir().unwrap();
            let dir = d.path().join("ck");
            let ck = random_checkpoint(tie, 11 + tie as u64);
            save_model_dir(&dir, &ck, Some(&tok)).unwrap();
            let back = load_model_dir(&dir).unwrap();
            assert_eq!(back.params, ck.params);
            assert_eq!(back.config.to_value(), ck.config.to_value());
            assert_eq!(back.table.storage_len, ck.table.storage_len);
            let names: HashSet<String> =
                read_tensors(&dir.join("model.safetensors")).unwrap().into_iter().map(|t| t.0).collect();
            assert_eq!(names.len(), ck.table.entries.len(), "aliases are written too");
            assert!(names.contains("decoder.bert.encoder.layer.1.attention.self.key.weight"));
            assert!(!names.iter().any(|n| n.starts_with("decoder.cls.predictions.decoder")));
            let tj = std::fs::read_to_string(dir.join("tokenizer.json")).unwrap();
            assert_eq!(tj, tok.to_json_string().unwrap());
            let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
            let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
            assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let perm = std::fs::metadata(dir.join("model.safetensors")).unwrap().permissions();
                assert_eq!(perm.mode() & 0o777, 0o644, "not the crate's 0600 tempfile mode");
            }
            let names: Vec<_> = std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
            assert_eq!(names, vec!["ck"], "no temp or old directory left behind");
        }
    }

    #[test]
    fn save_replaces_existing_and_survives_stale_tmp() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("ck");
        save_model_dir(&dir, &random_checkpoint(false, 1), None).unwrap();
        std::fs::create_dir_all(d.path().join("ck.tmp/junk")).unwrap();
        std::fs::write(d.path().join("ck.old"), b"stale").unwrap();
        // Another writer's fresh temp dir must survive our save.
        std::fs::create_dir_all(d.path().join("ck.tmp.99.0.0/part")).unwrap();
        let long_ago = std::time::SystemTime::now() - STALE_AFTER - std::time::Duration::from_secs(5);
        for stale in ["ck.tmp", "ck.old"] {
            std::fs::File::options().read(true).open(d.path().join(stale)).unwrap().set_modified(long_ago).unwrap();
        }
        let ck = random_checkpoint(false, 2);
        save_model_dir_with(&dir, &ck, None, |tmp| write_synced(&tmp.join("state.bin"), b"s")).unwrap();
        assert_eq!(load_model_dir(&dir).unwrap().params, ck.params);
        assert!(dir.join("state.bin").exists() && !dir.join("tokenizer.json").exists());
        assert!(!d.path().join("ck.tmp").exists() && !d.path().join("ck.old").exists(), "stale leftovers removed");
        assert!(d.path().join("ck.tmp.99.0.0/part").exists(), "a live writer's temp dir is left alone");
    }

    #[test]
    fn concurrent_saves_of_one_directory_both_land_whole() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("ck");
        let cks = [random_checkpoint(false, 3), random_checkpoint(false, 4)];
        std::thread::scope(|s| {
            for ck in &cks {
                let dir = &dir;
                s.spawn(move || {
                    for _ in 0..5 {
                        save_model_dir(dir, ck, None).unwrap();
                    }
                });
            }
        });
        let got = load_model_dir(&dir).unwrap().params;
        assert!(got == cks[0].params || got == cks[1].params, "the survivor is one writer's whole checkpoint");
        let names: Vec<_> = std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec!["ck"], "no temp or old directory left behind");
    }

    /// Rewrites `dir`'s model.safetensors after `edit` changes its (name, shape, values) list.
    pub(crate) fn rewrite(dir: &Path, edit: impl FnOnce(&mut Vec<NamedTensor>)) {
        let mut t = read_tensors(&dir.join("model.safetensors")).unwrap();
        edit(&mut t);
        let refs: Vec<_> = t.iter().map(|(n, s, v)| (n.clone(), s.clone(), v.as_slice())).collect();
        write_tensors(&dir.join("model.safetensors"), &refs).unwrap();
    }

    #[test]
    fn load_model_dir_errors_name_the_tensor() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("ck");
        let ck = random_checkpoint(true, 5);
        save_model_dir(&dir, &ck, None).unwrap();
        // Ignorable extras and absent aliases are fine.
        rewrite(&dir, |ts| {
            ts.retain(|(n, _, _)| !n.starts_with("decoder.bert.embeddings."));
            ts.push(t("decoder.cls.predictions.decoder.weight", &[2], vec![1.0, 2.0]));
            ts.push(t("encoder.embeddings.position_ids", &[1], vec![0.0]));
        });
        assert_eq!(load_model_dir(&dir).unwrap().params, ck.params);
        // Only the aliases present: the tied storage is still filled.
        rewrite(&dir, |t| t.retain(|(n, _, _)| !n.starts_with("encoder.encoder.layer.1.")));
        assert_eq!(load_model_dir(&dir).unwrap().params, ck.params);

        let w = "encoder.encoder.layer.0.attention.self.query.weight";
        rewrite(&dir, |ts| set_shape(ts, w, &[4, 16]));
        let msg = input_err(load_model_dir(&dir));
        assert!(msg.ends_with(&format!("model.safetensors: tensor `{w}` has shape [4, 16], expected [8, 8]")), "{msg}");
        // Gone under both of its names.
        rewrite(&dir, |t| t.retain(|x| !x.0.ends_with("encoder.layer.0.attention.self.query.weight")));
        assert!(input_err(load_model_dir(&dir)).ends_with(&format!("missing tensor `{w}`")));
        rewrite(&dir, |ts| ts.push(t("encoder.extra.weight", &[1], vec![1.0])));
        assert!(input_err(load_model_dir(&dir)).ends_with("unknown tensor `encoder.extra.weight`"));

        let mut cfg = ck.config.to_value();
        cfg["decoder"]["num_hidden_layers"] = json!(3);
        std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
        assert!(input_err(load_model_dir(&dir)).contains("encoder and decoder configs differ in shape"));
    }

    #[test]
    fn load_bert_dir_normalises_names_and_checks_shapes() {
        let d = tempfile::tempdir().unwrap();
        let values = write_bert_dir(d.path(), &tiny_bert_json(0.02), 3, "bert.");
        let w = load_bert_dir(d.path()).unwrap();
        assert_eq!(w.tensors.len(), values.len());
        for (n, v) in &values {
            assert_eq!(&w.tensors[n].1, v, "{n}");
        }
        // TF-era LayerNorm names, half-precision storage, an MLM head and a wrong shape.
        let ln = values["embeddings.LayerNorm.weight"].clone();
        rewrite(d.path(), |ts| {
            ts.retain(|x| x.0 != "bert.embeddings.LayerNorm.weight");
            ts.push(t("bert.embeddings.LayerNorm.gamma", &[8], ln.clone()));
            ts.push(t("cls.predictions.transform.dense.weight", &[8, 8], randn(9, 64)));
            ts.push(t("cls.seq_relationship.weight", &[2, 8], randn(9, 16)));
        });
        let w = load_bert_dir(d.path()).unwrap();
        assert_eq!(w.tensors["embeddings.LayerNorm.weight"].1, ln);
        assert_eq!(w.tensors["cls.predictions.transform.dense.weight"].1, randn(9, 64));
        assert!(!w.tensors.contains_key("cls.seq_relationship.weight"));

        let name = "bert.encoder.layer.1.intermediate.dense.weight";
        rewrite(d.path(), |ts| set_shape(ts, name, &[8, 12]));
        let msg = input_err(load_bert_dir(d.path()));
        assert!(msg.ends_with(&format!("tensor `{name}` has shape [8, 12], expected [12, 8]")), "{msg}");
        rewrite(d.path(), |t| t.retain(|x| x.0 != name));
        assert!(
            input_err(load_bert_dir(d.path())).ends_with("missing tensor `encoder.layer.1.intermediate.dense.weight`")
        );
    }

    /// A file with raw little-endian tensors of any dtype.
    fn write_raw(path: &Path, items: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
        let views: Vec<_> =
            items.iter().map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
        safetensors::serialize_to_file(views, None, path).unwrap();
    }

    #[test]
    fn reads_half_floats_and_integer_ids() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("g.safetensors");
        let xs = randn(4, 6);
        let f16: Vec<u8> = xs.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect();
        let bf16: Vec<u8> = xs.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect();
        let ids: Vec<i64> = (0..6).map(|i| (kernels::rng::uniform(8, i) * 30000.0) as i64).collect();
        write_raw(
            &p,
            &[
                ("a", Dtype::F16, vec![2, 3], f16),
                ("b", Dtype::BF16, vec![6], bf16),
                ("ids", Dtype::I64, vec![3, 2], ids.iter().flat_map(|x| x.to_le_bytes()).collect()),
                ("big", Dtype::I64, vec![1], (1i64 << 40).to_le_bytes().to_vec()),
            ],
        );
        let t = read_tensors(&p).unwrap();
        assert_eq!(t.iter().map(|x| x.0.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        for (x, (a, b)) in xs.iter().zip(t[0].2.iter().zip(&t[1].2)) {
            assert!((x - a).abs() <= 1e-3 * x.abs().max(1.0) && (x - b).abs() <= 8e-3 * x.abs().max(1.0));
        }
        let (shape, got) = read_i32_tensor(&p, "ids").unwrap();
        assert_eq!((shape, got), (vec![3, 2], ids.iter().map(|&x| x as i32).collect::<Vec<_>>()));
        assert!(input_err(read_i32_tensor(&p, "big")).contains("beyond the i32 range"));
        assert!(input_err(read_i32_tensor(&p, "a")).contains("tensor `a` has dtype F16"));
        assert!(input_err(read_i32_tensor(&p, "nope")).ends_with("missing tensor `nope`"));
        std::fs::write(&p, b"garbage").unwrap();
        assert!(input_err(read_tensors(&p)).contains("not a valid safetensors file"));
    }
}
