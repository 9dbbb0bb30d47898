//! Golden test of `model::metrics` against sacreBLEU and rouge-score: the fixture is written by
//! scripts/golden/gen_metrics.py (see its docstring for what each section holds).
//!
//! Every score must agree within 0.01 on the 0-100 scale (2 decimals, what people report); the
//! brevity penalty and per-example ROUGE (0-1 in the fixture) are compared after scaling by 100.
//! Integer statistics (lengths, n-gram counts) and stems must match exactly.

use std::path::Path;

use model::metrics::{corpus_bleu, porter, rouge, rouge::tokenize, rouge_example, tokenize_13a};
use serde_json::Value;

const TOL: f64 = 0.01;

fn fixture() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/metrics_golden.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).expect("metrics_golden.json parses")
}

fn f(v: &Value) -> f64 {
    v.as_f64().expect("number")
}

fn u(v: &Value) -> usize {
    v.as_u64().expect("integer") as usize
}

/// Hypotheses and references of one named corpus (indices into `pairs`).
fn corpus(g: &Value, case: &Value) -> (Vec<String>, Vec<String>) {
    let pairs = g["pairs"].as_array().unwrap();
    case["indices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            let p = &pairs[u(i)];
            (p["hyp"].as_str().unwrap().to_string(), p["ref"].as_str().unwrap().to_string())
        })
        .unzip()
}

/// Collects mismatches instead of stopping at the first, and tracks the largest deviation.
#[derive(Default)]
struct Checker {
    failures: Vec<String>,
    max_dev: f64,
    compared: usize,
}

impl Checker {
    fn close(&mut self, what: String, ours: f64, want: f64) {
        let dev = (ours - want).abs();
        self.compared += 1;
        self.max_dev = self.max_dev.max(dev);
        if dev.is_nan() || dev > TOL {
            self.failures.push(format!("{what}: ours {ours} vs reference {want}"));
        }
    }

    fn exact(&mut self, what: String, ours: usize, want: usize) {
        self.compared += 1;
        if ours != want {
            self.failures.push(format!("{what}: ours {ours} vs reference {want}"));
        }
    }

    fn finish(self, label: &str) {
        eprintln!("{label}: {} values compared, max deviation {:.3e}", self.compared, self.max_dev);
        assert!(self.failures.is_empty(), "{label}: {} mismatches:\n{}", self.failures.len(), self.failures.join("\n"));
    }
}

#[test]
fn bleu_matches_sacrebleu() {
    let g = fixture();
    let mut c = Checker::default();
    let cases = g["cases"].as_array().unwrap();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let (hyps, refs) = corpus(&g, case);
        let want = &case["bleu"];
        let b = corpus_bleu(&hyps, &refs);
        c.close(format!("{name} score"), b.score, f(&want["score"]));
        c.close(format!("{name} bp*100"), 100.0 * b.bp, 100.0 * f(&want["bp"]));
        for n in 0..4 {
            c.close(format!("{name} precision[{n}]"), b.precisions[n], f(&want["precisions"][n]));
            c.exact(format!("{name} counts[{n}]"), b.counts[n], u(&want["counts"][n]));
            c.exact(format!("{name} totals[{n}]"), b.totals[n], u(&want["totals"][n]));
        }
        c.exact(format!("{name} sys_len"), b.sys_len, u(&want["sys_len"]));
        c.exact(format!("{name} ref_len"), b.ref_len, u(&want["ref_len"]));
    }
    c.finish(&format!("BLEU over {} corpora", cases.len()));
}

#[test]
fn rouge_matches_rouge_score() {
    let g = fixture();
    let mut c = Checker::default();
    let cases = g["cases"].as_array().unwrap();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let (hyps, refs) = corpus(&g, case);
        for (stem, key) in [(true, "rouge_stem"), (false, "rouge_nostem")] {
            let want = &case[key];
            let r = rouge(&hyps, &refs, stem);
            c.close(format!("{name} {key} rouge1"), r.rouge1, f(&want["rouge1"]));
            c.close(format!("{name} {key} rouge2"), r.rouge2, f(&want["rouge2"]));
            c.close(format!("{name} {key} rougeL"), r.rouge_l, f(&want["rougeL"]));
        }
    }
    c.finish(&format!("ROUGE over {} corpora x 2 stemmer settings", cases.len()));
}

#[test]
fn rouge_examples_match_rouge_score() {
    let g = fixture();
    let pairs = g["pairs"].as_array().unwrap();
    let mut c = Checker::default();
    let examples = g["examples"].as_array().unwrap();
    for ex in examples {
        let i = u(&ex["index"]);
        let (hyp, reference) = (pairs[i]["hyp"].as_str().unwrap(), pairs[i]["ref"].as_str().unwrap());
        for (stem, key) in [(true, "stem"), (false, "nostem")] {
            let e = rouge_example(hyp, reference, stem);
            for (kind, s) in [("rouge1", e.rouge1), ("rouge2", e.rouge2), ("rougeL", e.rouge_l)] {
                let want = &ex[key][kind];
                for (j, (part, ours)) in
                    [("precision", s.precision), ("recall", s.recall), ("fmeasure", s.fmeasure)].into_iter().enumerate()
                {
                    c.close(format!("pair {i} {key} {kind} {part}"), 100.0 * ours, 100.0 * f(&want[j]));
                }
            }
        }
    }
    c.finish(&format!("per-example ROUGE over {} pairs", examples.len()));
}

#[test]
fn porter_stems_match_nltk() {
    let g = fixture();
    let stems = g["stems"].as_object().unwrap();
    let bad: Vec<String> = stems
        .iter()
        .filter_map(|(w, want)| {
            let ours = porter::stem(w);
            (ours != want.as_str().unwrap()).then(|| format!("{w}: ours {ours} vs nltk {want}"))
        })
        .collect();
    eprintln!("Porter: {} words compared, {} mismatches", stems.len(), bad.len());
    assert!(bad.is_empty(), "{} stem mismatches:\n{}", bad.len(), bad.join("\n"));
}

#[test]
fn tokenizers_match_references() {
    let g = fixture();
    let cases = g["tokenize"].as_array().unwrap();
    let strs =
        |v: &Value| -> Vec<String> { v.as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect() };
    let mut bad = Vec::new();
    for t in cases {
        let s = t["s"].as_str().unwrap();
        let ours = tokenize_13a(s);
        if ours != t["13a"].as_str().unwrap() {
            bad.push(format!("13a {s:?}: ours {ours:?} vs sacrebleu {:?}", t["13a"]));
        }
        for (stem, key) in [(false, "rouge"), (true, "rouge_stem")] {
            let ours = tokenize(s, stem);
            if ours != strs(&t[key]) {
                bad.push(format!("{key} {s:?}: ours {ours:?} vs rouge-score {:?}", t[key]));
            }
        }
    }
    eprintln!("tokenizers: {} strings x 3 tokenizations, {} mismatches", cases.len(), bad.len());
    assert!(bad.is_empty(), "{} tokenizer mismatches:\n{}", bad.len(), bad.join("\n"));
}
