//! The job schema: one YAML document that says what to train, on what data, how, and where.
//!
//! The schema is written once, as the serde structs below: `deny_unknown_fields` everywhere
//! (the YAML error names the key path, line and column), defaults beside their fields, and
//! enumerations read through their names (`names`). `build` then resolves what depends on
//! other keys (paths against the job file's directory, defaults such as `min_workers` =
//! `workers`), and [`JobSpec::validate`] checks values and their relations; its errors name
//! the key path, e.g. `training.micro_batch: must divide global_batch / workers (64 / 2 = 32)`.

use std::path::{Path, PathBuf};

use serde::de::{SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use crate::error::{Error, Result, read_bounded};
use crate::limits;
use crate::names::{Device, Metric, Precision, ScheduleKind, Variant};
use crate::schedule::{AdamWConfig, Schedule};

pub use crate::limits::{MAX_BYTES as MAX_JOB_BYTES, MAX_DEPTH as MAX_JOB_DEPTH};

mod validate;

/// A parsed and checked job file. Paths are absolute (resolved against the job file's directory).
#[derive(Clone, Debug, PartialEq)]
pub struct JobSpec {
    /// The job file, named in errors.
    pub origin: PathBuf,
    pub name: String,
    pub model: ModelSpec,
    pub data: DataSpec,
    pub training: TrainingSpec,
    pub checkpoint: CheckpointSpec,
    /// `None` when `data.validation` is not set: no evaluation.
    pub eval: Option<EvalSpec>,
    pub resources: ResourcesSpec,
    pub logging: LoggingSpec,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ModelSpec {
    /// `{ init: DIR }`: a directory made by `bert2bert init`.
    Init(PathBuf),
    /// `{ encoder: DIR, decoder: DIR|random, variant: .. }`: warm-start at job start.
    /// `decoder` is `None` for `random`.
    Inline { encoder: PathBuf, decoder: Option<PathBuf>, variant: Variant },
}

/// `data`, as written (paths are resolved by `build`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// JSONL (`{"source", "target"}`) or, for a `.tsv` name, TSV.
    pub train: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation: Option<PathBuf>,
    #[serde(default = "default_len")]
    pub max_source_len: usize,
    #[serde(default = "default_len")]
    pub max_target_len: usize,
    /// JSONL field names; default `source` / `target`.
    #[serde(default = "default_source_field")]
    pub source_field: String,
    #[serde(default = "default_target_field")]
    pub target_field: String,
}

/// `training`, as written.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingSpec {
    pub steps: u64,
    /// Sequences per optimiser step over all workers.
    pub global_batch: usize,
    /// Sequences per worker per forward pass; `None`: global_batch / workers, no accumulation
    /// (see [`JobSpec::micro_batch`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub micro_batch: Option<usize>,
    #[serde(default = "default_lr", deserialize_with = "f32_value")]
    pub lr: f32,
    #[serde(default)]
    pub warmup_steps: u64,
    #[serde(default)]
    pub schedule: ScheduleKind,
    #[serde(default = "default_weight_decay", deserialize_with = "f32_value")]
    pub weight_decay: f32,
    /// 0 turns clipping off.
    #[serde(default = "one", deserialize_with = "f32_value")]
    pub max_grad_norm: f32,
    #[serde(default, deserialize_with = "f32_value")]
    pub label_smoothing: f32,
    /// `None`: the device's default (see [`JobSpec::precision`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<Precision>,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// With several workers, gradients are all-reduced in buckets of about this many MB
    /// while backward runs (0: one all-reduce after backward). Does not change the result.
    /// On CUDA the buckets' NCCL all-reduces overlap backward on their own stream.
    #[serde(default = "default_grad_bucket_mb", deserialize_with = "f32_value")]
    pub grad_bucket_mb: f32,
}

/// The longest `data.max_source_len`, `data.max_target_len` and `eval.max_len` accepted even
/// before the model is known (BERT's own limit is 512).
pub const MAX_SEQ_LEN: usize = 8192;
/// The most beams `eval.beams` (and `bert2bert generate --beams`) may ask for: each beam is a
/// full decoder state.
pub const MAX_BEAMS: usize = 64;

