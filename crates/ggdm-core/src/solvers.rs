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
//! scalars follow diffusers' route from `abar` (the ratio `sqrt((1 - abar) / abar)`, formed from
//! float32 `abar` as diffusers stores it, then `alpha`, `sigma`, `lambda` in f64). Every step is a
//! linear combination of the current state and the recent data predictions `x0_hat`;
//! [`StepCoefficients`] exposes those weights, which is how the solvers are written here and how a
//! GGDM sampler can start from one.
//!
//! Nothing here switches gradients off; the solvers are deterministic, so they take no noise.

use crate::denoiser::Denoiser;
use crate::prediction::PredictionType;
use crate::samplers::query;
use crate::schedule::NoiseSchedule;
use crate::{Error, Result};
use std::collections::VecDeque;
use tch::Tensor;

/// One noise level `x_t = alpha x0 + sigma eps` with its log-SNR `lambda = ln(alpha) - ln(sigma)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NoiseLevel {
    /// Signal scale `sqrt(abar)`.
    pub alpha: f64,
    /// Noise scale `sqrt(1 - abar)`.
    pub sigma: f64,
    /// Log signal-to-noise ratio; `+inf` at clean data.
    pub lambda: f64,
}

impl NoiseLevel {
    /// From diffusers' sigma (the ratio `sqrt((1 - abar) / abar)`), as its `_sigma_to_alpha_sigma_t`
    /// converts it: `alpha = 1 / sqrt(ratio^2 + 1)`, `sigma = ratio * alpha`.
    pub fn from_sigma_ratio(ratio: f64) -> Self {
        let alpha = 1.0 / (ratio * ratio + 1.0).sqrt();
        let sigma = ratio * alpha;
        Self { alpha, sigma, lambda: alpha.ln() - sigma.ln() }
    }

    /// At cumulative signal fraction `abar`, exactly: ratio `sqrt((1 - abar) / abar)` in f64.
    pub fn from_abar(abar: f64) -> Self {
        Self::from_sigma_ratio(((1.0 - abar) / abar).sqrt())
    }

