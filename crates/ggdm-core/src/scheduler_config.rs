//! diffusers' `scheduler_config.json`, honoured the way diffusers honours it (DESIGN.md section 4):
//! beta schedule and range, `num_train_timesteps`, `prediction_type`, `clip_sample` /
//! `clip_sample_range`, `variance_type`, `timestep_spacing`, `steps_offset`, `set_alpha_to_one`, and
//! `DPMSolverMultistepScheduler`'s `use_lu_lambdas`, which makes the multistep solvers' default
//! spacing DPM-Solver's log-SNR-uniform grid (`logsnr`, [`crate::grid::logsnr_timesteps`]).
//!
//! Keys are checked one by one: a key no diffusers scheduler of the DDPM family knows is an error
//! naming it; a key that only matters to other schedulers is ignored with a log line; a value we do
//! not implement (`thresholding: true`, `variance_type: "learned"`, `use_karras_sigmas: true`, ...)
//! is an error naming it. A `GGDMScheduler` config (`ddss-cli export --format
//! diffusers-scheduler`) holds the model's settings plus its learned sampler under `sampler`.
//!
//! Configs that diffusers saves for `DPMSolverMultistepScheduler` and `UniPCMultistepScheduler`
//! load too. Python's `json` writes a non-finite float as a bare `-Infinity`, `Infinity` or `NaN`
//! (`DPMSolverMultistepScheduler` saves its default `"lambda_min_clipped": -Infinity` so), which
//! strict JSON rejects; [`SchedulerConfig::from_file`] reads those tokens as the strings
//! `"-Infinity"`, `"Infinity"` and `"NaN"`. `lambda_min_clipped` (DPM-Solver++ only) leaves out
//! of the timestep range the training timesteps whose float32 log-SNR lies below it; we do not
//! implement that truncation, so a value that would truncate is an error, while `-Infinity`
//! (the default), `null` and a value at or below the schedule's smallest log-SNR, which change
//! nothing, are accepted ([`check_lambda_min_clipped`]).

use crate::grid::{self, Spacing};
use crate::prediction::PredictionType;
use crate::schedule::{BetaSchedule, NoiseSchedule};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::borrow::Cow;
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
    /// `use_lu_lambdas` (diffusers' `DPMSolverMultistepScheduler`, default false): the multistep
    /// solvers default to the log-SNR-uniform grid ([`Self::multistep_spacing`]). Absent from
    /// files written before it existed (and from ours when false).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub use_lu_lambdas: bool,
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
            use_lu_lambdas: false,
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
    "interpolation_type",
    "solver_order",
    "solver_type",
    "algorithm_type",
    "lower_order_final",
    "euler_at_final",
    "final_sigmas_type",
    "variance_type_dpm",
    "predict_x0",
    "disable_corrector",
    "solver_p",
    // Only used with the sigma schedules below, which are rejected when switched on.
    "flow_shift",
    "time_shift_type",
    "shift_terminal",
    "sigma_min",
    "sigma_max",
];

/// `use_*` switches of other sigma schedules (diffusers' multistep schedulers): `false` is
/// accepted, `true` is an error naming the key.
const UNSUPPORTED_SWITCHES: &[(&str, &str)] = &[
    ("use_exponential_sigmas", "exponential sigmas are not supported"),
    ("use_beta_sigmas", "beta sigmas are not supported"),
    ("use_flow_sigmas", "flow-matching sigmas are not supported"),
    ("use_dynamic_shifting", "dynamic time shifting is not supported"),
];

