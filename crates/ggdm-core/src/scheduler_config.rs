//! diffusers' `scheduler_config.json`, honoured the way diffusers honours it (DESIGN.md section 4):
//! beta schedule and range, `num_train_timesteps`, `prediction_type`, `clip_sample` /
//! `clip_sample_range`, `variance_type`, `timestep_spacing`, `steps_offset`, `set_alpha_to_one`.
//!
//! Keys are checked one by one: a key no diffusers scheduler of the DDPM family knows is an error
//! naming it; a key that only matters to other schedulers is ignored with a log line; a value we do
//! not implement (`thresholding: true`, `variance_type: "learned"`, ...) is an error naming it.

use crate::grid::Spacing;
use crate::prediction::PredictionType;
use crate::schedule::{BetaSchedule, NoiseSchedule};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::Path;

/// DDPM ancestral variance (diffusers' `variance_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum VarianceType {
    /// Posterior variance `beta~_t` (DDPM default).
    #[default]
    FixedSmall,
    /// Posterior variance, taken through `exp(0.5 log(.))` as diffusers does.
    FixedSmallLog,
    /// `beta_t` of the (possibly strided) step.
    FixedLarge,
}

/// The scheduler settings a checkpoint ships with; defaults are diffusers' (`DDPMScheduler`,
/// `DDIMScheduler`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerConfig {
    /// `num_train_timesteps` (default 1000).
    pub num_train_timesteps: usize,
    /// `beta_schedule` with `beta_start` / `beta_end` (default linear 1e-4..0.02).
    pub beta_schedule: BetaSchedule,
    /// `trained_betas`, overriding `beta_schedule` when present.
    pub trained_betas: Option<Vec<f64>>,
    /// `prediction_type` (default epsilon).
    pub prediction_type: PredictionType,
    /// `clip_sample` (diffusers default true) with `clip_sample_range` (default 1.0).
    pub clip_sample: bool,
    /// `clip_sample_range`.
    pub clip_sample_range: f64,
    /// `variance_type` for DDPM ancestral sampling (default fixed_small).
    pub variance_type: VarianceType,
    /// `timestep_spacing` (default leading).
    pub timestep_spacing: Spacing,
    /// `steps_offset` (default 0).
    pub steps_offset: usize,
    /// `set_alpha_to_one` (DDIM default true; DDPM behaves as true).
    pub set_alpha_to_one: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_schedule: BetaSchedule::ddpm_linear(),
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            clip_sample: true,
            clip_sample_range: 1.0,
            variance_type: VarianceType::FixedSmall,
            timestep_spacing: Spacing::Leading,
            steps_offset: 0,
            set_alpha_to_one: true,
        }
    }
}

/// Keys that only other diffusers schedulers use; ignored.
const IGNORED_KEYS: &[&str] = &[
    "_class_name",
    "_diffusers_version",
    "_name_or_path",
    "skip_prk_steps",
    "dynamic_thresholding_ratio",
    "sample_max_value",
    "timestep_type",
    "use_karras_sigmas",
    "interpolation_type",
    "solver_order",
    "solver_type",
    "algorithm_type",
    "lower_order_final",
    "euler_at_final",
    "use_lu_lambdas",
    "final_sigmas_type",
    "lambda_min_clipped",
    "variance_type_dpm",
];

