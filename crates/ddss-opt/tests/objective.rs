//! The DDSS objective: the two-pass micro-batched gradient equals the single-pass one; GGDM at
//! initialisation gives exactly the DDIM loss; a search with every part frozen changes nothing;
//! a resumed search ends bit-identical to an uninterrupted one.

use ddss_opt::loss::{FeatureLoss, LossKind};
use ddss_opt::objective::{BatchNoise, Objective};
use ddss_opt::optim::LrSchedule;
use ddss_opt::search::{run_search, NoObserver, ObjectiveParts, SearchSettings};
use ddss_opt::unroll::Remat;
use fid_metrics::features::FeatureExtractor;
use ggdm_core::ggdm::{GgdmSampler, History, Learnable};
use ggdm_core::grid::Spacing;
use ggdm_core::noise::ListNoise;
use ggdm_core::samplers::{ddim, grid_steps, DdimOptions};
use ggdm_core::scheduler_config::SchedulerConfig;
use ggdm_core::unet::{UNet2DConfig, UNet2DModel, UNetDenoiser};
use ggdm_core::PredictionType;
use tch::{Device, Kind, Tensor};

const TINY: &str = r#"{
  "sample_size": 8, "in_channels": 1, "out_channels": 1,
  "block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4,
  "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
  "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "attention_head_dim": 8,
  "flip_sin_to_cos": false, "freq_shift": 1
}"#;

fn tiny_model() -> UNetDenoiser {
    tch::manual_seed(0);
    let config = UNet2DConfig::from_json_str(TINY).expect("config");
    let mut model = UNet2DModel::new(config, Device::Cpu).expect("model");
    model.var_store_mut().double();
    model.var_store_mut().freeze();
    UNetDenoiser::new(model, PredictionType::Epsilon)
}

/// The search itself runs f32 states: a float copy of the same model.
fn tiny_model_f32() -> UNetDenoiser {
    tch::manual_seed(0);
    let config = UNet2DConfig::from_json_str(TINY).expect("config");
    let mut model = UNet2DModel::new(config, Device::Cpu).expect("model");
    model.var_store_mut().freeze();
    UNetDenoiser::new(model, PredictionType::Epsilon)
}

/// A fixed non-linear feature map: tanh of a random projection of the pixels (differentiable).
struct Projection {
    weight: Tensor,
}

impl Projection {
    fn new() -> Self {
        tch::manual_seed(1);
        Self { weight: Tensor::randn([64, 12], (Kind::Double, Device::Cpu)) * 0.3 }
    }
}

impl FeatureExtractor for Projection {
    fn features(&self, x: &Tensor) -> fid_metrics::Result<Tensor> {
        Ok(x.to_kind(Kind::Double).reshape([x.size()[0], -1]).matmul(&self.weight).tanh())
    }
    fn dim(&self) -> usize {
        12
    }
    fn name(&self) -> &str {
        "projection"
    }
    fn device(&self) -> Device {
        Device::Cpu
    }
}

fn scheduler() -> SchedulerConfig {
    SchedulerConfig { clip_sample: false, ..SchedulerConfig::default() }
}

fn sampler(learn: Learnable) -> GgdmSampler {
    GgdmSampler::init_from_spacing(&scheduler(), 4, Spacing::Trailing, 0.3, History::Full, learn, Device::Cpu)
        .expect("sampler")
}

fn real_features() -> Tensor {
    tch::manual_seed(2);
    (Tensor::randn([40, 12], (Kind::Float, Device::Cpu)) * 0.5).tanh()
}

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
fn two_pass_gradient_equals_single_pass() {
    let model = tiny_model();
    let features = Projection::new();
    for kind in [LossKind::Kid, LossKind::MmdRbf { bandwidth: None }, LossKind::Moments] {
        let loss = FeatureLoss::new(kind, &real_features()).expect("loss");
        let s = sampler(Learnable::all());
        let noise = BatchNoise { seed: 5, batch: 10 };
        let mut results = Vec::new();
        for (micro_batch, remat) in
            [(10, Remat::Naive), (10, Remat::PerCall), (3, Remat::PerCall), (4, Remat::Budget { stored_steps: 2 })]
        {
            zero(&s);
            let objective = Objective {
                sampler: &s,
                model: &model,
                extractor: &features,
                loss: &loss,
                remat,
                micro_batch,
                sample_shape: [1, 8, 8],
                device: Device::Cpu,
                state_kind: Kind::Double,
            };
            let value = objective.loss_and_grad(noise).expect("objective");
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
    let model = tiny_model();
    let features = Projection::new();
    let loss = FeatureLoss::new(LossKind::Kid, &real_features()).expect("loss");
    let s = sampler(Learnable::all());
    let noise = BatchNoise { seed: 11, batch: 8 };
    let objective = Objective {
        sampler: &s,
        model: &model,
        extractor: &features,
        loss: &loss,
        remat: Remat::PerCall,
        micro_batch: 8,
        sample_shape: [1, 8, 8],
        device: Device::Cpu,
        state_kind: Kind::Double,
    };
    let ggdm_loss = objective.loss_and_grad(noise).expect("objective");
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

fn settings(steps: u64) -> SearchSettings {
    SearchSettings {
        steps,
        batch_size: 6,
        micro_batch: Some(3),
        lr: LrSchedule { lr: 0.02, warmup_steps: 1, decay: "cosine".into(), min_lr_ratio: 0.1 },
        adam: Default::default(),
        lr_scale: Default::default(),
        grad_clip: Some(1.0),
        remat: Remat::PerCall,
        seed: 3,
        validate_every: 2,
        validation_num: 6,
        checkpoint_every: 2,
        max_faults: 3,
    }
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
    let model = tiny_model_f32();
    let features = Projection::new();
    let real = real_features();
    let loss = FeatureLoss::new(LossKind::Kid, &real).expect("loss");
    let mut s = sampler(learn);
    let parts = ObjectiveParts {
        model: &model,
        extractor: &features,
        loss: &loss,
        sample_shape: [1, 8, 8],
        device: Device::Cpu,
    };
    run_search(&mut s, parts, &settings(4), &real, dir, resume, &mut StopAt(stop_at)).expect("search");
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
    let before = sampler(Learnable::none()).to_file();
    let after = search(&dir, Learnable::none(), 4, false).to_file();
    assert_eq!(before.params, after.params);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn resumed_search_equals_uninterrupted() {
    let base = std::env::temp_dir().join(format!("ddss-resume-{}", std::process::id()));
    let (a, b) = (base.join("a"), base.join("b"));
    std::fs::create_dir_all(&a).expect("dir");
    std::fs::create_dir_all(&b).expect("dir");
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
    let initial = sampler(Learnable::all());
    let logits = ca.iter().find(|(n, _)| n == "params.grid_logits").expect("logits");
    assert!(!logits.1.equal(&initial.params.grid_logits.detach()), "the search must move the grid");
    let lines = std::fs::read_to_string(b.join("metrics.jsonl")).expect("metrics").lines().count();
    assert_eq!(lines, 4);
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
    let model = tiny_model_f32();
    let features = Faulty { inner: Projection::new(), calls: std::cell::Cell::new(0), nan_calls };
    let real = real_features();
    let loss = FeatureLoss::new(LossKind::Kid, &real).expect("loss");
    let mut s = sampler(Learnable::all());
    let parts = ObjectiveParts {
        model: &model,
        extractor: &features,
        loss: &loss,
        sample_shape: [1, 8, 8],
        device: Device::Cpu,
    };
    let cfg = SearchSettings { steps, validate_every: 0, micro_batch: None, ..settings(steps) };
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
