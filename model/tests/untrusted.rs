//! Property tests over the readers of untrusted bytes: the job YAML parser, the JSONL/TSV data
//! readers and config.json. Each must return Ok or an input error, never panic, and stay fast
//! (the limits bound their work). Case counts are fixed so CI time is bounded.

use std::path::Path;

use model::config::{BertConfig, ModelConfig};
use model::data::{MAX_LINE_BYTES, read_jsonl, read_tsv};
use model::job::JobSpec;
use model::testing::TinyBert;
use proptest::prelude::*;
use serde_json::{Value, json};

const JOB: &str = "\
name: fuzz
model: { init: m }
data:
  train: d/train.jsonl
  validation: d/val.jsonl
  max_source_len: 64
  max_target_len: 32
training:
  steps: 10
  global_batch: 8
  micro_batch: 4
  lr: 1e-4
  schedule: cosine
checkpoint: { dir: ck, every_steps: 5, keep: 2 }
eval: { beams: 2, max_len: 16, metrics: [bleu, rouge] }
resources: { workers: 2, device: cpu }
";

fn parse(text: &str) -> Result<JobSpec, model::Error> {
    Ok(JobSpec::from_str(text, Path::new("/jobs/fuzz.yaml"))?)
}

/// Ok, or an input error naming the job file: anything else (a panic, an I/O error) fails.
fn check_job(text: &str) -> Result<(), TestCaseError> {
    match parse(text) {
        Ok(spec) => {
            // What parses must also round-trip through its own YAML.
            let again = parse(&spec.to_yaml()).map_err(|e| TestCaseError::fail(format!("round trip: {e}")))?;
            prop_assert_eq!(again, spec);
        }
        Err(e) => {
            prop_assert!(e.is_bad_input(), "not an input error: {e}");
            prop_assert!(e.to_string().starts_with("/jobs/fuzz.yaml: "), "{e}");
        }
    }
    Ok(())
}

/// One edit of the valid job: insert, delete or replace a span with YAML-ish noise.
fn mutation() -> impl Strategy<Value = (usize, usize, String)> {
    let noise = prop_oneof![
        Just("[".repeat(40)),
        Just("{".repeat(40)),
        Just("&a ".to_string()),
        Just("*a".to_string()),
        Just("\u{feff}".to_string()),
        Just("\n  - ".to_string()),
        Just(": ".to_string()),
        Just("'".to_string()),
        Just("\"".to_string()),
        Just("|\n".to_string()),
        Just("99999999999999999999999".to_string()),
        Just("-1".to_string()),
        Just("nan".to_string()),
        Just("~".to_string()),
        "[ -~\n\t]{0,12}",
        "\\PC{0,6}",
    ];
    (0..JOB.len(), 0usize..24, noise)
}

fn apply(text: &str, (at, del, with): &(usize, usize, String)) -> String {
    let mut at = (*at).min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    let mut end = (at + del).min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{}{}", &text[..at], with, &text[end..])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    /// 512 cases of arbitrary text.
    #[test]
    fn job_parser_on_arbitrary_text(text in "\\PC{0,400}") {
        check_job(&text)?;
    }

    /// 512 cases of one to three mutations of a valid job file.
    #[test]
    fn job_parser_on_mutated_jobs(edits in prop::collection::vec(mutation(), 1..4)) {
        let text = edits.iter().fold(JOB.to_string(), |t, e| apply(&t, e));
        check_job(&text)?;
    }
}

