//! Feature extractors (DESIGN.md section 4, "Metrics" and "DDSS objective": KID and FID are computed
//! on features of samples). [`FeatureExtractor`] is the one interface the metrics and the search
//! loss use; the native [`crate::inception::Inception`] implements it, and so does the TorchScript
//! backend behind the `inception-torchscript` feature. [`extract_features_batched`] runs an
//! extractor over a large set in batches without gradients, reporting progress.

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};

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
