//! Domain classifiers: save/load round trip, input gradients, seeded training, the feature-set
//! opener, and the two shipped Fashion-MNIST classifiers (models/fmnist-classifier-{a,b}).

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use common::ScratchDir;
use fid_metrics::classifier::{sidecar_path, train_classifier, ClassifierArch, DomainClassifier, TrainOptions};
use fid_metrics::features::{open_extractor, FeatureSpec};
use fid_metrics::{Error, FeatureExtractor, Result};
use tch::{Device, Kind, Tensor};

const FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";

fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models")
}

/// Deterministic samples in [-1, 1] (a smooth pattern, not noise, so activations are varied).
fn pattern_batch(n: i64, channels: i64, size: i64) -> Tensor {
    let count = n * channels * size * size;
    let values: Vec<f32> = (0..count).map(|i| (i as f32 * 0.37).sin() * 0.9 + (i as f32 * 0.011).cos() * 0.1).collect();
    Tensor::from_slice(&values).reshape([n, channels, size, size])
}

#[test]
fn save_and_load_give_identical_features_for_both_architectures() -> Result<()> {
    let scratch = ScratchDir::new("classifier-roundtrip");
    for arch in [ClassifierArch::A, ClassifierArch::B] {
        let fresh = DomainClassifier::new(arch, 7, Device::Cpu)?;
        let path = scratch.path().join(format!("net-{arch}.safetensors"));
        fresh.save(&path)?;
        assert!(sidecar_path(&path).is_file(), "sidecar of {arch} not written");
        let loaded = DomainClassifier::load(&path, Device::Cpu)?;
        assert_eq!(loaded.info(), fresh.info());
        assert_eq!(loaded.name(), format!("classifier:net-{arch}"));
        assert_eq!(loaded.dim(), arch.feature_dim());
        let x = pattern_batch(5, 1, 28);
        let before = tch::no_grad(|| fresh.features(&x))?;
        let after = tch::no_grad(|| loaded.features(&x))?;
        assert_eq!(before.size(), vec![5, arch.feature_dim() as i64]);
        assert_eq!(before.kind(), Kind::Float);
        assert!(before.equal(&after), "features of arch {arch} changed across save/load");
        // Another seed gives other weights.
        let other = DomainClassifier::new(arch, 8, Device::Cpu)?;
        assert!(!tch::no_grad(|| other.features(&x))?.equal(&before));
    }
    Ok(())
}

#[test]
fn missing_or_corrupt_files_are_errors_naming_them() -> Result<()> {
    let scratch = ScratchDir::new("classifier-errors");
    let missing = scratch.path().join("nothing.safetensors");
    let err = DomainClassifier::load(&missing, Device::Cpu).expect_err("missing file must fail").to_string();
    assert!(err.contains("nothing.safetensors"), "{err}");

    let net = DomainClassifier::new(ClassifierArch::A, 0, Device::Cpu)?;
    let path = scratch.path().join("net.safetensors");
    net.save(&path)?;
    std::fs::remove_file(sidecar_path(&path)).expect("remove sidecar");
    let err = DomainClassifier::load(&path, Device::Cpu).expect_err("no sidecar must fail").to_string();
    assert!(err.contains("net.json"), "{err}");

    net.save(&path)?;
    std::fs::write(sidecar_path(&path), "{\"format\": 3}").expect("write");
    let err = DomainClassifier::load(&path, Device::Cpu).expect_err("bad sidecar must fail").to_string();
    assert!(err.contains("net.json"), "{err}");

    net.save(&path)?;
    std::fs::write(&path, b"definitely not safetensors").expect("write");
    let err = DomainClassifier::load(&path, Device::Cpu).expect_err("corrupt weights must fail").to_string();
    assert!(err.contains("net.safetensors"), "{err}");

    // Weights of arch a under a sidecar that claims arch b.
    net.save(&path)?;
    let text = std::fs::read_to_string(sidecar_path(&path)).expect("read");
    let claimed_b =
        text.replace("\"arch\": \"a\"", "\"arch\": \"b\"").replace("\"feature_dim\": 128", "\"feature_dim\": 256");
    std::fs::write(sidecar_path(&path), claimed_b).expect("write");
    let err = DomainClassifier::load(&path, Device::Cpu).expect_err("mismatched arch must fail").to_string();
    assert!(err.contains("net.safetensors") && err.contains("arch `b`"), "{err}");
    Ok(())
}

