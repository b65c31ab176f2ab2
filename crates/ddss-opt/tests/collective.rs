//! Data parallelism without MPI: ranks simulated by threads that share a [`Collective`]. The
//! sharded objective gives every rank the single-process loss and gradient (with and without a
//! teacher), and a 2-rank search
//! learns the single-process sampler while rank 0 alone writes files.

mod common;
use common::*;

use ddss_opt::collective::{Collective, SingleProcess};
use ddss_opt::loss::{FeatureLoss, LossKind};
use ddss_opt::objective::{BatchNoise, Objective};
use ddss_opt::search::{run_search_with, NoObserver, ObjectiveParts};
use ddss_opt::teacher::{TeacherDistance, TeacherLoss};
use ddss_opt::unroll::Remat;
use ggdm_core::ggdm::Learnable;
use ggdm_core::PredictionType;
use ggdm_nets::unet::UNetDenoiser;
use std::sync::{Arc, Barrier, Mutex};
use tch::{Kind, Tensor};

/// Ranks as threads of one process: each collective is an exchange through shared slots.
struct Shared {
    barrier: Barrier,
    slots: Mutex<Vec<Vec<f64>>>,
}

struct ThreadRank {
    rank: usize,
    size: usize,
    shared: Arc<Shared>,
}

impl ThreadRank {
    fn group(size: usize) -> Vec<ThreadRank> {
        let shared = Arc::new(Shared { barrier: Barrier::new(size), slots: Mutex::new(vec![Vec::new(); size]) });
        (0..size).map(|rank| ThreadRank { rank, size, shared: shared.clone() }).collect()
    }

    /// Every rank's `data`, in rank order.
    fn exchange(&self, data: Vec<f64>) -> Vec<Vec<f64>> {
        self.shared.barrier.wait();
        self.shared.slots.lock().expect("slots")[self.rank] = data;
        self.shared.barrier.wait();
        let all = self.shared.slots.lock().expect("slots").clone();
        self.shared.barrier.wait();
        all
    }
}

impl Collective for ThreadRank {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_gather_f32(&self, local: &[f32]) -> ddss_opt::Result<Vec<f32>> {
        let all = self.exchange(local.iter().map(|&v| f64::from(v)).collect());
        Ok(all.into_iter().flatten().map(|v| v as f32).collect())
    }
    fn all_gather_f64(&self, local: &[f64]) -> ddss_opt::Result<Vec<f64>> {
        Ok(self.exchange(local.to_vec()).into_iter().flatten().collect())
    }
    fn all_reduce_sum_f64(&self, values: &mut [f64]) -> ddss_opt::Result<()> {
        let all = self.exchange(values.to_vec());
        for (i, v) in values.iter_mut().enumerate() {
            *v = all.iter().fold(0.0, |acc, r| acc + r[i]);
        }
        Ok(())
    }
    fn broadcast_bytes(&self, data: &mut Vec<u8>) -> ddss_opt::Result<()> {
        let all = self.exchange(data.iter().map(|&b| f64::from(b)).collect());
        *data = all[0].iter().map(|&v| v as u8).collect();
        Ok(())
    }
}

/// Model (f64 or f32 weights), features and real features, built identically on every rank.
fn parts(double: bool) -> (UNetDenoiser, Projection, Tensor) {
    (tiny_unet(double, PredictionType::Epsilon), Projection::with_output(true), real_features())
}

/// Loss and flattened gradient of one objective evaluation on `comm` (with `teacher`, on the
/// teacher's pairs of step 0).
fn loss_and_grad(comm: &dyn Collective, micro_batch: usize, teacher: Option<TeacherLoss>) -> (f64, Vec<f64>) {
    let (model, features, real) = parts(true);
    let loss = FeatureLoss::new(LossKind::Kid, &real).expect("loss");
    let s = tiny_sampler(Learnable::all());
    let teacher = teacher.map(|t| tiny_teacher(t, &features));
    let parts = ObjectiveParts { teacher: teacher.as_ref(), ..cpu_parts(&model, &features, &loss) };
    let objective = Objective {
        teacher: teacher.as_ref().map(|t| t.training_batch(3, 0, 10)),
        ..f64_objective(&parts, &s, Remat::PerCall, micro_batch, None)
    };
    let (evaluation, volume) =
        objective.loss_and_grad_sharded(BatchNoise { seed: 5, batch: 10 }, comm).expect("objective");
    if comm.size() > 1 {
        let uses_features = teacher.as_ref().is_none_or(|t| t.loss().kid_weight > 0.0);
        assert_eq!(volume.gathered, if uses_features { 10 * 12 * 8 } else { 0 }, "f64 features");
        let params: usize = s.trainable().iter().map(|t| t.numel()).sum();
        assert_eq!(volume.reduced, params as u64 * 8);
    }
    let grads = s
        .trainable()
        .iter()
        .flat_map(|t| Vec::<f64>::try_from(&t.grad().to_kind(Kind::Double).reshape([-1])).expect("grad"))
        .collect();
    (evaluation.loss, grads)
}

