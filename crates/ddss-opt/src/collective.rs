//! The few collective operations data-parallel search and sharded evaluation need, behind a small
//! trait so that the logic is the same (and testable) in one process and across many.
//!
//! [`SingleProcess`] is the default: one rank, every collective is the identity. `ddss-cli`
//! implements [`Collective`] over MPI behind its `mpi` feature. Work is split by global sample
//! index ([`shard`]), and sample `i` always draws the noise stream `(seed, i)`, so `N` ranks
//! compute exactly the samples one process would.

use crate::{Error, Result};

/// Collective communication among the ranks of one job. Every rank must call the same operations
/// in the same order.
pub trait Collective {
    /// This process's rank, `0 .. size()`.
    fn rank(&self) -> usize;

    /// Number of ranks.
    fn size(&self) -> usize;

    /// The concatenation, in rank order, of every rank's `local` (lengths may differ by rank),
    /// returned on every rank.
    fn all_gather_f32(&self, local: &[f32]) -> Result<Vec<f32>>;

    /// [`Self::all_gather_f32`] for f64 values (features of f64 exactness runs).
    fn all_gather_f64(&self, local: &[f64]) -> Result<Vec<f64>>;

    /// Replaces `values` by their element-wise sum over the ranks (same length on every rank).
    fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<()>;

    /// Replaces `data` on every rank by rank 0's (lengths may differ before the call).
    fn broadcast_bytes(&self, data: &mut Vec<u8>) -> Result<()>;

    /// Whether this rank writes files and prints results (rank 0).
    fn is_root(&self) -> bool {
        self.rank() == 0
    }
}

/// One process: rank 0 of 1.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }

    fn size(&self) -> usize {
        1
    }

    fn all_gather_f32(&self, local: &[f32]) -> Result<Vec<f32>> {
        Ok(local.to_vec())
    }

    fn all_gather_f64(&self, local: &[f64]) -> Result<Vec<f64>> {
        Ok(local.to_vec())
    }

    fn all_reduce_sum_f64(&self, _values: &mut [f64]) -> Result<()> {
        Ok(())
    }

    fn broadcast_bytes(&self, _data: &mut Vec<u8>) -> Result<()> {
        Ok(())
    }
}

/// The contiguous range of `total` items that rank `rank` of `size` takes: the first
/// `total % size` ranks take one more than the others.
pub fn shard(total: usize, rank: usize, size: usize) -> std::ops::Range<usize> {
    let size = size.max(1);
    let (base, extra) = (total / size, total % size);
    let start = rank * base + rank.min(extra);
    let len = base + usize::from(rank < extra);
    start..start + len
}

/// Fails unless each of `size` ranks gets at least one of `total` items of `what`.
pub fn check_shardable(what: &str, total: usize, size: usize) -> Result<()> {
    if total < size {
        return Err(Error::config(what, format!("{total} (fewer than the {size} ranks: every rank needs a sample)")));
    }
    Ok(())
}

/// Bytes moved by the collectives of one step, as counted by the sharded objective.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommVolume {
    /// Bytes of the all-gathered features (the whole gathered buffer: batch x feature dim x 4, or 8 for f64
    /// features).
    pub gathered: u64,
    /// Bytes of the all-reduced parameter gradients (parameter count x 8).
    pub reduced: u64,
}

impl CommVolume {
    /// Gathered + reduced.
    pub fn total(&self) -> u64 {
        self.gathered + self.reduced
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_range_in_order() {
        for total in 0..20 {
            for size in 1..6 {
                let mut next = 0;
                for rank in 0..size {
                    let r = shard(total, rank, size);
                    assert_eq!(r.start, next);
                    assert!(r.len() == total / size || r.len() == total / size + 1);
                    next = r.end;
                }
                assert_eq!(next, total);
            }
        }
    }

    #[test]
    fn single_process_collectives_are_identities() {
        let c = SingleProcess;
        assert_eq!(c.all_gather_f32(&[1.0, 2.0]).unwrap(), vec![1.0, 2.0]);
        let mut v = [3.0];
        c.all_reduce_sum_f64(&mut v).unwrap();
        assert_eq!(v, [3.0]);
        assert!(check_shardable("optim.batch_size", 1, 2).is_err());
    }
}
