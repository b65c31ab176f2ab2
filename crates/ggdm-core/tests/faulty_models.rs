//! A network whose output does not have the input's shape (e.g. a learned-variance model with
//! twice the channels) makes DDIM and GGDM sampling return an error naming both shapes, not panic.

use ggdm_core::analytic::GaussianDataDenoiser;
use ggdm_core::ggdm::{GgdmSampler, History, Learnable};
use ggdm_core::grid::{timesteps, Spacing};
use ggdm_core::noise::SeededNoise;
use ggdm_core::samplers::{ddim, diffusers_steps, DdimOptions};
use ggdm_core::scheduler_config::SchedulerConfig;
use ggdm_core::{Denoiser, PredictionType};
use tch::{Device, Tensor};

/// Returns the inner model's output with its channels doubled.
struct LearnedVariance(GaussianDataDenoiser);

impl Denoiser for LearnedVariance {
    fn forward(&self, x: &Tensor, tau: &Tensor) -> ggdm_core::Result<Tensor> {
        let out = self.0.forward(x, tau)?;
        Ok(Tensor::cat(&[&out, &out], 1))
    }
    fn prediction_type(&self) -> PredictionType {
        self.0.prediction_type()
    }
}

#[test]
fn wrongly_shaped_network_output_is_an_error() {
    let scheduler = SchedulerConfig { clip_sample: false, ..SchedulerConfig::default() };
    let schedule = scheduler.schedule().expect("schedule");
    let model = LearnedVariance(GaussianDataDenoiser::new(&schedule, 0.0, 0.5, [1, 4, 4]));
    let sampler = GgdmSampler::init_from_spacing(
        &scheduler,
        3,
        Spacing::Trailing,
        0.0,
        History::Full,
        Learnable::none(),
        Device::Cpu,
    )
    .expect("sampler");
    let (x_init, z) = sampler.draw_noise(&mut SeededNoise::new(0), &[2, 1, 4, 4], Device::Cpu).expect("noise");
    let err = tch::no_grad(|| sampler.sample(&model, &x_init, &z)).expect_err("must fail").to_string();
    assert!(err.contains("network output") && err.contains("[2, 2, 4, 4]"), "{err}");

    let grid = timesteps(1000, 3, Spacing::Trailing, 0).expect("grid");
    let options = DdimOptions { eta: 0.0, clip: None, use_clipped_model_output: false };
    let err = tch::no_grad(|| {
        ddim(&model, &schedule, &diffusers_steps(&grid, 1000), &x_init, &options, &mut SeededNoise::new(1), &mut |_| {})
    })
    .expect_err("must fail")
    .to_string();
    assert!(err.contains("network output"), "{err}");
}
