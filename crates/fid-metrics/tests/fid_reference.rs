//! FID against pytorch-fid 0.3.0's `calculate_frechet_distance` on fixed feature sets
//! (tests/fixtures/fid/fid_reference.*, made by tests/scripts/gen_fid_fixtures.py).
//!
//! Equivalent Python for each case:
//! ```python
//! mu_a, sigma_a = np.mean(a, axis=0), np.cov(a, rowvar=False)   # same for b
//! fid = pytorch_fid.fid_score.calculate_frechet_distance(mu_a, sigma_a, mu_b, sigma_b)
//! ```

mod common;

use common::{read_json, read_tensors, relative_diff};
use fid_metrics::fid::{fid_from_features, fid_from_stats, frechet_distance, trace_sqrt_product};
use fid_metrics::{Error, FeatureStats, Result};
use ndarray::{Array1, Array2};
use tch::Tensor;

#[test]
fn fid_matches_pytorch_fid_including_singular_covariances() -> Result<()> {
    let tensors = read_tensors("fid_reference.safetensors");
    let meta = read_json("fid_reference.json");
    let cases = meta["cases"].as_array().expect("cases list");
    assert_eq!(cases.len(), 5);
    for case in cases {
        let name = case["name"].as_str().expect("case name");
        let expected = case["fid_pytorch_fid"].as_f64().expect("fid value");
        let a = &tensors[&format!("{name}.features_a")];
        let b = &tensors[&format!("{name}.features_b")];
        assert_eq!(a.size()[1], case["dim"].as_i64().expect("dim"));
        let got = fid_from_features(a, b)?;
        let rel = relative_diff(got, expected);
        println!("{name}: ours {got:.12} pytorch-fid {expected:.12} rel {rel:.2e}");
        assert!(rel <= 1e-6, "{name}: FID {got} vs pytorch-fid {expected} (rel {rel:.2e})");
    }
    Ok(())
}

#[test]
fn fid_of_a_set_with_itself_is_zero() -> Result<()> {
    let tensors = read_tensors("fid_reference.safetensors");
    for name in ["small_16", "medium_64", "singular_64", "singular_128", "singular_256"] {
        let a = &tensors[&format!("{name}.features_a")];
        let stats = FeatureStats::from_features(a)?;
        let fid = fid_from_stats(&stats, &stats)?;
        println!("{name}: self-FID {fid:.3e}");
        assert!(fid.abs() <= 1e-6, "{name}: FID of a set with itself is {fid}");
    }
    Ok(())
}

#[test]
fn trace_term_matches_closed_form_for_commuting_matrices() -> Result<()> {
    // S1 = diag(1, 4, 9, 0), S2 = diag(4, 1, 1, 5): Tr((S1 S2)^1/2) = 2 + 2 + 3 + 0 = 7.
    let s1 = Tensor::from_slice(&[1.0f64, 4.0, 9.0, 0.0]).diag(0);
    let s2 = Tensor::from_slice(&[4.0f64, 1.0, 1.0, 5.0]).diag(0);
    let got = trace_sqrt_product(&s1, &s2)?;
    assert!((got - 7.0).abs() < 1e-12, "{got}");
    // And a rotated pair: conjugating both by the same orthogonal matrix leaves the trace term.
    let fixed =
        Tensor::from_slice(&[2.0f64, 1.0, 0.5, -1.0, 0.3, 3.0, 1.0, 0.0, -0.7, 0.2, 1.5, 0.4, 1.1, -0.3, 0.8, 2.2])
            .reshape([4, 4]);
    let (q, _) = Tensor::linalg_qr(&fixed, "reduced");
    let rotated = trace_sqrt_product(&q.mm(&s1).mm(&q.tr()), &q.mm(&s2).mm(&q.tr()))?;
    assert!((rotated - 7.0).abs() < 1e-10, "{rotated}");
    Ok(())
}

#[test]
fn fid_mean_term_and_shape_errors() -> Result<()> {
    let sigma = Array2::<f64>::eye(3);
    let mu_a = Array1::from_vec(vec![0.0, 0.0, 0.0]);
    let mu_b = Array1::from_vec(vec![1.0, 2.0, 2.0]);
    let fid = frechet_distance(mu_a.view(), sigma.view(), mu_b.view(), sigma.view())?;
    assert!((fid - 9.0).abs() < 1e-12, "{fid}");

    let wrong = Array2::<f64>::eye(4);
    let err = frechet_distance(mu_a.view(), sigma.view(), mu_b.view(), wrong.view())
        .expect_err("a 4x4 sigma with 3-long mu must be refused");
    assert!(matches!(err, Error::Shape { .. }));
    assert!(err.to_string().contains("sigma of the second set"), "{err}");

    let mut nan_sigma = Array2::<f64>::eye(3);
    nan_sigma[[1, 1]] = f64::NAN;
    let err = frechet_distance(mu_a.view(), nan_sigma.view(), mu_b.view(), sigma.view())
        .expect_err("NaN statistics must be refused");
    assert!(err.to_string().contains("NaN"), "{err}");
    Ok(())
}

#[test]
fn covariance_is_unbiased_like_numpy() -> Result<()> {
    // np.cov([[1,2],[3,6],[5,7]], rowvar=False) = [[4, 5], [5, 7]]; mean [3, 5].
    let x = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 6.0, 5.0, 7.0]).reshape([3, 2]);
    let stats = FeatureStats::from_features(&x)?;
    assert_eq!(stats.mu.to_vec(), vec![3.0, 5.0]);
    assert_eq!(stats.sigma.iter().copied().collect::<Vec<_>>(), vec![4.0, 5.0, 5.0, 7.0]);
    let err = FeatureStats::from_features(&x.narrow(0, 0, 1)).expect_err("one row has no covariance");
    assert!(err.to_string().contains("N >= 2"), "{err}");
    Ok(())
}
