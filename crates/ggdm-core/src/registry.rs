//! The samplers a name selects: the built-in baselines and solvers ([`SAMPLER_NAMES`]: DDIM, DDPM,
//! DPM-Solver++, UniPC) and learned GGDM samplers (the path of a `sampler.json`), set up for a
//! model's scheduler and ready to run batches ([`SamplerChoice`]). `ddss-cli sample --sampler`,
//! a search config's `[eval] compare` and `[loss] teacher` and `ddss-cli table --samplers` all
//! name samplers this way.

use crate::denoiser::Denoiser;
use crate::ggdm::GgdmSampler;
use crate::grid::Spacing;
use crate::noise::NoiseSource;
use crate::samplers::{ddim, ddpm, diffusers_steps, grid_steps, DdimOptions, DdpmOptions, Step};
use crate::scheduler_config::SchedulerConfig;
use crate::solvers::{dpm_solver, unipc, DpmSolverOptions, UniPcOptions};
use crate::{Error, Result};
use tch::{Device, Tensor};

/// The built-in sampler names `--sampler` and a search config's `[eval] compare` accept.
pub const SAMPLER_NAMES: &[&str] = &["ddim", "ddim-noclip", "ddpm", "dpmpp2m", "dpmpp3m", "unipc", "unipc3"];

/// Steps of DPM-Solver++ and UniPC when `--steps` is not given (what diffusers' pipelines are
/// usually run with).
const SOLVER_DEFAULT_STEPS: usize = 20;

/// Whether `name` names a sampler: one of [`SAMPLER_NAMES`] or the path of a `sampler.json`.
pub fn is_sampler_name(name: &str) -> bool {
    SAMPLER_NAMES.contains(&name) || name.ends_with(".json")
}

/// Splits `NAME@SPACING` (e.g. `ddim@quadratic`, `dpmpp2m@logsnr`) into the sampler name and the
/// spacing it runs on; a name without `@` has no spacing of its own.
pub fn split_spacing(spec: &str) -> (&str, Option<&str>) {
    match spec.split_once('@') {
        Some((name, spacing)) => (name, Some(spacing)),
        None => (spec, None),
    }
}

/// A sampler chosen by name, ready to run batches.
pub enum SamplerChoice {
    /// DDIM(eta) with diffusers' step rule (to the next grid entry on a `logsnr` grid, which
    /// diffusers' DDIM does not have).
    Ddim { steps: Vec<Step>, options: DdimOptions },
    /// DDPM ancestral.
    Ddpm { grid: Vec<i64>, options: DdpmOptions },
    /// DPM-Solver++ (multistep, diffusers' `DPMSolverMultistepScheduler` defaults).
    DpmSolver { grid: Vec<i64>, options: DpmSolverOptions },
    /// UniPC (diffusers' `UniPCMultistepScheduler` defaults, bh2).
    UniPc { grid: Vec<i64>, options: UniPcOptions },
    /// A GGDM sampler from `sampler.json`.
    Ggdm(Box<GgdmSampler>),
}

impl SamplerChoice {
    /// Parses `--sampler` (one of [`SAMPLER_NAMES`] or a `sampler.json`) with `--steps`, `--eta`,
    /// `--spacing` for a model with `scheduler` whose samples have `sample_shape` (when it fixes
    /// it). DDIM and DDPM default to the model's `timestep_spacing`; DPM-Solver++ and UniPC place
    /// their steps as diffusers' multistep schedulers do, by default with their own default
    /// spacing, `linspace` (`logsnr` when the scheduler config sets `use_lu_lambdas`). A
    /// `sampler.json` is loaded onto `device` and checked against the model; `steps`, when
    /// given, must be its K.
    pub fn from_args(
        name: &str,
        steps: Option<usize>,
        eta: f64,
        spacing: Option<&str>,
        scheduler: &SchedulerConfig,
        sample_shape: Option<[i64; 3]>,
        device: Device,
    ) -> Result<Self> {
        let requested_spacing = spacing.map(Spacing::parse).transpose()?;
        let spacing = requested_spacing.unwrap_or(scheduler.timestep_spacing);
        let grid_for = |k: usize| scheduler.timesteps(k, spacing);
        let solver_grid = || {
            let spacing = requested_spacing.unwrap_or(scheduler.multistep_spacing());
            scheduler.multistep_timesteps(steps.unwrap_or(SOLVER_DEFAULT_STEPS), spacing)
        };
        if !(eta >= 0.0) {
            return Err(Error::config(format!("--eta {eta}: must be >= 0")));
        }
        match name {
            "ddim" | "ddim-noclip" => Ok(SamplerChoice::Ddim {
                steps: ddim_steps(&grid_for(steps.unwrap_or(50))?, spacing, scheduler.num_train_timesteps),
                options: DdimOptions {
                    eta,
                    clip: if name == "ddim" { scheduler.clip() } else { None },
                    use_clipped_model_output: false,
                },
            }),
            "ddpm" => Ok(SamplerChoice::Ddpm {
                grid: grid_for(steps.unwrap_or(scheduler.num_train_timesteps))?,
                options: DdpmOptions { variance_type: scheduler.variance_type, clip: scheduler.clip() },
            }),
            "dpmpp2m" | "dpmpp3m" => Ok(SamplerChoice::DpmSolver {
                grid: solver_grid()?,
                options: DpmSolverOptions { order: if name == "dpmpp3m" { 3 } else { 2 }, ..Default::default() },
            }),
            "unipc" | "unipc3" => Ok(SamplerChoice::UniPc {
                grid: solver_grid()?,
                options: UniPcOptions { order: if name == "unipc3" { 3 } else { 2 }, ..Default::default() },
            }),
            path if path.ends_with(".json") => {
                let sampler = GgdmSampler::load(path.as_ref(), device)?;
                sampler.check_compatible(scheduler, sample_shape)?;
                if let Some(k) = steps {
                    if k != sampler.steps {
                        return Err(Error::config(format!("--steps {k}: {path} is a {}-step sampler", sampler.steps)));
                    }
                }
                Ok(SamplerChoice::Ggdm(Box::new(sampler)))
            }
            other => Err(Error::config(format!(
                "--sampler {other}: unknown sampler; expected one of {} or the path of a sampler.json",
                SAMPLER_NAMES.join(", ")
            ))),
        }
    }

