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
//! With a teacher ([`Objective::teacher`], [`crate::teacher`]) sample `i` starts from its pair's
//! initial noise, and the loss is `(1/B) sum_i d(x_i, y_i) + kid_weight * KID`. The distance
//! term is per sample, so each micro-batch of pass 2 adds its own samples' `dd/dx` to the
//! cotangent it pushes back (their slice of `dL/dfeatures` through the feature network, when the
//! loss has feature terms: a KID, or the feature distance), and pass 1 runs only when there are
//! feature terms. With neither a KID nor the feature distance the gradient takes a single pass
//! whatever the micro-batch.
//!
//! [`Objective::loss_and_grad_sharded`] is the same two-pass gradient split across the ranks of a
//! [`Collective`]: each rank generates its contiguous shard of the batch, the features are
//! all-gathered, every rank computes the same loss and `dL/dfeatures`, back-propagates its slice
//! through its shard, and the parameter gradients are summed over the ranks. Only features and
//! parameter gradients are communicated, never images.

use crate::collective::{check_shardable, shard, Collective, CommVolume};
use crate::loss::FeatureLoss;
use crate::teacher::TeacherBatch;
use crate::unroll::{self, MemoryPlan, Remat};
use crate::{Error, Result};
use fid_metrics::features::FeatureExtractor;
use ggdm_core::ggdm::GgdmSampler;
use ggdm_core::noise::{NoiseSource, PerSampleNoise};
use ggdm_nets::DifferentiableDenoiser;
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

    /// Checks that the batch suits the loss split over `ranks` ranks: at least 2 samples (KID's
    /// minimum), and one for every rank ([`check_shardable`]).
    pub fn check(&self, ranks: usize) -> Result<()> {
        if self.batch < 2 {
            return Err(Error::config("batch_size", format!("{} (KID needs at least 2 samples)", self.batch)));
        }
        check_shardable("batch_size", self.batch, ranks)
    }
}

/// Everything one objective evaluation needs.
pub struct Objective<'a> {
    /// The sampler being optimised.
    pub sampler: &'a GgdmSampler,
    /// The (frozen) diffusion model.
    pub model: &'a dyn DifferentiableDenoiser,
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
    /// With a teacher: the batch's (initial noise, teacher sample) pairs. Sample `i` then starts
    /// from the pair's noise instead of the first draw of its stream (its step noise `z` is the
    /// stream's as without a teacher), and the loss is the teacher's ([`crate::teacher`]).
    /// `None`: the feature loss alone (DDSS).
    pub teacher: Option<TeacherBatch>,
}

/// What one evaluation of the objective returns besides the gradient, which it accumulates into
/// the sampler parameters' `.grad()`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Evaluation {
    /// The loss value.
    pub loss: f64,
    /// What the evaluation's last unroll chose ([`unroll::Forward::memory_plan`]); `None` unless
    /// the strategy is [`Remat::MemoryBudget`] or [`Remat::FreeMemory`].
    pub memory_plan: Option<MemoryPlan>,
}

fn features_of(extractor: &dyn FeatureExtractor, x: &Tensor) -> Result<Tensor> {
    Ok(extractor.features(x)?)
}

/// The sum of the parts of a loss that are present (the feature terms and the distance term).
fn total(parts: [Option<Tensor>; 2]) -> Option<Tensor> {
    parts.into_iter().flatten().reduce(|a, b| a + b)
}

