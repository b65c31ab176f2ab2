//! Feature extractors (DESIGN.md section 4, "Metrics" and "DDSS objective": KID and FID are computed
//! on features of samples). [`FeatureExtractor`] is the one interface the metrics and the search
//! loss use; the native [`crate::inception::Inception`] implements it, and so do the TorchScript
//! backend ([`crate::torchscript_backend`]) and the domain classifiers of
//! [`crate::classifier`]. [`extract_features_batched`] runs an extractor over a large set in batches
//! without gradients, reporting progress. [`open_extractor`] opens the feature set a command line
//! names (`--features inception|FILE.safetensors`).

use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use crate::classifier::DomainClassifier;
use crate::error::{Error, Result};
use crate::inception::Inception;

/// A network that maps samples to feature vectors.
pub trait FeatureExtractor {
    /// Samples in [-1, 1], N x C x H x W -> N x [`FeatureExtractor::dim`] features (f32, on the
    /// extractor's device). Differentiable with respect to `x` when called with gradients enabled.
    fn features(&self, x: &Tensor) -> Result<Tensor>;

    /// Length of one feature vector.
    fn dim(&self) -> usize;

    /// Short stable name, recorded next to metric values (e.g. `"inception"`).
    fn name(&self) -> &str;

    /// Device the extractor computes on.
    fn device(&self) -> Device;
}

/// Runs `extractor` over `samples` (N x C x H x W in [-1, 1], on any device) in batches of at most
/// `batch_size`, without gradients. Each batch is moved to the extractor's device; the features
/// are collected on the CPU as an N x dim f32 tensor. `progress(done, total)` is called after each
/// batch.
pub fn extract_features_batched<E, P>(
    extractor: &E,
    samples: &Tensor,
    batch_size: usize,
    mut progress: P,
) -> Result<Tensor>
where
    E: FeatureExtractor + ?Sized,
    P: FnMut(usize, usize),
{
    if batch_size == 0 {
        return Err(Error::invalid("batch_size", "must be at least 1"));
    }
    let size = samples.size();
    if size.len() != 4 {
        return Err(Error::shape("samples", "N x C x H x W", size));
    }
    let total = size[0] as usize;
    let mut chunks = Vec::with_capacity(total.div_ceil(batch_size));
    let mut done = 0usize;
    while done < total {
        let len = batch_size.min(total - done);
        let batch = samples.f_narrow(0, done as i64, len as i64)?.f_to_device(extractor.device())?;
        let features = tch::no_grad(|| extractor.features(&batch))?;
        let got = features.size();
        if got.len() != 2 || got[0] != len as i64 || got[1] != extractor.dim() as i64 {
            return Err(Error::shape(
                format!("features of `{}`", extractor.name()),
                format!("{len} x {}", extractor.dim()),
                got,
            ));
        }
        chunks.push(features.f_to_device(Device::Cpu)?.f_to_kind(Kind::Float)?);
        done += len;
        progress(done, total);
    }
    if chunks.is_empty() {
        return Ok(Tensor::f_zeros([0, extractor.dim() as i64], (Kind::Float, Device::Cpu))?);
    }
    Ok(Tensor::f_cat(&chunks, 0)?)
}

/// A feature set named on a command line: `inception` or the path of a domain classifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeatureSpec {
    /// The FID Inception network ([`Inception::load_default`]: `DDSS_INCEPTION` or the installed
    /// `default_1.pt`).
    Inception,
    /// A domain classifier's `.safetensors` file (with its `.json` sidecar next to it).
    Classifier(PathBuf),
}

impl FeatureSpec {
    /// Parses `inception` or a path ending in `.safetensors`. Nothing is opened yet, so a missing
    /// file is reported by [`FeatureSpec::open`].
    pub fn parse(spec: &str) -> Result<Self> {
        if spec == "inception" {
            return Ok(Self::Inception);
        }
        let path = Path::new(spec);
        if path.extension().is_some_and(|ext| ext == "safetensors") {
            return Ok(Self::Classifier(path.to_path_buf()));
        }
        let what = if path.exists() { "this file is not a .safetensors classifier" } else { "unknown value" };
        Err(Error::invalid(
            "feature set",
            format!(
                "`{spec}`: {what}; expected `inception` or the path of a domain classifier \
                 `.safetensors` file (with its `.json` sidecar), e.g. models/fmnist-classifier-a.safetensors"
            ),
        ))
    }

    /// The name the opened extractor will report ([`FeatureExtractor::name`]): `inception` or
    /// `classifier:<file stem>`.
    pub fn name(&self) -> String {
        match self {
            Self::Inception => "inception".to_string(),
            Self::Classifier(path) => {
                format!("classifier:{}", path.file_stem().map(|s| s.to_string_lossy()).unwrap_or_default())
            }
        }
    }

    /// Loads the network on `device`.
    pub fn open(&self, device: Device) -> Result<Box<dyn FeatureExtractor>> {
        Ok(match self {
            Self::Inception => Box::new(Inception::load_default(device)?),
            Self::Classifier(path) => Box::new(DomainClassifier::load(path, device)?),
        })
    }
}

/// Opens the feature extractor `spec` names: `inception` (the native FID Inception port,
/// [`Inception::load_default`]) or the path of a domain classifier `.safetensors`
/// ([`DomainClassifier::load`]). Anything else is an [`Error::Invalid`] naming the value.
pub fn open_extractor(spec: &str, device: Device) -> Result<Box<dyn FeatureExtractor>> {
    FeatureSpec::parse(spec)?.open(device)
}
