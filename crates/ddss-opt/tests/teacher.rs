//! Teacher matching: the teacher loss's gradient equals central finite differences (f64, tiny
//! UNet) for every distance and the hybrid with KID, and is the same in one pass, two passes,
//! feature chunks and on simulated ranks; a step's batch starts from its pairs' noise with the
//! stream's step noise and visits every pair once per epoch; a search with a teacher resumes
//! bit-identically and validates on the teacher distance; the pair cache reads back what it wrote
//! and recomputes corrupt or foreign entries.

mod common;
use common::*;

use ddss_opt::loss::{FeatureLoss, LossKind};
use ddss_opt::objective::{BatchNoise, Objective};
use ddss_opt::pair_cache::{self, CacheOutcome};
use ddss_opt::search::{run_search, ObjectiveParts, SearchObserver};
use ddss_opt::teacher::{Pairs, TeacherDistance, TeacherLoss, TeacherValidation};
use ddss_opt::unroll::Remat;
use ggdm_core::ggdm::{GgdmSampler, Learnable};
use ggdm_core::noise::{NoiseSource, SeededNoise};
use ggdm_core::PredictionType;
use tch::{Device, Kind, Tensor};

/// Every distance alone, and the L2 and feature distances with KID.
const LOSSES: [TeacherLoss; 6] = [
    TeacherLoss { distance: TeacherDistance::L2, kid_weight: 0.0 },
    TeacherLoss { distance: TeacherDistance::L1, kid_weight: 0.0 },
    TeacherLoss { distance: TeacherDistance::PseudoHuber, kid_weight: 0.0 },
    TeacherLoss { distance: TeacherDistance::Features, kid_weight: 0.0 },
    TeacherLoss { distance: TeacherDistance::L2, kid_weight: 0.5 },
    TeacherLoss { distance: TeacherDistance::Features, kid_weight: 2.0 },
];

fn zero_grads(s: &GgdmSampler) {
    for (_, t) in s.params.named() {
        let mut g = t.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
}

fn grads(s: &GgdmSampler) -> Vec<Tensor> {
    s.params.named().iter().map(|(_, t)| t.grad().copy()).collect()
}

/// The f64 objective of training step 0 (batch 6 from the teacher's 8 pairs).
fn teacher_objective<'s>(
    parts: &'s ObjectiveParts<'s>,
    s: &'s GgdmSampler,
    remat: Remat,
    micro_batch: usize,
    feature_chunk: Option<usize>,
) -> Objective<'s> {
    let teacher = parts.teacher.map(|t| t.training_batch(3, 0, 6));
    Objective { teacher, ..f64_objective(parts, s, remat, micro_batch, feature_chunk) }
}

/// `s` with every parameter moved off its initial value (seeded), so no timestep sits on an
/// integer, where the piecewise-linear `log abar(tau)` has a kink that finite differences straddle.
fn moved(s: GgdmSampler) -> GgdmSampler {
    tch::no_grad(|| {
        for (i, (_, t)) in s.params.named().into_iter().enumerate() {
            let delta = SeededNoise::new(60 + i as u64).next(&t.size(), Device::Cpu).expect("noise");
            let mut t = t.shallow_clone();
            let _ = t.g_add_(&(delta.to_kind(t.kind()) * 0.05));
        }
    });
    s
}

const NOISE: BatchNoise = BatchNoise { seed: 5, batch: 6 };