    /// At `abar` the way diffusers' multistep schedulers see it: they keep `alphas_cumprod` and
    /// the ratio `sqrt((1 - abar) / abar)` in float32, so the ratio is formed in float32 from `abar`
    /// rounded to float32; the rest is f64. Near clean data (`1 - abar_0 = 1e-4` for the DDPM
    /// schedule) that rounding moves the ratio by about 1e-4 relative, enough to be seen in a
    /// full loop that ends at `sigma_min`.
    pub fn from_abar_diffusers(abar: f64) -> Self {
        let abar32 = abar as f32;
        Self::from_sigma_ratio(((1.0 - abar32) / abar32).sqrt() as f64)
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
/// the final one, each from `abar(tau)` as diffusers rounds it ([`NoiseLevel::from_abar_diffusers`]).
pub fn noise_levels(schedule: &NoiseSchedule, timesteps: &[f64], final_sigma: FinalSigma) -> Result<Vec<NoiseLevel>> {
    levels_with(schedule, timesteps, final_sigma, NoiseLevel::from_abar_diffusers)
}

/// [`noise_levels`] from the exact f64 `abar(tau)` ([`NoiseLevel::from_abar`]): the solver of the
/// schedule itself rather than of diffusers' float32 copy of it (what a GGDM sampler starts from).
pub fn exact_noise_levels(
    schedule: &NoiseSchedule,
    timesteps: &[f64],
    final_sigma: FinalSigma,
) -> Result<Vec<NoiseLevel>> {
    levels_with(schedule, timesteps, final_sigma, NoiseLevel::from_abar)
}

fn levels_with(
    schedule: &NoiseSchedule,
    timesteps: &[f64],
    final_sigma: FinalSigma,
    level_at: fn(f64) -> NoiseLevel,
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
    let mut levels: Vec<NoiseLevel> = timesteps.iter().map(|&t| level_at(schedule.abar_continuous(t))).collect();
    levels.push(match final_sigma {
        FinalSigma::Zero => NoiseLevel::clean(),
        FinalSigma::SigmaMin => level_at(schedule.abar()[0]),
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
pub struct StepCoefficients {
    /// Weight of the state the update starts from.
    pub sample: f64,
    /// Weights of the data predictions, newest first.
    pub data: Vec<f64>,
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
pub fn dpm_solver_coefficients(levels: &[NoiseLevel], i: usize, order: usize) -> StepCoefficients {
    let (s0, t) = (levels[i], levels[i + 1]);
    let h = t.lambda - s0.lambda;
    let expm1 = (-h).exp_m1(); // e^{-h} - 1
    let sample = t.sigma / s0.sigma;
    let first = -t.alpha * expm1;
    match order {
        1 => StepCoefficients { sample, data: vec![first] },
        2 => {
            // D1 = (m0 - m1) / r0 enters with weight -alpha_t (e^{-h} - 1) / 2 (midpoint rule).
            let r0 = (s0.lambda - levels[i - 1].lambda) / h;
            let d1 = -0.5 * t.alpha * expm1 / r0;
            StepCoefficients { sample, data: vec![first + d1, -d1] }
        }
        _ => {
            let s1 = levels[i - 1];
            let s2 = levels[i - 2];
            let r0 = (s0.lambda - s1.lambda) / h;
            let r1 = (s1.lambda - s2.lambda) / h;
            let c1 = t.alpha * (expm1 / h + 1.0);
            let c2 = -t.alpha * ((expm1 + h) / (h * h) - 0.5);
            // D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1) / (r0 + r1), with
            // D1_0 = (m0 - m1) / r0 and D1_1 = (m1 - m2) / r1.
            let k = r0 / (r0 + r1);
            let w0 = c1 * (1.0 + k) + c2 / (r0 + r1);
            let w1 = -(c1 * k + c2 / (r0 + r1));
            StepCoefficients { sample, data: vec![first + w0 / r0, -w0 / r0 + w1 / r1, -w1 / r1] }
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
fn unipc_rhs(h: f64, order: usize, variant: UniPcVariant) -> (f64, f64, Vec<f64>) {
    let hh = -h;
    let h_phi_1 = hh.exp_m1();
    let b_h = match variant {
        UniPcVariant::Bh1 => hh,
        UniPcVariant::Bh2 => hh.exp_m1(),
    };
    let mut h_phi_k = h_phi_1 / hh - 1.0;
    let mut factorial = 1.0;
    let mut rhs = Vec::with_capacity(order);
    for i in 1..=order {
        rhs.push(h_phi_k * factorial / b_h);
        factorial *= (i + 1) as f64;
        h_phi_k = h_phi_k / hh - 1.0 / factorial;
    }
    (h_phi_1, b_h, rhs)
}

/// Solves `V rho = b` for the Vandermonde-type matrix `V[row][col] = nodes[col]^row`
/// (a handful of unknowns; Gaussian elimination with partial pivoting).
fn solve_power_system(nodes: &[f64], rhs: &[f64]) -> Vec<f64> {
    let n = nodes.len();
    let mut matrix: Vec<Vec<f64>> =
        (0..n).map(|row| nodes.iter().map(|r| r.powi(row as i32)).chain([rhs[row]]).collect()).collect();
    for col in 0..n {
        let pivot =
            (col..n).max_by(|&a, &b| matrix[a][col].abs().total_cmp(&matrix[b][col].abs())).expect("non-empty column");
        matrix.swap(col, pivot);
        let (upper, lower) = matrix.split_at_mut(col + 1);
        let pivot_row = &upper[col];
        for row in lower.iter_mut() {
            let factor = row[col] / pivot_row[col];
            for (value, pivot_value) in row.iter_mut().zip(pivot_row).skip(col) {
                *value -= factor * pivot_value;
            }
        }
    }
    let mut solution = vec![0.0; n];
    for row in (0..n).rev() {
        let tail: f64 = (row + 1..n).map(|c| matrix[row][c] * solution[c]).sum();
        solution[row] = (matrix[row][n] - tail) / matrix[row][row];
    }
    solution
}

/// The UniP (predictor) update of step `i` (from `levels[i]` to `levels[i + 1]`) at the given
/// order, as weights of `x_i` and of `x0_hat_i, x0_hat_{i-1}, ...`.
pub fn unipc_predictor_coefficients(
    levels: &[NoiseLevel],
    i: usize,
    order: usize,
    variant: UniPcVariant,
) -> StepCoefficients {
    let (s0, t) = (levels[i], levels[i + 1]);
    let h = t.lambda - s0.lambda;
    let ratios: Vec<f64> = (1..order).map(|k| (levels[i - k].lambda - s0.lambda) / h).collect();
    let (h_phi_1, b_h, rhs) = unipc_rhs(h, order, variant);
    let rhos: Vec<f64> = match order {
        1 => Vec::new(),
        2 => vec![0.5],
        _ => solve_power_system(&ratios, &rhs[..order - 1]),
    };
    // x = (sigma_t / sigma_s0) x_i - alpha_t h phi_1 m0 - alpha_t B(h) sum_k rho_k (m_k - m0) / r_k
    let mut data = vec![-t.alpha * h_phi_1];
    for (rho, r) in rhos.iter().zip(&ratios) {
        let weight = -t.alpha * b_h * rho / r;
        data[0] -= weight;
        data.push(weight);
    }
    StepCoefficients { sample: t.sigma / s0.sigma, data }
}

/// The UniC (corrector) update that refines the state at `levels[i]` (i >= 1) once the model has
/// been evaluated there: weights of the state `x_{i-1}` the previous predictor started from, and of
/// `x0_hat_i` (the new evaluation, at the uncorrected state), `x0_hat_{i-1}, x0_hat_{i-2}, ...`.
/// `order` is the order of the predictor of step `i - 1`.
pub fn unipc_corrector_coefficients(
    levels: &[NoiseLevel],
    i: usize,
    order: usize,
    variant: UniPcVariant,
) -> StepCoefficients {
    let (s0, t) = (levels[i - 1], levels[i]);
    let h = t.lambda - s0.lambda;
    let ratios: Vec<f64> = (1..order).map(|k| (levels[i - 1 - k].lambda - s0.lambda) / h).collect();
    let (h_phi_1, b_h, rhs) = unipc_rhs(h, order, variant);
    let rhos: Vec<f64> = if order == 1 {
        vec![0.5]
    } else {
        let nodes: Vec<f64> = ratios.iter().copied().chain([1.0]).collect();
        solve_power_system(&nodes, &rhs)
    };
    // x = (sigma_t / sigma_s0) x_{i-1} - alpha_t h phi_1 m0
    //     - alpha_t B(h) (sum_k rho_k (m_k - m0) / r_k + rho_last (model_t - m0)), m0 = x0_hat_{i-1}
    let scale = -t.alpha * b_h;
    let rho_last = rhos[order - 1];
    let mut data = vec![scale * rho_last, -t.alpha * h_phi_1 - scale * rho_last];
    for (rho, r) in rhos.iter().zip(&ratios) {
        let weight = scale * rho / r;
        data[1] -= weight;
        data.push(weight);
    }
    StepCoefficients { sample: t.sigma / s0.sigma, data }
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
    if !(1..=3).contains(&options.order) {
        return Err(Error::invalid("solver_order", format!("{} (UniPC here has orders 1, 2, 3)", options.order)));
    }
    if !options.lower_order_final && options.order > 1 && options.final_sigma == FinalSigma::Zero {
        return Err(Error::invalid(
            "lower_order_final",
            "false needs final_sigmas_type sigma_min: a higher-order UniPC step to sigma = 0 is undefined",
        ));
    }
    let levels = noise_levels(schedule, timesteps, options.final_sigma)?;
    let orders = unipc_orders(timesteps.len(), options);
    let mut history: VecDeque<Tensor> = VecDeque::with_capacity(options.order + 1);
    let mut x = x_init.shallow_clone();
    let mut last_start: Option<Tensor> = None;
    for (i, &t) in timesteps.iter().enumerate() {
        let output = query(model, &x, t)?;
        let x0_hat = data_prediction(model.prediction_type(), &output, &x, levels[i]);
        if let Some(start) = &last_start {
            if !options.disable_corrector.contains(&(i - 1)) {
                let coefficients = unipc_corrector_coefficients(&levels, i, orders[i - 1], options.variant);
                let recent: Vec<&Tensor> = std::iter::once(&x0_hat).chain(history.iter()).collect();
                x = coefficients.apply(start, &recent);
            }
        }
        if history.len() == options.order {
            history.pop_back();
        }
        history.push_front(x0_hat);
        let coefficients = unipc_predictor_coefficients(&levels, i, orders[i], options.variant);
        let recent: Vec<&Tensor> = history.iter().collect();
        let next = coefficients.apply(&x, &recent);
        last_start = Some(std::mem::replace(&mut x, next));
        on_step(i);
    }
    Ok(x)
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
