//! The training-free baselines as small pure functions with injectable noise (DESIGN.md section 4):
//! DDIM(eta) and DDPM ancestral sampling, step for step as diffusers' `DDIMScheduler.step` and
//! `DDPMScheduler.step` compute them (clipping, `set_alpha_to_one`, `variance_type`), but at any
//! continuous timesteps. Nothing here switches gradients off: a caller that wants no autograd wraps
//! the call in `tch::no_grad`.

use crate::denoiser::Denoiser;
use crate::grid::diffusers_prev_timestep;
use crate::noise::NoiseSource;
use crate::prediction::to_x0_eps_scalar;
use crate::schedule::NoiseSchedule;
use crate::scheduler_config::VarianceType;
use crate::{Error, Result};
use tch::{Kind, Tensor};

/// One sampler step: from time `t` to time `prev` (`None` = clean data).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Step {
    /// The current (continuous) timestep.
    pub t: f64,
    /// The timestep reached by the step; `None` means clean data.
    pub prev: Option<f64>,
}

/// Steps over an integer grid with diffusers' rule `prev = t - T // K` (what its pipelines do).
pub fn diffusers_steps(grid: &[i64], num_train_timesteps: usize) -> Vec<Step> {
    let k = grid.len().max(1);
    grid.iter()
        .map(|&t| Step { t: t as f64, prev: diffusers_prev_timestep(t, num_train_timesteps, k).map(|p| p as f64) })
        .collect()
}

/// Steps that go from each grid entry to the next, the last one to clean data.
pub fn grid_steps(grid: &[f64]) -> Vec<Step> {
    grid.iter().enumerate().map(|(i, &t)| Step { t, prev: grid.get(i + 1).copied() }).collect()
}

/// DDIM options (diffusers' `step(eta=..., use_clipped_model_output=...)` plus the config's clipping).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DdimOptions {
    /// 0 = deterministic DDIM, 1 = DDPM-like variance.
    pub eta: f64,
    /// `clip_sample_range` when `clip_sample` is on.
    pub clip: Option<f64>,
    /// Recompute `eps` from the clipped `x0` (diffusers' `use_clipped_model_output`).
    pub use_clipped_model_output: bool,
}

impl Default for DdimOptions {
    fn default() -> Self {
        Self { eta: 0.0, clip: None, use_clipped_model_output: false }
    }
}

fn check_steps(steps: &[Step], schedule: &NoiseSchedule) -> Result<()> {
    if steps.is_empty() {
        return Err(Error::invalid("steps", "no sampling steps"));
    }
    let t_max = schedule.tau_max();
    for (i, s) in steps.iter().enumerate() {
        if !(s.t >= 0.0 && s.t <= t_max) {
            return Err(Error::invalid("timesteps", format!("step {i} has t = {} outside [0, {t_max}]", s.t)));
        }
    }
    Ok(())
}

fn abar_prev(schedule: &NoiseSchedule, prev: Option<f64>) -> f64 {
    match prev {
        Some(p) if p >= 0.0 => schedule.abar_continuous(p),
        _ => schedule.final_abar(),
    }
}

pub(crate) fn query<D: Denoiser + ?Sized>(model: &D, x: &Tensor, t: f64) -> Result<Tensor> {
    let n = x.size()[0];
    let tau = Tensor::full([n], t, (Kind::Float, x.device()));
    crate::denoiser::checked_forward(model, x, &tau)
}

/// A prediction function: `(x_t, abar_t) -> (x0_hat, eps_hat)`.
pub type PredictFn<'a> = dyn Fn(&Tensor, f64) -> Result<(Tensor, Tensor)> + 'a;