#[test]
fn features_are_differentiable_with_respect_to_the_input() -> Result<()> {
    // Arch b is smooth (GroupNorm, SiLU, mean pooling), so a central difference along a direction
    // must match the gradient's directional derivative; arch a (ReLU, max-pool) must at least
    // pass a non-zero, finite gradient back, also through the 3-channel and resize paths.
    let net_b = DomainClassifier::new(ClassifierArch::B, 1, Device::Cpu)?;
    let x = pattern_batch(2, 1, 28).set_requires_grad(true);
    let weights = pattern_batch(1, 1, 16).reshape([256]);
    let objective =
        |input: &Tensor| -> Result<Tensor> { Ok(net_b.features(input)?.matmul(&weights).sum(Kind::Double)) };
    let value = objective(&x)?;
    let grads = Tensor::run_backward(&[&value], &[&x], false, false);
    let grad = &grads[0];
    let direction = pattern_batch(2, 1, 28).flip([3]);
    let analytic = (grad * &direction).sum(Kind::Double).double_value(&[]);
    let step = 1e-2;
    let numeric = tch::no_grad(|| -> Result<f64> {
        let plus = objective(&(&x + &direction * step))?.double_value(&[]);
        let minus = objective(&(&x - &direction * step))?.double_value(&[]);
        Ok((plus - minus) / (2.0 * step))
    })?;
    println!("directional derivative: autograd {analytic:.6}, central difference {numeric:.6}");
    assert!(analytic.abs() > 1e-3, "gradient is (nearly) zero: {analytic}");
    assert!((analytic - numeric).abs() <= 2e-2 * numeric.abs().max(1e-3), "{analytic} vs {numeric}");

    let net_a = DomainClassifier::new(ClassifierArch::A, 1, Device::Cpu)?;
    for (channels, size) in [(1, 28), (3, 28), (1, 8), (3, 32)] {
        let x = pattern_batch(3, channels, size).set_requires_grad(true);
        let features = net_a.features(&x)?;
        assert_eq!(features.size(), vec![3, 128]);
        let total = features.sum(Kind::Float);
        let grads = Tensor::run_backward(&[&total], &[&x], false, false);
        let norm = grads[0].norm().double_value(&[]);
        assert_eq!(grads[0].size(), x.size());
        assert!(norm.is_finite() && norm > 0.0, "no input gradient for {channels}x{size}x{size}: {norm}");
    }
    Ok(())
}

/// 4 classes of 14x14 images: a bright square in one of the four quadrants, plus a pattern.
fn quadrant_data(n: usize) -> (Tensor, Vec<u8>) {
    let labels: Vec<u8> = (0..n).map(|i| (i % 4) as u8).collect();
    let mut values = vec![-1.0f32; n * 14 * 14];
    for (i, &label) in labels.iter().enumerate() {
        let (row0, col0) = (usize::from(label / 2) * 7, usize::from(label % 2) * 7);
        for r in 0..7 {
            for c in 0..7 {
                values[i * 196 + (row0 + r) * 14 + col0 + c] = 0.5 + 0.4 * (((i + r * 3 + c) as f32) * 0.7).sin();
            }
        }
    }
    (Tensor::from_slice(&values).reshape([n as i64, 1, 14, 14]), labels)
}

