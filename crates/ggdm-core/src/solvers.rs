//! The training-free multistep ODE solvers, as small pure functions like [`crate::samplers`]:
//! DPM-Solver++ (multistep, data prediction, midpoint second order and third order; diffusers'
//! `DPMSolverMultistepScheduler` with `algorithm_type = "dpmsolver++"`) and UniPC (predictor UniP
//! and corrector UniC in the data-prediction form, `B(h)` variants bh1 and bh2; diffusers'
//! `UniPCMultistepScheduler` with `predict_x0 = True`). Both honour diffusers' warm-up and
//! `lower_order_final` rules and its `final_sigmas_type`, so full loops equal diffusers 0.42.1's
//! (pinned by `tests/fixtures/solver_loops.json`).
//!
//! Both work in the log-SNR time `lambda = log(alpha / sigma)` of `x_t = alpha_t x0 + sigma_t eps`,
//! with `alpha_t = sqrt(abar_t)` and `sigma_t = sqrt(1 - abar_t)` (DESIGN.md section 4). The
//! scalars follow diffusers' route from `abar` (the ratio `sqrt((1 - abar) / abar)`, formed in
//! float32 from diffusers' float32 `alphas_cumprod` ([`NoiseSchedule::abar_f32`]), then `alpha`
//! and `sigma` in float32 and `lambda` in f64; on the cosine schedule the loops depend on those
//! roundings, pinned by `tests/fixtures/solver_loops_cosine.json`). Every step is a
//! linear combination of the current state and the recent data predictions `x0_hat`;
//! [`StepCoefficients`] exposes those weights, which is how the solvers are written here, and
//! [`GgdmRow`] writes whole solvers as rows of GGDM's coefficient matrices (DESIGN.md section 4,
//! "Starting solver and teacher": a GGDM sampler's start solver).
//!
//! The coefficient formulas ([`NoiseLevel::from_abar`], [`dpm_solver_coefficients`],
//! [`unipc_predictor_coefficients`], [`unipc_corrector_coefficients`], [`dpm_solver_ggdm_rows`],
//! [`unipc_ggdm_rows`]) are generic over [`SolverScalar`]: in `f64` for the solvers here, in a 0-d
//! tensor for a GGDM sampler's base, which is then differentiable in the learned grid. The `f64`
//! path performs the same operations in the same order as before it was made generic, so its
//! results are unchanged bit for bit.
//!
//! Nothing here switches gradients off; the solvers are deterministic, so they take no noise.

use crate::denoiser::Denoiser;
use crate::prediction::PredictionType;
use crate::samplers::query;
use crate::scalar::SolverScalar;
use crate::schedule::NoiseSchedule;
use crate::{Error, Result};
use std::collections::VecDeque;
use tch::Tensor;

/// One noise level `x_t = alpha x0 + sigma eps` with its log-SNR `lambda = ln(alpha) - ln(sigma)`,
/// in `f64` (the solvers) or in any [`SolverScalar`] (a GGDM sampler's differentiable base).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NoiseLevel<S = f64> {
    /// Signal scale `sqrt(abar)`.
    pub alpha: S,
    /// Noise scale `sqrt(1 - abar)`.
    pub sigma: S,
    /// Log signal-to-noise ratio; `+inf` at clean data.
    pub lambda: S,
}

impl<S: SolverScalar> NoiseLevel<S> {
    /// From diffusers' sigma (the ratio `sqrt((1 - abar) / abar)`), as its `_sigma_to_alpha_sigma_t`
    /// converts it: `alpha = 1 / sqrt(ratio^2 + 1)`, `sigma = ratio * alpha`.
    pub fn from_sigma_ratio(ratio: S) -> Self {
        let alpha = (ratio.clone() * ratio.clone() + 1.0).sqrt().recip();
        let sigma = ratio * alpha.clone();
        let lambda = alpha.ln() - sigma.ln();
        Self { alpha, sigma, lambda }
    }

    /// At cumulative signal fraction `abar`, exactly: ratio `sqrt((1 - abar) / abar)`.
    pub fn from_abar(abar: S) -> Self {
        Self::from_sigma_ratio(((-abar.clone() + 1.0) / abar).sqrt())
    }

    /// Clean data (`alpha = 1`, `sigma = 0`, `lambda = +inf`) built from constants, with no
    /// gradient path (a gradient through `ln(sigma)` at `sigma = 0` would be infinite).
    pub fn clean_like(like: &S) -> Self {
        Self {
            alpha: like.constant_like(1.0),
            sigma: like.constant_like(0.0),
            lambda: like.constant_like(f64::INFINITY),
        }
    }
}