impl SchedulerConfig {
    /// Reads `scheduler_config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let value: Value =
            serde_json::from_str(&text).map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
        let map = value.as_object().ok_or_else(|| Error::format(path, "expected a JSON object"))?;
        Self::from_json_map(map).map_err(|e| match e {
            Error::Invalid { what, msg } => Error::format(path, format!("key `{what}`: {msg}")),
            other => other,
        })
    }

    /// Interprets a parsed `scheduler_config.json` object.
    pub fn from_json_map(map: &Map<String, Value>) -> Result<Self> {
        let mut cfg = SchedulerConfig::default();
        let mut beta_start = 1e-4;
        let mut beta_end = 0.02;
        let mut schedule_name = "linear".to_string();
        let as_f64 =
            |key: &str, v: &Value| v.as_f64().ok_or_else(|| Error::invalid(key, format!("expected a number, got {v}")));
        let as_bool = |key: &str, v: &Value| {
            v.as_bool().ok_or_else(|| Error::invalid(key, format!("expected true/false, got {v}")))
        };
        let as_str = |key: &str, v: &Value| {
            v.as_str().map(str::to_string).ok_or_else(|| Error::invalid(key, format!("expected a string, got {v}")))
        };
        let as_usize = |key: &str, v: &Value| {
            v.as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| Error::invalid(key, format!("expected a non-negative integer, got {v}")))
        };
        for (key, v) in map {
            match key.as_str() {
                "num_train_timesteps" => cfg.num_train_timesteps = as_usize(key, v)?,
                "beta_start" => beta_start = as_f64(key, v)?,
                "beta_end" => beta_end = as_f64(key, v)?,
                "beta_schedule" => schedule_name = as_str(key, v)?,
                "trained_betas" => {
                    if !v.is_null() {
                        let list =
                            v.as_array().ok_or_else(|| Error::invalid(key, "expected a list of numbers or null"))?;
                        cfg.trained_betas = Some(list.iter().map(|b| as_f64(key, b)).collect::<Result<Vec<_>>>()?);
                    }
                }
                "prediction_type" => cfg.prediction_type = PredictionType::from_diffusers_name(&as_str(key, v)?)?,
                "clip_sample" => cfg.clip_sample = as_bool(key, v)?,
                "clip_sample_range" => cfg.clip_sample_range = as_f64(key, v)?,
                "variance_type" => {
                    cfg.variance_type = match as_str(key, v)?.as_str() {
                        "fixed_small" => VarianceType::FixedSmall,
                        "fixed_small_log" => VarianceType::FixedSmallLog,
                        "fixed_large" => VarianceType::FixedLarge,
                        other => {
                            return Err(Error::invalid(
                                key,
                                format!("`{other}` is not supported (fixed_small, fixed_small_log, fixed_large)"),
                            ))
                        }
                    }
                }
                "timestep_spacing" => cfg.timestep_spacing = Spacing::parse(&as_str(key, v)?)?,
                "steps_offset" => cfg.steps_offset = as_usize(key, v)?,
                "set_alpha_to_one" => cfg.set_alpha_to_one = as_bool(key, v)?,
                "thresholding" => {
                    if as_bool(key, v)? {
                        return Err(Error::invalid(key, "dynamic thresholding is not supported"));
                    }
                }
                "rescale_betas_zero_snr" => {
                    if as_bool(key, v)? {
                        return Err(Error::invalid(key, "zero-terminal-SNR rescaling is not supported"));
                    }
                }
                "clip_sample_range_max" => {}
                k if IGNORED_KEYS.contains(&k) => {
                    tracing::debug!("scheduler_config.json: ignoring `{k}` (not used by DDPM/DDIM)")
                }
                other => {
                    return Err(Error::invalid(
                        other,
                        "unknown scheduler_config.json key (not a DDPMScheduler/DDIMScheduler setting)",
                    ))
                }
            }
        }
        cfg.beta_schedule = match schedule_name.as_str() {
            "linear" => BetaSchedule::Linear { beta_start, beta_end },
            "scaled_linear" => BetaSchedule::ScaledLinear { beta_start, beta_end },
            "squaredcos_cap_v2" => BetaSchedule::SquaredCosCapV2,
            other => {
                return Err(Error::invalid(
                    "beta_schedule",
                    format!("`{other}` (expected linear, scaled_linear or squaredcos_cap_v2)"),
                ))
            }
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Range checks.
    pub fn validate(&self) -> Result<()> {
        if self.num_train_timesteps < 2 {
            return Err(Error::invalid("num_train_timesteps", format!("{} (need >= 2)", self.num_train_timesteps)));
        }
        if let Some(betas) = &self.trained_betas {
            if betas.len() != self.num_train_timesteps {
                return Err(Error::invalid(
                    "trained_betas",
                    format!("{} values for num_train_timesteps = {}", betas.len(), self.num_train_timesteps),
                ));
            }
        }
        if !(self.clip_sample_range > 0.0) {
            return Err(Error::invalid("clip_sample_range", format!("{} (must be > 0)", self.clip_sample_range)));
        }
        Ok(())
    }

    /// The noise schedule this config describes.
    pub fn schedule(&self) -> Result<NoiseSchedule> {
        let schedule = match &self.trained_betas {
            Some(betas) => NoiseSchedule::from_betas(betas.clone())?,
            None => NoiseSchedule::new(self.beta_schedule, self.num_train_timesteps)?,
        };
        Ok(schedule.with_set_alpha_to_one(self.set_alpha_to_one))
    }

    /// `clip_sample_range` when clipping is on.
    pub fn clip(&self) -> Option<f64> {
        self.clip_sample.then_some(self.clip_sample_range)
    }

    /// The diffusers-style JSON for this config (`DDPMScheduler`), as the trainer writes it.
    pub fn to_diffusers_json(&self) -> Value {
        let (name, start, end) = match self.beta_schedule {
            BetaSchedule::Linear { beta_start, beta_end } => ("linear", beta_start, beta_end),
            BetaSchedule::ScaledLinear { beta_start, beta_end } => ("scaled_linear", beta_start, beta_end),
            BetaSchedule::SquaredCosCapV2 => ("squaredcos_cap_v2", 1e-4, 0.02),
        };
        serde_json::json!({
            "_class_name": "DDPMScheduler",
            "num_train_timesteps": self.num_train_timesteps,
            "beta_start": start,
            "beta_end": end,
            "beta_schedule": name,
            "trained_betas": self.trained_betas,
            "prediction_type": self.prediction_type.diffusers_name(),
            "clip_sample": self.clip_sample,
            "clip_sample_range": self.clip_sample_range,
            "variance_type": match self.variance_type {
                VarianceType::FixedSmall => "fixed_small",
                VarianceType::FixedSmallLog => "fixed_small_log",
                VarianceType::FixedLarge => "fixed_large",
            },
            "timestep_spacing": self.timestep_spacing.name(),
            "steps_offset": self.steps_offset,
            "set_alpha_to_one": self.set_alpha_to_one,
        })
    }
}
