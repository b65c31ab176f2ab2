//! The FID Inception run directly from its TorchScript file through `tch::CModule` (DESIGN.md
//! section 3, "FID Inception weights"). It exists to check the native port in [`crate::inception`]
//! against the original graph on the machine the tests run on, with the same preprocessing
//! ([`crate::inception::samples_to_network_input`]).

use std::path::Path;

use tch::{CModule, Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::features::FeatureExtractor;
use crate::inception::{samples_to_network_input, InputResize, FEATURE_DIM, INPUT_SIZE};

/// The TorchScript FID Inception (`default_1.pt`).
#[derive(Debug)]
pub struct TorchScriptInception {
    module: CModule,
    device: Device,
    resize: InputResize,
}

impl TorchScriptInception {
    /// Loads the TorchScript file onto `device`.
    pub fn load(path: impl AsRef<Path>, device: Device) -> Result<Self> {
        let path = path.as_ref();
        if !path.is_file() {
            return Err(Error::WeightsNotFound { tried: vec![path.to_path_buf()] });
        }
        let mut module = CModule::load_on_device(path, device)
            .map_err(|e| Error::weights(path, format!("cannot load as TorchScript: {e}")))?;
        module.set_eval();
        Ok(Self { module, device, resize: InputResize::Bilinear })
    }

    /// Sets how samples are resized to 299x299. Returns the module.
    pub fn with_resize(mut self, resize: InputResize) -> Self {
        self.resize = resize;
        self
    }

    /// The TorchScript forward: N x 3 x 299 x 299 at network scale -> N x 2048 (f32).
    pub fn forward_network_input(&self, x: &Tensor) -> Result<Tensor> {
        let size = x.size();
        if size.len() != 4 || size[1] != 3 || size[2] != INPUT_SIZE || size[3] != INPUT_SIZE {
            return Err(Error::shape("Inception input", "N x 3 x 299 x 299", size));
        }
        let input = x.f_to_device(self.device)?.f_to_kind(Kind::Float)?;
        Ok(self.module.forward_ts(&[input])?)
    }

    /// Samples in [-1, 1] -> N x 2048 features, preprocessed like the native port.
    pub fn features_from_samples(&self, x: &Tensor) -> Result<Tensor> {
        let input = samples_to_network_input(&x.f_to_device(self.device)?, self.resize)?;
        self.forward_network_input(&input)
    }
}

impl FeatureExtractor for TorchScriptInception {
    fn features(&self, x: &Tensor) -> Result<Tensor> {
        self.features_from_samples(x)
    }

    fn dim(&self) -> usize {
        FEATURE_DIM
    }

    fn name(&self) -> &str {
        "inception-torchscript"
    }

    fn device(&self) -> Device {
        self.device
    }
}
