//! The GGDM sampler family (DESIGN.md section 4, "GGDM step"):
//!
//! ```text
//! eps_i    = model(x_i, tau_i)                      (converted from x0 / v predictions)
//! x0_hat_i = p_i x_i + q_i eps_i
//! x_{i+1}  = sum_{j<=i} u_ij x_j + sum_{j<=i} w_ij x0_hat_j + sigma_i z_i     (x_{K+1} is the sample)
//! ```
//!
//! Every coefficient is "DDIM(eta) at the current grid + a learned residual", so
//! [`GgdmSampler::init_from_ddim`] reproduces DDIM exactly and learning the grid keeps the rest
//! consistent. [`GgdmSampler::init_from_dpm_solver`] starts the residuals at the difference between
//! DPM-Solver++(2M) and DDIM instead, so the sampler starts as DPM-Solver++(2M). The grid is `tau_i = tau_end + (tau_max - tau_end) (1 - sum_{j<i} g_j)` with
//! `g = softmax(grid_logits)`, where `tau_end` is the clean point (`-1`, `abar = 1`, or `0` when the
//! schedule does not set alpha to one).
//!
//! Parameters and coefficients are `f64` tensors (the states may be `f32`): the grid is recovered
//! from its logits to ~1e-13, so the sampler at initialisation equals DDIM to float precision.
//! `sigma_i` is learned as `sigma_ddim + residual` without a sign constraint: it only ever
//! multiplies symmetric noise `z_i`, so `-sigma` and `sigma` give the same sampler, and an
//! `eta = 0` start can still learn noise (a positive parametrisation would be stuck at zero).
//!
//! `sampler.json` ([`GgdmSampler::save`] / [`GgdmSampler::load`]) is versioned and records the
//! schedule, `K`, the model identity and every parameter; it round-trips bit for bit.

use crate::denoiser::Denoiser;
use crate::grid::{multistep_timesteps, timesteps, Spacing};
use crate::noise::NoiseSource;
use crate::prediction::PredictionType;
use crate::schedule::{NoiseSchedule, TAU_CLEAN};
use crate::scheduler_config::SchedulerConfig;
use crate::solvers;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// The `format` field of `sampler.json`.
pub const SAMPLER_FORMAT: &str = "ddss-ggdm-sampler";
/// The `version` this build writes and reads.
pub const SAMPLER_VERSION: u32 = 1;

/// Which past states and predictions a step may combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum History {
    /// All previous states and predictions (`j <= i`), the full GGDM family.
    #[default]
    Full,
    /// Only the current state and prediction (`j = i`), like DDIM.
    Last,
}

/// How the model is queried and how `x0_hat` is formed (DESIGN.md section 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Query {
    /// The model sees `x_i` at the grid's `tau_i`, and `x0_hat` uses `abar(tau_i)` (default).
    #[default]
    Grid,
    /// Paper-faithful GGDM: `x0_hat_i = (x_i - sqrt(v_i) eps) / a_i` with the marginal
    /// `q(x_i | x_0) = N(a_i x_0, v_i I)` that the learned coefficients imply (by recursion, with
    /// perfect predictions), and the model is queried where its signal-to-noise ratio equals
    /// `a_i^2 / v_i`, on the input rescaled to unit total variance. Equal to [`Query::Grid`] at
    /// DDIM initialisation.
    Marginal,
}

impl Query {
    fn is_grid(&self) -> bool {
        *self == Query::Grid
    }
}

/// Which parts of the sampler are learnable (the paper's ablations). Frozen parts keep their
/// DDIM-derived value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Learnable {
    /// The timestep logits.
    pub timesteps: bool,
    /// The residuals of the `u` and `w` coefficients.
    pub coefficients: bool,
    /// The residual of `sigma`.
    pub sigma: bool,
    /// The residuals of the prediction coefficients `p, q` (the "PRED" variant).
    pub prediction: bool,
}

impl Default for Learnable {
    fn default() -> Self {
        Self { timesteps: true, coefficients: true, sigma: true, prediction: false }
    }
}

impl Learnable {
    /// Nothing learnable.
    pub fn none() -> Self {
        Self { timesteps: false, coefficients: false, sigma: false, prediction: false }
    }

    /// Everything learnable.
    pub fn all() -> Self {
        Self { timesteps: true, coefficients: true, sigma: true, prediction: true }
    }
}

/// The training-free sampler a GGDM sampler starts as (`[sampler] init` of a search config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum GgdmInit {
    /// DDIM(eta) on a DDIM/DDPM grid ([`GgdmSampler::init_from_spacing`]).
    #[default]
    Ddim,
    /// DPM-Solver++(2M) on the multistep solvers' grid ([`GgdmSampler::init_from_dpm_solver_spacing`]).
    Dpmpp2m,
}

/// What model a sampler was made for (checked when it is used with a model).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ModelIdentity {
    /// A human-readable name or path of the model directory.
    pub name: String,
    /// `[C, H, W]` of its samples.
    pub sample_shape: Option<[i64; 3]>,
}

