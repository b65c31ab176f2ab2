//! The GGDM sampler family (DESIGN.md section 4, "GGDM step" and "Starting solver and teacher"):
//!
//! ```text
//! eps_i    = model(x_i, tau_i)                      (converted from x0 / v predictions)
//! x0_hat_i = p_i x_i + q_i eps_i
//! x_{i+1}  = sum_{j<=i} u_ij x_j + sum_{j<=i} w_ij x0_hat_j + sigma_i z_i     (x_{K+1} is the sample)
//! ```
//!
//! Every coefficient is "the start solver's value at the current grid + a learned residual"
//! ([`GgdmBase`]): DDIM(eta) ([`GgdmSampler::init_from_ddim`]), DPM-Solver++(2M/3M) or UniPC
//! (order 2 or 3, with the UniC corrector; [`GgdmSampler::init_from_solver`]). The residuals start
//! at 0, so at initialisation the sampler is that solver, and because the base is evaluated
//! differentiably at the learned grid (through `abar(tau)` and the log-SNR `lambda(tau)`, with the
//! solver formulas of [`crate::solvers`] run in [`crate::scalar::TensorScalar`]), moving the grid
//! keeps the solver consistent: with the residuals at 0 the sampler is the solver run on the moved
//! grid. The solver bases use the exact f64 noise levels ([`solvers::exact_noise_levels`]) with a
//! final sigma of zero; UniPC's states are its predicted (uncorrected) states, where the model is
//! queried ([`solvers::unipc_ggdm_rows`]).
//!
//! The grid is `tau_i = tau_end + (tau_max - tau_end) (1 - sum_{j<i} g_j)` with
//! `g = softmax(grid_logits)`, where `tau_end` is the clean point (`-1`, `abar = 1`, or `0` when the
//! schedule does not set alpha to one).
//!
//! Parameters and coefficients are `f64` tensors (the states may be `f32`): the grid is recovered
//! from its logits to ~1e-13, so the sampler at initialisation equals its start solver to float
//! precision. `sigma_i` is learned as `sigma_base + residual` without a sign constraint: it only
//! ever multiplies symmetric noise `z_i`, so `-sigma` and `sigma` give the same sampler, and an
//! `eta = 0` start can still learn noise (a positive parametrisation would be stuck at zero).
//!
//! `sampler.json` ([`GgdmSampler::save`] / [`GgdmSampler::load`]) is versioned and records the
//! schedule, `K`, the base, the model identity, every parameter and every derived coefficient; it
//! round-trips bit for bit. The format, and how to run a sampler from its derived coefficients
//! alone, is documented in `docs/sampler_json.md`.

use crate::denoiser::Denoiser;
use crate::grid::{logsnr_grid, Spacing};
use crate::noise::NoiseSource;
use crate::prediction::PredictionType;
use crate::scalar::TensorScalar;
use crate::schedule::{NoiseSchedule, TAU_CLEAN};
use crate::scheduler_config::SchedulerConfig;
use crate::solvers::{self, MultistepSolver, NoiseLevel};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// The `format` field of `sampler.json`.
pub const SAMPLER_FORMAT: &str = "ddss-ggdm-sampler";
/// The `version` this build writes.
pub const SAMPLER_VERSION: u32 = 2;
/// The versions this build reads ([`GgdmSampler::from_json`]): version 1 is a DDIM(eta) base.
pub const SAMPLER_VERSIONS_READ: [u32; 2] = [1, 2];

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

    /// Whether `part` is learnable.
    pub fn contains(&self, part: LearnablePart) -> bool {
        match part {
            LearnablePart::Timesteps => self.timesteps,
            LearnablePart::Coefficients => self.coefficients,
            LearnablePart::Sigma => self.sigma,
            LearnablePart::Prediction => self.prediction,
        }
    }
}

