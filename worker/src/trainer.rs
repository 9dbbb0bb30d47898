//! The training loop of one rank.
//!
//! A step reads global batch `step` (model::pipeline: deterministic in (seed, epoch), length
//! bucketed), takes this rank's micro-batches of it, accumulates their gradients, averages them
//! over ranks, clips the global norm, and makes one AdamW update. Each token's loss is weighted by
//! 1 / (label tokens of the GLOBAL batch), so the update is the same whatever the number of
//! workers and micro-batches. Dropout masks are keyed on (seed, step, micro-batch), so a step
//! replays exactly after a resume.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use kernels::collective::Collective;
use kernels::{Backend, rng};
use model::checkpoint::{self, Checkpoint};
use model::data::{Pair, read_pairs, tokenize_pairs};
use model::job::{JobSpec, Metric, ModelSpec};
use model::net::{Bert2Bert, GenerateOptions, Inputs, LengthPenaltyKind, PassOptions};
use model::optim::{Optimizer, Schedule};
use model::pipeline::{Cursor, Dataset, Sampler, shard};
use model::tokenizer::Tokenizer;
use model::{Error, Result};

use crate::evaluate::{EvalOptions, EvalResult, evaluate};
use crate::peer::{self, Snapshot};
use crate::state::{self, JobOwner, TrainingState};

/// How long a step's collectives may take, by default, before the host gives up on them: well
/// past any compute imbalance between ranks, short enough that a dead peer fails the job.
pub const DEFAULT_COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Clone, Debug)]
pub struct StepStats {
    /// Updates done after this step (1-based).
    pub step: u64,
    pub total_steps: u64,
    /// Mean token loss of the global batch (label smoothing included).
    pub loss: f64,
    pub lr: f32,
    pub grad_norm: f32,
    /// Source + target tokens this rank processed in the step.
    pub tokens: usize,
    pub step_ms: f64,
}

#[derive(Clone, Debug)]
pub enum Event {
    Resumed { step: u64, from: PathBuf },
    Step(StepStats),
    Eval { step: u64, result: EvalResult },
    Checkpoint { step: u64, dir: PathBuf },
}

struct Validation {
    pairs: Vec<Pair>,
    src: Vec<Vec<i32>>,
    tgt: Vec<Vec<i32>>,
}

pub struct Trainer<'a, B: Backend, C: Collective<B>> {
    b: &'a B,
    coll: &'a C,
    pub job: JobSpec,
    tok: Tokenizer,
    train: Dataset,
    sampler: Sampler,
    valid: Option<Validation>,
    pub net: Bert2Bert<B>,
    opt: Optimizer<B>,
    schedule: Schedule,
    pub step: u64,
    cursor: Cursor,
    /// Set (e.g. from a SIGTERM handler) to end `run` after the current step, with a checkpoint.
    pub stop: Option<Arc<AtomicBool>>,
    /// With more than one rank, gradients are all-reduced in buckets of about this many MB
    /// (1e6 bytes) on a background thread while the last micro-batch's backward goes on;
    /// 0 turns the overlap off (one all-reduce after backward). The result is bitwise the same.
    /// From `training.grad_bucket_mb` on CPU jobs, 0 on CUDA jobs.
    pub grad_bucket_mb: f64,
    /// Staging buffers of the buckets, reused from step to step.
    grad_stage: Vec<B::Buf>,
    /// Wall time of the last step from the end of backward until the gradients were reduced:
    /// the communication that backward did not hide.
    pub comm_wait_ms: f64,
    /// The job the checkpoints belong to.
    pub owner: JobOwner,
    /// How long the host waits for a step's collectives (`Collective::wait_timeout`) before the
    /// step fails (NCCL: the communicator is aborted). A worker sets its --collective-timeout.
    pub collective_timeout: Duration,
}

fn load_model(job: &JobSpec) -> Result<(Checkpoint, Tokenizer)> {
    match &job.model {
        ModelSpec::Init(dir) => {
            let tok = Tokenizer::from_model_dir(dir)?;
            Ok((checkpoint::load_model_dir(dir)?, tok))
        }
        ModelSpec::Inline { encoder, decoder, variant } => {
            let tok = Tokenizer::from_checkpoints(encoder, decoder.as_deref())?;
            let ck = model::init::warm_start(encoder, decoder.as_deref(), *variant, tok.special(), job.training.seed)?;
            Ok((ck, tok))
        }
    }
}

