//! Timestep grids (DESIGN.md section 4, "Timestep grid"): the integer lists of diffusers'
//! `timestep_spacing` options for DDIM/DDPM `set_timesteps` ([`timesteps`]) and for the multistep
//! solvers DPM-Solver++ / UniPC ([`multistep_timesteps`]), the quadratic stride of the DDIM
//! paper, and DPM-Solver's log-SNR-uniform grid ([`logsnr_timesteps`], [`logsnr_grid`]). Grids
//! are descending; the sampler goes from the first entry to clean data.
//!
//! The integer lists reproduce numpy's arithmetic (round-half-to-even, `arange` with a float step)
//! so they equal diffusers' for every `(T, K)`; the fixtures check this.
//!
//! **Log-SNR-uniform grids.** `lambda = log(alpha / sigma) = log(abar / (1 - abar)) / 2` takes `K`
//! uniformly spaced values from `lambda(T-1)` to `lambda(0)`, both ends included (`K = 1` is
//! `T - 1` alone). The grid depends on the schedule, not only on `T` and `K`, so it has its own
//! functions (the schedule-free [`timesteps`] and [`multistep_timesteps`] reject it); the
//! dispatchers over every spacing are [`SchedulerConfig::timesteps`] and
//! [`SchedulerConfig::multistep_timesteps`]. Two versions exist:
//! * [`logsnr_timesteps`] is diffusers' only such grid, `DPMSolverMultistepScheduler` with
//!   `use_lu_lambdas=True`: each level is mapped to a fractional `t` by linear interpolation of
//!   `log sigma` between integer timesteps (`_sigma_to_t`), and `t` is rounded (truncated for
//!   `squaredcos_cap_v2`) to the integer the model is called at. diffusers still steps on the
//!   unrounded sigmas; our baselines (`ddss-cli sample --spacing logsnr`) run on the integer list,
//!   so the model and the step use the same level, that of the rounded timestep.
//! * [`logsnr_grid`] is continuous: the times `tau` whose `abar(tau)` under our log-linear
//!   interpolation of `abar` ([`NoiseSchedule::abar_continuous`]) has exactly the uniform
//!   log-SNR levels. Its levels are diffusers' unrounded sigmas (up to diffusers' float32 tables);
//!   its times differ from diffusers' fractional `t` only because diffusers interpolates
//!   `log sigma` where we interpolate `log abar`. It is the grid for a GGDM start.
use crate::schedule::{BetaSchedule, NoiseSchedule};
use crate::scheduler_config::SchedulerConfig;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// How `K` timesteps are placed in `[0, T-1]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Spacing {
    /// diffusers `"leading"`: `k * (T // K) + steps_offset`, k = K-1..0 (diffusers' default).
    #[default]
    Leading,
    /// diffusers `"trailing"`: `round(T - k T / K) - 1`, k = 0..K-1.
    Trailing,
    /// diffusers `"linspace"`: `round(linspace(0, T-1, K))`, reversed.
    Linspace,
    /// DDIM paper's quadratic stride: `floor(linspace(0, sqrt(0.8 T), K)^2)`, reversed (repeated
    /// small values are bumped up by one so the grid stays strictly decreasing).
    Quadratic,
    /// DPM-Solver's log-SNR-uniform grid ([`logsnr_timesteps`], [`logsnr_grid`]; diffusers'
    /// `use_lu_lambdas=True`).
    #[serde(rename = "logsnr")]
    LogSnr,
}

impl Spacing {
    /// Parses `leading|trailing|linspace|quadratic|logsnr`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "leading" => Ok(Spacing::Leading),
            "trailing" => Ok(Spacing::Trailing),
            "linspace" => Ok(Spacing::Linspace),
            "quadratic" => Ok(Spacing::Quadratic),
            "logsnr" => Ok(Spacing::LogSnr),
            other => Err(Error::invalid(
                "timestep_spacing",
                format!("`{other}` (expected leading, trailing, linspace, quadratic or logsnr)"),
            )),
        }
    }

    /// The name used in configs and by diffusers.
    pub fn name(self) -> &'static str {
        match self {
            Spacing::Leading => "leading",
            Spacing::Trailing => "trailing",
            Spacing::Linspace => "linspace",
            Spacing::Quadratic => "quadratic",
            Spacing::LogSnr => "logsnr",
        }
    }
}

