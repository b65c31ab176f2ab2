//! `.npz` statistics and feature files: pytorch-fid's own file loads here, ours round-trips and has
//! pytorch-fid's layout, and wrong files give errors naming the file and key
//! (fixtures: tests/fixtures/fid/pytorch_fid_stats.npz, stats_features.npz).
//!
//! Equivalent Python of the fixture:
//! ```python
//! act = features.astype(np.float64)
//! np.savez_compressed("pytorch_fid_stats.npz", mu=np.mean(act, axis=0), sigma=np.cov(act, rowvar=False))
//! ```

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{fixture_dir, relative_error, ScratchDir};
use fid_metrics::stats::{npz_keys, read_features_npz, read_npz_array, write_features_npz};
use fid_metrics::{Error, FeatureStats, Result};
use ndarray::{Array1, Array2};
use ndarray_npy::NpzWriter;
use tch::{Kind, Tensor};

fn stats_as_tensors(stats: &FeatureStats) -> (Tensor, Tensor) {
    let d = stats.dim() as i64;
    let mu = Tensor::from_slice(&stats.mu.to_vec());
    let sigma = Tensor::from_slice(&stats.sigma.iter().copied().collect::<Vec<_>>()).reshape([d, d]);
    (mu, sigma)
}

/// Compression method of the first member of a zip file (8 = deflate, 0 = stored).
fn first_member_compression(path: &Path) -> u16 {
    let bytes = std::fs::read(path).expect("read zip");
    assert_eq!(&bytes[0..4], b"PK\x03\x04", "{} is not a zip file", path.display());
    u16::from_le_bytes([bytes[8], bytes[9]])
}

#[test]
fn pytorch_fid_stats_file_loads_and_matches_our_statistics() -> Result<()> {
    let theirs = FeatureStats::read_npz(fixture_dir().join("pytorch_fid_stats.npz"))?;
    assert_eq!(theirs.dim(), 48);
    assert_eq!(theirs.sigma.dim(), (48, 48));
    let features = read_features_npz(fixture_dir().join("stats_features.npz"))?;
    assert_eq!(features.kind(), Kind::Float);
    assert_eq!(features.size(), vec![120, 48]);
    let ours = FeatureStats::from_features(&features)?;
    let (mu_ours, sigma_ours) = stats_as_tensors(&ours);
    let (mu_theirs, sigma_theirs) = stats_as_tensors(&theirs);
    let mu_err = relative_error(&mu_ours, &mu_theirs);
    let sigma_err = relative_error(&sigma_ours, &sigma_theirs);
    println!("mu rel {mu_err:.2e}, sigma rel {sigma_err:.2e}");
    assert!(mu_err <= 1e-12 && sigma_err <= 1e-12);
    Ok(())
}

#[test]
fn our_stats_file_round_trips_with_pytorch_fid_layout() -> Result<()> {
    let scratch = ScratchDir::new("stats-roundtrip");
    let ours = FeatureStats::read_npz(fixture_dir().join("pytorch_fid_stats.npz"))?;
    let path = scratch.path().join("ours.npz");
    ours.write_npz(&path)?;
    let back = FeatureStats::read_npz(&path)?;
    assert_eq!(back, ours, "write + read must be lossless");
    // Same layout as np.savez_compressed: members mu.npy and sigma.npy, deflated.
    let fixture = fixture_dir().join("pytorch_fid_stats.npz");
    let mut keys = npz_keys(&path)?;
    keys.sort();
    let mut fixture_keys = npz_keys(&fixture)?;
    fixture_keys.sort();
    assert_eq!(keys, fixture_keys);
    assert_eq!(keys, vec!["mu".to_string(), "sigma".to_string()]);
    assert_eq!(first_member_compression(&fixture), 8);
    assert_eq!(first_member_compression(&path), 8);
    pytorch_fid_reads(&path, &ours);
    Ok(())
}