impl<'a, B: Backend + Sync, C: Collective<B> + Sync> Trainer<'a, B, C> {
    /// Load the model and data of `job`, and resume from its newest valid checkpoint if any: a
    /// local run, owning the checkpoints of the job's name (`JobOwner::local`).
    pub fn new(b: &'a B, coll: &'a C, job: JobSpec) -> Result<(Self, Option<Event>)> {
        let owner = JobOwner::local(&job.name);
        Self::new_owned(b, coll, job, owner)
    }

    /// `new` for the job `owner` (under a coordinator: with its job id). The checkpoints it
    /// writes name `owner`; it resumes from and prunes only checkpoints of the same job, and
    /// refuses to start over another job's unless `checkpoint.resume_from` names one.
    pub fn new_owned(b: &'a B, coll: &'a C, job: JobSpec, owner: JobOwner) -> Result<(Self, Option<Event>)> {
        let (mut trainer, ck, model_dir) = Self::build(b, coll, job, owner)?;
        let resumed = trainer.resume()?;
        // A fresh start trains the cross-attention from what the checkpoint holds: refuse one
        // that was never initialised (a resumed run has trained it already).
        if trainer.step == 0 {
            model::guards::check_cross_attention(&ck.table, &ck.params, &model_dir)?;
        }
        Ok((trainer, resumed))
    }

    /// `new_owned`, resuming from the training state rank `root` holds in memory (`held`, on
    /// that rank) instead of from a checkpoint: the root hands it to every rank over the
    /// collective, checked by a hash ([`crate::peer`]). Every rank of the gang must call this.
    pub fn new_from_peer(
        b: &'a B,
        coll: &'a C,
        job: JobSpec,
        owner: JobOwner,
        (root, held): (usize, Option<&Snapshot>),
    ) -> Result<Self> {
        let (mut t, _, _) = Self::build(b, coll, job, owner)?;
        let n = t.net.table.storage_len;
        let bufs = peer::StateBuffers::<B> { params: &mut t.net.params, adam_m: &mut t.opt.m, adam_v: &mut t.opt.v, n };
        let got = peer::transfer(b, coll, root, held, t.job.training.seed, bufs)?;
        t.net.params_written();
        if got.step > t.job.training.steps {
            return Err(Error::Other(format!("peer state is at step {}, past training.steps", got.step)));
        }
        (t.step, t.opt.step, t.cursor) = (got.step, got.step, got.cursor);
        tracing::info!("resumed from rank {root}'s state in memory at step {}", got.step);
        Ok(t)
    }

    /// This rank's training state, copied to host memory (kept for [`Self::new_from_peer`]).
    pub fn snapshot(&self) -> Result<Snapshot> {
        let (b, n) = (self.b, self.net.table.storage_len);
        Ok(Snapshot {
            step: self.step,
            cursor: self.cursor,
            seed: self.job.training.seed,
            params: b.download(b.view(&self.net.params, 0..n))?,
            adam_m: b.download(b.view(&self.opt.m, 0..n))?,
            adam_v: b.download(b.view(&self.opt.v, 0..n))?,
        })
    }

