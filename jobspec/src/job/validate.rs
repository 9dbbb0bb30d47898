//! [`JobSpec::validate`]: every value and relation of a built job, and the check of its
//! lengths against a model's position tables.

use std::path::{Path, PathBuf};

use super::{JobSpec, MAX_BEAMS, MAX_SEQ_LEN, ModelSpec};
use crate::error::{Error, Result};
use crate::names::{Device, Precision};

impl JobSpec {
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
        self.validate_eval()
    }

    /// The `eval` section's values (when there is one).
    fn validate_eval(&self) -> Result<()> {
        let bad = |key: &str, msg: String| Err(Error::input(&self.origin, format!("{key}: {msg}")));
        let Some(e) = &self.eval else { return Ok(()) };
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
        for (i, m) in e.metrics.iter().enumerate() {
            if e.metrics[..i].contains(m) {
                return bad("eval.metrics", format!("`{}` is listed twice", m.as_str()));
            }
        }
        Ok(())
    }

    /// The lengths of `data` and `eval` against the model's position tables: `encoder` and
    /// `decoder` are each a config file and the positions it can embed (`max_position_embeddings`,
    /// less `pad_token_id + 1` for RoBERTa, whose positions start there), so a job that would die at its first long example fails when it is checked
    /// instead. The caller reads the config files (`model::job::JobModelExt`, or the
    /// coordinator's lighter reader); errors name the job key and the config file.
    pub fn check_positions(&self, encoder: (&Path, usize), decoder: (&Path, usize)) -> Result<()> {
        let ((enc_file, enc_max), (dec_file, dec_max)) = (encoder, decoder);
        // Sources are framed as [CLS] .. [SEP] within max_source_len, decoder inputs as [CLS] ..
        // within max_target_len; generation feeds max_len + 1 positions (`net::generate`).
        let mut checks = vec![
            ("data.max_source_len", self.data.max_source_len, enc_max, enc_file),
            ("data.max_target_len", self.data.max_target_len, dec_max, dec_file),
        ];
        if let Some(e) = &self.eval {
            checks.push(("eval.max_len", e.max_len + 1, dec_max, dec_file));
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

    /// The config.json files that say the model's positions: one for `init` (both stacks), the
    /// encoder's and the decoder's for an inline model (a random decoder takes the encoder's
    /// config, as `init::warm_start` does). `(encoder file, decoder file)`.
    pub fn model_config_files(&self) -> (PathBuf, PathBuf) {
        match &self.model {
            ModelSpec::Init(dir) => (dir.join("config.json"), dir.join("config.json")),
            ModelSpec::Inline { encoder, decoder, .. } => {
                let enc = encoder.join("config.json");
                let dec = decoder.as_ref().map_or_else(|| enc.clone(), |d| d.join("config.json"));
                (enc, dec)
            }
        }
    }
}
