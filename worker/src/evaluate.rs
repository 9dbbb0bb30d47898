//! Evaluation: validation loss (eval mode, mean token cross-entropy) and generation metrics
//! (corpus BLEU as sacreBLEU computes it, ROUGE-1/2/L F1 as rouge-score does).
//!
//! An uncased tokenizer (BERT's usual) can only produce lowercase text, so with one hypotheses and
//! references are lowercased before BLEU (sacreBLEU's `lowercase=True`); a cased one is scored
//! as is. ROUGE lowercases by itself.

use kernels::Backend;
use model::Result;
use model::data::{Batch, Pair, encode_source};
use model::metrics::{Rouge, corpus_bleu, distinct_n, identical_share, lead, mean_words, rouge};
use model::net::{Bert2Bert, GenerateOptions, Inputs, PassOptions};
use model::tokenizer::Tokenizer;

#[cfg(test)]
mod tests {
    #[test]
    fn cleanup_joins_punctuation_like_transformers() {
        assert_eq!(super::clean_up_tokenization("leah ' s daughter , he said ."), "leah's daughter, he said.");
        assert_eq!(super::clean_up_tokenization("don ' t go !"), "don't go!");
    }
}

#[derive(Clone, Debug)]
pub struct EvalOptions {
    pub batch_size: usize,
    pub max_source_len: usize,
    pub max_target_len: usize,
    /// Generate and score with these options; `None` computes the loss only.
    pub generate: Option<GenerateOptions>,
    /// Generate for at most this many examples (the first ones of the file).
    pub max_generate: usize,
    pub bleu: bool,
    pub rouge: bool,
}

#[derive(Clone, Debug)]
pub struct Sample {
    pub source: String,
    pub reference: String,
    pub hypothesis: String,
}

#[derive(Clone, Debug)]
pub struct EvalResult {
    pub loss: f64,
    pub tokens: usize,
    pub bleu: Option<f64>,
    pub rouge: Option<Rouge>,
    pub samples: Vec<Sample>,
    /// How varied the generations are (when there are any).
    pub diversity: Option<Diversity>,
    /// The trivial baselines, scored like the model on the same examples.
    pub baselines: Option<Baselines>,
}

/// Over a model's generations (see `model::metrics::diversity`), each 0..=1.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Diversity {
    /// The share of generations equal to the most frequent one: near 1 is a collapse.
    pub identical: f64,
    pub distinct1: f64,
    pub distinct2: f64,
}

/// More than half of the generations identical: the input-independent collapse.
pub const COLLAPSE_SHARE: f64 = 0.5;

impl Diversity {
    pub fn collapsed(&self) -> bool {
        self.identical > COLLAPSE_SHARE
    }
}

/// BLEU and ROUGE of one set of hypotheses (each when asked for).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scores {
    pub bleu: Option<f64>,
    pub rouge: Option<Rouge>,
}

/// Copy-the-source, and the source's first `lead_words` words (the mean reference length).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Baselines {
    pub copy: Scores,
    pub lead: Scores,
    pub lead_words: usize,
}

fn scores(hyps: &[String], refs: &[String], opts: &EvalOptions) -> Scores {
    Scores {
        bleu: opts.bleu.then(|| corpus_bleu(hyps, refs).score),
        rouge: opts.rouge.then(|| rouge(hyps, refs, true)),
    }
}

/// The baselines on the first `refs.len()` pairs, cased as the model's hypotheses are.
fn baselines(pairs: &[Pair], refs: &[String], opts: &EvalOptions, case: fn(&str) -> String) -> Baselines {
    let sources: Vec<String> = pairs[..refs.len()].iter().map(|p| case(&p.source)).collect();
    let lead_words = mean_words(refs);
    let leads: Vec<String> = sources.iter().map(|s| lead(s, lead_words)).collect();
    Baselines { copy: scores(&sources, refs, opts), lead: scores(&leads, refs, opts), lead_words }
}

/// Generated ids to text: tokenizer decode (specials skipped), then transformers'
/// `clean_up_tokenization` on the whole string. The `tokenizers` WordPiece decoder cleans each
/// token on its own, so spaces around punctuation that spans tokens (`leah ' s`) would stay.
pub fn detokenize(tok: &Tokenizer, ids: &[i32]) -> Result<String> {
    Ok(clean_up_tokenization(&tok.decode(ids)?))
}

pub fn clean_up_tokenization(text: &str) -> String {
    [
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ]
    .iter()
    .fold(text.to_string(), |s, (from, to)| s.replace(from, to))
}

#[allow(clippy::too_many_arguments)]
pub fn evaluate<B: Backend>(
    b: &B,
    net: &mut Bert2Bert<B>,
    tok: &Tokenizer,
    pairs: &[Pair],
    src: &[Vec<i32>],
    tgt: &[Vec<i32>],
    opts: &EvalOptions,
) -> Result<EvalResult> {
    let framing = tok.framing();
    let (mut loss_sum, mut tokens) = (0.0f64, 0usize);
    for (s, t) in src.chunks(opts.batch_size.max(1)).zip(tgt.chunks(opts.batch_size.max(1))) {
        let batch = Batch::new(s, t, framing, opts.max_source_len, opts.max_target_len);
        let x = Inputs::from_batch(b, &batch)?;
        let l = net.pass(b, &x, PassOptions { train: false, seed: 0, label_smoothing: 0.0, grad_scale: None })?;
        loss_sum += l.sum();
        tokens += l.tokens();
    }
    let mut result = EvalResult {
        loss: loss_sum / tokens.max(1) as f64,
        tokens,
        bleu: None,
        rouge: None,
        samples: Vec::new(),
        diversity: None,
        baselines: None,
    };
    let Some(gen_opts) = opts.generate else {
        return Ok(result);
    };
    let n = opts.max_generate.min(pairs.len());
    let case: fn(&str) -> String = if tok.lowercases() { str::to_lowercase } else { str::to_string };
    let (mut hyps, mut refs) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for start in (0..n).step_by(opts.batch_size.max(1)) {
        let end = (start + opts.batch_size.max(1)).min(n);
        let rows: Vec<Vec<i32>> =
            src[start..end].iter().map(|s| encode_source(s, framing.source, opts.max_source_len)).collect();
        for (i, g) in net.generate(b, &rows, &gen_opts)?.into_iter().enumerate() {
            hyps.push(case(&detokenize(tok, &g.tokens)?));
            refs.push(case(&pairs[start + i].target));
        }
    }
    let model = scores(&hyps, &refs, opts);
    (result.bleu, result.rouge) = (model.bleu, model.rouge);
    if n > 0 {
        result.diversity = Some(Diversity {
            identical: identical_share(&hyps),
            distinct1: distinct_n(&hyps, 1),
            distinct2: distinct_n(&hyps, 2),
        });
        result.baselines = Some(baselines(pairs, &refs, opts, case));
    }
    result.samples = (0..n.min(5))
        .map(|i| Sample {
            source: pairs[i].source.clone(),
            reference: pairs[i].target.clone(),
            hypothesis: hyps[i].clone(),
        })
        .collect();
    Ok(result)
}
