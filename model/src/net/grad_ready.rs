//! Which part of the flat gradient buffer is final at each point of backward, so a caller can
//! start all-reducing it while backward goes on (gradient buckets overlapped with backward).
//!
//! Backward runs in stages (LM head, decoder layers top down, decoder embeddings, encoder layers
//! top down, encoder embeddings), each accumulating into a known set of ranges. After stage k,
//! the suffix `[mark_k, len)` is final, where `mark_k` is the highest end of any range a LATER
//! stage writes. Tied weights need no special case: the decoder word embeddings (written by the
//! LM head and the decoder embeddings) and bertShare's shared encoder storage (written by the
//! decoder layers too) only leave the unfinished part when their last writer is done. Ranges no
//! stage writes (the frozen pooler) are final from the start.

use std::ops::Range;

use super::FinalGrads;
use crate::error::Result;
use crate::params::{AttentionView, EmbeddingsView, LayerView, LinearView, ModelView, NormView};

/// Tracks backward's stages and reports each newly final range `[a, b)`, top down, to a hook.
pub(super) struct GradReady<'h, Buf> {
    /// `marks[k]`: the final suffix starts here once stage k is done.
    marks: Vec<usize>,
    stage: usize,
    /// Start of the final suffix reported so far.
    top: usize,
    hook: &'h mut FinalGrads<'h, Buf>,
}

impl<'h, Buf> GradReady<'h, Buf> {
    pub(super) fn new(view: &ModelView, len: usize, hook: &'h mut FinalGrads<'h, Buf>) -> Self {
        let stages = stage_writes(view);
        let mut marks = vec![0; stages.len()];
        let mut later_end = 0;
        for k in (0..stages.len()).rev() {
            marks[k] = later_end;
            later_end = later_end.max(stages[k].iter().map(|r| r.end).max().unwrap_or(0));
        }
        Self { marks, stage: 0, top: len, hook }
    }

    /// Stage `self.stage` is done: report what became final (nothing, if the suffix did not grow).
    pub(super) fn stage_done(&mut self, grads: &Buf) -> Result<()> {
        let mark = self.marks.get(self.stage).copied().unwrap_or(0);
        self.stage += 1;
        if mark < self.top {
            let range = mark..self.top;
            self.top = mark;
            (self.hook)(range, grads)?;
        }
        Ok(())
    }
}

/// Stage done, when a hook is listening.
pub(super) fn stage_done<Buf>(ready: &mut Option<GradReady<'_, Buf>>, grads: &Buf) -> Result<()> {
    ready.as_mut().map_or(Ok(()), |r| r.stage_done(grads))
}

/// The ranges each backward stage accumulates into, in backward order. Must mirror `Bert2Bert::backward`.
/// The LM head's stage includes the bias and word-embedding gradients that `Bert2Bert::loss`
/// writes chunk by chunk before backward starts: the stage, and any report, ends after them.
pub(super) fn stage_writes(v: &ModelView) -> Vec<Vec<Range<usize>>> {
    let h = &v.lm_head;
    let mut head = vec![h.bias.clone(), v.decoder.embeddings.word.clone()];
    linear(&mut head, &h.transform);
    norm(&mut head, &h.norm);
    let mut stages = vec![head];
    stages.extend(v.decoder.layers.iter().rev().map(layer));
    stages.push(embeddings(&v.decoder.embeddings));
    stages.extend(v.encoder.layers.iter().rev().map(layer));
    stages.push(embeddings(&v.encoder.embeddings));
    stages
}

fn linear(out: &mut Vec<Range<usize>>, l: &LinearView) {
    out.extend([l.w.clone(), l.b.clone()]);
}

fn norm(out: &mut Vec<Range<usize>>, n: &NormView) {
    out.extend([n.gamma.clone(), n.beta.clone()]);
}

fn attention(out: &mut Vec<Range<usize>>, a: &AttentionView) {
    for l in [&a.q, &a.k, &a.v, &a.out] {
        linear(out, l);
    }
    norm(out, &a.norm);
}

fn layer(l: &LayerView) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    attention(&mut out, &l.self_attn);
    if let Some(c) = &l.cross_attn {
        attention(&mut out, c);
    }
    linear(&mut out, &l.inter);
    linear(&mut out, &l.output);
    norm(&mut out, &l.norm);
    out
}

fn embeddings(e: &EmbeddingsView) -> Vec<Range<usize>> {
    let mut out = vec![e.word.clone(), e.position.clone(), e.token_type.clone()];
    norm(&mut out, &e.norm);
    out
}
