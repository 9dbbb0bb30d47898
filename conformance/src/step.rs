//! The model step: a whole tiny bert2bert (hidden 20, 4 heads, 2+2 layers) trained one step
//! from fixed weights and inputs. Against the CPU oracle both backends run the step: the
//! per-token loss, every gradient by name, the global gradient norm with clipping, the AdamW
//! update of the parameters and both moments (and the frozen pooler left alone), then the loss
//! of a second step from the updated weights. Against the f64 reference see `step_f64`.

use std::path::Path;

use kernels::{Backend, Cpu, IGNORE_INDEX, clip_grad_norm, rng};
use model::net::{Bert2Bert, Inputs, PassOptions};
use model::optim::{AdamWConfig, Optimizer};
use model::{BertConfig, ModelConfig, ParamTable};

use crate::{Check, Draw, Reference, Tolerances, errors};

/// AdamW runs in fp32 on every backend, from the same gradients.
pub(crate) const TOL_UPDATE: f64 = 1e-5;
pub(crate) const FAMILY: &str = "model";

pub(crate) fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

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

/// The tiny model's weights and one batch, as host data.
pub(crate) struct Fixture {
    pub cfg: ModelConfig,
    pub table: ParamTable,
    pub params: Vec<f32>,
    pub draw: Draw,
    pub seed: u64,
    /// (batch, source length, target length).
    pub dims: (usize, usize, usize),
    pub src: Vec<i32>,
    pub mask: Vec<f32>,
    pub dec: Vec<i32>,
    pub labels: Vec<i32>,
}

impl Fixture {
    pub fn new(seed: u64) -> Self {
        let cfg = tiny_config();
        let table = ParamTable::new(&cfg);
        let mut r = Draw::new(rng::derive(seed, 0x5e1f), kernels::Dtype::F32);
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
        Fixture { cfg, table, params, draw: r, seed, dims: (bs, s, t), src, mask, dec, labels }
    }

    pub fn shape(&self) -> String {
        let (bs, s, t) = self.dims;
        format!("batch {bs} src {s} tgt {t}")
    }

    /// The model on `b` from the fixture's weights, and the batch uploaded to `b`.
    pub fn open<B: Backend>(&self, b: &B) -> Result<(Bert2Bert<B>, Inputs<B>), String> {
        let net = Bert2Bert::new(b, self.cfg.clone(), self.table.clone(), &self.params).map_err(err)?;
        let (bs, s, t) = self.dims;
        let x = Inputs::new(b, bs, s, t, &self.src, &self.mask, &self.dec, &self.labels).map_err(err)?;
        Ok((net, x))
    }

    /// The first step's pass options: training (dropout on), label smoothing 0.1, backward
    /// scaled to the mean over the label tokens.
    pub fn pass_options(&self, tokens: usize) -> PassOptions {
        PassOptions {
            train: true,
            seed: rng::derive(self.seed, 7),
            label_smoothing: 0.1,
            grad_scale: Some(1.0 / tokens as f32),
        }
    }
}

/// One backend's side of the step.
struct Side<'a, B: Backend> {
    b: &'a B,
    net: Bert2Bert<B>,
    x: Inputs<B>,
}

impl<'a, B: Backend> Side<'a, B> {
    fn open(b: &'a B, fx: &Fixture) -> Result<Self, String> {
        let (net, x) = fx.open(b)?;
        Ok(Side { b, net, x })
    }
    fn pass(&mut self, opts: PassOptions) -> Result<Vec<f32>, String> {
        self.net.zero_grads(self.b).map_err(err)?;
        Ok(self.net.pass(self.b, &self.x, opts).map_err(err)?.token_loss)
    }
    fn whole(&self, buf: &B::Buf) -> Result<Vec<f32>, String> {
        self.b.download(self.b.view(buf, 0..self.net.table.storage_len)).map_err(err)
    }
}

pub(crate) fn model_step<B: Backend>(
    dev: &B,
    oracle: Reference,
    seed: u64,
    tols: Tolerances,
    out: &mut Vec<Check>,
) -> Result<(), String> {
    let fx = Fixture::new(seed);
    match oracle {
        Reference::F64 => crate::step_f64::model_step(dev, fx, tols, out),
        Reference::CpuFp32 => against_cpu(dev, &fx, tols, out),
    }
}

