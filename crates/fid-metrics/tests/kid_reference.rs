//! KID against the reference estimator (torch-fidelity's `metric_kid.py`, written out in numpy in
//! tests/scripts/gen_fid_fixtures.py) on fixed feature sets, and the differentiable KID loss.
//!
//! Equivalent Python for one subset of size m:
//! ```python
//! k = lambda x, y: (x @ y.T / x.shape[1] + 1) ** 3
//! mmd2 = ((k(x,x).sum() - trace(k(x,x)) + k(y,y).sum() - trace(k(y,y))) / (m*(m-1))
//!         - 2 * k(x,y).sum() / m**2)
//! kid_mean, kid_std = np.mean(mmds), np.std(mmds)
//! ```

mod common;

use common::{read_json, read_tensors, relative_diff};
use fid_metrics::kid::{
    draw_subsets, effective_subset_size, kid, kid_loss, kid_on_subsets, mmd2_unbiased, KidLoss, KidOptions, KidSubset,
};
use fid_metrics::Result;
use tch::{Device, Kind, Tensor};

fn case<'a>(meta: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    meta["cases"]
        .as_array()
        .expect("cases list")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no KID case {name}"))
}

fn index_rows(t: &Tensor) -> Vec<Vec<usize>> {
    let rows = t.size()[0];
    (0..rows)
        .map(|r| Vec::<i64>::try_from(t.get(r)).expect("index row").into_iter().map(|i| i as usize).collect())
        .collect()
}

#[test]
fn kid_with_subset_size_n_and_one_subset_matches_reference() -> Result<()> {
    let tensors = read_tensors("kid_reference.safetensors");
    let meta = read_json("kid_reference.json");
    let expected = case(&meta, "full_equal");
    let (a, b) = (&tensors["full_equal.features_a"], &tensors["full_equal.features_b"]);
    // subset_size above the set size is capped at N = 50; one subset is then the whole set.
    let options = KidOptions { num_subsets: 1, subset_size: 1000, seed: 123 };
    let estimate = kid(a, b, &options)?;
    let want = expected["kid_mean"].as_f64().expect("kid_mean");
    let rel = relative_diff(estimate.mean, want);
    println!("full_equal: ours {} reference {want} rel {rel:.2e}", estimate.mean);
    assert!(rel <= 1e-6, "KID {} vs reference {want}", estimate.mean);
    assert_eq!(estimate.std, 0.0);
    assert_eq!(estimate.subset_size, 50);
    // The full-set estimator gives the same number.
    let full = mmd2_unbiased(a, b)?;
    assert!(relative_diff(full, want) <= 1e-6, "{full} vs {want}");
    Ok(())
}

#[test]
fn kid_on_saved_subsets_matches_reference_mean_and_std() -> Result<()> {
    let tensors = read_tensors("kid_reference.safetensors");
    let meta = read_json("kid_reference.json");
    let expected = case(&meta, "subsets");
    let rows_a = index_rows(&tensors["subsets.indices_a"]);
    let rows_b = index_rows(&tensors["subsets.indices_b"]);
    let subsets: Vec<KidSubset> =
        rows_a.into_iter().zip(rows_b).map(|(indices_a, indices_b)| KidSubset { indices_a, indices_b }).collect();
    let (a, b) = (&tensors["subsets.features_a"], &tensors["subsets.features_b"]);
    let estimate = kid_on_subsets(a, b, &subsets)?;
    let want_mean = expected["kid_mean"].as_f64().expect("kid_mean");
    let want_std = expected["kid_std"].as_f64().expect("kid_std");
    println!("subsets: mean {} vs {want_mean}, std {} vs {want_std}", estimate.mean, estimate.std);
    assert!(relative_diff(estimate.mean, want_mean) <= 1e-6);
    assert!(relative_diff(estimate.std, want_std) <= 1e-6);
    assert_eq!((estimate.num_subsets, estimate.subset_size), (5, 30));
    // Full-set value of the same sets (sizes 80 and 70).
    let full = mmd2_unbiased(a, b)?;
    let want_full = expected["mmd2_full"].as_f64().expect("mmd2_full");
    assert!(relative_diff(full, want_full) <= 1e-6, "{full} vs {want_full}");
    Ok(())
}

#[test]
fn full_set_mmd_with_unequal_sizes_matches_reference() -> Result<()> {
    let tensors = read_tensors("kid_reference.safetensors");
    let meta = read_json("kid_reference.json");
    let want = case(&meta, "unequal")["mmd2_full"].as_f64().expect("mmd2_full");
    let got = mmd2_unbiased(&tensors["unequal.features_a"], &tensors["unequal.features_b"])?;
    assert!(relative_diff(got, want) <= 1e-6, "{got} vs {want}");
    Ok(())
}

