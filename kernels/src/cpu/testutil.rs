//! Helpers for op tests: fresh random inputs, f64 references and finite differences.

use crate::rng;

/// Fresh random values in roughly N(0, scale); the seed mixes in the wall clock so every run
/// draws new inputs, and it is printed so a failure can be replayed.
pub fn randn(n: usize, scale: f32, tag: u64) -> Vec<f32> {
    let seed = seed_for(tag);
    (0..n as u64).map(|i| rng::normal(seed, i) * scale).collect()
}

pub fn seed_for(tag: u64) -> u64 {
    let base = std::env::var("B2B_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    let seed = rng::derive(base, tag);
    eprintln!("test seed base={base} tag={tag}");
    seed
}

/// Max relative error `max|a-b| / max(max|b|, floor)`.
pub fn rel_err(a: &[f32], b: &[f32], floor: f32) -> f32 {
    assert_eq!(a.len(), b.len());
    let num = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    let den = b.iter().map(|y| y.abs()).fold(floor, f32::max);
    num / den
}

#[track_caller]
pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    let e = rel_err(got, want, 1e-6);
    assert!(e <= tol, "{what}: relative error {e:e} > {tol:e}");
    assert!(got.iter().all(|x| x.is_finite()), "{what}: non-finite output");
}

/// Central finite difference of a scalar function `f` with respect to every element of `x`.
pub fn numeric_grad(x: &[f32], eps: f32, mut f: impl FnMut(&[f32]) -> f64) -> Vec<f32> {
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            let orig = xp[i];
            xp[i] = orig + eps;
            let up = f(&xp);
            xp[i] = orig - eps;
            let down = f(&xp);
            xp[i] = orig;
            ((up - down) / (2.0 * eps as f64)) as f32
        })
        .collect()
}

/// `sum(a * w)` in f64: turns an op's output into a scalar loss with a random cotangent `w`.
pub fn dot(a: &[f32], w: &[f32]) -> f64 {
    a.iter().zip(w).map(|(&x, &y)| x as f64 * y as f64).sum()
}
