//! Checkpoints in transformers' own layout (safetensors + config.json), so a directory we save
//! loads with `EncoderDecoderModel.from_pretrained` and a BERT from the Hub loads here.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView, View};

use crate::config::{BertConfig, ModelConfig};
use crate::error::{Error, Result};
use crate::params::ParamTable;

mod save;
use save::sync_dir;
#[cfg(test)]
use save::write_synced;
pub use save::{
    MODEL_FILES, WRITER_FILE, is_model_dir, remove_stale_partials, save_model_dir, save_model_dir_opts,
    save_model_dir_with,
};

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

/// Load a directory written by `save_model_dir` or by transformers' `save_pretrained`.
pub fn load_model_dir(dir: &Path) -> Result<Checkpoint> {
    let cfg_path = dir.join("config.json");
    let config = ModelConfig::from_file(&cfg_path)?;
    check_tie(&config, &cfg_path)?;
    let table = ParamTable::new(&config);
    // A config.json claiming more than its weights hold fails before the buffer is allocated.
    crate::config::check_weights_size(&cfg_path, &dir.join("model.safetensors"), table.storage_len)?;
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
    SafeTensors::deserialize(bytes)
        .map_err(|e| Error::input(path, format!("not a valid safetensors file: {}", safetensors_error(&e))))
}

/// What went wrong reading a safetensors file, without quoting its header: the crate's JSON
/// errors can contain the file's strings, and messages must not echo what a file holds.
pub fn safetensors_error(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::InvalidHeaderDeserialization(j) | E::JsonError(j) => {
            format!("header is not valid JSON of the expected shape (line {}, column {})", j.line(), j.column())
        }
        E::InvalidHeader(_) => "header is not UTF-8".to_owned(),
        E::HeaderTooLarge => "header length is too large".to_owned(),
        E::HeaderTooSmall | E::InvalidHeaderLength => "header length does not fit the file".to_owned(),
        E::InvalidOffset(_) | E::TensorInvalidInfo | E::MisalignedSlice | E::ValidationOverflow => {
            "a tensor's offsets do not match its shape and dtype".to_owned()
        }
        E::MetadataIncompleteBuffer => "the data is shorter than the header says".to_owned(),
        other => format!("{:?}", std::mem::discriminant(other)),
    }
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

#[cfg(test)]
pub(crate) mod tests;
