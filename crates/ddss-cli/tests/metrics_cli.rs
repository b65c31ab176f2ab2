//! End-to-end tests of `ddss-cli stats`, `fid`, `eval` and `train-classifier` on tiny data (CPU,
//! seconds). Feature sets come from the shipped classifier models/fmnist-classifier-a.safetensors,
//! so no Inception weights are needed.

mod common;
use common::*;

use std::path::Path;
use std::process::{Command, Output};

use fid_metrics::stats::{npz_keys, read_features_npz};
use fid_metrics::FeatureStats;
use ndarray::{Array1, Array2};

/// The single JSON object a `--json` command prints on stdout.
fn stdout_json(out: &Output) -> serde_json::Map<String, serde_json::Value> {
    let text = String::from_utf8_lossy(&out.stdout);
    match serde_json::from_str::<serde_json::Value>(text.trim()) {
        Ok(serde_json::Value::Object(map)) => map,
        other => panic!("stdout is not one JSON object: {other:?}\n{text}"),
    }
}

fn keys(map: &serde_json::Map<String, serde_json::Value>) -> Vec<&str> {
    let mut keys: Vec<&str> = map.keys().map(String::as_str).collect();
    keys.sort_unstable();
    keys
}

fn classifier_a() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/fmnist-classifier-a.safetensors")
        .to_string_lossy()
        .to_string()
}

/// A deterministic grey pixel value for image `i` at (x, y).
fn pixel(i: u32, x: u32, y: u32) -> u8 {
    ((i * 37 + y * 11 + x * 5 + (x * y) % 7 * 20) % 256) as u8
}

/// `count` grey PNGs of `size` x `size` in `dir`.
fn write_png_folder(dir: &Path, count: u32, size: u32) {
    std::fs::create_dir_all(dir).expect("image dir");
    for i in 0..count {
        let image = image::GrayImage::from_fn(size, size, |x, y| image::Luma([pixel(i, x, y)]));
        image.save(dir.join(format!("{i:03}.png"))).expect("write png");
    }
}

/// An uncompressed IDX label file.
fn write_idx_labels(path: &Path, labels: &[u8]) {
    let mut bytes = vec![0u8, 0, 8, 1];
    bytes.extend((labels.len() as u32).to_be_bytes());
    bytes.extend_from_slice(labels);
    std::fs::write(path, bytes).expect("write idx labels");
}