/// One DDIM step given the network output at `(x, step.t)`.
pub fn ddim_step(
    schedule: &NoiseSchedule,
    model: &PredictFn,
    x: &Tensor,
    step: Step,
    options: &DdimOptions,
    noise: &mut dyn NoiseSource,
) -> Result<Tensor> {
    let abar_t = schedule.abar_continuous(step.t);
    let abar_s = abar_prev(schedule, step.prev);
    let (mut x0, mut eps) = model(x, abar_t)?;
    if let Some(range) = options.clip {
        x0 = x0.clamp(-range, range);
        if options.use_clipped_model_output {
            eps = (x - &x0 * abar_t.sqrt()) / (1.0 - abar_t).sqrt();
        }
    }
    let variance = (1.0 - abar_s) / (1.0 - abar_t) * (1.0 - abar_t / abar_s);
    let std_dev = options.eta * variance.sqrt();
    let direction = eps * (1.0 - abar_s - std_dev * std_dev).max(0.0).sqrt();
    let mut out = x0 * abar_s.sqrt() + direction;
    if options.eta > 0.0 {
        let z = noise.next(&x.size(), x.device())?.to_kind(x.kind());
        out += z * std_dev;
    }
    Ok(out)
}

/// DDIM(eta) from `x_init` over `steps`; `on_step(i)` is called after step `i`.
pub fn ddim<D: Denoiser + ?Sized>(
    model: &D,
    schedule: &NoiseSchedule,
    steps: &[Step],
    x_init: &Tensor,
    options: &DdimOptions,
    noise: &mut dyn NoiseSource,
    on_step: &mut dyn FnMut(usize),
) -> Result<Tensor> {
    check_steps(steps, schedule)?;
    if options.eta < 0.0 || options.eta.is_nan() {
        return Err(Error::invalid("eta", format!("{} (must be >= 0)", options.eta)));
    }
    let mut x = x_init.shallow_clone();
    for (i, &step) in steps.iter().enumerate() {
        let kind = model.prediction_type();
        let predict = |x: &Tensor, abar_t: f64| -> Result<(Tensor, Tensor)> {
            let out = query(model, x, step.t)?;
            Ok(to_x0_eps_scalar(kind, &out, x, abar_t))
        };
        x = ddim_step(schedule, &predict, &x, step, options, noise)?;
        on_step(i);
    }
    Ok(x)
}

/// DDPM options.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct DdpmOptions {
    /// diffusers' `variance_type`.
    pub variance_type: VarianceType,
    /// `clip_sample_range` when `clip_sample` is on (diffusers' DDPM default: 1.0).
    pub clip: Option<f64>,
}

/// DDPM ancestral sampling as diffusers' `DDPMScheduler.step` does it (noise added while `t > 0`;
/// "clean" has `abar = 1`).
pub fn ddpm<D: Denoiser + ?Sized>(
    model: &D,
    schedule: &NoiseSchedule,
    steps: &[Step],
    x_init: &Tensor,
    options: &DdpmOptions,
    noise: &mut dyn NoiseSource,
    on_step: &mut dyn FnMut(usize),
) -> Result<Tensor> {
    check_steps(steps, schedule)?;
    let mut x = x_init.shallow_clone();
    for (i, &step) in steps.iter().enumerate() {
        let abar_t = schedule.abar_continuous(step.t);
        let abar_s = match step.prev {
            Some(p) if p >= 0.0 => schedule.abar_continuous(p),
            _ => 1.0,
        };
        let out = query(model, &x, step.t)?;
        let (mut x0, _) = to_x0_eps_scalar(model.prediction_type(), &out, &x, abar_t);
        if let Some(range) = options.clip {
            x0 = x0.clamp(-range, range);
        }
        let alpha_step = abar_t / abar_s;
        let beta_step = 1.0 - alpha_step;
        let coef_x0 = abar_s.sqrt() * beta_step / (1.0 - abar_t);
        let coef_xt = alpha_step.sqrt() * (1.0 - abar_s) / (1.0 - abar_t);
        let mut next = x0 * coef_x0 + &x * coef_xt;
        if step.t > 0.0 {
            let posterior = ((1.0 - abar_s) / (1.0 - abar_t) * beta_step).max(1e-20);
            let std_dev = match options.variance_type {
                VarianceType::FixedSmall => posterior.sqrt(),
                VarianceType::FixedSmallLog => (0.5 * posterior.ln()).exp(),
                VarianceType::FixedLarge => beta_step.sqrt(),
            };
            let z = noise.next(&x.size(), x.device())?.to_kind(x.kind());
            next += z * std_dev;
        }
        x = next;
        on_step(i);
    }
    Ok(x)
}