/// The learnable tensors (all `f64`, on one device).
#[derive(Debug)]
pub struct GgdmParams {
    /// `[K]` grid logits.
    pub grid_logits: Tensor,
    /// `[K, K]` residuals of `u_ij` (row i = step, col j = source state; upper triangle unused).
    pub u_residual: Tensor,
    /// `[K, K]` residuals of `w_ij`.
    pub w_residual: Tensor,
    /// `[K]` residuals of `sigma_i`.
    pub sigma_residual: Tensor,
    /// `[K]` relative residuals of `p_i` (`p_i = p_ddim_i (1 + p_residual_i)`).
    pub p_residual: Tensor,
    /// `[K]` relative residuals of `q_i` (`q_i = q_ddim_i (1 + q_residual_i)`).
    pub q_residual: Tensor,
}

impl GgdmParams {
    fn zeros_with_logits(grid_logits: Tensor) -> Self {
        let k = grid_logits.size()[0];
        let opts = (Kind::Double, grid_logits.device());
        Self {
            u_residual: Tensor::zeros([k, k], opts),
            w_residual: Tensor::zeros([k, k], opts),
            sigma_residual: Tensor::zeros([k], opts),
            p_residual: Tensor::zeros([k], opts),
            q_residual: Tensor::zeros([k], opts),
            grid_logits,
        }
    }

    /// `(name, tensor)` for every parameter, in a fixed order.
    pub fn named(&self) -> [(&'static str, &Tensor); 6] {
        [
            ("grid_logits", &self.grid_logits),
            ("u_residual", &self.u_residual),
            ("w_residual", &self.w_residual),
            ("sigma_residual", &self.sigma_residual),
            ("p_residual", &self.p_residual),
            ("q_residual", &self.q_residual),
        ]
    }

    fn deep_clone(&self) -> Self {
        let c = |t: &Tensor| t.detach().copy();
        Self {
            grid_logits: c(&self.grid_logits),
            u_residual: c(&self.u_residual),
            w_residual: c(&self.w_residual),
            sigma_residual: c(&self.sigma_residual),
            p_residual: c(&self.p_residual),
            q_residual: c(&self.q_residual),
        }
    }
}

/// All step coefficients for one evaluation of the sampler (differentiable in the parameters).
#[derive(Debug)]
pub struct Coefficients {
    /// `[K]` continuous timesteps `tau_1 > ... > tau_K`.
    pub tau: Tensor,
    /// `[K + 1]` `abar(tau_i)`, the last entry the clean point's.
    pub abar: Tensor,
    /// `[K, K]` state coefficients (lower triangular).
    pub u: Tensor,
    /// `[K, K]` prediction coefficients (lower triangular).
    pub w: Tensor,
    /// `[K]` noise scales.
    pub sigma: Tensor,
    /// `[K]` `x0_hat` coefficient on `x_i` (`p = pred_scale * p_unit`).
    pub p: Tensor,
    /// `[K]` `x0_hat` coefficient on `eps_i` (`q = pred_scale * q_unit`).
    pub q: Tensor,
    /// `[K]` `1 / sqrt(abar_i)` (`1 / a_i`, the marginal's signal scale, for [`Query::Marginal`]).
    pub pred_scale: Tensor,
    /// `[K]` `sqrt(1 - abar_i)` (`sqrt(v_i)`, the marginal's noise scale, for [`Query::Marginal`]).
    pub sqrt_one_minus_abar: Tensor,
    /// `[K]` `1 + p_residual` (exactly 1 at DDIM initialisation).
    pub p_rel: Tensor,
    /// `[K]` `1 + q_residual`.
    pub q_rel: Tensor,
    /// `[K]` where the model is queried (`tau` for [`Query::Grid`]).
    pub query_tau: Tensor,
    /// `[K]` `abar(query_tau)`.
    pub query_abar: Tensor,
    /// `[K]` the factor the model's input is scaled by (1 for [`Query::Grid`]).
    pub input_scale: Tensor,
}

/// `sqrt(x)` that is 0 with zero gradient for `x <= 0` (avoids an infinite gradient at 0).
fn safe_sqrt(x: &Tensor) -> Tensor {
    let positive = x.gt(0.0);
    x.clamp_min(1e-300).sqrt().where_self(&positive, &x.zeros_like())
}

/// A GGDM sampler: its configuration, schedule and parameters.
#[derive(Debug)]
pub struct GgdmSampler {
    /// Number of steps `K`.
    pub steps: usize,
    /// The eta of the DDIM base the residuals are added to.
    pub eta: f64,
    /// History depth.
    pub history: History,
    /// How the model is queried ([`Query::Grid`] unless set with [`Self::with_query`]).
    pub query: Query,
    /// Learnable parts.
    pub learn: Learnable,
    /// The model's scheduler settings (defines the schedule).
    pub scheduler: SchedulerConfig,
    /// The model the sampler was made for.
    pub model: ModelIdentity,
    /// First (largest) timestep.
    pub tau_max: f64,
    /// The clean point the grid ends at.
    pub tau_end: f64,
    /// The learnable tensors.
    pub params: GgdmParams,
    /// Free-form record of how the sampler was made (loss history summary, config, ...).
    pub provenance: serde_json::Value,
    schedule: NoiseSchedule,
    log_abar_table: Tensor,
}

impl GgdmSampler {
    /// A sampler equal to DDIM(eta) over `grid` (descending, continuous values allowed).
    pub fn init_from_ddim(
        scheduler: &SchedulerConfig,
        grid: &[f64],
        eta: f64,
        history: History,
        learn: Learnable,
        device: Device,
    ) -> Result<Self> {
        let schedule = scheduler.schedule()?;
        if grid.is_empty() {
            return Err(Error::invalid("steps", "0 (need at least 1)"));
        }
        if !(eta >= 0.0) {
            return Err(Error::invalid("eta", format!("{eta} (must be >= 0)")));
        }
        let tau_end = if schedule.final_abar() == 1.0 { TAU_CLEAN } else { 0.0 };
        let tau_max = grid[0];
        if tau_max > schedule.tau_max() {
            return Err(Error::invalid(
                "timesteps",
                format!("first timestep {tau_max} > T - 1 = {}", schedule.tau_max()),
            ));
        }
        let mut gaps = Vec::with_capacity(grid.len());
        for (i, &t) in grid.iter().enumerate() {
            let next = grid.get(i + 1).copied().unwrap_or(tau_end);
            if !(t > next) {
                return Err(Error::invalid(
                    "timesteps",
                    format!("grid must decrease strictly and stay above the clean point {tau_end}: entry {i} = {t}, next = {next}"),
                ));
            }
            gaps.push((t - next) / (tau_max - tau_end));
        }
        let logits: Vec<f64> = gaps.iter().map(|g| g.ln()).collect();
        let grid_logits = Tensor::from_slice(&logits).to_device(device);
        let sampler = Self {
            steps: grid.len(),
            eta,
            history,
            query: Query::Grid,
            learn,
            scheduler: scheduler.clone(),
            model: ModelIdentity::default(),
            tau_max,
            tau_end,
            params: GgdmParams::zeros_with_logits(grid_logits),
            provenance: serde_json::Value::Null,
            log_abar_table: schedule.log_abar_table(Kind::Double, device),
            schedule,
        };
        sampler.set_requires_grad();
        Ok(sampler)
    }

