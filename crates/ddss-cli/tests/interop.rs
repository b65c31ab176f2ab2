//! What the Python package (python/) relies on: `sample --step-noise` / `--out-step-noise`, and the
//! folders `export --format diffusers-scheduler` / `diffusers-pipeline` write, which ggdm-core's
//! own model loader must keep reading. Uses the shipped model and tests/fixtures/interop.

mod common;

use common::{bin, repo, run_err, run_ok, temp_dir};
use ggdm_core::ggdm::GgdmSampler;
use ggdm_core::noise::{NoiseSource, PerSampleNoise};
use ggdm_core::scheduler_config::SchedulerConfig;
use ndarray::ArrayD;
use ndarray_npy::{read_npy, write_npy};
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

fn fixture(name: &str) -> String {
    repo(&format!("tests/fixtures/interop/{name}"))
}

fn read(path: &Path) -> ArrayD<f32> {
    read_npy(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// `ddss-cli sample` of the shipped model with the fixture's initial noise and `extra` arguments.
fn sample(sampler: &str, out: &Path, extra: &[&str]) {
    let mut cmd = bin();
    cmd.args(["--quiet", "sample", "--device", "cpu", "--model", &repo("models/fashion-mnist-ddpm")])
        .args(["--sampler", sampler, "--init-noise", &fixture("init_noise.npy"), "--out-npy"])
        .arg(out)
        .args(extra);
    run_ok(&mut cmd);
}

#[test]
fn written_step_noise_reproduces_the_run_and_follows_the_sign_of_sigma() {
    let dir = temp_dir("interop-step-noise");
    let sampler = fixture("learned_stochastic.json");
    let (plain, written, replayed) = (dir.join("plain.npy"), dir.join("written.npy"), dir.join("replayed.npy"));
    let noise = dir.join("z.npy");
    // One batch size throughout (2, so the file is read in two slices): the network's float
    // results may depend on the batch size, the noise does not.
    sample(&sampler, &plain, &["--seed", "3", "--batch", "2"]);
    let noise_arg = noise.to_string_lossy().to_string();
    sample(&sampler, &written, &["--seed", "3", "--batch", "2", "--out-step-noise", &noise_arg]);
    sample(&sampler, &replayed, &["--seed", "99", "--batch", "2", "--step-noise", &noise_arg]);
    // Writing the noise changes nothing; replaying it gives the run back, whatever the seed.
    assert_eq!(read(&plain), read(&written));
    assert_eq!(read(&written), read(&replayed));
    let z = read(&noise);
    assert_eq!(z.shape(), &[10, 3, 1, 28, 28]);

    // The file holds the drawn noise times the sign of the learned sigma (derived.sigma = |sigma|).
    let loaded = GgdmSampler::load(Path::new(&sampler), Device::Cpu).expect("sampler");
    let sigma = ggdm_core::ggdm::tensor_to_vec(&tch::no_grad(|| loaded.coefficients().sigma));
    assert!(sigma.iter().any(|s| *s < 0.0) && sigma.iter().any(|s| *s > 0.0), "{sigma:?}");
    let mut draws = PerSampleNoise::new(3, 0, 2);
    for (i, s) in sigma.iter().enumerate() {
        let drawn = draws.next(&[2, 1, 28, 28], Device::Cpu).expect("noise");
        let file = Tensor::from_slice(z.as_slice().expect("contiguous")).reshape([10, 3, 1, 28, 28]).get(i as i64);
        let expected = if *s < 0.0 { -drawn } else { drawn };
        assert!(file.narrow(0, 0, 2).equal(&expected), "step {i}");
    }
}

#[test]
fn the_committed_fixtures_are_what_sample_gives() {
    let dir = temp_dir("interop-fixtures");
    for name in ["learned_stochastic", "marginal"] {
        let out = dir.join(format!("{name}.npy"));
        sample(&fixture(&format!("{name}.json")), &out, &["--step-noise", &fixture("step_noise.npy")]);
        let expected = read(Path::new(&fixture(&format!("{name}.samples.npy"))));
        let got = read(&out);
        let worst = got.iter().zip(expected.iter()).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(worst < 1e-5, "{name}: {worst}");
    }
}

#[test]
fn bad_step_noise_is_named() {
    let dir = temp_dir("interop-bad-step-noise");
    let sampler = fixture("learned_stochastic.json");
    let short = dir.join("short.npy");
    write_npy(&short, &ArrayD::<f32>::zeros(ndarray::IxDyn(&[9, 3, 1, 28, 28]))).expect("write");
    let mut cmd = bin();
    cmd.args(["sample", "--device", "cpu", "--model", &repo("models/fashion-mnist-ddpm"), "--sampler", &sampler])
        .args(["--init-noise", &fixture("init_noise.npy"), "--step-noise"])
        .arg(&short)
        .arg("--out-npy")
        .arg(dir.join("x.npy"));
    let err = run_err(&mut cmd);
    assert!(
        err.contains("short.npy") && err.contains("[9, 3, 1, 28, 28]") && err.contains("[10, 3, 1, 28, 28]"),
        "{err}"
    );

    let mut nan = ArrayD::<f32>::zeros(ndarray::IxDyn(&[10, 3, 1, 28, 28]));
    nan[[4, 1, 0, 2, 3]] = f32::NAN;
    let bad = dir.join("nan.npy");
    write_npy(&bad, &nan).expect("write");
    let mut cmd = bin();
    cmd.args(["sample", "--device", "cpu", "--model", &repo("models/fashion-mnist-ddpm"), "--sampler", &sampler])
        .args(["--init-noise", &fixture("init_noise.npy"), "--step-noise"])
        .arg(&bad)
        .arg("--out-npy")
        .arg(dir.join("x.npy"));
    let err = run_err(&mut cmd);
    assert!(err.contains("nan.npy") && err.contains("NaN") && err.contains("[4, 1, 0, 2, 3]"), "{err}");

    let mut cmd = bin();
    cmd.args(["sample", "--device", "cpu", "--model", &repo("models/fashion-mnist-ddpm"), "--sampler", "ddim"])
        .args(["--steps", "2", "--num", "1", "--out-step-noise"])
        .arg(dir.join("z.npy"));
    let err = run_err(&mut cmd);
    assert!(err.contains("--out-step-noise") && err.contains("--sampler FILE.json"), "{err}");
}

fn export(format: &str, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut cmd = bin();
    cmd.args(["export", "--sampler", &fixture("learned_stochastic_v1.json"), "--format", format, "--out"])
        .arg(out)
        .args(extra);
    run_ok(&mut cmd)
}

#[test]
fn exported_folders_keep_loading_in_our_model_loader() {
    let dir = temp_dir("interop-export");
    let model = repo("models/fashion-mnist-ddpm");
    let shipped = SchedulerConfig::from_file(&PathBuf::from(&model).join("scheduler_config.json")).expect("model");
    export("diffusers-scheduler", &dir.join("scheduler"), &[]);
    let committed = PathBuf::from(fixture("scheduler/scheduler_config.json"));
    for path in [dir.join("scheduler/scheduler_config.json"), committed.clone()] {
        assert_eq!(SchedulerConfig::from_file(&path).expect("GGDMScheduler config"), shipped, "{}", path.display());
    }
    assert_eq!(
        std::fs::read_to_string(dir.join("scheduler/scheduler_config.json")).expect("read"),
        std::fs::read_to_string(&committed).expect("read")
    );

    let pipeline = dir.join("pipeline");
    export("diffusers-pipeline", &pipeline, &["--model", &model]);
    for file in ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"] {
        assert!(pipeline.join(file).is_file(), "{file}");
    }
    let index = common::json(&pipeline.join("model_index.json"));
    assert_eq!(index["scheduler"], serde_json::json!(["ddss_sampler", "GGDMScheduler"]));
    // The pipeline folder is a model directory: it samples as the shipped model does.
    let (ours, theirs) = (dir.join("pipeline.npy"), dir.join("shipped.npy"));
    for (model_dir, out) in [(pipeline.to_string_lossy().to_string(), &ours), (model.clone(), &theirs)] {
        let mut cmd = bin();
        cmd.args(["--quiet", "sample", "--device", "cpu", "--model", &model_dir])
            .args(["--sampler", &fixture("learned_stochastic.json"), "--init-noise", &fixture("init_noise.npy")])
            .arg("--out-npy")
            .arg(out);
        run_ok(&mut cmd);
    }
    assert_eq!(read(&ours), read(&theirs));
}

#[test]
fn export_says_what_is_missing() {
    let dir = temp_dir("interop-export-errors");
    let mut cmd = bin();
    cmd.args(["export", "--sampler", &fixture("marginal.json"), "--format", "diffusers-scheduler"]);
    let err = run_err(&mut cmd);
    assert!(err.contains("--out DIR") && err.contains("diffusers-scheduler"), "{err}");
    let mut cmd = bin();
    cmd.args(["export", "--sampler", &fixture("marginal.json"), "--format", "diffusers-pipeline", "--model"])
        .arg(&dir)
        .arg("--out")
        .arg(dir.join("pipe"));
    let err = run_err(&mut cmd);
    assert!(err.contains("diffusion_pytorch_model.safetensors") && err.contains("--model DIR"), "{err}");
}