/// Arbitrary bytes, biased towards the readers' syntax.
fn data_bytes() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        Just(b"{\"source\": \"a b\", \"target\": \"c\"}\n".to_vec()),
        Just(b"{\"source\": {\"x\": [1]}, \"target\": null}\n".to_vec()),
        Just(b"a\tb\n".to_vec()),
        Just(b"\t\t\n".to_vec()),
        Just(b"\xef\xbb\xbf".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\n".to_vec()),
        prop::collection::vec(any::<u8>(), 0..64),
    ];
    prop::collection::vec(piece, 0..12).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    /// 256 cases: arbitrary bytes through both readers; a value is never echoed in an error.
    #[test]
    fn data_readers_on_arbitrary_bytes(bytes in data_bytes()) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fuzz.jsonl");
        std::fs::write(&path, &bytes).unwrap();
        for r in [read_jsonl(&path, "source", "target"), read_tsv(&path)] {
            match r {
                Ok(pairs) => prop_assert!(!pairs.is_empty()),
                Err(e) => {
                    prop_assert!(e.is_bad_input(), "{e}");
                    let msg = e.to_string();
                    prop_assert!(msg.starts_with(&*path.to_string_lossy()), "{msg}");
                    prop_assert!(!msg.contains("a b") && msg.len() < 400, "{msg}");
                }
            }
        }
    }
}

#[test]
fn data_readers_bound_a_line_without_newline() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("one.jsonl");
    std::fs::write(&path, vec![b'x'; 3 * MAX_LINE_BYTES]).unwrap();
    let e = read_jsonl(&path, "source", "target").unwrap_err();
    assert!(e.to_string().contains("line 1: longer than the limit"), "{e}");
}

/// A JSON value of any type, with numbers at the edges.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|x| serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)),
        Just(json!(u64::MAX)),
        Just(json!(1_000_000)),
        Just(json!(0)),
        Just(json!(4)),
        Just(json!(1e300)),
        Just(json!("gelu")),
        "\\PC{0,8}".prop_map(Value::from),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::from),
            prop::collection::btree_map("[a-z_]{1,6}", inner, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

const KEYS: [&str; 13] = [
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
    "layer_norm_eps",
    "hidden_dropout_prob",
    "hidden_act",
    "position_embedding_type",
    "pad_token_id",
    "initializer_range",
];

fn small_bert() -> Value {
    TinyBert { vocab: 50, hidden: 16, layers: 2, heads: 4, intermediate: 24, positions: 64 }.json()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, failure_persistence: None, ..ProptestConfig::default() })]

    /// 1024 cases: a valid encoder-decoder config with up to four keys (of either side or the
    /// top level) set to arbitrary JSON. Accepted configs stay within the size limits, so
    /// nothing is ever allocated from an absurd size.
    #[test]
    fn config_json_with_arbitrary_values(
        edits in prop::collection::vec((0usize..3, 0..KEYS.len() + 3, any_json()), 1..5)
    ) {
        let mut v = json!({
            "encoder": small_bert(), "decoder": small_bert(), "tie_encoder_decoder": false,
            "decoder_start_token_id": 1, "pad_token_id": 0, "eos_token_id": 2
        });
        for (side, key, value) in edits {
            let top = ["decoder_start_token_id", "pad_token_id", "eos_token_id"];
            match (side, KEYS.get(key)) {
                (0, Some(k)) => v["encoder"][*k] = value,
                (1, Some(k)) => v["decoder"][*k] = value,
                (_, None) => v[top[key - KEYS.len()]] = value,
                (_, Some(_)) => v["tie_encoder_decoder"] = value,
            }
        }
        let file = Path::new("/m/config.json");
        match ModelConfig::from_value(&v, file) {
            Ok(cfg) => {
                prop_assert!(cfg.parameter_estimate() <= model::config::MAX_PARAMETERS);
                for c in [&cfg.encoder, &cfg.decoder] {
                    prop_assert!(c.num_hidden_layers <= 128 && c.hidden_size <= 16384);
                    prop_assert!(c.hidden_size % c.num_attention_heads == 0);
                }
                // A sane config builds its parameter table without trouble.
                let table = model::ParamTable::new(&cfg);
                prop_assert!(table.storage_len as u64 <= cfg.parameter_estimate());
            }
            Err(e) => {
                prop_assert!(e.is_bad_input(), "{e}");
                prop_assert!(e.to_string().starts_with("/m/config.json: "), "{e}");
            }
        }
        // The same values as a BertConfig on their own.
        if let Err(e) = BertConfig::from_value(&v["encoder"], file) {
            prop_assert!(e.is_bad_input(), "{e}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    /// 512 cases: the duplicate-key locator on any text and any reported position never panics
    /// and, when it answers, names a line of the text at or after the reported one.
    #[test]
    fn duplicate_key_locator_on_arbitrary_positions(
        text in "([ a-z:{},\\-#'\"\n]|é){0,200}",
        key in "[a-z]{1,3}",
        line in 0usize..12,
        column in 0usize..30,
    ) {
        if let Some(found) = model::job::limits::duplicate_key_line(&text, &key, line, column) {
            prop_assert!(found >= line && found <= text.lines().count());
        }
        let _ = model::job::limits::check(&text);
    }
}

/// Nesting depth of a parsed YAML value: the real parser's view, the oracle for the scan.
fn yaml_depth(v: &serde_yaml_ng::Value) -> usize {
    use serde_yaml_ng::Value as Y;
    match v {
        Y::Sequence(s) => 1 + s.iter().map(yaml_depth).max().unwrap_or(0),
        Y::Mapping(m) => 1 + m.iter().map(|(k, v)| yaml_depth(k).max(yaml_depth(v))).max().unwrap_or(0),
        Y::Tagged(t) => yaml_depth(&t.value),
        _ => 0,
    }
}

/// A scalar that is valid in a flow collection and tempts a scan to misread it: quotes and
/// brackets inside quoted scalars, quotes and colons inside plain ones.
fn tricky_leaf() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "a",
        "a b",
        "\"q [[ {{ ]\"",
        "'s [[ '' {{'",
        "\"e \\\" [[\"",
        "a:b",
        "a:\"b",
        "-a",
        "a#b",
        "a \"b",
        "a 'b",
        "a &b",
        "1",
        "~",
    ])
}

