//! The DDSS objective: the two-pass micro-batched gradient equals the single-pass one; GGDM at
//! initialisation gives exactly the DDIM loss; a search with every part frozen changes nothing;
//! a resumed search ends bit-identical to an uninterrupted one.

mod common;
use common::*;

use ddss_opt::loss::{FeatureLoss, LossKind};
use ddss_opt::objective::BatchNoise;
use ddss_opt::search::{run_search, NoObserver, SearchSettings};
use ddss_opt::unroll::Remat;
use fid_metrics::features::FeatureExtractor;
use ggdm_core::ggdm::{GgdmSampler, Learnable};
use ggdm_core::noise::ListNoise;
use ggdm_core::samplers::{ddim, grid_steps, DdimOptions};
use ggdm_core::PredictionType;
use ggdm_nets::unet::UNetDenoiser;
use tch::{Device, Kind, Tensor};

fn grads(s: &GgdmSampler) -> Vec<Tensor> {
    s.params.named().iter().map(|(_, t)| t.grad().copy()).collect()
}

fn zero(s: &GgdmSampler) {
    for (_, t) in s.params.named() {
        let mut g = t.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
}

#[test]
fn two_pass_and_chunked_gradients_equal_single_pass() {
    let model = tiny_unet(true, PredictionType::Epsilon);
    let features = Projection::new();
    for kind in [LossKind::Kid, LossKind::MmdRbf { bandwidth: None }, LossKind::Moments] {
        let loss = FeatureLoss::new(kind, &real_features()).expect("loss");
        let s = tiny_sampler(Learnable::all());
        let noise = BatchNoise { seed: 5, batch: 10 };
        let mut results = Vec::new();
        // (micro-batch, remat, feature chunk): single pass, two passes, and the feature network's
        // backward in chunks in either.
        for (micro_batch, remat, feature_chunk) in [
            (10, Remat::Naive, None),
            (10, Remat::PerCall, None),
            (3, Remat::PerCall, None),
            (4, Remat::Budget { stored_steps: 2 }, None),
            (10, Remat::PerCall, Some(3)),
            (10, Remat::Naive, Some(4)),
            (4, Remat::PerCall, Some(3)),
        ] {
            zero(&s);
            let parts = cpu_parts(&model, &features, &loss);
            let objective = f64_objective(&parts, &s, remat, micro_batch, feature_chunk);
            let value = objective.loss_and_grad(noise).expect("objective").loss;
            results.push((value, grads(&s)));
        }
        let (v0, g0) = &results[0];
        for (value, g) in &results[1..] {
            assert!((value - v0).abs() <= 1e-9 * v0.abs().max(1e-12), "{kind:?}: loss {value} vs {v0}");
            for ((name, _), (a, b)) in s.params.named().iter().zip(g.iter().zip(g0)) {
                let scale = b.abs().max().double_value(&[]).max(1e-12);
                let diff = (a - b).abs().max().double_value(&[]) / scale;
                assert!(diff <= 1e-8, "{kind:?} {name}: relative difference {diff}");
            }
        }
        assert!(g0[0].abs().sum(Kind::Double).double_value(&[]) > 0.0, "no gradient reached the grid");
    }
}

#[test]
fn ggdm_at_init_gives_the_ddim_loss() {
    let model = tiny_unet(true, PredictionType::Epsilon);
    let features = Projection::new();
    let loss = FeatureLoss::new(LossKind::Kid, &real_features()).expect("loss");
    let s = tiny_sampler(Learnable::all());
    let noise = BatchNoise { seed: 11, batch: 8 };
    let parts = cpu_parts(&model, &features, &loss);
    let objective = f64_objective(&parts, &s, Remat::PerCall, 8, None);
    let ggdm_loss = objective.loss_and_grad(noise).expect("objective").loss;
    let (x_init, z) = noise.draw_as(0, 8, [1, 8, 8], 4, Device::Cpu, Kind::Double).expect("noise");
    let grid = [999.0, 749.0, 499.0, 249.0];
    let options = DdimOptions { eta: 0.3, clip: None, use_clipped_model_output: false };
    let samples = tch::no_grad(|| {
        ddim(
            &model,
            &scheduler().schedule().expect("schedule"),
            &grid_steps(&grid),
            &x_init,
            &options,
            &mut ListNoise::new(z),
            &mut |_| {},
        )
    })
    .expect("ddim");
    let ddim_loss =
        tch::no_grad(|| loss.value(&features.features(&samples).expect("features"))).expect("loss").double_value(&[]);
    assert!((ggdm_loss - ddim_loss).abs() <= 1e-6 * ddim_loss.abs().max(1e-9), "GGDM {ggdm_loss} vs DDIM {ddim_loss}");
}

/// Stops a search after a given step, as an interruption would.
struct StopAt(u64);

impl ddss_opt::search::SearchObserver for StopAt {
    fn should_stop(&mut self, step: u64) -> bool {
        step >= self.0
    }
}

/// Runs (or resumes) a 4-step search in `dir`, stopping after `stop_at` steps.
fn search(dir: &std::path::Path, learn: Learnable, stop_at: u64, resume: bool) -> GgdmSampler {
    search_with(dir, learn, &settings(4, 2), stop_at, resume)
}

/// Runs (or resumes) a search with `settings` in `dir`, stopping after `stop_at` steps.
fn search_with(
    dir: &std::path::Path,
    learn: Learnable,
    settings: &SearchSettings,
    stop_at: u64,
    resume: bool,
) -> GgdmSampler {
    let model = tiny_unet(false, PredictionType::Epsilon);
    let features = Projection::new();
    let real = real_features();
    let loss = FeatureLoss::new(LossKind::Kid, &real).expect("loss");
    let mut s = tiny_sampler(learn);
    let parts = cpu_parts(&model, &features, &loss);
    run_search(&mut s, parts, settings, &real, dir, resume, &mut StopAt(stop_at)).expect("search");
    s
}

/// The current (not best) parameters in a run directory's checkpoint.
fn checkpoint_params(dir: &std::path::Path) -> Vec<(String, Tensor)> {
    let mut named: Vec<(String, Tensor)> = Tensor::read_safetensors(dir.join("checkpoint.safetensors"))
        .expect("checkpoint")
        .into_iter()
        .filter(|(n, _)| n.starts_with("params.") || n.starts_with("best.") || n.starts_with("adam."))
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

#[test]
fn frozen_search_changes_nothing() {
    let dir = std::env::temp_dir().join(format!("ddss-frozen-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let before = tiny_sampler(Learnable::none()).to_file();
    let after = search(&dir, Learnable::none(), 4, false).to_file();
    assert_eq!(before.params, after.params);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A fresh temporary folder for `tag` (removed by the caller) holding two run folders.
fn two_run_dirs(tag: &str, first: &str, second: &str) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let base = std::env::temp_dir().join(format!("ddss-{tag}-{}", std::process::id()));
    let (a, b) = (base.join(first), base.join(second));
    std::fs::create_dir_all(&a).expect("dir");
    std::fs::create_dir_all(&b).expect("dir");
    (base, a, b)
}

#[test]
fn resumed_search_equals_uninterrupted() {
    let (base, a, b) = two_run_dirs("resume", "a", "b");
    let straight = search(&a, Learnable::all(), 4, false).to_file();
    // Stopped after step 2 (checkpoint_every = 2), then resumed to the end.
    let _ = search(&b, Learnable::all(), 2, false);
    let resumed = search(&b, Learnable::all(), 4, true).to_file();
    assert_eq!(straight.params, resumed.params, "best parameters differ after resuming");
    let (ca, cb) = (checkpoint_params(&a), checkpoint_params(&b));
    assert_eq!(ca.len(), cb.len());
    for ((na, ta), (nb, tb)) in ca.iter().zip(&cb) {
        assert_eq!(na, nb);
        assert!(ta.equal(tb), "{na} differs between the resumed and the uninterrupted run");
    }
    // The search did move the sampler (its current parameters, whatever the best one was).
    let initial = tiny_sampler(Learnable::all());
    let logits = ca.iter().find(|(n, _)| n == "params.grid_logits").expect("logits");
    assert!(!logits.1.equal(&initial.params.grid_logits.detach()), "the search must move the grid");
    let lines = std::fs::read_to_string(b.join("metrics.jsonl")).expect("metrics").lines().count();
    assert_eq!(lines, 4);
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn memory_budget_search_learns_the_per_call_sampler_and_logs_its_stored_calls() {
    let (base, a, b) = two_run_dirs("memory-budget", "per-call", "budget");
    let per_call = search_with(&a, Learnable::all(), &settings(3, 1), 3, false);
    let everything = SearchSettings { remat: Remat::MemoryBudget { mib: 1 << 20 }, ..settings(3, 1) };
    let budget = search_with(&b, Learnable::all(), &everything, 3, false);
    for ((name, x), (_, y)) in per_call.params.named().iter().zip(budget.params.named().iter()) {
        let d = (*x - *y).abs().max().double_value(&[]);
        assert!(d <= 1e-6, "{name}: the memory-budget search differs from the per-call one by {d}");
    }
    let lines = |dir: &std::path::Path| std::fs::read_to_string(dir.join("metrics.jsonl")).expect("metrics");
    let logged = lines(&b);
    assert_eq!(logged.lines().count(), 3);
    // A budget of 1 TiB stores every one of the K = 4 calls.
    assert!(logged.lines().all(|l| l.contains("\"stored_calls\":4")), "{logged}");
    assert!(!lines(&a).contains("stored_calls"));
    let _ = std::fs::remove_dir_all(&base);
}

/// A feature network that returns NaN on chosen calls (to inject numerical faults).
struct Faulty {
    inner: Projection,
    calls: std::cell::Cell<usize>,
    nan_calls: Vec<usize>,
}

impl FeatureExtractor for Faulty {
    fn features(&self, x: &Tensor) -> fid_metrics::Result<Tensor> {
        let call = self.calls.get();
        self.calls.set(call + 1);
        let f = self.inner.features(x)?;
        Ok(if self.nan_calls.contains(&call) { f * f64::NAN } else { f })
    }
    fn dim(&self) -> usize {
        12
    }
    fn name(&self) -> &str {
        "faulty"
    }
    fn device(&self) -> Device {
        Device::Cpu
    }
}

fn faulty_search(dir: &std::path::Path, nan_calls: Vec<usize>, steps: u64) -> (GgdmSampler, ddss_opt::Result<()>) {
    let model = tiny_unet(false, PredictionType::Epsilon);
    let features = Faulty { inner: Projection::new(), calls: std::cell::Cell::new(0), nan_calls };
    let real = real_features();
    let loss = FeatureLoss::new(LossKind::Kid, &real).expect("loss");
    let mut s = tiny_sampler(Learnable::all());
    let parts = cpu_parts(&model, &features, &loss);
    let cfg = SearchSettings { steps, validate_every: 0, micro_batch: None, ..settings(steps, 2) };
    let result = run_search(&mut s, parts, &cfg, &real, dir, false, &mut NoObserver).map(|_| ());
    (s, result)
}

#[test]
fn nan_steps_are_rejected_logged_and_eventually_stop_the_run() {
    let base = std::env::temp_dir().join(format!("ddss-nan-{}", std::process::id()));
    let (a, b) = (base.join("a"), base.join("b"));
    std::fs::create_dir_all(&a).expect("dir");
    std::fs::create_dir_all(&b).expect("dir");
    // Call 0 is the initial validation; calls 1.. are the training steps (one call each, no
    // micro-batching). A fault at step 2 is rejected and logged, and the run goes on.
    let (s, result) = faulty_search(&a, vec![2], 3);
    result.expect("one fault is survivable");
    let lines: Vec<String> =
        std::fs::read_to_string(a.join("metrics.jsonl")).expect("metrics").lines().map(String::from).collect();
    assert_eq!(lines.len(), 3);
    assert!(lines[1].contains("rejected: non-finite loss"), "{}", lines[1]);
    assert!(s.params.named().iter().all(|(_, t)| t.isfinite().all().int64_value(&[]) != 0));
    // Faults on every step: after max_faults + 1 consecutive rejections the run stops with a diagnosis.
    let (_, result) = faulty_search(&b, (1..20).collect(), 10);
    let err = result.expect_err("must stop").to_string();
    assert!(err.contains("consecutive steps were rejected") && err.contains("optim.lr"), "{err}");
    let _ = std::fs::remove_dir_all(&base);
}

/// Which training step (1-based) a fault is injected into; set by [`ArmFaults`] between steps.
type FaultStep = std::rc::Rc<std::cell::Cell<u64>>;

/// Tells the faulty parts which step comes next (the next step is `done + 1`).
struct ArmFaults {
    next_step: FaultStep,
}

impl ddss_opt::search::SearchObserver for ArmFaults {
    fn on_step(&mut self, record: &ddss_opt::search::StepRecord) {
        self.next_step.set(record.step + 1);
    }
}

/// A denoiser whose output becomes NaN (or inf) during chosen training steps.
struct FaultyModel {
    inner: UNetDenoiser,
    next_step: FaultStep,
    fault_steps: Vec<u64>,
    value: f64,
}

impl ggdm_core::Denoiser for FaultyModel {
    fn forward(&self, x: &Tensor, tau: &Tensor) -> ggdm_core::Result<Tensor> {
        let out = self.inner.forward(x, tau)?;
        Ok(if self.fault_steps.contains(&self.next_step.get()) { out * self.value } else { out })
    }
    fn prediction_type(&self) -> PredictionType {
        self.inner.prediction_type()
    }
    fn sample_shape(&self) -> Option<[i64; 3]> {
        self.inner.sample_shape()
    }
}

impl ggdm_nets::DifferentiableDenoiser for FaultyModel {}

/// Features that become inf (or are scaled, to make gradients explode) during chosen steps.
struct FaultyFeatures {
    inner: Projection,
    next_step: FaultStep,
    fault_steps: Vec<u64>,
    value: f64,
}

impl FeatureExtractor for FaultyFeatures {
    fn features(&self, x: &Tensor) -> fid_metrics::Result<Tensor> {
        let f = self.inner.features(x)?;
        Ok(if self.fault_steps.contains(&self.next_step.get()) { f * self.value } else { f })
    }
    fn dim(&self) -> usize {
        12
    }
    fn name(&self) -> &str {
        "faulty-features"
    }
    fn device(&self) -> Device {
        Device::Cpu
    }
}

/// Runs a 4-step search with a faulty model and/or features; returns the sampler, the result and
/// the metrics lines.
fn injected_search(
    name: &str,
    model_faults: (Vec<u64>, f64),
    feature_faults: (Vec<u64>, f64),
    max_faults: u32,
) -> (GgdmSampler, ddss_opt::Result<ddss_opt::search::SearchOutcome>, Vec<serde_json::Value>) {
    let dir = std::env::temp_dir().join(format!("ddss-inject-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let next_step: FaultStep = std::rc::Rc::new(std::cell::Cell::new(1));
    let model = FaultyModel {
        inner: tiny_unet(false, PredictionType::Epsilon),
        next_step: next_step.clone(),
        fault_steps: model_faults.0,
        value: model_faults.1,
    };
    let features = FaultyFeatures {
        inner: Projection::new(),
        next_step: next_step.clone(),
        fault_steps: feature_faults.0,
        value: feature_faults.1,
    };
    let real = real_features();
    let loss = FeatureLoss::new(LossKind::Kid, &real).expect("loss");
    let mut s = tiny_sampler(Learnable::all());
    let parts = cpu_parts(&model, &features, &loss);
    let cfg = SearchSettings { validate_every: 0, max_faults, ..settings(4, 2) };
    // The initial validation counts as step 1 here (it runs before it): faults at step 1 hit it too.
    let mut observer = ArmFaults { next_step };
    let result = run_search(&mut s, parts, &cfg, &real, &dir, false, &mut observer);
    let lines = std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("metrics line"))
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    (s, result, lines)
}

fn event(line: &serde_json::Value) -> &str {
    line.get("event").and_then(|e| e.as_str()).unwrap_or("")
}

fn all_params_finite(s: &GgdmSampler) -> bool {
    s.params.named().iter().all(|(_, t)| t.isfinite().all().int64_value(&[]) != 0)
}

#[test]
fn nan_network_output_rejects_the_step_and_restores_the_parameters() {
    let (s, result, lines) = injected_search("model-nan", (vec![2], f64::NAN), (vec![], 1.0), 3);
    let outcome = result.expect("one fault is survivable");
    assert_eq!(outcome.faults, 1);
    assert_eq!(lines.len(), 4);
    assert!(event(&lines[1]).contains("rejected: non-finite loss"), "{}", lines[1]);
    assert!(event(&lines[1]).contains("restored the last good parameters"), "{}", lines[1]);
    for i in [0, 2, 3] {
        assert_eq!(event(&lines[i]), "", "{}", lines[i]);
    }
    assert!(all_params_finite(&s));

    // inf at the network output: same handling.
    let (_, result, lines) = injected_search("model-inf", (vec![3], f64::INFINITY), (vec![], 1.0), 3);
    assert_eq!(result.expect("survivable").faults, 1);
    assert!(event(&lines[2]).contains("rejected"), "{}", lines[2]);

    // A model that always returns NaN: the run stops with a diagnosis.
    let (s, result, lines) = injected_search("model-dead", ((1..=4).collect(), f64::NAN), (vec![], 1.0), 2);
    let err = result.expect_err("must stop").to_string();
    assert!(err.contains("3 consecutive steps were rejected") && err.contains("check the model"), "{err}");
    assert_eq!(lines.len(), 3, "each rejected step is logged, including the last");
    assert!(lines.iter().all(|l| event(l).contains("rejected")));
    assert!(all_params_finite(&s), "the last good parameters are kept");
}

#[test]
fn inf_features_reject_the_step_and_exploding_gradients_are_clipped() {
    let (s, result, lines) = injected_search("features-inf", (vec![], 1.0), (vec![2, 3], f64::INFINITY), 3);
    assert_eq!(result.expect("two faults are survivable").faults, 2);
    assert!(event(&lines[1]).contains("rejected") && event(&lines[2]).contains("rejected"));
    assert_eq!(event(&lines[3]), "");
    assert!(all_params_finite(&s));

    // Features scaled by 1e4 in step 2: the gradient explodes, is clipped to optim.grad_clip = 1
    // and reported; the step is taken and the parameters stay finite.
    let (s, result, lines) = injected_search("features-explode", (vec![], 1.0), (vec![2], 1e4), 3);
    let outcome = result.expect("clipping is no fault");
    assert_eq!(outcome.faults, 0);
    let norm = lines[1]["grad_norm"].as_f64().expect("grad_norm");
    assert!(norm > 1.0, "the pre-clip norm is reported: {norm}");
    assert_eq!(lines[1]["clipped"], true, "{}", lines[1]);
    assert!(outcome.clipped >= 1);
    assert!(all_params_finite(&s));
}
