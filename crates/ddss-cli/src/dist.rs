//! Running under MPI: the communicator of the job, the GPU of each rank, and clean failure.
//!
//! With the `mpi` feature, a process started by `mpirun`/`mpiexec`/`srun` (recognised by the
//! launcher's environment) joins `MPI_COMM_WORLD`; `search` then splits each step's batch across
//! the ranks and `eval` splits its samples, and rank 0 alone writes files and prints results.
//! Without the feature, or outside a launcher, the job is one process ([`SingleProcess`]).
//! With `--device cuda` (or `auto` finding CUDA) each rank takes the GPU of its node-local rank.

use anyhow::Result;
use ddss_opt::collective::{Collective, SingleProcess};
use std::cell::RefCell;
use std::rc::Rc;
use tch::Device;

thread_local! {
    static WORLD: RefCell<Option<Rc<dyn Collective>>> = const { RefCell::new(None) };
}

/// Environment variables holding the world size, set by the common launchers (the last one by
/// `srun` in a job step).
const SIZE_VARS: [&str; 5] =
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS"];
/// Environment variables holding the rank.
const RANK_VARS: [&str; 5] = ["OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID", "MV2_COMM_WORLD_RANK"];
/// Environment variables holding the node-local rank.
const LOCAL_RANK_VARS: [&str; 4] =
    ["OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK"];

/// The world size the launcher announces (1 when not started by one).
pub fn launcher_size() -> usize {
    SIZE_VARS.iter().find_map(|v| std::env::var(v).ok()?.parse().ok()).unwrap_or(1)
}

/// The rank the launcher announces (0 when not started by one).
pub fn launcher_rank() -> usize {
    RANK_VARS.iter().find_map(|v| std::env::var(v).ok()?.parse().ok()).unwrap_or(0)
}

/// The node-local rank the launcher announces.
pub fn local_rank() -> Option<usize> {
    LOCAL_RANK_VARS.iter().find_map(|v| std::env::var(v).ok()?.parse().ok())
}

/// Keeps MPI initialised while alive (finalised on drop).
pub struct Guard {
    #[cfg(feature = "mpi")]
    _universe: Option<mpi::environment::Universe>,
}

/// Joins the job's communicator when started by an MPI launcher (with the `mpi` feature).
pub fn init() -> Result<Guard> {
    #[cfg(feature = "mpi")]
    {
        // A PMIx launcher (`srun --mpi=pmix`, Open MPI 5) may announce only the rank.
        if launcher_size() > 1 || std::env::var_os("PMIX_RANK").is_some() {
            let Some(universe) = mpi::initialize() else {
                anyhow::bail!("MPI could not be initialised (MPI_Init failed or was already called)");
            };
            let comm: Rc<dyn Collective> = Rc::new(mpi_comm::MpiComm { world: universe.world() });
            WORLD.with(|w| *w.borrow_mut() = Some(comm));
            return Ok(Guard { _universe: Some(universe) });
        }
        Ok(Guard { _universe: None })
    }
    #[cfg(not(feature = "mpi"))]
    {
        let size = launcher_size();
        if size > 1 {
            anyhow::bail!(
                "started as one of {size} MPI ranks, but this ddss-cli was built without MPI support: every \
                 rank would run the whole job and write the same files. Build it with `cargo build --release \
                 -p ddss-cli --features mpi` (MPI development files needed: `cargo xtask setup --mpi`), or run \
                 it without mpirun"
            );
        }
        Ok(Guard {})
    }
}

/// The job's communicator ([`SingleProcess`] unless [`init`] joined MPI).
pub fn world() -> Rc<dyn Collective> {
    WORLD.with(|w| w.borrow().clone()).unwrap_or_else(|| Rc::new(SingleProcess))
}

