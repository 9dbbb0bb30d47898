//! The job file. Its schema, limits and checks are the `jobspec` crate (which the coordinator
//! and deploy-check use without the ML stack), re-exported here so `model::job::X` paths keep
//! working; what needs the model's config files is [`JobModelExt`].

use crate::config::{BertConfig, ModelConfig};
use crate::error::Result;

pub use jobspec::job::*;
pub use jobspec::{Device, Metric, Precision, limits};

/// Checks of a job that read the model.
pub trait JobModelExt {
    /// The lengths of `data` and `eval` against the model's position tables
    /// (`max_position_embeddings` of its config.json files less RoBERTa's offset), so
    /// a job that would die at its first long example fails when it is checked instead. Reads
    /// only the config files (bounded), each validated whole; errors name the job key and the
    /// config file.
    fn check_against_model(&self) -> Result<()>;
}

impl JobModelExt for JobSpec {
    fn check_against_model(&self) -> Result<()> {
        let (enc_file, dec_file) = self.model_config_files();
        let (enc_max, dec_max) = match &self.model {
            ModelSpec::Init(_) => ModelConfig::from_file(&enc_file)?.max_lengths(),
            ModelSpec::Inline { decoder, .. } => {
                let enc = BertConfig::from_file(&enc_file)?.max_positions();
                // A random decoder takes the encoder's config (`init::warm_start`).
                let dec = match decoder {
                    None => enc,
                    Some(_) => BertConfig::from_file(&dec_file)?.max_positions(),
                };
                (enc, dec)
            }
        };
        Ok(self.check_positions((&enc_file, enc_max), (&dec_file, dec_max))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "\
name: t
model: { init: m }
data: { train: d/train.jsonl }
training: { steps: 10, global_batch: 8 }
";

    #[test]
    fn lengths_are_checked_against_the_models_config() {
        // The tiny BERT of model::testing has 64 positions; a random decoder takes its config.
        let d = tempfile::tempdir().unwrap();
        crate::testing::write_bert_dir(&d.path().join("bert"), 1, None);
        let job = |src: usize, tgt: usize, eval_len: usize| {
            let text = format!(
                "name: t\nmodel: {{ encoder: bert, decoder: random }}\n\
                 data: {{ train: d.jsonl, validation: v.jsonl, max_source_len: {src}, max_target_len: {tgt} }}\n\
                 training: {{ steps: 10, global_batch: 8 }}\neval: {{ max_len: {eval_len} }}\n"
            );
            JobSpec::from_str(&text, &d.path().join("j.yaml")).unwrap().check_against_model()
        };
        job(64, 64, 63).unwrap();
        for (src, tgt, eval_len, key) in
            [(65, 8, 8, "data.max_source_len: 65"), (8, 100, 8, "data.max_target_len: 100"), (8, 8, 64, "eval.max_len")]
        {
            let e = job(src, tgt, eval_len).unwrap_err();
            let msg = e.to_string();
            assert!(e.is_bad_input() && msg.contains(key) && msg.contains("max_position_embeddings (64"), "{msg}");
            assert!(msg.starts_with(&*d.path().join("j.yaml").to_string_lossy()), "{msg}");
        }
        // A model directory that is not there is a bad input naming its config.json.
        let text = MINIMAL.replace("init: m", &format!("init: {}", d.path().join("none").display()));
        let e = JobSpec::from_str(&text, &d.path().join("j.yaml")).unwrap().check_against_model().unwrap_err();
        assert!(e.is_bad_input() && e.to_string().contains("none/config.json"), "{e}");
    }
}
