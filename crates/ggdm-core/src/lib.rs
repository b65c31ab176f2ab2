//! # ggdm-core
//!
//! Everything needed to *sample* a pretrained diffusion model with a fast sampler, and nothing that
//! optimises one: noise schedules and continuous `abar(tau)` ([`schedule`]), diffusers-exact
//! timestep grids ([`grid`]), the [`Denoiser`] trait and the TorchScript model adapter ([`torchscript`]),
//! the DDPM and DDIM baselines ([`samplers`]), the multistep solvers DPM-Solver++ and UniPC
//! ([`solvers`]), the GGDM sampler family with its serialisable parameters ([`ggdm`]), the
//! `[sampler]` configuration a search starts from ([`sampler_config`]) and the samplers a name
//! selects ([`registry`]). The math is DESIGN.md section 4.
//!
//! Scalar schedule math is `f64`; tensors appear only where values are batched or learnable.
//!
//! ## Sampling a model through the [`Denoiser`] trait
//!
//! Any network behind [`Denoiser`] (the native diffusers UNet of the `ggdm-nets` crate, a
//! TorchScript module, or here the closed-form denoiser of Gaussian data) is sampled with a
//! baseline or a GGDM sampler:
//!
//! ```
//! use ggdm_core::analytic::GaussianDataDenoiser;
//! use ggdm_core::ggdm::{GgdmSampler, History, Learnable};
//! use ggdm_core::grid::Spacing;
//! use ggdm_core::noise::SeededNoise;
//! use ggdm_core::scheduler_config::SchedulerConfig;
//! use tch::Device;
//!
//! # fn main() -> ggdm_core::Result<()> {
//! // The model's scheduler settings (normally read from its `scheduler_config.json`).
//! let scheduler = SchedulerConfig { clip_sample: false, ..SchedulerConfig::default() };
//! let model = GaussianDataDenoiser::new(&scheduler.schedule()?, 0.0, 0.5, [1, 8, 8]);
//!
//! // A 10-step sampler that starts as DDIM(eta = 0) on the trailing grid; a learned one is
//! // loaded instead with `GgdmSampler::load("run/sampler.json".as_ref(), Device::Cpu)?`.
//! let sampler = GgdmSampler::init_from_spacing(
//!     &scheduler, 10, Spacing::Trailing, 0.0, History::Full, Learnable::none(), Device::Cpu,
//! )?;
//! let (x_init, z) = sampler.draw_noise(&mut SeededNoise::new(0), &[16, 1, 8, 8], Device::Cpu)?;
//! let samples = tch::no_grad(|| sampler.sample(&model, &x_init, &z))?;
//! assert_eq!(samples.size(), vec![16, 1, 8, 8]);
//! # Ok(())
//! # }
//! ```

pub mod analytic;
pub mod denoiser;
pub mod error;
pub mod ggdm;
pub mod grid;
pub mod io;
pub mod noise;
pub mod prediction;
pub mod registry;
pub mod sampler_config;
pub mod samplers;
pub mod scalar;
pub mod schedule;
pub mod scheduler_config;
pub mod solvers;
pub mod torchscript;

pub use denoiser::Denoiser;
pub use error::{Error, Result};
pub use prediction::PredictionType;
pub use schedule::{BetaSchedule, NoiseSchedule};

/// The README's Rust snippets, compiled and run as doctests.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
