//! How varied a model's generations are, and the trivial baselines its scores must beat.
//!
//! The classic bert2bert failure is an input-independent collapse: the decoder learns the
//! most common target and emits it for every source (labels not masked, decoder start or pad
//! token unset). Its BLEU/ROUGE can look merely "low"; these numbers make it unmistakable.
//!
//! * [`identical_share`]: the share of generations equal to the most frequent one (1/n when all
//!   differ, 1.0 when every source got the same output).
//! * [`distinct_n`]: distinct n-grams over all n-grams of all generations (Li et al. 2016,
//!   "distinct-1/2"), whitespace tokens.
//! * [`lead`]: the first `n` whitespace words of a source, the extractive baseline; with
//!   `n` = the mean reference length ([`mean_words`]), the "lead" that summarisation papers
//!   quote. Copying the source unchanged is the other baseline (for paraphrase-like data such
//!   as kjv_web it is strong: a model below it has learned less than the identity).

use std::collections::{HashMap, HashSet};

/// The share (0..=1) of `hyps` equal to the most frequent hypothesis; 0 for none.
pub fn identical_share(hyps: &[String]) -> f64 {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for h in hyps {
        *counts.entry(h.as_str()).or_default() += 1;
    }
    let most = counts.values().copied().max().unwrap_or(0);
    if hyps.is_empty() { 0.0 } else { most as f64 / hyps.len() as f64 }
}

/// Distinct `n`-grams over all `n`-grams (0..=1) of the whitespace-tokenised `hyps`; 0 when they
/// have no `n`-gram at all.
pub fn distinct_n(hyps: &[String], n: usize) -> f64 {
    let (mut seen, mut total) = (HashSet::new(), 0usize);
    for h in hyps {
        let words: Vec<&str> = h.split_whitespace().collect();
        for gram in words.windows(n.max(1)) {
            seen.insert(gram.to_vec());
            total += 1;
        }
    }
    if total == 0 { 0.0 } else { seen.len() as f64 / total as f64 }
}

/// The mean number of whitespace words of `texts`, rounded to the nearest integer (at least 1).
pub fn mean_words(texts: &[String]) -> usize {
    let words: usize = texts.iter().map(|t| t.split_whitespace().count()).sum();
    ((words as f64 / texts.len().max(1) as f64).round() as usize).max(1)
}

/// The first `n` whitespace words of `source`, single-spaced.
pub fn lead(source: &str, n: usize) -> String {
    source.split_whitespace().take(n).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn a_collapsed_model_has_identical_share_one_and_few_distinct_ngrams() {
        let collapsed = s(&["and he said", "and he said", "and he said", "and he said"]);
        assert_eq!(identical_share(&collapsed), 1.0);
        assert_eq!(distinct_n(&collapsed, 1), 3.0 / 12.0);
        assert_eq!(distinct_n(&collapsed, 2), 2.0 / 8.0);
        let varied = s(&["in the beginning", "god created the heaven", "and the earth", "and the earth"]);
        assert_eq!(identical_share(&varied), 0.5);
        // unigrams: in the beginning god created the heaven and the earth and the earth = 13,
        // distinct: in the beginning god created heaven and earth = 8.
        assert_eq!(distinct_n(&varied, 1), 8.0 / 13.0);
        assert_eq!(identical_share(&[]), 0.0);
        assert_eq!(distinct_n(&s(&["one"]), 2), 0.0, "no bigram at all");
    }

    #[test]
    fn lead_takes_the_mean_reference_length_in_words() {
        let refs = s(&["a b c", "a b c d e", "a  b"]);
        assert_eq!(mean_words(&refs), 3, "10 words / 3 references = 3.33, rounded");
        assert_eq!(lead("  In the   beginning God created ", 3), "In the beginning");
        assert_eq!(lead("short", 3), "short");
        assert_eq!(mean_words(&[]), 1);
    }
}
