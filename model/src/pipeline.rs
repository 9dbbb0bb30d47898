//! The training data pipeline over tokenized pairs: which examples make each global batch, which
//! rank reads which part of it, and the padded `data::Batch` of a micro-batch.
//!
//! Order. Epoch `e` is a pure function of `(seed, e)`: a Fisher-Yates shuffle of all examples,
//! cut to `steps_per_epoch * global_batch` (the last incomplete global batch is dropped; the
//! next epoch shuffles anew, so a different tail is dropped each time). The shuffled examples
//! are then bucketed: each chunk of `bucket_batches` (default 50) global batches is sorted by
//! framed source + target length and cut into global batches, so a batch holds examples of
//! similar length and pads little; finally the order of the batches is shuffled, so lengths do
//! not come in a ramp.
//!
//! Sharding. A global batch (sorted by length within) is cut into consecutive micro-batches of
//! `micro_batch` examples; rank `r` of `world` takes micro-batches `r, r + world, r + 2 world`,
//! ... (round-robin, so every rank gets a similar mix of short and long ones). The global batch
//! never depends on the world size, only who reads what. When `world` does not divide the number
//! of micro-batches (an elastic restart with fewer workers), some ranks run one fewer; the
//! gradient is still that of the whole global batch as long as the loss is normalised by the
//! global token count.
//!
//! Resume. [`Cursor`] names the next global batch to read; it serialises with serde and
//! [`Sampler::batches_from`] continues from it exactly as an uninterrupted run would.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::{self, Batch, Framing, IdRows, Pair, read_pairs, tokenize_pairs};
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// Pairs are tokenized this many at a time, so the `tokenizers` crate's per-text `Encoding`
/// objects (offsets, token strings, masks: far larger than the ids) never exist for a whole
/// large file at once.
pub const TOKENIZE_CHUNK: usize = 8192;

/// Token ids (without special tokens) of every source and target of one file.
#[derive(Clone, Debug)]
pub struct Dataset {
    src: IdRows,
    tgt: IdRows,
    origin: PathBuf,
}

impl Dataset {
    /// Read a JSONL/TSV file (see `data::read_pairs`) and tokenize it.
    pub fn load(path: &Path, tok: &Tokenizer, source_field: &str, target_field: &str) -> Result<Dataset> {
        let pairs = read_pairs(path, source_field, target_field)?;
        Dataset::from_pairs(tok, pairs, path)
    }

    /// Tokenize `pairs` in chunks of [`TOKENIZE_CHUNK`], each spread over the tokenizer's
    /// thread pool, freeing each chunk's text once it is tokenized.
    pub fn from_pairs(tok: &Tokenizer, pairs: Vec<Pair>, origin: &Path) -> Result<Dataset> {
        Dataset::from_pairs_chunked(tok, pairs, origin, TOKENIZE_CHUNK)
    }

    fn from_pairs_chunked(tok: &Tokenizer, mut pairs: Vec<Pair>, origin: &Path, chunk: usize) -> Result<Dataset> {
        let (mut src, mut tgt) = (Vec::with_capacity(pairs.len()), Vec::with_capacity(pairs.len()));
        for part in pairs.chunks_mut(chunk.max(1)) {
            let (s, t) = tokenize_pairs(tok, part)?;
            src.extend(s);
            tgt.extend(t);
            for p in part {
                *p = Pair { source: String::new(), target: String::new() };
            }
        }
        Dataset::from_ids(src, tgt, origin)
    }

    /// Already tokenized rows; `origin` names the data in errors.
    pub fn from_ids(src: IdRows, tgt: IdRows, origin: &Path) -> Result<Dataset> {
        if src.len() != tgt.len() {
            return Err(Error::input(origin, format!("{} sources but {} targets", src.len(), tgt.len())));
        }
        if src.is_empty() {
            return Err(Error::input(origin, "no examples"));
        }
        Ok(Dataset { src, tgt, origin: origin.to_path_buf() })
    }

    pub fn len(&self) -> usize {
        self.src.len()
    }
    pub fn is_empty(&self) -> bool {
        self.src.is_empty()
    }
    pub fn src(&self) -> &IdRows {
        &self.src
    }
    pub fn tgt(&self) -> &IdRows {
        &self.tgt
    }
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    /// Framed, truncated length of each example as `Batch::new` lays it out: source + [CLS] +
    /// [SEP] plus target + one ([CLS] in, [SEP] out). The key length bucketing sorts by.
    pub fn lengths(&self, max_src: usize, max_tgt: usize) -> Vec<u32> {
        self.src
            .iter()
            .zip(&self.tgt)
            .map(|(s, t)| {
                let n = data::source_len(s.len(), max_src) + data::target_len(t.len(), max_tgt);
                u32::try_from(n).unwrap_or(u32::MAX)
            })
            .collect()
    }

