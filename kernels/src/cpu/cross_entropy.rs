//! Softmax cross-entropy fused with its gradient, on the CPU.
//!
//! logits `[rows, V]`, labels `[rows]`. For a row with label y (rows with IGNORE_INDEX give 0):
//! `lse = log sum_v exp(x_v)`, `loss = (1-ls) * (lse - x_y) + ls * (lse - mean_v x_v)`,
//! `dlogits = grad_scale * (softmax(x) - (1-ls) * onehot(y) - ls / V)`, written over the logits.

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
        logits: &mut [f32],
        labels: &Vec<i32>,
        first_label: usize,
        vocab: usize,
        ls: f32,
        grad_scale: Option<f32>,
        losses: &mut [f32],
    ) -> Result<()> {
        let rows = losses.len();
        let in_range = first_label.checked_add(rows).is_some_and(|end| end <= labels.len());
        check("cross_entropy", vocab > 0 && logits.len() == rows * vocab && in_range, || {
            format!("logits {} labels {} from {first_label}, vocab {vocab}, losses {rows}", logits.len(), labels.len())
        })?;
        let labels = &labels[first_label..first_label + rows];
        if let Some(bad) = labels.iter().find(|&&y| y != IGNORE_INDEX && (y < 0 || y as usize >= vocab)) {
            return check("cross_entropy", false, || format!("label {bad} outside vocab {vocab}"));
        }
        logits.par_chunks_mut(vocab).zip(losses.par_iter_mut()).zip(labels.par_iter()).for_each(|((x, l), &y)| {
            if y == IGNORE_INDEX {
                *l = 0.0;
                if grad_scale.is_some() {
                    x.fill(0.0);
                }
                return;
            }
            let (loss, max, log_sum) = row_loss(x, y as usize, ls);
            *l = loss;
            if let Some(scale) = grad_scale {
                // Each gradient element reads only its own logit, so it can overwrite it.
                let smooth = ls / vocab as f32;
                for g in x.iter_mut() {
                    let p = (*g - max - log_sum).exp();
                    *g = scale * (p - smooth);
                }
                x[y as usize] -= scale * (1.0 - ls);
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::*;

    fn total(logits: &[f32], labels: &Vec<i32>, vocab: usize, ls: f32) -> f64 {
        let mut l = vec![0.0; labels.len()];
        Cpu.cross_entropy(&mut logits.to_vec(), labels, 0, vocab, ls, None, &mut l).unwrap();
        l.iter().map(|&v| v as f64).sum()
    }

    #[test]
    fn loss_matches_f64_reference_and_ignores_padding() {
        let (rows, vocab) = (9, 37);
        let x = randn(rows * vocab, 3.0, 71);
        let labels: Vec<i32> =
            (0..rows as i32).map(|r| if r % 4 == 3 { IGNORE_INDEX } else { (r * 7) % vocab as i32 }).collect();
        let mut l = vec![f32::NAN; rows];
        let mut kept = x.clone();
        Cpu.cross_entropy(&mut kept, &labels, 0, vocab, 0.1, None, &mut l).unwrap();
        assert!(kept == x, "without a gradient the logits stay");
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
            let mut d = x.clone();
            Cpu.cross_entropy(&mut d, &labels, 0, vocab, ls, Some(0.5), &mut l).unwrap();
            let num: Vec<f32> =
                numeric_grad(&x, 1e-2, |xp| total(xp, &labels, vocab, ls)).iter().map(|g| g * 0.5).collect();
            assert_close(&format!("dlogits ls={ls}"), &d, &num, 2e-3);
        }
    }

    #[test]
    fn rows_take_labels_from_first_label_on() {
        let (rows, vocab) = (3, 13);
        let x = randn(rows * vocab, 2.0, 73);
        let labels = vec![IGNORE_INDEX, 99, 4, IGNORE_INDEX, 12, 0];
        let mut whole = vec![0.0; rows];
        Cpu.cross_entropy(&mut x.clone(), &labels[2..5].to_vec(), 0, vocab, 0.1, None, &mut whole).unwrap();
        let mut offset = vec![f32::NAN; rows];
        Cpu.cross_entropy(&mut x.clone(), &labels, 2, vocab, 0.1, None, &mut offset).unwrap();
        assert_eq!(whole, offset);
        assert_eq!(offset[1], 0.0, "row 1 is labelled IGNORE_INDEX");
        let bad = Cpu.cross_entropy(&mut x.clone(), &labels, 1, vocab, 0.1, None, &mut offset);
        assert!(bad.is_err(), "label 99 is outside the vocabulary");
        let past = Cpu.cross_entropy(&mut x.clone(), &labels, 4, vocab, 0.1, None, &mut offset);
        assert!(past.is_err(), "rows 4.. run past the labels");
    }
}
