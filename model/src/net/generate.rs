//! Generation: beam search (greedy is one beam) with a KV cache.
//!
//! The encoder runs once per batch; each decoder layer's cross-attention K/V are computed once
//! from its output. Decoder self-attention keeps K/V of every generated position in a cache of
//! `[rows, max_len + 1, hidden]` per layer; a step attends over the whole cache with the not yet
//! written positions masked, so the attention op needs no special case. When beams are
//! re-ranked, cache rows follow their parent beam (a row gather through the embedding op).

use kernels::{AttentionShape, Backend, GemmShape, Operand};

use super::layers::{EmbActs, EmbIds, FfnActs, NormActs, linear_forward, r, w};
use super::{Bert2Bert, EncoderLayer};
use crate::config::BertConfig;
use crate::error::{Error, Result};

/// How a finished hypothesis's summed log-probability is normalised by its length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LengthPenaltyKind {
    /// `((5 + len) / 6) ^ alpha`, Wu et al. 2016 (GNMT), as Rothe et al. use.
    Gnmt,
    /// `len ^ alpha`, transformers' `length_penalty`.
    Hf,
}

#[derive(Clone, Copy, Debug)]
pub struct GenerateOptions {
    pub beams: usize,
    /// Most generated tokens, [SEP] included.
    pub max_len: usize,
    /// [SEP] is banned before this many tokens.
    pub min_len: usize,
    pub length_penalty: f32,
    pub penalty_kind: LengthPenaltyKind,
    /// Ban any n-gram of this size from repeating (0 disables).
    pub no_repeat_ngram: usize,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            beams: 4,
            max_len: 64,
            min_len: 0,
            length_penalty: 0.6,
            penalty_kind: LengthPenaltyKind::Gnmt,
            no_repeat_ngram: 0,
        }
    }
}

impl GenerateOptions {
    fn penalty(&self, len: usize) -> f64 {
        let (l, a) = (len as f64, self.length_penalty as f64);
        match self.penalty_kind {
            LengthPenaltyKind::Gnmt => ((5.0 + l) / 6.0).powf(a),
            LengthPenaltyKind::Hf => l.max(1.0).powf(a),
        }
    }
}

/// One generated target: ids without the start token and the final [SEP], and the length-
/// normalised log-probability it was ranked by (its [SEP], when generated, counts in both).
#[derive(Clone, Debug)]
pub struct Generated {
    pub tokens: Vec<i32>,
    pub score: f64,
    /// Whether the hypothesis ended with [SEP] (false when cut at `max_len`).
    pub ended: bool,
}

struct LayerState<B: Backend> {
    k_self: B::Buf,
    v_self: B::Buf,
    k_cross: B::Buf,
    v_cross: B::Buf,
    self_norm: NormActs<B>,
    cross_norm: NormActs<B>,
    ffn: FfnActs<B>,
}

/// Per-item beam bookkeeping on the host.
struct Beams {
    scores: Vec<f64>,
    tokens: Vec<Vec<i32>>,
    finished: Vec<Vec<(f64, Vec<i32>)>>,
    done: Vec<bool>,
}

impl Beams {
    /// `items` sources of `k` beams each; only the first beam of each starts live.
    fn new(items: usize, k: usize) -> Beams {
        Beams {
            scores: (0..items * k).map(|r| if r % k == 0 { 0.0 } else { f64::NEG_INFINITY }).collect(),
            tokens: vec![Vec::new(); items * k],
            finished: vec![Vec::new(); items],
            done: vec![false; items],
        }
    }

    /// Every item's hypotheses, best first: those finished with [SEP] and, for an item still
    /// running at `max_len`, its live beams.
    fn into_nbest(mut self, k: usize, eos: i32, opts: &GenerateOptions) -> Vec<Vec<Generated>> {
        for i in 0..self.done.len() {
            if !self.done[i] {
                for r in i * k..(i + 1) * k {
                    if self.scores[r].is_finite() {
                        let len = self.tokens[r].len();
                        self.finished[i].push((self.scores[r] / opts.penalty(len), self.tokens[r].clone()));
                    }
                }
            }
        }
        self.finished
            .into_iter()
            .map(|f| {
                let mut hyps: Vec<Generated> = f
                    .into_iter()
                    .map(|(score, mut tokens)| {
                        let ended = tokens.last() == Some(&eos);
                        if ended {
                            tokens.pop();
                        }
                        Generated { tokens, score, ended }
                    })
                    .collect();
                hyps.sort_by(|a, b| b.score.total_cmp(&a.score));
                hyps
            })
            .collect()
    }
}