/// Valid YAML of known depth: `x:` holding `levels` nested flow sequences and mappings, each
/// with tricky scalars before and after its child, separated by commas and line breaks.
fn nested_yaml() -> impl Strategy<Value = String> {
    let sep = prop::sample::select(vec![", ", ",", ",\n  ", " ,\n "]);
    let level = (any::<bool>(), prop::option::of(tricky_leaf()), prop::option::of(tricky_leaf()), sep);
    prop::collection::vec(level, 0..48).prop_map(|levels| {
        let mut text = String::from("x: ");
        for (i, (map, before, _, sep)) in levels.iter().enumerate() {
            text.push(if *map { '{' } else { '[' });
            match (map, before) {
                (false, Some(leaf)) => text.push_str(&format!("{leaf}{sep}")),
                (true, Some(leaf)) => text.push_str(&format!("k{i}: {leaf}{sep}")),
                _ => {}
            }
            if *map {
                text.push_str(&format!("v{i}: "));
            }
        }
        text.push('a');
        for (i, (map, _, after, sep)) in levels.iter().enumerate().rev() {
            match (map, after) {
                (false, Some(leaf)) => text.push_str(&format!("{sep}{leaf}")),
                (true, Some(leaf)) => text.push_str(&format!("{sep}z{i}: {leaf}")),
                _ => {}
            }
            text.push(if *map { '}' } else { ']' });
        }
        text.push('\n');
        text
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, failure_persistence: None, ..ProptestConfig::default() })]

    /// 2048 cases: whatever the scan lets through, the YAML parser never nests deeper than the
    /// limit (serde_yaml_ng itself stops at 128, so disagreements between 33 and 128 show).
    #[test]
    fn the_depth_scan_never_undercounts_the_parser(text in nested_yaml()) {
        if model::job::limits::check(&text).is_ok()
            && let Ok(v) = serde_yaml_ng::from_str::<serde_yaml_ng::Value>(&text)
        {
            prop_assert!(yaml_depth(&v) <= model::job::limits::MAX_DEPTH, "depth {} for {text:?}", yaml_depth(&v));
        }
    }
}

/// Where a block node starts: on a new line at a column, or after `- ` on the current line.
#[derive(Clone, Copy)]
enum At {
    Line(usize),
    Inline(usize),
}