/// `K` descending integer timesteps for a model trained with `T` steps, exactly as diffusers'
/// `DDIMScheduler.set_timesteps` / `DDPMScheduler.set_timesteps` produce them
/// (`steps_offset` applies to `leading`, as in diffusers). `logsnr` needs the schedule: it is an
/// error here (see [`SchedulerConfig::timesteps`]).
pub fn timesteps(
    num_train_timesteps: usize,
    num_steps: usize,
    spacing: Spacing,
    steps_offset: usize,
) -> Result<Vec<i64>> {
    let t_count = num_train_timesteps;
    let k = num_steps;
    if k == 0 {
        return Err(Error::invalid("steps", "0 (need at least 1 sampling step)"));
    }
    if k > t_count {
        return Err(Error::invalid("steps", format!("{k} is more than num_train_timesteps = {t_count}")));
    }
    if t_count > crate::schedule::MAX_TRAIN_TIMESTEPS {
        return Err(Error::invalid(
            "num_train_timesteps",
            format!("{t_count} (at most {} are supported)", crate::schedule::MAX_TRAIN_TIMESTEPS),
        ));
    }
    let grid: Vec<i64> = match spacing {
        Spacing::Leading => {
            let ratio = (t_count / k) as i64;
            (0..k as i64).rev().map(|i| i * ratio + steps_offset as i64).collect()
        }
        Spacing::Trailing => {
            let ratio = t_count as f64 / k as f64;
            numpy_arange(t_count as f64, 0.0, -ratio).into_iter().map(|v| v.round_ties_even() as i64 - 1).collect()
        }
        Spacing::Linspace => {
            let mut v: Vec<i64> =
                numpy_linspace(0.0, (t_count - 1) as f64, k).into_iter().map(|v| v.round_ties_even() as i64).collect();
            v.reverse();
            v
        }
        Spacing::Quadratic => {
            let top = (t_count as f64 * 0.8).sqrt();
            let mut v: Vec<i64> = numpy_linspace(0.0, top, k).into_iter().map(|s| (s * s).floor() as i64).collect();
            // For large K the first squares floor to the same integer; keep the grid strictly
            // increasing by moving such entries up by one.
            for i in 1..v.len() {
                if v[i] <= v[i - 1] {
                    v[i] = v[i - 1] + 1;
                }
            }
            v.reverse();
            v
        }
        Spacing::LogSnr => return Err(logsnr_needs_schedule()),
    };
    if let Some(bad) = grid.iter().find(|&&t| t < 0 || t >= t_count as i64) {
        return Err(Error::invalid(
            "timesteps",
            format!("{spacing:?} spacing with steps_offset {steps_offset} gives timestep {bad} outside [0, {t_count})"),
        ));
    }
    Ok(grid)
}

