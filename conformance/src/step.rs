//! The model step: a whole tiny bert2bert (hidden 20, 4 heads, 2+2 layers) trained one step on
//! both backends from the same weights and inputs: the per-token loss, every gradient by name,
//! the global gradient norm with clipping, the AdamW update of the parameters and both moments
//! (and the frozen pooler left alone), then the loss of a second step from the updated weights.

use std::path::Path;

use kernels::{Backend, Cpu, IGNORE_INDEX, clip_grad_norm, rng};
use model::net::{Bert2Bert, Inputs, PassOptions};
use model::optim::{AdamWConfig, Optimizer};
use model::{BertConfig, ModelConfig, ParamTable};

use super::{Check, Draw, Tolerances, errors};

/// AdamW runs in fp32 on every backend, from the same gradients.
const TOL_UPDATE: f64 = 1e-5;

fn tiny_config() -> ModelConfig {
    let v = serde_json::json!({
        "vocab_size": 97, "hidden_size": 20, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 37, "max_position_embeddings": 32, "type_vocab_size": 2,
        "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1
    });
    let c = BertConfig::from_value(&v, Path::new("selftest")).expect("static config");
    ModelConfig {
        encoder: c.clone(),
        decoder: c,
        tie_encoder_decoder: false,
        decoder_start_token_id: 2,
        pad_token_id: 0,
        eos_token_id: 3,
    }
}

