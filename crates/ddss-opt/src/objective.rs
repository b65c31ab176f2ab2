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
//!
//! [`Objective::loss_and_grad_sharded`] is the same two-pass gradient split across the ranks of a
//! [`Collective`]: each rank generates its contiguous shard of the batch, the features are
//! all-gathered, every rank computes the same loss and `dL/dfeatures`, back-propagates its slice
//! through its shard, and the parameter gradients are summed over the ranks. Only features and
//! parameter gradients are communicated, never images.

use crate::collective::{check_shardable, shard, Collective, CommVolume};
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
    /// Samples per backward pass through the feature network (`None`: a micro-batch at once). A
    /// smaller chunk bounds the feature network's activation memory (at 299x299 the Inception's
    /// exceed a small UNet's): the loss's features are then computed without autograd first and
    /// recomputed chunk by chunk with it. The gradient is exact for any value.
    pub feature_chunk: Option<usize>,
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
        self.generate_range(noise, 0..noise.batch)
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
            if self.feature_chunk.is_some_and(|c| c < noise.batch) {
                let features = tch::no_grad(|| features_of(self.extractor, &fwd.output))?;
                let features = features.detach().set_requires_grad(true);
                let loss = self.loss.value(&features)?;
                loss.backward();
                let grad_x = self.features_vjp(&fwd.output, &features.grad())?;
                let _ = unroll::backward(self.sampler, self.model, fwd, &grad_x)?;
                return Ok(loss.double_value(&[]));
            }
            let x_out = fwd.output.detach().set_requires_grad(true);
            let loss = self.loss.value(&features_of(self.extractor, &x_out)?)?;
            loss.backward();
            let _ = unroll::backward(self.sampler, self.model, fwd, &x_out.grad())?;
            // Read last: reading the value waits for the device, which would stall the sweep's launches.
            return Ok(loss.double_value(&[]));
        }
        // Pass 1: all features without autograd.
        let all = self.features_range(&noise, 0..noise.batch)?.detach().set_requires_grad(true);
        let loss = self.loss.value(&all)?;
        loss.backward();
        // Pass 2: each micro-batch with the unroll, pushing back its slice of dL/dfeatures.
        self.backprop_range(&noise, 0..noise.batch, &all.grad())?;
        Ok(loss.double_value(&[]))
    }

    /// Pass 1 of the two-pass gradient: the features of samples `range` (global indices) without
    /// autograd, in micro-batches that start at `range.start`.
    fn features_range(&self, noise: &BatchNoise, range: std::ops::Range<usize>) -> Result<Tensor> {
        let mut features = Vec::new();
        let mut first = range.start;
        while first < range.end {
            let count = self.micro_batch.min(range.end - first);
            let (x_init, z) =
                noise.draw_as(first, count, self.sample_shape, self.sampler.steps, self.device, self.state_kind)?;
            let out = tch::no_grad(|| self.sampler.sample(self.model, &x_init, &z))?;
            features.push(tch::no_grad(|| features_of(self.extractor, &out))?);
            first += count;
        }
        Ok(Tensor::cat(&features, 0))
    }

    /// Pass 2: re-runs samples `range` with the unroll, micro-batch by micro-batch (as in pass 1),
    /// and back-propagates their rows of `grad_features` (indexed by global sample) into the
    /// sampler parameters.
    fn backprop_range(&self, noise: &BatchNoise, range: std::ops::Range<usize>, grad_features: &Tensor) -> Result<()> {
        let mut first = range.start;
        while first < range.end {
            let count = self.micro_batch.min(range.end - first);
            let (x_init, z) =
                noise.draw_as(first, count, self.sample_shape, self.sampler.steps, self.device, self.state_kind)?;
            let fwd = unroll::forward(self.sampler, self.model, &x_init, &z, self.remat)?;
            let slice = grad_features.narrow(0, first as i64, count as i64);
            let grad_x = self.features_vjp(&fwd.output, &slice)?;
            let _ = unroll::backward(self.sampler, self.model, fwd, &grad_x)?;
            first += count;
        }
        Ok(())
    }

    /// `dL/dx` for samples `x` whose features have the cotangent `grad_features`, back-propagated
    /// through the feature network [`Self::feature_chunk`] samples at a time.
    fn features_vjp(&self, x: &Tensor, grad_features: &Tensor) -> Result<Tensor> {
        let n = x.size()[0];
        let chunk = self.feature_chunk.map_or(n, |c| (c.max(1) as i64).min(n));
        let mut grads = Vec::new();
        let mut start = 0;
        while start < n {
            let len = chunk.min(n - start);
            let x_chunk = x.narrow(0, start, len).detach().set_requires_grad(true);
            let f = features_of(self.extractor, &x_chunk)?;
            (f * grad_features.narrow(0, start, len).detach()).sum(Kind::Double).backward();
            grads.push(x_chunk.grad());
            start += len;
        }
        Ok(if grads.len() == 1 { grads.remove(0) } else { Tensor::cat(&grads, 0) })
    }
}