/// The venv's python, where `cargo xtask setup` put it.
fn venv_python() -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Ok(libtorch) = std::env::var("LIBTORCH") {
        // Resolve the venv folder (not the interpreter link) so python finds its pyvenv.cfg.
        if let Ok(venv) = Path::new(&libtorch).join("../../../..").canonicalize() {
            candidates.push(venv.join("bin/python"));
        }
    }
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(Path::new(&home).join(".cache/ddss-rs/torch-2.11.0/bin/python"));
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// Loads `path` with pytorch-fid's own `.npz` code path when the venv has pytorch-fid.
fn pytorch_fid_reads(path: &Path, expected: &FeatureStats) {
    let Some(python) = venv_python() else {
        eprintln!("note: no venv python found; pytorch-fid load of our file not checked");
        return;
    };
    let script = "import sys, json\n\
try:\n    from pytorch_fid.fid_score import compute_statistics_of_path\n\
except ImportError as e:\n    print('NO_PYTORCH_FID', e); sys.exit(0)\n\
m, s = compute_statistics_of_path(sys.argv[1], None, 1, 2048, 'cpu')\n\
print(json.dumps({'mu_dtype': str(m.dtype), 'sigma_dtype': str(s.dtype), 'mu_shape': list(m.shape),\n\
 'sigma_shape': list(s.shape), 'mu_sum': float(m.sum()), 'sigma_sum': float(s.sum())}))\n";
    let output = Command::new(&python).arg("-c").arg(script).arg(path).output().expect("run the venv python");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "python failed: {}", String::from_utf8_lossy(&output.stderr));
    if stdout.contains("NO_PYTORCH_FID") {
        eprintln!("note: pytorch-fid not importable in the venv ({}); load of our file not checked", stdout.trim());
        return;
    }
    let seen: serde_json::Value = serde_json::from_str(stdout.trim()).expect("JSON from python");
    let d = expected.dim() as u64;
    assert_eq!(seen["mu_dtype"], "float64");
    assert_eq!(seen["sigma_dtype"], "float64");
    assert_eq!(seen["mu_shape"], serde_json::json!([d]));
    assert_eq!(seen["sigma_shape"], serde_json::json!([d, d]));
    let mu_sum: f64 = expected.mu.sum();
    let sigma_sum: f64 = expected.sigma.sum();
    assert!((seen["mu_sum"].as_f64().expect("mu_sum") - mu_sum).abs() <= 1e-9 * mu_sum.abs().max(1.0));
    assert!((seen["sigma_sum"].as_f64().expect("sigma_sum") - sigma_sum).abs() <= 1e-9 * sigma_sum.abs().max(1.0));
    println!("pytorch-fid loaded {}: {}", path.display(), stdout.trim());
}

#[test]
fn float32_stats_are_accepted_and_upcast() -> Result<()> {
    let scratch = ScratchDir::new("stats-f32");
    let path = scratch.path().join("f32.npz");
    let file = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
    let mut writer = NpzWriter::new(file);
    writer.add_array("mu", &Array1::<f32>::from_vec(vec![1.0, 2.0])).expect("write mu");
    writer.add_array("sigma", &Array2::<f32>::eye(2)).expect("write sigma");
    writer.finish().expect("finish npz");
    let stats = FeatureStats::read_npz(&path)?;
    assert_eq!(stats.mu.to_vec(), vec![1.0, 2.0]);
    assert_eq!(stats.sigma, Array2::<f64>::eye(2));
    Ok(())
}

