//! Teacher matching (DESIGN.md section 4, "Starting solver and teacher"; LD3, S4S): the search's
//! samples are compared with a deterministic many-step solver's samples from the *same* initial
//! noise, `d(sampler(x_T, z; phi), teacher(x_T))`, a dense per-sample signal that does not
//! saturate the way a batch KID does.
//!
//! * [`TeacherDistance`]: the per-sample distance (mean squared or absolute error per pixel, the
//!   pseudo-Huber distance of consistency models, or the squared distance in the loss feature
//!   network's embedding, the stand-in for LPIPS);
//! * [`Pairs`]: (initial noise, teacher sample) pairs, computed once by the caller (and cached by
//!   [`crate::pair_cache`]);
//! * [`Teacher`]: training and validation pairs with the loss's distance and KID weight. Each
//!   training step draws its batch from the training pairs ([`Teacher::training_batch`]): the
//!   pairs are visited in a fresh random order every epoch (an epoch = one pass over the pairs),
//!   the order a function of the search seed alone, so a resumed run draws what an uninterrupted
//!   one draws.
//!
//! The loss of a batch of `B` samples is, in raw units,
//! `L = (1/B) sum_i d(x_i, y_i) + kid_weight * KID`, where `KID` is the value the feature loss
//! alone would give ([`crate::loss::FeatureLoss::value`]: unbiased MMD^2 of features divided by
//! the real features' RMS; *not* the x1e3 of the results tables). The distance term decomposes
//! over samples, so its gradient needs no second pass: each micro-batch of the two-pass scheme
//! adds its own samples' term (see [`crate::objective`]).

use crate::loss::FeatureLoss;
use crate::search::mix_seed;
use crate::{Error, Result};
use fid_metrics::features::FeatureExtractor;
use ggdm_core::noise::{NoiseSource, PerSampleNoise};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// The per-sample distance between a sample `x` and its teacher sample `y` (both `C x H x W` in
/// [-1, 1], `d = C * H * W` values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TeacherDistance {
    /// Mean squared error per pixel, `|x - y|^2 / d` (LD3's L2 option, NeuralSolver's MSE).
    #[default]
    L2,
    /// Mean absolute error per pixel, `|x - y|_1 / d` (PAS).
    L1,
    /// `sqrt(|x - y|^2 + c^2) - c` with `c = 0.00054 sqrt(d)`: the pseudo-Huber distance of
    /// improved consistency training (Song & Dhariwal 2023, section 3.3), on the whole sample's
    /// L2 norm: quadratic below `c`, linear (in the norm) above it.
    PseudoHuber,
    /// `|s (f(x) - f(y))|^2 / m` in the loss feature network's embedding (`m` features), with
    /// `s` the [`FeatureLoss::scale`] of the KID (one over the real features' RMS), our stand-in
    /// for LPIPS.
    Features,
}

impl TeacherDistance {
    /// The name used in logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            TeacherDistance::L2 => "l2",
            TeacherDistance::L1 => "l1",
            TeacherDistance::PseudoHuber => "pseudo_huber",
            TeacherDistance::Features => "features",
        }
    }

    /// The pseudo-Huber `c` for samples of `d` values: `0.00054 sqrt(d)`.
    pub fn pseudo_huber_c(d: i64) -> f64 {
        0.00054 * (d as f64).sqrt()
    }

    /// The distance of each row of `x` to the same row of `y` (`N x ...` each; for
    /// [`Self::Features`], already scaled features), as `N` f64 values, differentiable in `x`.
    pub fn per_sample(self, x: &Tensor, y: &Tensor) -> Tensor {
        let n = x.size()[0];
        let diff = (x.to_kind(Kind::Double) - y.to_kind(Kind::Double)).reshape([n, -1]);
        match self {
            TeacherDistance::L2 | TeacherDistance::Features => diff.square().mean_dim(1, false, Kind::Double),
            TeacherDistance::L1 => diff.abs().mean_dim(1, false, Kind::Double),
            TeacherDistance::PseudoHuber => {
                let c = Self::pseudo_huber_c(diff.size()[1]);
                (diff.square().sum_dim_intlist(1, false, Kind::Double) + c * c).sqrt() - c
            }
        }
    }
}

/// (initial noise, teacher sample) pairs: `noise[i]` is the `x_T` the teacher started from and
/// `target[i]` its sample, both `N x C x H x W` f32 on the CPU.
#[derive(Debug)]
pub struct Pairs {
    /// Initial noise.
    pub noise: Tensor,
    /// The teacher's samples from it.
    pub target: Tensor,
}

impl Pairs {
    /// Checks that both tensors are `N x C x H x W` with the same shape, `N >= 1` (`what` names them).
    pub fn new(noise: Tensor, target: Tensor, what: &str) -> Result<Self> {
        let (a, b) = (noise.size(), target.size());
        if a.len() != 4 || a[0] < 1 || a != b {
            return Err(Error::Shape {
                what: format!("{what}: teacher samples {b:?} for initial noise"),
                expected: "two equal N x C x H x W shapes with N >= 1".into(),
                got: a,
            });
        }
        Ok(Self { noise, target })
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.noise.size()[0] as usize
    }