    /// DDIM(eta) over a baseline integer grid of `K` steps.
    pub fn init_from_spacing(
        scheduler: &SchedulerConfig,
        steps: usize,
        spacing: Spacing,
        eta: f64,
        history: History,
        learn: Learnable,
        device: Device,
    ) -> Result<Self> {
        let grid = timesteps(scheduler.num_train_timesteps, steps, spacing, scheduler.steps_offset)?;
        let grid: Vec<f64> = grid.into_iter().map(|t| t as f64).collect();
        Self::init_from_ddim(scheduler, &grid, eta, history, learn, device)
    }

    /// The same sampler with another [`Query`] mode.
    pub fn with_query(mut self, query: Query) -> Self {
        self.query = query;
        self
    }

    /// A sampler equal to DPM-Solver++(2M) (diffusers' defaults: lower-order final steps, final
    /// sigma zero) over `grid`, with the noise levels of the exact f64 schedule
    /// ([`solvers::exact_noise_levels`]). Each multistep update `x_{i+1} = a_i x_i + b_i x0_hat_i +
    /// c_i x0_hat_{i-1}` is written as GGDM coefficients `u_ii = a_i`, `w_ii = b_i`,
    /// `w_{i,i-1} = c_i`: the residuals start at the difference to DDIM(eta = 0), so the learned
    /// parts keep their meaning. Needs the full history (step `i` reads `x0_hat_{i-1}`).
    pub fn init_from_dpm_solver(
        scheduler: &SchedulerConfig,
        grid: &[f64],
        history: History,
        learn: Learnable,
        device: Device,
    ) -> Result<Self> {
        if history != History::Full && grid.len() > 1 {
            return Err(Error::invalid(
                "history",
                "`last` cannot hold DPM-Solver++(2M), whose steps read the previous prediction (use `full`)",
            ));
        }
        let mut sampler = Self::init_from_ddim(scheduler, grid, 0.0, history, learn, device)?;
        let k = grid.len();
        let options = solvers::DpmSolverOptions::default();
        let levels = solvers::exact_noise_levels(&sampler.schedule, grid, options.final_sigma)?;
        let orders = solvers::dpm_solver_orders(k, &options);
        let base = sampler.coefficients();
        let u_base = tensor_to_vec(&base.u);
        let w_base = tensor_to_vec(&base.w);
        let mut u_residual = vec![0.0; k * k];
        let mut w_residual = vec![0.0; k * k];
        for (i, &order) in orders.iter().enumerate() {
            let step = solvers::dpm_solver_coefficients(&levels, i, order);
            u_residual[i * k + i] = step.sample - u_base[i * k + i];
            for (back, weight) in step.data.iter().enumerate() {
                let j = i - back;
                w_residual[i * k + j] = weight - w_base[i * k + j];
            }
        }
        let as_matrix = |values: &[f64]| Tensor::from_slice(values).reshape([k as i64, k as i64]).to_device(device);
        sampler.params.u_residual = as_matrix(&u_residual);
        sampler.params.w_residual = as_matrix(&w_residual);
        sampler.set_requires_grad();
        Ok(sampler)
    }

    /// DPM-Solver++(2M) over the grid diffusers' multistep solvers place for `K` steps
    /// ([`crate::grid::multistep_timesteps`]).
    pub fn init_from_dpm_solver_spacing(
        scheduler: &SchedulerConfig,
        steps: usize,
        spacing: Spacing,
        history: History,
        learn: Learnable,
        device: Device,
    ) -> Result<Self> {
        let grid = multistep_timesteps(scheduler.num_train_timesteps, steps, spacing, scheduler.steps_offset)?;
        let grid: Vec<f64> = grid.into_iter().map(|t| t as f64).collect();
        Self::init_from_dpm_solver(scheduler, &grid, history, learn, device)
    }

