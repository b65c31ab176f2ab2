//! What the ddss-opt tests share: a tiny random UNet, a fixed differentiable feature map, real
//! features, teacher pairs, the test sampler and search settings.
#![allow(dead_code)] // not every test binary uses every helper

use ddss_opt::loss::FeatureLoss;
use ddss_opt::objective::Objective;
use ddss_opt::optim::LrSchedule;
use ddss_opt::search::{ObjectiveParts, SearchSettings};
use ddss_opt::teacher::{initial_noise, Pairs, Teacher, TeacherLoss};
use ddss_opt::unroll::Remat;
use fid_metrics::features::FeatureExtractor;
use ggdm_core::ggdm::{GgdmSampler, History, Learnable};
use ggdm_core::grid::Spacing;
use ggdm_core::scheduler_config::SchedulerConfig;
use ggdm_core::PredictionType;
use ggdm_nets::unet::{UNet2DConfig, UNet2DModel, UNetDenoiser};
use std::sync::Mutex;
use tch::{Device, Kind, Tensor};

/// A diffusers `UNet2DModel` config small enough for exact f64 tests (8x8, one channel).
pub const TINY: &str = r#"{
  "sample_size": 8, "in_channels": 1, "out_channels": 1,
  "block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4,
  "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
  "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "attention_head_dim": 8,
  "flip_sin_to_cos": false, "freq_shift": 1
}"#;

/// `tch::manual_seed` is global: models and weights are built one at a time.
static BUILD: Mutex<()> = Mutex::new(());

/// The [`TINY`] UNet with the weights of seed 0 (f64 when `double`), frozen.
pub fn tiny_unet(double: bool, prediction_type: PredictionType) -> UNetDenoiser {
    let _guard = BUILD.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    tch::manual_seed(0);
    let config = UNet2DConfig::from_json_str(TINY).expect("config");
    let mut model = UNet2DModel::new(config, Device::Cpu).expect("model");
    if double {
        model.var_store_mut().double();
    }
    model.var_store_mut().freeze();
    UNetDenoiser::new(model, prediction_type)
}

/// A fixed non-linear feature map: tanh of a random projection (seed 1) of the pixels, 12
/// features, differentiable. Features are f64, or of the input's kind with `same_kind`.
pub struct Projection {
    weight: Tensor,
    same_kind: bool,
}

impl Projection {
    /// The f64-output map.
    pub fn new() -> Self {
        Self::with_output(false)
    }

    /// The map with f64 features, or (`same_kind`) features of the input's kind.
    pub fn with_output(same_kind: bool) -> Self {
        let _guard = BUILD.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        tch::manual_seed(1);
        Self { weight: Tensor::randn([64, 12], (Kind::Double, Device::Cpu)) * 0.3, same_kind }
    }
}

impl FeatureExtractor for Projection {
    fn features(&self, x: &Tensor) -> fid_metrics::Result<Tensor> {
        let f = x.to_kind(Kind::Double).reshape([x.size()[0], -1]).matmul(&self.weight).tanh();
        Ok(if self.same_kind { f.to_kind(x.kind()) } else { f })
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

/// 40 "real" feature vectors (seed 2).
pub fn real_features() -> Tensor {
    let _guard = BUILD.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    tch::manual_seed(2);
    (Tensor::randn([40, 12], (Kind::Float, Device::Cpu)) * 0.5).tanh()
}

/// `count` pairs for the [`TINY`] UNet's samples: the initial noise of stream 21 from index
/// `first`, and fixed stand-ins for the teacher's samples (seed 4, in (-1, 1)).
pub fn tiny_pairs(first: u64, count: usize) -> Pairs {
    let noise = initial_noise(21, first, count, [1, 8, 8]).expect("noise");
    let _guard = BUILD.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    tch::manual_seed(4 + first as i64);
    let target = (Tensor::randn([count as i64, 1, 8, 8], (Kind::Float, Device::Cpu)) * 0.8).tanh();
    Pairs::new(noise, target, "test pairs").expect("pairs")
}

/// A teacher with 8 training and 4 validation pairs ([`tiny_pairs`]) entering the loss as `loss`.
pub fn tiny_teacher(loss: TeacherLoss, extractor: &dyn FeatureExtractor) -> Teacher {
    Teacher::new(loss, tiny_pairs(0, 8), tiny_pairs(1 << 32, 4), extractor, Device::Cpu).expect("teacher")
}

/// The default scheduler without clipping.
pub fn scheduler() -> SchedulerConfig {
    SchedulerConfig { clip_sample: false, ..SchedulerConfig::default() }
}

/// A 4-step GGDM sampler at DDIM(eta = 0.3) initialisation, full history.
pub fn tiny_sampler(learn: Learnable) -> GgdmSampler {
    GgdmSampler::init_from_spacing(&scheduler(), 4, Spacing::Trailing, 0.3, History::Full, learn, Device::Cpu)
        .expect("sampler")
}

/// The search's parts for the [`TINY`] UNet's samples (one channel, 8x8) on the CPU.
pub fn cpu_parts<'a>(
    model: &'a dyn ggdm_nets::DifferentiableDenoiser,
    extractor: &'a dyn FeatureExtractor,
    loss: &'a FeatureLoss,
) -> ObjectiveParts<'a> {
    ObjectiveParts { model, extractor, loss, sample_shape: [1, 8, 8], device: Device::Cpu, teacher: None }
}

/// The objective of `parts` for `sampler` with f64 states (the exact-comparison setting).
pub fn f64_objective<'s>(
    parts: &'s ObjectiveParts<'s>,
    sampler: &'s GgdmSampler,
    remat: Remat,
    micro_batch: usize,
    feature_chunk: Option<usize>,
) -> Objective<'s> {
    Objective {
        remat,
        micro_batch,
        feature_chunk,
        state_kind: Kind::Double,
        ..parts.objective(sampler, &settings(1, 1))
    }
}

/// Search settings: batch 6 in micro-batches of 3, per-call remat, validation and a checkpoint
/// every `every` steps.
pub fn settings(steps: u64, every: u64) -> SearchSettings {
    SearchSettings {
        steps,
        batch_size: 6,
        micro_batch: Some(3),
        feature_chunk: None,
        lr: LrSchedule { lr: 0.02, warmup_steps: 1, decay: "cosine".into(), min_lr_ratio: 0.1 },
        adam: Default::default(),
        lr_scale: Default::default(),
        grad_clip: Some(1.0),
        remat: Remat::PerCall,
        seed: 3,
        validate_every: every,
        validation_num: 6,
        checkpoint_every: every,
        max_faults: 3,
    }
}

/// Sets the entry at `index` of `t` to `v` in place (outside autograd), for finite differences.
pub fn set_entry(t: &Tensor, index: &[i64], v: f64) {
    tch::no_grad(|| {
        let mut e = t.shallow_clone();
        for &i in index {
            e = e.get(i);
        }
        let _ = e.fill_(v);
    })
}
