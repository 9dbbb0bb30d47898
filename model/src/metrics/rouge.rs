//! ROUGE-1, ROUGE-2 and ROUGE-L F1, matching Google's `rouge-score` package
//! (`RougeScorer(['rouge1', 'rouge2', 'rougeL'], use_stemmer=...)`, default tokenizer).
//!
//! Corpus-level numbers are the plain mean over examples of the per-example F1, times 100. That is
//! what most papers report; rouge-score's `BootstrapAggregator` "mid" value is a bootstrap estimate
//! of the same mean and is deliberately not reproduced (it is random).

use std::collections::HashMap;

use super::porter;

/// Corpus ROUGE: means of per-example F1 scores, on a 0-100 scale.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rouge {
    pub rouge1: f64,
    pub rouge2: f64,
    pub rouge_l: f64,
}

/// Precision, recall and F1 of one example for one ROUGE type, each in 0..=1 (rouge-score's `Score`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RougeScore {
    pub precision: f64,
    pub recall: f64,
    pub fmeasure: f64,
}

/// Per-example scores for the three ROUGE types.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RougeExample {
    pub rouge1: RougeScore,
    pub rouge2: RougeScore,
    pub rouge_l: RougeScore,
}

/// rouge-score's default tokenizer: lowercase, treat every character outside `[a-z0-9]` as a
/// separator, then (optionally) Porter-stem tokens longer than 3 characters.
///
/// Lowercasing happens BEFORE the ASCII filter, exactly like Python's `str.lower()` followed by
/// the regex, so characters whose lowercase form is ASCII still count: the Kelvin sign `K` becomes
/// `k`, and `İ` becomes `i` + a combining dot (which then acts as a separator).
pub fn tokenize(text: &str, use_stemmer: bool) -> Vec<String> {
    let mut lowered = String::with_capacity(text.len());
    for c in text.chars() {
        // Per-char lowercasing equals Python's `str.lower()` for every character that can end up
        // ASCII; its only context rule (final sigma) yields non-ASCII, i.e. a separator anyway.
        lowered.extend(c.to_lowercase());
    }
    lowered
        .split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit()))
        .filter(|t| !t.is_empty())
        .map(|t| if use_stemmer && t.len() > 3 { porter::stem(t) } else { t.to_string() })
        // rouge-score drops tokens that are no longer `[a-z0-9]+` after stemming; the stemmer
        // never empties a word longer than 3 characters, but keep the check for fidelity.
        .filter(|t| !t.is_empty())
        .collect()
}

/// F1 exactly as rouge-score computes it (0 when precision + recall is 0).
fn fmeasure(precision: f64, recall: f64) -> f64 {
    if precision + recall > 0.0 { 2.0 * precision * recall / (precision + recall) } else { 0.0 }
}

fn ngram_counts(tokens: &[String], n: usize) -> HashMap<&[String], usize> {
    let mut counts = HashMap::new();
    if tokens.len() >= n {
        for w in tokens.windows(n) {
            *counts.entry(w).or_insert(0) += 1;
        }
    }
    counts
}

/// ROUGE-N: clipped n-gram overlap. Precision/recall divide by max(count, 1), so an empty side
/// gives 0 rather than NaN, as in rouge-score.
fn score_ngrams(target: &[String], prediction: &[String], n: usize) -> RougeScore {
    let t = ngram_counts(target, n);
    let p = ngram_counts(prediction, n);
    let overlap: usize = t.iter().map(|(g, &c)| c.min(p.get(g).copied().unwrap_or(0))).sum();
    let t_total: usize = t.values().sum();
    let p_total: usize = p.values().sum();
    let precision = overlap as f64 / p_total.max(1) as f64;
    let recall = overlap as f64 / t_total.max(1) as f64;
    RougeScore { precision, recall, fmeasure: fmeasure(precision, recall) }
}

/// Length of the longest common subsequence. Only the length is needed for ROUGE-L, so the usual
/// DP table is rolled into one row (rouge-score builds the full table; the result is identical).
fn lcs_len(a: &[String], b: &[String]) -> usize {
    let mut row = vec![0usize; b.len() + 1];
    for x in a {
        let mut diag = 0; // row[j-1] of the previous row
        for (j, y) in b.iter().enumerate() {
            let up = row[j + 1];
            row[j + 1] = if x == y { diag + 1 } else { up.max(row[j]) };
            diag = up;
        }
    }
    row[b.len()]
}