    /// The noise schedule.
    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    /// The device the parameters live on.
    pub fn device(&self) -> Device {
        self.params.grid_logits.device()
    }

    /// Marks the enabled parts as requiring grad (and the others as not).
    pub fn set_requires_grad(&self) {
        let flags = [
            self.learn.timesteps,
            self.learn.coefficients,
            self.learn.coefficients,
            self.learn.sigma,
            self.learn.prediction,
            self.learn.prediction,
        ];
        for ((_, t), on) in self.params.named().into_iter().zip(flags) {
            let _ = t.set_requires_grad(on);
        }
    }

    /// The learnable part (`timesteps`, `coefficients`, `sigma`, `prediction`) of each tensor
    /// [`Self::trainable`] returns, in the same order.
    pub fn trainable_parts(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.learn.timesteps {
            out.push("timesteps");
        }
        if self.learn.coefficients {
            out.extend(["coefficients", "coefficients"]);
        }
        if self.learn.sigma {
            out.push("sigma");
        }
        if self.learn.prediction {
            out.extend(["prediction", "prediction"]);
        }
        out
    }

    /// The parameters an optimiser should update (those enabled in [`Learnable`]).
    pub fn trainable(&self) -> Vec<Tensor> {
        let p = &self.params;
        let mut out = Vec::new();
        if self.learn.timesteps {
            out.push(p.grid_logits.shallow_clone());
        }
        if self.learn.coefficients {
            out.push(p.u_residual.shallow_clone());
            out.push(p.w_residual.shallow_clone());
        }
        if self.learn.sigma {
            out.push(p.sigma_residual.shallow_clone());
        }
        if self.learn.prediction {
            out.push(p.p_residual.shallow_clone());
            out.push(p.q_residual.shallow_clone());
        }
        out
    }

    /// `abar` at continuous times (differentiable).
    pub fn abar_of(&self, tau: &Tensor) -> Tensor {
        NoiseSchedule::abar_tensor(&self.log_abar_table, tau)
    }

    /// The current grid `tau_1 > ... > tau_K` (differentiable in the logits).
    pub fn tau(&self) -> Tensor {
        let gaps = self.params.grid_logits.softmax(0, Kind::Double);
        let before = gaps.cumsum(0, Kind::Double) - &gaps;
        (before.ones_like() - before) * (self.tau_max - self.tau_end) + self.tau_end
    }

    /// The current grid as plain numbers.
    pub fn timesteps(&self) -> Vec<f64> {
        tensor_to_vec(&self.tau().detach())
    }

    /// The coefficients of every step (differentiable in the parameters).
    pub fn coefficients(&self) -> Coefficients {
        let k = self.steps as i64;
        let device = self.device();
        let tau = self.tau();
        let tau_end = Tensor::from_slice(&[self.tau_end]).to_device(device);
        let tau_all = Tensor::cat(&[&tau, &tau_end], 0);
        let abar = self.abar_of(&tau_all);
        let abar_t = abar.narrow(0, 0, k);
        let abar_s = abar.narrow(0, 1, k);
        let one_minus_t = abar_t.ones_like() - &abar_t;
        let one_minus_s = abar_s.ones_like() - &abar_s;
        let ddim_var = &one_minus_s / &one_minus_t * (abar_s.ones_like() - &abar_t / &abar_s);
        let sigma_base = safe_sqrt(&ddim_var) * self.eta;
        let u_base = safe_sqrt(&(&one_minus_s - &sigma_base * &sigma_base)) / one_minus_t.sqrt();
        let w_base = abar_s.sqrt() - abar_t.sqrt() * &u_base;
        let mask = match self.history {
            History::Full => Tensor::ones([k, k], (Kind::Double, device)).tril(0),
            History::Last => Tensor::eye(k, (Kind::Double, device)),
        };
        let u = u_base.diag_embed(0, -2, -1) + &self.params.u_residual * &mask;
        let w = w_base.diag_embed(0, -2, -1) + &self.params.w_residual * &mask;
        let sigma = sigma_base + &self.params.sigma_residual;
        // p and q are DDIM's values times (1 + residual); see `predict_x0` for how they are applied.
        let pred_scale = abar_t.rsqrt();
        let sqrt_one_minus_abar = one_minus_t.sqrt();
        let p_rel = self.params.p_residual.ones_like() + &self.params.p_residual;
        let q_rel = self.params.q_residual.ones_like() + &self.params.q_residual;
        let (pred_scale, sqrt_one_minus_abar, query_tau, query_abar, input_scale) = match self.query {
            Query::Grid => {
                (pred_scale, sqrt_one_minus_abar, tau.shallow_clone(), abar_t.shallow_clone(), tau.ones_like())
            }
            Query::Marginal => {
                let (signal, variance) = self.marginal(&abar_t, &u, &w, &sigma);
                let total = &signal * &signal + &variance;
                let query_abar = &signal * &signal / &total;
                let query_tau = self.tau_for_abar(&query_abar);
                (signal.reciprocal(), variance.sqrt(), query_tau, query_abar, total.rsqrt())
            }
        };
        let p = &pred_scale * &p_rel;
        let q = -(&pred_scale * &sqrt_one_minus_abar * &q_rel);
        Coefficients {
            tau,
            abar,
            u,
            w,
            sigma,
            p,
            q,
            pred_scale,
            sqrt_one_minus_abar,
            p_rel,
            q_rel,
            query_tau,
            query_abar,
            input_scale,
        }
    }