/// One step's working buffers, shared by the decoder layers in turn.
struct StepScratch<B: Backend> {
    q: B::Buf,
    k_new: B::Buf,
    v_new: B::Buf,
    ctx: B::Buf,
    probs_self: B::Buf,
    probs_cross: B::Buf,
}

/// The LM head's buffers, and the logits it writes.
struct HeadScratch<B: Backend> {
    pre: B::Buf,
    act: B::Buf,
    norm: NormActs<B>,
    logits: B::Buf,
}

/// The decoder's state across the steps of one `generate_nbest` call.
struct DecodeState<B: Backend> {
    layers: Vec<LayerState<B>>,
    /// The source mask of every row `[rows, src_len]`.
    enc_mask: B::Buf,
    step: StepScratch<B>,
    emb: EmbActs<B>,
    head: HeadScratch<B>,
    /// Where a cache is gathered to when beams are re-ranked.
    spare: B::Buf,
    rows: usize,
    src_len: usize,
    tmax: usize,
}

impl<B: Backend> DecodeState<B> {
    /// After beams are re-ranked, each row's self-attention cache becomes its parent's
    /// (`parents[row]`): a row gather through the embedding op.
    fn follow_parents(&mut self, b: &B, parents: &[i32]) -> Result<()> {
        let parent_ids = b.upload_ids(parents)?;
        // `spare` is one cache: rows x positions x hidden.
        let row_len = b.len(&self.spare) / self.rows;
        for st in &mut self.layers {
            for cache in [&mut st.k_self, &mut st.v_self] {
                b.embedding_forward(&parent_ids, r(b, cache), row_len, w(b, &mut self.spare), false)?;
                std::mem::swap(cache, &mut self.spare);
            }
        }
        Ok(())
    }
}

/// Attention of `batch` rows, `tq` queries over `tk` keys, with `cfg`'s heads; generation
/// neither masks causally (the cache mask does that) nor drops out.
fn attention_shape(cfg: &BertConfig, batch: usize, tq: usize, tk: usize) -> AttentionShape {
    AttentionShape::new(batch, cfg.num_attention_heads, cfg.head_dim(), tq, tk)
}

fn log_softmax(x: &[f32]) -> Vec<f64> {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max + x.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
    x.iter().map(|&v| v as f64 - lse).collect()
}

/// Tokens that would repeat an n-gram already in `seq` if appended.
fn banned_by_ngram(seq: &[i32], n: usize) -> Vec<i32> {
    if n == 0 || seq.len() + 1 < n {
        return Vec::new();
    }
    let prefix = &seq[seq.len() + 1 - n..];
    seq.windows(n).filter(|g| &g[..n - 1] == prefix).map(|g| g[n - 1]).collect()
}

impl<B: Backend> Bert2Bert<B> {
    /// Generate a target for each source (token ids with [CLS] ... [SEP]): the best hypothesis.
    pub fn generate(&mut self, b: &B, sources: &[Vec<i32>], opts: &GenerateOptions) -> Result<Vec<Generated>> {
        let nbest = self.generate_nbest(b, sources, opts)?;
        Ok(nbest
            .into_iter()
            .map(|h| {
                h.into_iter().next().unwrap_or(Generated { tokens: Vec::new(), score: f64::NEG_INFINITY, ended: false })
            })
            .collect())
    }

