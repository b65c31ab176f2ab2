//! Opening a model directory as a user brings it: a diffusers model folder (`config.json` +
//! `diffusion_pytorch_model.safetensors`, optionally inside `unet/`), with its
//! `scheduler_config.json` (at the root or in `scheduler/`), or a TorchScript model (`model.pt` +
//! `model.json`). The result is a [`Denoiser`] plus the scheduler settings that define its
//! schedule and prediction type (DESIGN.md section 4: the checkpoint's scheduler config is
//! honoured the way diffusers honours it).

use crate::differentiable::{CallTape, DifferentiableDenoiser};
use crate::unet::UNetDenoiser;
use crate::{Error, Result};
use ggdm_core::scheduler_config::SchedulerConfig;
use ggdm_core::Denoiser;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// The arithmetic of the network calls. The sampler's linear combinations, its parameters and the
/// loss stay f32/f64 whatever this says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkPrecision {
    /// f32 weights and activations (default).
    #[default]
    F32,
    /// bf16 weights and activations (the timestep embedding's input stays f32); the output is cast
    /// back to the input's kind. About 1.6x the sampling speed on an H200 (`bench/RESULTS.md`).
    Bf16,
}

impl NetworkPrecision {
    /// Parses `f32` or `bf16`.
    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            other => Err(Error::invalid("precision", format!("`{other}` (expected f32 or bf16)"))),
        }
    }
}

/// A network run in bf16: its input is cast to bf16 and its output back to the input's kind
/// (gradients flow through both casts).
pub struct Bf16Denoiser(pub Box<dyn DifferentiableDenoiser>);

impl Denoiser for Bf16Denoiser {
    fn forward(&self, x: &Tensor, tau: &Tensor) -> Result<Tensor> {
        Ok(self.0.forward(&x.f_to_kind(Kind::BFloat16)?, tau)?.f_to_kind(x.kind())?)
    }

    fn prediction_type(&self) -> crate::PredictionType {
        self.0.prediction_type()
    }

    fn sample_shape(&self) -> Option<[i64; 3]> {
        self.0.sample_shape()
    }
}

impl DifferentiableDenoiser for Bf16Denoiser {
    fn forward_taped(&self, x: &Tensor, tau: &Tensor) -> Result<Option<(Tensor, CallTape)>> {
        let Some((output, tape)) = self.0.forward_taped(&x.f_to_kind(Kind::BFloat16)?, tau)? else {
            return Ok(None);
        };
        Ok(Some((output.f_to_kind(x.kind())?, CallTape::new(Converted { inner: tape, input_kind: x.kind() }))))
    }

    fn backward_taped(&self, tape: CallTape, grad_out: &Tensor) -> Result<(Tensor, Tensor)> {
        let Converted { inner, input_kind } = tape.downcast::<Converted>()?;
        let (grad_x, grad_tau) = self.0.backward_taped(inner, &grad_out.f_to_kind(Kind::BFloat16)?)?;
        Ok((grad_x.f_to_kind(input_kind)?, grad_tau))
    }
}

/// A wrapped network's tape with the kind the wrapper converted the input from.
struct Converted {
    inner: CallTape,
    input_kind: Kind,
}

/// `t` (`N x C x H x W`) with channels-last strides: NHWC in memory, the same shape and values.
pub fn to_channels_last(t: &Tensor) -> Result<Tensor> {
    Ok(t.f_permute([0, 2, 3, 1])?.f_contiguous()?.f_permute([0, 3, 1, 2])?)
}

/// A network run in channels-last memory format: each call's input is converted (the weights are
/// converted once, with [`crate::unet::UNet2DModel::to_channels_last`]) and its output is returned
/// contiguous again. Gradients flow through both conversions.
pub struct ChannelsLastDenoiser(pub Box<dyn DifferentiableDenoiser>);

impl Denoiser for ChannelsLastDenoiser {
    fn forward(&self, x: &Tensor, tau: &Tensor) -> Result<Tensor> {
        Ok(self.0.forward(&to_channels_last(x)?, tau)?.f_contiguous()?)
    }

    fn prediction_type(&self) -> crate::PredictionType {
        self.0.prediction_type()
    }

    fn sample_shape(&self) -> Option<[i64; 3]> {
        self.0.sample_shape()
    }
}

impl DifferentiableDenoiser for ChannelsLastDenoiser {
    fn forward_taped(&self, x: &Tensor, tau: &Tensor) -> Result<Option<(Tensor, CallTape)>> {
        let Some((output, tape)) = self.0.forward_taped(&to_channels_last(x)?, tau)? else {
            return Ok(None);
        };
        Ok(Some((output.f_contiguous()?, tape)))
    }

    fn backward_taped(&self, tape: CallTape, grad_out: &Tensor) -> Result<(Tensor, Tensor)> {
        let (grad_x, grad_tau) = self.0.backward_taped(tape, &to_channels_last(grad_out)?)?;
        Ok((grad_x.f_contiguous()?, grad_tau))
    }
}

/// A model ready to sample.
pub struct LoadedModel {
    /// The network.
    pub denoiser: Box<dyn DifferentiableDenoiser>,
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

/// Opens a model directory (see the module documentation) with f32 network calls.
pub fn load_model_dir(dir: &Path, device: Device) -> Result<LoadedModel> {
    load_model_dir_with(dir, device, NetworkPrecision::F32)
}

/// [`load_model_dir`] with the network calls in `precision` (bf16 needs a diffusers model folder:
/// a TorchScript model keeps the precision it was traced in).
pub fn load_model_dir_with(dir: &Path, device: Device, precision: NetworkPrecision) -> Result<LoadedModel> {
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
    let denoiser: Box<dyn DifferentiableDenoiser> = if dir.join("model.pt").is_file() {
        if precision == NetworkPrecision::Bf16 {
            return Err(Error::invalid(
                "precision",
                format!("bf16 needs a diffusers model folder; {} is a TorchScript model", dir.display()),
            ));
        }
        Box::new(ggdm_core::torchscript::TorchScriptDenoiser::load(dir.join("model.pt"), device)?)
    } else {
        let mut unet = UNetDenoiser::load(dir, device)?.with_prediction_type(scheduler.prediction_type);
        match precision {
            NetworkPrecision::F32 => Box::new(unet),
            NetworkPrecision::Bf16 => {
                unet.model_mut().var_store_mut().bfloat16();
                Box::new(Bf16Denoiser(Box::new(unet)))
            }
        }
    };
    Ok(LoadedModel { denoiser, scheduler, dir: dir.to_path_buf() })
}
