//! Residual + dropout + LayerNorm on the CPU: exactly the composition of the CPU's dropout,
//! add_assign and LayerNorm ops, so a model moved onto the fused op computes bitwise what the
//! three-op sequence computed (the HF parity tests pin the CPU's numbers).
//!
//! forward:  `sum = dropout(sum; p, seed) + skip` (in place), `out = LN(sum)`, mean/rstd saved.
//! backward: `d_sum = LN'(d_out)`, `d_skip (= or +=) d_sum`, `d_x = dropout(d_sum; p, seed)`
//!           (assigned), `dgamma += ...`, `dbeta += ...`.
//! The fusion pays on devices, where it saves launches and whole passes over `[rows, c]`; here
//! the passes stay separate, which keeps the CPU's numbers exactly what they were.

use super::{Cpu, check, dropout};
use crate::{DropoutOps, LayerNormOps, ResidualNormOps, ResidualOps, Result};

impl ResidualNormOps for Cpu {
    fn residual_norm_forward(
        &self,
        sum: &mut [f32],
        skip: &[f32],
        gamma: &[f32],
        beta: &[f32],
        eps: f32,
        p: f32,
        seed: u64,
        out: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
    ) -> Result<()> {
        let (c, rows) = (gamma.len(), mean.len());
        check(
            "residual_norm_forward",
            c > 0
                && beta.len() == c
                && sum.len() == rows * c
                && skip.len() == sum.len()
                && out.len() == sum.len()
                && rstd.len() == rows
                && (0.0..1.0).contains(&p),
            || {
                format!(
                    "sum {} skip {} out {} gamma {c} beta {} mean {rows} rstd {} p {p}",
                    sum.len(),
                    skip.len(),
                    out.len(),
                    beta.len(),
                    rstd.len()
                )
            },
        )?;
        self.dropout_forward(sum, p, seed)?;
        self.add_assign(sum, skip)?;
        self.layernorm_forward(sum, gamma, beta, eps, out, mean, rstd)
    }