    /// Every finished hypothesis of each source, best first.
    pub fn generate_nbest(
        &mut self,
        b: &B,
        sources: &[Vec<i32>],
        opts: &GenerateOptions,
    ) -> Result<Vec<Vec<Generated>>> {
        self.refresh_gemm_params(b)?;
        let (ec, dc) = (&self.config.encoder, &self.config.decoder);
        let k = opts.beams.max(1);
        if sources.is_empty() {
            return Ok(Vec::new());
        }
        let s = sources.iter().map(Vec::len).max().unwrap_or(1).max(1);
        let tmax = opts.max_len + 1;
        if s > ec.max_positions() || tmax > dc.max_positions() {
            return Err(Error::Other(format!(
                "source length {s} or max_len {} exceeds the position table",
                opts.max_len
            )));
        }
        let (eos, pad) = (self.config.eos_token_id, self.config.pad_token_id);
        let n = sources.len() * k;
        let (enc_out, enc_mask) = self.encode_for_beams(b, sources, s, k)?;
        let mut dec = self.decode_state(b, &enc_out, enc_mask, n, s, tmax)?;
        drop(enc_out);

        let mut beams = Beams::new(sources.len(), k);
        let mut current = vec![self.config.decoder_start_token_id; n];
        for t in 0..opts.max_len {
            let logits = self.decode_step(b, &mut dec, &current, t)?;
            let parents = self.step_beams(&logits, dc.vocab_size, k, t, eos, opts, &mut beams);
            if beams.done.iter().all(|&d| d) {
                break;
            }
            current = (0..n).map(|r| *beams.tokens[r].last().unwrap_or(&pad)).collect();
            if k > 1 {
                dec.follow_parents(b, &parents)?;
            }
        }
        Ok(beams.into_nbest(k, eos, opts))
    }

    /// The encoder over the `sources` padded to `s` tokens, run once per source, then its
    /// output `[rows, s, hidden]` and mask `[rows, s]` copied to each of the source's `k` beam
    /// rows (row `r` holds source `r / k`).
    fn encode_for_beams(&self, b: &B, sources: &[Vec<i32>], s: usize, k: usize) -> Result<(B::Buf, B::Buf)> {
        let ec = &self.config.encoder;
        let (p, view, c, bs) = (
            &super::weights_of::<B>(&self.params, &self.gemm_params, &self.fresh_grads),
            &self.view,
            ec.hidden_size,
            sources.len(),
        );
        let mut src_ids = vec![self.config.pad_token_id; bs * s];
        let mut mask = vec![0.0f32; bs * s];
        for (i, row) in sources.iter().enumerate() {
            src_ids[i * s..i * s + row.len()].copy_from_slice(row);
            mask[i * s..i * s + row.len()].fill(1.0);
        }
        let enc_ids = EmbIds::new(b, &src_ids, bs, s)?;
        let enc_mask = b.upload(&mask)?;
        let mut emb = EmbActs { norm: NormActs::new(b, bs * s, c)? };
        emb.forward(b, p, &view.encoder.embeddings, &enc_ids, c, (0.0, 0), ec.layer_norm_eps)?;
        let mut layers: Vec<EncoderLayer<B>> = Vec::with_capacity(ec.num_hidden_layers);
        for (l, lv) in view.encoder.layers.iter().enumerate() {
            let sh = attention_shape(ec, bs, s, s);
            let mut layer = EncoderLayer {
                attn: super::layers::AttnActs::new(b, &sh)?,
                ffn: FfnActs::new(b, bs * s, c, ec.intermediate_size)?,
            };
            let input = if l == 0 { &emb.norm.out } else { &layers[l - 1].ffn.norm.out };
            let eps = ec.layer_norm_eps;
            layer.attn.forward(b, p, &lv.self_attn, sh, r(b, input), r(b, input), r(b, &enc_mask), (0.0, 0), eps)?;
            layer.ffn.forward(b, p, lv, r(b, &layer.attn.norm.out), bs * s, (0.0, 0), eps)?;
            layers.push(layer);
        }
        let enc_out = layers.last().map(|e| &e.ffn.norm.out).unwrap_or(&emb.norm.out);
        let n = bs * k;
        let item_of_row: Vec<i32> = (0..n).map(|r| (r / k) as i32).collect();
        let item_ids = b.upload_ids(&item_of_row)?;
        let mut enc_n = b.activations(n * s * c)?;
        b.embedding_forward(&item_ids, r(b, enc_out), s * c, w(b, &mut enc_n), false)?;
        let mut mask_n = b.zeros(n * s)?;
        b.embedding_forward(&item_ids, r(b, &enc_mask), s, w(b, &mut mask_n), false)?;
        Ok((enc_n, mask_n))
    }