#[test]
fn teacher_loss_gradients_equal_central_finite_differences() {
    let model = tiny_unet(true, PredictionType::Epsilon);
    let features = Projection::new();
    let loss = FeatureLoss::new(LossKind::Kid, &real_features()).expect("loss");
    for teacher_loss in LOSSES {
        let teacher = tiny_teacher(teacher_loss, &features);
        let s = moved(tiny_sampler(Learnable::all()));
        let parts = ObjectiveParts { teacher: Some(&teacher), ..cpu_parts(&model, &features, &loss) };
        // Two micro-batches: the two-pass scheme where the loss has feature terms.
        let objective = || teacher_objective(&parts, &s, Remat::PerCall, 3, None);
        zero_grads(&s);
        let value = objective().loss_and_grad(NOISE).expect("objective").loss;
        assert!(value.is_finite() && value > 0.0, "{teacher_loss:?}: loss {value}");
        let analytic = grads(&s);
        // Entries of every parameter: grid logits, u and w residuals (with history terms), sigma, p, q.
        let probes: [(usize, &[i64]); 7] =
            [(0, &[0]), (0, &[2]), (1, &[2, 0]), (2, &[3, 1]), (3, &[1]), (4, &[2]), (5, &[0])];
        let h = 1e-6;
        for (param, index) in probes {
            let (name, t) = s.params.named()[param];
            let set = |v: f64| set_entry(t, index, v);
            let original = t.double_value(index);
            set(original + h);
            let plus = objective().loss_and_grad(NOISE).expect("objective").loss;
            set(original - h);
            let minus = objective().loss_and_grad(NOISE).expect("objective").loss;
            set(original);
            let fd = (plus - minus) / (2.0 * h);
            let exact = analytic[param].double_value(index);
            let rel = (fd - exact).abs() / exact.abs().max(1e-3);
            assert!(rel <= 1e-4, "{teacher_loss:?} {name}{index:?}: gradient {exact}, finite differences {fd}");
        }
        assert!(analytic[0].abs().sum(Kind::Double).double_value(&[]) > 0.0, "no gradient reached the grid");
    }
}

#[test]
fn teacher_gradients_are_the_same_in_one_pass_two_passes_and_feature_chunks() {
    let model = tiny_unet(true, PredictionType::Epsilon);
    let features = Projection::new();
    let loss = FeatureLoss::new(LossKind::Kid, &real_features()).expect("loss");
    for teacher_loss in LOSSES {
        let teacher = tiny_teacher(teacher_loss, &features);
        let s = tiny_sampler(Learnable::all());
        let parts = ObjectiveParts { teacher: Some(&teacher), ..cpu_parts(&model, &features, &loss) };
        let mut results = Vec::new();
        for (micro_batch, remat, feature_chunk) in [
            (6, Remat::Naive, None),
            (6, Remat::PerCall, None),
            (4, Remat::PerCall, None),
            (2, Remat::Budget { stored_steps: 2 }, None),
            (6, Remat::PerCall, Some(4)),
            (3, Remat::PerCall, Some(2)),
        ] {
            zero_grads(&s);
            let value = teacher_objective(&parts, &s, remat, micro_batch, feature_chunk)
                .loss_and_grad(NOISE)
                .expect("objective")
                .loss;
            results.push((value, grads(&s)));
        }
        let (v0, g0) = &results[0];
        for (value, g) in &results[1..] {
            assert!((value - v0).abs() <= 1e-9 * v0.abs(), "{teacher_loss:?}: loss {value} vs {v0}");
            for ((name, _), (a, b)) in s.params.named().iter().zip(g.iter().zip(g0)) {
                let scale = b.abs().max().double_value(&[]).max(1e-12);
                let diff = (a - b).abs().max().double_value(&[]) / scale;
                assert!(diff <= 1e-8, "{teacher_loss:?} {name}: relative difference {diff}");
            }
        }
    }
}

