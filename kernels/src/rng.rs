//! Counter-based random numbers: the value for (seed, index) is a pure function, so every
//! backend and every thread draws the same dropout mask without sharing state.
//!
//! The mixer is a SplitMix64-style finaliser over `seed * golden + index`; it needs only 64-bit
//! integer multiplies and shifts, which CUDA has, so `kernels/src/cuda` can reproduce it bit for bit.

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

#[inline]
pub fn mix(seed: u64, index: u64) -> u64 {
    let mut z = seed.wrapping_mul(GOLDEN).wrapping_add(index).wrapping_add(GOLDEN);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Uniform in [0, 1) with 24 bits, exactly representable in f32.
#[inline]
pub fn uniform(seed: u64, index: u64) -> f32 {
    (mix(seed, index) >> 40) as f32 * (1.0 / 16_777_216.0)
}

/// Standard normal by Box-Muller from two counter draws.
#[inline]
pub fn normal(seed: u64, index: u64) -> f32 {
    let u1 = ((mix(seed, 2 * index) >> 11) as f64 + 0.5) * (1.0 / 9_007_199_254_740_992.0);
    let u2 = (mix(seed, 2 * index + 1) >> 11) as f64 * (1.0 / 9_007_199_254_740_992.0);
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// Derive an independent stream seed for a named use (a layer, an op) from a parent seed.
#[inline]
pub fn derive(seed: u64, stream: u64) -> u64 {
    mix(seed ^ 0xD1B5_4A32_D192_ED03, stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_moments_and_determinism() {
        let n = 200_003u64;
        let s: f64 = (0..n).map(|i| uniform(7, i) as f64).sum();
        let mean = s / n as f64;
        assert!((mean - 0.5).abs() < 0.005, "mean {mean}");
        assert_eq!(uniform(7, 12345), uniform(7, 12345));
        assert_ne!(uniform(7, 12345), uniform(8, 12345));
    }

    #[test]
    fn normal_moments() {
        let n = 100_001u64;
        let xs: Vec<f64> = (0..n).map(|i| normal(3, i) as f64).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "var {var}");
    }
}