    /// Every buffer the decoder steps use, for `n` rows, sources of `s` tokens and `tmax`
    /// positions: each layer's cross-attention K/V (computed here, once, from `enc_out`), its
    /// empty self-attention cache, and the scratch of one step.
    fn decode_state(
        &self,
        b: &B,
        enc_out: &B::Buf,
        enc_mask: B::Buf,
        n: usize,
        s: usize,
        tmax: usize,
    ) -> Result<DecodeState<B>> {
        let (ec, dc, p) = (
            &self.config.encoder,
            &self.config.decoder,
            &super::weights_of::<B>(&self.params, &self.gemm_params, &self.fresh_grads),
        );
        let c = ec.hidden_size;
        let mut layers = Vec::with_capacity(dc.num_hidden_layers);
        for lv in &self.view.decoder.layers {
            let cv = lv.cross_attn.as_ref().expect("decoder layers have cross-attention");
            let (mut k_cross, mut v_cross) = (b.activations(n * s * c)?, b.activations(n * s * c)?);
            linear_forward(b, p, &cv.k, r(b, enc_out), n * s, &mut k_cross)?;
            linear_forward(b, p, &cv.v, r(b, enc_out), n * s, &mut v_cross)?;
            layers.push(LayerState {
                k_self: b.activations(n * tmax * c)?,
                v_self: b.activations(n * tmax * c)?,
                k_cross,
                v_cross,
                self_norm: NormActs::new(b, n, c)?,
                cross_norm: NormActs::new(b, n, c)?,
                ffn: FfnActs::new(b, n, c, dc.intermediate_size)?,
            });
        }
        Ok(DecodeState {
            layers,
            enc_mask,
            step: StepScratch {
                q: b.activations(n * c)?,
                k_new: b.activations(n * c)?,
                v_new: b.activations(n * c)?,
                ctx: b.activations(n * c)?,
                probs_self: b.zeros(b.attention_saved_len(&attention_shape(ec, n, 1, tmax)))?,
                probs_cross: b.zeros(b.attention_saved_len(&attention_shape(ec, n, 1, s)))?,
            },
            emb: EmbActs { norm: NormActs::new(b, n, c)? },
            head: HeadScratch {
                pre: b.activations(n * c)?,
                act: b.activations(n * c)?,
                norm: NormActs::new(b, n, c)?,
                logits: b.activations(n * dc.vocab_size)?,
            },
            spare: b.activations(n * tmax * c)?,
            rows: n,
            src_len: s,
            tmax,
        })
    }

    /// One decoder step for every row: `current` (one token per row) at position `t` through
    /// the decoder, its K/V appended to the caches; returns the logits `[rows, vocab]`.
    fn decode_step(&self, b: &B, dec: &mut DecodeState<B>, current: &[i32], t: usize) -> Result<Vec<f32>> {
        let (p, view, dc) = (
            &super::weights_of::<B>(&self.params, &self.gemm_params, &self.fresh_grads),
            &self.view,
            &self.config.decoder,
        );
        let (n, tmax) = (dec.rows, dec.tmax);
        let ids = EmbIds::<B> {
            tokens: b.upload_ids(current)?,
            positions: b.upload_ids(&vec![t as i32; n])?,
            types: b.upload_ids(&vec![0; n])?,
        };
        let c = self.config.encoder.hidden_size;
        dec.emb.forward(b, p, &view.decoder.embeddings, &ids, c, (0.0, 0), dc.layer_norm_eps)?;
        // Cache positions past `t` are not written yet.
        let self_mask: Vec<f32> = (0..n * tmax).map(|i| if i % tmax <= t { 1.0 } else { 0.0 }).collect();
        let self_mask = b.upload(&self_mask)?;
        for l in 0..dec.layers.len() {
            let (done_layers, rest) = dec.layers.split_at_mut(l);
            let x = done_layers.last().map(|st| &st.ffn.norm.out).unwrap_or(&dec.emb.norm.out);
            let masks = (&self_mask, &dec.enc_mask);
            self.decoder_layer_step(b, l, x, &mut rest[0], &mut dec.step, masks, (n, dec.src_len, tmax), t)?;
        }
        let hidden = dec.layers.last().map(|st| &st.ffn.norm.out).unwrap_or(&dec.emb.norm.out);
        self.lm_head_logits(b, hidden, n, &mut dec.head)?;
        Ok(b.download(r(b, &dec.head.logits))?)
    }

