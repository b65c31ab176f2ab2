//! The catalogue of bad inputs (README, "What is protected"): each case runs `ddss-cli` and checks
//! that it exits non-zero with a one-paragraph message naming the culprit (file, key or value),
//! without a panic or a backtrace.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use ndarray::{Array1, Array2};

/// Runs a command that must fail cleanly and whose stderr must name every needle.
fn fails_naming(cmd: &mut Command, needles: &[&str]) -> String {
    let err = run_err(cmd);
    for marker in ["panicked", "stack backtrace", "Exception raised from", "RUST_BACKTRACE"] {
        assert!(!err.contains(marker), "`{marker}` in stderr:\n{err}");
    }
    assert!(err.contains("error:"), "no error line:\n{err}");
    for needle in needles {
        assert!(err.contains(needle), "stderr does not name `{needle}`:\n{err}");
    }
    err
}

/// One tiny trained model (and its 8x8 training images) shared by the tests of this file.
fn shared() -> &'static (PathBuf, PathBuf, PathBuf) {
    static SHARED: OnceLock<(PathBuf, PathBuf, PathBuf)> = OnceLock::new();
    SHARED.get_or_init(|| {
        let dir = temp_dir("bad-inputs-shared");
        let (model, data) = tiny_model(&dir);
        (dir, model, data)
    })
}

/// A copy of the shared model in `dir/name`.
fn model_copy(dir: &Path, name: &str) -> PathBuf {
    let (_, model, _) = shared();
    let copy = dir.join(name);
    std::fs::create_dir_all(&copy).expect("model copy");
    for file in ["config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json"] {
        std::fs::copy(model.join(file), copy.join(file)).expect("copy model file");
    }
    copy
}

fn sample_cmd(model: &Path, out_npy: &Path) -> Command {
    let mut cmd = bin();
    cmd.args(["--quiet", "sample", "--device", "cpu", "--sampler", "ddim", "--steps", "2", "--num", "2"])
        .arg("--model")
        .arg(model)
        .arg("--out-npy")
        .arg(out_npy);
    cmd
}

const WEIGHTS: &str = "diffusion_pytorch_model.safetensors";

