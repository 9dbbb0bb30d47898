//! Evaluation metrics for generated text, reimplemented to agree with the reference Python tools
//! people quote numbers from (checked by `tests/metrics_golden.rs` against fixtures written by
//! `scripts/golden/gen_metrics.py`):
//!
//! * [`corpus_bleu`]: sacreBLEU 2.x `corpus_bleu` defaults (13a, mixed case, 4-gram, `exp` smoothing).
//! * [`rouge`]: rouge-score's ROUGE-1/2/L F1 (default tokenizer, optional Porter stemmer), averaged
//!   over examples.
//!
//! Both report on a 0-100 scale. Each hypothesis has exactly one reference.

pub mod bleu;
pub mod diversity;
pub mod porter;
pub mod rouge;

pub use bleu::{Bleu, corpus_bleu, tokenize_13a};
pub use diversity::{distinct_n, identical_share, lead, mean_words};
pub use rouge::{Rouge, RougeExample, RougeScore, rouge, rouge_example};