impl NoiseLevel {
    /// At a float32 `abar` the way diffusers' multistep schedulers see it: they keep
    /// `alphas_cumprod` ([`NoiseSchedule::abar_f32`]) and the ratio `sqrt((1 - abar) / abar)` in
    /// float32 and convert the ratio to `alpha = 1 / sqrt(ratio^2 + 1)`, `sigma = ratio alpha` in
    /// float32 too; `lambda` is then taken in f64 from those float32 values.
    ///
    /// Both roundings show in full loops. Near clean data (`1 - abar_0 = 1e-4` for the DDPM
    /// schedule) the float32 ratio is about 1e-4 off (relative), enough to be seen in a loop that
    /// ends at `sigma_min`. At the noisiest step of the cosine schedule (`abar_999 = 2.4e-9`)
    /// float32 `sigma` is 0.99999994 where the exact value rounds to 1; an epsilon prediction
    /// there is `(x - sigma eps) / alpha` with `sigma eps` cancelling all but ~1e-3 of `x`, so that
    /// one ulp moves the data prediction by ~6e-5 relative and a 5-step DPM-Solver++ result by
    /// ~7e-4.
    pub fn from_abar_f32(abar: f32) -> Self {
        let ratio = ((1.0 - abar) / abar).sqrt();
        let alpha = (ratio * ratio + 1.0).sqrt().recip();
        let sigma = ratio * alpha;
        let (alpha, sigma) = (f64::from(alpha), f64::from(sigma));
        Self { alpha, sigma, lambda: alpha.ln() - sigma.ln() }
    }

    /// [`Self::from_abar_f32`] of `abar` rounded to float32. Where diffusers' table is at hand,
    /// prefer its entries: diffusers rounds each beta before the product, which for a beta near 1
    /// (the cosine schedule's cap, 0.999) moves `abar` by 1.3e-5 relative ([`noise_levels`]).
    pub fn from_abar_diffusers(abar: f64) -> Self {
        Self::from_abar_f32(abar as f32)
    }

    /// Clean data: `alpha = 1`, `sigma = 0`, `lambda = +inf`.
    pub fn clean() -> Self {
        Self::from_sigma_ratio(0.0)
    }
}

/// Where the last step lands (diffusers' `final_sigmas_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FinalSigma {
    /// Clean data, sigma = 0 (diffusers' default `"zero"`).
    #[default]
    Zero,
    /// The noise level of the first training timestep, `abar_0` (diffusers `"sigma_min"`).
    SigmaMin,
}

/// The `K + 1` noise levels of a run over `timesteps` (descending, in `[0, T-1]`): one per step and
/// the final one, each from diffusers' float32 `alphas_cumprod` ([`NoiseSchedule::abar_f32`],
/// [`NoiseLevel::from_abar_f32`]). diffusers only steps on integer timesteps; a fractional `tau`
/// (which it never sees) interpolates `log abar` of that table linearly, as
/// [`NoiseSchedule::abar_continuous`] does for the exact one.
pub fn noise_levels(schedule: &NoiseSchedule, timesteps: &[f64], final_sigma: FinalSigma) -> Result<Vec<NoiseLevel>> {
    let table = schedule.abar_f32();
    let level_at = |tau: f64| {
        let lo = tau.floor();
        let frac = tau - lo;
        let lo = lo as usize;
        let abar = if frac == 0.0 || lo + 1 >= table.len() {
            table[lo]
        } else {
            let (log_lo, log_hi) = (f64::from(table[lo]).ln(), f64::from(table[lo + 1]).ln());
            (log_lo + (log_hi - log_lo) * frac).exp() as f32
        };
        NoiseLevel::from_abar_f32(abar)
    };
    levels_with(schedule, timesteps, final_sigma, &level_at)
}

/// [`noise_levels`] from the exact f64 `abar(tau)` ([`NoiseLevel::from_abar`]): the solver of the
/// schedule itself rather than of diffusers' float32 copy of it (what a GGDM sampler starts from).
pub fn exact_noise_levels(
    schedule: &NoiseSchedule,
    timesteps: &[f64],
    final_sigma: FinalSigma,
) -> Result<Vec<NoiseLevel>> {
    levels_with(schedule, timesteps, final_sigma, &|tau| NoiseLevel::from_abar(schedule.abar_continuous(tau)))
}

/// The levels at `timesteps` and the final one; `level_at(tau)` is only called for a `tau` in
/// `[0, T-1]`.
fn levels_with(
    schedule: &NoiseSchedule,
    timesteps: &[f64],
    final_sigma: FinalSigma,
    level_at: &dyn Fn(f64) -> NoiseLevel,
) -> Result<Vec<NoiseLevel>> {
    if timesteps.is_empty() {
        return Err(Error::invalid("steps", "no sampling steps"));
    }
    let t_max = schedule.tau_max();
    for (i, &t) in timesteps.iter().enumerate() {
        if !(t >= 0.0 && t <= t_max) {
            return Err(Error::invalid("timesteps", format!("step {i} has t = {t} outside [0, {t_max}]")));
        }
    }
    if let Some(i) = (1..timesteps.len()).find(|&i| timesteps[i] >= timesteps[i - 1]) {
        return Err(Error::invalid(
            "timesteps",
            format!("must decrease strictly; step {i} has t = {} after {}", timesteps[i], timesteps[i - 1]),
        ));
    }
    let mut levels: Vec<NoiseLevel> = timesteps.iter().map(|&t| level_at(t)).collect();
    levels.push(match final_sigma {
        FinalSigma::Zero => NoiseLevel::clean(),
        FinalSigma::SigmaMin => level_at(0.0),
    });
    Ok(levels)
}

