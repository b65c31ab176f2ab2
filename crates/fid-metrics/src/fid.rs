//! Frechet Inception Distance in f64 (DESIGN.md section 4, "Metrics":
//! `FID = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})`, symmetric eigen route).
//!
//! `Tr((S1 S2)^{1/2})` is the sum of the square roots of the eigenvalues of `S1^{1/2} S2 S1^{1/2}`,
//! a symmetric positive semi-definite matrix with the same spectrum as `S1 S2`. Here
//! `S1 = V diag(w) V^T` (`linalg_eigh`); eigen-directions with `w <= max(w) * d * eps(f64)` (numpy's
//! rank tolerance) are dropped, which removes the round-off of the null space that a singular
//! covariance (fewer samples than dimensions) has and which contributes nothing exactly; on the
//! kept directions the d_r x d_r matrix `diag(sqrt w) V^T S2 V diag(sqrt w)` is symmetrised, its
//! eigenvalues are clamped at zero and their square roots summed. This agrees with pytorch-fid's
//! `calculate_frechet_distance` (scipy `sqrtm` of `S1 S2`) to about 1e-8 relative on singular
//! covariances and to round-off otherwise, and gives 0 to about 1e-12 for a set against itself.
//! The result is clamped at 0 (FID is a squared distance).

use ndarray::{ArrayView1, ArrayView2};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::stats::{matrix_to_tensor, FeatureStats};

/// FID between two sets of statistics.
pub fn fid_from_stats(a: &FeatureStats, b: &FeatureStats) -> Result<f64> {
    frechet_distance(a.mu.view(), a.sigma.view(), b.mu.view(), b.sigma.view())
}

/// FID between two feature sets (N x d tensors, N >= 2 each).
pub fn fid_from_features(features_a: &Tensor, features_b: &Tensor) -> Result<f64> {
    fid_from_stats(&FeatureStats::from_features(features_a)?, &FeatureStats::from_features(features_b)?)
}

/// Frechet distance between N(mu_a, sigma_a) and N(mu_b, sigma_b), in f64.
pub fn frechet_distance(
    mu_a: ArrayView1<f64>,
    sigma_a: ArrayView2<f64>,
    mu_b: ArrayView1<f64>,
    sigma_b: ArrayView2<f64>,
) -> Result<f64> {
    let d = mu_a.len();
    if mu_b.len() != d {
        return Err(Error::shape("mu of the second set", format!("[{d}] like the first"), vec![mu_b.len() as i64]));
    }
    let check_square = |what: &str, shape: &[usize]| -> Result<()> {
        if shape != [d, d] {
            return Err(Error::shape(what, format!("{d} x {d}"), shape.iter().map(|&s| s as i64).collect()));
        }
        Ok(())
    };
    check_square("sigma of the first set", sigma_a.shape())?;
    check_square("sigma of the second set", sigma_b.shape())?;
    let all_finite = mu_a.iter().chain(mu_b.iter()).all(|v| v.is_finite())
        && sigma_a.iter().chain(sigma_b.iter()).all(|v| v.is_finite());
    if !all_finite {
        return Err(Error::invalid("feature statistics", "mu or sigma contains NaN or infinity"));
    }
    let mean_term: f64 = mu_a.iter().zip(mu_b.iter()).map(|(a, b)| (a - b) * (a - b)).sum();
    let trace_a: f64 = sigma_a.diag().sum();
    let trace_b: f64 = sigma_b.diag().sum();
    let sigma_a = matrix_to_tensor(sigma_a)?;
    let sigma_b = matrix_to_tensor(sigma_b)?;
    let cross = trace_sqrt_product(&sigma_a, &sigma_b)?;
    Ok((mean_term + trace_a + trace_b - 2.0 * cross).max(0.0))
}

/// `Tr((S_a S_b)^{1/2})` for symmetric positive semi-definite d x d matrices (any float kind;
/// computed in f64 on the CPU) by the symmetric eigen route described in the module documentation.
pub fn trace_sqrt_product(sigma_a: &Tensor, sigma_b: &Tensor) -> Result<f64> {
    tch::no_grad(|| {
        let a = symmetrised_f64(sigma_a)?;
        let b = symmetrised_f64(sigma_b)?;
        let d = a.size()[0];
        let (eigenvalues, eigenvectors) = a.f_linalg_eigh("L")?;
        let w = Vec::<f64>::try_from(&eigenvalues)?;
        let w_max = w.iter().copied().fold(0.0f64, f64::max);
        let tolerance = w_max * d as f64 * f64::EPSILON;
        let kept: Vec<i64> =
            w.iter().enumerate().filter(|(_, &value)| value > tolerance).map(|(i, _)| i as i64).collect();
        if kept.is_empty() {
            return Ok(0.0);
        }
        let kept = Tensor::from_slice(&kept);
        let v = eigenvectors.f_index_select(1, &kept)?;
        let sqrt_w = eigenvalues.f_index_select(0, &kept)?.f_sqrt()?;
        let inner = v.f_tr()?.f_mm(&b)?.f_mm(&v)?;
        let scaled = inner.f_mul(&sqrt_w.f_unsqueeze(1)?)?.f_mul(&sqrt_w.f_unsqueeze(0)?)?;
        let symmetric = scaled.f_add(&scaled.f_tr()?)?.f_mul_scalar(0.5)?;
        let spectrum = symmetric.f_linalg_eigvalsh("L")?.f_clamp_min(0.0)?.f_sqrt()?;
        Ok(spectrum.f_sum(Kind::Double)?.f_double_value(&[])?)
    })
}

/// `(S + S^T) / 2` in f64 on the CPU, checking the shape.
fn symmetrised_f64(sigma: &Tensor) -> Result<Tensor> {
    let size = sigma.size();
    if size.len() != 2 || size[0] != size[1] {
        return Err(Error::shape("covariance", "d x d", size));
    }
    let s = sigma.f_to_device(Device::Cpu)?.f_to_kind(Kind::Double)?;
    Ok(s.f_add(&s.f_tr()?)?.f_mul_scalar(0.5)?)
}