/// `K` descending integer timesteps as diffusers' multistep solvers place them
/// (`DPMSolverMultistepScheduler.set_timesteps`, identical in `UniPCMultistepScheduler`). They
/// differ from [`timesteps`]: `linspace` and `leading` lay out `K + 1` points and drop the last
/// (the 0), so `linspace` is `round(linspace(0, T-1, K+1))` reversed without its final 0 and
/// `leading` is `k * (T // (K+1)) + steps_offset` for k = K..1; `trailing` is the same list as
/// DDIM's. `quadratic` (not a diffusers option) is the DDIM paper's list from [`timesteps`];
/// `logsnr` needs the schedule and is an error here (see [`SchedulerConfig::multistep_timesteps`]).
///
/// A `(T, K)` for which diffusers would repeat a timestep (possible for `leading` when
/// `K + 1 > T`) is an error.
pub fn multistep_timesteps(
    num_train_timesteps: usize,
    num_steps: usize,
    spacing: Spacing,
    steps_offset: usize,
) -> Result<Vec<i64>> {
    let t_count = num_train_timesteps;
    let k = num_steps;
    if k == 0 {
        return Err(Error::invalid("steps", "0 (need at least 1 sampling step)"));
    }
    if k >= t_count {
        return Err(Error::invalid(
            "steps",
            format!("{k}: the multistep solvers need fewer steps than num_train_timesteps = {t_count}"),
        ));
    }
    let grid: Vec<i64> = match spacing {
        Spacing::Linspace => numpy_linspace(0.0, (t_count - 1) as f64, k + 1)
            .into_iter()
            .skip(1)
            .rev()
            .map(|v| v.round_ties_even() as i64)
            .collect(),
        Spacing::Leading => {
            let ratio = (t_count / (k + 1)) as i64;
            (1..=k as i64).rev().map(|i| i * ratio + steps_offset as i64).collect()
        }
        Spacing::Trailing | Spacing::Quadratic => timesteps(t_count, k, spacing, steps_offset)?,
        Spacing::LogSnr => return Err(logsnr_needs_schedule()),
    };
    if let Some(bad) = grid.iter().find(|&&t| t < 0 || t >= t_count as i64) {
        return Err(Error::invalid(
            "timesteps",
            format!("{spacing:?} spacing with steps_offset {steps_offset} gives timestep {bad} outside [0, {t_count})"),
        ));
    }
    check_distinct(&grid, spacing, t_count)?;
    Ok(grid)
}

/// Rejects an integer list that repeats a timestep (a sampler cannot step from a level to itself).
pub(crate) fn check_distinct(grid: &[i64], spacing: Spacing, num_train_timesteps: usize) -> Result<()> {
    if grid.windows(2).any(|w| w[1] >= w[0]) {
        return Err(Error::invalid(
            "steps",
            format!(
                "{} {} steps over {num_train_timesteps} training steps repeat a timestep: {grid:?}",
                grid.len(),
                spacing.name()
            ),
        ));
    }
    Ok(())
}

fn logsnr_needs_schedule() -> Error {
    Error::invalid(
        "timestep_spacing",
        "`logsnr` depends on the noise schedule, not only on T and K: use SchedulerConfig::timesteps / \
         multistep_timesteps, grid::logsnr_timesteps or grid::logsnr_grid",
    )
}

/// The log-SNR `lambda = log(alpha / sigma) = log(abar / (1 - abar)) / 2` of a level.
pub fn log_snr(abar: f64) -> f64 {
    0.5 * (abar.ln() - (1.0 - abar).ln())
}

/// `K` log-SNR values uniform from `lambda(T-1)` (first) to `lambda(0)` (last), both included;
/// `K = 1` is `lambda(T-1)` alone (numpy's `linspace`, as diffusers' `_convert_to_lu` uses).
fn uniform_log_snrs(schedule: &NoiseSchedule, num_steps: usize) -> Result<Vec<f64>> {
    if num_steps == 0 {
        return Err(Error::invalid("steps", "0 (need at least 1 sampling step)"));
    }
    let abar = schedule.abar();
    Ok(numpy_linspace(log_snr(abar[abar.len() - 1]), log_snr(abar[0]), num_steps))
}

/// `K` descending continuous times `tau_1 = T-1 > ... > tau_K = 0` whose levels `abar(tau)`, under
/// our log-linear interpolation of `abar` ([`NoiseSchedule::abar_continuous`]), are uniform in
/// log-SNR (module docs). `K = 1` is `[T-1]`. The levels equal diffusers' unrounded
/// `use_lu_lambdas` sigmas; the times are the grid for a GGDM start with `spacing = "logsnr"`.
pub fn logsnr_grid(schedule: &NoiseSchedule, num_steps: usize) -> Result<Vec<f64>> {
    let lambdas = uniform_log_snrs(schedule, num_steps)?;
    let last = lambdas.len() - 1;
    Ok(lambdas
        .iter()
        .enumerate()
        .map(|(i, &lambda)| match i {
            // The ends are training timesteps; pin them against rounding in the inversion.
            0 => schedule.tau_max(),
            i if i == last => 0.0,
            _ => schedule.tau_for_abar(1.0 / (1.0 + (-2.0 * lambda).exp())),
        })
        .collect())
}

