//! Losses on sample features (DESIGN.md section 4, "DDSS objective"): the distance between the
//! features of generated samples (differentiable) and fixed features of real data.
//!
//! * [`LossKind::Kid`]: unbiased MMD^2 with the cubic polynomial kernel `(a.b/d + 1)^3` — KID,
//!   the paper's objective (computed by `fid_metrics::kid::KidLoss`);
//! * [`LossKind::MmdRbf`]: unbiased MMD^2 with a Gaussian kernel whose bandwidth is the median
//!   pairwise distance of the real features (or given);
//! * [`LossKind::Moments`]: `|mu_g - mu_r|^2 + |C_g - C_r|_F^2`, feature mean/covariance matching.

use crate::{Error, Result};
use fid_metrics::kid::KidLoss;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Which distance the search minimises.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum LossKind {
    /// KID (unbiased MMD^2, cubic polynomial kernel).
    #[default]
    Kid,
    /// Unbiased MMD^2 with a Gaussian kernel.
    MmdRbf {
        /// Kernel bandwidth; `None` = median pairwise distance of the real features.
        #[serde(default)]
        bandwidth: Option<f64>,
    },
    /// Mean and covariance matching.
    Moments,
}

/// A loss bound to a set of real features.
///
/// Features are divided by one scalar, `sqrt(mean_i |r_i|^2 / d)` of the real features, before the
/// loss: the cubic KID kernel `(a.b/d + 1)^3` is then evaluated where its `+1` matters whatever
/// the feature network's activation scale (classifier activations can be far larger than
/// Inception's). Reported metrics use the raw features.
pub struct FeatureLoss {
    kind: LossKind,
    scale: f64,
    real: Tensor,
    kid: Option<KidLoss>,
    bandwidth: f64,
    real_mean: Tensor,
    real_cov: Tensor,
}

impl std::fmt::Debug for FeatureLoss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeatureLoss").field("kind", &self.kind).field("num_real", &self.real.size()[0]).finish()
    }
}

fn covariance(x: &Tensor) -> Tensor {
    let n = x.size()[0];
    let centred = x - x.mean_dim(0, true, x.kind());
    centred.transpose(0, 1).matmul(&centred) / ((n - 1).max(1) as f64)
}

fn squared_distances(a: &Tensor, b: &Tensor) -> Tensor {
    let a2 = a.square().sum_dim_intlist(1, true, a.kind());
    let b2 = b.square().sum_dim_intlist(1, true, b.kind()).transpose(0, 1);
    (a2 + b2 - a.matmul(&b.transpose(0, 1)) * 2.0).clamp_min(0.0)
}

/// Mean of the off-diagonal entries of a square matrix.
fn off_diagonal_mean(k: &Tensor) -> Tensor {
    let n = k.size()[0];
    (k.sum(Kind::Double) - k.diagonal(0, 0, 1).sum(Kind::Double)) / ((n * (n - 1)) as f64)
}

impl FeatureLoss {
    /// Binds `kind` to the real features (`M x d`, on the device the loss is computed on).
    pub fn new(kind: LossKind, real_features: &Tensor) -> Result<Self> {
        let size = real_features.size();
        if size.len() != 2 || size[0] < 2 {
            return Err(Error::Shape { what: "real features".into(), expected: "M x d with M >= 2".into(), got: size });
        }
        let raw = real_features.detach().to_kind(Kind::Double);
        let mean_square = raw.square().sum(Kind::Double).double_value(&[]) / (size[0] * size[1]) as f64;
        let scale = 1.0 / mean_square.sqrt().max(1e-12);
        let real = (raw * scale).to_kind(Kind::Float);
        let kid = match kind {
            LossKind::Kid => Some(KidLoss::new(&real).map_err(|e| Error::config("loss", e.to_string()))?),
            _ => None,
        };
        let bandwidth = match kind {
            LossKind::MmdRbf { bandwidth: Some(h) } => {
                if !(h > 0.0) {
                    return Err(Error::config("loss.bandwidth", format!("{h} (must be > 0)")));
                }
                h
            }
            LossKind::MmdRbf { bandwidth: None } => {
                let d2 = squared_distances(&real, &real).to_kind(Kind::Double);
                let m = d2.size()[0];
                let mask = Tensor::ones([m, m], (Kind::Bool, d2.device())).triu(1);
                let median = d2.masked_select(&mask).median().double_value(&[]).sqrt();
                median.max(1e-6)
            }
            _ => 1.0,
        };
        let real_mean = real.to_kind(Kind::Double).mean_dim(0, false, Kind::Double);
        let real_cov = covariance(&real.to_kind(Kind::Double));
        Ok(Self { kind, scale, real, kid, bandwidth, real_mean, real_cov })
    }

    /// The loss kind.
    pub fn kind(&self) -> LossKind {
        self.kind
    }

    /// The factor features are multiplied by before the loss: one over the real features' RMS,
    /// `1 / sqrt(mean_i |r_i|^2 / d)`.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Number of real feature vectors.
    pub fn num_real(&self) -> usize {
        self.real.size()[0] as usize
    }

    /// The loss of generated features (`N x d`, N >= 2) as a differentiable f64 scalar.
    pub fn value(&self, generated: &Tensor) -> Result<Tensor> {
        let size = generated.size();
        if size.len() != 2 || size[1] != self.real.size()[1] || size[0] < 2 {
            return Err(Error::Shape {
                what: "generated features".into(),
                expected: format!("N x {} with N >= 2", self.real.size()[1]),
                got: size,
            });
        }
        let generated = &(generated * self.scale);
        match self.kind {
            LossKind::Kid => {
                let kid = self.kid.as_ref().ok_or_else(|| Error::config("loss", "KID state missing"))?;
                Ok(kid.loss(generated).map_err(|e| Error::config("loss", e.to_string()))?.to_kind(Kind::Double))
            }
            LossKind::MmdRbf { .. } => {
                let g = generated.to_kind(Kind::Double);
                let r = self.real.to_kind(Kind::Double);
                let scale = -1.0 / (2.0 * self.bandwidth * self.bandwidth);
                let k_gg = (squared_distances(&g, &g) * scale).exp();
                let k_rr = (squared_distances(&r, &r) * scale).exp();
                let k_gr = (squared_distances(&g, &r) * scale).exp();
                Ok(off_diagonal_mean(&k_gg) + off_diagonal_mean(&k_rr) - k_gr.mean(Kind::Double) * 2.0)
            }
            LossKind::Moments => {
                let g = generated.to_kind(Kind::Double);
                let mean = g.mean_dim(0, false, Kind::Double);
                let mean_term = (mean - &self.real_mean).square().sum(Kind::Double);
                let cov_term = (covariance(&g) - &self.real_cov).square().sum(Kind::Double);
                Ok(mean_term + cov_term)
            }
        }
    }
}
