//! Embedding family on the CPU.
//!
//! forward:  `out[i, :] (= or +=) table[ids[i], :]`      ids `[n]`, table `[rows, dim]`, out `[n, dim]`
//! backward: `dtable[ids[i], :] += dout[i, :]`           (parameter gradient: accumulates)

use rayon::prelude::*;

use super::{Cpu, ROW_CHUNK, check};
use crate::{EmbeddingOps, Result};

fn check_ids(op: &'static str, ids: &[i32], rows: usize) -> Result<()> {
    match ids.iter().find(|&&id| id < 0 || id as usize >= rows) {
        Some(bad) => check(op, false, || format!("id {bad} outside table of {rows} rows")),
        None => Ok(()),
    }
}

impl EmbeddingOps for Cpu {
    fn embedding_forward(
        &self,
        ids: &Vec<i32>,
        table: &[f32],
        dim: usize,
        out: &mut [f32],
        accumulate: bool,
    ) -> Result<()> {
        check("embedding_forward", dim > 0 && out.len() == ids.len() * dim && table.len().is_multiple_of(dim), || {
            format!("out len {} != ids {} x dim {dim}", out.len(), ids.len())
        })?;
        check_ids("embedding_forward", ids, table.len() / dim)?;
        out.par_chunks_mut(dim * ROW_CHUNK).enumerate().for_each(|(c, rows)| {
            for (r, row) in rows.chunks_mut(dim).enumerate() {
                let id = ids[c * ROW_CHUNK + r] as usize;
                let src = &table[id * dim..(id + 1) * dim];
                if accumulate {
                    row.iter_mut().zip(src).for_each(|(o, s)| *o += s);
                } else {
                    row.copy_from_slice(src);
                }
            }
        });
        Ok(())
    }

    fn embedding_backward(&self, ids: &Vec<i32>, dout: &[f32], dim: usize, dtable: &mut [f32]) -> Result<()> {
        check(
            "embedding_backward",
            dim > 0 && dout.len() == ids.len() * dim && dtable.len().is_multiple_of(dim),
            || format!("dout len {} != ids {} x dim {dim}", dout.len(), ids.len()),
        )?;
        check_ids("embedding_backward", ids, dtable.len() / dim)?;
        // Split the embedding dimension across threads so no two threads touch the same
        // element; within a thread, rows are visited in id order of appearance (deterministic).
        let cols_per_task = dim.div_ceil(rayon::current_num_threads().max(1)).max(8);
        let mut col_blocks: Vec<(usize, usize)> =
            (0..dim).step_by(cols_per_task).map(|c| (c, (c + cols_per_task).min(dim))).collect();
        let table_ptr = SharedMut(dtable.as_mut_ptr());
        let len = dtable.len();
        col_blocks.par_iter_mut().for_each(|&mut (c0, c1)| {
            let p = &table_ptr;
            for (i, &id) in ids.iter().enumerate() {
                let base = id as usize * dim;
                for c in c0..c1 {
                    assert!(base + c < len);
                    // SAFETY: column block [c0, c1) is owned by this task alone; index checked above.
                    unsafe { *p.0.add(base + c) += dout[i * dim + c] };
                }
            }
        });
        Ok(())
    }
}

/// A raw pointer shared across rayon tasks that write disjoint elements.
struct SharedMut(*mut f32);
// SAFETY: only used by tasks that write disjoint index sets (see each use).
unsafe impl Sync for SharedMut {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::*;

    #[test]
    fn lookup_and_scatter_add_with_repeats() {
        let (rows, dim, n) = (23, 13, 41);
        let table = randn(rows * dim, 1.0, 11);
        let seed = seed_for(12);
        let ids: Vec<i32> = (0..n as u64).map(|i| (crate::rng::mix(seed, i) % rows as u64) as i32).collect();
        let mut out = randn(n * dim, 1.0, 13);
        let base = out.clone();
        Cpu.embedding_forward(&ids, &table, dim, &mut out, true).unwrap();
        for i in 0..n {
            for c in 0..dim {
                assert_eq!(out[i * dim + c], base[i * dim + c] + table[ids[i] as usize * dim + c]);
            }
        }
        let dout = randn(n * dim, 1.0, 14);
        let d0 = randn(rows * dim, 1.0, 15);
        let mut dt = d0.clone();
        Cpu.embedding_backward(&ids, &dout, dim, &mut dt).unwrap();
        let mut want = d0.clone();
        for i in 0..n {
            for c in 0..dim {
                want[ids[i] as usize * dim + c] += dout[i * dim + c];
            }
        }
        assert_close("scatter-add", &dt, &want, 1e-6);
    }

    #[test]
    fn out_of_range_id_is_an_error() {
        let mut out = vec![0.0; 4];
        assert!(Cpu.embedding_forward(&vec![0, 5], &[0.0; 10], 2, &mut out, false).is_err());
    }
}