    /// Always false (a set of pairs holds at least one).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The initial noise of samples `first .. first + count` of stream `seed`: sample `i` gets the
/// first draw of stream `(seed, i)`, as `ddss-cli sample --seed` gives it (f32, CPU).
pub fn initial_noise(seed: u64, first: u64, count: usize, shape: [i64; 3]) -> Result<Tensor> {
    let mut noise = PerSampleNoise::new(seed, first, count);
    Ok(noise.next(&[count as i64, shape[0], shape[1], shape[2]], Device::Cpu)?)
}

/// How the teacher enters the loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TeacherLoss {
    /// The per-sample distance.
    pub distance: TeacherDistance,
    /// Weight of the feature loss (KID) added to the mean distance (0: the teacher alone).
    pub kid_weight: f64,
}

/// Training and validation pairs with the loss they enter.
pub struct Teacher {
    loss: TeacherLoss,
    train: Pairs,
    validation: Pairs,
    /// Raw features of the teacher samples (for [`TeacherDistance::Features`]).
    train_features: Option<Tensor>,
    validation_features: Option<Tensor>,
    device: Device,
    /// What the best sampler is chosen by ([`TeacherValidation`]).
    validation_metric: TeacherValidation,
}

/// What a search with a teacher validates on, and so chooses its best sampler by.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TeacherValidation {
    /// The mean teacher distance of the validation pairs (the default): the sampler closest to
    /// the teacher.
    #[default]
    Distance,
    /// KID of `optim.validation_num` held-out samples against the real features, as without a
    /// teacher: the sampler with the best sample quality, which may move past the teacher where
    /// the model itself errs.
    Kid,
}

impl std::fmt::Debug for Teacher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Teacher")
            .field("loss", &self.loss)
            .field("train", &self.train.len())
            .field("validation", &self.validation.len())
            .finish()
    }
}

/// Samples per feature-network call when the teacher samples' features are computed.
const FEATURE_BATCH: usize = 64;

impl Teacher {
    /// Binds the pairs to `loss`, moving them to `device`. For [`TeacherDistance::Features`] the
    /// teacher samples' features are computed here, once, with `extractor` (without autograd).
    pub fn new(
        loss: TeacherLoss,
        train: Pairs,
        validation: Pairs,
        extractor: &dyn FeatureExtractor,
        device: Device,
    ) -> Result<Self> {
        if !(loss.kid_weight >= 0.0) || !loss.kid_weight.is_finite() {
            return Err(Error::config("loss.teacher.kid_weight", format!("{} (must be >= 0)", loss.kid_weight)));
        }
        if train.noise.size()[1..] != validation.noise.size()[1..] {
            return Err(Error::Shape {
                what: "validation pairs".into(),
                expected: format!("samples of the training pairs' shape {:?}", &train.noise.size()[1..]),
                got: validation.noise.size(),
            });
        }
        let features = |pairs: &Pairs| -> Result<Option<Tensor>> {
            if loss.distance != TeacherDistance::Features {
                return Ok(None);
            }
            let mut chunks = Vec::new();
            for start in (0..pairs.len()).step_by(FEATURE_BATCH) {
                let len = FEATURE_BATCH.min(pairs.len() - start) as i64;
                let x = pairs.target.narrow(0, start as i64, len).to_device(extractor.device());
                let f = tch::no_grad(|| extractor.features(&x))?;
                chunks.push(f.to_device(device));
            }
            Ok(Some(Tensor::cat(&chunks, 0)))
        };
        let (train_features, validation_features) = (features(&train)?, features(&validation)?);
        let to_device = |p: Pairs| Pairs { noise: p.noise.to_device(device), target: p.target.to_device(device) };
        Ok(Self {
            loss,
            train: to_device(train),
            validation: to_device(validation),
            train_features,
            validation_features,
            device,
            validation_metric: TeacherValidation::Distance,
        })
    }

    /// The same teacher, validated on `metric`.
    pub fn validated_on(self, metric: TeacherValidation) -> Self {
        Self { validation_metric: metric, ..self }
    }

    /// What the best sampler is chosen by.
    pub fn validation_metric(&self) -> TeacherValidation {
        self.validation_metric
    }

    /// How the teacher enters the loss.
    pub fn loss(&self) -> TeacherLoss {
        self.loss
    }

    /// Number of training pairs.
    pub fn num_train(&self) -> usize {
        self.train.len()
    }

    /// Number of validation pairs.
    pub fn num_validation(&self) -> usize {
        self.validation.len()
    }