impl Objective<'_> {
    /// Generates the batch without autograd and returns the samples (for validation / pictures).
    pub fn generate(&self, noise: BatchNoise) -> Result<Tensor> {
        self.generate_range(noise, 0..noise.batch)
    }

    /// The loss value and, accumulated into the sampler parameters' `.grad()`, its exact gradient.
    pub fn loss_and_grad(&self, noise: BatchNoise) -> Result<Evaluation> {
        self.check_batch(&noise, 1)?;
        if self.micro_batch >= noise.batch {
            return self.single_pass(&noise);
        }
        // Pass 1: all features without autograd, the loss's feature terms and dL/dfeatures.
        let pass = self.feature_pass(&noise, 0..noise.batch, None)?;
        // Pass 2: each micro-batch with the unroll, pushing back its slice of dL/dfeatures.
        let (distance, memory_plan) = self.backprop_range(&noise, 0..noise.batch, pass.grad.as_ref())?;
        Ok(Evaluation { loss: scalar(total([pass.terms, distance]))?, memory_plan })
    }

    /// The batch must suit `ranks` ranks ([`BatchNoise::check`]) and hold as many samples as the
    /// teacher's pairs.
    fn check_batch(&self, noise: &BatchNoise, ranks: usize) -> Result<()> {
        noise.check(ranks)?;
        match &self.teacher {
            Some(t) if t.len() != noise.batch => Err(Error::config(
                "batch_size",
                format!("{} samples, but the teacher batch holds {} pairs", noise.batch, t.len()),
            )),
            _ => Ok(()),
        }
    }

    /// `x_init` and `z_1..z_K` of samples `first .. first + count`.
    fn draw(&self, noise: &BatchNoise, first: usize, count: usize) -> Result<(Tensor, Vec<Tensor>)> {
        let steps = self.sampler.steps;
        let (x_init, z) = noise.draw_as(first, count, self.sample_shape, steps, self.device, self.state_kind)?;
        let x_init = match &self.teacher {
            Some(t) => t.initial_noise(first, count).to_device(self.device).to_kind(self.state_kind),
            None => x_init,
        };
        Ok((x_init, z))
    }

    /// Whether the loss needs the features of the whole batch.
    fn uses_features(&self) -> bool {
        self.teacher.as_ref().is_none_or(TeacherBatch::uses_features)
    }

    /// The loss's terms on the features of the whole batch: the feature loss alone without a
    /// teacher, else the teacher's KID and feature-distance terms (`None` when it has neither).
    fn feature_terms(&self, features: &Tensor) -> Result<Option<Tensor>> {
        match &self.teacher {
            None => self.loss.value(features).map(Some),
            Some(t) => t.feature_terms(self.loss, features),
        }
    }

    /// The teacher's pixel-distance term of samples `first ..` (the rows of `x`): their summed
    /// distance over the batch size, so the micro-batches' terms add up to the batch mean.
    fn distance_term(&self, x: &Tensor, first: usize) -> Option<Tensor> {
        let t = self.teacher.as_ref()?;
        Some(t.pixel_sum(x, first)? / t.len() as f64)
    }

    /// The loss and its gradient with the whole batch in one micro-batch.
    fn single_pass(&self, noise: &BatchNoise) -> Result<Evaluation> {
        let (x_init, z) = self.draw(noise, 0, noise.batch)?;
        let fwd = unroll::forward(self.sampler, self.model, &x_init, &z, self.remat)?;
        let memory_plan = fwd.memory_plan();
        let chunked = self.feature_chunk.is_some_and(|c| c < noise.batch);
        let (loss, grad_x) = if chunked && self.uses_features() {
            let features = tch::no_grad(|| features_of(self.extractor, &fwd.output))?;
            let features = features.detach().set_requires_grad(true);
            let terms = self.feature_terms(&features)?;
            let mut grad_x = None;
            if let Some(terms) = &terms {
                terms.backward();
                grad_x = Some(self.features_vjp(&fwd.output, &features.grad())?);
            }
            let (distance, grad_x) = self.add_distance_grad(&fwd.output, 0, grad_x)?;
            (total([terms, distance]), grad_x)
        } else {
            let x_out = fwd.output.detach().set_requires_grad(true);
            let terms =
                if self.uses_features() { self.feature_terms(&features_of(self.extractor, &x_out)?)? } else { None };
            let loss = total([terms, self.distance_term(&x_out, 0)]);
            if let Some(loss) = &loss {
                loss.backward();
            }
            (loss, Some(x_out.grad()))
        };
        let grad_x = grad_x.ok_or_else(|| Error::config("loss", "the loss has no term"))?;
        let _ = unroll::backward(self.sampler, self.model, fwd, &grad_x)?;
        // Read last: reading the value waits for the device, which would stall the sweep's launches.
        Ok(Evaluation { loss: scalar(loss)?, memory_plan })
    }

    /// Adds the gradient of the teacher's pixel-distance term of samples `first ..` (the rows of
    /// `x_out`) to `grad_x`; returns the term (detached) and the sum.
    fn add_distance_grad(
        &self,
        x_out: &Tensor,
        first: usize,
        grad_x: Option<Tensor>,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let x = x_out.detach().set_requires_grad(true);
        let Some(term) = self.distance_term(&x, first) else { return Ok((None, grad_x)) };
        term.backward();
        let grad = match grad_x {
            Some(g) => g + x.grad(),
            None => x.grad(),
        };
        Ok((Some(term.detach()), Some(grad)))
    }

    /// Pass 1 of the two-pass gradient over samples `range` (all ranks' features gathered when
    /// `comm` is given): the loss's feature terms and `dL/dfeatures` of every sample of the
    /// batch (none when the loss has no feature term).
    fn feature_pass(
        &self,
        noise: &BatchNoise,
        range: std::ops::Range<usize>,
        comm: Option<&dyn Collective>,
    ) -> Result<FeaturePass> {
        if !self.uses_features() {
            return Ok(FeaturePass::default());
        }
        let local = self.features_range(noise, range)?;
        let (all, gathered_bytes) = match comm {
            None => (local, 0),
            Some(comm) => gather_batch_features(&local, noise.batch, comm)?,
        };
        let all = all.detach().set_requires_grad(true);
        let terms = self.feature_terms(&all)?;
        let grad = match &terms {
            Some(terms) => {
                terms.backward();
                Some(all.grad())
            }
            None => None,
        };
        Ok(FeaturePass { terms, grad, gathered_bytes })
    }

    /// Pass 1 of the two-pass gradient: the features of samples `range` (global indices) without
    /// autograd, in micro-batches that start at `range.start`.
    fn features_range(&self, noise: &BatchNoise, range: std::ops::Range<usize>) -> Result<Tensor> {
        let mut features = Vec::new();
        let mut first = range.start;
        while first < range.end {
            let count = self.micro_batch.min(range.end - first);
            let (x_init, z) = self.draw(noise, first, count)?;
            let out = tch::no_grad(|| self.sampler.sample(self.model, &x_init, &z))?;
            features.push(tch::no_grad(|| features_of(self.extractor, &out))?);
            first += count;
        }
        Ok(Tensor::cat(&features, 0))
    }

    /// Pass 2: re-runs samples `range` with the unroll, micro-batch by micro-batch (as in pass 1),
    /// and back-propagates their rows of `grad_features` (indexed by global sample; `None` when
    /// the loss has no feature term) and their teacher-distance term into the sampler parameters.
    /// Returns the sum of their distance terms (`None` without a pixel distance) and the memory
    /// plan of the last micro-batch's unroll.
    fn backprop_range(
        &self,
        noise: &BatchNoise,
        range: std::ops::Range<usize>,
        grad_features: Option<&Tensor>,
    ) -> Result<(Option<Tensor>, Option<MemoryPlan>)> {
        let mut distance = None;
        let mut memory_plan = None;
        let mut first = range.start;
        while first < range.end {
            let count = self.micro_batch.min(range.end - first);
            let (x_init, z) = self.draw(noise, first, count)?;
            let fwd = unroll::forward(self.sampler, self.model, &x_init, &z, self.remat)?;
            memory_plan = fwd.memory_plan();
            let grad_x = match grad_features {
                Some(g) => Some(self.features_vjp(&fwd.output, &g.narrow(0, first as i64, count as i64))?),
                None => None,
            };
            let (term, grad_x) = self.add_distance_grad(&fwd.output, first, grad_x)?;
            distance = total([distance, term]);
            let grad_x = grad_x.ok_or_else(|| Error::config("loss", "the loss has no term"))?;
            let _ = unroll::backward(self.sampler, self.model, fwd, &grad_x)?;
            first += count;
        }
        Ok((distance, memory_plan))
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

/// The value of a loss (an error when it has no term).
fn scalar(loss: Option<Tensor>) -> Result<f64> {
    loss.map(|l| l.double_value(&[])).ok_or_else(|| Error::config("loss", "the loss has no term"))
}

impl Objective<'_> {
    /// Generates samples `range` (global indices) of the batch without autograd, in micro-batches
    /// that start at `range.start`.
    pub fn generate_range(&self, noise: BatchNoise, range: std::ops::Range<usize>) -> Result<Tensor> {
        let mut chunks = Vec::new();
        let mut first = range.start;
        while first < range.end {
            let count = self.micro_batch.min(range.end - first);
            let (x_init, z) = self.draw(&noise, first, count)?;
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
    /// of the final gradient sum. Also returns the bytes communicated. The memory plan is this
    /// rank's.
    pub fn loss_and_grad_sharded(&self, noise: BatchNoise, comm: &dyn Collective) -> Result<(Evaluation, CommVolume)> {
        if comm.size() <= 1 {
            return Ok((self.loss_and_grad(noise)?, CommVolume::default()));
        }
        self.check_batch(&noise, comm.size())?;
        let range = shard(noise.batch, comm.rank(), comm.size());
        // Pass 1: this rank's features without autograd, then everyone's.
        let pass = self.feature_pass(&noise, range.clone(), Some(comm))?;
        let mut loss = pass.terms.as_ref().map(|v| v.double_value(&[]));
        // Pass 2: this rank's micro-batches with the unroll; the distance terms summed over the ranks.
        let (distance, memory_plan) = self.backprop_range(&noise, range, pass.grad.as_ref())?;
        if self.teacher.as_ref().is_some_and(TeacherBatch::uses_pixel_distance) {
            let mut sum = [distance.map_or(0.0, |d| d.double_value(&[]))];
            comm.all_reduce_sum_f64(&mut sum)?;
            loss = Some(loss.map_or(sum[0], |v| v + sum[0]));
        }
        let loss = loss.ok_or_else(|| Error::config("loss", "the loss has no term"))?;
        let reduced = all_reduce_grads(&self.sampler.trainable(), comm)?;
        let volume = CommVolume { gathered: pass.gathered_bytes, reduced: reduced as u64 * 8 };
        Ok((Evaluation { loss, memory_plan }, volume))
    }
}

/// What pass 1 of the two-pass gradient gives.
#[derive(Default)]
struct FeaturePass {
    /// The loss's feature terms (for the whole batch).
    terms: Option<Tensor>,
    /// Their gradient with respect to every sample's features.
    grad: Option<Tensor>,
    /// Bytes all-gathered.
    gathered_bytes: u64,
}

/// All ranks' features of a batch of `batch` samples (each rank's `local` rows in rank order), as
/// `batch x d` of `local`'s kind on its device; also the bytes gathered.
fn gather_batch_features(local: &Tensor, batch: usize, comm: &dyn Collective) -> Result<(Tensor, u64)> {
    let (kind, device, dim) = (local.kind(), local.device(), local.size()[1]);
    let (gathered, gathered_bytes) = gather_features(local, comm)?;
    if gathered.numel() != batch * dim as usize {
        return Err(Error::config(
            "features",
            format!("gathered {} values, expected {batch} x {dim}", gathered.numel()),
        ));
    }
    Ok((gathered.reshape([batch as i64, dim]).to_kind(kind).to_device(device), gathered_bytes))
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