/// Block YAML for a chain of levels (mapping or sequence; a sequence under a key at the key's
/// own column or indented; a sibling entry after the child), ending in a scalar.
fn block_chain(levels: &[(bool, bool, bool)], at: At, out: &mut String) {
    let Some((&(map, same_col, sibling), rest)) = levels.split_first() else {
        match at {
            At::Line(c) => out.push_str(&format!("{}v\n", " ".repeat(c))),
            At::Inline(_) => out.push_str("v\n"),
        }
        return;
    };
    let (col, prefix) = match at {
        At::Line(c) => (c, " ".repeat(c)),
        At::Inline(c) => (c, String::new()),
    };
    let n = levels.len();
    if map {
        out.push_str(&format!("{prefix}k{n}:\n"));
        let child_seq = rest.first().is_some_and(|l| !l.0);
        let child = if child_seq && same_col { col } else { col + 2 };
        block_chain(rest, At::Line(child), out);
        if sibling {
            out.push_str(&format!("{}z{n}: v\n", " ".repeat(col)));
        }
    } else {
        out.push_str(&format!("{prefix}- "));
        block_chain(rest, At::Inline(col + 2), out);
        if sibling {
            out.push_str(&format!("{}- v\n", " ".repeat(col)));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, failure_persistence: None, ..ProptestConfig::default() })]

    /// 2048 cases: block nesting (indentation, compact `- - x`, sequences at their key's
    /// column, dedents to siblings; LF, CRLF, CR or LS line breaks) against serde_yaml_ng: what the scan lets through is never
    /// deeper than the limit.
    #[test]
    fn the_block_scan_never_undercounts_the_parser(
        levels in prop::collection::vec((any::<bool>(), any::<bool>(), any::<bool>()), 0..48),
        newline in prop::sample::select(vec!["\n", "\r\n", "\r", "\u{2028}"]),
    ) {
        let mut text = String::new();
        block_chain(&levels, At::Line(0), &mut text);
        let text = text.replace('\n', newline);
        if model::job::limits::check(&text).is_ok()
            && let Ok(v) = serde_yaml_ng::from_str::<serde_yaml_ng::Value>(&text)
        {
            prop_assert!(yaml_depth(&v) <= model::job::limits::MAX_DEPTH, "depth {} for\n{text}", yaml_depth(&v));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    /// 256 cases: pairs written by serde_json (one object per line) and as TSV read back equal,
    /// whatever their text (quotes, backslashes, non-ASCII); serde_json is the oracle. (A TSV
    /// source may not start with U+FEFF: on line 1 that is the file's BOM, and dropped.)
    #[test]
    fn data_readers_round_trip_what_serde_json_writes(
        pairs in prop::collection::vec(("[^\t\r\n\u{feff}]*[^\t\r\n\u{feff}\\s][^\t\r\n]*", "\\PC*\\S\\PC*"), 1..20)
    ) {
        let dir = tempfile::tempdir().unwrap();
        let jsonl = dir.path().join("p.jsonl");
        let lines: Vec<String> = pairs.iter().map(|(s, t)| json!({"src": s, "tgt": t, "n": 1}).to_string()).collect();
        std::fs::write(&jsonl, lines.join("\n")).unwrap();
        let got = read_jsonl(&jsonl, "src", "tgt").unwrap();
        prop_assert_eq!(got.len(), pairs.len());
        for (p, (s, t)) in got.iter().zip(&pairs) {
            prop_assert_eq!((&p.source, &p.target), (s, t));
        }
        let tsv = dir.path().join("p.tsv");
        let rows: Vec<String> = pairs.iter().map(|(s, _)| format!("{s}\t{s}")).collect();
        std::fs::write(&tsv, rows.join("\r\n") + "\n").unwrap();
        let got = read_tsv(&tsv).unwrap();
        for (p, (s, _)) in got.iter().zip(&pairs) {
            prop_assert_eq!((&p.source, &p.target), (s, s));
        }
    }
}
