//! Inverted dropout on the CPU with a counter-based mask.
//!
//! Element `i` is kept iff `rng::uniform(seed, i) >= p`, then scaled by `1/(1-p)`. The mask is
//! a pure function of (seed, i), so backward recomputes it instead of storing it, and the CUDA
//! kernel draws the same mask for the same seed.

use rayon::prelude::*;

use super::{Cpu, check};
use crate::{DropoutOps, Result, rng};

const CHUNK: usize = 1 << 14;

pub(crate) fn apply(x: &mut [f32], p: f32, seed: u64) {
    if p <= 0.0 {
        return;
    }
    let keep_scale = 1.0 / (1.0 - p);
    x.par_chunks_mut(CHUNK).enumerate().for_each(|(c, xs)| {
        let base = (c * CHUNK) as u64;
        for (i, v) in xs.iter_mut().enumerate() {
            *v = if rng::uniform(seed, base + i as u64) >= p { *v * keep_scale } else { 0.0 };
        }
    });
}

impl DropoutOps for Cpu {
    fn dropout_forward(&self, x: &mut [f32], p: f32, seed: u64) -> Result<()> {
        check("dropout_forward", (0.0..1.0).contains(&p), || format!("p = {p} outside [0, 1)"))?;
        apply(x, p, seed);
        Ok(())
    }
    fn dropout_backward(&self, dx: &mut [f32], p: f32, seed: u64) -> Result<()> {
        check("dropout_backward", (0.0..1.0).contains(&p), || format!("p = {p} outside [0, 1)"))?;
        apply(dx, p, seed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::*;

    #[test]
    fn mask_rate_scale_and_replay() {
        let n = 100_003;
        let x: Vec<f32> = randn(n, 1.0, 51).iter().map(|v| v.abs() + 0.1).collect();
        let seed = seed_for(52);
        let mut y = x.clone();
        Cpu.dropout_forward(&mut y, 0.3, seed).unwrap();
        let dropped = y.iter().filter(|&&v| v == 0.0).count() as f64 / n as f64;
        assert!((dropped - 0.3).abs() < 0.01, "drop rate {dropped}");
        for (a, b) in y.iter().zip(&x) {
            assert!(*a == 0.0 || (a - b / 0.7).abs() <= 1e-6 * a.abs());
        }
        // Backward with the same seed zeroes exactly the same elements.
        let mut g = vec![1.0f32; n];
        Cpu.dropout_backward(&mut g, 0.3, seed).unwrap();
        assert!(g.iter().zip(&y).all(|(g, y)| (*g == 0.0) == (*y == 0.0)));
        let mut z = x.clone();
        Cpu.dropout_forward(&mut z, 0.3, seed ^ 1).unwrap();
        assert_ne!(z, y, "another seed must give another mask");
    }
}