/// Ends every rank of a multi-rank job after a failure on this one (the others may be waiting in
/// a collective); does nothing in a single process.
pub fn abort_if_parallel(code: i32) {
    #[cfg(feature = "mpi")]
    {
        if world().size() > 1 {
            use mpi::topology::Communicator;
            mpi::topology::SimpleCommunicator::world().abort(code);
        }
    }
    let _ = code;
}

/// The device of this rank: `device` itself in one process or on the CPU; with CUDA in a
/// multi-rank job, the GPU `local rank % GPU count` (unless `cuda:N` with `N > 0` was asked for).
pub fn rank_device(device: Device, comm: &dyn Collective) -> Device {
    match device {
        Device::Cuda(0) if comm.size() > 1 => {
            let count = tch::Cuda::device_count().max(1) as usize;
            let local = local_rank().unwrap_or(comm.rank());
            Device::Cuda(local % count)
        }
        other => other,
    }
}

/// `" (N ranks)"` in a multi-rank job, for log lines.
pub fn ranks_note(comm: &dyn Collective) -> String {
    if comm.size() > 1 {
        format!(" ({} ranks)", comm.size())
    } else {
        String::new()
    }
}

#[cfg(feature = "mpi")]
mod mpi_comm {
    //! [`Collective`] over an MPI communicator.

    use ddss_opt::collective::Collective;
    use ddss_opt::{Error, Result};
    use mpi::datatype::PartitionMut;
    use mpi::topology::{Communicator, SimpleCommunicator};
    use mpi::traits::{CommunicatorCollectives, Root};
    use mpi::Count;

    pub(super) struct MpiComm {
        pub(super) world: SimpleCommunicator,
    }

    fn count(n: usize) -> Result<Count> {
        Count::try_from(n).map_err(|_| Error::config("MPI message", format!("{n} values (more than MPI counts hold)")))
    }

    impl MpiComm {
        fn counts(&self, local: usize) -> Result<(Vec<Count>, Vec<Count>, usize)> {
            let mut counts = vec![0 as Count; self.size()];
            self.world.all_gather_into(&count(local)?, &mut counts[..]);
            let mut displs = Vec::with_capacity(counts.len());
            let mut total = 0usize;
            for &c in &counts {
                displs.push(count(total)?);
                total += c as usize;
            }
            Ok((counts, displs, total))
        }
    }

    impl Collective for MpiComm {
        fn rank(&self) -> usize {
            self.world.rank() as usize
        }

        fn size(&self) -> usize {
            self.world.size() as usize
        }

        fn all_gather_f32(&self, local: &[f32]) -> Result<Vec<f32>> {
            let (counts, displs, total) = self.counts(local.len())?;
            let mut out = vec![0f32; total];
            let mut partition = PartitionMut::new(&mut out[..], counts, displs);
            self.world.all_gather_varcount_into(local, &mut partition);
            Ok(out)
        }

        fn all_gather_f64(&self, local: &[f64]) -> Result<Vec<f64>> {
            let (counts, displs, total) = self.counts(local.len())?;
            let mut out = vec![0f64; total];
            let mut partition = PartitionMut::new(&mut out[..], counts, displs);
            self.world.all_gather_varcount_into(local, &mut partition);
            Ok(out)
        }

        /// Gathers every rank's values and sums them in rank order, so that the sum is the same
        /// bit for bit on every rank.
        fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<()> {
            let size = self.size();
            let mut all = vec![0f64; values.len() * size];
            self.world.all_gather_into(&values[..], &mut all[..]);
            let n = values.len();
            for (i, v) in values.iter_mut().enumerate() {
                *v = (0..size).fold(0.0, |acc, r| acc + all[r * n + i]);
            }
            Ok(())
        }

        fn broadcast_bytes(&self, data: &mut Vec<u8>) -> Result<()> {
            let root = self.world.process_at_rank(0);
            let mut len = data.len() as u64;
            root.broadcast_into(&mut len);
            data.resize(len as usize, 0);
            root.broadcast_into(&mut data[..]);
            Ok(())
        }
    }
}