/// A part of the sampler that [`Learnable`] switches on or off; each parameter tensor belongs to
/// one ([`GgdmParams::entries`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LearnablePart {
    /// The timestep logits.
    Timesteps,
    /// The residuals of `u` and `w`.
    Coefficients,
    /// The residual of `sigma`.
    Sigma,
    /// The residuals of `p` and `q`.
    Prediction,
}

impl LearnablePart {
    /// Every part, in the order of [`Learnable`]'s fields.
    pub const ALL: [LearnablePart; 4] =
        [LearnablePart::Timesteps, LearnablePart::Coefficients, LearnablePart::Sigma, LearnablePart::Prediction];

    /// The name in configs and files (the field of [`Learnable`], and of a search's
    /// `optim.lr_scale`).
    pub fn name(self) -> &'static str {
        match self {
            LearnablePart::Timesteps => "timesteps",
            LearnablePart::Coefficients => "coefficients",
            LearnablePart::Sigma => "sigma",
            LearnablePart::Prediction => "prediction",
        }
    }
}

/// The start solver of a GGDM sampler (`[sampler] init` of a search config, `base` of
/// `sampler.json`): every coefficient is this solver's, evaluated at the current grid, plus a
/// learned residual that starts at 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum GgdmBase {
    /// DDIM(eta), started on a DDIM/DDPM grid ([`GgdmSampler::init_from_spacing`]).
    #[default]
    Ddim,
    /// DPM-Solver++(2M) with diffusers' defaults (midpoint, lower-order final steps, final sigma
    /// zero), started on the multistep solvers' grid ([`GgdmSampler::init_from_solver_spacing`]).
    Dpmpp2m,
    /// DPM-Solver++(3M), otherwise as [`GgdmBase::Dpmpp2m`].
    Dpmpp3m,
    /// UniPC (bh2, order 2, with the UniC corrector; [`solvers::unipc`] with
    /// [`solvers::UniPcOptions::default`], what `ddss-cli sample --sampler unipc` runs), started on
    /// the multistep solvers' grid.
    Unipc,
    /// UniPC of order 3, otherwise as [`GgdmBase::Unipc`].
    Unipc3,
}

impl GgdmBase {
    /// Every base, in the order the docs list them.
    pub const ALL: [GgdmBase; 5] =
        [GgdmBase::Ddim, GgdmBase::Dpmpp2m, GgdmBase::Dpmpp3m, GgdmBase::Unipc, GgdmBase::Unipc3];

    /// The name in configs and in `sampler.json` (also the `ddss-cli sample --sampler` name).
    pub fn name(self) -> &'static str {
        match self {
            GgdmBase::Ddim => "ddim",
            GgdmBase::Dpmpp2m => "dpmpp2m",
            GgdmBase::Dpmpp3m => "dpmpp3m",
            GgdmBase::Unipc => "unipc",
            GgdmBase::Unipc3 => "unipc3",
        }
    }

    /// The multistep solver, `None` for DDIM.
    pub fn solver(self) -> Option<MultistepSolver> {
        match self {
            GgdmBase::Ddim => None,
            GgdmBase::Dpmpp2m => Some(MultistepSolver::DpmSolver(solvers::DpmSolverOptions::default())),
            GgdmBase::Dpmpp3m => {
                Some(MultistepSolver::DpmSolver(solvers::DpmSolverOptions { order: 3, ..Default::default() }))
            }
            GgdmBase::Unipc => Some(MultistepSolver::UniPc(solvers::UniPcOptions::default())),
            GgdmBase::Unipc3 => Some(MultistepSolver::UniPc(solvers::UniPcOptions { order: 3, ..Default::default() })),
        }
    }

    /// Checks that a sampler of `steps` steps with this base can have `eta` and `history`: the
    /// multistep solvers are deterministic (`eta = 0`) and read earlier predictions
    /// (`history = full`, unless `K = 1`).
    pub fn check(self, steps: usize, eta: f64, history: History) -> Result<()> {
        if self == GgdmBase::Ddim {
            return Ok(());
        }
        if eta != 0.0 {
            return Err(Error::invalid(
                "eta",
                format!("{eta} with base `{}`: the multistep solvers are deterministic (need eta = 0)", self.name()),
            ));
        }
        if history != History::Full && steps > 1 {
            return Err(Error::invalid(
                "history",
                format!("`last` cannot hold base `{}`, whose steps read earlier predictions (use `full`)", self.name()),
            ));
        }
        Ok(())
    }
}