fn against_cpu<B: Backend>(dev: &B, fx: &Fixture, tols: Tolerances, out: &mut Vec<Check>) -> Result<(), String> {
    let mut cpu = Side::open(&Cpu, fx)?;
    let mut gpu = Side::open(dev, fx)?;
    let tokens = cpu.x.label_tokens();
    let opts = fx.pass_options(tokens);
    let (l_ref, l_dev) = (cpu.pass(opts)?, gpu.pass(opts)?);
    let shape = format!("{}, {tokens} tokens, ls 0.1", fx.shape());
    out.push(Check::compare(FAMILY, "loss (per token)".into(), shape, tols.loss, &l_ref, &l_dev, 0.0));
    compare_grads(&cpu, &gpu, fx, tols, out)?;

    // Global norm and clipping (to 1.0) on each side's own gradients.
    let n_ref = clip_grad_norm(&Cpu, &mut cpu.net.grads, 1.0).map_err(err)?;
    let n_dev = clip_grad_norm(dev, &mut gpu.net.grads, 1.0).map_err(err)?;
    out.push(Check::compare(
        FAMILY,
        "grad norm (clip 1.0)".into(),
        String::new(),
        tols.grad_norm,
        &[n_ref],
        &[n_dev],
        0.0,
    ));

    // AdamW over the whole table (no decay on biases and LayerNorm, the pooler skipped). Adam
    // turns gradient rounding noise into a full `lr`-sized step where a gradient is near zero,
    // so the oracle updates from the device's (clipped) gradients: the same inputs on both.
    cpu.net.grads = gpu.whole(&gpu.net.grads)?;
    let mut o_ref = Optimizer::new(&Cpu, &fx.table, AdamWConfig::default()).map_err(err)?;
    let mut o_dev = Optimizer::new(dev, &fx.table, AdamWConfig::default()).map_err(err)?;
    o_ref.update(&Cpu, &mut cpu.net.params, &cpu.net.grads, 1e-3).map_err(err)?;
    o_dev.update(dev, &mut gpu.net.params, &gpu.net.grads, 1e-3).map_err(err)?;
    let reference = [&cpu.net.params, &o_ref.m, &o_ref.v].map(|b| b.as_slice());
    let got = [gpu.whole(&gpu.net.params)?, gpu.whole(&o_dev.m)?, gpu.whole(&o_dev.v)?];
    update_checks(fx, reference, &got, out);

    // A second step from the updated weights (the workspace is reused): the loss again.
    let opts2 = PassOptions { seed: opts.seed ^ 1, ..opts };
    let (l_ref, l_dev) = (cpu.pass(opts2)?, gpu.pass(opts2)?);
    let op = "loss step 2 (per token)".into();
    out.push(Check::compare(FAMILY, op, "after the update".into(), tols.loss, &l_ref, &l_dev, 0.0));
    Ok(())
}

/// Every gradient by name. Attention key biases have a zero true gradient (rounding noise on
/// both sides): the denominator has a floor of `grad_floor` times the largest gradient
/// anywhere (1e-3 in fp32, 5e-2 with bf16 GEMMs).
fn compare_grads<B: Backend>(
    cpu: &Side<'_, Cpu>,
    gpu: &Side<'_, B>,
    fx: &Fixture,
    tols: Tolerances,
    out: &mut Vec<Check>,
) -> Result<(), String> {
    let g_ref = &cpu.net.grads;
    let g_dev = gpu.whole(&gpu.net.grads)?;
    let global = g_ref.iter().fold(0.0f64, |m, &g| m.max((g as f64).abs()));
    for en in fx.table.owned() {
        let rg = en.range();
        let tol = if en.frozen { 0.0 } else { tols.grad };
        let (r, x) = (&g_ref[rg.clone()], &g_dev[rg]);
        let op = format!("grad {}", en.name);
        out.push(Check::compare(FAMILY, op, format!("{:?}", en.shape), tol, r, x, tols.grad_floor * global));
    }
    Ok(())
}

/// The AdamW update (parameters, first and second moments over the whole table) against the
/// reference's, naming the worst tensor, and the frozen pooler left at its initial values.
pub(crate) fn update_checks(fx: &Fixture, reference: [&[f32]; 3], got: &[Vec<f32>; 3], out: &mut Vec<Check>) {
    let table = &fx.table;
    for ((what, r), d) in ["params", "adam m", "adam v"].into_iter().zip(reference).zip(got) {
        let worst = table
            .owned()
            .map(|en| (errors(&r[en.range()], &d[en.range()], 0.0).0, en.name.as_str()))
            .fold((0.0, ""), |a, b| if b.0 > a.0 { b } else { a });
        let mut c = Check::compare(FAMILY, format!("adamw {what}"), String::new(), TOL_UPDATE, r, d, 0.0);
        c.shape = if worst.0 > 0.0 { format!("worst {}", worst.1) } else { format!("{} values", table.storage_len) };
        out.push(c);
    }
    let params = &got[0];
    let frozen_ok = table.owned().filter(|en| en.frozen).all(|en| {
        let rg = en.range();
        params.get(rg.clone()).is_some_and(|p| p == &fx.params[rg])
    });
    out.push(Check {
        family: FAMILY,
        op: "adamw skips frozen".into(),
        shape: "encoder.pooler.*".into(),
        max_abs: 0.0,
        rel: if frozen_ok { 0.0 } else { f64::INFINITY },
        tol: 0.0,
        pass: frozen_ok,
        error: None,
    });
}
