//! Discrete noise schedules and their continuous-time extension (DESIGN.md section 4,
//! "Discrete schedule" and "Continuous time").
//!
//! `beta_t` for t = 0..T-1 in diffusers' indexing, `abar_t = prod_{i<=t} (1 - beta_i)`, all in f64.
//! Continuous time `tau` interpolates `log abar` linearly between integers. One extra point,
//! `tau = -1`, stands for the clean data (`abar = 1`, the `set_alpha_to_one` convention), so a
//! grid can end exactly at clean data and a learned grid can move anywhere in `[-1, T-1]`.
//!
//! diffusers stores its tables in float32; ours are the f64 values of the same definitions
//! (the fixtures pin both).

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// The continuous-time position of clean data (`abar = 1`).
pub const TAU_CLEAN: f64 = -1.0;

/// The largest `num_train_timesteps` accepted (diffusers models use 1000 or 4000); a bound, so
/// that a corrupt file cannot ask for an impossible allocation.
pub const MAX_TRAIN_TIMESTEPS: usize = 1_000_000;

/// diffusers' `beta_schedule`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum BetaSchedule {
    /// `linspace(beta_start, beta_end, T)` (diffusers `"linear"`; DDPM uses 1e-4..0.02).
    Linear { beta_start: f64, beta_end: f64 },
    /// `linspace(sqrt(beta_start), sqrt(beta_end), T)^2` (diffusers `"scaled_linear"`).
    ScaledLinear { beta_start: f64, beta_end: f64 },
    /// The cosine schedule of Nichol & Dhariwal with `s = 0.008` and betas capped at 0.999
    /// (diffusers `"squaredcos_cap_v2"`).
    SquaredCosCapV2,
}

impl BetaSchedule {
    /// The DDPM default: linear 1e-4..0.02.
    pub fn ddpm_linear() -> Self {
        BetaSchedule::Linear { beta_start: 1e-4, beta_end: 0.02 }
    }

    /// diffusers' name for this schedule.
    pub fn diffusers_name(&self) -> &'static str {
        match self {
            BetaSchedule::Linear { .. } => "linear",
            BetaSchedule::ScaledLinear { .. } => "scaled_linear",
            BetaSchedule::SquaredCosCapV2 => "squaredcos_cap_v2",
        }
    }

    /// The `T` betas.
    pub fn betas(&self, num_train_timesteps: usize) -> Result<Vec<f64>> {
        if num_train_timesteps < 2 {
            return Err(Error::invalid("num_train_timesteps", format!("{num_train_timesteps} (need at least 2)")));
        }
        if num_train_timesteps > MAX_TRAIN_TIMESTEPS {
            return Err(Error::invalid(
                "num_train_timesteps",
                format!("{num_train_timesteps} (at most {MAX_TRAIN_TIMESTEPS} are supported)"),
            ));
        }
        let t_count = num_train_timesteps;
        let betas = match *self {
            BetaSchedule::Linear { beta_start, beta_end } => linspace(beta_start, beta_end, t_count),
            BetaSchedule::ScaledLinear { beta_start, beta_end } => {
                linspace(beta_start.sqrt(), beta_end.sqrt(), t_count).into_iter().map(|b| b * b).collect()
            }
            BetaSchedule::SquaredCosCapV2 => {
                let abar_fn = |u: f64| ((u + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2).cos().powi(2);
                (0..t_count)
                    .map(|i| {
                        let t1 = i as f64 / t_count as f64;
                        let t2 = (i + 1) as f64 / t_count as f64;
                        (1.0 - abar_fn(t2) / abar_fn(t1)).min(0.999)
                    })
                    .collect()
            }
        };
        Ok(betas)
    }
}

/// `n` evenly spaced values from `start` to `end` inclusive.
fn linspace(start: f64, end: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f64;
    (0..n).map(|i| start + step * i as f64).collect()
}

/// A discrete schedule with its cumulative products; cheap to clone.
#[derive(Debug, Clone, PartialEq)]
pub struct NoiseSchedule {
    betas: Vec<f64>,
    abar: Vec<f64>,
    /// `abar` of the point after the last step ("clean"): 1 with diffusers' `set_alpha_to_one`
    /// (DDIM default), `abar_0` without.
    final_abar: f64,
}

impl NoiseSchedule {
    /// Builds the schedule from a named beta schedule.
    pub fn new(schedule: BetaSchedule, num_train_timesteps: usize) -> Result<Self> {
        Self::from_betas(schedule.betas(num_train_timesteps)?)
    }

    /// The DDPM schedule: linear betas 1e-4..0.02, T = 1000.
    pub fn ddpm_linear_1000() -> Self {
        Self::from_betas(linspace(1e-4, 0.02, 1000)).expect("the DDPM schedule is valid")
    }

    /// Builds the schedule from explicit betas (diffusers' `trained_betas`).
    pub fn from_betas(betas: Vec<f64>) -> Result<Self> {
        if betas.len() < 2 {
            return Err(Error::invalid("betas", format!("{} values (need at least 2)", betas.len())));
        }
        if let Some((i, b)) = betas.iter().enumerate().find(|(_, b)| !(**b > 0.0 && **b < 1.0)) {
            return Err(Error::invalid("betas", format!("beta[{i}] = {b} is outside (0, 1)")));
        }
        let mut abar = Vec::with_capacity(betas.len());
        let mut prod = 1.0;
        for b in &betas {
            prod *= 1.0 - b;
            abar.push(prod);
        }
        Ok(Self { betas, abar, final_abar: 1.0 })
    }

    /// Sets what "clean" means after the last step (diffusers' `set_alpha_to_one`).
    pub fn with_set_alpha_to_one(mut self, set_alpha_to_one: bool) -> Self {
        self.final_abar = if set_alpha_to_one { 1.0 } else { self.abar[0] };
        self
    }