#[test]
fn training_is_seeded_and_learns() -> Result<()> {
    let (images, labels) = quadrant_data(96);
    let options = TrainOptions {
        arch: ClassifierArch::A,
        seed: 5,
        epochs: 3,
        batch_size: 16,
        learning_rate: 2e-3,
        augment: false,
    };
    let mut steps = 0;
    let first = train_classifier(&images, &labels, &options, Device::Cpu, |state| {
        steps = state.step;
        assert!(state.epoch_loss.is_finite());
    })?;
    assert_eq!(steps, 18, "3 epochs of 96 images in batches of 16");
    let second = train_classifier(&images, &labels, &options, Device::Cpu, |_| {})?;
    for ((name, a), (_, b)) in first.named_tensors().iter().zip(second.named_tensors().iter()) {
        assert!(a.equal(b), "tensor {name} differs between two runs with the same seed");
    }
    let accuracy = first.accuracy(&images, &labels, 40)?;
    assert!(accuracy >= 0.9, "training accuracy {accuracy} on a trivially separable set");
    let reseeded = train_classifier(&images, &labels, &TrainOptions { seed: 6, ..options }, Device::Cpu, |_| {})?;
    assert!(!reseeded.named_tensors()[0].1.equal(&first.named_tensors()[0].1));
    // Bad labels are an error, not a panic.
    let err = train_classifier(&images, &labels[..10], &options, Device::Cpu, |_| {}).expect_err("label count");
    assert!(matches!(err, Error::Invalid { .. }), "{err}");
    Ok(())
}

#[test]
fn feature_specs_open_classifiers_and_reject_unknown_values() -> Result<()> {
    assert_eq!(FeatureSpec::parse("inception")?, FeatureSpec::Inception);
    let path = models_dir().join("fmnist-classifier-a.safetensors");
    let spec = FeatureSpec::parse(path.to_str().expect("utf-8 path"))?;
    assert_eq!(spec.name(), "classifier:fmnist-classifier-a");
    let extractor = open_extractor(path.to_str().expect("utf-8 path"), Device::Cpu)?;
    assert_eq!(extractor.name(), "classifier:fmnist-classifier-a");
    assert_eq!(extractor.dim(), 128);
    let err = open_extractor("inceptionv4", Device::Cpu).err().expect("unknown spec must fail").to_string();
    assert!(err.contains("inceptionv4"), "{err}");
    let err = open_extractor("/nonexistent/clf.safetensors", Device::Cpu).err().expect("missing file").to_string();
    assert!(err.contains("/nonexistent/clf.safetensors"), "{err}");
    Ok(())
}

#[test]
fn shipped_classifiers_reach_90_percent_and_differ_in_architecture() -> Result<()> {
    let a = DomainClassifier::load(models_dir().join("fmnist-classifier-a.safetensors"), Device::Cpu)?;
    let b = DomainClassifier::load(models_dir().join("fmnist-classifier-b.safetensors"), Device::Cpu)?;
    assert_eq!((a.arch(), a.dim()), (ClassifierArch::A, 128));
    assert_eq!((b.arch(), b.dim()), (ClassifierArch::B, 256));
    assert_ne!(a.info().seed, b.info().seed, "the evaluation network must be trained with another seed");
    let names =
        |net: &DomainClassifier| -> BTreeSet<String> { net.named_tensors().into_iter().map(|(n, _)| n).collect() };
    assert!(names(&a).contains("fc.weight") && !names(&b).contains("fc.weight"));
    assert!(names(&b).contains("blocks.0.norm.weight") && !names(&a).contains("blocks.0.norm.weight"));
    for (file, net) in [("a", &a), ("b", &b)] {
        let size = std::fs::metadata(models_dir().join(format!("fmnist-classifier-{file}.safetensors")))
            .expect("weights file")
            .len();
        assert!(size < 2_000_000, "fmnist-classifier-{file}.safetensors is {size} bytes");
        assert!(net.info().test_accuracy.unwrap_or(0.0) >= 0.9, "{:?}", net.info());
    }

    let dir = Path::new(FASHION_MNIST);
    if !dir.join("t10k-images-idx3-ubyte.gz").is_file() {
        println!("skipping the accuracy check: {FASHION_MNIST} is missing");
        return Ok(());
    }
    let images = fid_metrics::data::load_idx_images(dir.join("t10k-images-idx3-ubyte.gz"))?.narrow(0, 0, 2000);
    let labels = fid_metrics::data::load_idx_labels(dir.join("t10k-labels-idx1-ubyte.gz"))?;
    for (file, net) in [("a", &a), ("b", &b)] {
        let accuracy = net.accuracy(&images, &labels[..2000], 500)?;
        println!("fmnist-classifier-{file}: accuracy {accuracy:.4} on the first 2000 test images");
        assert!(accuracy >= 0.9, "fmnist-classifier-{file}: accuracy {accuracy}");
    }
    Ok(())
}