/// diffusers' integer timesteps for `K` log-SNR-uniform steps: `DPMSolverMultistepScheduler`
/// with `use_lu_lambdas=True` (module docs). Each level is placed at a fractional `t` by linear
/// interpolation of `log sigma` between training timesteps, `sigma = sqrt((1 - abar) / abar)`, and
/// rounded half to even, or truncated when `beta_schedule` is `squaredcos_cap_v2` (diffusers'
/// rule). `K = 1` is `[T-1]`; `steps_offset` does not apply, as in diffusers.
///
/// The list is diffusers' exactly, so it may repeat a timestep (where training timesteps are
/// further apart in log-SNR than the steps: near `t = 0` for large `K`, near `T-1` for the
/// cosine schedule); [`SchedulerConfig::timesteps`] rejects such a list for a sampler.
pub fn logsnr_timesteps(scheduler: &SchedulerConfig, num_steps: usize) -> Result<Vec<i64>> {
    if num_steps == 0 {
        return Err(Error::invalid("steps", "0 (need at least 1 sampling step)"));
    }
    let schedule = scheduler.schedule()?;
    let log_sigmas: Vec<f64> = schedule.abar().iter().map(|&abar| diffusers_log_sigma(abar)).collect();
    let ramp = numpy_linspace(0.0, 1.0, num_steps);
    let (largest, smallest) = (log_sigmas[log_sigmas.len() - 1], log_sigmas[0]);
    let truncate = scheduler.beta_schedule == BetaSchedule::SquaredCosCapV2;
    let last = num_steps - 1;
    Ok(ramp
        .iter()
        .enumerate()
        .map(|(i, &r)| {
            let t = match i {
                0 => schedule.tau_max(),
                i if i == last => 0.0,
                _ => diffusers_sigma_to_t(largest + r * (smallest - largest), &log_sigmas),
            };
            (if truncate { t.trunc() } else { t.round_ties_even() }) as i64
        })
        .collect())
}

/// `log sigma`, `sigma = sqrt((1 - abar) / abar)`, as diffusers' table holds it: formed in float32
/// from `abar` rounded to float32. Near clean data the float32 `1 - abar` moves it by about 1e-4,
/// enough to move a rounded timestep.
fn diffusers_log_sigma(abar: f64) -> f64 {
    let abar32 = abar as f32;
    ((1.0 - abar32) / abar32).sqrt().ln() as f64
}

/// diffusers' `_sigma_to_t`: the fractional timestep of `log sigma = log_sigma`, by linear
/// interpolation in the increasing table `log_sigmas` (clamped to its range).
fn diffusers_sigma_to_t(log_sigma: f64, log_sigmas: &[f64]) -> f64 {
    let below = log_sigmas.partition_point(|&v| v <= log_sigma);
    let low = below.saturating_sub(1).min(log_sigmas.len() - 2);
    let (lo, hi) = (log_sigmas[low], log_sigmas[low + 1]);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    low as f64 + w
}

/// numpy's `arange(start, stop, step)` for floats: length `ceil((stop - start) / step)`, values
/// `start + i * delta` with `delta = (start + step) - start`.
fn numpy_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil().max(0.0) as usize;
    let delta = (start + step) - start;
    (0..len).map(|i| start + i as f64 * delta).collect()
}

/// numpy's `linspace(start, stop, num)` (endpoint included): `start + i * step`, last value set to
/// `stop` exactly.
fn numpy_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let div = (num - 1) as f64;
    let delta = stop - start;
    let step = delta / div;
    let mut v: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    v[num - 1] = stop;
    v
}

/// diffusers' rule for the timestep that follows `t` in a `K`-step loop: `t - T // K`
/// (negative means "clean"). For `leading` and `trailing` grids this is the next grid entry;
/// for `linspace` it is not, and diffusers still uses it.
pub fn diffusers_prev_timestep(t: i64, num_train_timesteps: usize, num_steps: usize) -> Option<i64> {
    let prev = t - (num_train_timesteps / num_steps) as i64;
    (prev >= 0).then_some(prev)
}