    /// The marginal `q(x_i | x_0) = N(a_i x_0, v_i I)` of every state, `([K] a, [K] v)`: write each
    /// state as `a_i x_0 + sum_j c_ij n_j` over the independent noises (the initial state's, with
    /// `a_1 = sqrt(abar_1)`, `c_11 = sqrt(1 - abar_1)`, and `z_1..z_K`), take every `x0_hat = x_0`,
    /// and apply the step recursion; `v_i = sum_j c_ij^2`. Differentiable in the coefficients.
    fn marginal(&self, abar_t: &Tensor, u: &Tensor, w: &Tensor, sigma: &Tensor) -> (Tensor, Tensor) {
        let k = self.steps as i64;
        let device = abar_t.device();
        let first_noise = Tensor::zeros([k + 1], (Kind::Double, device));
        let first_noise = first_noise.index_put(
            &[Some(Tensor::from_slice(&[0i64]).to_device(device))],
            &(abar_t.get(0).ones_like() - abar_t.get(0)).sqrt().reshape([1]),
            false,
        );
        let mut signal = vec![abar_t.get(0).sqrt()];
        let mut noise = vec![first_noise];
        for i in 0..k - 1 {
            let mut a_next = w.get(i).narrow(0, 0, i + 1).sum(Kind::Double);
            let unit = Tensor::zeros([k + 1], (Kind::Double, device));
            let unit = unit.index_put(
                &[Some(Tensor::from_slice(&[i + 1]).to_device(device))],
                &Tensor::ones([1], (Kind::Double, device)),
                false,
            );
            let mut c_next = unit * sigma.get(i);
            for j in 0..=i {
                let u_ij = u.get(i).get(j);
                a_next += &signal[j as usize] * &u_ij;
                c_next += &noise[j as usize] * u_ij;
            }
            signal.push(a_next);
            noise.push(c_next);
        }
        let signal = Tensor::stack(&signal, 0);
        let variance = Tensor::stack(&noise.iter().map(|c| (c * c).sum(Kind::Double)).collect::<Vec<_>>(), 0);
        (signal, variance)
    }

    /// The continuous times whose `abar` equals `abar` (`[K]`), differentiable: the value is the
    /// exact inverse of the log-linear interpolation, the gradient `d tau = d log(abar) / slope`
    /// with the slope of `log abar` on the segment the solution lies in (0 outside the schedule).
    fn tau_for_abar(&self, abar: &Tensor) -> Tensor {
        let values = tensor_to_vec(&abar.detach());
        let table = tensor_to_vec(&self.log_abar_table);
        let (mut tau0, mut inv_slope) = (Vec::with_capacity(values.len()), Vec::with_capacity(values.len()));
        for v in values {
            let tau = self.schedule.tau_for_abar(v);
            let knot = ((tau + 1.0).floor() as usize).min(table.len() - 2);
            let slope = table[knot + 1] - table[knot];
            let inside = tau > TAU_CLEAN && tau < self.schedule.tau_max() && slope != 0.0;
            tau0.push(tau);
            inv_slope.push(if inside { 1.0 / slope } else { 0.0 });
        }
        let device = abar.device();
        let tau0 = Tensor::from_slice(&tau0).to_device(device);
        let inv_slope = Tensor::from_slice(&inv_slope).to_device(device);
        let log_at_tau0 = self.abar_of(&tau0).log().detach();
        tau0 + (abar.log() - log_at_tau0) * inv_slope
    }

    /// Draws the `K + 1` noise tensors a sample needs: the initial state, then `z_1..z_K`.
    pub fn draw_noise(
        &self,
        noise: &mut dyn NoiseSource,
        shape: &[i64],
        device: Device,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let x_init = noise.next(shape, device)?;
        let z = (0..self.steps).map(|_| noise.next(shape, device)).collect::<Result<Vec<_>>>()?;
        Ok((x_init, z))
    }

    /// Runs the sampler from `x_init` with step noise `z` (`K` tensors). Differentiable in the
    /// parameters and in `x_init` unless called under `tch::no_grad`.
    pub fn sample<D: Denoiser + ?Sized>(&self, model: &D, x_init: &Tensor, z: &[Tensor]) -> Result<Tensor> {
        self.sample_with(model, x_init, z, &mut |_| {})
    }

    /// [`Self::sample`] with a callback after each step.
    pub fn sample_with<D: Denoiser + ?Sized>(
        &self,
        model: &D,
        x_init: &Tensor,
        z: &[Tensor],
        on_step: &mut dyn FnMut(usize),
    ) -> Result<Tensor> {
        if z.len() != self.steps {
            return Err(Error::invalid(
                "noise",
                format!("{} step-noise tensors for a {}-step sampler", z.len(), self.steps),
            ));
        }
        let coeffs = self.coefficients();
        let kind = x_init.kind();
        let mut states: Vec<Tensor> = vec![x_init.shallow_clone()];
        let mut x0_hats: Vec<Tensor> = Vec::with_capacity(self.steps);
        for i in 0..self.steps {
            let x0_hat = self.predict_x0(model, &coeffs, i, &states[i], kind)?;
            x0_hats.push(x0_hat);
            let next = self.combine(&coeffs, i, &states, &x0_hats, &z[i], kind);
            states.push(next);
            on_step(i);
        }
        states.pop().ok_or_else(|| Error::invalid("steps", "0"))
    }