#[test]
fn the_pure_distance_loss_is_the_mean_distance_to_the_teacher_from_the_pairs_noise() {
    let model = tiny_unet(true, PredictionType::Epsilon);
    let features = Projection::new();
    let loss = FeatureLoss::new(LossKind::Kid, &real_features()).expect("loss");
    let teacher = tiny_teacher(LOSSES[0], &features);
    let s = tiny_sampler(Learnable::all());
    let parts = ObjectiveParts { teacher: Some(&teacher), ..cpu_parts(&model, &features, &loss) };
    let objective = teacher_objective(&parts, &s, Remat::PerCall, 6, None);
    let value = objective.loss_and_grad(NOISE).expect("objective").loss;
    // By hand: the batch's pair noise, the stream's step noise, the mean squared error per pixel.
    let batch = teacher.training_batch(3, 0, 6);
    let (_, z) = NOISE.draw_as(0, 6, [1, 8, 8], 4, Device::Cpu, Kind::Double).expect("noise");
    let x_init = batch.initial_noise(0, 6).to_kind(Kind::Double);
    let samples = tch::no_grad(|| s.sample(&model, &x_init, &z)).expect("sample");
    assert!(samples.allclose(&objective.generate(NOISE).expect("generate"), 1e-12, 1e-12, false));
    let by_hand = tch::no_grad(|| batch.pixel_sum(&samples, 0)).expect("a pixel distance").double_value(&[]) / 6.0;
    assert!((value - by_hand).abs() <= 1e-12 * by_hand, "{value} vs {by_hand}");
    // Without the teacher the first draw of each stream is the initial noise instead.
    let plain = f64_objective(&parts, &s, Remat::PerCall, 6, None).generate(NOISE).expect("generate");
    assert!(!plain.allclose(&samples, 1e-3, 1e-3, false));
}

#[test]
fn training_batches_visit_every_pair_once_per_epoch_in_a_seeded_order() {
    let features = Projection::new();
    let teacher = tiny_teacher(LOSSES[0], &features);
    let pairs = tiny_pairs(0, 8);
    // Which training pair each row of a batch is, found by its noise.
    let rows = |seed: u64, step: u64| -> Vec<usize> {
        let noise = teacher.training_batch(seed, step, 4).initial_noise(0, 4);
        (0..4)
            .map(|r| (0..8).find(|&i| noise.get(r).equal(&pairs.noise.get(i as i64))).expect("a training pair's noise"))
            .collect()
    };
    let mut epoch: Vec<usize> = [rows(3, 0), rows(3, 1)].concat();
    let order = epoch.clone();
    epoch.sort_unstable();
    assert_eq!(epoch, (0..8).collect::<Vec<_>>(), "an epoch of 8 pairs in two batches of 4");
    assert_eq!([rows(3, 0), rows(3, 1)].concat(), order, "the order is a function of the seed");
    assert_ne!([rows(3, 2), rows(3, 3)].concat(), order, "every epoch has its own order");
    assert_ne!([rows(4, 0), rows(4, 1)].concat(), order, "another seed, another order");
}

/// Stops a search after a given step, as an interruption would.
struct StopAt(u64);

impl SearchObserver for StopAt {
    fn should_stop(&mut self, step: u64) -> bool {
        step >= self.0
    }
}

/// Runs (or resumes) a 4-step search with an L2 + KID teacher loss in `dir`, stopping after
/// `stop_at` steps; the sampler and the metrics lines.
fn teacher_search(dir: &std::path::Path, stop_at: u64, resume: bool) -> (GgdmSampler, Vec<serde_json::Value>) {
    let model = tiny_unet(false, PredictionType::Epsilon);
    let features = Projection::new();
    let real = real_features();
    let loss = FeatureLoss::new(LossKind::Kid, &real).expect("loss");
    let teacher = tiny_teacher(LOSSES[4], &features);
    let mut s = tiny_sampler(Learnable::all());
    let parts = ObjectiveParts { teacher: Some(&teacher), ..cpu_parts(&model, &features, &loss) };
    let outcome = run_search(&mut s, parts, &settings(4, 2), &real, dir, resume, &mut StopAt(stop_at)).expect("search");
    assert_eq!(outcome.validation_metric.key(), "teacher_distance");
    let lines = std::fs::read_to_string(dir.join("metrics.jsonl"))
        .expect("metrics")
        .lines()
        .map(|l| serde_json::from_str(l).expect("metrics line"))
        .collect();
    (s, lines)
}