/// Rewrites the bare tokens `-Infinity`, `Infinity` and `NaN` that Python's `json` writes for
/// non-finite floats (outside string literals) as the JSON strings `"-Infinity"`, `"Infinity"` and
/// `"NaN"`, so that strict JSON parses the text; text without them is returned as is. A key that
/// expects a number then names the non-finite value in its error.
fn quote_non_finite_tokens(text: &str) -> Cow<'_, str> {
    if !text.contains("Infinity") && !text.contains("NaN") {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    let (mut in_string, mut escaped) = (false, false);
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        } else if let Some(token) = ["-Infinity", "Infinity", "NaN"].into_iter().find(|t| rest.starts_with(t)) {
            out.push('"');
            out.push_str(token);
            out.push('"');
            rest = &rest[token.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    Cow::Owned(out)
}

/// `lambda_min_clipped` as a number: a JSON number, `null` (the default, `-inf`), or one of the
/// strings [`quote_non_finite_tokens`] makes.
fn lambda_min_clipped_value(v: &Value) -> Result<f64> {
    match v {
        Value::Null => Ok(f64::NEG_INFINITY),
        Value::Number(n) => {
            n.as_f64().ok_or_else(|| Error::invalid("lambda_min_clipped", format!("{n} is not a number")))
        }
        Value::String(s) if s == "-Infinity" => Ok(f64::NEG_INFINITY),
        Value::String(s) if s == "Infinity" => Ok(f64::INFINITY),
        Value::String(s) if s == "NaN" => Ok(f64::NAN),
        other => {
            Err(Error::invalid("lambda_min_clipped", format!("expected a number, -Infinity or null, got {other}")))
        }
    }
}

/// diffusers' `DPMSolverMultistepScheduler` builds its timestep range from the training timesteps
/// whose log-SNR `lambda_t = ln(sqrt(abar_t)) - ln(sqrt(1 - abar_t))`, in float32 from its
/// float32 `abar` ([`NoiseSchedule::abar_f32`]), is at least `lambda_min_clipped`: the ones below
/// it (the noisiest, as `lambda_t` decreases with `t`) are left out. That truncation is not
/// implemented here, so a value that leaves out any timestep is an error naming the key, the
/// value and the timesteps; `-inf` and a finite value at or below the smallest `lambda_t` leave
/// the range whole and are accepted. (For the DDPM linear schedule the smallest `lambda_t` is
/// -5.0588, so -5.1 changes nothing there; for the cosine schedule it is -9.92, and -5.1 would
/// leave t >= 996 out.)
pub fn check_lambda_min_clipped(config: &SchedulerConfig, lambda_min_clipped: f64) -> Result<()> {
    let key = "lambda_min_clipped";
    if lambda_min_clipped == f64::NEG_INFINITY {
        return Ok(());
    }
    if lambda_min_clipped.is_nan() || lambda_min_clipped == f64::INFINITY {
        return Err(Error::invalid(
            key,
            format!("{lambda_min_clipped} is not supported (use -Infinity, diffusers' default, or remove the key)"),
        ));
    }
    let lambdas: Vec<f64> = config
        .schedule()?
        .abar_f32()
        .into_iter()
        .map(|abar| f64::from(abar.sqrt().ln() - (1.0 - abar).sqrt().ln()))
        .collect();
    let smallest = lambdas.iter().copied().fold(f64::INFINITY, f64::min);
    let clipped = lambdas.iter().filter(|&&l| l < lambda_min_clipped).count();
    if clipped == 0 {
        return Ok(());
    }
    let t_count = lambdas.len();
    Err(Error::invalid(
        key,
        format!(
            "{lambda_min_clipped} is above the log-SNR of the {clipped} noisiest training timesteps (down to \
             {smallest:.4} at t = {}); diffusers' DPMSolverMultistepScheduler would leave t >= {} out of its \
             timestep range, which is not supported. Remove the key, or use -Infinity (diffusers' default) or \
             a value at or below {smallest:.4}, which leave the range whole",
            t_count - 1,
            t_count - clipped
        ),
    ))
}

impl SchedulerConfig {
    /// Reads `scheduler_config.json`, Python's non-standard `-Infinity`, `Infinity` and `NaN`
    /// included (see the module documentation).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let value: Value = serde_json::from_str(&quote_non_finite_tokens(&text))
            .map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
        let map = value.as_object().ok_or_else(|| Error::format(path, "expected a JSON object"))?;
        Self::from_json_map(map).map_err(|e| match e {
            Error::Invalid { what, msg } => Error::format(path, format!("key `{what}`: {msg}")),
            other => other,
        })
    }

    /// Interprets a parsed `scheduler_config.json` object.
    pub fn from_json_map(map: &Map<String, Value>) -> Result<Self> {
        let mut cfg = SchedulerConfig::default();
        let mut betas = BetaKeys::default();
        for (key, v) in map {
            if !betas.read(key, v)? && !cfg.read_setting(key, v)? {
                check_other_key(key, v)?;
            }
        }
        cfg.beta_schedule = betas.schedule()?;
        cfg.validate()?;
        check_lambda_min_clipped(&cfg, betas.lambda_min_clipped)?;
        Ok(cfg)
    }

    /// Reads `key` into this config when it is one of its settings; `false` when it is not.
    fn read_setting(&mut self, key: &str, v: &Value) -> Result<bool> {
        match key {
            "num_train_timesteps" => self.num_train_timesteps = as_usize(key, v)?,
            "trained_betas" => {
                if !v.is_null() {
                    let list = v.as_array().ok_or_else(|| Error::invalid(key, "expected a list of numbers or null"))?;
                    self.trained_betas = Some(list.iter().map(|b| as_f64(key, b)).collect::<Result<Vec<_>>>()?);
                }
            }
            "prediction_type" => self.prediction_type = PredictionType::from_diffusers_name(&as_str(key, v)?)?,
            "clip_sample" => self.clip_sample = as_bool(key, v)?,
            "clip_sample_range" => self.clip_sample_range = as_f64(key, v)?,
            // DPMSolverMultistepScheduler's default `null` (no learned variance) reads as
            // DDPMScheduler reads it: the posterior variance, fixed_small.
            "variance_type" if v.is_null() => self.variance_type = VarianceType::FixedSmall,
            "variance_type" => {
                self.variance_type = match as_str(key, v)?.as_str() {
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
            "timestep_spacing" => self.timestep_spacing = Spacing::parse(&as_str(key, v)?)?,
            "steps_offset" => self.steps_offset = as_usize(key, v)?,
            "set_alpha_to_one" => self.set_alpha_to_one = as_bool(key, v)?,
            "use_lu_lambdas" => self.use_lu_lambdas = as_bool(key, v)?,
            _ => return Ok(false),
        }
        Ok(true)
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

    /// The default spacing of the multistep solvers (DPM-Solver++, UniPC): `logsnr` with
    /// `use_lu_lambdas`, else their diffusers default `linspace`.
    pub fn multistep_spacing(&self) -> Spacing {
        if self.use_lu_lambdas {
            Spacing::LogSnr
        } else {
            Spacing::Linspace
        }
    }

    /// The DDIM/DDPM integer timesteps of `spacing` for `K` steps: [`grid::timesteps`] with this
    /// config's `T` and `steps_offset`, or for `logsnr` [`grid::logsnr_timesteps`], which is an
    /// error where it repeats a timestep.
    pub fn timesteps(&self, num_steps: usize, spacing: Spacing) -> Result<Vec<i64>> {
        match spacing {
            Spacing::LogSnr => self.distinct_logsnr_timesteps(num_steps),
            _ => grid::timesteps(self.num_train_timesteps, num_steps, spacing, self.steps_offset),
        }
    }

    /// The multistep solvers' integer timesteps of `spacing` for `K` steps:
    /// [`grid::multistep_timesteps`] with this config's `T` and `steps_offset`, or for `logsnr`
    /// the same list as [`Self::timesteps`] (diffusers' `use_lu_lambdas` list, where it does not
    /// repeat a timestep).
    pub fn multistep_timesteps(&self, num_steps: usize, spacing: Spacing) -> Result<Vec<i64>> {
        match spacing {
            Spacing::LogSnr => self.distinct_logsnr_timesteps(num_steps),
            _ => grid::multistep_timesteps(self.num_train_timesteps, num_steps, spacing, self.steps_offset),
        }
    }

    fn distinct_logsnr_timesteps(&self, num_steps: usize) -> Result<Vec<i64>> {
        let list = grid::logsnr_timesteps(self, num_steps)?;
        grid::check_distinct(&list, Spacing::LogSnr, self.num_train_timesteps).map_err(|e| match e {
            Error::Invalid { what, msg } => Error::invalid(
                what,
                format!(
                    "{msg}; diffusers would call the model twice there. Use fewer steps, or a GGDM \
                     start, whose log-SNR grid is continuous"
                ),
            ),
            other => other,
        })?;
        Ok(list)
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
        let mut json = serde_json::json!({
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
        });
        if self.use_lu_lambdas {
            json["use_lu_lambdas"] = Value::Bool(true);
        }
        json
    }
}

/// The keys that define the beta schedule, read before the schedule is built from them.
struct BetaKeys {
    beta_start: f64,
    beta_end: f64,
    schedule_name: String,
    lambda_min_clipped: f64,
}

impl Default for BetaKeys {
    fn default() -> Self {
        Self { beta_start: 1e-4, beta_end: 0.02, schedule_name: "linear".into(), lambda_min_clipped: f64::NEG_INFINITY }
    }
}

impl BetaKeys {
    /// Reads `key` when it is one of these; `false` when it is not.
    fn read(&mut self, key: &str, v: &Value) -> Result<bool> {
        match key {
            "beta_start" => self.beta_start = as_f64(key, v)?,
            "beta_end" => self.beta_end = as_f64(key, v)?,
            "beta_schedule" => self.schedule_name = as_str(key, v)?,
            "lambda_min_clipped" => self.lambda_min_clipped = lambda_min_clipped_value(v)?,
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// The schedule the keys name.
    fn schedule(&self) -> Result<BetaSchedule> {
        let (beta_start, beta_end) = (self.beta_start, self.beta_end);
        Ok(match self.schedule_name.as_str() {
            "linear" => BetaSchedule::Linear { beta_start, beta_end },
            "scaled_linear" => BetaSchedule::ScaledLinear { beta_start, beta_end },
            "squaredcos_cap_v2" => BetaSchedule::SquaredCosCapV2,
            other => {
                return Err(Error::invalid(
                    "beta_schedule",
                    format!("`{other}` (expected linear, scaled_linear or squaredcos_cap_v2)"),
                ))
            }
        })
    }
}

/// A key that is no setting of ours: a switch that must be off, a key of another scheduler that
/// DDPM/DDIM ignore, the embedded learned sampler, or an error naming the unknown key.
fn check_other_key(key: &str, v: &Value) -> Result<()> {
    match key {
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
        "use_karras_sigmas" => {
            if as_bool(key, v)? {
                return Err(Error::invalid(
                    key,
                    "Karras sigmas are not supported (use_lu_lambdas: true, or --spacing logsnr, gives \
                     DPM-Solver's log-SNR-uniform grid)",
                ));
            }
        }
        k if UNSUPPORTED_SWITCHES.iter().any(|(name, _)| *name == k) => {
            if as_bool(key, v)? {
                let (_, why) = UNSUPPORTED_SWITCHES.iter().find(|(name, _)| *name == k).expect("listed");
                return Err(Error::invalid(key, *why));
            }
        }
        "clip_sample_range_max" => {}
        // The learned sampler of the Python package's GGDMScheduler (`ddss-cli export
        // --format diffusers-scheduler`): the keys around it are the model's settings,
        // which is all a model needs; the sampler itself is read with `--sampler`.
        "sampler" => {
            if !v.is_object() {
                return Err(Error::invalid(key, format!("expected a sampler.json object, got {v}")));
            }
        }
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
    Ok(())
}

fn as_f64(key: &str, v: &Value) -> Result<f64> {
    v.as_f64().ok_or_else(|| Error::invalid(key, format!("expected a number, got {v}")))
}

fn as_bool(key: &str, v: &Value) -> Result<bool> {
    v.as_bool().ok_or_else(|| Error::invalid(key, format!("expected true/false, got {v}")))
}

fn as_str(key: &str, v: &Value) -> Result<String> {
    v.as_str().map(str::to_string).ok_or_else(|| Error::invalid(key, format!("expected a string, got {v}")))
}

fn as_usize(key: &str, v: &Value) -> Result<usize> {
    v.as_u64()
        .map(|n| n as usize)
        .ok_or_else(|| Error::invalid(key, format!("expected a non-negative integer, got {v}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<SchedulerConfig> {
        let value: Value = serde_json::from_str(text).expect("test JSON");
        SchedulerConfig::from_json_map(value.as_object().expect("object"))
    }

    #[test]
    fn use_lu_lambdas_makes_logsnr_the_multistep_default() {
        let plain = parse(r#"{"beta_schedule": "linear"}"#).expect("plain");
        assert!(!plain.use_lu_lambdas);
        assert_eq!(plain.multistep_spacing(), Spacing::Linspace);
        let lu = parse(r#"{"_class_name": "DPMSolverMultistepScheduler", "use_lu_lambdas": true}"#).expect("lu");
        assert_eq!(lu.multistep_spacing(), Spacing::LogSnr);
        // diffusers 0.42.1, DPMSolverMultistepScheduler(use_lu_lambdas=True).set_timesteps(10).
        let expected = vec![999, 886, 757, 603, 410, 202, 73, 22, 5, 0];
        assert_eq!(lu.multistep_timesteps(10, lu.multistep_spacing()).expect("grid"), expected);
        assert_eq!(lu.timesteps(10, Spacing::LogSnr).expect("grid"), expected);
        // DDIM/DDPM keep their own default spacing.
        assert_eq!(lu.timestep_spacing, Spacing::Leading);
        let err = parse(r#"{"use_lu_lambdas": "yes"}"#).expect_err("not a bool").to_string();
        assert!(err.contains("use_lu_lambdas"), "{err}");
    }

    #[test]
    fn use_lu_lambdas_round_trips_and_stays_out_of_files_when_false() {
        let plain = SchedulerConfig::default();
        let text = serde_json::to_string(&plain).expect("serialise");
        assert!(!text.contains("use_lu_lambdas"), "{text}");
        let lu = SchedulerConfig { use_lu_lambdas: true, ..SchedulerConfig::default() };
        let back: SchedulerConfig =
            serde_json::from_str(&serde_json::to_string(&lu).expect("serialise")).expect("load");
        assert_eq!(back, lu);
        let diffusers = lu.to_diffusers_json();
        assert_eq!(diffusers["use_lu_lambdas"], Value::Bool(true));
        assert_eq!(SchedulerConfig::from_json_map(diffusers.as_object().expect("object")).expect("parse"), lu);
        assert!(plain.to_diffusers_json().get("use_lu_lambdas").is_none());
    }

    #[test]
    fn a_ggdm_scheduler_config_gives_the_model_settings_around_its_sampler() {
        let mut config = SchedulerConfig { prediction_type: PredictionType::VPrediction, ..SchedulerConfig::default() }
            .to_diffusers_json();
        config["_class_name"] = Value::from("GGDMScheduler");
        config["sampler"] = serde_json::json!({"format": "ddss-ggdm-sampler", "version": 2});
        let parsed = SchedulerConfig::from_json_map(config.as_object().expect("object")).expect("parse");
        assert_eq!(parsed.prediction_type, PredictionType::VPrediction);
        config["sampler"] = Value::from("sampler.json");
        let err = SchedulerConfig::from_json_map(config.as_object().expect("object")).expect_err("not an object");
        assert!(err.to_string().contains("sampler"), "{err}");
    }

    #[test]
    fn python_non_finite_tokens_become_strings_outside_string_literals() {
        let text = r#"{"a": -Infinity, "b": [Infinity,NaN], "c": "NaN, -Infinity \" Infinity", "d": 1.5}"#;
        let value: Value = serde_json::from_str(&quote_non_finite_tokens(text)).expect("parses");
        assert_eq!(value["a"], "-Infinity");
        assert_eq!(value["b"], serde_json::json!(["Infinity", "NaN"]));
        assert_eq!(value["c"], r#"NaN, -Infinity " Infinity"#);
        assert_eq!(value["d"], 1.5);
        let plain = r#"{"beta_schedule": "linear"}"#;
        assert!(matches!(quote_non_finite_tokens(plain), Cow::Borrowed(t) if t == plain));
    }

    #[test]
    fn lambda_min_clipped_minus_infinity_null_and_absent_change_nothing() {
        let plain = parse(r#"{"beta_schedule": "squaredcos_cap_v2"}"#).expect("absent");
        for value in [r#""-Infinity""#, "null", "-1e308", "-9.92"] {
            let text = format!(r#"{{"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": {value}}}"#);
            assert_eq!(parse(&text).unwrap_or_else(|e| panic!("{value}: {e}")), plain, "{value}");
        }
        for (value, shown) in [(r#""Infinity""#, "inf"), (r#""NaN""#, "NaN"), ("-9.9", "-9.9"), ("0", "0")] {
            let text = format!(r#"{{"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": {value}}}"#);
            let err = parse(&text).expect_err(value).to_string();
            assert!(err.contains("lambda_min_clipped") && err.contains(shown), "{value}: {err}");
        }
        let err = parse(r#"{"lambda_min_clipped": "low"}"#).expect_err("a string").to_string();
        assert!(err.contains("lambda_min_clipped") && err.contains("low"), "{err}");
        // A non-finite value where a number is needed is named.
        let err = parse(r#"{"beta_end": "NaN"}"#).expect_err("NaN").to_string();
        assert!(err.contains("beta_end") && err.contains("NaN"), "{err}");
    }

    #[test]
    fn keys_of_the_multistep_schedulers_other_sigma_schedules() {
        let cfg = parse(
            r#"{"variance_type": null, "flow_shift": 1.0, "time_shift_type": "exponential", "shift_terminal": null,
                "sigma_min": null, "sigma_max": null, "solver_p": null, "predict_x0": true, "disable_corrector": [],
                "use_exponential_sigmas": false, "use_beta_sigmas": false, "use_flow_sigmas": false,
                "use_dynamic_shifting": false}"#,
        )
        .expect("defaults");
        assert_eq!(cfg.variance_type, VarianceType::FixedSmall);
        for key in ["use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas", "use_dynamic_shifting"] {
            let err = parse(&format!(r#"{{"{key}": true}}"#)).expect_err(key).to_string();
            assert!(err.contains(key) && err.contains("not supported"), "{err}");
        }
    }

    #[test]
    fn karras_sigmas_are_rejected_by_name() {
        assert!(parse(r#"{"use_karras_sigmas": false}"#).is_ok());
        let err = parse(r#"{"use_karras_sigmas": true}"#).expect_err("karras").to_string();
        assert!(err.contains("use_karras_sigmas") && err.contains("not supported"), "{err}");
    }

    #[test]
    fn a_repeating_logsnr_list_is_an_error_for_samplers() {
        let cfg = SchedulerConfig::default();
        // diffusers' list for K = 50 ends [..., 2, 1, 1, 0]: grid::logsnr_timesteps returns it,
        // the sampler-facing methods refuse it.
        let raw = grid::logsnr_timesteps(&cfg, 50).expect("raw list");
        assert_eq!(&raw[44..], &[4, 3, 2, 1, 1, 0]);
        for err in [cfg.timesteps(50, Spacing::LogSnr), cfg.multistep_timesteps(50, Spacing::LogSnr)] {
            let err = err.expect_err("repeat").to_string();
            assert!(err.contains("logsnr") && err.contains("repeat") && err.contains("fewer steps"), "{err}");
        }
        // The schedule-free functions point to the ones that know the schedule.
        let err = grid::timesteps(1000, 10, Spacing::LogSnr, 0).expect_err("no schedule").to_string();
        assert!(err.contains("logsnr") && err.contains("SchedulerConfig::timesteps"), "{err}");
        assert!(grid::multistep_timesteps(1000, 10, Spacing::LogSnr, 0).is_err());
    }
}
