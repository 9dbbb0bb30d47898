//! Corpus BLEU matching sacreBLEU 2.x `corpus_bleu(hyps, [refs])` with its defaults: `13a`
//! tokenizer, case-sensitive, 4-gram, `exp` smoothing, no effective order, single reference.
//!
//! Written from sacreBLEU's documented behaviour; the statistics and the final formula follow its
//! order of operations so that scores agree to floating-point noise, not just to 2 decimals.

use std::collections::HashMap;

/// n-gram order (sacreBLEU's `MAX_NGRAM_ORDER`).
const N: usize = 4;

/// Corpus BLEU and its parts, in sacreBLEU's units: `score` and `precisions` are 0-100,
/// `bp` is the brevity penalty in 0..=1, lengths are 13a token counts summed over the corpus.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bleu {
    pub score: f64,
    /// Smoothed modified n-gram precisions (n = 1..=4), in percent.
    pub precisions: [f64; N],
    pub bp: f64,
    pub sys_len: usize,
    pub ref_len: usize,
    /// Clipped matching n-gram counts per order (sacreBLEU's `counts`).
    pub counts: [usize; N],
    /// Hypothesis n-gram counts per order (sacreBLEU's `totals`).
    pub totals: [usize; N],
}

/// Python's `str.isspace()`: Unicode White_Space plus the ASCII separators U+001C..U+001F, which
/// Rust's `char::is_whitespace` does not include. sacreBLEU splits and strips with Python's rules.
pub(crate) fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// The `13a` tokenizer (mteval-v13a.pl as sacreBLEU implements it). Returns the tokens joined by
/// single spaces, like sacreBLEU's tokenizer does.
pub fn tokenize_13a(line: &str) -> String {
    // sacreBLEU strips trailing whitespace before tokenizing.
    let line = line.trim_end_matches(py_isspace);
    let mut line = line.replace("<skipped>", "").replace("-\n", "").replace('\n', " ");
    if line.contains('&') {
        // Sequential replacements, in this order, like the reference: "&amp;lt;" ends as "&lt;".
        line = line.replace("&quot;", "\"").replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">");
    }
    let mut chars: Vec<char> = format!(" {line} ").chars().collect();

    // 1. Split off ASCII punctuation and symbols except apostrophe, comma, hyphen and period:
    //    the ranges { to ~, [ to `, space to &, ( to +, : to @, and /.
    let is_sym = |c: char| matches!(c, '{'..='~' | '['..='`' | ' '..='&' | '('..='+' | ':'..='@' | '/');
    let mut out = Vec::with_capacity(chars.len() * 2);
    for &c in &chars {
        if is_sym(c) {
            out.extend([' ', c, ' ']);
        } else {
            out.push(c);
        }
    }
    chars = out;

    let is_digit = |c: char| c.is_ascii_digit();
    let is_pc = |c: char| c == '.' || c == ',';
    // 2. Period/comma not preceded by a digit: "x." -> "x . ".
    chars = sub_pairs(&chars, |a, b| !is_digit(a) && is_pc(b), |a, b| vec![a, ' ', b, ' ']);
    // 3. Period/comma not followed by a digit: ".x" -> " . x". Together with 2 this keeps
    //    "3,000" and "1.5" whole but splits "3." and ".5".
    chars = sub_pairs(&chars, |a, b| is_pc(a) && !is_digit(b), |a, b| vec![' ', a, ' ', b]);
    // 4. Dash preceded by a digit: "2-3" -> "2 - 3" (other hyphens stay inside words).
    chars = sub_pairs(&chars, |a, b| is_digit(a) && b == '-', |a, b| vec![a, ' ', b, ' ']);

    let s: String = chars.into_iter().collect();
    s.split(py_isspace).filter(|t| !t.is_empty()).collect::<Vec<_>>().join(" ")
}

/// `re.sub` for a two-character pattern: scan left to right, and after a match resume AFTER both
/// characters. This non-overlap matters: in "a.." only the first period is split by rule 2.
fn sub_pairs(s: &[char], matches: impl Fn(char, char) -> bool, replace: impl Fn(char, char) -> Vec<char>) -> Vec<char> {
    let mut out = Vec::with_capacity(s.len() + 8);
    let mut i = 0;
    while i < s.len() {
        if i + 1 < s.len() && matches(s[i], s[i + 1]) {
            out.extend(replace(s[i], s[i + 1]));
            i += 2;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    out
}

/// All n-grams of orders 1..=4 with their counts.
fn ngrams<'a>(tokens: &[&'a str]) -> HashMap<Vec<&'a str>, usize> {
    let mut m = HashMap::new();
    for n in 1..=N {
        if tokens.len() >= n {
            for w in tokens.windows(n) {
                *m.entry(w.to_vec()).or_insert(0) += 1;
            }
        }
    }
    m
}

/// sacreBLEU's `my_log`: log with log(0) floored to -9999999999 instead of -inf.
fn my_log(x: f64) -> f64 {
    if x == 0.0 { -9_999_999_999.0 } else { x.ln() }
}

