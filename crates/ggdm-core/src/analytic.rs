//! Closed-form denoisers for tests, examples and documentation: no weights, exactly known
//! behaviour, differentiable in both `x` and `tau`.
//!
//! * [`DiffusersDummyDenoiser`]: `x * t / (t + 1)`, the deterministic dummy model of diffusers'
//!   scheduler tests, so full loops can be compared with diffusers number for number.
//! * [`GaussianDataDenoiser`]: the exact (Bayes-optimal) noise prediction when every pixel of the
//!   data is independent `N(mean, std^2)`; a sampler run with it must produce that distribution.

use crate::denoiser::Denoiser;
use crate::prediction::PredictionType;
use crate::schedule::NoiseSchedule;
use crate::Result;
use tch::Tensor;

/// diffusers' scheduler-test dummy model `x * t / (t + 1)`, read as the given prediction type.
#[derive(Debug, Clone, Copy)]
pub struct DiffusersDummyDenoiser {
    /// How the output is interpreted.
    pub prediction_type: PredictionType,
}

impl Denoiser for DiffusersDummyDenoiser {
    fn forward(&self, x: &Tensor, tau: &Tensor) -> Result<Tensor> {
        let tau = tau.to_kind(x.kind()).reshape([-1, 1, 1, 1]);
        Ok(x * &tau / (&tau + 1.0))
    }
    fn prediction_type(&self) -> PredictionType {
        self.prediction_type
    }
}

/// The exact `eps` prediction for data with i.i.d. `N(mean, std^2)` pixels:
/// `E[eps | x_t] = sqrt(1-abar) (x_t - sqrt(abar) mean) / (abar std^2 + 1 - abar)`.
#[derive(Debug)]
pub struct GaussianDataDenoiser {
    log_abar_table: Tensor,
    mean: f64,
    std: f64,
    shape: [i64; 3],
}

impl GaussianDataDenoiser {
    /// For `schedule` and data `N(mean, std^2)` of shape `[C, H, W]`.
    pub fn new(schedule: &NoiseSchedule, mean: f64, std: f64, shape: [i64; 3]) -> Self {
        Self { log_abar_table: schedule.log_abar_table(tch::Kind::Double, tch::Device::Cpu), mean, std, shape }
    }
}

impl Denoiser for GaussianDataDenoiser {
    fn forward(&self, x: &Tensor, tau: &Tensor) -> Result<Tensor> {
        let table = self.log_abar_table.to_device(x.device()).to_kind(x.kind());
        let abar = NoiseSchedule::abar_tensor(&table, &tau.to_kind(x.kind())).reshape([-1, 1, 1, 1]);
        let one_minus = abar.ones_like() - &abar;
        let numerator = one_minus.sqrt() * (x - abar.sqrt() * self.mean);
        let denominator = &abar * (self.std * self.std) + one_minus;
        Ok(numerator / denominator)
    }
    fn prediction_type(&self) -> PredictionType {
        PredictionType::Epsilon
    }
    fn sample_shape(&self) -> Option<[i64; 3]> {
        Some(self.shape)
    }
}