/// ROUGE-L (sentence-level LCS, not the summary-level `rougeLsum`).
fn score_lcs(target: &[String], prediction: &[String]) -> RougeScore {
    if target.is_empty() || prediction.is_empty() {
        return RougeScore { precision: 0.0, recall: 0.0, fmeasure: 0.0 };
    }
    let l = lcs_len(target, prediction) as f64;
    let precision = l / prediction.len() as f64;
    let recall = l / target.len() as f64;
    RougeScore { precision, recall, fmeasure: fmeasure(precision, recall) }
}

/// Scores one prediction against one target (rouge-score's `scorer.score(target, prediction)`).
pub fn rouge_example(hyp: &str, reference: &str, use_stemmer: bool) -> RougeExample {
    let t = tokenize(reference, use_stemmer);
    let p = tokenize(hyp, use_stemmer);
    RougeExample { rouge1: score_ngrams(&t, &p, 1), rouge2: score_ngrams(&t, &p, 2), rouge_l: score_lcs(&t, &p) }
}

/// Corpus ROUGE-1/2/L: the mean over examples of per-example F1, on a 0-100 scale.
/// One reference per hypothesis; an empty corpus scores 0.
///
/// # Panics
/// If `hyps` and `refs` differ in length (silently truncating, as `zip` would, hides bugs).
pub fn rouge(hyps: &[String], refs: &[String], use_stemmer: bool) -> Rouge {
    assert_eq!(hyps.len(), refs.len(), "rouge: {} hypotheses but {} references", hyps.len(), refs.len());
    if hyps.is_empty() {
        return Rouge { rouge1: 0.0, rouge2: 0.0, rouge_l: 0.0 };
    }
    let (mut r1, mut r2, mut rl) = (0.0, 0.0, 0.0);
    for (h, r) in hyps.iter().zip(refs) {
        let e = rouge_example(h, r, use_stemmer);
        r1 += e.rouge1.fmeasure;
        r2 += e.rouge2.fmeasure;
        rl += e.rouge_l.fmeasure;
    }
    let n = hyps.len() as f64;
    Rouge { rouge1: 100.0 * r1 / n, rouge2: 100.0 * r2 / n, rouge_l: 100.0 * rl / n }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(s: &str, stem: bool) -> Vec<String> {
        tokenize(s, stem)
    }

    /// Expected tokens printed by rouge_score 0.1.2 `tokenizers.DefaultTokenizer(use_stemmer).tokenize`.
    #[test]
    fn tokenizer_matches_rouge_score() {
        assert_eq!(
            toks("Don't stop-gap: 3,000 at 1.5%!", false),
            ["don", "t", "stop", "gap", "3", "000", "at", "1", "5"]
        );
        assert_eq!(toks("Café naïve ÉCOLE", false), ["caf", "na", "ve", "cole"]);
        assert_eq!(toks("\u{212A}elvin İstanbul", false), ["kelvin", "i", "stanbul"]);
        assert_eq!(toks("The lions were running quickly", true), ["the", "lion", "were", "run", "quickli"]);
        assert!(toks(" ... ", true).is_empty());
    }

    #[test]
    fn lcs_basic() {
        let a = toks("a b c d e", false);
        let b = toks("a x c e y", false);
        assert_eq!(lcs_len(&a, &b), 3);
        assert_eq!(lcs_len(&a, &[]), 0);
    }

    /// rouge-score: scorer.score("the cat sat on the mat", "the cat on the mat sat") gives
    /// rouge1 F 1.0, rouge2 F 0.6, rougeL F 5/6.
    #[test]
    fn example_matches_rouge_score() {
        let e = rouge_example("the cat on the mat sat", "the cat sat on the mat", false);
        assert!((e.rouge1.fmeasure - 1.0).abs() < 1e-12);
        assert!((e.rouge2.fmeasure - 0.6).abs() < 1e-12);
        assert!((e.rouge_l.fmeasure - 5.0 / 6.0).abs() < 1e-12);
        let empty = rouge_example("", "the cat", true);
        assert_eq!(empty.rouge1.fmeasure, 0.0);
        assert_eq!(empty.rouge_l.fmeasure, 0.0);
    }

    #[test]
    fn corpus_mean() {
        let h = vec!["a b".to_string(), "x".to_string()];
        let r = vec!["a b".to_string(), "y".to_string()];
        let s = rouge(&h, &r, true);
        assert!((s.rouge1 - 50.0).abs() < 1e-12 && (s.rouge2 - 50.0).abs() < 1e-12);
        assert_eq!(rouge(&[], &[], false).rouge_l, 0.0);
    }
}