/// Which baseline's grid a start is placed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StartGrid {
    /// DDIM/DDPM `set_timesteps` ([`SchedulerConfig::timesteps`]).
    Ddim,
    /// The multistep solvers' ([`SchedulerConfig::multistep_timesteps`]).
    Multistep,
}

/// The `K` timesteps a start with `spacing` is placed on: the integer list of `kind`, or for
/// `logsnr` the continuous log-SNR-uniform grid ([`logsnr_grid`]), whose levels are exactly uniform
/// in log-SNR (the integer list of the baselines rounds them).
fn start_grid(scheduler: &SchedulerConfig, steps: usize, spacing: Spacing, kind: StartGrid) -> Result<Vec<f64>> {
    if spacing == Spacing::LogSnr {
        return logsnr_grid(&scheduler.schedule()?, steps);
    }
    let grid = match kind {
        StartGrid::Ddim => scheduler.timesteps(steps, spacing)?,
        StartGrid::Multistep => scheduler.multistep_timesteps(steps, spacing)?,
    };
    Ok(grid.into_iter().map(|t| t as f64).collect())
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

    /// `(name, part, tensor)` for every parameter, in a fixed order: the name in checkpoints and
    /// `sampler.json`, and the [`LearnablePart`] that makes the tensor learnable.
    pub fn entries(&self) -> [(&'static str, LearnablePart, &Tensor); 6] {
        [
            ("grid_logits", LearnablePart::Timesteps, &self.grid_logits),
            ("u_residual", LearnablePart::Coefficients, &self.u_residual),
            ("w_residual", LearnablePart::Coefficients, &self.w_residual),
            ("sigma_residual", LearnablePart::Sigma, &self.sigma_residual),
            ("p_residual", LearnablePart::Prediction, &self.p_residual),
            ("q_residual", LearnablePart::Prediction, &self.q_residual),
        ]
    }

    /// `(name, tensor)` for every parameter, in the order of [`Self::entries`].
    pub fn named(&self) -> [(&'static str, &Tensor); 6] {
        self.entries().map(|(name, _, t)| (name, t))
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

/// Declares [`Coefficients`] and the methods that visit every field, from one list of fields: a
/// coefficient added to the list is mapped and listed by them too.
macro_rules! coefficients {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        /// All step coefficients for one evaluation of the sampler (differentiable in the
        /// parameters).
        #[derive(Debug)]
        pub struct Coefficients {
            $($(#[$doc])* pub $name: Tensor,)*
        }

        impl Coefficients {
            /// The number of coefficient tensors.
            pub const COUNT: usize = [$(stringify!($name)),*].len();

            /// `(field name, tensor)` for every coefficient, in declaration order.
            pub fn named(&self) -> [(&'static str, &Tensor); Self::COUNT] {
                [$((stringify!($name), &self.$name)),*]
            }

            /// The coefficients with `f` applied to every tensor (in declaration order).
            pub fn map(&self, mut f: impl FnMut(&Tensor) -> Tensor) -> Coefficients {
                Coefficients { $($name: f(&self.$name)),* }
            }
        }
    };
}

coefficients! {
    /// `[K]` continuous timesteps `tau_1 > ... > tau_K`.
    tau,
    /// `[K + 1]` `abar(tau_i)`, the last entry the clean point's.
    abar,
    /// `[K, K]` state coefficients (lower triangular).
    u,
    /// `[K, K]` prediction coefficients (lower triangular).
    w,
    /// `[K]` noise scales.
    sigma,
    /// `[K]` `x0_hat` coefficient on `x_i` (`p = pred_scale * p_unit`).
    p,
    /// `[K]` `x0_hat` coefficient on `eps_i` (`q = pred_scale * q_unit`).
    q,
    /// `[K]` `1 / sqrt(abar_i)` (`1 / a_i`, the marginal's signal scale, for [`Query::Marginal`]).
    pred_scale,
    /// `[K]` `sqrt(1 - abar_i)` (`sqrt(v_i)`, the marginal's noise scale, for [`Query::Marginal`]).
    sqrt_one_minus_abar,
    /// `[K]` `1 + p_residual` (exactly 1 at DDIM initialisation).
    p_rel,
    /// `[K]` `1 + q_residual`.
    q_rel,
    /// `[K]` where the model is queried (`tau` for [`Query::Grid`]).
    query_tau,
    /// `[K]` `abar(query_tau)`.
    query_abar,
    /// `[K]` the factor the model's input is scaled by (1 for [`Query::Grid`]).
    input_scale,
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
    /// The start solver the residuals are added to.
    pub base: GgdmBase,
    /// The eta of a DDIM base (0 for the other bases).
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
            base: GgdmBase::Ddim,
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

    /// DDIM(eta) over the DDIM/DDPM grid of `K` steps ([`SchedulerConfig::timesteps`]); for
    /// `logsnr`, the continuous log-SNR-uniform grid ([`crate::grid::logsnr_grid`]).
    pub fn init_from_spacing(
        scheduler: &SchedulerConfig,
        steps: usize,
        spacing: Spacing,
        eta: f64,
        history: History,
        learn: Learnable,
        device: Device,
    ) -> Result<Self> {
        let grid = start_grid(scheduler, steps, spacing, StartGrid::Ddim)?;
        Self::init_from_ddim(scheduler, &grid, eta, history, learn, device)
    }

    /// The same sampler with another [`Query`] mode.
    pub fn with_query(mut self, query: Query) -> Self {
        self.query = query;
        self
    }

    /// A sampler equal to the multistep solver `base` over `grid`, with the noise levels of the exact
    /// f64 schedule ([`solvers::exact_noise_levels`]) and a final sigma of zero: the solver's steps,
    /// written as GGDM coefficients ([`solvers::GgdmRow`]), are the base, evaluated at the current
    /// grid; the residuals start at 0. `base = ddim` is DDIM(eta = 0). Needs the full history
    /// (the steps read earlier predictions) unless `K = 1`.
    pub fn init_from_solver(
        base: GgdmBase,
        scheduler: &SchedulerConfig,
        grid: &[f64],
        history: History,
        learn: Learnable,
        device: Device,
    ) -> Result<Self> {
        base.check(grid.len(), 0.0, history)?;
        if base != GgdmBase::Ddim {
            if let Some(bad) = grid.iter().find(|&&t| t < 0.0) {
                return Err(Error::invalid(
                    "timesteps",
                    format!("{bad}: the multistep solvers' grid must lie in [0, T - 1]"),
                ));
            }
        }
        let mut sampler = Self::init_from_ddim(scheduler, grid, 0.0, history, learn, device)?;
        sampler.base = base;
        Ok(sampler)
    }

    /// [`Self::init_from_solver`] over the grid diffusers' multistep solvers place for `K` steps
    /// ([`SchedulerConfig::multistep_timesteps`]); for `logsnr`, the continuous log-SNR-uniform
    /// grid ([`crate::grid::logsnr_grid`]).
    pub fn init_from_solver_spacing(
        base: GgdmBase,
        scheduler: &SchedulerConfig,
        steps: usize,
        spacing: Spacing,
        history: History,
        learn: Learnable,
        device: Device,
    ) -> Result<Self> {
        let grid = start_grid(scheduler, steps, spacing, StartGrid::Multistep)?;
        Self::init_from_solver(base, scheduler, &grid, history, learn, device)
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
        for (_, part, t) in self.params.entries() {
            let _ = t.set_requires_grad(self.learn.contains(part));
        }
    }

    /// The parameters an optimiser should update (those enabled in [`Learnable`]), each with its
    /// part, in the order of [`GgdmParams::entries`].
    pub fn trainable_parts(&self) -> Vec<(LearnablePart, Tensor)> {
        let entries = self.params.entries().into_iter();
        entries
            .filter(|&(_, part, _)| self.learn.contains(part))
            .map(|(_, part, t)| (part, t.shallow_clone()))
            .collect()
    }

    /// The tensors of [`Self::trainable_parts`].
    pub fn trainable(&self) -> Vec<Tensor> {
        self.trainable_parts().into_iter().map(|(_, t)| t).collect()
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

    /// The coefficients of every step (differentiable in the parameters): the base's `u, w, sigma`
    /// at the current grid ([`Self::base_coefficients`]) plus the residuals, and the prediction
    /// coefficients of the query mode.
    pub fn coefficients(&self) -> Coefficients {
        let k = self.steps as i64;
        let device = self.device();
        let tau = self.tau();
        let tau_end = Tensor::from_slice(&[self.tau_end]).to_device(device);
        let tau_all = Tensor::cat(&[&tau, &tau_end], 0);
        let abar = self.abar_of(&tau_all);
        let abar_t = abar.narrow(0, 0, k);
        let (u_base, w_base, sigma_base) = self.base_coefficients(&abar);
        let mask = match self.history {
            History::Full => Tensor::ones([k, k], (Kind::Double, device)).tril(0),
            History::Last => Tensor::eye(k, (Kind::Double, device)),
        };
        let u = u_base + &self.params.u_residual * &mask;
        let w = w_base + &self.params.w_residual * &mask;
        let sigma = sigma_base + &self.params.sigma_residual;
        // p and q are DDIM's values times (1 + residual); see `predict_x0` for how they are applied.
        let one_minus_t = abar_t.ones_like() - &abar_t;
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

    /// The base's `([K, K] u, [K, K] w, [K] sigma)` at the grid whose `abar` (`[K + 1]`, the last
    /// entry the clean point's) is given, differentiable in it: DDIM(eta) (DESIGN.md section 4), or
    /// the multistep solver's steps in GGDM form ([`MultistepSolver::ggdm_rows`]) with `sigma = 0`.
    pub fn base_coefficients(&self, abar: &Tensor) -> (Tensor, Tensor, Tensor) {
        match self.base.solver() {
            None => self.ddim_base(abar),
            Some(solver) => self.solver_base(&solver, &abar.narrow(0, 0, self.steps as i64)),
        }
    }

    /// DDIM(eta): `u_ii = sqrt(1 - abar_s - sigma_i^2) / sqrt(1 - abar_t)`,
    /// `w_ii = sqrt(abar_s) - sqrt(abar_t) u_ii`, `sigma_i^2 = eta^2 (1-abar_s)/(1-abar_t) (1 - abar_t/abar_s)`.
    fn ddim_base(&self, abar: &Tensor) -> (Tensor, Tensor, Tensor) {
        let k = self.steps as i64;
        let abar_t = abar.narrow(0, 0, k);
        let abar_s = abar.narrow(0, 1, k);
        let one_minus_t = abar_t.ones_like() - &abar_t;
        let one_minus_s = abar_s.ones_like() - &abar_s;
        let ddim_var = &one_minus_s / &one_minus_t * (abar_s.ones_like() - &abar_t / &abar_s);
        let sigma_base = safe_sqrt(&ddim_var) * self.eta;
        let u_base = safe_sqrt(&(&one_minus_s - &sigma_base * &sigma_base)) / one_minus_t.sqrt();
        let w_base = abar_s.sqrt() - abar_t.sqrt() * &u_base;
        (u_base.diag_embed(0, -2, -1), w_base.diag_embed(0, -2, -1), sigma_base)
    }

    /// `solver`'s steps over the noise levels of `abar_t` (`[K]`, exact f64 route
    /// [`NoiseLevel::from_abar`]) and clean data (final sigma zero, from constants, so no gradient
    /// passes through its infinite log-SNR), as `[K, K] u, w` and a zero `sigma`.
    fn solver_base(&self, solver: &MultistepSolver, abar_t: &Tensor) -> (Tensor, Tensor, Tensor) {
        let k = self.steps;
        let mut levels: Vec<NoiseLevel<TensorScalar>> =
            (0..k).map(|i| NoiseLevel::from_abar(TensorScalar(abar_t.get(i as i64)))).collect();
        levels.push(NoiseLevel::clean_like(&levels[0].alpha));
        let zero = abar_t.get(0).zeros_like().detach();
        let mut u: Vec<Tensor> = (0..k * k).map(|_| zero.shallow_clone()).collect();
        let mut w: Vec<Tensor> = (0..k * k).map(|_| zero.shallow_clone()).collect();
        for (i, row) in solver.ggdm_rows(&levels).into_iter().enumerate() {
            u[i * k + i] = row.state.0;
            for (j, weight) in row.data.into_iter().enumerate() {
                if let Some(weight) = weight {
                    w[i * k + j] = weight.0;
                }
            }
        }
        let square = [k as i64, k as i64];
        (Tensor::stack(&u, 0).reshape(square), Tensor::stack(&w, 0).reshape(square), abar_t.zeros_like())
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

    /// The serialisable form (the current [`SAMPLER_VERSION`]).
    pub fn to_file(&self) -> SamplerFile {
        let coeffs = tch::no_grad(|| self.coefficients());
        SamplerFile {
            format: SAMPLER_FORMAT.to_string(),
            version: SAMPLER_VERSION,
            steps: self.steps,
            base: self.base,
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
                u: tensor_to_rows(&coeffs.u),
                w: tensor_to_rows(&coeffs.w),
                sigma: tensor_to_vec(&coeffs.sigma.abs()),
                p: tensor_to_vec(&coeffs.p),
                q: tensor_to_vec(&coeffs.q),
                query_timesteps: tensor_to_vec(&coeffs.query_tau),
                query_abar: tensor_to_vec(&coeffs.query_abar),
                input_scale: tensor_to_vec(&coeffs.input_scale),
            },
            provenance: self.provenance.clone(),
        }
    }

    /// Rebuilds a sampler from its file form (version [`SAMPLER_VERSION`]; [`Self::from_json`]
    /// also reads version 1).
    pub fn from_file(file: SamplerFile, device: Device) -> Result<Self> {
        if file.format != SAMPLER_FORMAT {
            return Err(Error::invalid("format", format!("`{}` (expected `{SAMPLER_FORMAT}`)", file.format)));
        }
        if file.version != SAMPLER_VERSION {
            return Err(Error::invalid(
                "version",
                format!(
                    "{} is not supported here; this build writes version {SAMPLER_VERSION} (and reads {} from JSON)",
                    file.version,
                    versions_read()
                ),
            ));
        }
        Self::from_fields(SamplerFields::from(file), device)
    }

    fn from_fields(fields: SamplerFields, device: Device) -> Result<Self> {
        let k = fields.steps;
        if k == 0 {
            return Err(Error::invalid("steps", "0 (need at least 1)"));
        }
        let params = params_from_file(&fields.params, k, device)?;
        fields.base.check(k, fields.eta, fields.history)?;
        fields.scheduler.validate()?;
        let schedule = fields.scheduler.schedule()?;
        if !(fields.tau_max > fields.tau_end) || fields.tau_max > schedule.tau_max() {
            return Err(Error::invalid(
                "tau_max",
                format!("{} (must lie in ({}, {}])", fields.tau_max, fields.tau_end, schedule.tau_max()),
            ));
        }
        let sampler = Self {
            steps: k,
            base: fields.base,
            eta: fields.eta,
            history: fields.history,
            query: fields.query,
            learn: fields.learn,
            scheduler: fields.scheduler,
            model: fields.model,
            tau_max: fields.tau_max,
            tau_end: fields.tau_end,
            params,
            provenance: fields.provenance,
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

    /// Parses the JSON text of a sampler file, version 2 or 1 (a version 1 file is a DDIM(eta)
    /// base with its residuals, as it always meant).
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
        let invalid = |e: serde_json::Error| Error::format("sampler.json", format!("invalid content: {e}"));
        match value.get("version").and_then(|v| v.as_u64()) {
            Some(1) => {
                let file: SamplerFileV1 = serde_json::from_value(value).map_err(invalid)?;
                Self::from_fields(SamplerFields::from(file), device)
            }
            Some(v) if v == SAMPLER_VERSION as u64 => {
                let file: SamplerFile = serde_json::from_value(value).map_err(invalid)?;
                Self::from_file(file, device)
            }
            Some(v) => Err(Error::format(
                "sampler.json",
                format!("version {v} is not supported; this build reads versions {}", versions_read()),
            )),
            None => Err(Error::format("sampler.json", "missing or non-integer `version`")),
        }
    }

    /// A deep copy on the same device: the same settings, provenance and parameter values in
    /// new tensors (detached from any graph; the parts enabled in [`Learnable`] require grad,
    /// as in a freshly loaded sampler). Equal to a round trip through [`Self::to_file`] and
    /// [`Self::from_file`] without the conversions.
    pub fn try_clone(&self) -> Result<Self> {
        let copy = |t: &Tensor| t.f_detach_copy();
        let params = GgdmParams {
            grid_logits: copy(&self.params.grid_logits)?,
            u_residual: copy(&self.params.u_residual)?,
            w_residual: copy(&self.params.w_residual)?,
            sigma_residual: copy(&self.params.sigma_residual)?,
            p_residual: copy(&self.params.p_residual)?,
            q_residual: copy(&self.params.q_residual)?,
        };
        let sampler = Self {
            steps: self.steps,
            base: self.base,
            eta: self.eta,
            history: self.history,
            query: self.query,
            learn: self.learn,
            scheduler: self.scheduler.clone(),
            model: self.model.clone(),
            tau_max: self.tau_max,
            tau_end: self.tau_end,
            params,
            provenance: self.provenance.clone(),
            schedule: self.schedule.clone(),
            log_abar_table: copy(&self.log_abar_table)?,
        };
        sampler.set_requires_grad();
        Ok(sampler)
    }
}

/// The versions [`GgdmSampler::from_json`] reads, for messages.
fn versions_read() -> String {
    SAMPLER_VERSIONS_READ.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(" and ")
}

/// The parameters of a sampler file as tensors, checked against `K`.
fn params_from_file(file: &ParamsFile, k: usize, device: Device) -> Result<GgdmParams> {
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
    Ok(GgdmParams {
        grid_logits: vec_param("grid_logits", &file.grid_logits)?,
        u_residual: mat_param("u_residual", &file.u_residual)?,
        w_residual: mat_param("w_residual", &file.w_residual)?,
        sigma_residual: vec_param("sigma_residual", &file.sigma_residual)?,
        p_residual: vec_param("p_residual", &file.p_residual)?,
        q_residual: vec_param("q_residual", &file.q_residual)?,
    })
}

/// `sampler.json`, version 2 (documented in `docs/sampler_json.md`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplerFile {
    /// Always [`SAMPLER_FORMAT`].
    pub format: String,
    /// Always [`SAMPLER_VERSION`].
    pub version: u32,
    /// `K`.
    pub steps: usize,
    /// The start solver the residuals are added to.
    pub base: GgdmBase,
    /// The eta of a DDIM base (0 for the other bases).
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
    /// Every coefficient the sampler uses at its grid, for people and other tools (ignored when
    /// loading).
    pub derived: DerivedFile,
    /// How the sampler was made.
    #[serde(default)]
    pub provenance: serde_json::Value,
}

/// `sampler.json`, version 1: no `base` (it is always DDIM(eta)) and fewer derived values.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct SamplerFileV1 {
    #[allow(dead_code)] // checked before parsing
    format: String,
    #[allow(dead_code)] // checked before parsing
    version: u32,
    steps: usize,
    eta: f64,
    history: History,
    #[serde(default)]
    query: Query,
    learn: Learnable,
    scheduler: SchedulerConfig,
    model: ModelIdentity,
    tau_max: f64,
    tau_end: f64,
    params: ParamsFile,
    #[allow(dead_code)] // ignored when loading, as in version 2
    derived: DerivedFileV1,
    #[serde(default)]
    provenance: serde_json::Value,
}

/// Version 1's derived values.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // parsed so that a malformed file is an error, never used
struct DerivedFileV1 {
    timesteps: Vec<f64>,
    sigma: Vec<f64>,
    u: Vec<Vec<f64>>,
    w: Vec<Vec<f64>>,
}

/// What a sampler is rebuilt from, whatever the file version.
struct SamplerFields {
    steps: usize,
    base: GgdmBase,
    eta: f64,
    history: History,
    query: Query,
    learn: Learnable,
    scheduler: SchedulerConfig,
    model: ModelIdentity,
    tau_max: f64,
    tau_end: f64,
    params: ParamsFile,
    provenance: serde_json::Value,
}

/// A [`SamplerFields`] from the fields every file version has, with the given base.
macro_rules! sampler_fields {
    ($file:ident, $base:expr) => {
        SamplerFields {
            steps: $file.steps,
            base: $base,
            eta: $file.eta,
            history: $file.history,
            query: $file.query,
            learn: $file.learn,
            scheduler: $file.scheduler,
            model: $file.model,
            tau_max: $file.tau_max,
            tau_end: $file.tau_end,
            params: $file.params,
            provenance: $file.provenance,
        }
    };
}

impl From<SamplerFile> for SamplerFields {
    fn from(file: SamplerFile) -> Self {
        sampler_fields!(file, file.base)
    }
}

impl From<SamplerFileV1> for SamplerFields {
    fn from(file: SamplerFileV1) -> Self {
        sampler_fields!(file, GgdmBase::Ddim)
    }
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

/// Every coefficient the sampler uses at its grid, written for readers of `sampler.json` (see
/// `docs/sampler_json.md` for how to run the sampler from these alone). Step `i` is row / entry
/// `i`, `i = 0..K-1`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DerivedFile {
    /// `[K]` the continuous grid `tau_i`.
    pub timesteps: Vec<f64>,
    /// `[K][K]` state coefficients `u_ij` (lower triangular).
    pub u: Vec<Vec<f64>>,
    /// `[K][K]` prediction coefficients `w_ij` (lower triangular).
    pub w: Vec<Vec<f64>>,
    /// `[K]` `|sigma_i|` (the sign of a learned sigma does not change the sampler: it multiplies
    /// symmetric noise).
    pub sigma: Vec<f64>,
    /// `[K]` `p_i`, the weight of `x_i` in `x0_hat_i`.
    pub p: Vec<f64>,
    /// `[K]` `q_i`, the weight of `eps_i` in `x0_hat_i`.
    pub q: Vec<f64>,
    /// `[K]` where the network is queried (equal to `timesteps` for the `grid` query mode).
    pub query_timesteps: Vec<f64>,
    /// `[K]` `abar` at `query_timesteps` (turns a sample or v prediction into `eps_i`).
    pub query_abar: Vec<f64>,
    /// `[K]` the factor the network's input `x_i` is scaled by (1 for the `grid` query mode).
    pub input_scale: Vec<f64>,
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
