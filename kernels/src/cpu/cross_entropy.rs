//! Softmax cross-entropy fused with its gradient, on the CPU.
//!
//! logits `[rows, V]`, labels `[rows]`. For a row with label y (rows with IGNORE_INDEX give 0):
//! `lse = log sum_v exp(x_v)`, `loss = (1-ls) * (lse - x_y) + ls * (lse - mean_v x_v)`,
//! `dlogits = grad_scale * (softmax(x) - (1-ls) * onehot(y) - ls / V)` (assigned).

use rayon::prelude::*;

use super::{Cpu, check};
use crate::{CrossEntropyOps, IGNORE_INDEX, Result};

fn row_loss(x: &[f32], y: usize, ls: f32) -> (f32, f32, f32) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = x.iter().map(|&v| ((v - max) as f64).exp()).sum();
    let lse = max + sum.ln() as f32;
    let mean = (x.iter().map(|&v| v as f64).sum::<f64>() / x.len() as f64) as f32;
    let loss = (1.0 - ls) * (lse - x[y]) + ls * (lse - mean);
    (loss, max, (sum.ln()) as f32)
}

impl CrossEntropyOps for Cpu {
    fn cross_entropy(
        &self,
        logits: &[f32],
        labels: &Vec<i32>,
        vocab: usize,
        ls: f32,
        grad_scale: f32,
        losses: &mut [f32],
        dlogits: Option<&mut [f32]>,
    ) -> Result<()> {
        let rows = labels.len();
        check("cross_entropy", vocab > 0 && logits.len() == rows * vocab && losses.len() == rows, || {
            format!("logits {} labels {rows} vocab {vocab} losses {}", logits.len(), losses.len())
        })?;
        if let Some(bad) = labels.iter().find(|&&y| y != IGNORE_INDEX && (y < 0 || y as usize >= vocab)) {
            return check("cross_entropy", false, || format!("label {bad} outside vocab {vocab}"));
        }
        match dlogits {
            None => losses.par_iter_mut().enumerate().for_each(|(r, l)| {
                let y = labels[r];
                *l = if y == IGNORE_INDEX {
                    0.0
                } else {
                    row_loss(&logits[r * vocab..(r + 1) * vocab], y as usize, ls).0
                };
            }),
            Some(d) => {
                check("cross_entropy", d.len() == logits.len(), || {
                    format!("dlogits {} != logits {}", d.len(), logits.len())
                })?;
                d.par_chunks_mut(vocab).zip(losses.par_iter_mut()).enumerate().for_each(|(r, (dr, l))| {
                    let y = labels[r];
                    if y == IGNORE_INDEX {
                        *l = 0.0;
                        dr.fill(0.0);
                        return;
                    }
                    let x = &logits[r * vocab..(r + 1) * vocab];
                    let (loss, max, log_sum) = row_loss(x, y as usize, ls);
                    *l = loss;
                    let smooth = ls / vocab as f32;
                    for (v, g) in dr.iter_mut().enumerate() {
                        let p = (x[v] - max - log_sum).exp();
                        *g = grad_scale * (p - smooth);
                    }
                    dr[y as usize] -= grad_scale * (1.0 - ls);
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::*;

    fn total(logits: &[f32], labels: &Vec<i32>, vocab: usize, ls: f32) -> f64 {
        let mut l = vec![0.0; labels.len()];
        Cpu.cross_entropy(logits, labels, vocab, ls, 1.0, &mut l, None).unwrap();
        l.iter().map(|&v| v as f64).sum()
    }

    #[test]
    fn loss_matches_f64_reference_and_ignores_padding() {
        let (rows, vocab) = (9, 37);
        let x = randn(rows * vocab, 3.0, 71);
        let labels: Vec<i32> =
            (0..rows as i32).map(|r| if r % 4 == 3 { IGNORE_INDEX } else { (r * 7) % vocab as i32 }).collect();
        let mut l = vec![f32::NAN; rows];
        Cpu.cross_entropy(&x, &labels, vocab, 0.1, 1.0, &mut l, None).unwrap();
        let mut want = vec![f32::NAN; rows];
        crate::reference::cross_entropy(&x, &labels, vocab, 0.1, 1.0, &mut want, None);
        for r in 0..rows {
            assert!((l[r] - want[r]).abs() < 1e-5 * want[r].abs().max(1.0), "row {r}: {} vs {}", l[r], want[r]);
        }
        assert!(labels.iter().zip(&l).all(|(&y, &l)| y != IGNORE_INDEX || l == 0.0), "ignored rows lose 0");
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let (rows, vocab) = (4, 11);
        let x = randn(rows * vocab, 2.0, 72);
        let labels = vec![3, IGNORE_INDEX, 10, 0];
        for ls in [0.0, 0.2] {
            let mut l = vec![0.0; rows];
            let mut d = vec![f32::NAN; x.len()];
            Cpu.cross_entropy(&x, &labels, vocab, ls, 0.5, &mut l, Some(&mut d)).unwrap();
            let num: Vec<f32> =
                numeric_grad(&x, 1e-2, |xp| total(xp, &labels, vocab, ls)).iter().map(|g| g * 0.5).collect();
            assert_close(&format!("dlogits ls={ls}"), &d, &num, 2e-3);
        }
    }
}