    /// `x0_hat_i = p_i x_i + q_i eps_i` with `eps_i` from the model at `tau_i`.
    ///
    /// With `p = (1 + p_res) / sqrt(abar)` and `q = -sqrt(1-abar) (1 + q_res) / sqrt(abar)` this is
    /// evaluated in the algebraically identical form that matches the model's own parametrisation,
    /// so that in f32 no rounding error is amplified by `1 / sqrt(abar)` (~157 at `t = 999`):
    /// * epsilon: `(p_rel x - sqrt(1-abar) q_rel eps) / sqrt(abar)` (DDIM's operation order);
    /// * sample:  `(p_rel - q_rel) / sqrt(abar) x + q_rel x0_model`;
    /// * v:       `p_rel x0_model + sqrt(1-abar) / sqrt(abar) (p_rel - q_rel) eps_model`.
    pub fn predict_x0<D: Denoiser + ?Sized>(
        &self,
        model: &D,
        coeffs: &Coefficients,
        i: usize,
        x_i: &Tensor,
        kind: Kind,
    ) -> Result<Tensor> {
        Ok(self.predict_x0_and_output(model, coeffs, i, x_i, kind)?.0)
    }

    /// [`Self::predict_x0`], also returning the network's raw output.
    pub fn predict_x0_and_output<D: Denoiser + ?Sized>(
        &self,
        model: &D,
        coeffs: &Coefficients,
        i: usize,
        x_i: &Tensor,
        kind: Kind,
    ) -> Result<(Tensor, Tensor)> {
        let (x_net, tau_net) = self.network_input(coeffs, i, x_i, kind);
        let output = crate::denoiser::checked_forward(model, &x_net, &tau_net)?;
        let x0_hat = self.x0_from_output(coeffs, i, x_i, &x_net, &output, model.prediction_type(), kind);
        Ok((x0_hat, output))
    }

    /// What the network sees at step `i`: `(x_i, tau_i)` for [`Query::Grid`]; for
    /// [`Query::Marginal`], `x_i * input_scale_i` at `query_tau_i`. `tau` is expanded to the batch.
    pub fn network_input(&self, coeffs: &Coefficients, i: usize, x_i: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let n = x_i.size()[0];
        let row = i as i64;
        match self.query {
            Query::Grid => (x_i.shallow_clone(), coeffs.tau.get(row).to_kind(kind).expand([n], false)),
            Query::Marginal => (
                x_i * coeffs.input_scale.get(row).to_kind(kind),
                coeffs.query_tau.get(row).to_kind(kind).expand([n], false),
            ),
        }
    }

    /// `x0_hat_i` from the network's `output` on `x_net = network_input(..).0` (see
    /// [`Self::predict_x0`]; [`Query::Marginal`]: the output is turned into `eps` with
    /// `query_abar_i`, and `x0_hat = (p_rel x_i - sqrt(v_i) q_rel eps) / a_i`).
    #[allow(clippy::too_many_arguments)]
    pub fn x0_from_output(
        &self,
        coeffs: &Coefficients,
        i: usize,
        x_i: &Tensor,
        x_net: &Tensor,
        output: &Tensor,
        prediction: PredictionType,
        kind: Kind,
    ) -> Tensor {
        let row = i as i64;
        let scale = coeffs.pred_scale.get(row).to_kind(kind);
        let p_rel = coeffs.p_rel.get(row).to_kind(kind);
        let q_rel = coeffs.q_rel.get(row).to_kind(kind);
        if self.query == Query::Marginal {
            let sqrt_abar = coeffs.query_abar.get(row).sqrt().to_kind(kind);
            let sqrt_one_minus =
                (coeffs.query_abar.get(row).ones_like() - coeffs.query_abar.get(row)).sqrt().to_kind(kind);
            let eps = match prediction {
                PredictionType::Epsilon => output.shallow_clone(),
                PredictionType::Sample => (x_net - output * &sqrt_abar) / &sqrt_one_minus,
                PredictionType::VPrediction => output * &sqrt_abar + x_net * &sqrt_one_minus,
            };
            let sqrt_variance = coeffs.sqrt_one_minus_abar.get(row).to_kind(kind);
            return (x_i * &p_rel - eps * (&sqrt_variance * &q_rel)) * scale;
        }
        let sqrt_abar = coeffs.abar.get(row).sqrt().to_kind(kind);
        let sqrt_one_minus = coeffs.sqrt_one_minus_abar.get(row).to_kind(kind);
        match prediction {
            PredictionType::Epsilon => (x_i * &p_rel - output * (&sqrt_one_minus * &q_rel)) * scale,
            PredictionType::Sample => x_i * ((&p_rel - &q_rel) * scale) + output * q_rel,
            PredictionType::VPrediction => {
                let x0_model = x_i * &sqrt_abar - output * &sqrt_one_minus;
                let eps_model = output * &sqrt_abar + x_i * &sqrt_one_minus;
                x0_model * &p_rel + eps_model * (scale * sqrt_one_minus * (p_rel - q_rel))
            }
        }
    }