#[test]
fn wrong_shape_and_missing_keys_give_clear_errors() {
    let scratch = ScratchDir::new("stats-errors");

    // sigma 3 x 2 for a 3-long mu.
    let path = scratch.path().join("bad_sigma.npz");
    let file = std::fs::File::create(&path).expect("create");
    let mut writer = NpzWriter::new_compressed(file);
    writer.add_array("mu", &Array1::<f64>::zeros(3)).expect("mu");
    writer.add_array("sigma", &Array2::<f64>::zeros((3, 2))).expect("sigma");
    writer.finish().expect("finish");
    let err = FeatureStats::read_npz(&path).expect_err("3x2 sigma must be refused");
    let msg = err.to_string();
    assert!(matches!(err, Error::BadArray { .. }), "{msg}");
    assert!(msg.contains("bad_sigma.npz") && msg.contains("`sigma`") && msg.contains("[3, 2]"), "{msg}");

    // mu as a matrix.
    let path = scratch.path().join("bad_mu.npz");
    let file = std::fs::File::create(&path).expect("create");
    let mut writer = NpzWriter::new(file);
    writer.add_array("mu", &Array2::<f64>::zeros((2, 2))).expect("mu");
    writer.add_array("sigma", &Array2::<f64>::zeros((2, 2))).expect("sigma");
    writer.finish().expect("finish");
    let msg = FeatureStats::read_npz(&path).expect_err("2-D mu").to_string();
    assert!(msg.contains("bad_mu.npz") && msg.contains("`mu`") && msg.contains("[2, 2]"), "{msg}");

    // Keys of another tool.
    let path = scratch.path().join("other_keys.npz");
    let file = std::fs::File::create(&path).expect("create");
    let mut writer = NpzWriter::new(file);
    writer.add_array("mean", &Array1::<f64>::zeros(3)).expect("mean");
    writer.add_array("cov", &Array2::<f64>::zeros((3, 3))).expect("cov");
    writer.finish().expect("finish");
    let err = FeatureStats::read_npz(&path).expect_err("no mu key");
    let msg = err.to_string();
    assert!(matches!(err, Error::MissingKey { .. }), "{msg}");
    assert!(msg.contains("other_keys.npz") && msg.contains("`mu`") && msg.contains("mean, cov"), "{msg}");

    // Integer data under the right key.
    let path = scratch.path().join("int_mu.npz");
    let file = std::fs::File::create(&path).expect("create");
    let mut writer = NpzWriter::new(file);
    writer.add_array("mu", &Array1::<i64>::zeros(3)).expect("mu");
    writer.add_array("sigma", &Array2::<f64>::zeros((3, 3))).expect("sigma");
    writer.finish().expect("finish");
    let msg = FeatureStats::read_npz(&path).expect_err("integer mu").to_string();
    assert!(msg.contains("int_mu.npz") && msg.contains("`mu`") && msg.contains("float64"), "{msg}");

    // Not a zip at all, and a missing file.
    let path = scratch.path().join("not_npz.npz");
    std::fs::write(&path, b"hello").expect("write");
    let msg = FeatureStats::read_npz(&path).expect_err("not a zip").to_string();
    assert!(msg.contains("not_npz.npz") && msg.contains("not an .npz"), "{msg}");
    let msg = FeatureStats::read_npz(scratch.path().join("absent.npz")).expect_err("missing file").to_string();
    assert!(msg.contains("absent.npz"), "{msg}");

    // A features file needs `features` [N, d].
    let path = scratch.path().join("features_1d.npz");
    let file = std::fs::File::create(&path).expect("create");
    let mut writer = NpzWriter::new(file);
    writer.add_array("features", &Array1::<f32>::zeros(5)).expect("features");
    writer.finish().expect("finish");
    let msg = read_features_npz(&path).expect_err("1-D features").to_string();
    assert!(msg.contains("features_1d.npz") && msg.contains("`features`") && msg.contains("[5]"), "{msg}");
    let msg = read_features_npz(fixture_dir().join("pytorch_fid_stats.npz"))
        .expect_err("a stats file has no features")
        .to_string();
    assert!(msg.contains("`features`") && msg.contains("mu"), "{msg}");
}

#[test]
fn features_file_round_trips_in_f32_and_f64() -> Result<()> {
    let scratch = ScratchDir::new("features-roundtrip");
    let features = Tensor::from_slice(&[0.5f32, 1.5, -2.0, 3.25, 0.0, 7.0]).reshape([3, 2]);
    let path = scratch.path().join("f32.npz");
    write_features_npz(&path, &features)?;
    let back = read_features_npz(&path)?;
    assert_eq!(back.kind(), Kind::Float);
    assert!(back.equal(&features));
    let features64 = features.to_kind(Kind::Double);
    let path = scratch.path().join("f64.npz");
    write_features_npz(&path, &features64)?;
    let back = read_features_npz(&path)?;
    assert_eq!(back.kind(), Kind::Double);
    assert!(back.equal(&features64));
    Ok(())
}

/// `.npy` bytes whose header declares float64 data of `shape` (a Python tuple) but which hold only
/// `data_bytes` zero bytes after the header.
fn lying_npy(shape: &str, data_bytes: usize) -> Vec<u8> {
    let header = format!("{{'descr': '<f8', 'fortran_order': False, 'shape': {shape}, }}");
    let padded = format!("{header:<width$}\n", width = 128 - 10 - 1);
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(padded.len() as u16).to_le_bytes());
    bytes.extend_from_slice(padded.as_bytes());
    bytes.resize(bytes.len() + data_bytes, 0);
    bytes
}

/// Writes a zip of `members` (name, bytes, compression) to `path`, by hand.
fn write_zip(path: &Path, members: &[(&str, Vec<u8>, zip::CompressionMethod)]) {
    use std::io::Write;
    let mut writer = zip::ZipWriter::new(std::fs::File::create(path).expect("create zip"));
    for (name, bytes, method) in members {
        let options = zip::write::SimpleFileOptions::default().compression_method(*method);
        writer.start_file(*name, options).expect("start member");
        writer.write_all(bytes).expect("write member");
    }
    writer.finish().expect("finish zip");
}

fn npy_of(array: &ndarray::ArrayD<f64>) -> Vec<u8> {
    use ndarray_npy::WriteNpyExt;
    let mut bytes = Vec::new();
    array.write_npy(&mut bytes).expect("npy bytes");
    bytes
}

