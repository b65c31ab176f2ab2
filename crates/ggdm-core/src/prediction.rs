//! What a diffusion network predicts, and the exact algebra between the three conventions
//! (DESIGN.md section 4, "Prediction types"): with `x_t = sqrt(abar) x0 + sqrt(1-abar) eps`,
//! `v = sqrt(abar) eps - sqrt(1-abar) x0` (diffusers' `v_prediction`).
//!
//! The conversions take `abar` as a tensor broadcastable against `x_t`, so they stay
//! differentiable in both the sample and the (continuous) noise level.

use serde::{Deserialize, Serialize};
use tch::Tensor;

/// diffusers' `prediction_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum PredictionType {
    /// The noise `eps` (diffusers `"epsilon"`).
    #[default]
    #[serde(rename = "epsilon")]
    Epsilon,
    /// The clean sample `x0` (diffusers `"sample"`).
    #[serde(rename = "sample")]
    Sample,
    /// The velocity `v = sqrt(abar) eps - sqrt(1-abar) x0` (diffusers `"v_prediction"`).
    #[serde(rename = "v_prediction")]
    VPrediction,
}

impl PredictionType {
    /// The name diffusers uses in `scheduler_config.json`.
    pub fn diffusers_name(self) -> &'static str {
        match self {
            PredictionType::Epsilon => "epsilon",
            PredictionType::Sample => "sample",
            PredictionType::VPrediction => "v_prediction",
        }
    }

    /// Parses diffusers' name.
    pub fn from_diffusers_name(name: &str) -> crate::Result<Self> {
        match name {
            "epsilon" => Ok(PredictionType::Epsilon),
            "sample" => Ok(PredictionType::Sample),
            "v_prediction" => Ok(PredictionType::VPrediction),
            other => Err(crate::Error::invalid(
                "prediction_type",
                format!("`{other}` (expected epsilon, sample or v_prediction)"),
            )),
        }
    }
}

/// Converts a network output to `(x0_hat, eps_hat)` given the noisy input and its `abar`.
pub fn to_x0_eps(kind: PredictionType, output: &Tensor, x_t: &Tensor, abar: &Tensor) -> (Tensor, Tensor) {
    let sqrt_abar = abar.sqrt();
    let sqrt_one_minus = (abar.ones_like() - abar).sqrt();
    match kind {
        PredictionType::Epsilon => {
            let x0 = (x_t - &sqrt_one_minus * output) / &sqrt_abar;
            (x0, output.shallow_clone())
        }
        PredictionType::Sample => {
            let eps = (x_t - &sqrt_abar * output) / &sqrt_one_minus;
            (output.shallow_clone(), eps)
        }
        PredictionType::VPrediction => {
            let x0 = &sqrt_abar * x_t - &sqrt_one_minus * output;
            let eps = &sqrt_abar * output + &sqrt_one_minus * x_t;
            (x0, eps)
        }
    }
}

/// Converts a network output to the noise prediction `eps_hat`.
pub fn to_eps(kind: PredictionType, output: &Tensor, x_t: &Tensor, abar: &Tensor) -> Tensor {
    match kind {
        PredictionType::Epsilon => output.shallow_clone(),
        _ => to_x0_eps(kind, output, x_t, abar).1,
    }
}

/// Expresses `(x0, eps)` as the target the given prediction type would have (used by training).
pub fn target_from(kind: PredictionType, x0: &Tensor, eps: &Tensor, abar: &Tensor) -> Tensor {
    match kind {
        PredictionType::Epsilon => eps.shallow_clone(),
        PredictionType::Sample => x0.shallow_clone(),
        PredictionType::VPrediction => abar.sqrt() * eps - (abar.ones_like() - abar).sqrt() * x0,
    }
}

/// [`to_x0_eps`] with a scalar `abar` (the baselines' fast path).
pub fn to_x0_eps_scalar(kind: PredictionType, output: &Tensor, x_t: &Tensor, abar: f64) -> (Tensor, Tensor) {
    let sqrt_abar = abar.sqrt();
    let sqrt_one_minus = (1.0 - abar).sqrt();
    match kind {
        PredictionType::Epsilon => ((x_t - output * sqrt_one_minus) / sqrt_abar, output.shallow_clone()),
        PredictionType::Sample => (output.shallow_clone(), (x_t - output * sqrt_abar) / sqrt_one_minus),
        PredictionType::VPrediction => {
            (x_t * sqrt_abar - output * sqrt_one_minus, output * sqrt_abar + x_t * sqrt_one_minus)
        }
    }
}