    /// `x_{i+1} = sum_{j<=i} u_ij x_j + sum_{j<=i} w_ij x0_hat_j + sigma_i z_i`.
    pub fn combine(
        &self,
        coeffs: &Coefficients,
        i: usize,
        states: &[Tensor],
        x0_hats: &[Tensor],
        z_i: &Tensor,
        kind: Kind,
    ) -> Tensor {
        let row = i as i64;
        let first = match self.history {
            History::Full => 0,
            History::Last => i,
        };
        let mut next = z_i.to_kind(kind) * coeffs.sigma.get(row).to_kind(kind);
        for j in first..=i {
            let u_ij = coeffs.u.get(row).get(j as i64).to_kind(kind);
            let w_ij = coeffs.w.get(row).get(j as i64).to_kind(kind);
            next = next + &states[j] * u_ij + &x0_hats[j] * w_ij;
        }
        next
    }

    /// A detached deep copy (for best-so-far tracking and restoring good parameters).
    pub fn snapshot(&self) -> GgdmParams {
        self.params.deep_clone()
    }

    /// Replaces the parameters by a snapshot (shapes must match).
    pub fn restore(&mut self, params: &GgdmParams) -> Result<()> {
        for ((name, ours), (_, theirs)) in self.params.named().into_iter().zip(params.named()) {
            if ours.size() != theirs.size() {
                return Err(Error::Shape {
                    what: format!("sampler parameter {name}"),
                    expected: format!("{:?}", ours.size()),
                    got: theirs.size(),
                });
            }
        }
        self.params = params.deep_clone();
        self.set_requires_grad();
        Ok(())
    }

    /// Checks that the sampler fits a model with this scheduler config and sample shape.
    pub fn check_compatible(&self, scheduler: &SchedulerConfig, sample_shape: Option<[i64; 3]>) -> Result<()> {
        let ours = self.scheduler.schedule()?;
        let theirs = scheduler.schedule()?;
        if ours.abar() != theirs.abar() || ours.final_abar() != theirs.final_abar() {
            return Err(Error::invalid(
                "sampler schedule",
                format!(
                    "the sampler was made for a {} schedule with T = {}, the model uses {} with T = {}",
                    self.scheduler.beta_schedule.diffusers_name(),
                    self.scheduler.num_train_timesteps,
                    scheduler.beta_schedule.diffusers_name(),
                    scheduler.num_train_timesteps
                ),
            ));
        }
        if let (Some(a), Some(b)) = (self.model.sample_shape, sample_shape) {
            if a != b {
                return Err(Error::invalid(
                    "sampler sample_shape",
                    format!("the sampler was made for samples of shape {a:?}, the model makes {b:?}"),
                ));
            }
        }
        Ok(())
    }

    /// The serialisable form.
    pub fn to_file(&self) -> SamplerFile {
        let coeffs = tch::no_grad(|| self.coefficients());
        SamplerFile {
            format: SAMPLER_FORMAT.to_string(),
            version: SAMPLER_VERSION,
            steps: self.steps,
            eta: self.eta,
            history: self.history,
            learn: self.learn,
            query: self.query,
            scheduler: self.scheduler.clone(),
            model: self.model.clone(),
            tau_max: self.tau_max,
            tau_end: self.tau_end,
            params: ParamsFile {
                grid_logits: tensor_to_vec(&self.params.grid_logits),
                u_residual: tensor_to_rows(&self.params.u_residual),
                w_residual: tensor_to_rows(&self.params.w_residual),
                sigma_residual: tensor_to_vec(&self.params.sigma_residual),
                p_residual: tensor_to_vec(&self.params.p_residual),
                q_residual: tensor_to_vec(&self.params.q_residual),
            },
            derived: DerivedFile {
                timesteps: tensor_to_vec(&coeffs.tau),
                sigma: tensor_to_vec(&coeffs.sigma.abs()),
                u: tensor_to_rows(&coeffs.u),
                w: tensor_to_rows(&coeffs.w),
            },
            provenance: self.provenance.clone(),
        }
    }

    /// Rebuilds a sampler from its file form.
    pub fn from_file(file: SamplerFile, device: Device) -> Result<Self> {
        if file.format != SAMPLER_FORMAT {
            return Err(Error::invalid("format", format!("`{}` (expected `{SAMPLER_FORMAT}`)", file.format)));
        }
        if file.version != SAMPLER_VERSION {
            return Err(Error::invalid(
                "version",
                format!("{} is not supported; this build reads version {SAMPLER_VERSION}", file.version),
            ));
        }
        let k = file.steps;
        if k == 0 {
            return Err(Error::invalid("steps", "0 (need at least 1)"));
        }
        let vec_param = |name: &str, v: &[f64]| -> Result<Tensor> {
            if v.len() != k {
                return Err(Error::invalid(format!("params.{name}"), format!("{} values for steps = {k}", v.len())));
            }
            if v.iter().any(|x| !x.is_finite()) {
                return Err(Error::invalid(format!("params.{name}"), "holds a non-finite value"));
            }
            Ok(Tensor::from_slice(v).to_device(device))
        };
        let mat_param = |name: &str, rows: &[Vec<f64>]| -> Result<Tensor> {
            if rows.len() != k || rows.iter().any(|r| r.len() != k) {
                return Err(Error::invalid(format!("params.{name}"), format!("must be a {k} x {k} matrix")));
            }
            let flat: Vec<f64> = rows.iter().flatten().copied().collect();
            if flat.iter().any(|x| !x.is_finite()) {
                return Err(Error::invalid(format!("params.{name}"), "holds a non-finite value"));
            }
            Ok(Tensor::from_slice(&flat).reshape([k as i64, k as i64]).to_device(device))
        };
        let params = GgdmParams {
            grid_logits: vec_param("grid_logits", &file.params.grid_logits)?,
            u_residual: mat_param("u_residual", &file.params.u_residual)?,
            w_residual: mat_param("w_residual", &file.params.w_residual)?,
            sigma_residual: vec_param("sigma_residual", &file.params.sigma_residual)?,
            p_residual: vec_param("p_residual", &file.params.p_residual)?,
            q_residual: vec_param("q_residual", &file.params.q_residual)?,
        };
        file.scheduler.validate()?;
        let schedule = file.scheduler.schedule()?;
        if !(file.tau_max > file.tau_end) || file.tau_max > schedule.tau_max() {
            return Err(Error::invalid(
                "tau_max",
                format!("{} (must lie in ({}, {}])", file.tau_max, file.tau_end, schedule.tau_max()),
            ));
        }
        let sampler = Self {
            steps: k,
            eta: file.eta,
            history: file.history,
            query: file.query,
            learn: file.learn,
            scheduler: file.scheduler,
            model: file.model,
            tau_max: file.tau_max,
            tau_end: file.tau_end,
            params,
            provenance: file.provenance,
            log_abar_table: schedule.log_abar_table(Kind::Double, device),
            schedule,
        };
        sampler.set_requires_grad();
        Ok(sampler)
    }

