//! The job file: one YAML document that says what to train, on what data, how, and where.
//!
//! Parsing is two steps. Serde reads the YAML into private `Raw*` structs that reject unknown
//! keys (the YAML error names the key path, line and column). `build` then fills defaults,
//! resolves relative paths against the job file's directory and parses the enumerations, and
//! [`JobSpec::validate`] checks values and their relations; its errors name the key path, e.g.
//! `training.micro_batch: must divide global_batch / workers (64 / 2 = 32)`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::Variant;
use crate::error::{Error, Result};
use crate::optim::{AdamWConfig, Schedule, ScheduleKind};

pub mod limits;
pub use limits::{MAX_BYTES as MAX_JOB_BYTES, MAX_DEPTH as MAX_JOB_DEPTH};

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

#[derive(Clone, Debug, PartialEq)]
pub struct DataSpec {
    /// JSONL (`{"source", "target"}`) or, for a `.tsv` name, TSV.
    pub train: PathBuf,
    pub validation: Option<PathBuf>,
    pub max_source_len: usize,
    pub max_target_len: usize,
    /// JSONL field names; default `source` / `target`.
    pub source_field: String,
    pub target_field: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TrainingSpec {
    pub steps: u64,
    /// Sequences per optimiser step over all workers.
    pub global_batch: usize,
    /// Sequences per worker per forward pass; `None`: global_batch / workers, no accumulation
    /// (see [`JobSpec::micro_batch`]).
    pub micro_batch: Option<usize>,
    pub lr: f32,
    pub warmup_steps: u64,
    pub schedule: ScheduleKind,
    pub weight_decay: f32,
    /// 0 turns clipping off.
    pub max_grad_norm: f32,
    pub label_smoothing: f32,
    /// `None`: the device's default (see [`JobSpec::precision`]).
    pub precision: Option<Precision>,
    pub seed: u64,
    /// With several workers, gradients are all-reduced in buckets of about this many MB
    /// while backward runs (0: one all-reduce after backward). Does not change the result.
    /// On CUDA the buckets' NCCL all-reduces overlap backward on their own stream.
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    Bf16,
    Fp32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    Bleu,
    Rouge,
}

macro_rules! names {
    ($t:ty { $($v:ident = $s:literal),+ $(,)? }) => {
        impl $t {
            pub fn parse(s: &str) -> Option<Self> {
                match s { $($s => Some(<$t>::$v),)+ _ => None }
            }
            pub fn as_str(self) -> &'static str {
                match self { $(<$t>::$v => $s,)+ }
            }
        }
    };
}
names!(Precision { Bf16 = "bf16", Fp32 = "fp32" });
names!(Device { Cpu = "cpu", Cuda = "cuda" });
names!(Metric { Bleu = "bleu", Rouge = "rouge" });

fn schedule_name(k: ScheduleKind) -> &'static str {
    match k {
        ScheduleKind::Linear => "linear",
        ScheduleKind::Cosine => "cosine",
        ScheduleKind::Constant => "constant",
        ScheduleKind::Rsqrt => "rsqrt",
    }
}

