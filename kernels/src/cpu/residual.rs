//! Residual add and scaling on the CPU.
//!
//! `add`: `out = a + b`; its backward hands `dout` to both inputs, which callers express with
//! `add_assign` (`dst += src`). `scale`: `x *= s` (gradient clipping, loss scaling).

use rayon::prelude::*;

use super::{Cpu, check};
use crate::{ResidualOps, Result};

const CHUNK: usize = 1 << 14;

impl ResidualOps for Cpu {
    fn add(&self, a: &[f32], b: &[f32], out: &mut [f32]) -> Result<()> {
        check("add", a.len() == b.len() && out.len() == a.len(), || {
            format!("a {} b {} out {}", a.len(), b.len(), out.len())
        })?;
        out.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK))).for_each(|(o, (x, y))| {
            o.iter_mut().zip(x.iter().zip(y)).for_each(|(o, (x, y))| *o = x + y);
        });
        Ok(())
    }
    fn add_assign(&self, dst: &mut [f32], src: &[f32]) -> Result<()> {
        check("add_assign", dst.len() == src.len(), || format!("dst {} src {}", dst.len(), src.len()))?;
        dst.par_chunks_mut(CHUNK)
            .zip(src.par_chunks(CHUNK))
            .for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(d, s)| *d += s));
        Ok(())
    }
    fn scale(&self, x: &mut [f32], s: f32) -> Result<()> {
        x.par_chunks_mut(CHUNK).for_each(|c| c.iter_mut().for_each(|v| *v *= s));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::*;

    #[test]
    fn add_add_assign_scale() {
        let n = 40_001;
        let a = randn(n, 1.0, 41);
        let b = randn(n, 1.0, 42);
        let mut out = vec![f32::NAN; n];
        Cpu.add(&a, &b, &mut out).unwrap();
        let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
        assert_close("add", &out, &want, 0.0);
        Cpu.add_assign(&mut out, &a).unwrap();
        let want2: Vec<f32> = want.iter().zip(&a).map(|(x, y)| x + y).collect();
        assert_close("add_assign", &out, &want2, 0.0);
        Cpu.scale(&mut out, -0.25).unwrap();
        let want3: Vec<f32> = want2.iter().map(|x| x * -0.25).collect();
        assert_close("scale", &out, &want3, 0.0);
        assert!(Cpu.add(&a, &b[1..], &mut out).is_err());
    }
}