    /// The pairs of training step `step` (0-based) for a batch of `batch`: global draw
    /// `g = step * batch + i` takes pair `perm_e[g mod N]` of epoch `e = g div N`, where `perm_e`
    /// is a permutation of the `N` training pairs drawn from `(seed, e)`.
    pub fn training_batch(&self, seed: u64, step: u64, batch: usize) -> TeacherBatch {
        let n = self.train.len() as u64;
        let mut indices = Vec::with_capacity(batch);
        let mut epoch = None;
        let mut perm = Vec::new();
        for i in 0..batch as u64 {
            let g = step * batch as u64 + i;
            if epoch != Some(g / n) {
                epoch = Some(g / n);
                perm = permutation(n as usize, mix_seed(seed ^ PAIR_ORDER_SALT, g / n));
            }
            indices.push(perm[(g % n) as usize] as i64);
        }
        let index = Tensor::from_slice(&indices).to_device(self.device);
        TeacherBatch {
            loss: self.loss,
            noise: self.train.noise.index_select(0, &index),
            target: self.train.target.index_select(0, &index),
            target_features: self.train_features.as_ref().map(|f| f.index_select(0, &index)),
        }
    }

    /// All validation pairs, in order.
    pub fn validation_batch(&self) -> TeacherBatch {
        TeacherBatch {
            loss: self.loss,
            noise: self.validation.noise.shallow_clone(),
            target: self.validation.target.shallow_clone(),
            target_features: self.validation_features.as_ref().map(Tensor::shallow_clone),
        }
    }
}

/// Mixed into the search seed for the order the training pairs are visited in.
const PAIR_ORDER_SALT: u64 = 0x7EAC_4E12_0DE2_5EED;

/// A permutation of `0..n` (Fisher-Yates with a SplitMix64 stream from `seed`).
fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut perm: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (mix_seed(seed, i as u64) % (i as u64 + 1)) as usize;
        perm.swap(i, j);
    }
    perm
}

/// The pairs of one batch (training step or validation) with the loss they enter; row `i` is the
/// batch's sample `i` (its global index in the micro-batch scheme of [`crate::objective`]).
pub struct TeacherBatch {
    loss: TeacherLoss,
    noise: Tensor,
    target: Tensor,
    target_features: Option<Tensor>,
}

impl TeacherBatch {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.noise.size()[0] as usize
    }

    /// Always false (a batch holds at least one pair).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How the teacher enters the loss.
    pub fn loss(&self) -> TeacherLoss {
        self.loss
    }

    /// The initial noise of samples `first .. first + count`.
    pub fn initial_noise(&self, first: usize, count: usize) -> Tensor {
        self.noise.narrow(0, first as i64, count as i64)
    }

    /// Whether the loss needs the features of the whole batch (a KID term, or the feature distance).
    pub fn uses_features(&self) -> bool {
        self.loss.kid_weight > 0.0 || self.loss.distance == TeacherDistance::Features
    }

    /// Whether the distance is on pixels (not [`TeacherDistance::Features`]).
    pub fn uses_pixel_distance(&self) -> bool {
        self.loss.distance != TeacherDistance::Features
    }

    /// `sum_i d(x_i, y_{first + i})` over the rows of `x` (differentiable, f64 scalar) for a
    /// distance on pixels; `None` for [`TeacherDistance::Features`].
    pub fn pixel_sum(&self, x: &Tensor, first: usize) -> Option<Tensor> {
        if !self.uses_pixel_distance() {
            return None;
        }
        let target = self.target.narrow(0, first as i64, x.size()[0]);
        Some(self.loss.distance.per_sample(x, &target.to_device(x.device())).sum(Kind::Double))
    }

    /// `sum_i |s (f_i - t_{first + i})|^2 / m` over the rows of the raw `features`, with `s` =
    /// [`FeatureLoss::scale`] (the [`TeacherDistance::Features`] distance).
    pub fn feature_distance_sum(&self, features: &Tensor, first: usize, scale: f64) -> Result<Tensor> {
        let target = self.target_features.as_ref().ok_or_else(|| {
            Error::config("loss.teacher.distance", "\"features\" needs the teacher samples' features")
        })?;
        let target = target.narrow(0, first as i64, features.size()[0]).to_device(features.device());
        Ok(TeacherDistance::Features.per_sample(&(features * scale), &(target * scale)).sum(Kind::Double))
    }

    /// The terms of the loss that need the features of the whole batch (`features`: every row):
    /// `kid_weight * loss.value(features)` and, for [`TeacherDistance::Features`], the mean
    /// feature distance. `None` when there are none ([`Self::uses_features`] is false).
    pub fn feature_terms(&self, loss: &FeatureLoss, features: &Tensor) -> Result<Option<Tensor>> {
        let mut total = None;
        if self.loss.kid_weight > 0.0 {
            total = Some(loss.value(features)? * self.loss.kid_weight);
        }
        if self.loss.distance == TeacherDistance::Features {
            let mean = self.feature_distance_sum(features, 0, loss.scale())? / self.len() as f64;
            total = Some(match total {
                Some(kid) => kid + mean,
                None => mean,
            });
        }
        Ok(total)
    }
}