    /// Decoder layer `l` on its input `x` `[rows, hidden]` at position `t`: self-attention over
    /// the cache (after writing this position's K/V into it), cross-attention over the source,
    /// the feed-forward block. `masks` are the cache's and the source's; `dims` are
    /// (rows, source length, cache positions).
    #[allow(clippy::too_many_arguments)]
    fn decoder_layer_step(
        &self,
        b: &B,
        l: usize,
        x: &B::Buf,
        st: &mut LayerState<B>,
        sc: &mut StepScratch<B>,
        (self_mask, enc_mask): (&B::Buf, &B::Buf),
        (n, s, tmax): (usize, usize, usize),
        t: usize,
    ) -> Result<()> {
        let (p, ec, eps) = (
            &super::weights_of::<B>(&self.params, &self.gemm_params, &self.fresh_grads),
            &self.config.encoder,
            self.config.decoder.layer_norm_eps,
        );
        let c = ec.hidden_size;
        let lv = &self.view.decoder.layers[l];
        let cv = lv.cross_attn.as_ref().expect("decoder layers have cross-attention");
        linear_forward(b, p, &lv.self_attn.q, r(b, x), n, &mut sc.q)?;
        linear_forward(b, p, &lv.self_attn.k, r(b, x), n, &mut sc.k_new)?;
        linear_forward(b, p, &lv.self_attn.v, r(b, x), n, &mut sc.v_new)?;
        for row in 0..n {
            let at = (row * tmax + t) * c;
            b.copy(b.view(&sc.k_new, row * c..(row + 1) * c), b.view_mut(&mut st.k_self, at..at + c))?;
            b.copy(b.view(&sc.v_new, row * c..(row + 1) * c), b.view_mut(&mut st.v_self, at..at + c))?;
        }
        b.attention_forward(
            attention_shape(ec, n, 1, tmax),
            r(b, &sc.q),
            r(b, &st.k_self),
            r(b, &st.v_self),
            r(b, self_mask),
            w(b, &mut sc.probs_self),
            w(b, &mut sc.ctx),
        )?;
        linear_forward(b, p, &lv.self_attn.out, r(b, &sc.ctx), n, &mut st.self_norm.input)?;
        b.add_assign(w(b, &mut st.self_norm.input), r(b, x))?;
        st.self_norm.forward(b, p, &lv.self_attn.norm, eps)?;
        linear_forward(b, p, &cv.q, r(b, &st.self_norm.out), n, &mut sc.q)?;
        b.attention_forward(
            attention_shape(ec, n, 1, s),
            r(b, &sc.q),
            r(b, &st.k_cross),
            r(b, &st.v_cross),
            r(b, enc_mask),
            w(b, &mut sc.probs_cross),
            w(b, &mut sc.ctx),
        )?;
        linear_forward(b, p, &cv.out, r(b, &sc.ctx), n, &mut st.cross_norm.input)?;
        b.add_assign(w(b, &mut st.cross_norm.input), r(b, &st.self_norm.out))?;
        st.cross_norm.forward(b, p, &cv.norm, eps)?;
        st.ffn.forward(b, p, lv, r(b, &st.cross_norm.out), n, (0.0, 0), eps)?;
        Ok(())
    }

    /// The LM head on the decoder's last hidden states `[n, hidden]`: transform, GELU, norm,
    /// projection onto the decoder's word embeddings plus the output bias, into `head.logits`.
    fn lm_head_logits(&self, b: &B, hidden: &B::Buf, n: usize, head: &mut HeadScratch<B>) -> Result<()> {
        let (p, view, dc) = (
            &super::weights_of::<B>(&self.params, &self.gemm_params, &self.fresh_grads),
            &self.view,
            &self.config.decoder,
        );
        let (hv, c, v) = (&view.lm_head, self.config.encoder.hidden_size, dc.vocab_size);
        let HeadScratch { pre, act, norm, logits } = head;
        linear_forward(b, p, &hv.transform, r(b, hidden), n, pre)?;
        b.gelu_forward(r(b, pre), w(b, act))?;
        b.copy(r(b, act), w(b, &mut norm.input))?;
        norm.forward(b, p, &hv.norm, dc.layer_norm_eps)?;
        let word = view.decoder.embeddings.word.clone();
        b.gemm_bias(
            GemmShape::plain(n, v, c),
            b.view(&norm.out, 0..n * c),
            Operand::n(c),
            p.gemm(b, word),
            Operand::t(c),
            p.master(b, hv.bias.clone()),
            b.view_mut(logits, 0..n * v),
        )?;
        Ok(())
    }