    /// A sampler over this data with length bucketing under the given limits.
    pub fn sampler(&self, global_batch: usize, seed: u64, max_src: usize, max_tgt: usize) -> Result<Sampler> {
        if self.len() < global_batch {
            return Err(Error::input(
                &self.origin,
                format!(
                    "{} examples, fewer than training.global_batch ({global_batch}): not even one batch",
                    self.len()
                ),
            ));
        }
        Sampler::new(self.lengths(max_src, max_tgt), global_batch, seed)
    }

    /// The padded batch of the examples at `indices` (see `Batch::new`).
    pub fn batch(
        &self,
        indices: &[usize],
        framing: impl Into<Framing>,
        max_src: usize,
        max_tgt: usize,
    ) -> Result<Batch> {
        if max_src < 2 || max_tgt < 1 {
            return Err(Error::Other(format!("batch limits {max_src}/{max_tgt} leave no room for [CLS]/[SEP]")));
        }
        if let Some(&i) = indices.iter().find(|&&i| i >= self.len()) {
            return Err(Error::Other(format!("example index {i} out of range ({} examples)", self.len())));
        }
        let src: Vec<Vec<i32>> = indices.iter().map(|&i| self.src[i].clone()).collect();
        let tgt: Vec<Vec<i32>> = indices.iter().map(|&i| self.tgt[i].clone()).collect();
        Ok(Batch::new(&src, &tgt, framing, max_src, max_tgt))
    }
}

/// Where reading resumes: the next global batch is `step_in_epoch` of `epoch` (both 0-based).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Cursor {
    pub epoch: u64,
    pub step_in_epoch: u64,
}

impl Cursor {
    /// The cursor after this one, in epochs of `steps_per_epoch` global batches.
    pub fn next(self, steps_per_epoch: u64) -> Cursor {
        Cursor { epoch: self.epoch, step_in_epoch: self.step_in_epoch + 1 }.normalize(steps_per_epoch)
    }

    /// Carry a `step_in_epoch` past the end of its epoch into later epochs.
    pub fn normalize(self, steps_per_epoch: u64) -> Cursor {
        let spe = steps_per_epoch.max(1);
        Cursor { epoch: self.epoch + self.step_in_epoch / spe, step_in_epoch: self.step_in_epoch % spe }
    }
}

/// Random-number streams of one epoch.
const STREAM_EXAMPLES: u64 = 0x5348_5546_4c45_4558; // "SHUFLEEX"
const STREAM_BATCHES: u64 = 0x5348_5546_4c45_4241; // "SHUFLEBA"

/// Fisher-Yates with `kernels::rng::mix(key, i)` as the draw for position `i`: a pure function
/// of `key`. The index in `0..=i` is the high word of the 128-bit product of the draw and
/// `i + 1` (Lemire); its bias is below (i + 1) / 2^64.
pub fn shuffle<T>(items: &mut [T], key: u64) {
    for i in (1..items.len()).rev() {
        let r = kernels::rng::mix(key, i as u64);
        let j = ((r as u128 * (i as u128 + 1)) >> 64) as usize;
        items.swap(i, j);
    }
}

/// Decides which examples form each global batch; knows nothing of workers.
#[derive(Clone, Debug)]
pub struct Sampler {
    seed: u64,
    global_batch: usize,
    /// Bucketing key of every example (`Dataset::lengths`).
    lengths: Vec<u32>,
    bucket_batches: usize,
}

impl Sampler {
    pub const DEFAULT_BUCKET_BATCHES: usize = 50;

    /// `lengths[i]` is the bucketing key of example `i` (e.g. from `Dataset::lengths`).
    pub fn new(lengths: Vec<u32>, global_batch: usize, seed: u64) -> Result<Sampler> {
        if global_batch == 0 || lengths.len() < global_batch {
            return Err(Error::Other(format!(
                "sampler: {} examples cannot fill a global batch of {global_batch}",
                lengths.len()
            )));
        }
        Ok(Sampler { seed, global_batch, lengths, bucket_batches: Self::DEFAULT_BUCKET_BATCHES })
    }

    /// Sort chunks of `k` global batches by length; 0 or 1 turns bucketing off (plain random
    /// batches).
    pub fn with_bucket_batches(mut self, k: usize) -> Sampler {
        self.bucket_batches = k;
        self
    }