#[test]
fn sharded_gradient_equals_the_single_process_one_on_every_rank() {
    let teachers = [
        None,
        Some(TeacherLoss { distance: TeacherDistance::L2, kid_weight: 0.0 }),
        Some(TeacherLoss { distance: TeacherDistance::PseudoHuber, kid_weight: 0.5 }),
    ];
    for teacher in teachers {
        let (v0, g0) = loss_and_grad(&SingleProcess, 3, teacher);
        let scale = g0.iter().fold(0f64, |m, g| m.max(g.abs()));
        assert!(scale > 0.0);
        for size in [2, 3] {
            let results: Vec<(f64, Vec<f64>)> = std::thread::scope(|scope| {
                let handles: Vec<_> = ThreadRank::group(size)
                    .into_iter()
                    .map(|rank| scope.spawn(move || loss_and_grad(&rank, 3, teacher)))
                    .collect();
                handles.into_iter().map(|h| h.join().expect("rank")).collect()
            });
            for (rank, (value, grads)) in results.iter().enumerate() {
                assert!(
                    (value - v0).abs() <= 1e-9 * v0.abs(),
                    "{teacher:?}, {size} ranks, rank {rank}: loss {value} vs {v0}"
                );
                for (a, b) in grads.iter().zip(&g0) {
                    assert!(
                        (a - b).abs() <= 1e-8 * scale,
                        "{teacher:?}, {size} ranks, rank {rank}: gradient {a} vs {b}"
                    );
                }
                // Every rank holds bit-identical values, so every rank takes the same step.
                assert_eq!(value.to_bits(), results[0].0.to_bits());
                assert!(grads.iter().zip(&results[0].1).all(|(a, b)| a.to_bits() == b.to_bits()));
            }
        }
    }
}

/// A 3-step search on `comm` in `dir`; the learned parameters.
fn search(comm: &dyn Collective, dir: &std::path::Path) -> Vec<f64> {
    let (model, features, real) = parts(false);
    let loss = FeatureLoss::new(LossKind::Kid, &real).expect("loss");
    let mut s = tiny_sampler(Learnable::all());
    let parts = cpu_parts(&model, &features, &loss);
    run_search_with(&mut s, parts, &settings(3, 1), &real, dir, false, &mut NoObserver, comm).expect("search");
    s.params.named().iter().flat_map(|(_, t)| Vec::<f64>::try_from(&t.reshape([-1])).expect("params")).collect()
}

#[test]
fn two_rank_search_learns_the_single_process_sampler_and_only_rank_0_writes() {
    let base = std::env::temp_dir().join(format!("ddss-collective-{}", std::process::id()));
    let dirs: Vec<_> = ["one", "rank0", "rank1"].iter().map(|n| base.join(n)).collect();
    for d in &dirs {
        std::fs::create_dir_all(d).expect("dir");
    }
    let single = search(&SingleProcess, &dirs[0]);
    let ranks: Vec<Vec<f64>> = std::thread::scope(|scope| {
        let handles: Vec<_> = ThreadRank::group(2)
            .into_iter()
            .zip(&dirs[1..])
            .map(|(rank, dir)| scope.spawn(move || search(&rank, dir)))
            .collect();
        handles.into_iter().map(|h| h.join().expect("rank")).collect()
    });
    for params in &ranks {
        assert_eq!(params.len(), single.len());
        for (a, b) in params.iter().zip(&single) {
            assert!((a - b).abs() <= 1e-6, "{a} vs {b}");
        }
    }
    assert_eq!(ranks[0], ranks[1], "the ranks diverged");
    assert!(std::fs::read_dir(&dirs[2]).expect("rank 1 dir").next().is_none(), "rank 1 wrote files");
    let metrics = std::fs::read_to_string(dirs[1].join("metrics.jsonl")).expect("rank 0 metrics");
    assert_eq!(metrics.lines().count(), 3);
    assert!(metrics.lines().all(|l| l.contains("\"comm_bytes\":")), "{metrics}");
    let single_metrics = std::fs::read_to_string(dirs[0].join("metrics.jsonl")).expect("metrics");
    assert!(!single_metrics.contains("comm_bytes"));
    let _ = std::fs::remove_dir_all(&base);
}