/// The data prediction `x0_hat` from a network output at noise level `level`.
pub fn data_prediction(kind: PredictionType, output: &Tensor, x_t: &Tensor, level: NoiseLevel) -> Tensor {
    match kind {
        PredictionType::Epsilon => (x_t - output * level.sigma) / level.alpha,
        PredictionType::Sample => output.shallow_clone(),
        PredictionType::VPrediction => x_t * level.alpha - output * level.sigma,
    }
}

/// One solver update as a linear combination: `x_next = sample * x + sum_j data[j] * x0_hat_j`,
/// where `x0_hat_0` is the most recent data prediction, `x0_hat_1` the one before, and so on.
#[derive(Debug, Clone, PartialEq)]
pub struct StepCoefficients<S = f64> {
    /// Weight of the state the update starts from.
    pub sample: S,
    /// Weights of the data predictions, newest first.
    pub data: Vec<S>,
}

impl StepCoefficients {
    /// Applies the update to a state and the data predictions (newest first; at least
    /// `data.len()` of them).
    pub fn apply(&self, x: &Tensor, predictions: &[&Tensor]) -> Tensor {
        let mut out = x * self.sample;
        for (weight, x0) in self.data.iter().zip(predictions) {
            out += *x0 * *weight;
        }
        out
    }
}

// ------------------------------------------------------------------ DPM-Solver++

/// DPM-Solver++ settings (diffusers' `DPMSolverMultistepScheduler` with
/// `algorithm_type = "dpmsolver++"`, `solver_type = "midpoint"`, no thresholding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DpmSolverOptions {
    /// `solver_order`: 1 (DDIM), 2 (DPM-Solver++(2M), diffusers' default) or 3 (3M).
    pub order: usize,
    /// `lower_order_final` (default true): with fewer than 15 steps, the last two steps drop to
    /// first and second order.
    pub lower_order_final: bool,
    /// `final_sigmas_type` (default zero; a zero final sigma always makes the last step first order).
    pub final_sigma: FinalSigma,
}

impl Default for DpmSolverOptions {
    fn default() -> Self {
        Self { order: 2, lower_order_final: true, final_sigma: FinalSigma::Zero }
    }
}

/// The order of each of `num_steps` DPM-Solver++ steps: warm-up from first order, then diffusers'
/// rules for the final steps.
pub fn dpm_solver_orders(num_steps: usize, options: &DpmSolverOptions) -> Vec<usize> {
    let k = num_steps;
    let few_steps = options.lower_order_final && k < 15;
    (0..k)
        .map(|i| {
            let previous = i.min(options.order);
            let last = i + 1 == k && (few_steps || options.final_sigma == FinalSigma::Zero);
            let second_to_last = i + 2 == k && few_steps;
            if options.order == 1 || previous < 1 || last {
                1
            } else if options.order == 2 || previous < 2 || second_to_last {
                2
            } else {
                3
            }
        })
        .collect()
}

/// The DPM-Solver++ update of step `i` (from `levels[i]` to `levels[i + 1]`) at the given order,
/// as weights of `x_i` and of `x0_hat_i, x0_hat_{i-1}, ...`.
pub fn dpm_solver_coefficients<S: SolverScalar>(
    levels: &[NoiseLevel<S>],
    i: usize,
    order: usize,
) -> StepCoefficients<S> {
    let (s0, t) = (&levels[i], &levels[i + 1]);
    let h = t.lambda.clone() - s0.lambda.clone();
    let expm1 = (-h.clone()).exp_m1(); // e^{-h} - 1
    let sample = t.sigma.clone() / s0.sigma.clone();
    let first = -t.alpha.clone() * expm1.clone();
    match order {
        1 => StepCoefficients { sample, data: vec![first] },
        2 => {
            // D1 = (m0 - m1) / r0 enters with weight -alpha_t (e^{-h} - 1) / 2 (midpoint rule).
            let r0 = (s0.lambda.clone() - levels[i - 1].lambda.clone()) / h;
            let d1 = t.alpha.clone() * -0.5 * expm1 / r0;
            StepCoefficients { sample, data: vec![first + d1.clone(), -d1] }
        }
        _ => {
            let (s1, s2) = (&levels[i - 1], &levels[i - 2]);
            let r0 = (s0.lambda.clone() - s1.lambda.clone()) / h.clone();
            let r1 = (s1.lambda.clone() - s2.lambda.clone()) / h.clone();
            let c1 = t.alpha.clone() * (expm1.clone() / h.clone() + 1.0);
            let c2 = -t.alpha.clone() * ((expm1 + h.clone()) / (h.clone() * h) - 0.5);
            // D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1) / (r0 + r1), with
            // D1_0 = (m0 - m1) / r0 and D1_1 = (m1 - m2) / r1.
            let r_sum = r0.clone() + r1.clone();
            let k = r0.clone() / r_sum.clone();
            let w0 = c1.clone() * (k.clone() + 1.0) + c2.clone() / r_sum.clone();
            let w1 = -(c1 * k + c2 / r_sum);
            StepCoefficients {
                sample,
                data: vec![first + w0.clone() / r0.clone(), -w0 / r0 + w1.clone() / r1.clone(), -w1 / r1],
            }
        }
    }
}