// ---- The YAML as written. Every key optional that has a default. ----

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJob {
    name: String,
    model: RawModel,
    data: RawData,
    training: RawTraining,
    #[serde(skip_serializing_if = "Option::is_none")]
    checkpoint: Option<RawCheckpoint>,
    #[serde(skip_serializing_if = "Option::is_none")]
    eval: Option<RawEval>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resources: Option<RawResources>,
    #[serde(skip_serializing_if = "Option::is_none")]
    logging: Option<RawLogging>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    #[serde(skip_serializing_if = "Option::is_none")]
    init: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    encoder: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    decoder: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    variant: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawData {
    train: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    validation: Option<PathBuf>,
    max_source_len: Option<usize>,
    max_target_len: Option<usize>,
    source_field: Option<String>,
    target_field: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTraining {
    steps: u64,
    global_batch: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    micro_batch: Option<usize>,
    lr: Option<f64>,
    warmup_steps: Option<u64>,
    schedule: Option<String>,
    weight_decay: Option<f64>,
    max_grad_norm: Option<f64>,
    label_smoothing: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    precision: Option<String>,
    seed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    grad_bucket_mb: Option<f64>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheckpoint {
    dir: Option<PathBuf>,
    every_steps: Option<u64>,
    keep: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resume_from: Option<PathBuf>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEval {
    every_steps: Option<u64>,
    beams: Option<usize>,
    max_len: Option<usize>,
    length_penalty: Option<f64>,
    metrics: Option<Vec<String>>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLogging {
    dir: Option<PathBuf>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResources {
    workers: Option<usize>,
    min_workers: Option<usize>,
    device: Option<String>,
    max_restarts: Option<u32>,
}

impl JobSpec {
    /// Read, parse and check a job file. Reads at most [`MAX_JOB_BYTES`] (+1, to tell a file
    /// over the limit), so a huge file or a device such as /dev/zero costs nothing.
    pub fn from_file(path: &Path) -> Result<JobSpec> {
        let bytes = crate::data::read_bounded(path, MAX_JOB_BYTES as u64 + 1)?;
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
        let raw: RawJob = serde_yaml_ng::from_str(text).map_err(|e| Error::input(origin, yaml_message(&e, text)))?;
        let dir = origin.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let base = std::path::absolute(dir).map_err(|e| Error::io(dir, e))?;
        let spec = build(raw, &base, origin)?;
        spec.validate()?;
        Ok(spec)
    }

    /// The job as YAML with every default written out and absolute paths: `from_str` reads it
    /// back to an equal spec wherever it is stored.
    pub fn to_yaml(&self) -> String {
        let t = &self.training;
        let raw = RawJob {
            name: self.name.clone(),
            model: match &self.model {
                ModelSpec::Init(d) => RawModel { init: Some(d.clone()), ..RawModel::default() },
                ModelSpec::Inline { encoder, decoder, variant } => RawModel {
                    init: None,
                    encoder: Some(encoder.clone()),
                    decoder: Some(decoder.clone().unwrap_or_else(|| PathBuf::from("random"))),
                    variant: Some(variant.as_str().to_owned()),
                },
            },
            data: RawData {
                train: self.data.train.clone(),
                validation: self.data.validation.clone(),
                max_source_len: Some(self.data.max_source_len),
                max_target_len: Some(self.data.max_target_len),
                source_field: Some(self.data.source_field.clone()),
                target_field: Some(self.data.target_field.clone()),
            },
            training: RawTraining {
                steps: t.steps,
                global_batch: t.global_batch,
                micro_batch: t.micro_batch,
                lr: Some(t.lr as f64),
                warmup_steps: Some(t.warmup_steps),
                schedule: Some(schedule_name(t.schedule).to_owned()),
                weight_decay: Some(t.weight_decay as f64),
                max_grad_norm: Some(t.max_grad_norm as f64),
                label_smoothing: Some(t.label_smoothing as f64),
                precision: t.precision.map(|p| p.as_str().to_owned()),
                seed: Some(t.seed),
                grad_bucket_mb: Some(t.grad_bucket_mb as f64),
            },
            checkpoint: Some(RawCheckpoint {
                dir: Some(self.checkpoint.dir.clone()),
                every_steps: Some(self.checkpoint.every_steps),
                keep: Some(self.checkpoint.keep),
                resume_from: self.checkpoint.resume_from.clone(),
            }),
            eval: self.eval.as_ref().map(|e| RawEval {
                every_steps: Some(e.every_steps),
                beams: Some(e.beams),
                max_len: Some(e.max_len),
                length_penalty: Some(e.length_penalty as f64),
                metrics: Some(e.metrics.iter().map(|m| m.as_str().to_owned()).collect()),
            }),
            resources: Some(RawResources {
                workers: Some(self.resources.workers),
                min_workers: Some(self.resources.min_workers),
                device: Some(self.resources.device.as_str().to_owned()),
                max_restarts: Some(self.resources.max_restarts),
            }),
            logging: Some(RawLogging { dir: Some(self.logging.dir.clone()) }),
        };
        // Plain structs of strings, numbers and paths always serialise.
        serde_yaml_ng::to_string(&raw).unwrap_or_default()
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

    /// Check every value and relation. `from_str` calls it; call it again after changing a field
    /// (e.g. `--workers` or `--device` from the command line).
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, msg: String| Err(Error::input(&self.origin, format!("{key}: {msg}")));
        let name_ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        if self.name.is_empty()
            || self.name.len() > 128
            || self.name.starts_with('.')
            || !self.name.chars().all(name_ok)
        {
            return bad("name", format!("`{}`: use 1 to 128 of A-Z a-z 0-9 - _ . (not starting with `.`)", self.name));
        }
        let (d, t, c, r) = (&self.data, &self.training, &self.checkpoint, &self.resources);
        for (key, v) in [("data.max_source_len", d.max_source_len), ("data.max_target_len", d.max_target_len)] {
            if v < 3 {
                return bad(key, format!("must be at least 3 (room for [CLS], [SEP] and a token), got {v}"));
            }
        }
        for (key, v) in [("data.max_source_len", d.max_source_len), ("data.max_target_len", d.max_target_len)] {
            if v > MAX_SEQ_LEN {
                return bad(key, format!("must be at most {MAX_SEQ_LEN}, got {v}"));
            }
        }
        for (key, v) in [("data.source_field", &d.source_field), ("data.target_field", &d.target_field)] {
            if v.trim().is_empty() {
                return bad(key, "must not be empty".into());
            }
        }
        let positive = [
            ("training.steps", t.steps),
            ("training.global_batch", t.global_batch as u64),
            ("training.micro_batch", self.micro_batch() as u64),
            ("checkpoint.every_steps", c.every_steps),
            ("checkpoint.keep", c.keep as u64),
            ("resources.workers", r.workers as u64),
            ("resources.min_workers", r.min_workers as u64),
        ];
        for (key, v) in positive {
            if v == 0 {
                return bad(key, "must be at least 1, got 0".into());
            }
        }
        if !(t.lr.is_finite() && t.lr > 0.0) {
            return bad("training.lr", format!("must be a positive number, got {}", t.lr));
        }
        for (key, v) in [
            ("training.weight_decay", t.weight_decay),
            ("training.max_grad_norm", t.max_grad_norm),
            ("training.grad_bucket_mb", t.grad_bucket_mb),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(key, format!("must be a number >= 0, got {v}"));
            }
        }
        if !(0.0..1.0).contains(&t.label_smoothing) {
            return bad("training.label_smoothing", format!("must be in [0, 1), got {}", t.label_smoothing));
        }
        if t.warmup_steps > t.steps {
            return bad("training.warmup_steps", format!("{} exceeds training.steps ({})", t.warmup_steps, t.steps));
        }
        if t.global_batch % r.workers != 0 {
            return bad(
                "training.global_batch",
                format!("must be divisible by resources.workers ({} / {})", t.global_batch, r.workers),
            );
        }
        let (per_worker, micro) = (t.global_batch / r.workers, self.micro_batch());
        if per_worker % micro != 0 {
            return bad(
                "training.micro_batch",
                format!(
                    "must divide global_batch / workers ({} / {} = {per_worker}), got {micro}",
                    t.global_batch, r.workers
                ),
            );
        }
        if t.precision == Some(Precision::Bf16) && r.device == Device::Cpu {
            return bad("training.precision", "bf16 needs resources.device cuda; the CPU runs in fp32".into());
        }
        if r.min_workers > r.workers {
            return bad(
                "resources.min_workers",
                format!("{} exceeds resources.workers ({})", r.min_workers, r.workers),
            );
        }
        if let Some(e) = &self.eval {
            for (key, v) in [("eval.every_steps", e.every_steps), ("eval.beams", e.beams as u64)] {
                if v == 0 {
                    return bad(key, "must be at least 1, got 0".into());
                }
            }
            if e.max_len < 2 {
                return bad("eval.max_len", format!("must be at least 2, got {}", e.max_len));
            }
            if e.max_len > MAX_SEQ_LEN {
                return bad("eval.max_len", format!("must be at most {MAX_SEQ_LEN}, got {}", e.max_len));
            }
            if e.beams > MAX_BEAMS {
                return bad("eval.beams", format!("must be at most {MAX_BEAMS}, got {}", e.beams));
            }
            if !e.length_penalty.is_finite() {
                return bad("eval.length_penalty", format!("must be a finite number, got {}", e.length_penalty));
            }
            if e.metrics.is_empty() {
                return bad("eval.metrics", "must name at least one of bleu, rouge".into());
            }
        }
        Ok(())
    }
}

impl JobSpec {
    /// The lengths of `data` and `eval` against the model's position tables
    /// (`max_position_embeddings` of its config.json files; BERT positions have no offset), so
    /// a job that would die at its first long example fails when it is checked instead. Reads
    /// only the config files (bounded); errors name the job key and the config file.
    pub fn check_against_model(&self) -> Result<()> {
        let (enc_file, dec_file, enc_max, dec_max) = match &self.model {
            ModelSpec::Init(dir) => {
                let file = dir.join("config.json");
                let cfg = crate::config::ModelConfig::from_file(&file)?;
                (file.clone(), file, cfg.encoder.max_position_embeddings, cfg.decoder.max_position_embeddings)
            }
            ModelSpec::Inline { encoder, decoder, .. } => {
                let enc_file = encoder.join("config.json");
                let enc = crate::config::BertConfig::from_file(&enc_file)?;
                // A random decoder takes the encoder's config (`init::warm_start`).
                match decoder {
                    None => (enc_file.clone(), enc_file, enc.max_position_embeddings, enc.max_position_embeddings),
                    Some(dir) => {
                        let dec_file = dir.join("config.json");
                        let dec = crate::config::BertConfig::from_file(&dec_file)?;
                        (enc_file, dec_file, enc.max_position_embeddings, dec.max_position_embeddings)
                    }
                }
            }
        };
        // Sources are framed as [CLS] .. [SEP] within max_source_len, decoder inputs as [CLS] ..
        // within max_target_len; generation feeds max_len + 1 positions (`net::generate`).
        let mut checks = vec![
            ("data.max_source_len", self.data.max_source_len, enc_max, &enc_file),
            ("data.max_target_len", self.data.max_target_len, dec_max, &dec_file),
        ];
        if let Some(e) = &self.eval {
            checks.push(("eval.max_len", e.max_len + 1, dec_max, &dec_file));
        }
        for (key, need, have, file) in checks {
            if need > have {
                let what = if key == "eval.max_len" { format!("{} + 1", need - 1) } else { need.to_string() };
                return Err(Error::input(
                    &self.origin,
                    format!("{key}: {what} exceeds the model's max_position_embeddings ({have}, {})", file.display()),
                ));
            }
        }
        Ok(())
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

/// Defaults (those of design.md's example where it implies them), paths and enumerations.
/// Numeric checks are `validate`'s.
fn build(raw: RawJob, base: &Path, origin: &Path) -> Result<JobSpec> {
    let bad = |key: &str, msg: String| Error::input(origin, format!("{key}: {msg}"));
    let path = |key: &str, p: PathBuf| -> Result<PathBuf> {
        if p.as_os_str().is_empty() {
            return Err(bad(key, "must not be empty".into()));
        }
        Ok(base.join(p))
    };
    let pick = |key: &str, got: &str, allowed: &str| bad(key, format!("`{got}` is not one of {allowed}"));

    let m = raw.model;
    let model = match (m.init, m.encoder) {
        (Some(init), None) => {
            if m.decoder.is_some() || m.variant.is_some() {
                return Err(bad("model", "`init` cannot be combined with `decoder` or `variant`".into()));
            }
            ModelSpec::Init(path("model.init", init)?)
        }
        (Some(_), Some(_)) => return Err(bad("model", "give either `init` or `encoder`, not both".into())),
        (None, None) => {
            return Err(bad("model", "give either `init: DIR` or `encoder: DIR, decoder: DIR|random, variant`".into()));
        }
        (None, Some(encoder)) => {
            let decoder =
                m.decoder.ok_or_else(|| bad("model.decoder", "missing (a BERT directory or `random`)".into()))?;
            let decoder = if decoder == Path::new("random") { None } else { Some(path("model.decoder", decoder)?) };
            let variant = match m.variant {
                Some(v) => Variant::parse(&v)
                    .ok_or_else(|| pick("model.variant", &v, "bert2bert, bertshare, bert2rnd, rnd2bert, rnd2rnd"))?,
                None if decoder.is_none() => Variant::Bert2Rnd,
                None => Variant::Bert2Bert,
            };
            if decoder.is_none() && variant.decoder_from_bert() {
                return Err(bad(
                    "model.variant",
                    format!("{} takes the decoder from BERT but model.decoder is `random`", variant.as_str()),
                ));
            }
            ModelSpec::Inline { encoder: path("model.encoder", encoder)?, decoder, variant }
        }
    };

    let d = raw.data;
    let data = DataSpec {
        train: path("data.train", d.train)?,
        validation: d.validation.map(|v| path("data.validation", v)).transpose()?,
        max_source_len: d.max_source_len.unwrap_or(128),
        max_target_len: d.max_target_len.unwrap_or(128),
        source_field: d.source_field.unwrap_or_else(|| "source".into()),
        target_field: d.target_field.unwrap_or_else(|| "target".into()),
    };

    let r = raw.resources.unwrap_or_default();
    let workers = r.workers.unwrap_or(1);
    let device = match r.device {
        Some(s) => Device::parse(&s).ok_or_else(|| pick("resources.device", &s, "cpu, cuda"))?,
        None => Device::Cpu,
    };
    let resources = ResourcesSpec {
        workers,
        min_workers: r.min_workers.unwrap_or(workers),
        device,
        max_restarts: r.max_restarts.unwrap_or(3),
    };

    let t = raw.training;
    let float = |key: &str, v: Option<f64>, default: f32| -> Result<f32> {
        match v {
            None => Ok(default),
            Some(x)
                if x.is_finite() && (x == 0.0 || x.abs() >= f32::MIN_POSITIVE as f64) && x.abs() <= f32::MAX as f64 =>
            {
                Ok(x as f32)
            }
            Some(x) => Err(bad(key, format!("{x} is not a finite 32-bit number"))),
        }
    };
    let training = TrainingSpec {
        steps: t.steps,
        global_batch: t.global_batch,
        micro_batch: t.micro_batch,
        lr: float("training.lr", t.lr, 5e-5)?,
        warmup_steps: t.warmup_steps.unwrap_or(0),
        schedule: match t.schedule {
            Some(s) => ScheduleKind::parse(&s)
                .ok_or_else(|| pick("training.schedule", &s, "linear, cosine, constant, rsqrt"))?,
            None => ScheduleKind::Linear,
        },
        weight_decay: float("training.weight_decay", t.weight_decay, 0.01)?,
        max_grad_norm: float("training.max_grad_norm", t.max_grad_norm, 1.0)?,
        label_smoothing: float("training.label_smoothing", t.label_smoothing, 0.0)?,
        precision: t
            .precision
            .map(|s| Precision::parse(&s).ok_or_else(|| pick("training.precision", &s, "bf16, fp32")))
            .transpose()?,
        seed: t.seed.unwrap_or(42),
        grad_bucket_mb: float("training.grad_bucket_mb", t.grad_bucket_mb, DEFAULT_GRAD_BUCKET_MB)?,
    };

    let c = raw.checkpoint.unwrap_or_default();
    let checkpoint = CheckpointSpec {
        dir: match c.dir {
            Some(p) => path("checkpoint.dir", p)?,
            None => base.join("ckpt").join(&raw.name),
        },
        every_steps: c.every_steps.unwrap_or(training.steps.min(500)),
        keep: c.keep.unwrap_or(3),
        resume_from: c.resume_from.map(|p| path("checkpoint.resume_from", p)).transpose()?,
    };

    let eval = match (raw.eval, &data.validation) {
        (Some(_), None) => return Err(bad("eval", "is set but data.validation is not: nothing to evaluate on".into())),
        (None, None) => None,
        (e, Some(_)) => {
            let e = e.unwrap_or_default();
            let mut metrics = Vec::new();
            for s in e.metrics.unwrap_or_else(|| vec!["bleu".into(), "rouge".into()]) {
                let m = Metric::parse(&s).ok_or_else(|| pick("eval.metrics", &s, "bleu, rouge"))?;
                if metrics.contains(&m) {
                    return Err(bad("eval.metrics", format!("`{s}` is listed twice")));
                }
                metrics.push(m);
            }
            Some(EvalSpec {
                every_steps: e.every_steps.unwrap_or(checkpoint.every_steps),
                beams: e.beams.unwrap_or(4),
                max_len: e.max_len.unwrap_or(data.max_target_len),
                length_penalty: float("eval.length_penalty", e.length_penalty, 1.0)?,
                metrics,
            })
        }
    };

    let logging = LoggingSpec {
        dir: match raw.logging.and_then(|l| l.dir) {
            Some(p) => path("logging.dir", p)?,
            None => checkpoint.dir.join("logs"),
        },
    };

    Ok(JobSpec {
        origin: origin.to_path_buf(),
        name: raw.name,
        model,
        data,
        training,
        checkpoint,
        eval,
        resources,
        logging,
    })
}

#[cfg(test)]
#[path = "job_tests.rs"]
mod tests;