    /// Writes `sampler.json` atomically (temporary file, fsync, rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(&self.to_file())
            .map_err(|e| Error::format(path, format!("serialising: {e}")))?;
        crate::io::write_atomic(path, text.as_bytes())
    }

    /// Reads `sampler.json`.
    pub fn load(path: &Path, device: Device) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text, device).map_err(|e| match e {
            Error::Invalid { what, msg } => Error::format(path, format!("`{what}`: {msg}")),
            Error::Format { msg, .. } => Error::format(path, msg),
            other => other,
        })
    }

    /// Parses the JSON text of a sampler file.
    pub fn from_json(text: &str, device: Device) -> Result<Self> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| Error::format("sampler.json", format!("not valid JSON: {e}")))?;
        let format = value.get("format").and_then(|f| f.as_str()).unwrap_or("");
        if format != SAMPLER_FORMAT {
            return Err(Error::format(
                "sampler.json",
                format!("not a GGDM sampler file (format = `{format}`, expected `{SAMPLER_FORMAT}`)"),
            ));
        }
        match value.get("version").and_then(|v| v.as_u64()) {
            Some(v) if v == SAMPLER_VERSION as u64 => {}
            Some(v) => {
                return Err(Error::format(
                    "sampler.json",
                    format!("version {v} is not supported; this build reads version {SAMPLER_VERSION}"),
                ))
            }
            None => return Err(Error::format("sampler.json", "missing or non-integer `version`")),
        }
        let file: SamplerFile = serde_json::from_value(value)
            .map_err(|e| Error::format("sampler.json", format!("invalid content: {e}")))?;
        Self::from_file(file, device)
    }
}

/// `sampler.json`, version 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplerFile {
    /// Always [`SAMPLER_FORMAT`].
    pub format: String,
    /// Always [`SAMPLER_VERSION`].
    pub version: u32,
    /// `K`.
    pub steps: usize,
    /// DDIM base eta.
    pub eta: f64,
    /// History depth.
    pub history: History,
    /// How the model is queried (absent = `grid`).
    #[serde(default, skip_serializing_if = "Query::is_grid")]
    pub query: Query,
    /// Learnable parts.
    pub learn: Learnable,
    /// The model's scheduler settings.
    pub scheduler: SchedulerConfig,
    /// The model identity.
    pub model: ModelIdentity,
    /// First timestep.
    pub tau_max: f64,
    /// Clean point.
    pub tau_end: f64,
    /// The parameters.
    pub params: ParamsFile,
    /// Values derived from the parameters, for people and other tools (ignored when loading).
    pub derived: DerivedFile,
    /// How the sampler was made.
    #[serde(default)]
    pub provenance: serde_json::Value,
}

/// The parameters in `sampler.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamsFile {
    /// `[K]`.
    pub grid_logits: Vec<f64>,
    /// `[K][K]`.
    pub u_residual: Vec<Vec<f64>>,
    /// `[K][K]`.
    pub w_residual: Vec<Vec<f64>>,
    /// `[K]`.
    pub sigma_residual: Vec<f64>,
    /// `[K]`.
    pub p_residual: Vec<f64>,
    /// `[K]`.
    pub q_residual: Vec<f64>,
}

/// Derived values written for readers of `sampler.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DerivedFile {
    /// The continuous grid.
    pub timesteps: Vec<f64>,
    /// `|sigma_i|`.
    pub sigma: Vec<f64>,
    /// Full `u` matrix.
    pub u: Vec<Vec<f64>>,
    /// Full `w` matrix.
    pub w: Vec<Vec<f64>>,
}

/// A 1-D tensor's values as `f64`.
pub fn tensor_to_vec(t: &Tensor) -> Vec<f64> {
    let flat = t.detach().to_kind(Kind::Double).to_device(Device::Cpu).reshape([-1]);
    let n = flat.size()[0] as usize;
    let mut out = vec![0.0f64; n];
    flat.copy_data(&mut out, n);
    out
}

fn tensor_to_rows(t: &Tensor) -> Vec<Vec<f64>> {
    let size = t.size();
    let cols = size.get(1).copied().unwrap_or(1).max(1) as usize;
    tensor_to_vec(t).chunks(cols).map(|c| c.to_vec()).collect()
}