#[test]
fn npz_member_declaring_more_data_than_it_holds_is_refused_before_allocating() {
    use zip::CompressionMethod::{Deflated, Stored};
    let scratch = ScratchDir::new("stats-lying-npz");
    let mu = npy_of(&ndarray::ArrayD::zeros(ndarray::IxDyn(&[2])));
    let sigma = npy_of(&ndarray::ArrayD::zeros(ndarray::IxDyn(&[2, 2])));
    // 80 GB declared, 1024 bytes held: stored and deflated, in mu or in sigma.
    for (name, method) in [("stored.npz", Stored), ("deflated.npz", Deflated)] {
        let path = scratch.path().join(name);
        let lying = lying_npy("(100000, 100000)", 1024);
        write_zip(&path, &[("mu.npy", mu.clone(), method), ("sigma.npy", lying, method)]);
        let msg = FeatureStats::read_npz(&path).expect_err("lying sigma").to_string();
        let needles = [name, "member sigma.npy", "declares shape (100000, 100000)", "80000000000 bytes", "holds 1024"];
        assert!(needles.iter().all(|n| msg.contains(n)), "{msg}");
    }
    let path = scratch.path().join("lying_mu.npz");
    write_zip(&path, &[("mu.npy", lying_npy("(100000000000,)", 8), Stored), ("sigma.npy", sigma.clone(), Stored)]);
    let msg = FeatureStats::read_npz(&path).expect_err("lying mu").to_string();
    assert!(msg.contains("lying_mu.npz") && msg.contains("member mu.npy") && msg.contains("(100000000000,)"), "{msg}");
    // A product beyond 2^64 bytes.
    let path = scratch.path().join("overflow.npz");
    write_zip(
        &path,
        &[("mu.npy", mu.clone(), Stored), ("sigma.npy", lying_npy("(4294967296, 4294967296)", 0), Stored)],
    );
    let msg = FeatureStats::read_npz(&path).expect_err("overflowing sigma").to_string();
    assert!(msg.contains("overflow.npz") && msg.contains("more than 2^64"), "{msg}");

    // The feature and generic array readers check the same way.
    let path = scratch.path().join("features.npz");
    write_zip(&path, &[("features.npy", lying_npy("(50000, 2048)", 64), Deflated)]);
    let msg = read_features_npz(&path).expect_err("lying features").to_string();
    assert!(
        msg.contains("features.npz") && msg.contains("member features.npy") && msg.contains("(50000, 2048)"),
        "{msg}"
    );
    let msg = read_npz_array::<f64>(&path, "features").expect_err("lying features").to_string();
    assert!(msg.contains("features.npz") && msg.contains("declares shape (50000, 2048)"), "{msg}");
    // A member named without `.npy` is found and checked too, and a cut header is an error.
    let path = scratch.path().join("bare.npz");
    write_zip(&path, &[("features", lying_npy("(50000, 2048)", 64), Stored)]);
    let msg = read_features_npz(&path).expect_err("lying bare member").to_string();
    assert!(msg.contains("bare.npz") && msg.contains("member features declares"), "{msg}");
    let path = scratch.path().join("cut.npz");
    write_zip(&path, &[("features.npy", lying_npy("(5, 2)", 0)[..40].to_vec(), Stored)]);
    let msg = read_features_npz(&path).expect_err("cut header").to_string();
    assert!(msg.contains("cut.npz") && msg.contains("truncated header"), "{msg}");

    // A zip directory claiming a stored member far larger than the file.
    let path = scratch.path().join("big_directory.npz");
    write_zip(&path, &[("mu.npy", mu.clone(), Stored), ("sigma.npy", sigma.clone(), Stored)]);
    let mut bytes = std::fs::read(&path).expect("read zip");
    let central = bytes.windows(4).rposition(|w| w == b"PK\x01\x02").expect("central directory entry");
    bytes[central + 24..central + 28].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
    std::fs::write(&path, &bytes).expect("write zip");
    let msg = FeatureStats::read_npz(&path).expect_err("directory lie").to_string();
    assert!(msg.contains("big_directory.npz") && msg.contains("sigma.npy") && msg.contains("cannot be"), "{msg}");

    // Well-formed hand-made files still load.
    let path = scratch.path().join("good.npz");
    write_zip(&path, &[("mu.npy", mu, Stored), ("sigma.npy", sigma, Deflated)]);
    let stats = FeatureStats::read_npz(&path).expect("hand-made stats load");
    assert_eq!(stats.dim(), 2);
}
