use super::*;

const MINIMAL: &str = "\
name: t
model: { init: m }
data: { train: d/train.jsonl }
training: { steps: 10, global_batch: 8 }
";

fn parse(text: &str) -> Result<JobSpec> {
    JobSpec::from_str(text, Path::new("/jobs/j.yaml"))
}

/// The message of the input error `text` gives, which must name the job file.
fn err(text: &str) -> String {
    match parse(text) {
        Err(e @ Error::Input { .. }) => {
            let msg = e.to_string();
            assert!(msg.starts_with("/jobs/j.yaml: "), "{msg}");
            msg["/jobs/j.yaml: ".len()..].to_string()
        }
        other => panic!("expected an input error for\n{text}\ngot {other:?}"),
    }
}

/// A full job file with `key: value` replaced (or, for a new key, added under `section`).
fn full_with(section: &str, key: &str, value: &str) -> String {
    let mut out = String::new();
    let mut current = "";
    let mut done = false;
    for line in FULL.lines() {
        if !line.starts_with(' ') {
            if current == section && !done {
                out.push_str(&format!("  {key}: {value}\n"));
                done = true;
            }
            current = line.trim_end_matches(':');
        }
        if current == section && line.trim_start().starts_with(&format!("{key}:")) {
            out.push_str(&format!("  {key}: {value}\n"));
            done = true;
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    if !done {
        out.push_str(&format!("  {key}: {value}\n"));
    }
    out
}

const FULL: &str = "\
name: full
model:
  init: m
data:
  train: d/train.jsonl
  validation: d/val.jsonl
  max_source_len: 128
  max_target_len: 128
training:
  steps: 2000
  global_batch: 64
  micro_batch: 16
  lr: 5.0e-5
  warmup_steps: 200
  schedule: linear
  weight_decay: 0.01
  max_grad_norm: 1.0
  label_smoothing: 0.1
  precision: bf16
  seed: 42
checkpoint:
  dir: ckpt/x
  every_steps: 500
  keep: 3
eval:
  every_steps: 500
  beams: 4
  max_len: 64
  length_penalty: 0.6
  metrics: [bleu, rouge]
resources:
  workers: 2
  min_workers: 1
  device: cuda
  max_restarts: 3
logging:
  dir: logs/x
";

#[test]
fn the_committed_example_parses() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/kjv.yaml");
    let job = JobSpec::from_file(&path).unwrap();
    let examples = std::path::absolute(path.parent().unwrap()).unwrap();
    assert_eq!(job.name, "kjv-modernize");
    assert_eq!(job.model, ModelSpec::Init(examples.join("../models/minilm-share")));
    assert_eq!(job.data.train, examples.join("data/kjv_web_sample/train.jsonl"));
    assert!(job.data.train.is_file() && job.data.validation.as_ref().unwrap().is_file());
    assert_eq!((job.data.max_source_len, job.data.max_target_len), (64, 64));
    assert_eq!((job.data.source_field.as_str(), job.data.target_field.as_str()), ("source", "target"));
    let t = &job.training;
    assert_eq!((t.steps, t.global_batch, t.micro_batch, t.warmup_steps), (800, 8, Some(8), 40));
    assert_eq!((t.lr, t.schedule, t.seed), (1.5e-4, ScheduleKind::Linear, 42));
    assert_eq!((job.checkpoint.every_steps, job.checkpoint.keep), (400, 2));
    let e = job.eval.as_ref().unwrap();
    assert_eq!((e.every_steps, e.beams, e.max_len, e.metrics.len()), (400, 4, 64, 2));
    assert_eq!((job.resources.workers, job.resources.device), (1, Device::Cpu));
    assert_eq!((job.precision(), job.accumulation_steps(1)), (Precision::Fp32, 1));
    let s = job.schedule();
    assert_eq!((s.peak_lr, s.warmup_steps, s.total_steps), (1.5e-4, 40, 800));
}

#[test]
fn design_example_parses_and_derives_accumulation() {
    let job = parse(FULL).unwrap();
    assert_eq!(job.data.validation, Some(PathBuf::from("/jobs/d/val.jsonl")));
    assert_eq!(job.checkpoint.dir, PathBuf::from("/jobs/ckpt/x"));
    assert_eq!(job.logging.dir, PathBuf::from("/jobs/logs/x"));
    assert_eq!(job.training.precision, Some(Precision::Bf16));
    assert_eq!(job.eval.as_ref().unwrap().length_penalty, 0.6);
    assert_eq!(job.micro_batches_per_step(), 4);
    // 64 over 2 workers of micro 16: 2 each; elastic fallbacks round up.
    assert_eq!([1, 2, 3, 4].map(|w| job.accumulation_steps(w)), [4, 2, 2, 1]);
    assert_eq!(job.adamw().weight_decay, 0.01);
}

#[test]
fn defaults_fill_what_is_left_out() {
    let job = parse(MINIMAL).unwrap();
    assert_eq!(job.model, ModelSpec::Init(PathBuf::from("/jobs/m")));
    let t = &job.training;
    assert_eq!((t.micro_batch, t.lr, t.warmup_steps, t.schedule), (None, 5e-5, 0, ScheduleKind::Linear));
    assert_eq!(job.micro_batch(), 8);
    assert_eq!((t.weight_decay, t.max_grad_norm, t.label_smoothing, t.seed), (0.01, 1.0, 0.0, 42));
    assert_eq!((job.data.max_source_len, job.data.source_field.as_str()), (128, "source"));
    assert_eq!(
        job.checkpoint,
        CheckpointSpec { dir: "/jobs/ckpt/t".into(), every_steps: 10, keep: 3, resume_from: None }
    );
    assert_eq!(job.eval, None, "no validation set, no eval");
    assert_eq!(job.logging, LoggingSpec { dir: "/jobs/ckpt/t/logs".into() }, "logs beside the checkpoints");
    let elsewhere = parse(&format!("{MINIMAL}checkpoint: {{ dir: /runs/c }}\n")).unwrap();
    assert_eq!(elsewhere.logging.dir, PathBuf::from("/runs/c/logs"));
    let absolute = parse(&format!("{MINIMAL}logging: {{ dir: /var/tb }}\n")).unwrap();
    assert_eq!(absolute.logging.dir, PathBuf::from("/var/tb"));
    assert_eq!(job.resources, ResourcesSpec { workers: 1, min_workers: 1, device: Device::Cpu, max_restarts: 3 });
    assert_eq!(job.precision(), Precision::Fp32);
    let cuda = parse(&format!("{MINIMAL}resources: {{ device: cuda, workers: 2 }}\n")).unwrap();
    assert_eq!((cuda.precision(), cuda.micro_batch(), cuda.resources.min_workers), (Precision::Bf16, 4, 2));
    // Validation without an eval section evaluates with defaults.
    let job = parse(&MINIMAL.replace("train.jsonl }", "train.jsonl, validation: v.tsv, max_target_len: 40 }")).unwrap();
    let e = job.eval.unwrap();
    assert_eq!((e.every_steps, e.beams, e.max_len, e.length_penalty), (10, 4, 40, 1.0));
    assert_eq!(e.metrics, vec![Metric::Bleu, Metric::Rouge]);
}

#[test]
fn inline_model_and_relative_origin() {
    let text = MINIMAL.replace("{ init: m }", "{ encoder: /abs/bert, decoder: random }");
    let job = JobSpec::from_str(&text, Path::new("j.yaml")).unwrap();
    assert_eq!(job.model, ModelSpec::Inline { encoder: "/abs/bert".into(), decoder: None, variant: Variant::Bert2Rnd });
    let cwd = std::env::current_dir().unwrap();
    assert_eq!(job.data.train, cwd.join("d/train.jsonl"));
    let text = MINIMAL.replace("{ init: m }", "{ encoder: b, decoder: ../c, variant: RND2BERT }");
    let job = parse(&text).unwrap();
    let want =
        ModelSpec::Inline { encoder: "/jobs/b".into(), decoder: Some("/jobs/../c".into()), variant: Variant::Rnd2Bert };
    assert_eq!(job.model, want);
    let job = parse(&MINIMAL.replace("{ init: m }", "{ encoder: b, decoder: b }")).unwrap();
    assert!(matches!(job.model, ModelSpec::Inline { variant: Variant::Bert2Bert, .. }));
}

#[test]
fn command_line_overrides_are_checked() {
    // Derived micro-batch and precision follow the new resources.
    let job = parse(MINIMAL).unwrap().with_overrides(Some(2), Some(Device::Cuda)).unwrap();
    assert_eq!((job.micro_batch(), job.accumulation_steps(2), job.precision()), (4, 1, Precision::Bf16));
    let full = parse(FULL).unwrap();
    let one = full.clone().with_overrides(Some(1), None).unwrap();
    assert_eq!((one.resources.min_workers, one.accumulation_steps(1)), (1, 4));
    let e = full.clone().with_overrides(Some(3), None).unwrap_err().to_string();
    assert!(e.ends_with("training.global_batch: must be divisible by resources.workers (64 / 3)"), "{e}");
    let e = full.with_overrides(None, Some(Device::Cpu)).unwrap_err().to_string();
    assert!(e.contains("training.precision: bf16 needs resources.device cuda"), "{e}");
}

#[test]
fn to_yaml_round_trips() {
    for text in [FULL, MINIMAL, &MINIMAL.replace("{ init: m }", "{ encoder: e, decoder: random, variant: rnd2rnd }")] {
        let job = parse(text).unwrap();
        let again = JobSpec::from_str(&job.to_yaml(), Path::new("/elsewhere/x.yaml")).unwrap();
        assert_eq!(JobSpec { origin: job.origin.clone(), ..again }, job, "{}", job.to_yaml());
    }
}

#[test]
fn value_errors_name_their_key() {
    let cases: &[(&str, &str, &str, &str)] = &[
        (
            "training",
            "micro_batch",
            "24",
            "training.micro_batch: must divide global_batch / workers (64 / 2 = 32), got 24",
        ),
        ("resources", "workers", "3", "training.global_batch: must be divisible by resources.workers (64 / 3)"),
        ("training", "steps", "0", "training.steps: must be at least 1"),
        ("training", "steps", "-5", "training.steps: invalid type: integer `-5`, expected u64"),
        ("training", "steps", "many", "training.steps: invalid type: string \"many\""),
        ("training", "global_batch", "0", "training.global_batch: must be at least 1"),
        ("training", "lr", "0", "training.lr: must be a positive number"),
        ("training", "lr", "-1e-4", "training.lr: must be a positive number"),
        ("training", "lr", ".nan", "training.lr: NaN is not a finite 32-bit number"),
        ("training", "lr", "[1]", "training.lr: invalid type: sequence"),
        ("training", "warmup_steps", "3000", "training.warmup_steps: 3000 exceeds training.steps (2000)"),
        ("training", "schedule", "step", "training.schedule: `step` is not one of linear, cosine, constant, rsqrt"),
        ("training", "weight_decay", "-0.1", "training.weight_decay: must be a number >= 0"),
        ("training", "max_grad_norm", "-1", "training.max_grad_norm: must be a number >= 0"),
        ("training", "grad_bucket_mb", "-2", "training.grad_bucket_mb: must be a number >= 0"),
        ("training", "label_smoothing", "1.0", "training.label_smoothing: must be in [0, 1)"),
        ("training", "label_smoothing", "-0.1", "training.label_smoothing: must be in [0, 1)"),
        ("training", "precision", "fp16", "training.precision: `fp16` is not one of bf16, fp32"),
        ("training", "seed", "1.5", "training.seed: invalid type: floating point"),
        ("data", "max_source_len", "2", "data.max_source_len: must be at least 3"),
        ("data", "max_target_len", "0", "data.max_target_len: must be at least 3"),
        ("data", "train", "''", "data.train: must not be empty"),
        ("logging", "dir", "''", "logging.dir: must not be empty"),
        ("logging", "dir", "[a]", "logging.dir: invalid type: sequence"),
        ("data", "source_field", "' '", "data.source_field: must not be empty"),
        ("checkpoint", "keep", "0", "checkpoint.keep: must be at least 1"),
        ("checkpoint", "every_steps", "0", "checkpoint.every_steps: must be at least 1"),
        ("eval", "every_steps", "0", "eval.every_steps: must be at least 1"),
        ("eval", "beams", "0", "eval.beams: must be at least 1"),
        ("eval", "max_len", "1", "eval.max_len: must be at least 2"),
        ("eval", "length_penalty", ".inf", "eval.length_penalty: inf is not a finite 32-bit number"),
        ("eval", "metrics", "[bleu, meteor]", "eval.metrics: `meteor` is not one of bleu, rouge"),
        ("eval", "metrics", "[rouge, rouge]", "eval.metrics: `rouge` is listed twice"),
        ("eval", "metrics", "[]", "eval.metrics: must name at least one of bleu, rouge"),
        ("eval", "metrics", "bleu", "eval.metrics: invalid type: string \"bleu\", expected a sequence"),
        ("resources", "device", "tpu", "resources.device: `tpu` is not one of cpu, cuda"),
        ("resources", "workers", "0", "resources.workers: must be at least 1"),
        ("resources", "min_workers", "4", "resources.min_workers: 4 exceeds resources.workers (2)"),
        ("resources", "min_workers", "0", "resources.min_workers: must be at least 1"),
        ("resources", "max_restarts", "-1", "resources.max_restarts: invalid type: integer `-1`, expected u32"),
        ("model", "variant", "bert2bert", "model: `init` cannot be combined with `decoder` or `variant`"),
        ("model", "encoder", "e", "model: give either `init` or `encoder`, not both"),
    ];
    for (section, key, value, want) in cases {
        let text = full_with(section, key, value);
        let msg = err(&text);
        assert!(msg.starts_with(want), "{section}.{key}: {value}\n  got:  {msg}\n  want: {want}");
    }
    // bf16 is a GPU precision.
    let msg = err(&full_with("resources", "device", "cpu"));
    assert!(msg.starts_with("training.precision: bf16 needs resources.device cuda"), "{msg}");
    // Serde's own errors carry the line: `steps` is line 10 of FULL.
    assert!(err(&full_with("training", "steps", "-5")).ends_with("at line 10 column 10"));
}

#[test]
fn model_and_name_errors() {
    let model = |m: &str| err(&MINIMAL.replace("{ init: m }", m));
    assert!(model("{}").starts_with("model: give either `init: DIR` or `encoder: DIR"));
    assert!(model("{ encoder: e }").starts_with("model.decoder: missing"));
    assert!(model("{ encoder: e, decoder: d, variant: bert3bert }").starts_with("model.variant: `bert3bert` is not"));
    let m = model("{ encoder: e, decoder: random, variant: bertshare }");
    assert!(m.starts_with("model.variant: bertshare takes the decoder from BERT but model.decoder is `random`"), "{m}");
    assert!(model("{ init: '' }").starts_with("model.init: must not be empty"));
    assert!(model("m").starts_with("model: invalid type: string \"m\", expected struct"), "{}", model("m"));
    for name in ["''", "a/b", "'a b'", ".hidden", &"x".repeat(129)] {
        assert!(err(&MINIMAL.replace("name: t", &format!("name: {name}"))).starts_with("name: "), "{name}");
    }
    let msg = err(&format!("{MINIMAL}eval: {{ beams: 2 }}\n"));
    assert_eq!(msg, "eval: is set but data.validation is not: nothing to evaluate on");
}

#[test]
fn unknown_keys_are_named_at_every_level() {
    let cases = [
        (format!("{MINIMAL}extra: 1\n"), "unknown field `extra`"),
        (MINIMAL.replace("init: m", "init: m, tokenizer: t"), "model: unknown field `tokenizer`"),
        (MINIMAL.replace("train: d/train.jsonl", "train: a, shuffle: true"), "data: unknown field `shuffle`"),
        (MINIMAL.replace("global_batch: 8", "global_batch: 8, batch: 3"), "training: unknown field `batch`"),
        (format!("{MINIMAL}checkpoint: {{ every: 5 }}\n"), "checkpoint: unknown field `every`"),
        (
            MINIMAL.replace("d/train.jsonl }", "d/train.jsonl, validation: v }\neval: { beam: 2 }"),
            "eval: unknown field `beam`",
        ),
        (format!("{MINIMAL}resources: {{ gpus: 2 }}\n"), "resources: unknown field `gpus`"),
        (format!("{MINIMAL}logging: {{ path: l }}\n"), "logging: unknown field `path`"),
    ];
    for (text, want) in cases {
        let msg = err(&text);
        assert!(msg.starts_with(want) && msg.contains(" at line "), "got {msg:?}, want {want:?}");
    }
    let msg = err(&format!("{MINIMAL}training: {{ steps: 1, global_batch: 1 }}\n"));
    assert!(msg.contains("duplicate") && msg.contains("training"), "{msg}");
    assert!(err("name: t\nmodel: { init: m }\n").starts_with("missing field `data`"));
    let msg = err(&MINIMAL.replace("steps: 10, ", ""));
    assert!(msg.starts_with("training: missing field `steps` at line 4"), "{msg}");
}

#[test]
fn yaml_syntax_errors_name_the_line() {
    let text = "name: t\nmodel: { init: m }\ndata:\n  train: a\n   bad: [1\ntraining: { steps: 1 }\n";
    let msg = err(text);
    assert!(msg.contains("line 5"), "{msg}");
    let msg = err("name: t\nmodel: { init: m\ndata: x\n");
    assert!(msg.contains(" at line "), "{msg}");
    // Quotes must close on their line (job/limits.rs): refused before the parser runs.
    let msg = err("name: 'unclosed\n");
    assert!(msg.starts_with("line 1: a quoted string must end on its line"), "{msg}");
    assert_eq!(err(""), "the job file is empty");
    assert_eq!(err("# only a comment\n\n"), "the job file is empty");
    assert!(err("- a\n- b\n").starts_with("invalid type: sequence, expected struct"));
    let e = JobSpec::from_file(Path::new("/nonexistent/job.yaml")).unwrap_err();
    assert!(matches!(e, Error::Io { .. }));
}

#[test]
fn nesting_floods_are_refused_naming_the_limit_quickly() {
    // The coordinator-freezing submission of issue 11: linear pre-scan, no YAML parse.
    let start = std::time::Instant::now();
    for flood in [
        format!("name: {}{}", "[".repeat(100_000), "]".repeat(100_000)),
        format!("name: {}{}", "[".repeat(30_000), "]".repeat(30_000)),
        format!("{MINIMAL}x: {}\n", "{a: ".repeat(10_000)),
    ] {
        let msg = err(&flood);
        assert!(
            msg.contains("nesting deeper than 32 levels") || msg.contains("over the limit of 65536 bytes"),
            "{msg}"
        );
    }
    let msg = err(&format!("name: {}{}", "[".repeat(20_000), "]".repeat(20_000)));
    assert!(msg.starts_with("line 1: nesting deeper than 32 levels"), "{msg}");
    let msg = err(&format!("{MINIMAL}x: {}{}\n", "[".repeat(40), "]".repeat(40)));
    assert!(msg.starts_with("line 5: nesting deeper than 32 levels"), "{msg}");
    assert!(start.elapsed().as_secs_f64() < 5.0, "{:?}", start.elapsed());
}

#[test]
fn size_and_alias_limits_come_before_parsing() {
    let msg = err(&format!("{MINIMAL}# {}\n", "x".repeat(MAX_JOB_BYTES)));
    assert!(msg.contains("over the limit of 65536 bytes"), "{msg}");
    let aliased = "name: t\nmodel: &m { init: m }\ndata: { train: *m }\ntraining: { steps: 10, global_batch: 8 }\n";
    assert!(err(aliased).starts_with("line 2: YAML anchors and aliases"), "{}", err(aliased));
    // Quoted and commented brackets, ampersands and asterisks are text, and a path may hold them.
    let ok = "name: t # [[[[ &x\nmodel: { init: 'm&[*' }\ndata: { train: \"d/*[1].jsonl\" }\n\
              training: { steps: 10, global_batch: 8 }\n";
    assert_eq!(parse(ok).unwrap().data.train, Path::new("/jobs/d/*[1].jsonl"));
    // from_file reads no more than the limit: /dev/zero is refused, not read forever.
    let e = JobSpec::from_file(Path::new("/dev/zero")).unwrap_err();
    assert!(e.is_bad_input() && e.to_string().contains("not a regular file"), "{e}");
}

#[test]
fn a_bom_is_not_part_of_the_first_key() {
    let job = parse(&format!("\u{feff}{MINIMAL}")).unwrap();
    assert_eq!(job, parse(MINIMAL).unwrap());
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("bom.yaml");
    std::fs::write(&p, format!("\u{feff}{MINIMAL}")).unwrap();
    assert_eq!(JobSpec::from_file(&p).unwrap().name, "t");
}

#[test]
fn duplicate_keys_are_reported_at_the_duplicate() {
    let block = "name: t\nmodel: { init: m }\ndata:\n  train: a.jsonl\n  max_source_len: 8\n  train: b.jsonl\n\
                 training: { steps: 10, global_batch: 8 }\n";
    let msg = err(block);
    // serde_yaml_ng alone says `at line 4 column 3`: the mapping, not the duplicate.
    assert_eq!(msg, "data: duplicate field `train` at line 6 (in the mapping at line 4)");
    let top = format!("{MINIMAL}name: u\n");
    let msg = err(&top);
    assert!(msg.contains("duplicate") && msg.contains("line 5"), "{msg}");
    let flow =
        "name: t\nmodel: { init: m }\ndata: { train: a,\n  train: b }\ntraining: { steps: 10, global_batch: 8 }\n";
    let msg = err(flow);
    assert!(msg.contains("duplicate") && msg.contains("line 4"), "{msg}");
}

#[test]
fn lengths_have_an_absolute_cap_and_a_model_cap() {
    let msg = err(&full_with("data", "max_source_len", "100000"));
    assert!(msg.starts_with("data.max_source_len: must be at most 8192, got 100000"), "{msg}");
    assert!(err(&full_with("eval", "beams", "100000")).starts_with("eval.beams: must be at most 64"));
    // The model's limits (model::job::JobModelExt reads its config files).
    let text = MINIMAL.replace("train.jsonl }", "train.jsonl, validation: v.jsonl, max_source_len: 64 }");
    let job = parse(&text).unwrap();
    let (enc, dec) = job.model_config_files();
    assert_eq!((enc.as_path(), dec.as_path()), (Path::new("/jobs/m/config.json"), Path::new("/jobs/m/config.json")));
    job.check_positions((&enc, 64), (&dec, 129)).unwrap();
    for (src, tgt, key) in [(63, 512, "data.max_source_len: 64"), (512, 128, "eval.max_len: 128 + 1")] {
        let msg = job.check_positions((&enc, src), (&dec, tgt)).unwrap_err().to_string();
        assert!(msg.starts_with(&format!("/jobs/j.yaml: {key} exceeds the model's max_position_embeddings")), "{msg}");
    }
    let inline = parse(&MINIMAL.replace("{ init: m }", "{ encoder: e, decoder: random }")).unwrap();
    let (enc, dec) = inline.model_config_files();
    assert_eq!((enc.as_path(), dec.as_path()), (Path::new("/jobs/e/config.json"), Path::new("/jobs/e/config.json")));
}

#[test]
fn the_committed_cluster_job_passes_the_limits() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/k8s/jobs/kjv-cuda.yaml");
    let job = JobSpec::from_file(&path).unwrap();
    assert_eq!(
        (job.name.as_str(), job.training.global_batch, job.resources.device),
        ("kjv-modernize", 32, Device::Cuda)
    );
}