#[test]
fn model_weights_missing_truncated_or_garbage() {
    let dir = temp_dir("bad-weights");
    let out = dir.join("s.npy");
    let missing = model_copy(&dir, "missing");
    std::fs::remove_file(missing.join(WEIGHTS)).expect("remove");
    fails_naming(&mut sample_cmd(&missing, &out), &[WEIGHTS, &missing.display().to_string()]);

    let truncated = model_copy(&dir, "truncated");
    let bytes = std::fs::read(truncated.join(WEIGHTS)).expect("read");
    std::fs::write(truncated.join(WEIGHTS), &bytes[..bytes.len() / 2]).expect("truncate");
    fails_naming(&mut sample_cmd(&truncated, &out), &[&truncated.join(WEIGHTS).display().to_string()]);

    let garbage = model_copy(&dir, "garbage");
    let noise: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(garbage.join(WEIGHTS), noise).expect("garbage");
    fails_naming(&mut sample_cmd(&garbage, &out), &[&garbage.join(WEIGHTS).display().to_string()]);

    // Not even the header length.
    std::fs::write(garbage.join(WEIGHTS), b"abc").expect("tiny");
    fails_naming(&mut sample_cmd(&garbage, &out), &[&garbage.join(WEIGHTS).display().to_string()]);
    assert!(!out.exists(), "no output from a failed run");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Rewrites the weights of `model` through `edit`.
fn edit_weights(model: &Path, edit: impl FnOnce(&mut Vec<(String, tch::Tensor)>)) {
    let path = model.join(WEIGHTS);
    let mut named = tch::Tensor::read_safetensors(&path).expect("read weights");
    edit(&mut named);
    tch::Tensor::write_safetensors(&named, &path).expect("write weights");
}

#[test]
fn checkpoint_missing_extra_or_misshapen_key() {
    let dir = temp_dir("bad-keys");
    let out = dir.join("s.npy");
    let key = "conv_in.weight";

    let missing = model_copy(&dir, "missing-key");
    edit_weights(&missing, |named| named.retain(|(n, _)| n != key));
    fails_naming(&mut sample_cmd(&missing, &out), &[key, WEIGHTS]);

    let extra = model_copy(&dir, "extra-key");
    edit_weights(&extra, |named| {
        named.push(("decoder.extra.weight".into(), tch::Tensor::zeros([3], tch::kind::FLOAT_CPU)))
    });
    fails_naming(&mut sample_cmd(&extra, &out), &["decoder.extra.weight", WEIGHTS]);

    let shape = model_copy(&dir, "wrong-shape");
    edit_weights(&shape, |named| {
        for (n, t) in named.iter_mut() {
            if n == key {
                *t = tch::Tensor::zeros([3, 1, 3, 3], tch::kind::FLOAT_CPU);
            }
        }
    });
    fails_naming(&mut sample_cmd(&shape, &out), &[key, "[3, 1, 3, 3]"]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Rewrites `config.json` of `model` through `edit`.
fn edit_config(model: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let path = model.join("config.json");
    let mut value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    edit(value.as_object_mut().expect("object"));
    std::fs::write(&path, serde_json::to_string_pretty(&value).expect("json")).expect("write");
}

#[test]
fn model_config_unknown_key_wrong_type_or_broken() {
    let dir = temp_dir("bad-config");
    let out = dir.join("s.npy");
    let unknown = model_copy(&dir, "unknown");
    edit_config(&unknown, |c| {
        c.insert("layers_per_blok".into(), 2.into());
    });
    fails_naming(&mut sample_cmd(&unknown, &out), &["layers_per_blok", "config.json"]);

    let wrong_type = model_copy(&dir, "wrong-type");
    edit_config(&wrong_type, |c| {
        c.insert("layers_per_block".into(), "two".into());
    });
    fails_naming(&mut sample_cmd(&wrong_type, &out), &["config.json", "two"]);

    let broken = model_copy(&dir, "broken");
    std::fs::write(broken.join("config.json"), "{\"sample_size\": 8,").expect("write");
    fails_naming(&mut sample_cmd(&broken, &out), &["config.json"]);

    let scheduler = model_copy(&dir, "scheduler");
    std::fs::write(scheduler.join("scheduler_config.json"), "{\"beta_schedule\": \"wavy\"}").expect("write");
    fails_naming(&mut sample_cmd(&scheduler, &out), &["scheduler_config.json", "wavy"]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `ddss-cli search` with the tiny search config edited by `edit` (a string replacement).
fn search_with(dir: &Path, name: &str, from: &str, to: &str) -> Command {
    let (_, model, data) = shared();
    let text = tiny_search_config(model, data, 2);
    assert!(text.contains(from), "the tiny config has no `{from}`");
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(&config, text.replacen(from, to, 1)).expect("config");
    let mut cmd = bin();
    cmd.args(["--quiet", "search", "--device", "cpu"]).arg("--config").arg(&config).arg("--out").arg(dir.join(name));
    cmd
}

#[test]
fn search_config_unknown_key_wrong_type_out_of_range() {
    let dir = temp_dir("bad-search-config");
    fails_naming(
        &mut search_with(&dir, "unknown", "batch_size = 6", "batch_size = 6\nbatchsize = 6"),
        &["batchsize", "unknown.toml"],
    );
    fails_naming(
        &mut search_with(&dir, "type", "batch_size = 6", "batch_size = \"six\""),
        &["batch_size", "type.toml"],
    );
    fails_naming(&mut search_with(&dir, "k0", "steps = 3", "steps = 0"), &["steps = 0", "k0.toml"]);
    fails_naming(&mut search_with(&dir, "lr", "lr = 0.05", "lr = -0.05"), &["optim.lr", "-0.05", "lr.toml"]);
    fails_naming(&mut search_with(&dir, "eta", "eta = 0.0", "eta = -0.5"), &["eta", "-0.5", "eta.toml"]);
    fails_naming(
        &mut search_with(&dir, "batch0", "batch_size = 6", "batch_size = 0"),
        &["optim.batch_size", "batch0.toml"],
    );
    fails_naming(
        &mut search_with(&dir, "clip", "grad_clip = 1.0", "grad_clip = nan"),
        &["optim.grad_clip", "clip.toml"],
    );
    fails_naming(&mut search_with(&dir, "section", "[eval]", "[evaluation]"), &["evaluation", "section.toml"]);
    fails_naming(&mut search_with(&dir, "syntax", "[eval]", "[eval"), &["syntax.toml"]);
    fails_naming(&mut search_with(&dir, "evalnum", "num = 4", "num = 0"), &["num", "evalnum.toml"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn search_teacher_unknown_sampler_zero_steps_noisy_teacher_or_bad_values() {
    let dir = temp_dir("bad-teacher");
    let teacher =
        |name: &str, spec: &str| search_with(&dir, name, "[loss]\n", &format!("[loss]\nteacher = {{ {spec} }}\n"));
    fails_naming(&mut teacher("unknown", "sampler = \"heun\""), &["teacher.sampler", "heun", "unipc", "unknown.toml"]);
    fails_naming(&mut teacher("steps", "sampler = \"unipc\", steps = 0"), &["teacher.steps = 0", "steps.toml"]);
    fails_naming(
        &mut teacher("ddpm", "sampler = \"ddpm\""),
        &["teacher.sampler", "ddpm", "deterministic", "ddpm.toml"],
    );
    fails_naming(
        &mut teacher("noisy", "sampler = \"ddim\", eta = 0.5"),
        &["teacher.eta = 0.5", "deterministic", "noisy.toml"],
    );
    fails_naming(
        &mut teacher("weight", "sampler = \"unipc\", kid_weight = -1.0"),
        &["teacher.kid_weight", "-1", "weight.toml"],
    );
    fails_naming(&mut teacher("pairs", "sampler = \"unipc\", pairs = 0"), &["teacher.pairs = 0", "pairs.toml"]);
    fails_naming(
        &mut teacher("distance", "sampler = \"unipc\", distance = \"l3\""),
        &["l3", "distance", "distance.toml"],
    );
    fails_naming(&mut teacher("key", "sampler = \"unipc\", stepz = 10"), &["stepz", "key.toml"]);
    fails_naming(&mut teacher("spacing", "sampler = \"unipc\", spacing = \"wavy\""), &["teacher.spacing", "wavy"]);
    // A sampler.json teacher must have no noise (and its own K as steps).
    let (_, model, _) = shared();
    let scheduler = ggdm_core::scheduler_config::SchedulerConfig::from_file(&model.join("scheduler_config.json"))
        .expect("scheduler");
    let noisy = dir.join("noisy.json");
    write_ddim_sampler(&noisy, &scheduler, [1, 8, 8], 0.5);
    let spec = format!("sampler = \"{}\", steps = 3", noisy.display());
    fails_naming(&mut teacher("noisy-file", &spec), &["teacher.sampler", "noisy.json", "adds noise", "deterministic"]);
    let spec = format!("sampler = \"{}\"", noisy.display());
    fails_naming(&mut teacher("file-steps", &spec), &["teacher.sampler", "noisy.json", "3-step"]);
    let _ = std::fs::remove_dir_all(&dir);
}

fn stats_cmd(source: &Path, out: &Path) -> Command {
    let mut cmd = bin();
    cmd.args(["--quiet", "stats", "--device", "cpu", "--features"])
        .arg(classifier_a_path())
        .arg(source)
        .arg("--out")
        .arg(out);
    cmd
}

fn fid_cmd(a: &Path, b: &Path) -> Command {
    let mut cmd = bin();
    cmd.args(["--quiet", "fid", "--device", "cpu", "--features"]).arg(classifier_a_path()).arg(a).arg(b);
    cmd
}

fn png(path: &Path, size: u32) {
    image::GrayImage::from_fn(size, size, |x, y| image::Luma([(x * 7 + y * 3) as u8])).save(path).expect("png");
}

#[test]
fn image_sources_empty_non_images_mixed_sizes_bad_idx() {
    let dir = temp_dir("bad-images");
    let out = dir.join("s.npz");
    let (_, _, data) = shared();

    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).expect("dir");
    fails_naming(&mut stats_cmd(&empty, &out), &[&empty.display().to_string()]);
    fails_naming(&mut fid_cmd(&empty, data), &[&empty.display().to_string()]);

    let texts = dir.join("texts");
    std::fs::create_dir_all(&texts).expect("dir");
    std::fs::write(texts.join("a.png"), "this is not a PNG").expect("write");
    fails_naming(&mut stats_cmd(&texts, &out), &["a.png"]);

    let mixed = dir.join("mixed");
    std::fs::create_dir_all(&mixed).expect("dir");
    png(&mixed.join("0.png"), 8);
    png(&mixed.join("1.png"), 12);
    fails_naming(&mut stats_cmd(&mixed, &out), &["1.png", "12"]);
    fails_naming(&mut fid_cmd(data, &mixed), &["1.png"]);

    let magic = dir.join("magic.idx");
    let mut bytes = std::fs::read(data).expect("idx");
    bytes[2] = 9;
    std::fs::write(&magic, &bytes).expect("write");
    fails_naming(&mut stats_cmd(&magic, &out), &["magic.idx", "magic"]);

    let short = dir.join("short.idx");
    let bytes = std::fs::read(data).expect("idx");
    std::fs::write(&short, &bytes[..100]).expect("write");
    fails_naming(&mut stats_cmd(&short, &out), &["short.idx"]);

    let huge = dir.join("huge.idx");
    let mut bytes = vec![0u8, 0, 8, 3];
    for d in [u32::MAX, u32::MAX, u32::MAX] {
        bytes.extend(d.to_be_bytes());
    }
    std::fs::write(&huge, &bytes).expect("write");
    fails_naming(&mut stats_cmd(&huge, &out), &["huge.idx"]);

    let gz = dir.join("broken.idx.gz");
    std::fs::write(&gz, [0x1f, 0x8b, 8, 0, 1, 2, 3]).expect("write");
    fails_naming(&mut stats_cmd(&gz, &out), &["broken.idx.gz"]);
    assert!(!out.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn npz_with_wrong_keys_or_shapes() {
    let dir = temp_dir("bad-npz");
    let (_, _, data) = shared();
    let write = |name: &str, fill: &dyn Fn(&mut ndarray_npy::NpzWriter<std::fs::File>)| {
        let path = dir.join(name);
        let mut writer = ndarray_npy::NpzWriter::new(std::fs::File::create(&path).expect("create"));
        fill(&mut writer);
        writer.finish().expect("finish");
        path
    };
    let keys = write("keys.npz", &|w| w.add_array("means", &Array1::<f64>::zeros(128)).expect("add"));
    fails_naming(&mut fid_cmd(data, &keys), &["keys.npz", "means"]);
    let mu_2d = write("mu2d.npz", &|w| {
        w.add_array("mu", &Array2::<f64>::zeros((2, 64))).expect("mu");
        w.add_array("sigma", &Array2::<f64>::zeros((128, 128))).expect("sigma");
    });
    fails_naming(&mut fid_cmd(data, &mu_2d), &["mu2d.npz", "mu"]);
    let features_1d = write("features1d.npz", &|w| w.add_array("features", &Array1::<f32>::zeros(128)).expect("add"));
    fails_naming(&mut fid_cmd(data, &features_1d), &["features1d.npz", "features"]);
    let ints = write("ints.npz", &|w| {
        w.add_array("mu", &Array1::<i32>::zeros(128)).expect("mu");
        w.add_array("sigma", &Array2::<i32>::zeros((128, 128))).expect("sigma");
    });
    fails_naming(&mut fid_cmd(data, &ints), &["ints.npz", "mu"]);
    let not_zip = dir.join("notzip.npz");
    std::fs::write(&not_zip, "PK but not really").expect("write");
    fails_naming(&mut fid_cmd(data, &not_zip), &["notzip.npz"]);
    let model_dir = &shared().1;
    let mut eval = bin();
    eval.args(["--quiet", "eval", "--device", "cpu", "--sampler", "ddim", "--steps", "2", "--num", "4", "--features"])
        .arg(classifier_a_path())
        .arg("--model")
        .arg(model_dir)
        .arg("--ref")
        .arg(&keys);
    fails_naming(&mut eval, &["keys.npz"]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A GGDM sampler file for `scheduler` and sample shape `shape`, written to `path`.
fn write_sampler(path: &Path, scheduler: &ggdm_core::scheduler_config::SchedulerConfig, shape: [i64; 3]) {
    write_ddim_sampler(path, scheduler, shape, 0.0);
}

/// [`write_sampler`] at DDIM(`eta`).
fn write_ddim_sampler(
    path: &Path,
    scheduler: &ggdm_core::scheduler_config::SchedulerConfig,
    shape: [i64; 3],
    eta: f64,
) {
    let mut sampler = ggdm_core::ggdm::GgdmSampler::init_from_spacing(
        scheduler,
        3,
        ggdm_core::grid::Spacing::Trailing,
        eta,
        ggdm_core::ggdm::History::Full,
        ggdm_core::ggdm::Learnable::none(),
        tch::Device::Cpu,
    )
    .expect("sampler");
    sampler.model = ggdm_core::ggdm::ModelIdentity { name: "test".into(), sample_shape: Some(shape) };
    sampler.save(path).expect("save sampler");
}

#[test]
fn sampler_file_for_another_schedule_or_size_or_broken() {
    let dir = temp_dir("bad-sampler");
    let (_, model, _) = shared();
    let out = dir.join("s.npy");
    let scheduler = ggdm_core::scheduler_config::SchedulerConfig::from_file(&model.join("scheduler_config.json"))
        .expect("scheduler");
    let sample = |sampler: &Path| {
        let mut cmd = bin();
        cmd.args(["--quiet", "sample", "--device", "cpu", "--num", "2", "--sampler"])
            .arg(sampler)
            .arg("--model")
            .arg(model)
            .arg("--out-npy")
            .arg(&out);
        cmd
    };
    let good = dir.join("good.json");
    write_sampler(&good, &scheduler, [1, 8, 8]);
    run_ok(&mut sample(&good));

    let cosine = dir.join("cosine.json");
    let other = ggdm_core::scheduler_config::SchedulerConfig {
        beta_schedule: ggdm_core::schedule::BetaSchedule::SquaredCosCapV2,
        ..scheduler.clone()
    };
    write_sampler(&cosine, &other, [1, 8, 8]);
    fails_naming(&mut sample(&cosine), &["schedule"]);

    let size = dir.join("size.json");
    write_sampler(&size, &scheduler, [1, 16, 16]);
    fails_naming(&mut sample(&size), &["16"]);

    let text = std::fs::read_to_string(&good).expect("read");
    let truncated = dir.join("truncated.json");
    std::fs::write(&truncated, &text[..text.len() / 2]).expect("write");
    fails_naming(&mut sample(&truncated), &["truncated.json"]);
    let nan = dir.join("zero-steps.json");
    let mut value: serde_json::Value = serde_json::from_str(&text).expect("json");
    value["steps"] = serde_json::json!(0);
    std::fs::write(&nan, value.to_string()).expect("write");
    fails_naming(&mut sample(&nan), &["zero-steps.json", "steps"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unwritable_outputs_and_full_disk() {
    let dir = temp_dir("bad-outputs");
    let (_, model, data) = shared();
    let file = dir.join("regular-file");
    std::fs::write(&file, "I am a file").expect("write");
    let under_file = file.join("out.npy");
    fails_naming(&mut sample_cmd(model, &under_file), &[&under_file.display().to_string()]);
    let mut grid = bin();
    grid.args(["--quiet", "sample", "--device", "cpu", "--sampler", "ddim", "--steps", "2", "--num", "2"])
        .arg("--model")
        .arg(model)
        .arg("--out")
        .arg(file.join("grid.png"));
    fails_naming(&mut grid, &["grid.png"]);
    let stats_out = file.join("stats.npz");
    fails_naming(&mut stats_cmd(data, &stats_out), &[&stats_out.display().to_string()]);
    let (_, model_dir, data_file) = shared();
    let config = dir.join("search.toml");
    std::fs::write(&config, tiny_search_config(model_dir, data_file, 2)).expect("config");
    let run_dir = file.join("run");
    fails_naming(
        bin().args(["--quiet", "search", "--device", "cpu"]).arg("--config").arg(&config).arg("--out").arg(&run_dir),
        &[&run_dir.display().to_string()],
    );

    // A full disk: /dev/full accepts opening and fails every write with ENOSPC.
    let full = Path::new("/dev/full");
    if full.exists() {
        let err = fails_naming(&mut sample_cmd(model, full), &["/dev/full"]);
        assert!(err.contains("No space left on device"), "{err}");
        let err = fails_naming(&mut stats_cmd(data, full), &["/dev/full"]);
        assert!(err.contains("No space left on device"), "{err}");
        assert!(std::fs::metadata(full).expect("still there").file_type().is_char_device_like());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

trait CharDevice {
    fn is_char_device_like(&self) -> bool;
}
impl CharDevice for std::fs::FileType {
    fn is_char_device_like(&self) -> bool {
        use std::os::unix::fs::FileTypeExt;
        self.is_char_device()
    }
}

#[test]
fn cuda_requested_without_cuda() {
    if tch::Cuda::is_available() {
        eprintln!("skipped: this machine has CUDA");
        return;
    }
    let (_, model, data) = shared();
    let dir = temp_dir("no-cuda");
    let mut cmd = bin();
    cmd.args(["--quiet", "sample", "--device", "cuda", "--sampler", "ddim", "--steps", "2", "--num", "2"])
        .arg("--model")
        .arg(model)
        .arg("--out-npy")
        .arg(dir.join("s.npy"));
    fails_naming(&mut cmd, &["--device cuda", "no CUDA device"]);
    let mut cmd = bin();
    cmd.args(["--quiet", "stats", "--device", "cuda:1"]).arg(data).arg("--out").arg(dir.join("s.npz"));
    fails_naming(&mut cmd, &["cuda:1"]);
    let mut cmd = bin();
    cmd.args(["--quiet", "stats", "--device", "tpu"]).arg(data).arg("--out").arg(dir.join("s.npz"));
    fails_naming(&mut cmd, &["tpu"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn search_resume_from_corrupt_or_foreign_checkpoint() {
    let dir = temp_dir("bad-resume");
    let (_, model, data) = shared();
    let config = dir.join("search.toml");
    std::fs::write(&config, tiny_search_config(model, data, 2)).expect("config");
    let search = |config: &Path, run: &Path, resume: bool| {
        let mut cmd = bin();
        cmd.args(["--quiet", "search", "--device", "cpu"]).arg("--config").arg(config).arg("--out").arg(run);
        if resume {
            cmd.arg("--resume");
        }
        cmd
    };
    let run = dir.join("run");
    fails_naming(&mut search(&config, &run, true), &["--resume", "run"]);
    run_ok(&mut search(&config, &run, false));
    fails_naming(&mut search(&config, &run, false), &["--resume", "checkpoint.safetensors"]);
    // The same run directory resumed with another K.
    let other = dir.join("k4.toml");
    std::fs::write(&other, tiny_search_config(model, data, 2).replacen("steps = 3", "steps = 4", 1)).expect("config");
    fails_naming(&mut search(&other, &run, true), &["grid_logits"]);
    // A torn or garbage checkpoint.
    let checkpoint = run.join("checkpoint.safetensors");
    let bytes = std::fs::read(&checkpoint).expect("read");
    std::fs::write(&checkpoint, &bytes[..bytes.len() / 3]).expect("truncate");
    fails_naming(&mut search(&config, &run, true), &["checkpoint.safetensors"]);
    let _ = std::fs::remove_dir_all(&dir);
}
