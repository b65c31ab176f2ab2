//! End-to-end tests of the `ddss-cli` binary on tiny models and data (CPU, seconds).

mod common;
use common::*;

use std::path::{Path, PathBuf};

fn setup(name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let dir = temp_dir(name);
    let data = dir.join("images.idx");
    write_idx_with(&data, 32, 8, |i, x, y| ((i * 37 + y * 11 + x * 5) % 256) as u8);
    let config = dir.join("tiny.toml");
    std::fs::write(&config, TINY_TRAIN_CONFIG).expect("config");
    (dir, data, config)
}

fn train(data: &Path, config: &Path, out: &Path, steps: u64, resume: bool) {
    let mut cmd = train_cmd(data, config, out);
    cmd.args(["--quiet", "--steps", &steps.to_string()]);
    if resume {
        cmd.arg("--resume");
    }
    run_ok(&mut cmd);
}

#[test]
fn train_resume_equals_uninterrupted_and_sampling_is_reproducible() {
    let (dir, data, config) = setup("train");
    let straight = dir.join("straight");
    train(&data, &config, &straight, 4, false);
    let resumed = dir.join("resumed");
    train(&data, &config, &resumed, 2, false);
    train(&data, &config, &resumed, 4, true);
    let weights = "diffusion_pytorch_model.safetensors";
    let same = std::fs::read(straight.join(weights)).expect("weights")
        == std::fs::read(resumed.join(weights)).expect("weights");
    assert!(same, "a resumed run must end with the same weights as an uninterrupted one");
    for file in ["config.json", "scheduler_config.json", "train_config.toml", "metrics.jsonl"] {
        assert!(straight.join(file).is_file(), "{file} missing");
    }

    // Sampling: a grid, per-image PNGs and a .npy; the same --init-noise gives the same bytes.
    let npy_a = dir.join("a.npy");
    let npy_b = dir.join("b.npy");
    let grid = dir.join("grid.png");
    let images = dir.join("images");
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
                "5",
                "--num",
                "6",
                "--batch",
                "4",
            ])
            .arg("--model")
            .arg(&straight)
            .arg("--out")
            .arg(&grid)
            .arg("--out-dir")
            .arg(&images)
            .arg("--out-npy")
            .arg(&npy_a),
    );
    assert!(grid.is_file());
    assert_eq!(std::fs::read_dir(&images).expect("images").count(), 6);
    run_ok(
        bin()
            .args(["--quiet", "sample", "--device", "cpu", "--sampler", "ddim", "--steps", "5", "--batch", "2"])
            .arg("--model")
            .arg(&straight)
            .arg("--init-noise")
            .arg(&npy_a)
            .arg("--out-npy")
            .arg(&npy_b),
    );
    let npy_c = dir.join("c.npy");
    run_ok(
        bin()
            .args(["--quiet", "sample", "--device", "cpu", "--sampler", "ddim", "--steps", "5", "--batch", "3"])
            .arg("--model")
            .arg(&straight)
            .arg("--init-noise")
            .arg(&npy_a)
            .arg("--out-npy")
            .arg(&npy_c),
    );
    let same = std::fs::read(&npy_b).expect("b") == std::fs::read(&npy_c).expect("c");
    assert!(same, "the same --init-noise must give the same samples whatever --batch");
    // DDPM (ancestral, per-sample noise) too.
    run_ok(
        bin()
            .args(["--quiet", "sample", "--device", "cpu", "--sampler", "ddpm", "--steps", "4", "--num", "2"])
            .arg("--model")
            .arg(&straight)
            .arg("--out")
            .arg(dir.join("ddpm.png")),
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_inputs_give_clear_errors() {
    let (dir, data, config) = setup("errors");
    let err = run_err(bin().args(["sample", "--sampler", "ddim", "--device", "cpu", "--model", "/nonexistent/model"]));
    assert!(err.contains("/nonexistent/model") && err.contains("diffusion_pytorch_model.safetensors"), "{err}");
    let err = run_err(bin().args(["sample", "--sampler", "dpm-unknown", "--device", "cpu"]).arg("--model").arg(&dir));
    assert!(err.contains("config.json") || err.contains("dpm-unknown"), "{err}");
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, TINY_TRAIN_CONFIG.replace("layers_per_block", "layers_per_blok")).expect("write");
    let err = run_err(&mut train_cmd(&data, &bad, &dir.join("o")));
    assert!(err.contains("layers_per_blok"), "{err}");
    std::fs::write(&bad, TINY_TRAIN_CONFIG.replace("batch_size = 4", "batch_size = 0")).expect("write");
    let err = run_err(&mut train_cmd(&data, &bad, &dir.join("o")));
    assert!(err.contains("batch_size"), "{err}");
    let err = run_err(&mut train_cmd(Path::new("/nonexistent/data.idx"), &config, &dir.join("o")));
    assert!(err.contains("/nonexistent/data.idx"), "{err}");
    let err = run_err(bin().args(["export", "--sampler", "/nonexistent/sampler.json"]));
    assert!(err.contains("/nonexistent/sampler.json"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn multistep_solvers_sample_finite_images() {
    let (dir, data, config) = setup("solvers");
    let model = dir.join("model");
    train(&data, &config, &model, 2, false);
    for sampler in ["dpmpp2m", "dpmpp3m", "unipc", "unipc3"] {
        for spacing in [None, Some("trailing")] {
            let npy = dir.join(format!("{sampler}.npy"));
            let mut cmd = bin();
            cmd.args(["--quiet", "sample", "--device", "cpu", "--sampler", sampler, "--steps", "5", "--num", "3"])
                .arg("--model")
                .arg(&model)
                .arg("--out-npy")
                .arg(&npy);
            if let Some(spacing) = spacing {
                cmd.args(["--spacing", spacing]);
            }
            run_ok(&mut cmd);
            let samples: ndarray::Array4<f32> = ndarray_npy::read_npy(&npy).expect("read samples");
            assert_eq!(samples.shape(), [3, 1, 8, 8], "{sampler}");
            assert!(samples.iter().all(|v| v.is_finite()), "{sampler} {spacing:?}: non-finite samples");
            assert!(samples.iter().any(|v| *v != 0.0), "{sampler}: all zero");
        }
    }
    // --cuda-graphs is a no-op on the CPU (with a note): the same samples, whatever the build.
    let graphed = dir.join("graphed.npy");
    run_ok(
        bin()
            .args(["--quiet", "sample", "--device", "cpu", "--sampler", "unipc3", "--steps", "5", "--num", "3"])
            .args(["--cuda-graphs", "--spacing", "trailing"])
            .arg("--model")
            .arg(&model)
            .arg("--out-npy")
            .arg(&graphed),
    );
    let eager = std::fs::read(dir.join("unipc3.npy")).expect("unipc3.npy");
    assert_eq!(std::fs::read(&graphed).expect("graphed.npy"), eager, "--cuda-graphs changed CPU samples");
    // An unknown name lists the valid ones.
    let err = run_err(bin().args(["sample", "--device", "cpu", "--sampler", "dpmpp9m"]).arg("--model").arg(&model));
    assert!(err.contains("dpmpp9m"), "{err}");
    for name in ["ddim", "ddim-noclip", "ddpm", "dpmpp2m", "dpmpp3m", "unipc", "unipc3", "sampler.json"] {
        assert!(err.contains(name), "{name} missing from: {err}");
    }
    // ... and so does a search config's [eval] compare list, before any work is done.
    let search_config = dir.join("search.toml");
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../configs/fashion_mnist.toml"))
        .expect("configs/fashion_mnist.toml");
    let compare = "compare = [\"ddim\", \"dpmpp2m\", \"dpmpp3m\", \"unipc\", \"unipc3\", \"dpmpp9m\"]";
    let text: String =
        text.lines().map(|l| if l.starts_with("compare") { compare } else { l }).collect::<Vec<_>>().join("\n");
    std::fs::write(&search_config, text).expect("write search config");
    let err = run_err(bin().args(["search", "--device", "cpu", "--config"]).arg(&search_config));
    assert!(err.contains("[eval] compare") && err.contains("`dpmpp9m`") && err.contains("unipc3"), "{err}");
    // `[sampler] init = "dpmpp2m"` starts deterministic with the full history.
    let text = std::fs::read_to_string(&search_config).expect("search config");
    let text = text.replace("init = \"unipc\"", "init = \"dpmpp2m\"").replace("eta = 0.0", "eta = 0.5");
    std::fs::write(&search_config, text).expect("write search config");
    let err = run_err(bin().args(["search", "--device", "cpu", "--config"]).arg(&search_config));
    assert!(err.contains("init = \"dpmpp2m\" needs eta = 0"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn timesteps_command_prints_diffusers_grids() {
    let out = run_ok(bin().args(["timesteps", "--steps", "10", "--spacing", "trailing"]));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[999,899,799,699,599,499,399,299,199,99]");
    let out = run_ok(bin().args(["timesteps", "--steps", "4", "--spacing", "leading", "--steps-offset", "1"]));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[751,501,251,1]");
    // DPMSolverMultistepScheduler / UniPCMultistepScheduler place K + 1 points and drop the last.
    let out = run_ok(bin().args(["timesteps", "--steps", "4", "--spacing", "linspace", "--multistep"]));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[999,749,500,250]");
    let out = run_ok(bin().args(["timesteps", "--steps", "4", "--spacing", "leading", "--multistep"]));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[800,600,400,200]");
    // Log-SNR-uniform: DPMSolverMultistepScheduler(use_lu_lambdas=True), on the schedule of a
    // scheduler_config.json (scaled_linear 0.00085..0.012) or DDPM's linear one.
    let out = run_ok(bin().args(["timesteps", "--steps", "5", "--spacing", "logsnr"]));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[999,722,302,30,0]");
    let dir = temp_dir("timesteps_logsnr");
    let config = dir.join("scheduler_config.json");
    let json = r#"{"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}"#;
    std::fs::write(&config, json).expect("write scheduler config");
    let out =
        run_ok(bin().args(["timesteps", "--steps", "5", "--spacing", "logsnr", "--scheduler-config"]).arg(&config));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[999,681,233,20,0]");
    let err = run_err(bin().args(["timesteps", "--steps", "50", "--spacing", "logsnr", "--multistep"]));
    assert!(err.contains("repeat a timestep") && err.contains("fewer steps"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