/// DPM-Solver++ from `x_init` over descending `timesteps` (the model is queried at each), with
/// diffusers' noise levels ([`noise_levels`]); `on_step(i)` is called after step `i`.
pub fn dpm_solver<D: Denoiser + ?Sized>(
    model: &D,
    schedule: &NoiseSchedule,
    timesteps: &[f64],
    x_init: &Tensor,
    options: &DpmSolverOptions,
    on_step: &mut dyn FnMut(usize),
) -> Result<Tensor> {
    let levels = noise_levels(schedule, timesteps, options.final_sigma)?;
    dpm_solver_on_levels(model, timesteps, &levels, x_init, options, on_step)
}

/// [`dpm_solver`] with given noise levels (`timesteps.len() + 1` of them, e.g. from
/// [`exact_noise_levels`]); `options.final_sigma` only decides the order of the last step.
pub fn dpm_solver_on_levels<D: Denoiser + ?Sized>(
    model: &D,
    timesteps: &[f64],
    levels: &[NoiseLevel],
    x_init: &Tensor,
    options: &DpmSolverOptions,
    on_step: &mut dyn FnMut(usize),
) -> Result<Tensor> {
    if !(1..=3).contains(&options.order) {
        return Err(Error::invalid("solver_order", format!("{} (DPM-Solver++ has orders 1, 2, 3)", options.order)));
    }
    if levels.len() != timesteps.len() + 1 {
        return Err(Error::invalid(
            "noise levels",
            format!("{} levels for {} steps (need one more than steps)", levels.len(), timesteps.len()),
        ));
    }
    let orders = dpm_solver_orders(timesteps.len(), options);
    let mut history: VecDeque<Tensor> = VecDeque::with_capacity(options.order);
    let mut x = x_init.shallow_clone();
    for (i, &t) in timesteps.iter().enumerate() {
        let output = query(model, &x, t)?;
        if history.len() == options.order {
            history.pop_back();
        }
        history.push_front(data_prediction(model.prediction_type(), &output, &x, levels[i]));
        let coefficients = dpm_solver_coefficients(levels, i, orders[i]);
        let recent: Vec<&Tensor> = history.iter().collect();
        x = coefficients.apply(&x, &recent);
        on_step(i);
    }
    Ok(x)
}

// ------------------------------------------------------------------ UniPC

/// The `B(h)` of UniPC (diffusers' `solver_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UniPcVariant {
    /// `B(h) = h` (diffusers `"bh1"`).
    Bh1,
    /// `B(h) = e^h - 1` (diffusers `"bh2"`, its default).
    #[default]
    Bh2,
}

/// UniPC settings (diffusers' `UniPCMultistepScheduler` with `predict_x0 = True`, no
/// thresholding, no `solver_p`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UniPcOptions {
    /// `solver_order`: 1, 2 (diffusers' default) or 3.
    pub order: usize,
    /// `solver_type`.
    pub variant: UniPcVariant,
    /// `lower_order_final` (default true): step `i` of `K` uses at most order `K - i`.
    pub lower_order_final: bool,
    /// `final_sigmas_type` (default zero).
    pub final_sigma: FinalSigma,
    /// `disable_corrector`: steps whose result is not corrected (default none).
    pub disable_corrector: Vec<usize>,
}

impl Default for UniPcOptions {
    fn default() -> Self {
        Self {
            order: 2,
            variant: UniPcVariant::Bh2,
            lower_order_final: true,
            final_sigma: FinalSigma::Zero,
            disable_corrector: Vec::new(),
        }
    }
}

/// The predictor order of each of `num_steps` UniPC steps (warm-up, then `lower_order_final`).
/// The corrector applied at step `i > 0` has the order of step `i - 1`.
pub fn unipc_orders(num_steps: usize, options: &UniPcOptions) -> Vec<usize> {
    (0..num_steps)
        .map(|i| {
            let wanted = if options.lower_order_final { options.order.min(num_steps - i) } else { options.order };
            wanted.min(i.min(options.order) + 1)
        })
        .collect()
}

