//! Opening a model directory as a user brings it: a diffusers model folder (`config.json` +
//! `diffusion_pytorch_model.safetensors`, optionally inside `unet/`), with its
//! `scheduler_config.json` (at the root or in `scheduler/`), or a TorchScript model (`model.pt` +
//! `model.json`). The result is a [`Denoiser`] plus the scheduler settings that define its
//! schedule and prediction type (DESIGN.md section 4: the checkpoint's scheduler config is
//! honoured the way diffusers honours it).

use crate::denoiser::Denoiser;
use crate::scheduler_config::SchedulerConfig;
use crate::unet::UNetDenoiser;
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use tch::Device;

/// A model ready to sample.
pub struct LoadedModel {
    /// The network.
    pub denoiser: Box<dyn Denoiser>,
    /// Its scheduler settings (diffusers' defaults when the folder has no scheduler config).
    pub scheduler: SchedulerConfig,
    /// The directory it came from.
    pub dir: PathBuf,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel").field("dir", &self.dir).field("scheduler", &self.scheduler).finish()
    }
}

impl LoadedModel {
    /// `[C, H, W]` of the samples, when the model fixes it.
    pub fn sample_shape(&self) -> Option<[i64; 3]> {
        self.denoiser.sample_shape()
    }
}

/// Where the scheduler config of a model directory is, if anywhere.
pub fn scheduler_config_path(dir: &Path) -> Option<PathBuf> {
    [dir.join("scheduler_config.json"), dir.join("scheduler").join("scheduler_config.json")]
        .into_iter()
        .find(|p| p.is_file())
}

/// Opens a model directory (see the module documentation).
pub fn load_model_dir(dir: &Path, device: Device) -> Result<LoadedModel> {
    if !dir.is_dir() {
        return Err(Error::invalid(
            "model directory",
            format!(
                "{} does not exist or is not a folder. A model directory in diffusers layout holds \
                 config.json and diffusion_pytorch_model.safetensors (and scheduler_config.json); \
                 a TorchScript model directory holds model.pt and model.json",
                dir.display()
            ),
        ));
    }
    let scheduler = match scheduler_config_path(dir) {
        Some(path) => SchedulerConfig::from_file(&path)?,
        None => {
            tracing::warn!(
                "{} has no scheduler_config.json; assuming diffusers' DDPMScheduler defaults \
                 (linear betas 1e-4..0.02, T = 1000, epsilon prediction)",
                dir.display()
            );
            SchedulerConfig::default()
        }
    };
    let denoiser: Box<dyn Denoiser> = if dir.join("model.pt").is_file() {
        Box::new(crate::torchscript::TorchScriptDenoiser::load(dir.join("model.pt"), device)?)
    } else {
        Box::new(UNetDenoiser::load(dir, device)?.with_prediction_type(scheduler.prediction_type))
    };
    Ok(LoadedModel { denoiser, scheduler, dir: dir.to_path_buf() })
}
