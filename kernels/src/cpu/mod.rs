//! The CPU fp32 backend: the numerical oracle for every other backend.
//!
//! Parallel work goes through rayon; matrix products through the `gemm` crate.

mod adamw;
mod attention;
mod cross_entropy;
mod dropout;
mod embedding;
mod gelu;
mod layernorm;
mod matmul;
mod residual;
mod residual_norm;
#[cfg(test)]
pub(crate) mod testutil;

use std::ops::Range;

use crate::{KernelError, Memory, Result};

/// Rows handed to one rayon task in row-parallel ops: big enough to amortise scheduling.
pub(crate) const ROW_CHUNK: usize = 16;

#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

impl Cpu {
    pub fn new() -> Self {
        Cpu
    }
}

pub(crate) fn check(op: &'static str, ok: bool, what: impl FnOnce() -> String) -> Result<()> {
    if ok { Ok(()) } else { Err(KernelError::Shape { op, what: what() }) }
}

impl Memory for Cpu {
    type Buf = Vec<f32>;
    type Ref<'a> = &'a [f32];
    type Mut<'a> = &'a mut [f32];
    type Ids = Vec<i32>;

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }
    fn zeros(&self, n: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; n])
    }
    fn upload(&self, host: &[f32]) -> Result<Vec<f32>> {
        Ok(host.to_vec())
    }
    fn download(&self, view: &[f32]) -> Result<Vec<f32>> {
        Ok(view.to_vec())
    }
    fn upload_ids(&self, host: &[i32]) -> Result<Vec<i32>> {
        Ok(host.to_vec())
    }
    fn len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }
    fn view<'a>(&self, buf: &'a Vec<f32>, range: Range<usize>) -> &'a [f32] {
        &buf[range]
    }
    fn view_mut<'a>(&self, buf: &'a mut Vec<f32>, range: Range<usize>) -> &'a mut [f32] {
        &mut buf[range]
    }
    fn view_mut2<'a>(&self, buf: &'a mut Vec<f32>, a: Range<usize>, b: Range<usize>) -> (&'a mut [f32], &'a mut [f32]) {
        assert!(a.end <= b.start || b.end <= a.start, "view_mut2: {a:?} and {b:?} overlap");
        if a.end <= b.start {
            let (lo, hi) = buf.split_at_mut(b.start);
            (&mut lo[a], &mut hi[..b.end - b.start])
        } else {
            let (lo, hi) = buf.split_at_mut(a.start);
            (&mut hi[..a.end - a.start], &mut lo[b])
        }
    }
    fn as_ref<'a>(&self, m: &'a &mut [f32]) -> &'a [f32] {
        m
    }
    fn reborrow<'a>(&self, m: &'a mut &mut [f32]) -> &'a mut [f32] {
        m
    }
    fn fill(&self, dst: &mut [f32], value: f32) -> Result<()> {
        dst.fill(value);
        Ok(())
    }
    fn copy(&self, src: &[f32], dst: &mut [f32]) -> Result<()> {
        check("copy", src.len() == dst.len(), || format!("src {} dst {}", src.len(), dst.len()))?;
        dst.copy_from_slice(src);
        Ok(())
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}