    pub fn global_batch(&self) -> usize {
        self.global_batch
    }
    pub fn num_examples(&self) -> usize {
        self.lengths.len()
    }
    pub fn steps_per_epoch(&self) -> u64 {
        (self.lengths.len() / self.global_batch) as u64
    }

    /// The cursor of global step `step` (0-based) of a run that started at the beginning.
    pub fn cursor_at(&self, step: u64) -> Cursor {
        Cursor { epoch: 0, step_in_epoch: step }.normalize(self.steps_per_epoch())
    }

    /// The order of one epoch: every global batch of it.
    pub fn epoch(&self, epoch: u64) -> Epoch {
        let g = self.global_batch;
        let steps = self.lengths.len() / g;
        let epoch_key = kernels::rng::mix(self.seed, epoch);
        let mut perm: Vec<usize> = (0..self.lengths.len()).collect();
        shuffle(&mut perm, kernels::rng::mix(epoch_key, STREAM_EXAMPLES));
        perm.truncate(steps * g);
        if self.bucket_batches > 1 {
            for chunk in perm.chunks_mut(self.bucket_batches * g) {
                // Stable: ties keep their shuffled order.
                chunk.sort_by_key(|&i| self.lengths[i]);
            }
        }
        let mut order: Vec<usize> = (0..steps).collect();
        shuffle(&mut order, kernels::rng::mix(epoch_key, STREAM_BATCHES));
        let examples = order.iter().flat_map(|&b| perm[b * g..(b + 1) * g].iter().copied()).collect();
        Epoch { epoch, global_batch: g, examples }
    }

    /// The example indices of the global batch at `cursor` (computes its whole epoch; iterate
    /// with `batches_from` to read many).
    pub fn batch_at(&self, cursor: Cursor) -> Vec<usize> {
        let c = cursor.normalize(self.steps_per_epoch());
        self.epoch(c.epoch).batch(c.step_in_epoch as usize).to_vec()
    }

    /// Every global batch from `cursor` on, rolling over into later epochs without end.
    pub fn batches_from(&self, cursor: Cursor) -> Batches<'_> {
        Batches { sampler: self, plan: None, cursor: cursor.normalize(self.steps_per_epoch()) }
    }
}

/// The global batches of one epoch, in the order they are read.
#[derive(Clone, Debug)]
pub struct Epoch {
    pub epoch: u64,
    global_batch: usize,
    /// `steps * global_batch` example indices, batch after batch.
    examples: Vec<usize>,
}

impl Epoch {
    pub fn steps(&self) -> usize {
        self.examples.len() / self.global_batch
    }
    /// Global batch `step` of this epoch; empty past the end.
    pub fn batch(&self, step: usize) -> &[usize] {
        self.examples.chunks(self.global_batch).nth(step).unwrap_or(&[])
    }
    pub fn batches(&self) -> impl Iterator<Item = &[usize]> {
        self.examples.chunks(self.global_batch)
    }
}

/// One global batch as `Batches` yields it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GlobalBatch {
    /// Where this batch was read.
    pub cursor: Cursor,
    /// Where reading resumes after it: save this with a checkpoint taken after the step.
    pub next: Cursor,
    pub indices: Vec<usize>,
}

/// Iterator of `Sampler::batches_from`; keeps the current epoch's order.
pub struct Batches<'a> {
    sampler: &'a Sampler,
    plan: Option<Epoch>,
    cursor: Cursor,
}

impl Iterator for Batches<'_> {
    type Item = GlobalBatch;

    fn next(&mut self) -> Option<GlobalBatch> {
        let spe = self.sampler.steps_per_epoch();
        if spe == 0 {
            return None;
        }
        let cursor = self.cursor;
        if self.plan.as_ref().is_none_or(|p| p.epoch != cursor.epoch) {
            self.plan = Some(self.sampler.epoch(cursor.epoch));
        }
        let indices = self.plan.as_ref()?.batch(cursor.step_in_epoch as usize).to_vec();
        self.cursor = cursor.next(spe);
        Some(GlobalBatch { cursor, next: self.cursor, indices })
    }
}

/// Rank `rank`'s micro-batches of `global`: micro-batches `rank, rank + world, ...` of size
/// `micro_batch` (the last one shorter if `micro_batch` does not divide the batch). Empty for
/// a rank outside the world or a zero size.
pub fn shard(global: &[usize], micro_batch: usize, rank: usize, world: usize) -> Vec<&[usize]> {
    if micro_batch == 0 || world == 0 || rank >= world {
        return Vec::new();
    }
    global.chunks(micro_batch).skip(rank).step_by(world).collect()
}

#[cfg(test)]
#[path = "pipeline_tests.rs"]
mod tests;
