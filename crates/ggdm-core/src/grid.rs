//! Timestep grids (DESIGN.md section 4, "Timestep grid"): the integer lists of diffusers'
//! `timestep_spacing` options for DDIM/DDPM `set_timesteps` ([`timesteps`]) and for the multistep
//! solvers DPM-Solver++ / UniPC ([`multistep_timesteps`]), and the quadratic stride of the DDIM
//! paper. Grids are descending; the sampler goes from the first entry to clean data.
//!
//! The integer lists reproduce numpy's arithmetic (round-half-to-even, `arange` with a float step)
//! so they equal diffusers' for every `(T, K)`; the fixtures check this.

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
}

impl Spacing {
    /// Parses `leading|trailing|linspace|quadratic`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "leading" => Ok(Spacing::Leading),
            "trailing" => Ok(Spacing::Trailing),
            "linspace" => Ok(Spacing::Linspace),
            "quadratic" => Ok(Spacing::Quadratic),
            other => Err(Error::invalid(
                "timestep_spacing",
                format!("`{other}` (expected leading, trailing, linspace or quadratic)"),
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
        }
    }
}

/// `K` descending integer timesteps for a model trained with `T` steps, exactly as diffusers'
/// `DDIMScheduler.set_timesteps` / `DDPMScheduler.set_timesteps` produce them
/// (`steps_offset` applies to `leading`, as in diffusers).
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
/// DDIM's. `quadratic` (not a diffusers option) is the DDIM paper's list from [`timesteps`].
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
    };
    if let Some(bad) = grid.iter().find(|&&t| t < 0 || t >= t_count as i64) {
        return Err(Error::invalid(
            "timesteps",
            format!("{spacing:?} spacing with steps_offset {steps_offset} gives timestep {bad} outside [0, {t_count})"),
        ));
    }
    if grid.windows(2).any(|w| w[1] >= w[0]) {
        return Err(Error::invalid(
            "steps",
            format!("{k} {} steps over {t_count} training steps repeat a timestep: {grid:?}", spacing.name()),
        ));
    }
    Ok(grid)
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
