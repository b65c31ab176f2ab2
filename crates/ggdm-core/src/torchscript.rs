//! A [`Denoiser`] backed by a TorchScript module (`torch.jit.trace` / `torch.jit.script` output),
//! for networks that have no native port: any `forward(x, t) -> output` exported from PyTorch.
//!
//! # Files
//!
//! * `model.pt`: the TorchScript module. Its `forward` takes two tensors and returns one:
//!   `x` (float32, `N x C x H x W`) and `t` (float32, shape `[N]`, continuous timesteps in
//!   `[0, num_train_timesteps - 1]`), and returns the network output with the shape of `x`.
//!   For a diffusers model, trace a wrapper returning `unet(x, t, return_dict=False)[0]`.
//! * `model.json`: a sidecar next to it (same file stem, `.json` extension) saying what the output
//!   is, since a TorchScript file cannot:
//!
//! ```json
//! {
//!   "prediction_type": "epsilon",
//!   "sample_shape": [3, 32, 32],
//!   "num_train_timesteps": 1000,
//!   "source": "free text: where the module came from"
//! }
//! ```
//!
//! `prediction_type` (diffusers' names: `epsilon`, `sample`, `v_prediction`) is required;
//! `sample_shape` (`[C, H, W]`), `num_train_timesteps` (default 1000) and `source` are optional;
//! other keys are errors.
//!
//! Gradients flow to `x` and `t` through the module (no `no_grad` anywhere); the module's own
//! parameters are frozen at load, since samplers never train the network.

use crate::{Denoiser, Error, PredictionType, Result};
use serde::{Deserialize, Serialize};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use tch::{CModule, Device, Kind, Tensor};

/// The `model.json` sidecar of a TorchScript denoiser (format in the module documentation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TorchScriptSidecar {
    /// What the module returns.
    pub prediction_type: PredictionType,
    /// `[C, H, W]` of the samples, when the module fixes it.
    #[serde(default)]
    pub sample_shape: Option<[i64; 3]>,
    /// Length of the training schedule the timesteps refer to (default 1000, as DDPM).
    #[serde(default = "default_num_train_timesteps")]
    pub num_train_timesteps: i64,
    /// Free-text provenance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

fn default_num_train_timesteps() -> i64 {
    1000
}

const SIDECAR_EXAMPLE: &str =
    r#"{"prediction_type": "epsilon", "sample_shape": [3, 32, 32], "num_train_timesteps": 1000}"#;

impl TorchScriptSidecar {
    /// The sidecar path of a module file: same stem, `.json` extension (`model.pt` ->
    /// `model.json`).
    pub fn path_for(module_path: &Path) -> PathBuf {
        module_path.with_extension("json")
    }

    /// Reads and checks a sidecar file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| {
            if e.kind() == ErrorKind::NotFound {
                Error::io(
                    path,
                    std::io::Error::new(
                        ErrorKind::NotFound,
                        format!(
                            "missing TorchScript sidecar; put a JSON file there saying what the \
                             module predicts, e.g. {SIDECAR_EXAMPLE}"
                        ),
                    ),
                )
            } else {
                Error::io(path, e)
            }
        })?;
        let sidecar: TorchScriptSidecar = serde_json::from_str(&text).map_err(|e| {
            Error::format(path, format!("not a valid TorchScript sidecar ({e}); expected e.g. {SIDECAR_EXAMPLE}"))
        })?;
        if sidecar.num_train_timesteps < 1 {
            return Err(Error::format(
                path,
                format!("num_train_timesteps is {} (must be >= 1)", sidecar.num_train_timesteps),
            ));
        }
        if let Some(shape) = sidecar.sample_shape {
            if shape.iter().any(|&d| d < 1) {
                return Err(Error::format(path, format!("sample_shape {shape:?} has a non-positive dimension")));
            }
        }
        Ok(sidecar)
    }
}

/// A TorchScript network used as a [`Denoiser`].
#[derive(Debug)]
pub struct TorchScriptDenoiser {
    module: CModule,
    sidecar: TorchScriptSidecar,
    device: Device,
    path: PathBuf,
}

impl TorchScriptDenoiser {
    /// Loads `path` (e.g. `model.pt`) onto `device`, with its sidecar (`model.json`). Missing
    /// files are errors saying what to put where.
    pub fn load(path: impl AsRef<Path>, device: Device) -> Result<Self> {
        let path = path.as_ref();
        if !path.is_file() {
            return Err(Error::io(
                path,
                std::io::Error::new(
                    ErrorKind::NotFound,
                    "missing TorchScript module; export the network with torch.jit.trace or \
                     torch.jit.script (forward(x, t) -> output) and save it there, with a \
                     model.json sidecar next to it",
                ),
            ));
        }
        let sidecar = TorchScriptSidecar::from_file(TorchScriptSidecar::path_for(path))?;
        let mut module = CModule::load_on_device(path, device)
            .map_err(|e| Error::format(path, format!("not a loadable TorchScript module: {e}")))?;
        module.f_set_eval()?;
        for (_, parameter) in module.named_parameters()? {
            // In place on the module's own parameter: the network is never trained here.
            let _ = parameter.f_set_requires_grad(false)?;
        }
        Ok(TorchScriptDenoiser { module, sidecar, device, path: path.to_path_buf() })
    }

    /// The sidecar read at load time.
    pub fn sidecar(&self) -> &TorchScriptSidecar {
        &self.sidecar
    }

    /// Length of the training schedule (from the sidecar).
    pub fn num_train_timesteps(&self) -> i64 {
        self.sidecar.num_train_timesteps
    }

    /// The module file this denoiser was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The device the module runs on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The underlying TorchScript module.
    pub fn module(&self) -> &CModule {
        &self.module
    }
}

impl Denoiser for TorchScriptDenoiser {
    fn forward(&self, x: &Tensor, tau: &Tensor) -> Result<Tensor> {
        let size = x.size();
        let &[batch, _, _, _] = size.as_slice() else {
            return Err(Error::Shape {
                what: "TorchScript input x".into(),
                expected: "N x C x H x W".into(),
                got: size,
            });
        };
        if x.device() != self.device {
            return Err(Error::invalid(
                "TorchScript input x",
                format!("is on {:?} but the module is on {:?}", x.device(), self.device),
            ));
        }
        let tau = match tau.size().as_slice() {
            [] | [1] => tau.f_reshape([1])?.f_expand([batch], false)?,
            [n] if *n == batch => tau.shallow_clone(),
            _ => {
                return Err(Error::Shape {
                    what: "TorchScript timesteps tau".into(),
                    expected: format!("[{batch}], [1] or [] (one timestep per sample)"),
                    got: tau.size(),
                })
            }
        };
        let tau = tau.f_to_device(self.device)?.f_to_kind(Kind::Float)?;
        let x = x.f_to_kind(Kind::Float)?;
        let output = self
            .module
            .forward_ts(&[&x, &tau])
            .map_err(|e| Error::format(&self.path, format!("TorchScript forward(x, t) failed: {e}")))?;
        if output.size().first() != Some(&batch) {
            return Err(Error::Shape {
                what: format!("output of {}", self.path.display()),
                expected: format!("batch of {batch} like the input"),
                got: output.size(),
            });
        }
        Ok(output)
    }

    fn prediction_type(&self) -> PredictionType {
        self.sidecar.prediction_type
    }

    fn sample_shape(&self) -> Option<[i64; 3]> {
        self.sidecar.sample_shape
    }
}