#[test]
fn a_resumed_teacher_search_equals_an_uninterrupted_one() {
    let base = std::env::temp_dir().join(format!("ddss-teacher-resume-{}", std::process::id()));
    let (a, b) = (base.join("a"), base.join("b"));
    std::fs::create_dir_all(&a).expect("dir");
    std::fs::create_dir_all(&b).expect("dir");
    let (straight, lines) = teacher_search(&a, 4, false);
    let _ = teacher_search(&b, 2, false);
    let (resumed, resumed_lines) = teacher_search(&b, 4, true);
    assert_eq!(straight.to_file().params, resumed.to_file().params, "best parameters differ after resuming");
    let loss_bits = |lines: &[serde_json::Value]| -> Vec<u64> {
        lines.iter().map(|l| l["loss"].as_f64().expect("loss").to_bits()).collect()
    };
    assert_eq!(loss_bits(&lines), loss_bits(&resumed_lines), "every step's loss is bit-identical");
    // Validation (every 2 steps) is on the teacher distance of the validation pairs, not on KID.
    for (i, line) in lines.iter().enumerate() {
        assert!(line.get("validation_kid").is_none(), "{line}");
        let validated = line.get("validation_teacher_distance").and_then(|v| v.as_f64());
        assert_eq!(validated.is_some(), i % 2 == 1, "{line}");
        assert!(validated.is_none_or(|v| v.is_finite() && v > 0.0), "{line}");
    }
    let initial = tiny_sampler(Learnable::all());
    assert!(!straight.params.grid_logits.equal(&initial.params.grid_logits), "the search must move the sampler");
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn a_teacher_validated_on_kid_chooses_by_validation_kid() {
    let dir = std::env::temp_dir().join(format!("ddss-teacher-validate-kid-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let model = tiny_unet(false, PredictionType::Epsilon);
    let features = Projection::new();
    let real = real_features();
    let loss = FeatureLoss::new(LossKind::Kid, &real).expect("loss");
    let teacher = tiny_teacher(LOSSES[4], &features).validated_on(TeacherValidation::Kid);
    assert_eq!(teacher.validation_metric(), TeacherValidation::Kid);
    let mut s = tiny_sampler(Learnable::all());
    let parts = ObjectiveParts { teacher: Some(&teacher), ..cpu_parts(&model, &features, &loss) };
    assert_eq!(parts.validation_metric().key(), "kid");
    let outcome = run_search(&mut s, parts, &settings(4, 2), &real, &dir, false, &mut StopAt(4)).expect("search");
    assert_eq!(outcome.validation_metric.key(), "kid");
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).expect("metrics");
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).expect("line")).collect();
    for (i, line) in lines.iter().enumerate() {
        assert!(line.get("validation_teacher_distance").is_none(), "{line}");
        let validated = line.get("validation_kid").and_then(|v| v.as_f64());
        assert_eq!(validated.is_some(), i % 2 == 1, "{line}");
    }
    // The training loss is still the hybrid teacher loss: the same first step as a search that
    // validates on the distance.
    let other = dir.join("distance");
    std::fs::create_dir_all(&other).expect("dir");
    let (_, distance_lines) = teacher_search(&other, 1, false);
    assert_eq!(lines[0]["loss"].as_f64().map(f64::to_bits), distance_lines[0]["loss"].as_f64().map(f64::to_bits));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The key of a test entry.
fn key(seed: u64) -> serde_json::Value {
    serde_json::json!({ "teacher": "test", "noise_seed": seed, "first": 0, "count": 3 })
}

#[test]
fn the_pair_cache_reads_back_what_it_wrote_and_recomputes_corrupt_or_foreign_entries() {
    let dir = std::env::temp_dir().join(format!("ddss-pair-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let calls = std::cell::Cell::new(0);
    let load = |key: &serde_json::Value| {
        pair_cache::load_or_compute(&dir, key, || {
            calls.set(calls.get() + 1);
            Ok(tiny_pairs(0, 3))
        })
        .expect("pairs")
    };
    let (computed, outcome) = load(&key(1));
    let path = pair_cache::entry_path(&dir, &key(1));
    assert_eq!(outcome, CacheOutcome::Computed(path.clone()));
    // Read back bit for bit, without computing.
    let (read, outcome) = load(&key(1));
    assert_eq!((outcome, calls.get()), (CacheOutcome::Read(path.clone()), 1));
    assert!(read.noise.equal(&computed.noise) && read.target.equal(&computed.target));
    // Another key is another entry.
    assert_ne!(pair_cache::entry_path(&dir, &key(2)), path);
    // Corrupt entries are recomputed (and rewritten), naming why.
    let bytes = std::fs::read(&path).expect("entry");
    let mut flipped = bytes.clone();
    let last = flipped.len() - 5;
    flipped[last] ^= 0x40;
    let foreign = {
        let mut other = tiny_pairs(0, 3);
        other.target = other.target.zeros_like();
        let other_path = dir.join("other.safetensors");
        pair_cache::write_entry(&other_path, &key(2), &other).expect("write");
        std::fs::read(other_path).expect("other entry")
    };
    for (what, content, reason) in [
        ("a flipped bit", flipped, "sha256"),
        ("a truncated file", bytes[..bytes.len() / 2].to_vec(), "safetensors"),
        ("garbage", b"not a cache entry".to_vec(), "safetensors"),
        ("another key's entry", foreign, "another key"),
    ] {
        std::fs::write(&path, &content).expect("corrupt");
        let before = calls.get();
        let (pairs, outcome) = load(&key(1));
        match outcome {
            CacheOutcome::Recomputed { path: p, reason: r } => {
                assert_eq!(p, path);
                assert!(r.contains(reason), "{what}: {r}");
            }
            other => panic!("{what}: {other:?}"),
        }
        assert_eq!(calls.get(), before + 1, "{what}: recomputed");
        assert!(pairs.target.equal(&computed.target), "{what}");
        assert_eq!(load(&key(1)).1, CacheOutcome::Read(path.clone()), "{what}: the entry is whole again");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn model_file_digests_are_remembered_and_follow_the_files() {
    let dir = std::env::temp_dir().join(format!("ddss-file-digests-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let (weights, config, memo) = (dir.join("weights.safetensors"), dir.join("config.json"), dir.join("memo.json"));
    std::fs::write(&weights, b"weights v1").expect("weights");
    std::fs::write(&config, b"{}").expect("config");
    let files = [weights.clone(), config.clone()];
    let first = pair_cache::files_sha256(&files, &memo).expect("digest");
    assert!(memo.is_file(), "the digests are remembered");
    assert_eq!(pair_cache::files_sha256(&files, &memo).expect("digest"), first);
    // A memo that cannot be read is rebuilt.
    std::fs::write(&memo, b"{ torn").expect("memo");
    assert_eq!(pair_cache::files_sha256(&files, &memo).expect("digest"), first);
    // New content (and so a new modification time) gives a new digest.
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(&weights, b"weights v2").expect("weights");
    let second = pair_cache::files_sha256(&files, &memo).expect("digest");
    assert_ne!(second, first);
    // The digest does not depend on where the files are, only on their names and content.
    let copy = dir.join("copy");
    std::fs::create_dir_all(&copy).expect("copy");
    std::fs::copy(&weights, copy.join("weights.safetensors")).expect("copy");
    std::fs::copy(&config, copy.join("config.json")).expect("copy");
    let copied = [copy.join("weights.safetensors"), copy.join("config.json")];
    assert_eq!(pair_cache::files_sha256(&copied, &memo).expect("digest"), second);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn pairs_of_unequal_shapes_are_refused_naming_them() {
    let noise = Tensor::zeros([2, 1, 8, 8], (Kind::Float, Device::Cpu));
    let err =
        Pairs::new(noise, Tensor::zeros([3, 1, 8, 8], (Kind::Float, Device::Cpu)), "the pairs").expect_err("shape");
    assert!(err.to_string().contains("the pairs"), "{err}");
}
