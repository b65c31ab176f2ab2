//! One evaluation of the DDSS objective and its exact gradient (DESIGN.md section 4, "Large exact
//! batches"): generate a batch from fixed noise, compute features, the loss, and accumulate
//! `dL/dparams` into the sampler parameters.
//!
//! KID couples the whole batch, so the batch cannot be split naively. With `micro_batch < batch`
//! the gradient is computed in two passes: (1) generate every micro-batch without autograd and
//! compute all features, the loss and `dL/dfeatures`; (2) re-run each micro-batch with the unroll
//! (same noise), back-propagate its slice of `dL/dfeatures` through the feature network and the
//! sampler. The result is the exact full-batch gradient with the memory of one micro-batch.
//!
//! Noise is per sample ([`PerSampleNoise`]): sample `i` of a batch has its own stream, so the
//! noise does not depend on how the batch is split.

use crate::loss::FeatureLoss;
use crate::unroll::{self, Remat};
use crate::{Error, Result};
use fid_metrics::features::FeatureExtractor;
use ggdm_core::ggdm::GgdmSampler;
use ggdm_core::noise::{NoiseSource, PerSampleNoise};
use ggdm_core::Denoiser;
use tch::{Device, Kind, Tensor};

/// Where the noise of one batch comes from: sample `i` uses stream `(seed, i)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchNoise {
    /// The seed of this batch.
    pub seed: u64,
    /// Number of samples.
    pub batch: usize,
}

impl BatchNoise {
    /// Draws `x_init` and `z_1..z_K` for samples `first .. first + count`.
    pub fn draw(
        &self,
        first: usize,
        count: usize,
        shape: [i64; 3],
        steps: usize,
        device: Device,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut noise = PerSampleNoise::new(self.seed, first as u64, count);
        let full = [count as i64, shape[0], shape[1], shape[2]];
        let x_init = noise.next(&full, device)?;
        let z = (0..steps).map(|_| noise.next(&full, device)).collect::<std::result::Result<Vec<_>, _>>()?;
        Ok((x_init, z))
    }

    /// [`Self::draw`] with the tensors converted to `kind`.
    pub fn draw_as(
        &self,
        first: usize,
        count: usize,
        shape: [i64; 3],
        steps: usize,
        device: Device,
        kind: Kind,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let (x_init, z) = self.draw(first, count, shape, steps, device)?;
        Ok((x_init.to_kind(kind), z.into_iter().map(|t| t.to_kind(kind)).collect()))
    }
}

/// Everything one objective evaluation needs.
pub struct Objective<'a> {
    /// The sampler being optimised.
    pub sampler: &'a GgdmSampler,
    /// The (frozen) diffusion model.
    pub model: &'a dyn Denoiser,
    /// The feature network of the loss.
    pub extractor: &'a dyn FeatureExtractor,
    /// The loss against real features.
    pub loss: &'a FeatureLoss,
    /// The rematerialisation strategy.
    pub remat: Remat,
    /// Samples per micro-batch (the whole batch when >= batch).
    pub micro_batch: usize,
    /// `[C, H, W]` of a sample.
    pub sample_shape: [i64; 3],
    /// Device of the model and sampler.
    pub device: Device,
    /// Kind of the sampler states (f32 normally; f64 for exactness tests).
    pub state_kind: Kind,
}

fn features_of(extractor: &dyn FeatureExtractor, x: &Tensor) -> Result<Tensor> {
    extractor.features(x).map_err(|e| Error::config("features", e.to_string()))
}

impl Objective<'_> {
    /// Generates the batch without autograd and returns the samples (for validation / pictures).
    pub fn generate(&self, noise: BatchNoise) -> Result<Tensor> {
        let mut chunks = Vec::new();
        let mut first = 0;
        while first < noise.batch {
            let count = self.micro_batch.min(noise.batch - first);
            let (x_init, z) =
                noise.draw_as(first, count, self.sample_shape, self.sampler.steps, self.device, self.state_kind)?;
            chunks.push(tch::no_grad(|| self.sampler.sample(self.model, &x_init, &z))?);
            first += count;
        }
        Ok(Tensor::cat(&chunks, 0))
    }

    /// The loss value and, accumulated into the sampler parameters' `.grad()`, its exact gradient.
    pub fn loss_and_grad(&self, noise: BatchNoise) -> Result<f64> {
        if noise.batch < 2 {
            return Err(Error::config("batch_size", format!("{} (KID needs at least 2 samples)", noise.batch)));
        }
        let steps = self.sampler.steps;
        if self.micro_batch >= noise.batch {
            let (x_init, z) = noise.draw_as(0, noise.batch, self.sample_shape, steps, self.device, self.state_kind)?;
            let fwd = unroll::forward(self.sampler, self.model, &x_init, &z, self.remat)?;
            let x_out = fwd.output.detach().set_requires_grad(true);
            let loss = self.loss.value(&features_of(self.extractor, &x_out)?)?;
            loss.backward();
            let value = loss.double_value(&[]);
            let _ = unroll::backward(self.sampler, self.model, fwd, &x_out.grad())?;
            return Ok(value);
        }
        // Pass 1: all features without autograd.
        let mut features = Vec::new();
        let mut first = 0;
        while first < noise.batch {
            let count = self.micro_batch.min(noise.batch - first);
            let (x_init, z) = noise.draw_as(first, count, self.sample_shape, steps, self.device, self.state_kind)?;
            let out = tch::no_grad(|| self.sampler.sample(self.model, &x_init, &z))?;
            features.push(tch::no_grad(|| features_of(self.extractor, &out))?);
            first += count;
        }
        let all = Tensor::cat(&features, 0).detach().set_requires_grad(true);
        let loss = self.loss.value(&all)?;
        loss.backward();
        let value = loss.double_value(&[]);
        let grad_features = all.grad();
        // Pass 2: each micro-batch with the unroll, pushing back its slice of dL/dfeatures.
        let mut first = 0;
        while first < noise.batch {
            let count = self.micro_batch.min(noise.batch - first);
            let (x_init, z) = noise.draw_as(first, count, self.sample_shape, steps, self.device, self.state_kind)?;
            let fwd = unroll::forward(self.sampler, self.model, &x_init, &z, self.remat)?;
            let x_out = fwd.output.detach().set_requires_grad(true);
            let slice = grad_features.narrow(0, first as i64, count as i64);
            let f = features_of(self.extractor, &x_out)?;
            (f * slice.detach()).sum(Kind::Double).backward();
            let _ = unroll::backward(self.sampler, self.model, fwd, &x_out.grad())?;
            first += count;
        }
        Ok(value)
    }
}
