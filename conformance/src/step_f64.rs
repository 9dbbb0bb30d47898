//! The model step against the independent reference ([`crate::Reference::F64`]), for a backend
//! with no other backend to compare with (the CPU itself):
//! - every gradient by name against central finite differences of the loss (summed in f64),
//!   at the largest-gradient entry of each tensor and one random entry;
//! - the per-token loss against the f64 cross-entropy of the model's own logits;
//! - the gradient norm, clipping and the AdamW update against `kernels::reference` on the
//!   host, from the backend's own gradients; the frozen pooler left alone;
//! - the second step's loss, again from its logits.

use kernels::{AdamW, Backend, IGNORE_INDEX, clip_grad_norm, reference};
use model::net::{Bert2Bert, Inputs, PassOptions};
use model::optim::{AdamWConfig, Optimizer};

use crate::step::{FAMILY, Fixture, err, update_checks};
use crate::{Check, Tolerances};

/// Finite-difference step: large enough that the loss's fp32 rounding (~1e-6 of ~4.6) divided
/// by it stays small, small enough that the O(step^2) truncation does too.
const STEP: f32 = 1e-2;

pub(crate) fn model_step<B: Backend>(
    dev: &B,
    mut fx: Fixture,
    tols: Tolerances,
    out: &mut Vec<Check>,
) -> Result<(), String> {
    let (mut net, x) = fx.open(dev)?;
    let tokens = x.label_tokens();
    let opts = fx.pass_options(tokens);
    net.zero_grads(dev).map_err(err)?;
    let loss = net.pass(dev, &x, opts).map_err(err)?;
    let shape = format!("{}, {tokens} tokens, ls 0.1, from its logits", fx.shape());
    out.push(loss_check(dev, &net, &fx, &loss.token_loss, "loss (per token)", shape, tols.loss)?);
    let n = fx.table.storage_len;
    let whole = |buf: &B::Buf| dev.download(dev.view(buf, 0..n)).map_err(err);
    let grads = whole(&net.grads)?;
    finite_differences(dev, &mut net, &x, opts, &grads, &mut fx, tols, out)?;

    let mut clipped = grads.clone();
    let n_ref = reference::clip_grad_norm(&mut clipped, 1.0) as f32;
    let n_dev = clip_grad_norm(dev, &mut net.grads, 1.0).map_err(err)?;
    out.push(Check::compare(FAMILY, "grad norm (clip 1.0)".into(), String::new(), tols.loss, &[n_ref], &[n_dev], 0.0));

    // The update from the backend's own clipped gradients (as against the CPU oracle: Adam
    // magnifies rounding noise in near-zero gradients to a full step).
    let g_dev = whole(&net.grads)?;
    let config = AdamWConfig::default();
    let (mut p, mut m, mut v) = (fx.params.clone(), vec![0.0f32; n], vec![0.0f32; n]);
    for en in fx.table.owned().filter(|en| !en.frozen) {
        let weight_decay = if en.no_decay { 0.0 } else { config.weight_decay };
        let (beta1, beta2, eps) = (config.beta1, config.beta2, config.eps);
        let h = AdamW { lr: 1e-3, beta1, beta2, eps, weight_decay, step: 1 };
        let r = en.range();
        reference::adamw(h, &mut p[r.clone()], &g_dev[r.clone()], &mut m[r.clone()], &mut v[r]);
    }
    let mut opt = Optimizer::new(dev, &fx.table, config).map_err(err)?;
    opt.update(dev, &mut net.params, &net.grads, 1e-3).map_err(err)?;
    let got = [whole(&net.params)?, whole(&opt.m)?, whole(&opt.v)?];
    update_checks(&fx, [&p, &m, &v], &got, out);

    let opts2 = PassOptions { seed: opts.seed ^ 1, ..opts };
    net.zero_grads(dev).map_err(err)?;
    let loss = net.pass(dev, &x, opts2).map_err(err)?;
    let shape = "after the update, from its logits".into();
    out.push(loss_check(dev, &net, &fx, &loss.token_loss, "loss step 2 (per token)", shape, tols.loss)?);
    Ok(())
}

/// The per-token losses of the last pass against the f64 cross-entropy (label smoothing 0.1)
/// of that pass's logits.
fn loss_check<B: Backend>(
    dev: &B,
    net: &Bert2Bert<B>,
    fx: &Fixture,
    token_loss: &[f32],
    op: &str,
    shape: String,
    tol: f64,
) -> Result<Check, String> {
    let labels: Vec<i32> = fx.labels.iter().copied().filter(|&y| y != IGNORE_INDEX).collect();
    let logits = net.last_logits(dev, labels.len()).map_err(err)?;
    let mut want = vec![0.0f32; labels.len()];
    reference::cross_entropy(&logits, &labels, fx.cfg.decoder.vocab_size, 0.1, 1.0, &mut want, None);
    Ok(Check::compare(FAMILY, op.into(), shape, tol, &want, token_loss, 0.0))
}

/// Each tensor's gradient (from `grads`, the backward of `opts`) at its largest entry and one
/// random entry, against `(L(p + h) - L(p - h)) / 2h` of the same pass run forward only, where
/// `L` is the f64 sum of the token losses times the pass's gradient scale. The denominator's
/// floor is `finite_diff_floor` times the largest gradient anywhere. Frozen tensors must have
/// an exactly zero gradient (and do not change the loss at all).
#[allow(clippy::too_many_arguments)]
fn finite_differences<B: Backend>(
    dev: &B,
    net: &mut Bert2Bert<B>,
    x: &Inputs<B>,
    opts: PassOptions,
    grads: &[f32],
    fx: &mut Fixture,
    tols: Tolerances,
    out: &mut Vec<Check>,
) -> Result<(), String> {
    let forward = PassOptions { grad_scale: None, ..opts };
    let scale = opts.grad_scale.unwrap_or(1.0) as f64;
    let loss_with = |net: &mut Bert2Bert<B>, i: usize, value: f32| -> Result<f64, String> {
        dev.fill(dev.view_mut(&mut net.params, i..i + 1), value).map_err(err)?;
        Ok(net.pass(dev, x, forward).map_err(err)?.sum() * scale)
    };
    let global = grads.iter().fold(0.0f64, |m, &g| m.max((g as f64).abs()));
    let entries: Vec<_> = fx.table.owned().cloned().collect();
    for en in entries {
        let rg = en.range();
        let largest = rg.clone().max_by(|&a, &b| grads[a].abs().total_cmp(&grads[b].abs())).unwrap_or(rg.start);
        let random = rg.start + (fx.draw.next() % rg.len().max(1) as u64) as usize;
        let at: Vec<usize> = if random == largest { vec![largest] } else { vec![largest, random] };
        let mut numeric = Vec::with_capacity(at.len());
        for &i in &at {
            let p0 = fx.params[i];
            let (up, down) = (p0 + STEP, p0 - STEP);
            let diff = loss_with(net, i, up)? - loss_with(net, i, down)?;
            dev.fill(dev.view_mut(&mut net.params, i..i + 1), p0).map_err(err)?;
            numeric.push((diff / (up as f64 - down as f64)) as f32);
        }
        let analytic: Vec<f32> = at.iter().map(|&i| grads[i]).collect();
        let tol = if en.frozen { 0.0 } else { tols.finite_diff };
        let shape = format!("{:?} at {} entries, finite differences", en.shape, at.len());
        let floor = tols.finite_diff_floor * global;
        out.push(Check::compare(FAMILY, format!("grad {}", en.name), shape, tol, &numeric, &analytic, floor));
    }
    Ok(())
}