    /// Advance every live item by one token; returns each new row's parent row.
    #[allow(clippy::too_many_arguments)]
    fn step_beams(
        &self,
        logits: &[f32],
        v: usize,
        k: usize,
        t: usize,
        eos: i32,
        opts: &GenerateOptions,
        beams: &mut Beams,
    ) -> Vec<i32> {
        let n = beams.scores.len();
        let mut parents: Vec<i32> = (0..n as i32).collect();
        let mut new_tokens = beams.tokens.clone();
        let mut new_scores = beams.scores.clone();
        for item in 0..beams.done.len() {
            if beams.done[item] {
                continue;
            }
            let mut cands: Vec<(f64, usize, i32)> = Vec::with_capacity(2 * k * k);
            for row in item * k..(item + 1) * k {
                if !beams.scores[row].is_finite() {
                    continue;
                }
                let mut lp = log_softmax(&logits[row * v..(row + 1) * v]);
                if t < opts.min_len {
                    lp[eos as usize] = f64::NEG_INFINITY;
                }
                for tok in banned_by_ngram(&beams.tokens[row], opts.no_repeat_ngram) {
                    lp[tok as usize] = f64::NEG_INFINITY;
                }
                let mut idx: Vec<usize> = (0..v).collect();
                let take = (2 * k).min(v);
                idx.select_nth_unstable_by(take - 1, |&a, &b| lp[b].total_cmp(&lp[a]));
                for &tok in &idx[..take] {
                    cands.push((beams.scores[row] + lp[tok], row, tok as i32));
                }
            }
            cands.sort_by(|a, b| b.0.total_cmp(&a.0));
            let mut next = 0;
            for (rank, &(score, row, tok)) in cands.iter().enumerate() {
                if !score.is_finite() {
                    break;
                }
                if tok == eos {
                    if rank < k {
                        let mut hyp = beams.tokens[row].clone();
                        hyp.push(tok);
                        let len = hyp.len();
                        beams.finished[item].push((score / opts.penalty(len), hyp));
                    }
                    continue;
                }
                if next < k {
                    let dst = item * k + next;
                    parents[dst] = row as i32;
                    let mut hyp = beams.tokens[row].clone();
                    hyp.push(tok);
                    new_tokens[dst] = hyp;
                    new_scores[dst] = score;
                    next += 1;
                }
                if next == k && rank + 1 >= k {
                    break;
                }
            }
            new_scores[item * k + next..(item + 1) * k].fill(f64::NEG_INFINITY);
            let fin = &beams.finished[item];
            let best_running = (item * k..(item + 1) * k).map(|r| new_scores[r]).fold(f64::NEG_INFINITY, f64::max);
            beams.done[item] = if k == 1 {
                !fin.is_empty()
            } else if fin.len() >= k {
                let worst = fin.iter().map(|f| f.0).fold(f64::INFINITY, f64::min);
                best_running / opts.penalty(t + 1) <= worst
            } else {
                !best_running.is_finite()
            };
        }
        beams.tokens = new_tokens;
        beams.scores = new_scores;
        parents
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ngram_bans_repeat_only_after_matching_prefix() {
        assert_eq!(banned_by_ngram(&[1, 2, 3, 1, 2], 3), vec![3]);
        assert_eq!(banned_by_ngram(&[1, 2, 3], 3), Vec::<i32>::new());
        assert_eq!(banned_by_ngram(&[5, 5], 2), vec![5]);
        assert!(banned_by_ngram(&[1], 3).is_empty());
    }

    #[test]
    fn penalties_follow_their_formulas() {
        let g = GenerateOptions { length_penalty: 0.6, penalty_kind: LengthPenaltyKind::Gnmt, ..Default::default() };
        assert!((g.penalty(7) - 2.0f64.powf(0.6)).abs() < 1e-6);
        let h = GenerateOptions { length_penalty: 2.0, penalty_kind: LengthPenaltyKind::Hf, ..Default::default() };
        assert_eq!(h.penalty(3), 9.0);
    }
}