#[test]
fn random_subsets_are_deterministic_and_capped() -> Result<()> {
    let tensors = read_tensors("kid_reference.safetensors");
    let (a, b) = (&tensors["subsets.features_a"], &tensors["subsets.features_b"]);
    let options = KidOptions { num_subsets: 20, subset_size: 40, seed: 7 };
    let first = kid(a, b, &options)?;
    let again = kid(a, b, &options)?;
    assert_eq!(first, again);
    let other_seed = kid(a, b, &KidOptions { seed: 8, ..options.clone() })?;
    assert_ne!(first.mean, other_seed.mean);
    assert_eq!(first.subset_size, 40);
    assert!(first.std > 0.0);
    // Defaults: 100 subsets of 1000, capped at the smaller set (70 rows here).
    let defaults = KidOptions::default();
    assert_eq!((defaults.num_subsets, defaults.subset_size), (100, 1000));
    assert_eq!(effective_subset_size(80, 70, &defaults), 70);
    let subsets = draw_subsets(80, 70, &defaults)?;
    assert_eq!(subsets.len(), 100);
    for subset in &subsets {
        let mut rows = subset.indices_a.clone();
        rows.sort_unstable();
        rows.dedup();
        assert_eq!(rows.len(), 70, "rows of a subset are drawn without replacement");
    }
    // Too small a set is refused with a message naming the sizes.
    let err = kid(&a.narrow(0, 0, 1), b, &defaults).expect_err("one row is too few");
    assert!(err.to_string().contains("at least 2"), "{err}");
    Ok(())
}

#[test]
fn differentiable_kid_equals_the_f64_kid_on_full_sets() -> Result<()> {
    let tensors = read_tensors("kid_reference.safetensors");
    for name in ["full_equal", "subsets", "unequal"] {
        let generated = tensors[&format!("{name}.features_a")].to_kind(Kind::Float);
        let real = &tensors[&format!("{name}.features_b")];
        let reference = mmd2_unbiased(&generated, real)?;
        let loss = KidLoss::new(real)?;
        let value = loss.loss(&generated)?.double_value(&[]);
        let rel = relative_diff(value, reference);
        println!("{name}: loss {value} f64 KID {reference} rel {rel:.2e}");
        assert!(rel <= 1e-12, "{name}: {value} vs {reference}");
        let one_shot = kid_loss(&generated, real)?.double_value(&[]);
        assert!(relative_diff(one_shot, reference) <= 1e-12);
        // f32 arithmetic on the generated side stays close.
        let loss_f32 = KidLoss::with_kind(real, Kind::Float)?.loss(&generated)?;
        assert_eq!(loss_f32.kind(), Kind::Float);
        assert!(relative_diff(loss_f32.double_value(&[]), reference) <= 1e-4);
    }
    Ok(())
}

#[test]
fn differentiable_kid_gradient_matches_central_differences() -> Result<()> {
    // Tiny case in f64: 4 generated and 5 real 3-dimensional features.
    let generated_values = [0.3, -1.2, 0.8, 1.5, 0.1, -0.4, -0.6, 0.9, 1.1, 0.2, 0.7, -1.3];
    let real_values = [1.0, 0.5, -0.2, -0.3, 0.4, 1.2, 0.8, -0.9, 0.3, 0.0, 1.4, -0.5, -1.1, 0.6, 0.9];
    let options = (Kind::Double, Device::Cpu);
    let generated = Tensor::from_slice(&generated_values).reshape([4, 3]).to_kind(options.0).set_requires_grad(true);
    let real = Tensor::from_slice(&real_values).reshape([5, 3]);
    let loss = KidLoss::new(&real)?;
    let value = loss.loss(&generated)?;
    value.backward();
    let autograd = Vec::<f64>::try_from(generated.grad().reshape([-1]))?;
    let step = 1e-6;
    for (i, &analytic) in autograd.iter().enumerate() {
        let mut plus = generated_values;
        let mut minus = generated_values;
        plus[i] += step;
        minus[i] -= step;
        let eval = |values: &[f64; 12]| -> Result<f64> {
            let t = Tensor::from_slice(values).reshape([4, 3]);
            Ok(loss.loss(&t)?.double_value(&[]))
        };
        let numeric = (eval(&plus)? - eval(&minus)?) / (2.0 * step);
        let err = (analytic - numeric).abs() / numeric.abs().max(1e-3);
        assert!(err < 1e-6, "d/dg[{i}]: autograd {analytic} vs finite difference {numeric}");
    }
    Ok(())
}

/// More real features than one kernel block (2048 rows): the blocked real-real term must equal
/// the direct computation (a regression test: the diagonal of later blocks was taken wrongly).
#[test]
fn kid_loss_real_term_is_exact_beyond_one_block() -> Result<()> {
    tch::manual_seed(7);
    let real = Tensor::randn([2500, 4], (Kind::Double, Device::Cpu));
    let generated = Tensor::randn([30, 4], (Kind::Double, Device::Cpu)) + 0.1;
    let blocked = fid_metrics::kid::KidLoss::new(&real)?.loss(&generated)?.double_value(&[]);
    let direct = fid_metrics::kid::mmd2_unbiased(&generated, &real)?;
    let k_rr = fid_metrics::kid::polynomial_kernel(&real, &real)?;
    let n = 2500.0;
    let brute_real = (k_rr.sum(Kind::Double).double_value(&[])
        - k_rr.diagonal(0, 0, 1).sum(Kind::Double).double_value(&[]))
        / (n * (n - 1.0));
    let real_term = fid_metrics::kid::KidLoss::new(&real)?.real_term();
    assert!((real_term - brute_real).abs() <= 1e-9 * brute_real.abs(), "{real_term} vs {brute_real}");
    assert!((blocked - direct).abs() <= 1e-9 * direct.abs().max(1e-12), "{blocked} vs {direct}");
    Ok(())
}