    /// The trainer at step 0 with the model's initial weights, and the checkpoint and model
    /// directory they came from.
    fn build(b: &'a B, coll: &'a C, job: JobSpec, owner: JobOwner) -> Result<(Self, Checkpoint, PathBuf)> {
        let (ck, tok) = load_model(&job)?;
        let d = &job.data;
        let train = Dataset::load(&d.train, &tok, &d.source_field, &d.target_field)?;
        let t = &job.training;
        let sampler = train.sampler(t.global_batch, t.seed, d.max_source_len, d.max_target_len)?;
        let valid = match &d.validation {
            Some(path) => {
                let pairs = read_pairs(path, &d.source_field, &d.target_field)?;
                let (src, tgt) = tokenize_pairs(&tok, &pairs)?;
                Some(Validation { pairs, src, tgt })
            }
            None => None,
        };
        let model_dir = match &job.model {
            ModelSpec::Init(dir) => dir.clone(),
            ModelSpec::Inline { encoder, .. } => encoder.clone(),
        };
        model::guards::check_special_ids(&ck.config, tok.special(), &model_dir.join("config.json"))?;
        model::guards::check_tokenizer_fits(&ck.config, &tok)?;
        let net = Bert2Bert::new(b, ck.config.clone(), ck.table.clone(), &ck.params)?;
        let opt = Optimizer::new(b, &ck.table, job.adamw())?;
        let schedule = job.schedule();
        let trainer = Trainer {
            b,
            coll,
            tok,
            train,
            sampler,
            valid,
            net,
            opt,
            schedule,
            step: 0,
            cursor: Cursor::default(),
            stop: None,
            // On CUDA the buckets' NCCL all-reduces run on their own stream while backward goes
            // on (ordered by events; `unstage` waits before the copy back). The virtual GPU's
            // two-worker test checks that this equals one worker.
            grad_bucket_mb: job.training.grad_bucket_mb as f64,
            grad_stage: Vec::new(),
            comm_wait_ms: 0.0,
            job,
            owner,
            collective_timeout: DEFAULT_COLLECTIVE_TIMEOUT,
        };
        // Rank 0 alone writes checkpoints; no save of this attempt can run yet (a step needs
        // every rank), so what a killed or failed save of this job left is stale.
        if trainer.coll.rank() == 0 {
            state::remove_stale_partials(&trainer.job.checkpoint.dir, &trainer.owner)?;
        }
        Ok((trainer, ck, model_dir))
    }

    /// Where to resume from: this job's newest valid checkpoint; else `checkpoint.resume_from`;
    /// else nothing, unless `checkpoint.dir` holds another job's checkpoints (refused).
    fn resume_dir(&self) -> Result<Option<PathBuf>> {
        let spec = &self.job.checkpoint;
        if let Some(dir) = state::latest_owned(&spec.dir, &self.owner) {
            return Ok(Some(dir));
        }
        if let Some(from) = &spec.resume_from {
            state::verify_manifest(from)?;
            return Ok(Some(from.clone()));
        }
        match state::foreign_checkpoints(&spec.dir, &self.owner).pop() {
            Some((dir, who)) => Err(Error::input(
                &spec.dir,
                format!(
                    "checkpoint.dir holds checkpoints of {who} (newest {}); refusing to start {} over them: set \
                     checkpoint.resume_from to the checkpoint to start from, or use another checkpoint.dir",
                    dir.file_name().unwrap_or_default().to_string_lossy(),
                    self.owner.describe()
                ),
            )),
            None => Ok(None),
        }
    }

    fn resume(&mut self) -> Result<Option<Event>> {
        let Some(dir) = self.resume_dir()? else {
            return Ok(None);
        };
        let n = self.net.table.storage_len;
        // Two f32 moments per parameter and a header of a few hundred bytes.
        let st = state::read_state(&dir, 8 * n as u64 + (1 << 16))?;
        let total = self.job.training.steps;
        if st.step > total {
            return Err(Error::input(
                &dir,
                format!("checkpoint step {} is past training.steps {total}: nothing to do", st.step),
            ));
        }
        let ck = checkpoint::load_model_dir(&dir)?;
        if ck.params.len() != n || st.adam_m.len() != n || st.adam_v.len() != n {
            return Err(Error::input(&dir, "checkpoint does not match the job's model shape"));
        }
        if st.seed != self.job.training.seed {
            return Err(Error::input(
                &dir,
                format!("checkpoint was trained with seed {}, the job says {}", st.seed, self.job.training.seed),
            ));
        }
        let b = self.b;
        b.copy(b.view(&b.upload(&ck.params)?, 0..n), b.view_mut(&mut self.net.params, 0..n))?;
        self.net.params_written();
        self.opt.m = b.upload(&st.adam_m)?;
        self.opt.v = b.upload(&st.adam_v)?;
        self.opt.step = st.step;
        self.step = st.step;
        self.cursor = st.cursor;
        tracing::info!("resumed from {} at step {}", dir.display(), st.step);
        Ok(Some(Event::Resumed { step: st.step, from: dir }))
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tok
    }

    /// How many gradient buckets the last step all-reduced while backward ran (0: none).
    pub fn grad_bucket_count(&self) -> usize {
        self.grad_stage.len()
    }