    /// Network evaluations per sample.
    pub fn steps(&self) -> usize {
        match self {
            SamplerChoice::Ddim { steps, .. } => steps.len(),
            SamplerChoice::Ddpm { grid, .. }
            | SamplerChoice::DpmSolver { grid, .. }
            | SamplerChoice::UniPc { grid, .. } => grid.len(),
            SamplerChoice::Ggdm(s) => s.steps,
        }
    }

    /// Samples one batch of `denoiser` (a model with `scheduler`) starting from `x_init`, drawing
    /// step noise from `noise`, without autograd.
    pub fn run<D: Denoiser + ?Sized>(
        &self,
        denoiser: &D,
        scheduler: &SchedulerConfig,
        x_init: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let schedule = scheduler.schedule()?;
        tch::no_grad(|| -> Result<Tensor> {
            match self {
                SamplerChoice::Ddim { steps, options } => {
                    ddim(denoiser, &schedule, steps, x_init, options, noise, &mut |_| {})
                }
                SamplerChoice::Ddpm { grid, options } => {
                    let grid: Vec<f64> = grid.iter().map(|&t| t as f64).collect();
                    ddpm(denoiser, &schedule, &grid_steps(&grid), x_init, options, noise, &mut |_| {})
                }
                SamplerChoice::DpmSolver { grid, options } => {
                    let grid: Vec<f64> = grid.iter().map(|&t| t as f64).collect();
                    dpm_solver(denoiser, &schedule, &grid, x_init, options, &mut |_| {})
                }
                SamplerChoice::UniPc { grid, options } => {
                    let grid: Vec<f64> = grid.iter().map(|&t| t as f64).collect();
                    unipc(denoiser, &schedule, &grid, x_init, options, &mut |_| {})
                }
                SamplerChoice::Ggdm(sampler) => {
                    let shape = x_init.size();
                    let z = (0..sampler.steps)
                        .map(|_| noise.next(&shape, x_init.device()))
                        .collect::<Result<Vec<_>, _>>()?;
                    sampler.sample(denoiser, x_init, &z)
                }
            }
        })
    }
}

/// DDIM's steps over `grid`: diffusers' rule (`t - T // K`) for its own spacings, the next grid
/// entry on a `logsnr` grid.
fn ddim_steps(grid: &[i64], spacing: Spacing, num_train_timesteps: usize) -> Vec<Step> {
    match spacing {
        Spacing::LogSnr => grid_steps(&grid.iter().map(|&t| t as f64).collect::<Vec<_>>()),
        _ => diffusers_steps(grid, num_train_timesteps),
    }
}

#[cfg(test)]
mod tests {
    use super::{is_sampler_name, split_spacing, SamplerChoice, SAMPLER_NAMES};
    use crate::scheduler_config::SchedulerConfig;
    use tch::Device;

    #[test]
    fn names_and_spacings() {
        assert!(SAMPLER_NAMES.iter().all(|name| is_sampler_name(name)));
        assert!(is_sampler_name("runs/x/sampler.json") && !is_sampler_name("dpmpp9m"));
        assert_eq!(split_spacing("dpmpp2m@logsnr"), ("dpmpp2m", Some("logsnr")));
        assert_eq!(split_spacing("unipc"), ("unipc", None));
    }

    #[test]
    fn every_built_in_name_sets_up_and_a_wrong_one_lists_them() {
        let scheduler = SchedulerConfig::default();
        for name in SAMPLER_NAMES {
            let choice = SamplerChoice::from_args(name, Some(4), 0.0, None, &scheduler, None, Device::Cpu)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(choice.steps(), 4, "{name}");
        }
        let err = SamplerChoice::from_args("dpmpp9m", None, 0.0, None, &scheduler, None, Device::Cpu)
            .err()
            .expect("unknown")
            .to_string();
        assert!(err.starts_with("--sampler dpmpp9m: unknown sampler; expected one of ddim, ddim-noclip"), "{err}");
        let err = SamplerChoice::from_args("ddim", None, -1.0, None, &scheduler, None, Device::Cpu)
            .err()
            .expect("negative eta")
            .to_string();
        assert_eq!(err, "--eta -1: must be >= 0");
    }
}