    /// `T`.
    pub fn num_train_timesteps(&self) -> usize {
        self.betas.len()
    }

    /// `beta_t`, t = 0..T-1.
    pub fn betas(&self) -> &[f64] {
        &self.betas
    }

    /// `abar_t`, t = 0..T-1.
    pub fn abar(&self) -> &[f64] {
        &self.abar
    }

    /// `abar_t` as diffusers' schedulers hold it (`alphas_cumprod`, float32): each beta rounded to
    /// float32, `1 - beta` formed in float32, the product accumulated in f64 and every entry
    /// rounded to float32 (what torch's CPU `cumprod` does with float32 input).
    ///
    /// This differs from `abar` rounded to float32 where a beta is close to 1: the cosine
    /// schedule caps its last beta at 0.999, float32 holds that as 0.99900001, and `1 - beta`
    /// becomes 9.99987e-4, so diffusers' `abar_{T-1}` is 1.3e-5 (relative) below the exact one.
    /// For the cosine schedule and for `trained_betas` the result equals diffusers' table bit for
    /// bit; linear and scaled-linear betas diffusers forms with a float32 `linspace` (whose last
    /// bit depends on the CPU's vector width), and there the entries agree to a few float32 ulps
    /// (2 for DDPM's linear betas, 6 for scaled_linear 0.00085..0.012; `abar` rounded to float32
    /// is 6 and 15 ulps off).
    pub fn abar_f32(&self) -> Vec<f32> {
        let mut product = 1.0f64;
        self.betas
            .iter()
            .map(|&beta| {
                product *= f64::from(1.0f32 - beta as f32);
                product as f32
            })
            .collect()
    }

    /// `abar` after the final step (1 or `abar_0`).
    pub fn final_abar(&self) -> f64 {
        self.final_abar
    }

    /// The largest valid continuous time, `T - 1`.
    pub fn tau_max(&self) -> f64 {
        (self.betas.len() - 1) as f64
    }

    /// `log abar` at the integer knots `tau = -1, 0, ..., T-1` (index `k` is `tau = k - 1`).
    fn log_abar_knots(&self) -> impl Iterator<Item = f64> + '_ {
        std::iter::once(0.0).chain(self.abar.iter().map(|a| a.ln()))
    }

    /// `abar` at an integer timestep, or `final_abar` for `None`/negative (diffusers' rule).
    pub fn abar_at_step(&self, t: Option<i64>) -> f64 {
        match t {
            Some(t) if t >= 0 => self.abar[t as usize],
            _ => self.final_abar,
        }
    }

    /// Continuous `abar(tau)` for `tau in [-1, T-1]`: log-linear interpolation; exact at integers;
    /// `abar(-1) = 1`. Values outside the range are clamped.
    pub fn abar_continuous(&self, tau: f64) -> f64 {
        let t_max = self.tau_max();
        let tau = tau.clamp(TAU_CLEAN, t_max);
        let pos = tau + 1.0; // index into the knots
        if tau >= t_max {
            return self.abar[self.betas.len() - 1];
        }
        let lo = (pos.floor() as usize).min(self.betas.len() - 1);
        let frac = pos - lo as f64;
        let abar_lo = if lo == 0 { 1.0 } else { self.abar[lo - 1] };
        if frac == 0.0 {
            return abar_lo;
        }
        let log_lo = abar_lo.ln();
        let log_hi = self.abar[lo].ln();
        (log_lo + (log_hi - log_lo) * frac).exp()
    }

    /// `log abar` at the knots as a 1-D tensor (for [`Self::abar_tensor`]).
    pub fn log_abar_table(&self, kind: Kind, device: tch::Device) -> Tensor {
        let knots: Vec<f64> = self.log_abar_knots().collect();
        Tensor::from_slice(&knots).to_kind(kind).to_device(device)
    }

    /// Differentiable `abar(tau)` for a tensor of continuous times (any shape), given the table from
    /// [`Self::log_abar_table`]. Gradients flow to `tau` through the interpolation weight.
    pub fn abar_tensor(table: &Tensor, tau: &Tensor) -> Tensor {
        let n_knots = table.size()[0];
        let pos = (tau + 1.0).clamp(0.0, (n_knots - 1) as f64);
        let lo = pos.detach().floor().clamp(0.0, (n_knots - 2) as f64);
        let frac = &pos - &lo;
        let lo_idx = lo.to_kind(Kind::Int64);
        let hi_idx = &lo_idx + 1;
        let shape = tau.size();
        let log_lo = table.index_select(0, &lo_idx.reshape([-1])).reshape(&shape[..]);
        let log_hi = table.index_select(0, &hi_idx.reshape([-1])).reshape(&shape[..]);
        (&log_lo + (&log_hi - &log_lo) * frac).exp()
    }

    /// The continuous time whose `abar` equals the given value (inverse of
    /// [`Self::abar_continuous`]); used to query a model where signal-to-noise ratios match.
    pub fn tau_for_abar(&self, abar: f64) -> f64 {
        let target = abar.clamp(f64::MIN_POSITIVE, 1.0).ln();
        let knots: Vec<f64> = self.log_abar_knots().collect();
        if target >= knots[0] {
            return TAU_CLEAN;
        }
        let last = knots.len() - 1;
        if target <= knots[last] {
            return self.tau_max();
        }
        // knots decrease strictly: find k with knots[k] >= target > knots[k+1]
        let k = knots.partition_point(|&v| v >= target) - 1;
        let frac = (knots[k] - target) / (knots[k] - knots[k + 1]);
        k as f64 - 1.0 + frac
    }
}