    /// One optimiser step.
    pub fn step(&mut self) -> Result<StepStats> {
        let t0 = Instant::now();
        let (b, job) = (self.b, &self.job);
        let (d, t) = (&job.data, &job.training);
        let (rank, world) = (self.coll.rank(), self.coll.world_size());
        let global = self.sampler.batch_at(self.cursor);
        // Every rank knows the whole global batch, so the loss normaliser needs no communication.
        let label_tokens: usize =
            global.iter().map(|&i| model::data::target_len(self.train.tgt()[i].len(), d.max_target_len)).sum();
        let grad_scale = world as f32 / label_tokens as f32;
        self.net.zero_grads(b)?;
        let (mut loss_sum, mut tokens) = (0.0f64, 0usize);
        let (special, framing) = (self.tok.special(), self.tok.framing());
        let micros = shard(&global, job.micro_batch(), rank, world);
        let n = self.net.table.storage_len;
        let bucket_len = (self.grad_bucket_mb.max(0.0) * 1e6 / 4.0) as usize;
        // Every rank must run a backward to report buckets; all ranks see the same global batch,
        // so they agree when one would have no micro-batch and all fall back to one all-reduce.
        let every_rank_busy = global.len().div_ceil(job.micro_batch().max(1)) >= world;
        let overlap = world > 1 && bucket_len > 0 && every_rank_busy;
        let mut buckets = Buckets::new(n, bucket_len, self.coll.bucket_align());
        let mut spare = std::mem::take(&mut self.grad_stage).into_iter();
        let (coll, net, train, step) = (self.coll, &mut self.net, &self.train, self.step);
        let (reduced, backward_done) = thread::scope(|sc| -> Result<(Reduced<B>, Instant)> {
            // Buckets go to the reducer in the order backward finishes them, the same on every
            // rank, so the ranks' collectives pair up.
            let (tx, rx) = mpsc::channel::<(Range<usize>, B::Buf)>();
            let reducer = overlap.then(|| {
                sc.spawn(move || -> Result<Reduced<B>> {
                    let mut done = Vec::new();
                    for (range, mut buf) in rx {
                        coll.all_reduce_avg(b, b.view_mut(&mut buf, 0..range.len()))?;
                        done.push((range, buf));
                    }
                    Ok(done)
                })
            });
            let mut start_buckets = |ready: Range<usize>, grads: &B::Buf| -> Result<()> {
                for range in buckets.ready_from(ready.start) {
                    let len = range.len();
                    let mut buf = match spare.next() {
                        Some(s) if b.len(&s) == len => s,
                        _ => b.zeros(len)?,
                    };
                    b.copy(b.view(grads, range.clone()), b.view_mut(&mut buf, 0..len))?;
                    // A closed channel means the reducer failed: its error comes from `join`.
                    let _ = tx.send((range, buf));
                }
                Ok(())
            };
            let passes = (|| -> Result<()> {
                for (j, micro) in micros.iter().enumerate() {
                    let batch = train.batch(micro, framing, d.max_source_len, d.max_target_len)?;
                    if step == 0 {
                        // Before step 1: the batches are framed as the model expects.
                        model::guards::check_batch(&batch, special, &d.train)?;
                    }
                    let x = Inputs::from_batch(b, &batch)?;
                    let seed = rng::derive(t.seed, step.wrapping_mul(1 << 20) + (rank + j * world) as u64);
                    let opts = PassOptions {
                        train: true,
                        seed,
                        label_smoothing: t.label_smoothing,
                        grad_scale: Some(grad_scale),
                    };
                    let loss = if overlap && j + 1 == micros.len() {
                        net.pass_with_final_grads(b, &x, opts, &mut start_buckets)?
                    } else {
                        net.pass(b, &x, opts)?
                    };
                    loss_sum += loss.sum();
                    tokens += batch.batch * (batch.src_len + batch.tgt_len);
                }
                Ok(())
            })();
            let backward_done = Instant::now();
            drop(tx);
            let reduced = match reducer {
                Some(h) => h.join().unwrap_or_else(|_| Err(Error::Other("gradient all-reduce thread panicked".into()))),
                None => Ok(Vec::new()),
            };
            passes?;
            Ok((reduced?, backward_done))
        })?;
        if overlap {
            unstage(b, self.coll, reduced, (&mut self.net.grads, n), &mut self.grad_stage)?;
        } else {
            self.coll.all_reduce_avg(b, b.view_mut(&mut self.net.grads, 0..n))?;
        }
        self.comm_wait_ms = backward_done.elapsed().as_secs_f64() * 1e3;
        let mut loss_buf = b.upload(&[loss_sum as f32 * world as f32 / label_tokens as f32])?;
        self.coll.all_reduce_avg(b, b.view_mut(&mut loss_buf, 0..1))?;
        self.coll.wait(b)?;
        // The loss and the gradient norm are downloaded below: both would block for ever on a
        // collective stuck on a dead peer (`wait` orders the device only).
        // Wait here with a limit instead, so a dead peer fails the step with an error.
        self.coll.wait_timeout(b, self.collective_timeout)?;
        // Clipping and AdamW: one launch over the flat buffer, the norm computed and applied on
        // the device; it is read back with the loss, after the update is queued.
        let lr = self.schedule.lr(self.step);
        self.net.update(b, &mut self.opt, lr, t.max_grad_norm)?;
        let loss = b.download(b.view(&loss_buf, 0..1))?[0] as f64;
        let grad_norm = self.opt.grad_norm(b)?;
        self.step += 1;
        self.cursor = self.cursor.next(self.sampler.steps_per_epoch());
        if !loss.is_finite() {
            return Err(Error::Other(format!("loss is {loss} at step {}: training diverged", self.step)));
        }
        Ok(StepStats {
            step: self.step,
            total_steps: t.steps,
            loss,
            lr,
            grad_norm,
            tokens,
            step_ms: t0.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// Validation loss and, when the job asks for them, generation metrics.
    pub fn evaluate(&mut self, max_generate: usize) -> Result<Option<EvalResult>> {
        let Some(v) = &self.valid else {
            return Ok(None);
        };
        let d = &self.job.data;
        let generate = self.job.eval.as_ref().map(|e| GenerateOptions {
            beams: e.beams,
            max_len: e.max_len.min(d.max_target_len),
            length_penalty: e.length_penalty,
            penalty_kind: LengthPenaltyKind::Gnmt,
            ..GenerateOptions::default()
        });
        let metrics = self.job.eval.as_ref().map(|e| e.metrics.clone()).unwrap_or_default();
        let opts = EvalOptions {
            batch_size: self.job.micro_batch(),
            max_source_len: d.max_source_len,
            max_target_len: d.max_target_len,
            generate: generate.filter(|_| !metrics.is_empty() && max_generate > 0),
            max_generate,
            bleu: metrics.contains(&Metric::Bleu),
            rouge: metrics.contains(&Metric::Rouge),
        };
        evaluate(self.b, &mut self.net, &self.tok, &v.pairs, &v.src, &v.tgt, &opts).map(Some)
    }

    /// Write a checkpoint of the current step (rank 0 only; other ranks return `None`).
    pub fn save(&self) -> Result<Option<PathBuf>> {
        if self.coll.rank() != 0 {
            return Ok(None);
        }
        let Snapshot { step, cursor, seed, params, adam_m, adam_v } = self.snapshot()?;
        let ck = Checkpoint { config: self.net.config.clone(), table: self.net.table.clone(), params };
        let st = TrainingState { step, cursor, seed, adam_m, adam_v };
        let root = &self.job.checkpoint.dir;
        std::fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
        let dir = state::checkpoint_dir(root, self.step);
        // Never over another job's checkpoint (one started from with `resume_from`).
        if let Ok(m) = state::read_manifest(&dir)
            && !m.is_owned_by(&self.owner)
        {
            return Err(Error::input(
                &dir,
                format!("belongs to {}; not replacing it with {}'s", m.owner_description(), self.owner.describe()),
            ));
        }
        checkpoint::save_model_dir_with(&dir, &ck, Some(&self.tok), &self.owner.writer_tag(), |tmp| {
            state::write_state(tmp, &st)?;
            state::write_manifest(tmp, &self.owner)
        })?;
        state::prune(root, self.job.checkpoint.keep, &self.owner)?;
        Ok(Some(dir))
    }

    /// Train until `job.training.steps` (or `stop_after` more steps, to simulate a stop), with
    /// evaluation and checkpoints on their schedules; every event goes to `on_event`.
    pub fn run(
        &mut self,
        stop_after: Option<u64>,
        max_generate: usize,
        on_event: &mut dyn FnMut(&Event),
    ) -> Result<()> {
        let total = self.job.training.steps;
        let end = stop_after.map(|k| (self.step + k).min(total)).unwrap_or(total);
        let every_ckpt = self.job.checkpoint.every_steps;
        let every_eval = self.job.eval.as_ref().map(|e| e.every_steps).unwrap_or(0);
        let stop_requested = |s: &Option<Arc<AtomicBool>>| s.as_ref().is_some_and(|s| s.load(Ordering::SeqCst));
        while self.step < end && !stop_requested(&self.stop) {
            let stats = self.step()?;
            on_event(&Event::Step(stats));
            let last = self.step == end || stop_requested(&self.stop);
            if every_eval > 0 && (self.step % every_eval == 0 || (last && self.step == total)) {
                if let Some(result) = self.evaluate(max_generate)? {
                    if let Some(d) = result.diversity.filter(|d| d.collapsed()) {
                        tracing::warn!(
                            step = self.step,
                            identical_share = d.identical,
                            "most validation generations are the same text: the model ignores its input (collapse)"
                        );
                    }
                    on_event(&Event::Eval { step: self.step, result });
                }
            }
            if (every_ckpt > 0 && self.step % every_ckpt == 0) || last {
                if let Some(dir) = self.save()? {
                    on_event(&Event::Checkpoint { step: self.step, dir });
                }
            }
        }
        Ok(())
    }
}

/// Gradient buckets after their all-reduce: each range of the gradient buffer and its values.
type Reduced<B> = Vec<(Range<usize>, <B as kernels::Memory>::Buf)>;

/// Copy the all-reduced buckets back into the first `n` values of `grads`, and keep their
/// buffers in `stage` for the next step.
fn unstage<B: Backend, C: Collective<B>>(
    b: &B,
    coll: &C,
    reduced: Reduced<B>,
    (grads, n): (&mut B::Buf, usize),
    stage: &mut Vec<B::Buf>,
) -> Result<()> {
    let covered: usize = reduced.iter().map(|(r, _)| r.len()).sum();
    if covered != n {
        return Err(Error::Other(format!("gradient buckets covered {covered} of {n} values")));
    }
    // The bucket all-reduces may still be running on the collective's own stream (NCCL), and
    // the copies run on the compute stream: without this wait they could read unreduced values.
    coll.wait(b)?;
    for (range, buf) in reduced {
        b.copy(b.view(&buf, 0..range.len()), b.view_mut(grads, range))?;
        stage.push(buf);
    }
    Ok(())
}

/// Cuts the final part of the gradient buffer, which grows from the top down during backward,
/// into buckets of at least `len` values. Every bucket but the last (which ends at 0) starts at
/// a multiple of `align`, so the ring reduces each value in the same order as one all-reduce of
/// the whole buffer would (see `Collective::bucket_align`).
struct Buckets {
    top: usize,
    len: usize,
    align: usize,
}

impl Buckets {
    fn new(n: usize, len: usize, align: usize) -> Self {
        Self { top: n, len: len.max(1), align: align.max(1) }
    }

    /// `[final_from, n)` is final: the buckets to start now, top down.
    fn ready_from(&mut self, final_from: usize) -> Vec<Range<usize>> {
        let mut out = Vec::new();
        if final_from == 0 {
            if self.top > 0 {
                out.push(0..self.top);
                self.top = 0;
            }
            return out;
        }
        let lowest = final_from.div_ceil(self.align) * self.align;
        while self.top > lowest && self.top - lowest >= self.len {
            let start = ((self.top - self.len) / self.align * self.align).max(lowest);
            out.push(start..self.top);
            self.top = start;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::Buckets;

    #[test]
    fn buckets_tile_the_buffer_aligned_and_at_least_len() {
        let (n, len, align) = (10_000, 700, 64);
        let mut b = Buckets::new(n, len, align);
        let mut got = Vec::new();
        for mark in [9_990, 9_000, 8_950, 5_001, 4_999, 3_000, 0] {
            got.extend(b.ready_from(mark));
        }
        let mut top = n;
        for (i, r) in got.iter().enumerate() {
            assert_eq!(r.end, top);
            top = r.start;
            let last = i + 1 == got.len();
            assert!(last || r.start % align == 0, "{r:?} unaligned");
            assert!(last || r.len() >= len, "{r:?} shorter than {len}");
        }
        assert_eq!(top, 0);
        assert!(got.len() > 5, "{got:?}");
        // Nothing is cut before it is final.
        let mut b = Buckets::new(n, len, align);
        assert!(b.ready_from(9_990).is_empty());
        assert!(b.ready_from(9_000).iter().all(|r| r.start >= 9_000));
    }
}