#[test]
fn stats_writes_pytorch_fid_stats_plus_features() {
    let dir = temp_dir("stats");
    let images = dir.join("images");
    write_png_folder(&images, 10, 12);
    let out = dir.join("stats.npz");
    run_ok(
        bin()
            .args(["--quiet", "stats", "--device", "cpu", "--features", &classifier_a()])
            .arg(&images)
            .arg("--out")
            .arg(&out),
    );
    let mut names = npz_keys(&out).expect("npz keys");
    names.sort();
    assert_eq!(names, ["feature_set", "features", "mu", "sigma"]);
    let stats = FeatureStats::read_npz(&out).expect("read stats");
    let features = read_features_npz(&out).expect("read features");
    assert_eq!(features.size(), vec![10, 128]);
    assert_eq!(features.kind(), tch::Kind::Float);
    assert_eq!(stats.dim(), 128);
    let recomputed = FeatureStats::from_features(&features).expect("stats");
    let max_diff = stats.mu.iter().zip(recomputed.mu.iter()).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(max_diff <= 1e-12, "mu differs from the stored features' mean by {max_diff}");
    assert!(stats.sigma.iter().zip(recomputed.sigma.iter()).all(|(a, b)| (a - b).abs() <= 1e-12));

    // --num keeps the first N images: their features equal the first rows of the full run.
    let first4 = dir.join("first4.npz");
    run_ok(
        bin()
            .args(["--quiet", "stats", "--device", "cpu", "--num", "4", "--batch", "3", "--features", &classifier_a()])
            .arg(&images)
            .arg("--out")
            .arg(&first4),
    );
    let head = read_features_npz(&first4).expect("read features");
    assert_eq!(head.size(), vec![4, 128]);
    let diff = (head - features.narrow(0, 0, 4)).abs().max().double_value(&[]);
    assert!(diff <= 1e-5, "features of the first 4 images differ by {diff}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn fid_of_a_source_with_itself_is_zero_and_json_has_four_keys() {
    let dir = temp_dir("fid-self");
    let images = dir.join("images");
    write_png_folder(&images, 12, 28);
    let out = run_ok(
        bin()
            .args(["--quiet", "fid", "--json", "--device", "cpu", "--features", &classifier_a()])
            .arg(&images)
            .arg(&images),
    );
    let report = stdout_json(&out);
    assert_eq!(keys(&report), ["features", "fid", "kid_mean", "kid_std"]);
    let fid = report["fid"].as_f64().expect("fid is a number");
    assert!((0.0..=1e-6).contains(&fid), "FID of a set with itself: {fid}");
    assert!(report["kid_mean"].is_f64() && report["kid_std"].is_f64(), "{report:?}");
    assert_eq!(report["features"], "classifier:fmnist-classifier-a");

    // Against the stats file of the same images: the same FID; against pytorch-fid's two-key
    // layout: KID is null.
    let stats = dir.join("stats.npz");
    run_ok(
        bin()
            .args(["--quiet", "stats", "--device", "cpu", "--features", &classifier_a()])
            .arg(&images)
            .arg("--out")
            .arg(&stats),
    );
    let report = stdout_json(&run_ok(
        bin()
            .args(["--quiet", "fid", "--json", "--device", "cpu", "--features", &classifier_a()])
            .arg(&images)
            .arg(&stats),
    ));
    assert!(report["fid"].as_f64().expect("fid") <= 1e-6, "{report:?}");
    let loaded = FeatureStats::read_npz(&stats).expect("stats");
    let two_keys = dir.join("two_keys.npz");
    loaded.write_npz(&two_keys).expect("write");
    let report = stdout_json(&run_ok(
        bin()
            .args(["--quiet", "fid", "--json", "--device", "cpu", "--features", &classifier_a()])
            .arg(&stats)
            .arg(&two_keys),
    ));
    assert!(report["kid_mean"].is_null() && report["kid_std"].is_null(), "{report:?}");
    assert!(report["fid"].as_f64().expect("fid") <= 1e-6);

    // Text output names both metrics.
    let out = run_ok(
        bin().args(["--quiet", "fid", "--device", "cpu", "--features", &classifier_a()]).arg(&images).arg(&stats),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("FID") && text.contains("KID"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn fid_errors_name_the_culprit() {
    let dir = temp_dir("fid-errors");
    let images = dir.join("images");
    write_png_folder(&images, 6, 28);

    // sigma of the wrong shape.
    let bad_npz = dir.join("bad_shape.npz");
    {
        let file = std::fs::File::create(&bad_npz).expect("create");
        let mut writer = ndarray_npy::NpzWriter::new(file);
        writer.add_array("mu", &Array1::<f64>::zeros(5)).expect("mu");
        writer.add_array("sigma", &Array2::<f64>::zeros((4, 4))).expect("sigma");
        writer.finish().expect("finish");
    }
    let err = run_err(bin().args(["fid", "--device", "cpu", "--features", &classifier_a()]).arg(&images).arg(&bad_npz));
    assert!(err.contains("bad_shape.npz") && err.contains("sigma"), "{err}");

    // Features of another dimension than the classifier's.
    let other_dim = dir.join("other_dim.npz");
    {
        let file = std::fs::File::create(&other_dim).expect("create");
        let mut writer = ndarray_npy::NpzWriter::new(file);
        let features = Array2::<f32>::from_shape_fn((6, 5), |(i, j)| (i * 5 + j) as f32 * 0.1);
        writer.add_array("features", &features).expect("features");
        writer.finish().expect("finish");
    }
    let err =
        run_err(bin().args(["fid", "--device", "cpu", "--features", &classifier_a()]).arg(&images).arg(&other_dim));
    assert!(err.contains("other_dim.npz") && err.contains("5-d"), "{err}");
    let err = run_err(bin().args(["fid", "--device", "cpu"]).arg(&bad_npz).arg(&other_dim));
    assert!(err.contains("bad_shape.npz"), "{err}");

    // Two statistics files of the same dimension from different feature sets.
    let renamed = dir.join("renamed-classifier.safetensors");
    std::fs::copy(classifier_a(), &renamed).expect("copy weights");
    std::fs::copy(classifier_a().replace(".safetensors", ".json"), dir.join("renamed-classifier.json")).expect("copy");
    let stats_a = dir.join("stats_a.npz");
    let stats_renamed = dir.join("stats_renamed.npz");
    run_ok(
        bin()
            .args(["--quiet", "stats", "--device", "cpu", "--features", &classifier_a()])
            .arg(&images)
            .arg("--out")
            .arg(&stats_a),
    );
    run_ok(
        bin()
            .args(["--quiet", "stats", "--device", "cpu", "--features"])
            .arg(&renamed)
            .arg(&images)
            .arg("--out")
            .arg(&stats_renamed),
    );
    let err = run_err(bin().args(["fid", "--device", "cpu"]).arg(&stats_a).arg(&stats_renamed));
    assert!(err.contains("stats_renamed.npz") && err.contains("classifier:renamed-classifier"), "{err}");
    let err = run_err(bin().args(["fid", "--device", "cpu", "--features"]).arg(&renamed).arg(&images).arg(&stats_a));
    assert!(err.contains("stats_a.npz") && err.contains("classifier:fmnist-classifier-a"), "{err}");
    let report =
        stdout_json(&run_ok(bin().args(["--quiet", "fid", "--json", "--device", "cpu"]).arg(&stats_a).arg(&stats_a)));
    assert_eq!(report["features"], "classifier:fmnist-classifier-a", "the name recorded in the files");

    // A folder with an image file that does not decode (other files are skipped, as pytorch-fid does).
    let mixed = dir.join("mixed");
    write_png_folder(&mixed, 3, 28);
    std::fs::write(mixed.join("notes.png"), "not an image").expect("write");
    let err = run_err(bin().args(["fid", "--device", "cpu", "--features", &classifier_a()]).arg(&mixed).arg(&images));
    assert!(err.contains("notes.png"), "{err}");

    // An unknown feature set.
    let err = run_err(bin().args(["fid", "--device", "cpu", "--features", "vgg16"]).arg(&images).arg(&images));
    assert!(err.contains("vgg16"), "{err}");
    let err = run_err(
        bin().args(["fid", "--device", "cpu", "--features", "/nonexistent/clf.safetensors"]).arg(&images).arg(&images),
    );
    assert!(err.contains("/nonexistent/clf.safetensors"), "{err}");

    // Missing Inception weights.
    let err = run_err(
        bin()
            .env("DDSS_INCEPTION", "/nonexistent/default_1.pt")
            .args(["fid", "--device", "cpu", "--features", "inception"])
            .arg(&images)
            .arg(&images),
    );
    assert!(err.contains("/nonexistent/default_1.pt") && err.contains("DDSS_INCEPTION"), "{err}");

    // A missing source.
    let err = run_err(
        bin().args(["fid", "--device", "cpu", "--features", &classifier_a(), "/nonexistent/imgs"]).arg(&images),
    );
    assert!(err.contains("/nonexistent/imgs"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn train_classifier_writes_weights_and_sidecar() {
    let dir = temp_dir("train-classifier");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).expect("data dir");
    let labels = |n: u32| -> Vec<u8> { (0..n).map(|i| (i % 10) as u8).collect() };
    write_idx_with(&data.join("train-images-idx3-ubyte"), 40, 28, pixel);
    write_idx_labels(&data.join("train-labels-idx1-ubyte"), &labels(40));
    write_idx_with(&data.join("t10k-images-idx3-ubyte"), 20, 28, pixel);
    write_idx_labels(&data.join("t10k-labels-idx1-ubyte"), &labels(20));
    let out = dir.join("net.safetensors");
    let run = run_ok(
        bin()
            .args(["--quiet", "train-classifier", "--arch", "b", "--epochs", "1", "--batch", "16", "--seed", "4"])
            .args(["--device", "cpu"])
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(&out),
    );
    assert!(String::from_utf8_lossy(&run.stdout).contains("test accuracy"));
    let sidecar: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("net.json")).expect("sidecar")).expect("sidecar JSON");
    assert_eq!(sidecar["format"], "ddss-domain-classifier");
    assert_eq!(sidecar["version"], 1);
    assert_eq!(sidecar["arch"], "b");
    assert_eq!(sidecar["feature_dim"], 256);
    assert_eq!(sidecar["seed"], 4);
    assert_eq!(sidecar["epochs"], 1);
    assert_eq!(sidecar["data"], "data train 40");
    assert!(sidecar["test_accuracy"].is_f64());
    // The new file works as a feature set.
    let stats = dir.join("stats.npz");
    run_ok(
        bin()
            .args(["--quiet", "stats", "--device", "cpu", "--features"])
            .arg(&out)
            .arg(data.join("t10k-images-idx3-ubyte"))
            .arg("--out")
            .arg(&stats),
    );
    assert_eq!(read_features_npz(&stats).expect("features").size(), vec![20, 256]);

    std::fs::remove_file(data.join("t10k-labels-idx1-ubyte")).expect("remove");
    let err = run_err(
        bin()
            .args(["train-classifier", "--arch", "a", "--device", "cpu"])
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(dir.join("x.safetensors")),
    );
    assert!(err.contains("t10k-labels-idx1-ubyte"), "{err}");
    let err = run_err(
        bin()
            .args(["train-classifier", "--arch", "c", "--device", "cpu"])
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(&out),
    );
    assert!(err.contains("--arch c"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn eval_prints_seven_keys_and_scores_the_samples_sample_writes() {
    let dir = temp_dir("eval");
    let data = dir.join("images.idx");
    write_idx_with(&data, 16, 8, pixel);
    let config = dir.join("tiny.toml");
    std::fs::write(&config, TINY_TRAIN_CONFIG.replace("steps = 4", "steps = 2")).expect("config");
    let model = dir.join("model");
    run_ok(train_cmd(&data, &config, &model).arg("--quiet"));
    let reference = dir.join("ref.npz");
    run_ok(
        bin()
            .args(["--quiet", "stats", "--device", "cpu", "--features", &classifier_a()])
            .arg(&data)
            .arg("--out")
            .arg(&reference),
    );

    let eval = |batch: &str| {
        stdout_json(&run_ok(
            bin()
                .args(["--quiet", "eval", "--json", "--device", "cpu", "--sampler", "ddim", "--steps", "3"])
                .args(["--num", "6", "--seed", "2", "--batch", batch, "--features", &classifier_a()])
                .arg("--model")
                .arg(&model)
                .arg("--ref")
                .arg(&reference),
        ))
    };
    let report = eval("4");
    assert_eq!(keys(&report), ["features", "fid", "kid_mean", "kid_std", "num", "sampler", "steps"]);
    assert_eq!(report["sampler"], "ddim");
    assert_eq!(report["steps"], 3);
    assert_eq!(report["num"], 6);
    assert_eq!(report["features"], "classifier:fmnist-classifier-a");
    assert!(report["kid_mean"].is_f64() && report["kid_std"].is_f64(), "{report:?}");
    let fid = report["fid"].as_f64().expect("fid");
    assert!(fid.is_finite() && fid > 0.0, "{fid}");

    // Per-sample noise: the batch size does not change the samples.
    let fid_other_batch = eval("5")["fid"].as_f64().expect("fid");
    assert!((fid - fid_other_batch).abs() <= 1e-6 * fid.max(1.0), "{fid} vs {fid_other_batch}");

    // The multistep solvers are scored by name too.
    for sampler in ["dpmpp2m", "unipc3"] {
        let report = stdout_json(&run_ok(
            bin()
                .args(["--quiet", "eval", "--json", "--device", "cpu", "--sampler", sampler, "--steps", "4"])
                .args(["--num", "4", "--seed", "2", "--features", &classifier_a()])
                .arg("--model")
                .arg(&model)
                .arg("--ref")
                .arg(&reference),
        ));
        assert_eq!(report["sampler"], sampler);
        assert_eq!(report["steps"], 4);
        assert!(report["fid"].as_f64().is_some_and(f64::is_finite), "{report:?}");
    }

    // `sample --out-dir` + `fid` scores the same images.
    let samples = dir.join("samples");
    run_ok(
        bin()
            .args([
                "--quiet",
                "sample",
                "--device",
                "cpu",
                "--sampler",
                "ddim",
                "--steps",
                "3",
                "--num",
                "6",
                "--seed",
                "2",
            ])
            .arg("--model")
            .arg(&model)
            .arg("--out-dir")
            .arg(&samples),
    );
    let via_files = stdout_json(&run_ok(
        bin()
            .args(["--quiet", "fid", "--json", "--device", "cpu", "--features", &classifier_a()])
            .arg(&samples)
            .arg(&reference),
    ));
    let fid_files = via_files["fid"].as_f64().expect("fid");
    assert!((fid - fid_files).abs() <= 1e-6 * fid.max(1.0), "eval {fid} vs sample + fid {fid_files}");

    // A reference made with other features is refused before sampling.
    let err = run_err(eval_ddim3(&model, "inception", &reference).env("DDSS_INCEPTION", "/nonexistent/default_1.pt"));
    assert!(err.contains("/nonexistent/default_1.pt"), "{err}");
    let err = run_err(&mut eval_ddim3(&model, &classifier_a(), &dir.join("missing.npz")));
    assert!(err.contains("missing.npz"), "{err}");
    let five_d = dir.join("five_d.npz");
    {
        let file = std::fs::File::create(&five_d).expect("create");
        let mut writer = ndarray_npy::NpzWriter::new(file);
        let features = Array2::<f32>::from_shape_fn((6, 5), |(i, j)| (i * 5 + j) as f32 * 0.1);
        writer.add_array("features", &features).expect("features");
        writer.finish().expect("finish");
    }
    let err = run_err(&mut eval_ddim3(&model, &classifier_a(), &five_d));
    assert!(err.contains("five_d.npz") && err.contains("5-d"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `eval` of 6 DDIM samples with 3 steps of `model` on the CPU, scored with `features` against
/// `reference`.
fn eval_ddim3(model: &Path, features: &str, reference: &Path) -> Command {
    let mut cmd = bin();
    cmd.args(["eval", "--device", "cpu", "--sampler", "ddim", "--steps", "3", "--num", "6", "--features", features])
        .arg("--model")
        .arg(model)
        .arg("--ref")
        .arg(reference);
    cmd
}