pub(super) fn model_step<B: Backend>(dev: &B, seed: u64, tols: Tolerances, out: &mut Vec<Check>) -> Result<(), String> {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let fam = "model";
    let cfg = tiny_config();
    let table = ParamTable::new(&cfg);
    let mut r = Draw { seed: rng::derive(seed, 0x5e1f), stream: 0 };
    let mut params = r.normal(table.storage_len, 0.3);
    for en in table.owned().filter(|en| en.name.ends_with("LayerNorm.weight")) {
        params[en.range()].iter_mut().for_each(|p| *p += 1.0);
    }
    // Three examples: full, source and target padding, more padding.
    let (bs, s, t) = (3, 11, 9);
    let (src_pad, tgt_pad) = ([0, 4, 7], [0, 3, 5]);
    let words = r.ids(bs * (s + 2 * t), 93);
    let word = |i: usize| 4 + words[i];
    let src: Vec<i32> = (0..bs * s).map(|i| if i % s + src_pad[i / s] >= s { 0 } else { word(i) }).collect();
    let mask: Vec<f32> = src.iter().map(|&x| if x == 0 { 0.0 } else { 1.0 }).collect();
    let real_t = |i: usize| i % t + tgt_pad[i / t] < t;
    let labels: Vec<i32> = (0..bs * t).map(|i| if real_t(i) { word(bs * s + i) } else { IGNORE_INDEX }).collect();
    let dec: Vec<i32> = (0..bs * t)
        .map(|i| {
            if i % t == 0 {
                2
            } else if real_t(i) {
                labels[i - 1]
            } else {
                0
            }
        })
        .collect();
    let shape = format!("batch {bs} src {s} tgt {t}");

    let cpu = Cpu;
    let mut ref_net = Bert2Bert::new(&cpu, cfg.clone(), table.clone(), &params).map_err(|x| e(&x))?;
    let mut dev_net = Bert2Bert::new(dev, cfg.clone(), table.clone(), &params).map_err(|x| e(&x))?;
    let x_ref = Inputs::new(&cpu, bs, s, t, &src, &mask, &dec, &labels).map_err(|x| e(&x))?;
    let x_dev = Inputs::new(dev, bs, s, t, &src, &mask, &dec, &labels).map_err(|x| e(&x))?;
    let tokens = x_ref.label_tokens();
    let opts = PassOptions {
        train: true,
        seed: rng::derive(seed, 7),
        label_smoothing: 0.1,
        grad_scale: Some(1.0 / tokens as f32),
    };
    ref_net.zero_grads(&cpu).map_err(|x| e(&x))?;
    dev_net.zero_grads(dev).map_err(|x| e(&x))?;
    let l_ref = ref_net.pass(&cpu, &x_ref, opts).map_err(|x| e(&x))?;
    let l_dev = dev_net.pass(dev, &x_dev, opts).map_err(|x| e(&x))?;
    out.push(Check::compare(
        fam,
        "loss (per token)".into(),
        format!("{shape}, {tokens} tokens, ls 0.1"),
        tols.loss,
        &l_ref.token_loss,
        &l_dev.token_loss,
        0.0,
    ));

    // Every gradient by name. Attention key biases have a zero true gradient (rounding noise on
    // both sides): the denominator has a floor of `grad_floor` times the largest gradient
    // anywhere (1e-3 in fp32, 5e-2 with bf16 GEMMs).
    let g_ref = ref_net.grads.clone();
    let g_dev = dev.download(dev.view(&dev_net.grads, 0..table.storage_len)).map_err(|x| e(&x))?;
    let global = g_ref.iter().fold(0.0f64, |m, &g| m.max((g as f64).abs()));
    for en in table.owned() {
        let rg = en.range();
        let shape = format!("{:?}", en.shape);
        let tol = if en.frozen { 0.0 } else { tols.grad };
        out.push(Check::compare(
            fam,
            format!("grad {}", en.name),
            shape,
            tol,
            &g_ref[rg.clone()],
            &g_dev[rg],
            tols.grad_floor * global,
        ));
    }

    // Global norm and clipping (to 1.0) on each side's own gradients.
    let n_ref = clip_grad_norm(&cpu, &mut ref_net.grads, 1.0).map_err(|x| e(&x))?;
    let n_dev = clip_grad_norm(dev, &mut dev_net.grads, 1.0).map_err(|x| e(&x))?;
    out.push(Check::compare(fam, "grad norm (clip 1.0)".into(), String::new(), tols.loss, &[n_ref], &[n_dev], 0.0));

    // AdamW over the whole table (no decay on biases and LayerNorm, the pooler skipped). Adam
    // turns gradient rounding noise into a full `lr`-sized step where a gradient is near zero,
    // so the oracle updates from the device's (clipped) gradients: the same inputs on both.
    ref_net.grads = dev.download(dev.view(&dev_net.grads, 0..table.storage_len)).map_err(|x| e(&x))?;
    let mut o_ref = Optimizer::new(&cpu, &table, AdamWConfig::default()).map_err(|x| e(&x))?;
    let mut o_dev = Optimizer::new(dev, &table, AdamWConfig::default()).map_err(|x| e(&x))?;
    o_ref.update(&cpu, &table, &mut ref_net.params, &ref_net.grads, 1e-3).map_err(|x| e(&x))?;
    o_dev.update(dev, &table, &mut dev_net.params, &dev_net.grads, 1e-3).map_err(|x| e(&x))?;
    let whole = |buf: &B::Buf| dev.download(dev.view(buf, 0..table.storage_len));
    for (what, r_buf, d_buf) in
        [("params", &ref_net.params, &dev_net.params), ("adam m", &o_ref.m, &o_dev.m), ("adam v", &o_ref.v, &o_dev.v)]
    {
        let d_host = whole(d_buf).map_err(|x| e(&x))?;
        // Name the worst tensor.
        let worst = table
            .owned()
            .map(|en| (errors(&r_buf[en.range()], &d_host[en.range()], 0.0).0, en.name.as_str()))
            .fold((0.0, ""), |a, b| if b.0 > a.0 { b } else { a });
        let mut c = Check::compare(fam, format!("adamw {what}"), String::new(), TOL_UPDATE, r_buf, &d_host, 0.0);
        c.shape = if worst.0 > 0.0 { format!("worst {}", worst.1) } else { format!("{} values", table.storage_len) };
        out.push(c);
    }
    // Untouched by AdamW: the frozen pooler.
    let frozen_ok = table.owned().filter(|en| en.frozen).all(|en| {
        let (rg, d_host) = (en.range(), whole(&dev_net.params).unwrap_or_default());
        d_host.get(rg.clone()).is_some_and(|p| p == &params[rg])
    });
    out.push(Check {
        family: fam,
        op: "adamw skips frozen".into(),
        shape: "encoder.pooler.*".into(),
        max_abs: 0.0,
        rel: if frozen_ok { 0.0 } else { f64::INFINITY },
        tol: 0.0,
        pass: frozen_ok,
        error: None,
    });

    // A second step from the updated weights (the workspace is reused): the loss again.
    let opts2 = PassOptions { seed: opts.seed ^ 1, ..opts };
    ref_net.zero_grads(&cpu).map_err(|x| e(&x))?;
    dev_net.zero_grads(dev).map_err(|x| e(&x))?;
    let l_ref = ref_net.pass(&cpu, &x_ref, opts2).map_err(|x| e(&x))?;
    let l_dev = dev_net.pass(dev, &x_dev, opts2).map_err(|x| e(&x))?;
    out.push(Check::compare(
        fam,
        "loss step 2 (per token)".into(),
        "after the update".into(),
        tols.loss,
        &l_ref.token_loss,
        &l_dev.token_loss,
        0.0,
    ));
    Ok(())
}