/// The shared pieces of a UniP/UniC update over a log-SNR step `h` (data prediction, so in
/// `hh = -h`): `h phi_1 = e^{hh} - 1`, `B(h)`, and the right-hand sides `b_1..b_order`.
fn unipc_rhs<S: SolverScalar>(h: S, order: usize, variant: UniPcVariant) -> (S, S, Vec<S>) {
    let hh = -h;
    let h_phi_1 = hh.exp_m1();
    let b_h = match variant {
        UniPcVariant::Bh1 => hh.clone(),
        UniPcVariant::Bh2 => hh.exp_m1(),
    };
    let mut h_phi_k = h_phi_1.clone() / hh.clone() - 1.0;
    let mut factorial = 1.0;
    let mut rhs = Vec::with_capacity(order);
    for i in 1..=order {
        rhs.push(h_phi_k.clone() * factorial / b_h.clone());
        factorial *= (i + 1) as f64;
        h_phi_k = h_phi_k / hh.clone() - 1.0 / factorial;
    }
    (h_phi_1, b_h, rhs)
}

/// Solves `V rho = b` for the Vandermonde-type matrix `V[row][col] = nodes[col]^row`
/// (a handful of unknowns; Gaussian elimination with partial pivoting, the pivots chosen on the
/// detached values).
fn solve_power_system<S: SolverScalar>(nodes: &[S], rhs: &[S]) -> Vec<S> {
    let n = nodes.len();
    let mut matrix: Vec<Vec<S>> =
        (0..n).map(|row| nodes.iter().map(|r| r.powi(row as i32)).chain([rhs[row].clone()]).collect()).collect();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&a, &b| matrix[a][col].value().abs().total_cmp(&matrix[b][col].value().abs()))
            .expect("non-empty column");
        matrix.swap(col, pivot);
        let (upper, lower) = matrix.split_at_mut(col + 1);
        let pivot_row = &upper[col];
        for row in lower.iter_mut() {
            let factor = row[col].clone() / pivot_row[col].clone();
            for (value, pivot_value) in row.iter_mut().zip(pivot_row).skip(col) {
                *value = value.clone() - factor.clone() * pivot_value.clone();
            }
        }
    }
    let mut solution: Vec<S> = rhs.to_vec();
    for row in (0..n).rev() {
        let tail = (row + 1..n).map(|c| matrix[row][c].clone() * solution[c].clone()).reduce(|sum, term| sum + term);
        let numerator = match tail {
            Some(tail) => matrix[row][n].clone() - tail,
            None => matrix[row][n].clone(),
        };
        solution[row] = numerator / matrix[row][row].clone();
    }
    solution
}

/// The UniP (predictor) update of step `i` (from `levels[i]` to `levels[i + 1]`) at the given
/// order, as weights of `x_i` and of `x0_hat_i, x0_hat_{i-1}, ...`.
pub fn unipc_predictor_coefficients<S: SolverScalar>(
    levels: &[NoiseLevel<S>],
    i: usize,
    order: usize,
    variant: UniPcVariant,
) -> StepCoefficients<S> {
    let (s0, t) = (&levels[i], &levels[i + 1]);
    let h = t.lambda.clone() - s0.lambda.clone();
    let ratios: Vec<S> = (1..order).map(|k| (levels[i - k].lambda.clone() - s0.lambda.clone()) / h.clone()).collect();
    let (h_phi_1, b_h, rhs) = unipc_rhs(h.clone(), order, variant);
    let rhos: Vec<S> = match order {
        1 => Vec::new(),
        2 => vec![h.constant_like(0.5)],
        _ => solve_power_system(&ratios, &rhs[..order - 1]),
    };
    // x = (sigma_t / sigma_s0) x_i - alpha_t h phi_1 m0 - alpha_t B(h) sum_k rho_k (m_k - m0) / r_k
    let mut data = vec![-t.alpha.clone() * h_phi_1];
    for (rho, r) in rhos.into_iter().zip(ratios) {
        let weight = -t.alpha.clone() * b_h.clone() * rho / r;
        data[0] = data[0].clone() - weight.clone();
        data.push(weight);
    }
    StepCoefficients { sample: t.sigma.clone() / s0.sigma.clone(), data }
}