impl Objective<'_> {
    /// Generates samples `range` (global indices) of the batch without autograd, in micro-batches
    /// that start at `range.start`.
    pub fn generate_range(&self, noise: BatchNoise, range: std::ops::Range<usize>) -> Result<Tensor> {
        let mut chunks = Vec::new();
        let mut first = range.start;
        while first < range.end {
            let count = self.micro_batch.min(range.end - first);
            let (x_init, z) =
                noise.draw_as(first, count, self.sample_shape, self.sampler.steps, self.device, self.state_kind)?;
            chunks.push(tch::no_grad(|| self.sampler.sample(self.model, &x_init, &z))?);
            first += count;
        }
        if chunks.is_empty() {
            return Err(Error::config("batch", format!("empty range {range:?} of {} samples", noise.batch)));
        }
        Ok(Tensor::cat(&chunks, 0))
    }

    /// [`Self::loss_and_grad`] split across the ranks of `comm` (the same on one rank). Every rank
    /// returns the same loss and holds the same full-batch gradient afterwards. Rank `r` takes
    /// the contiguous samples [`shard`]`(batch, r, size)` in micro-batches, so the result equals
    /// one process with `micro_batch = batch / size` (when that divides evenly) up to the order
    /// of the final gradient sum. Also returns the bytes communicated.
    pub fn loss_and_grad_sharded(&self, noise: BatchNoise, comm: &dyn Collective) -> Result<(f64, CommVolume)> {
        if comm.size() <= 1 {
            return Ok((self.loss_and_grad(noise)?, CommVolume::default()));
        }
        if noise.batch < 2 {
            return Err(Error::config("batch_size", format!("{} (KID needs at least 2 samples)", noise.batch)));
        }
        check_shardable("batch_size", noise.batch, comm.size())?;
        let range = shard(noise.batch, comm.rank(), comm.size());
        // Pass 1: this rank's features without autograd, then everyone's.
        let local = self.features_range(&noise, range.clone())?;
        let (kind, device, dim) = (local.kind(), local.device(), local.size()[1]);
        let (gathered, gathered_bytes) = gather_features(&local, comm)?;
        if gathered.numel() != noise.batch * dim as usize {
            return Err(Error::config(
                "features",
                format!("gathered {} values, expected {} x {dim}", gathered.numel(), noise.batch),
            ));
        }
        let all = gathered.reshape([noise.batch as i64, dim]).to_kind(kind).to_device(device).set_requires_grad(true);
        let loss = self.loss.value(&all)?;
        loss.backward();
        let value = loss.double_value(&[]);
        // Pass 2: this rank's micro-batches with the unroll.
        self.backprop_range(&noise, range, &all.grad())?;
        let reduced = all_reduce_grads(&self.sampler.trainable(), comm)?;
        Ok((value, CommVolume { gathered: gathered_bytes, reduced: reduced as u64 * 8 }))
    }
}

/// All-gathers `local` (CPU copy, flattened): as f64 when it is f64, else as f32. Returns the
/// gathered values and their size in bytes.
pub fn gather_features(local: &Tensor, comm: &dyn Collective) -> Result<(Tensor, u64)> {
    let err = |e: tch::TchError| Error::config("features", e.to_string());
    let flat = local.detach().to_device(Device::Cpu).contiguous().reshape([-1]);
    if flat.kind() == Kind::Double {
        let all = comm.all_gather_f64(&Vec::<f64>::try_from(&flat).map_err(err)?)?;
        Ok((Tensor::from_slice(&all), all.len() as u64 * 8))
    } else {
        let all = comm.all_gather_f32(&Vec::<f32>::try_from(&flat.to_kind(Kind::Float)).map_err(err)?)?;
        Ok((Tensor::from_slice(&all), all.len() as u64 * 4))
    }
}

/// Sums the gradients of `params` over the ranks (in f64), in place; returns the number of values.
/// A parameter without a gradient contributes zeros.
pub fn all_reduce_grads(params: &[Tensor], comm: &dyn Collective) -> Result<usize> {
    let mut flat = Vec::new();
    for p in params {
        let g = p.grad();
        if g.defined() {
            let values = g.detach().to_device(Device::Cpu).to_kind(Kind::Double).contiguous().reshape([-1]);
            flat.extend(Vec::<f64>::try_from(&values).map_err(|e| Error::config("gradient", e.to_string()))?);
        } else {
            flat.extend(std::iter::repeat_n(0.0, p.numel()));
        }
    }
    comm.all_reduce_sum_f64(&mut flat)?;
    let mut offset = 0;
    for p in params {
        let n = p.numel();
        let summed =
            Tensor::from_slice(&flat[offset..offset + n]).reshape(p.size()).to_kind(p.kind()).to_device(p.device());
        let mut g = p.grad();
        if g.defined() {
            tch::no_grad(|| g.copy_(&summed));
        } else if flat[offset..offset + n].iter().any(|&v| v != 0.0) {
            // Only another rank's shard reached this parameter: give it the summed gradient.
            (p * summed.detach()).sum(Kind::Double).backward();
        }
        offset += n;
    }
    Ok(flat.len())
}