/// `training.grad_bucket_mb` when the job does not say: PyTorch DDP's default, big enough for
/// the ring to reach its bandwidth, small enough that the first buckets finish early in backward.
pub const DEFAULT_GRAD_BUCKET_MB: f32 = 25.0;

#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointSpec {
    pub dir: PathBuf,
    pub every_steps: u64,
    pub keep: usize,
    /// `checkpoint.resume_from`: start from another job's checkpoint explicitly. Without it, a
    /// `dir` that holds another job's checkpoints is refused rather than silently resumed.
    pub resume_from: Option<PathBuf>,
}

/// Where rank 0 writes TensorBoard event files (`bert2bert plot` reads them back).
#[derive(Clone, Debug, PartialEq)]
pub struct LoggingSpec {
    /// Default `<checkpoint.dir>/logs`, so a job's curves live beside its checkpoints.
    pub dir: PathBuf,
}

#[derive(Clone, Debug, PartialEq)]
pub struct EvalSpec {
    pub every_steps: u64,
    pub beams: usize,
    pub max_len: usize,
    pub length_penalty: f32,
    pub metrics: Vec<Metric>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ResourcesSpec {
    pub workers: usize,
    /// The fewest workers the job may go on with after a failure (elastic restart).
    pub min_workers: usize,
    pub device: Device,
    pub max_restarts: u32,
}

// ---- The sections whose defaults depend on other keys, as written. ----

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobFile {
    name: String,
    model: ModelFile,
    data: DataSpec,
    training: TrainingSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    checkpoint: Option<CheckpointFile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    eval: Option<EvalFile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    resources: Option<ResourcesFile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    logging: Option<LoggingFile>,
}

/// Either `init` alone or `encoder` + `decoder` (+ `variant`); `build` checks which.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ModelFile {
    #[serde(skip_serializing_if = "Option::is_none")]
    init: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    encoder: Option<PathBuf>,
    /// A BERT directory or `random`.
    #[serde(skip_serializing_if = "Option::is_none")]
    decoder: Option<PathBuf>,
    /// Default bert2rnd with a random decoder, else bert2bert.
    #[serde(skip_serializing_if = "Option::is_none")]
    variant: Option<Variant>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct CheckpointFile {
    /// Default `<job dir>/ckpt/<name>`.
    dir: Option<PathBuf>,
    /// Default the smaller of training.steps and 500.
    every_steps: Option<u64>,
    keep: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    resume_from: Option<PathBuf>,
}

impl Default for CheckpointFile {
    fn default() -> Self {
        CheckpointFile { dir: None, every_steps: None, keep: 3, resume_from: None }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct EvalFile {
    /// Default checkpoint.every_steps.
    every_steps: Option<u64>,
    beams: usize,
    /// Default data.max_target_len.
    max_len: Option<usize>,
    #[serde(deserialize_with = "f32_value")]
    length_penalty: f32,
    #[serde(deserialize_with = "metric_list")]
    metrics: Vec<Metric>,
}

impl Default for EvalFile {
    fn default() -> Self {
        let metrics = vec![Metric::Bleu, Metric::Rouge];
        EvalFile { every_steps: None, beams: 4, max_len: None, length_penalty: 1.0, metrics }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct LoggingFile {
    /// Default `<checkpoint.dir>/logs`.
    dir: Option<PathBuf>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ResourcesFile {
    workers: usize,
    /// Default resources.workers.
    min_workers: Option<usize>,
    device: Device,
    max_restarts: u32,
}

impl Default for ResourcesFile {
    fn default() -> Self {
        ResourcesFile { workers: 1, min_workers: None, device: Device::Cpu, max_restarts: 3 }
    }
}

// Defaults of the design's example where it implies them.
fn default_len() -> usize {
    128
}
fn default_source_field() -> String {
    "source".into()
}
fn default_target_field() -> String {
    "target".into()
}
fn default_lr() -> f32 {
    5e-5
}
fn default_weight_decay() -> f32 {
    0.01
}
fn one() -> f32 {
    1.0
}
fn default_seed() -> u64 {
    42
}
fn default_grad_bucket_mb() -> f32 {
    DEFAULT_GRAD_BUCKET_MB
}

/// A YAML number that an f32 holds: finite, not lost to underflow, not over f32::MAX. The
/// check runs inside the deserializer (a visitor), so the error names the key.
fn f32_value<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f32, D::Error> {
    struct F32;
    impl Visitor<'_> for F32 {
        type Value = f32;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("f64")
        }
        fn visit_f64<E: serde::de::Error>(self, x: f64) -> std::result::Result<f32, E> {
            if x.is_finite() && (x == 0.0 || x.abs() >= f32::MIN_POSITIVE as f64) && x.abs() <= f32::MAX as f64 {
                Ok(x as f32)
            } else {
                Err(E::custom(format!("{x} is not a finite 32-bit number")))
            }
        }
        fn visit_i64<E: serde::de::Error>(self, x: i64) -> std::result::Result<f32, E> {
            self.visit_f64(x as f64)
        }
        fn visit_u64<E: serde::de::Error>(self, x: u64) -> std::result::Result<f32, E> {
            self.visit_f64(x as f64)
        }
    }
    d.deserialize_f64(F32)
}

/// `eval.metrics`: a list of names, parsed while the list is read so that a bad name is
/// reported at `eval.metrics`.
fn metric_list<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<Metric>, D::Error> {
    struct Metrics;
    impl<'de> Visitor<'de> for Metrics {
        type Value = Vec<Metric>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a sequence")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Vec<Metric>, A::Error> {
            let mut out = Vec::new();
            while let Some(s) = seq.next_element::<String>()? {
                out.push(Metric::parse(&s).ok_or_else(|| serde::de::Error::custom(Metric::not_one_of(&s)))?);
            }
            Ok(out)
        }
    }
    d.deserialize_seq(Metrics)
}

impl JobSpec {
    /// Read, parse and check a job file. Reads at most [`MAX_JOB_BYTES`] (+1, to tell a file
    /// over the limit), so a huge file or a device such as /dev/zero costs nothing.
    pub fn from_file(path: &Path) -> Result<JobSpec> {
        let bytes = read_bounded(path, MAX_JOB_BYTES as u64 + 1)?;
        let text = String::from_utf8(bytes).map_err(|e| {
            let line = 1 + e.as_bytes()[..e.utf8_error().valid_up_to()].iter().filter(|&&b| b == b'\n').count();
            Error::input(path, format!("line {line}: not valid UTF-8"))
        })?;
        JobSpec::from_str(&text, path)
    }

    /// Parse and check job-file text; `origin` is the file it came from: relative paths resolve
    /// against its directory, and errors name it. The limits of [`limits`] (size, nesting depth,
    /// no aliases) are checked first, in linear time, before the YAML parser runs.
    pub fn from_str(text: &str, origin: &Path) -> Result<JobSpec> {
        // Windows editors start files with a BOM; left in, the first key would not match.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        limits::check(text).map_err(|msg| Error::input(origin, msg))?;
        if text.lines().all(|l| l.trim().is_empty() || l.trim_start().starts_with('#')) {
            return Err(Error::input(origin, "the job file is empty"));
        }
        let file: JobFile = serde_yaml_ng::from_str(text).map_err(|e| Error::input(origin, yaml_message(&e, text)))?;
        let dir = origin.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let base = std::path::absolute(dir).map_err(|e| Error::io(dir, e))?;
        let spec = build(file, &base, origin)?;
        spec.validate()?;
        Ok(spec)
    }

    /// The job as YAML with every default written out and absolute paths: `from_str` reads it
    /// back to an equal spec wherever it is stored.
    pub fn to_yaml(&self) -> String {
        let file = JobFile {
            name: self.name.clone(),
            model: match &self.model {
                ModelSpec::Init(d) => ModelFile { init: Some(d.clone()), ..ModelFile::default() },
                ModelSpec::Inline { encoder, decoder, variant } => ModelFile {
                    init: None,
                    encoder: Some(encoder.clone()),
                    decoder: Some(decoder.clone().unwrap_or_else(|| PathBuf::from("random"))),
                    variant: Some(*variant),
                },
            },
            data: self.data.clone(),
            training: self.training.clone(),
            checkpoint: Some(CheckpointFile {
                dir: Some(self.checkpoint.dir.clone()),
                every_steps: Some(self.checkpoint.every_steps),
                keep: self.checkpoint.keep,
                resume_from: self.checkpoint.resume_from.clone(),
            }),
            eval: self.eval.as_ref().map(|e| EvalFile {
                every_steps: Some(e.every_steps),
                beams: e.beams,
                max_len: Some(e.max_len),
                length_penalty: e.length_penalty,
                metrics: e.metrics.clone(),
            }),
            resources: Some(ResourcesFile {
                workers: self.resources.workers,
                min_workers: Some(self.resources.min_workers),
                device: self.resources.device,
                max_restarts: self.resources.max_restarts,
            }),
            logging: Some(LoggingFile { dir: Some(self.logging.dir.clone()) }),
        };
        // Plain structs of strings, numbers and paths always serialise.
        serde_yaml_ng::to_string(&file).unwrap_or_default()
    }

    /// Micro-batches one worker runs per optimiser step when `workers` share the global batch:
    /// exact when `workers` divides `global_batch / micro_batch` (as `validate` checks for
    /// `resources.workers`); otherwise the most any rank runs (see `pipeline::shard`).
    pub fn accumulation_steps(&self, workers: usize) -> usize {
        self.micro_batches_per_step().div_ceil(workers.max(1))
    }

    /// Micro-batches in one global batch, over all workers.
    pub fn micro_batches_per_step(&self) -> usize {
        self.training.global_batch.div_ceil(self.micro_batch().max(1))
    }

    /// `training.micro_batch`, or global_batch / resources.workers when it is not set.
    pub fn micro_batch(&self) -> usize {
        self.training.micro_batch.unwrap_or(self.training.global_batch / self.resources.workers.max(1))
    }

    /// The job with command-line overrides (`--workers`, `--device`) applied and checked again;
    /// `min_workers` shrinks to fit fewer workers.
    pub fn with_overrides(mut self, workers: Option<usize>, device: Option<Device>) -> Result<JobSpec> {
        if let Some(w) = workers {
            self.resources.workers = w;
            self.resources.min_workers = self.resources.min_workers.min(w);
        }
        self.resources.device = device.unwrap_or(self.resources.device);
        self.validate()?;
        Ok(self)
    }

    /// `training.precision`, or bf16 on cuda and fp32 on cpu when it is not set.
    pub fn precision(&self) -> Precision {
        self.training.precision.unwrap_or(match self.resources.device {
            Device::Cuda => Precision::Bf16,
            Device::Cpu => Precision::Fp32,
        })
    }

    pub fn schedule(&self) -> Schedule {
        let t = &self.training;
        Schedule { kind: t.schedule, peak_lr: t.lr, warmup_steps: t.warmup_steps, total_steps: t.steps }
    }

    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig { weight_decay: self.training.weight_decay, ..AdamWConfig::default() }
    }
}

/// serde_yaml_ng's message already carries the key path and `at line L column C`; add the
/// location where the message lacks it.
fn yaml_message(e: &serde_yaml_ng::Error, text: &str) -> String {
    let msg = e.to_string();
    // A duplicate key is reported at the start of its mapping; point at the duplicate instead.
    if let (Some(loc), Some(key)) = (e.location(), duplicate_key(&msg))
        && let Some(line) = limits::duplicate_key_line(text, key, loc.line(), loc.column())
    {
        let head = msg.rfind(" at line ").map_or(msg.as_str(), |i| &msg[..i]);
        return format!("{head} at line {line} (in the mapping at line {})", loc.line());
    }
    match e.location() {
        Some(loc) if !msg.contains(" at line ") => format!("{msg} at line {} column {}", loc.line(), loc.column()),
        _ => msg,
    }
}

/// The key of serde's "duplicate field `K`" message.
fn duplicate_key(msg: &str) -> Option<&str> {
    let rest = &msg[msg.find("duplicate field `")? + "duplicate field `".len()..];
    Some(&rest[..rest.find('`')?])
}

/// The keys whose value depends on other keys, and paths made absolute. Value checks are
/// `validate`'s.
fn build(file: JobFile, base: &Path, origin: &Path) -> Result<JobSpec> {
    let bad = |key: &str, msg: String| Error::input(origin, format!("{key}: {msg}"));
    let path = |key: &str, p: PathBuf| -> Result<PathBuf> {
        if p.as_os_str().is_empty() {
            return Err(bad(key, "must not be empty".into()));
        }
        Ok(base.join(p))
    };
    let model = build_model(file.model, &path, &bad)?;

    let mut data = file.data;
    data.train = path("data.train", data.train)?;
    data.validation = data.validation.map(|v| path("data.validation", v)).transpose()?;

    let r = file.resources.unwrap_or_default();
    let resources = ResourcesSpec {
        workers: r.workers,
        min_workers: r.min_workers.unwrap_or(r.workers),
        device: r.device,
        max_restarts: r.max_restarts,
    };

    let c = file.checkpoint.unwrap_or_default();
    let checkpoint = CheckpointSpec {
        dir: match c.dir {
            Some(p) => path("checkpoint.dir", p)?,
            None => base.join("ckpt").join(&file.name),
        },
        every_steps: c.every_steps.unwrap_or(file.training.steps.min(500)),
        keep: c.keep,
        resume_from: c.resume_from.map(|p| path("checkpoint.resume_from", p)).transpose()?,
    };

    let eval = match (file.eval, &data.validation) {
        (Some(_), None) => return Err(bad("eval", "is set but data.validation is not: nothing to evaluate on".into())),
        (None, None) => None,
        (e, Some(_)) => {
            let e = e.unwrap_or_default();
            Some(EvalSpec {
                every_steps: e.every_steps.unwrap_or(checkpoint.every_steps),
                beams: e.beams,
                max_len: e.max_len.unwrap_or(data.max_target_len),
                length_penalty: e.length_penalty,
                metrics: e.metrics,
            })
        }
    };

    let logging = LoggingSpec {
        dir: match file.logging.and_then(|l| l.dir) {
            Some(p) => path("logging.dir", p)?,
            None => checkpoint.dir.join("logs"),
        },
    };

    Ok(JobSpec {
        origin: origin.to_path_buf(),
        name: file.name,
        model,
        data,
        training: file.training,
        checkpoint,
        eval,
        resources,
        logging,
    })
}

/// `init` alone, or `encoder` with `decoder` (a directory or `random`) and a variant that fits.
fn build_model(
    m: ModelFile,
    path: &dyn Fn(&str, PathBuf) -> Result<PathBuf>,
    bad: &dyn Fn(&str, String) -> Error,
) -> Result<ModelSpec> {
    match (m.init, m.encoder) {
        (Some(init), None) => {
            if m.decoder.is_some() || m.variant.is_some() {
                return Err(bad("model", "`init` cannot be combined with `decoder` or `variant`".into()));
            }
            Ok(ModelSpec::Init(path("model.init", init)?))
        }
        (Some(_), Some(_)) => Err(bad("model", "give either `init` or `encoder`, not both".into())),
        (None, None) => {
            Err(bad("model", "give either `init: DIR` or `encoder: DIR, decoder: DIR|random, variant`".into()))
        }
        (None, Some(encoder)) => {
            let decoder =
                m.decoder.ok_or_else(|| bad("model.decoder", "missing (a BERT directory or `random`)".into()))?;
            let decoder = if decoder == Path::new("random") { None } else { Some(path("model.decoder", decoder)?) };
            let variant = match m.variant {
                Some(v) => v,
                None if decoder.is_none() => Variant::Bert2Rnd,
                None => Variant::Bert2Bert,
            };
            if decoder.is_none() && variant.decoder_from_bert() {
                return Err(bad(
                    "model.variant",
                    format!("{} takes the decoder from BERT but model.decoder is `random`", variant.as_str()),
                ));
            }
            Ok(ModelSpec::Inline { encoder: path("model.encoder", encoder)?, decoder, variant })
        }
    }
}

#[cfg(test)]
#[path = "job_tests.rs"]
mod tests;