/// The UniC (corrector) update that refines the state at `levels[i]` (i >= 1) once the model has
/// been evaluated there: weights of the state `x_{i-1}` the previous predictor started from, and of
/// `x0_hat_i` (the new evaluation, at the uncorrected state), `x0_hat_{i-1}, x0_hat_{i-2}, ...`.
/// `order` is the order of the predictor of step `i - 1`.
pub fn unipc_corrector_coefficients<S: SolverScalar>(
    levels: &[NoiseLevel<S>],
    i: usize,
    order: usize,
    variant: UniPcVariant,
) -> StepCoefficients<S> {
    let (s0, t) = (&levels[i - 1], &levels[i]);
    let h = t.lambda.clone() - s0.lambda.clone();
    let ratios: Vec<S> =
        (1..order).map(|k| (levels[i - 1 - k].lambda.clone() - s0.lambda.clone()) / h.clone()).collect();
    let (h_phi_1, b_h, rhs) = unipc_rhs(h.clone(), order, variant);
    let rhos: Vec<S> = if order == 1 {
        vec![h.constant_like(0.5)]
    } else {
        let nodes: Vec<S> = ratios.iter().cloned().chain([h.constant_like(1.0)]).collect();
        solve_power_system(&nodes, &rhs)
    };
    // x = (sigma_t / sigma_s0) x_{i-1} - alpha_t h phi_1 m0
    //     - alpha_t B(h) (sum_k rho_k (m_k - m0) / r_k + rho_last (model_t - m0)), m0 = x0_hat_{i-1}
    let scale = -t.alpha.clone() * b_h;
    let rho_last = rhos[order - 1].clone();
    let mut data = vec![scale.clone() * rho_last.clone(), -t.alpha.clone() * h_phi_1 - scale.clone() * rho_last];
    for (rho, r) in rhos.into_iter().zip(ratios) {
        let weight = scale.clone() * rho / r;
        data[1] = data[1].clone() - weight.clone();
        data.push(weight);
    }
    StepCoefficients { sample: t.sigma.clone() / s0.sigma.clone(), data }
}

/// UniPC (UniP predictor + UniC corrector) from `x_init` over descending `timesteps`;
/// `on_step(i)` is called after step `i`.
pub fn unipc<D: Denoiser + ?Sized>(
    model: &D,
    schedule: &NoiseSchedule,
    timesteps: &[f64],
    x_init: &Tensor,
    options: &UniPcOptions,
    on_step: &mut dyn FnMut(usize),
) -> Result<Tensor> {
    check_unipc_options(options)?;
    let levels = noise_levels(schedule, timesteps, options.final_sigma)?;
    unipc_on_levels(model, timesteps, &levels, x_init, options, on_step)
}

fn check_unipc_options(options: &UniPcOptions) -> Result<()> {
    if !(1..=3).contains(&options.order) {
        return Err(Error::invalid("solver_order", format!("{} (UniPC here has orders 1, 2, 3)", options.order)));
    }
    if !options.lower_order_final && options.order > 1 && options.final_sigma == FinalSigma::Zero {
        return Err(Error::invalid(
            "lower_order_final",
            "false needs final_sigmas_type sigma_min: a higher-order UniPC step to sigma = 0 is undefined",
        ));
    }
    Ok(())
}

/// [`unipc`] with given noise levels (`timesteps.len() + 1` of them, e.g. from
/// [`exact_noise_levels`]); `options.final_sigma` only decides which settings are valid.
pub fn unipc_on_levels<D: Denoiser + ?Sized>(
    model: &D,
    timesteps: &[f64],
    levels: &[NoiseLevel],
    x_init: &Tensor,
    options: &UniPcOptions,
    on_step: &mut dyn FnMut(usize),
) -> Result<Tensor> {
    check_unipc_options(options)?;
    if levels.len() != timesteps.len() + 1 {
        return Err(Error::invalid(
            "noise levels",
            format!("{} levels for {} steps (need one more than steps)", levels.len(), timesteps.len()),
        ));
    }
    let orders = unipc_orders(timesteps.len(), options);
    let mut history: VecDeque<Tensor> = VecDeque::with_capacity(options.order + 1);
    let mut x = x_init.shallow_clone();
    let mut last_start: Option<Tensor> = None;
    for (i, &t) in timesteps.iter().enumerate() {
        let output = query(model, &x, t)?;
        let x0_hat = data_prediction(model.prediction_type(), &output, &x, levels[i]);
        if let Some(start) = &last_start {
            if !options.disable_corrector.contains(&(i - 1)) {
                let coefficients = unipc_corrector_coefficients(levels, i, orders[i - 1], options.variant);
                let recent: Vec<&Tensor> = std::iter::once(&x0_hat).chain(history.iter()).collect();
                x = coefficients.apply(start, &recent);
            }
        }
        if history.len() == options.order {
            history.pop_back();
        }
        history.push_front(x0_hat);
        let coefficients = unipc_predictor_coefficients(levels, i, orders[i], options.variant);
        let recent: Vec<&Tensor> = history.iter().collect();
        let next = coefficients.apply(&x, &recent);
        last_start = Some(std::mem::replace(&mut x, next));
        on_step(i);
    }
    Ok(x)
}

// ------------------------------------------------------------------ GGDM form

/// One step of a multistep solver as a row of GGDM's coefficient matrices (DESIGN.md section 4,
/// "GGDM step" with `sigma_i = 0`): `x_{i+1} = state x_i + sum_{j<=i} data[j] x0_hat_j`, where
/// `x_i` is the state the model is queried at and `x0_hat_j` its data prediction there.
#[derive(Debug, Clone, PartialEq)]
pub struct GgdmRow<S = f64> {
    /// `u_ii`, the weight of the state `x_i` (every other `u_ij` of these solvers is zero).
    pub state: S,
    /// `w_ij` for `j = 0..=i`; `None` where the solver puts no weight.
    pub data: Vec<Option<S>>,
}