    fn residual_norm_backward(
        &self,
        d_out: &[f32],
        sum: &[f32],
        gamma: &[f32],
        mean: &[f32],
        rstd: &[f32],
        p: f32,
        seed: u64,
        d_skip: &mut [f32],
        accumulate_skip: bool,
        d_x: &mut [f32],
        dgamma: &mut [f32],
        dbeta: &mut [f32],
    ) -> Result<()> {
        let (c, rows) = (gamma.len(), mean.len());
        check(
            "residual_norm_backward",
            c > 0
                && sum.len() == rows * c
                && d_out.len() == sum.len()
                && d_skip.len() == sum.len()
                && d_x.len() == sum.len()
                && rstd.len() == rows
                && dgamma.len() == c
                && dbeta.len() == c
                && (0.0..1.0).contains(&p),
            || {
                format!(
                    "sum {} d_out {} d_skip {} d_x {} gamma {c} rows {rows} p {p}",
                    sum.len(),
                    d_out.len(),
                    d_skip.len(),
                    d_x.len()
                )
            },
        )?;
        // d_x holds d_sum until the mask is applied, as the unfused sequence did in its scratch.
        self.layernorm_backward(d_out, sum, gamma, mean, rstd, d_x, false, dgamma, dbeta)?;
        if accumulate_skip {
            self.add_assign(d_skip, d_x)?;
        } else {
            d_skip.copy_from_slice(d_x);
        }
        dropout::apply(d_x, p, seed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::*;
    use crate::reference;

    struct Inputs {
        rows: usize,
        c: usize,
        x: Vec<f32>,
        skip: Vec<f32>,
        gamma: Vec<f32>,
        beta: Vec<f32>,
        d_out: Vec<f32>,
    }

    fn inputs(rows: usize, c: usize, tag: u64) -> Inputs {
        Inputs {
            rows,
            c,
            x: randn(rows * c, 1.5, tag),
            skip: randn(rows * c, 2.0, tag + 1).iter().map(|v| v + 3.0).collect(),
            gamma: randn(c, 0.3, tag + 2).iter().map(|v| v + 1.0).collect(),
            beta: randn(c, 0.3, tag + 3),
            d_out: randn(rows * c, 1.0, tag + 4),
        }
    }

    /// The fused forward, then backward with `d_skip` starting at `d_skip0` when accumulating.
    fn fused(i: &Inputs, p: f32, seed: u64, d_skip0: Option<&[f32]>) -> [Vec<f32>; 8] {
        let (rows, n) = (i.rows, i.rows * i.c);
        let mut sum = i.x.clone();
        let (mut out, mut mean, mut rstd) = (vec![f32::NAN; n], vec![f32::NAN; rows], vec![f32::NAN; rows]);
        Cpu.residual_norm_forward(&mut sum, &i.skip, &i.gamma, &i.beta, 1e-12, p, seed, &mut out, &mut mean, &mut rstd)
            .unwrap();
        let mut d_skip = d_skip0.map_or_else(|| vec![f32::NAN; n], <[f32]>::to_vec);
        let mut d_x = vec![f32::NAN; n];
        let (mut dg, mut db) = (vec![0.25; i.c], vec![-0.5; i.c]);
        let acc = d_skip0.is_some();
        Cpu.residual_norm_backward(
            &i.d_out,
            &sum,
            &i.gamma,
            &mean,
            &rstd,
            p,
            seed,
            &mut d_skip,
            acc,
            &mut d_x,
            &mut dg,
            &mut db,
        )
        .unwrap();
        [sum, out, mean, rstd, d_skip, d_x, dg, db]
    }

    #[test]
    fn matches_the_f64_reference_composition() {
        for (rows, c, p) in [(37, 129, 0.1), (37, 384, 0.0), (5, 20, 0.5)] {
            let i = inputs(rows, c, 70);
            let seed = seed_for(75);
            let d_skip0 = randn(rows * c, 1.0, 76);
            for acc in [false, true] {
                let [sum, out, mean, rstd, d_skip, d_x, dg, db] = fused(&i, p, seed, acc.then_some(&d_skip0[..]));
                // The same math in f64, op by op.
                let mut want_sum = i.x.clone();
                reference::dropout(&mut want_sum, p, seed);
                reference::add_assign(&mut want_sum, &i.skip);
                let (mut wo, mut wm, mut wr) = (vec![0.0; rows * c], vec![0.0; rows], vec![0.0; rows]);
                reference::layernorm_forward(&want_sum, &i.gamma, &i.beta, 1e-12, &mut wo, &mut wm, &mut wr);
                assert_close("sum", &sum, &want_sum, 1e-6);
                assert_close("out", &out, &wo, 1e-5);
                assert_close("mean", &mean, &wm, 1e-5);
                assert_close("rstd", &rstd, &wr, 1e-5);
                // Backward from the fp32 forward's own statistics, as the fused op runs.
                let mut d_sum = vec![0.0; rows * c];
                let (mut wdg, mut wdb) = (vec![0.25; c], vec![-0.5; c]);
                reference::layernorm_backward(
                    &i.d_out, &sum, &i.gamma, &mean, &rstd, &mut d_sum, false, &mut wdg, &mut wdb,
                );
                let mut want_skip = if acc { d_skip0.clone() } else { vec![0.0; rows * c] };
                reference::add_assign(&mut want_skip, &d_sum);
                let mut want_dx = d_sum.clone();
                reference::dropout(&mut want_dx, p, seed);
                assert_close("d_skip", &d_skip, &want_skip, 1e-5);
                assert_close("d_x", &d_x, &want_dx, 1e-5);
                assert_close("dgamma", &dg, &wdg, 1e-5);
                assert_close("dbeta", &db, &wdb, 1e-5);
                if p > 0.0 {
                    let dropped = d_x.iter().filter(|&&v| v == 0.0).count();
                    assert!(dropped > 0, "p {p}: no element of d_x was dropped");
                }
            }
        }
    }

    #[test]
    fn is_bitwise_the_unfused_sequence() {
        let (rows, c, p) = (37, 129, 0.1);
        let i = inputs(rows, c, 80);
        let seed = seed_for(85);
        let [sum, out, mean, rstd, d_skip, d_x, dg, db] = fused(&i, p, seed, None);
        // What model/src/net/layers.rs ran before the fused op existed.
        let mut s = i.x.clone();
        Cpu.dropout_forward(&mut s, p, seed).unwrap();
        Cpu.add_assign(&mut s, &i.skip).unwrap();
        let (mut o, mut m, mut r) = (vec![0.0; rows * c], vec![0.0; rows], vec![0.0; rows]);
        Cpu.layernorm_forward(&s, &i.gamma, &i.beta, 1e-12, &mut o, &mut m, &mut r).unwrap();
        let mut d_res = vec![0.0; rows * c];
        let (mut g, mut b) = (vec![0.25; c], vec![-0.5; c]);
        Cpu.layernorm_backward(&i.d_out, &s, &i.gamma, &m, &r, &mut d_res, false, &mut g, &mut b).unwrap();
        let skip = d_res.clone();
        Cpu.dropout_backward(&mut d_res, p, seed).unwrap();
        for (name, got, want) in [
            ("sum", &sum, &s),
            ("out", &out, &o),
            ("mean", &mean, &m),
            ("rstd", &rstd, &r),
            ("d_skip", &d_skip, &skip),
            ("d_x", &d_x, &d_res),
            ("dgamma", &dg, &g),
            ("dbeta", &db, &b),
        ] {
            assert!(got.iter().zip(want.iter()).all(|(a, b)| a.to_bits() == b.to_bits()), "{name} differs");
        }
    }

    #[test]
    fn bad_shapes_and_rates_are_typed_errors() {
        let i = inputs(3, 8, 90);
        let mut sum = i.x.clone();
        let (mut out, mut mean, mut rstd) = (vec![0.0; 24], vec![0.0; 3], vec![0.0; 3]);
        let short = &i.skip[..23];
        let e =
            Cpu.residual_norm_forward(&mut sum, short, &i.gamma, &i.beta, 1e-5, 0.1, 1, &mut out, &mut mean, &mut rstd);
        assert!(matches!(e, Err(crate::KernelError::Shape { op: "residual_norm_forward", .. })), "{e:?}");
        let e = Cpu
            .residual_norm_forward(&mut sum, &i.skip, &i.gamma, &i.beta, 1e-5, 1.0, 1, &mut out, &mut mean, &mut rstd);
        assert!(matches!(e, Err(crate::KernelError::Shape { .. })), "p = 1 accepted");
        let (mut ds, mut dx, mut dg, mut db) = (vec![0.0; 24], vec![0.0; 23], vec![0.0; 8], vec![0.0; 8]);
        let e = Cpu.residual_norm_backward(
            &i.d_out, &sum, &i.gamma, &mean, &rstd, 0.1, 1, &mut ds, false, &mut dx, &mut dg, &mut db,
        );
        assert!(matches!(e, Err(crate::KernelError::Shape { op: "residual_norm_backward", .. })), "{e:?}");
    }
}