/// Corpus BLEU with one reference per hypothesis. An empty corpus scores 0 (sacreBLEU raises).
///
/// # Panics
/// If `hyps` and `refs` differ in length.
pub fn corpus_bleu(hyps: &[String], refs: &[String]) -> Bleu {
    assert_eq!(hyps.len(), refs.len(), "corpus_bleu: {} hypotheses but {} references", hyps.len(), refs.len());
    let (mut sys_len, mut ref_len) = (0usize, 0usize);
    let mut counts = [0usize; N];
    let mut totals = [0usize; N];
    for (h, r) in hyps.iter().zip(refs) {
        let (ht, rt) = (tokenize_13a(h), tokenize_13a(r));
        let hyp_toks: Vec<&str> = ht.split(' ').filter(|t| !t.is_empty()).collect();
        let ref_toks: Vec<&str> = rt.split(' ').filter(|t| !t.is_empty()).collect();
        sys_len += hyp_toks.len();
        // With a single reference, the "closest reference length" is simply its length.
        ref_len += ref_toks.len();
        let ref_ngrams = ngrams(&ref_toks);
        for (g, &c) in &ngrams(&hyp_toks) {
            let n = g.len() - 1;
            totals[n] += c;
            counts[n] += c.min(ref_ngrams.get(g).copied().unwrap_or(0));
        }
    }
    compute_bleu(counts, totals, sys_len, ref_len)
}

/// BLEU from sufficient statistics with the `exp` (NIST/mteval) smoothing.
fn compute_bleu(counts: [usize; N], totals: [usize; N], sys_len: usize, ref_len: usize) -> Bleu {
    let bp = if sys_len < ref_len {
        if sys_len > 0 { (1.0 - ref_len as f64 / sys_len as f64).exp() } else { 0.0 }
    } else {
        1.0
    };
    let mut precisions = [0.0f64; N];
    let done = |score, precisions| Bleu { score, precisions, bp, sys_len, ref_len, counts, totals };
    // No match at any order: sacreBLEU returns 0 with all precisions reported as 0.
    if counts.iter().all(|&c| c == 0) {
        return done(0.0, precisions);
    }
    // `exp` smoothing: the k-th order with zero matches gets precision 1 / (2^k * total), so short
    // sentences with no 4-gram match do not collapse the geometric mean to 0.
    let mut smooth = 1.0f64;
    for n in 0..N {
        if totals[n] == 0 {
            // No hypothesis n-grams of this order (hence none higher): precisions stay 0 and the
            // floored log makes the score 0, exactly as in sacreBLEU.
            break;
        }
        precisions[n] = if counts[n] == 0 {
            smooth *= 2.0;
            100.0 / (smooth * totals[n] as f64)
        } else {
            100.0 * counts[n] as f64 / totals[n] as f64
        };
    }
    let log_sum: f64 = precisions.iter().map(|&p| my_log(p)).sum();
    done(bp * (log_sum / N as f64).exp(), precisions)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Expected strings printed by sacrebleu 2.6 `Tokenizer13a()(line.rstrip())`.
    #[test]
    fn tokenize_13a_matches_sacrebleu() {
        let cases = [
            ("Hello, world!", "Hello , world !"),
            ("It costs $3,000.50 (approx.).", "It costs $ 3,000.50 ( approx . ) ."),
            ("a..b", "a . . b"),
            ("1.5-2.0 km", "1.5 - 2.0 km"),
            ("He said \"no\" -- then left.", "He said \" no \" -- then left ."),
            ("don't stop-gap", "don't stop-gap"),
            ("&quot;x&amp;y&lt;z&gt;", "\" x & y < z >"),
            ("line-\nbreak\nnext", "linebreak next"),
            ("x<skipped>y", "xy"),
            ("e.g. U.S.A.", "e . g . U . S . A ."),
            ("5,a ,5 a,b", "5 , a , 5 a , b"),
            ("tab\there\u{a0}nbsp", "tab here nbsp"),
            ("café — naïve…", "café — naïve…"),
            ("[a]{b}~`c`^_|\\", "[ a ] { b } ~ ` c ` ^ _ | \\"),
            ("", ""),
            ("   ", ""),
            ("3.", "3 ."),
            (".5", ". 5"),
            ("x\u{2009}y\u{1c}z", "x y z"),
        ];
        for (input, want) in cases {
            assert_eq!(tokenize_13a(input), want, "13a({input:?})");
        }
    }

    #[test]
    fn identical_is_100() {
        let h = vec!["The quick brown fox jumps over the lazy dog.".to_string()];
        let b = corpus_bleu(&h, &h);
        assert!((b.score - 100.0).abs() < 1e-9);
        assert_eq!(b.bp, 1.0);
        assert_eq!((b.sys_len, b.ref_len), (10, 10));
    }

    /// sacrebleu.corpus_bleu(["a b c"], [["a b d"]]): counts [2,1,0,0], totals [3,2,1,0] ->
    /// precisions [66.67, 50, 50 (=100/(2*1)), 0]; the 4-gram total is 0, so the score is 0.
    #[test]
    fn short_sentences_and_smoothing() {
        let b = corpus_bleu(&["a b c".to_string()], &["a b d".to_string()]);
        assert_eq!(b.counts, [2, 1, 0, 0]);
        assert_eq!(b.totals, [3, 2, 1, 0]);
        assert!((b.precisions[2] - 50.0).abs() < 1e-12);
        assert_eq!(b.precisions[3], 0.0);
        assert_eq!(b.score, 0.0);
        let empty = corpus_bleu(&[String::new()], &["a b".to_string()]);
        assert_eq!((empty.score, empty.bp, empty.sys_len, empty.ref_len), (0.0, 0.0, 0, 2));
    }
}
