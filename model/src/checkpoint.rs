//! Checkpoints in transformers' own layout (safetensors + config.json), so a directory we save
//! loads with `EncoderDecoderModel.from_pretrained` and a BERT from the Hub loads here.

use std::collections::HashMap;
use std::path::Path;

use crate::config::{BertConfig, Family, ModelConfig};
use crate::error::{Error, Result};
use crate::params::ParamTable;

mod save;
mod shards;
mod tensors;
#[cfg(test)]
use save::write_synced;
pub use save::{
    MODEL_FILES, WRITER_FILE, is_model_dir, remove_checkpoint_dir, remove_stale_partials, save_model_dir,
    save_model_dir_opts, save_model_dir_with,
};
use shards::{DirKind, Tensor, WeightFiles};
pub use tensors::{NamedTensor, read_i32_tensor, read_tensors, safetensors_error, write_tensors};
use tensors::{check_shape, widen, write_safetensors};

/// A whole EncoderDecoderModel: its config and every parameter in the table's flat layout.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub config: ModelConfig,
    pub table: ParamTable,
    pub params: Vec<f32>,
}

/// A pre-trained BERT (or RoBERTa), by HF BertModel names without prefix
/// (`encoder.layer.0...`), plus its MLM head when the file has one, in the family's names
/// (`cls.predictions.transform.*` and `cls.predictions.bias`; RoBERTa's `lm_head.dense.*`,
/// `lm_head.layer_norm.*`, `lm_head.bias`).
#[derive(Clone, Debug)]
pub struct BertWeights {
    pub config: BertConfig,
    pub tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
    /// The file's tensors that are not part of a BertModel of this config (position_ids
    /// buffers, the NSP head, anything else), by their names in the file: what loading ignores.
    pub ignored: Vec<String>,
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

/// The name a tensor has in BertModel (RobertaModel): *ForPreTraining and *ForMaskedLM files
/// prefix the family's `bert.` or `roberta.`, and checkpoints converted from TensorFlow call
/// LayerNorm's parameters gamma and beta.
fn bert_name(raw: &str, family: Family) -> String {
    let n = raw.strip_prefix(family.stack_prefix()).unwrap_or(raw);
    if let Some(p) = n.strip_suffix("LayerNorm.gamma") {
        format!("{p}LayerNorm.weight")
    } else if let Some(p) = n.strip_suffix("LayerNorm.beta") {
        format!("{p}LayerNorm.bias")
    } else {
        n.to_owned()
    }
}

/// The tensors a BERT directory may give us, with their shapes and whether they are required:
/// the stack (pooler optional) and the MLM head's transform and bias (optional).
fn bert_wanted(config: &BertConfig) -> HashMap<String, (Vec<usize>, bool)> {
    let mut wanted: HashMap<String, (Vec<usize>, bool)> =
        bert_shapes(config).into_iter().map(|(n, s)| (n.clone(), (s, !n.starts_with("pooler.")))).collect();
    let (h, head) = (config.hidden_size, config.family.head());
    for (n, s) in [
        (format!("{}.weight", head.dense), vec![h, h]),
        (format!("{}.bias", head.dense), vec![h]),
        (format!("{}.weight", head.norm), vec![h]),
        (format!("{}.bias", head.norm), vec![h]),
        (head.bias.to_owned(), vec![config.vocab_size]),
    ] {
        wanted.insert(n, (s, false));
    }
    wanted
}

/// Read a BERT checkpoint directory (config.json + model.safetensors, or a sharded index) and
/// check every tensor the stack needs against the config.
pub fn load_bert_dir(dir: &Path) -> Result<BertWeights> {
    let config = BertConfig::from_file(&dir.join("config.json"))?;
    let wanted = bert_wanted(&config);
    let files = WeightFiles::open(dir, DirKind::Bert)?;
    let mut tensors = HashMap::new();
    let (mut unused, mut ignored) = (0usize, Vec::new());
    for Tensor { path, name: raw, view } in files.tensors()? {
        let name = bert_name(&raw, config.family);
        let Some((shape, _)) = wanted.get(&name) else {
            // position_ids buffers, the NSP head, the tied MLM decoder: not ours to load.
            let expected_extra = name.ends_with("position_ids")
                || name.ends_with("token_type_ids")
                || name.starts_with("cls.")
                || name.starts_with("lm_head.");
            unused += usize::from(!expected_extra);
            ignored.push(raw);
            continue;
        };
        check_shape(path, &raw, view.shape(), shape)?;
        let mut data = vec![0.0; view.shape().iter().product()];
        widen(path, &raw, &view, &mut data)?;
        if tensors.insert(name.clone(), (shape.clone(), data)).is_some() {
            let msg = format!("tensor `{name}` appears twice (with and without `{}`)", config.family.stack_prefix());
            return Err(Error::input(&files.source, msg));
        }
    }
    let mut required: Vec<&String> = wanted.iter().filter(|(_, (_, req))| *req).map(|(n, _)| n).collect();
    required.sort();
    if let Some(n) = required.into_iter().find(|n| !tensors.contains_key(*n)) {
        return Err(Error::input(&files.source, format!("missing tensor `{n}`")));
    }
    if unused > 0 {
        tracing::warn!("{}: {unused} tensors are not part of a BERT of this config; ignored", files.source.display());
    }
    Ok(BertWeights { config, tensors, ignored })
}

/// Load a directory written by `save_model_dir` or by transformers' `save_pretrained` (one
/// model.safetensors or a sharded index).
pub fn load_model_dir(dir: &Path) -> Result<Checkpoint> {
    let cfg_path = dir.join("config.json");
    let config = ModelConfig::from_file(&cfg_path)?;
    check_tie(&config, &cfg_path)?;
    let table = ParamTable::new(&config);
    let files = WeightFiles::open(dir, DirKind::Model)?;
    // A config.json claiming more than its weights hold fails before the buffer is allocated.
    crate::config::check_weights_size(&cfg_path, &files.source, files.bytes(), table.storage_len)?;
    let index: HashMap<&str, usize> = table.entries.iter().enumerate().map(|(i, e)| (e.name.as_str(), i)).collect();
    let mut params = vec![0.0f32; table.storage_len];
    let mut filled = vec![false; table.entries.len()];

    let mut aliases = Vec::new();
    let tied = format!("decoder.{}", config.decoder.family.head().tied);
    for t in files.tensors()? {
        let name = t.name.as_str();
        let ignored = name.starts_with(&tied) || name.ends_with(".position_ids") || name.ends_with(".token_type_ids");
        if ignored {
            continue;
        }
        let &i = index.get(name).ok_or_else(|| Error::input(t.path, format!("unknown tensor `{name}`")))?;
        let e = &table.entries[i];
        check_shape(t.path, name, t.view.shape(), &e.shape)?;
        match e.alias_of {
            None => {
                widen(t.path, name, &t.view, &mut params[e.range()])?;
                filled[i] = true;
            }
            Some(_) => aliases.push(t),
        }
    }
    // A file that stores only one side of a tied pair (transformers may drop either name)
    // still fills the storage.
    for t in aliases {
        let owner = table.entries[index[t.name.as_str()]].alias_of.expect("alias");
        if !filled[owner] {
            widen(t.path, &t.name, &t.view, &mut params[table.entries[owner].range()])?;
            filled[owner] = true;
        }
    }
    if let Some(e) = table.owned().find(|e| !filled[index[e.name.as_str()]]) {
        return Err(Error::input(&files.source, format!("missing tensor `{}`", e.name)));
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
    if cfg.encoder.family != cfg.decoder.family {
        return Err(Error::input(
            file,
            format!(
                "`tie_encoder_decoder` is true but the encoder is {} and the decoder {}: one stack cannot be both",
                cfg.encoder.family.model_type(),
                cfg.decoder.family.model_type()
            ),
        ));
    }
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

#[cfg(test)]
mod shard_tests;
#[cfg(test)]
pub(crate) mod tests;