impl<S: SolverScalar> GgdmRow<S> {
    fn new(i: usize, state: S) -> Self {
        Self { state, data: vec![None; i + 1] }
    }

    /// Adds weights given newest first, the first one to `x0_hat_newest`.
    fn add_data(&mut self, newest: usize, weights: impl IntoIterator<Item = S>) {
        for (back, weight) in weights.into_iter().enumerate() {
            let slot = &mut self.data[newest - back];
            *slot = Some(match slot.take() {
                Some(sum) => sum + weight,
                None => weight,
            });
        }
    }
}

/// A multistep solver with its settings: what a GGDM sampler can start as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MultistepSolver {
    /// DPM-Solver++.
    DpmSolver(DpmSolverOptions),
    /// UniPC.
    UniPc(UniPcOptions),
}

impl MultistepSolver {
    /// Where the last step lands.
    pub fn final_sigma(&self) -> FinalSigma {
        match self {
            MultistepSolver::DpmSolver(options) => options.final_sigma,
            MultistepSolver::UniPc(options) => options.final_sigma,
        }
    }

    /// The solver over `levels` (`K + 1` of them) as `K` GGDM rows ([`dpm_solver_ggdm_rows`],
    /// [`unipc_ggdm_rows`]).
    pub fn ggdm_rows<S: SolverScalar>(&self, levels: &[NoiseLevel<S>]) -> Vec<GgdmRow<S>> {
        match self {
            MultistepSolver::DpmSolver(options) => dpm_solver_ggdm_rows(levels, options),
            MultistepSolver::UniPc(options) => unipc_ggdm_rows(levels, options),
        }
    }

    /// Runs the solver from `x_init` over `timesteps` with diffusers' noise levels ([`dpm_solver`],
    /// [`unipc`]; what `ddss-cli sample` runs).
    pub fn run<D: Denoiser + ?Sized>(
        &self,
        model: &D,
        schedule: &NoiseSchedule,
        timesteps: &[f64],
        x_init: &Tensor,
        on_step: &mut dyn FnMut(usize),
    ) -> Result<Tensor> {
        match self {
            MultistepSolver::DpmSolver(options) => dpm_solver(model, schedule, timesteps, x_init, options, on_step),
            MultistepSolver::UniPc(options) => unipc(model, schedule, timesteps, x_init, options, on_step),
        }
    }

    /// Runs the solver from `x_init` over `timesteps` on given noise levels
    /// ([`dpm_solver_on_levels`], [`unipc_on_levels`]).
    pub fn run_on_levels<D: Denoiser + ?Sized>(
        &self,
        model: &D,
        timesteps: &[f64],
        levels: &[NoiseLevel],
        x_init: &Tensor,
        on_step: &mut dyn FnMut(usize),
    ) -> Result<Tensor> {
        match self {
            MultistepSolver::DpmSolver(options) => {
                dpm_solver_on_levels(model, timesteps, levels, x_init, options, on_step)
            }
            MultistepSolver::UniPc(options) => unipc_on_levels(model, timesteps, levels, x_init, options, on_step),
        }
    }
}

/// DPM-Solver++ over `levels` (`K + 1` noise levels, one per step and the final one) as `K` GGDM
/// rows: the multistep update `x_{i+1} = a_i x_i + b_i x0_hat_i + c_i x0_hat_{i-1} (+ ...)` is
/// `u_ii = a_i`, `w_ii = b_i`, `w_{i,i-1} = c_i`.
pub fn dpm_solver_ggdm_rows<S: SolverScalar>(levels: &[NoiseLevel<S>], options: &DpmSolverOptions) -> Vec<GgdmRow<S>> {
    let steps = levels.len().saturating_sub(1);
    dpm_solver_orders(steps, options)
        .into_iter()
        .enumerate()
        .map(|(i, order)| {
            let step = dpm_solver_coefficients(levels, i, order);
            let mut row = GgdmRow::new(i, step.sample);
            row.add_data(i, step.data);
            row
        })
        .collect()
}

/// UniPC (UniP predictor, UniC corrector) over `levels` as `K` GGDM rows whose states are the
/// *predicted* states `x^p_i`, where the model is queried. The corrected state is
/// `x^c_i = x^p_i + C_i m - P_{i-1} m` (the corrector's and the previous predictor's data
/// combinations; their state weights are equal and cancel), and `x^p_{i+1} = s_i x^c_i + P_i m`,
/// so `u_ii = s_i` and `w_i = P_i + s_i (C_i - P_{i-1})`. The last output is not corrected, as in
/// [`unipc`].
pub fn unipc_ggdm_rows<S: SolverScalar>(levels: &[NoiseLevel<S>], options: &UniPcOptions) -> Vec<GgdmRow<S>> {
    let steps = levels.len().saturating_sub(1);
    let orders = unipc_orders(steps, options);
    (0..steps)
        .map(|i| {
            let predictor = unipc_predictor_coefficients(levels, i, orders[i], options.variant);
            let state = predictor.sample.clone();
            let mut row = GgdmRow::new(i, predictor.sample);
            row.add_data(i, predictor.data);
            if i > 0 && !options.disable_corrector.contains(&(i - 1)) {
                let corrector = unipc_corrector_coefficients(levels, i, orders[i - 1], options.variant);
                let previous = unipc_predictor_coefficients(levels, i - 1, orders[i - 1], options.variant);
                row.add_data(i, corrector.data.into_iter().map(|w| w * state.clone()));
                row.add_data(i - 1, previous.data.into_iter().map(|w| -(w * state.clone())));
            }
            row
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_level_is_the_limit() {
        let clean = NoiseLevel::clean();
        assert_eq!((clean.alpha, clean.sigma), (1.0, 0.0));
        assert_eq!(clean.lambda, f64::INFINITY);
        let level = NoiseLevel::from_abar(0.25);
        assert!((level.alpha - 0.5).abs() < 1e-15 && (level.sigma - 0.75f64.sqrt()).abs() < 1e-15);
    }

    #[test]
    fn first_order_steps_are_ddim() {
        // DPM-Solver++(1) and UniP-1 both equal DDIM(eta = 0):
        // x_s = sigma_s / sigma_t x + (alpha_s - alpha_t sigma_s / sigma_t) x0.
        let levels = [NoiseLevel::from_abar(0.3), NoiseLevel::from_abar(0.7)];
        let ddim_x0 = levels[1].alpha - levels[0].alpha * levels[1].sigma / levels[0].sigma;
        for c in [
            dpm_solver_coefficients(&levels, 0, 1),
            unipc_predictor_coefficients(&levels, 0, 1, UniPcVariant::Bh2),
            unipc_predictor_coefficients(&levels, 0, 1, UniPcVariant::Bh1),
        ] {
            assert!((c.sample - levels[1].sigma / levels[0].sigma).abs() < 1e-14);
            assert!((c.data[0] - ddim_x0).abs() < 1e-14, "{c:?} vs {ddim_x0}");
        }
    }

    #[test]
    fn higher_order_weights_sum_like_first_order() {
        // A constant data prediction must move exactly as with first order: the weights of the
        // data predictions sum to the first-order weight.
        let levels: Vec<NoiseLevel> = [0.05, 0.2, 0.45, 0.7, 0.9].iter().map(|&a| NoiseLevel::from_abar(a)).collect();
        let first = dpm_solver_coefficients(&levels, 2, 1).data[0];
        for order in [2, 3] {
            let sum: f64 = dpm_solver_coefficients(&levels, 2, order).data.iter().sum();
            assert!((sum - first).abs() < 1e-12, "dpm order {order}: {sum} vs {first}");
            let sum: f64 = unipc_predictor_coefficients(&levels, 2, order, UniPcVariant::Bh2).data.iter().sum();
            assert!((sum - first).abs() < 1e-12, "unip order {order}: {sum} vs {first}");
        }
        for order in [1, 2, 3] {
            let corrector = unipc_corrector_coefficients(&levels, 3, order, UniPcVariant::Bh2);
            let first = dpm_solver_coefficients(&levels, 2, 1).data[0];
            let sum: f64 = corrector.data.iter().sum();
            assert!((sum - first).abs() < 1e-12, "unic order {order}: {sum} vs {first}");
        }
    }

    #[test]
    fn orders_follow_diffusers_rules() {
        let dpm2 = DpmSolverOptions::default();
        assert_eq!(dpm_solver_orders(5, &dpm2), vec![1, 2, 2, 2, 1]);
        let dpm3 = DpmSolverOptions { order: 3, ..dpm2 };
        assert_eq!(dpm_solver_orders(6, &dpm3), vec![1, 2, 3, 3, 2, 1]);
        assert_eq!(dpm_solver_orders(16, &dpm3)[13..], [3, 3, 1]);
        let min = DpmSolverOptions { order: 3, final_sigma: FinalSigma::SigmaMin, ..dpm2 };
        assert_eq!(dpm_solver_orders(16, &min)[13..], [3, 3, 3]);
        let uni3 = UniPcOptions { order: 3, ..UniPcOptions::default() };
        assert_eq!(unipc_orders(6, &uni3), vec![1, 2, 3, 3, 2, 1]);
        assert_eq!(unipc_orders(20, &uni3)[17..], [3, 2, 1]);
    }

    #[test]
    fn power_system_is_solved() {
        let nodes = [-0.7, -1.6, 1.0];
        let rhs = [0.3, -0.2, 0.9];
        let rho = solve_power_system(&nodes, &rhs);
        for (power, expected) in rhs.iter().enumerate() {
            let lhs: f64 = nodes.iter().zip(&rho).map(|(r, p)| r.powi(power as i32) * p).sum();
            assert!((lhs - expected).abs() < 1e-12);
        }
    }
}
