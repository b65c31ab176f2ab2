//! Inputs that real folders and real mistakes produce: image folders holding other files,
//! subfolders and symlinks (read as pytorch-fid reads them, `--recursive` for subfolders), sizes
//! too large for memory, NaN in `.npy`/`.npz` inputs, `.npz` members whose header declares more
//! data than they hold, progress lines when stderr is a file, and `ddss-cli sample` with no
//! arguments. Each case runs the binary; none allocates much memory.

mod common;
use common::*;

use std::path::Path;
use std::process::Command;

/// Runs a command that must fail cleanly and whose stderr must name every needle.
fn fails_naming(cmd: &mut Command, needles: &[&str]) -> String {
    let out = cmd.output().expect("start ddss-cli");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "expected exit 1:\n{err}");
    for marker in ["panicked", "stack backtrace", "memory allocation of"] {
        assert!(!err.contains(marker), "`{marker}` in stderr:\n{err}");
    }
    for needle in needles {
        assert!(err.contains(needle), "stderr does not name `{needle}`:\n{err}");
    }
    err
}

/// A 28 x 28 grey PNG whose pixels depend on `seed`.
fn png(path: &Path, seed: u32) {
    image::GrayImage::from_fn(28, 28, |x, y| image::Luma([((x * 7 + y * 3 + seed * 31) % 256) as u8]))
        .save(path)
        .expect("png");
}

/// `ddss-cli stats` with classifier-a features (no Inception weights needed); INFO lines on.
fn stats(source: &Path, out: &Path) -> Command {
    let mut cmd = bin();
    cmd.args(["stats", "--device", "cpu", "--features"]).arg(classifier_a_path()).arg(source).arg("--out").arg(out);
    cmd
}

/// The number of images `stats` reports in its "wrote ...: mu, sigma and features (N x d)" line.
fn images_counted(stdout: &[u8]) -> usize {
    let text = String::from_utf8_lossy(stdout);
    let inside = text.split("features (").nth(1).unwrap_or_else(|| panic!("no count in: {text}"));
    inside.split(' ').next().and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("no count in: {text}"))
}

#[test]
fn a_real_folder_with_other_files_subfolders_and_symlinks_is_read_like_pytorch_fid() {
    let dir = temp_dir("real-folder");
    let images = dir.join("images");
    let elsewhere = dir.join("elsewhere");
    for folder in [&images, &images.join("plain"), &elsewhere] {
        std::fs::create_dir_all(folder).expect("folder");
    }
    png(&images.join("0.png"), 0);
    png(&images.join("1.PNG"), 1);
    png(&images.join("2.png"), 2);
    std::fs::write(images.join("README.txt"), "real folders hold notes").expect("write");
    std::fs::write(images.join("Thumbs.db"), [0u8, 1, 2, 3]).expect("write");
    std::fs::write(images.join(".DS_Store"), [0u8; 8]).expect("write");
    png(&images.join("plain/3.png"), 3);
    png(&images.join("plain/4.png"), 4);
    png(&elsewhere.join("5.png"), 5);
    std::os::unix::fs::symlink(&elsewhere, images.join("linked")).expect("symlink");
    std::os::unix::fs::symlink(&images, images.join("plain/loop")).expect("symlink");
    let out = dir.join("s.npz");

    let flat = run_ok(&mut stats(&images, &out));
    assert_eq!(images_counted(&flat.stdout), 3, "the top-level images only");
    let log = String::from_utf8_lossy(&flat.stderr);
    assert!(log.contains("INFO") && log.contains("3 image file(s); skipped 5:"), "{log}");
    assert!(log.contains("2 without an image extension (README.txt, Thumbs.db)"), "{log}");
    assert!(log.contains("2 subfolder(s)"), "{log}");

    let recursive = run_ok(stats(&images, &out).arg("--recursive"));
    assert_eq!(images_counted(&recursive.stdout), 6, "subfolders too, the loop once");
    let mut fid = bin();
    fid.args(["--quiet", "fid", "--recursive", "--json", "--device", "cpu", "--features"])
        .arg(classifier_a_path())
        .arg(&images)
        .arg(&out);
    let report: serde_json::Value = serde_json::from_slice(&run_ok(&mut fid).stdout).expect("json");
    assert!(report["fid"].as_f64().expect("fid").abs() < 1e-3, "the same six images: {report}");

    let empty = dir.join("only-notes");
    std::fs::create_dir_all(empty.join("sub")).expect("folder");
    std::fs::write(empty.join("README.txt"), "no images here").expect("write");
    fails_naming(&mut stats(&empty, &out), &["only-notes", "no image files", "1 subfolder"]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The shipped Fashion-MNIST model.
fn shipped_model() -> String {
    repo("models/fashion-mnist-ddpm")
}

#[test]
fn nan_noise_or_statistics_are_refused_naming_the_file() {
    let dir = temp_dir("nan-inputs");
    let mut noise = ndarray::Array4::<f32>::zeros((2, 1, 28, 28));
    noise[[1, 0, 3, 4]] = f32::NAN;
    let noise_path = dir.join("noise-with-nan.npy");
    ndarray_npy::write_npy(&noise_path, &noise).expect("npy");
    let mut sample = bin();
    sample.args(["--quiet", "sample", "--device", "cpu", "--sampler", "ddim", "--steps", "2", "--model"]);
    sample.arg(shipped_model()).arg("--init-noise").arg(&noise_path).arg("--out-npy").arg(dir.join("x.npy"));
    fails_naming(&mut sample, &["--init-noise", "noise-with-nan.npy", "NaN", "[1, 0, 3, 4]"]);
    assert!(!dir.join("x.npy").exists());
    noise[[1, 0, 3, 4]] = f32::INFINITY;
    ndarray_npy::write_npy(&noise_path, &noise).expect("npy");
    fails_naming(&mut sample, &["noise-with-nan.npy", "inf", "[1, 0, 3, 4]"]);

    let stats_path = dir.join("stats-with-nan.npz");
    let mut sigma = ndarray::Array2::<f64>::eye(128);
    sigma[[5, 7]] = f64::NAN;
    let mut writer = ndarray_npy::NpzWriter::new(std::fs::File::create(&stats_path).expect("create"));
    writer.add_array("mu", &ndarray::Array1::<f64>::zeros(128)).expect("mu");
    writer.add_array("sigma", &sigma).expect("sigma");
    writer.finish().expect("npz");
    let good = dir.join("good.npz");
    let mut writer = ndarray_npy::NpzWriter::new(std::fs::File::create(&good).expect("create"));
    writer.add_array("mu", &ndarray::Array1::<f64>::zeros(128)).expect("mu");
    writer.add_array("sigma", &ndarray::Array2::<f64>::eye(128)).expect("sigma");
    writer.finish().expect("npz");
    let mut fid = bin();
    fid.args(["--quiet", "fid"]).arg(&good).arg(&stats_path);
    fails_naming(&mut fid, &["stats-with-nan.npz", "sigma", "NaN", "[5, 7]"]);
    let mut eval = bin();
    eval.args(["--quiet", "eval", "--device", "cpu", "--sampler", "ddim", "--steps", "2", "--num", "4"])
        .arg("--model")
        .arg(shipped_model())
        .arg("--features")
        .arg(classifier_a_path())
        .arg("--ref")
        .arg(&stats_path);
    fails_naming(&mut eval, &["--ref", "stats-with-nan.npz", "sigma"]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Rewrites the `.npy` header of the member `member` of a stored (uncompressed) `.npz` in place so
/// that it declares float64 data of `shape` (a Python tuple), keeping the header's length and the
/// member's data. The member's CRC is left as it was: readers must refuse the file before that.
fn declare_shape_in_npz(path: &Path, member: &str, shape: &str) {
    let mut bytes = std::fs::read(path).expect("read npz");
    let name = bytes.windows(member.len()).position(|w| w == member.as_bytes()).expect("member name");
    let magic = name + bytes[name..].windows(6).position(|w| w == b"\x93NUMPY").expect("npy magic");
    assert_eq!(bytes[magic + 6], 1, "an .npy version 1 header");
    let len = u16::from_le_bytes([bytes[magic + 8], bytes[magic + 9]]) as usize;
    let dict = format!("{{'descr': '<f8', 'fortran_order': False, 'shape': {shape}, }}");
    assert!(dict.len() < len, "the new header must fit in the old one's {len} bytes");
    let header = format!("{dict:<width$}\n", width = len - 1);
    bytes[magic + 10..magic + 10 + len].copy_from_slice(header.as_bytes());
    std::fs::write(path, &bytes).expect("write npz");
}

#[test]
fn statistics_declaring_a_huge_shape_fail_naming_the_file_instead_of_aborting() {
    let dir = temp_dir("huge-npz-shape");
    let write_stats = |path: &Path| {
        let mut writer = ndarray_npy::NpzWriter::new(std::fs::File::create(path).expect("create"));
        writer.add_array("mu", &ndarray::Array1::<f64>::zeros(16)).expect("mu");
        writer.add_array("sigma", &ndarray::Array2::<f64>::eye(16)).expect("sigma");
        writer.finish().expect("npz");
    };
    let good = dir.join("good.npz");
    write_stats(&good);
    let lying = dir.join("lying.npz");
    write_stats(&lying);
    // 80 GB declared over the 2048 bytes of a 16 x 16 float64 matrix.
    declare_shape_in_npz(&lying, "sigma.npy", "(100000, 100000)");
    let mut fid = bin();
    fid.args(["--quiet", "fid"]).arg(&good).arg(&lying);
    fails_naming(&mut fid, &["lying.npz", "member sigma.npy", "(100000, 100000)", "80000000000 bytes", "2048"]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `cmd` with stderr written to `log` (not a terminal), as under nohup or a batch scheduler;
/// returns the log.
fn run_logged(cmd: &mut Command, log: &Path) -> String {
    let file = std::fs::File::create(log).expect("log file");
    let status = cmd.stderr(std::process::Stdio::from(file)).status().expect("start ddss-cli");
    let text = std::fs::read_to_string(log).expect("read log");
    assert!(status.success(), "ddss-cli failed: {status}\n{text}");
    text
}

/// The `(N, M)` of every `WHAT: step N/M` progress line of `log`.
fn step_lines(log: &str, what: &str) -> Vec<(u64, u64)> {
    let prefix = format!("{what}: step ");
    log.lines()
        .filter_map(|line| line.split_once(prefix.as_str()).map(|(_, rest)| rest))
        .filter_map(|rest| {
            let (n, m) = rest.split_once(' ').map_or(rest, |(pos, _)| pos).split_once('/')?;
            Some((n.parse().ok()?, m.parse().ok()?))
        })
        .collect()
}

#[test]
fn train_prints_progress_lines_when_stderr_is_a_file() {
    let dir = temp_dir("train-progress-lines");
    let data = dir.join("images.idx");
    write_idx(&data, 32, 8);
    let config = dir.join("tiny_train.toml");
    std::fs::write(&config, TINY_TRAIN_CONFIG).expect("config");
    let log = run_logged(train_cmd(&data, &config, &dir.join("model")).args(["--steps", "3"]), &dir.join("train.log"));
    let steps = step_lines(&log, "train");
    assert_eq!(steps.first(), Some(&(1, 3)), "a line at the first step:\n{log}");
    assert_eq!(steps.last(), Some(&(3, 3)), "a line at the last step:\n{log}");
    let last = log.lines().rev().find(|l| l.contains("train: step 3/3")).expect("last line");
    assert!(last.contains("steps/s") && last.contains("ETA") && last.contains("loss "), "{last}");
    assert!(!log.contains('\u{1b}'), "no colour codes in a log file:\n{log}");
    let quiet = run_logged(
        train_cmd(&data, &config, &dir.join("quiet")).args(["--quiet", "--steps", "2"]),
        &dir.join("quiet.log"),
    );
    assert!(step_lines(&quiet, "train").is_empty(), "--quiet prints no progress:\n{quiet}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn search_and_its_comparison_print_progress_lines_when_stderr_is_a_file() {
    let dir = temp_dir("search-progress-lines");
    let (model, data) = tiny_model(&dir);
    let config = dir.join("search.toml");
    std::fs::write(&config, tiny_search_config(&model, &data, 3)).expect("config");
    let mut search = bin();
    search.args(["search", "--device", "cpu", "--config"]).arg(&config).arg("--out").arg(dir.join("run"));
    let log = run_logged(&mut search, &dir.join("search.log"));
    let steps = step_lines(&log, "search");
    assert_eq!((steps.first(), steps.last()), (Some(&(1, 3)), Some(&(3, 3))), "{log}");
    let last = log.lines().rev().find(|l| l.contains("search: step 3/3")).expect("last line");
    assert!(last.contains("loss ") && last.contains("ETA"), "{last}");
    assert!(log.contains("real features: 16/16"), "{log}");
    assert!(log.lines().any(|l| l.contains("eval learned K=3: 4/4")), "the comparison reports progress:\n{log}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A copy of the shipped model in `dir/name` whose `config.json` says `sample_size = size`.
fn shipped_model_with_sample_size(dir: &Path, name: &str, size: u64) -> std::path::PathBuf {
    let copy = dir.join(name);
    std::fs::create_dir_all(&copy).expect("model copy");
    let shipped = Path::new(&shipped_model()).to_path_buf();
    for file in ["diffusion_pytorch_model.safetensors", "scheduler_config.json"] {
        std::fs::copy(shipped.join(file), copy.join(file)).expect("copy model file");
    }
    let mut config = json(&shipped.join("config.json"));
    config["sample_size"] = size.into();
    std::fs::write(copy.join("config.json"), config.to_string()).expect("config.json");
    copy
}

fn sample_on(model: &Path, out: &Path) -> Command {
    let mut cmd = bin();
    cmd.args(["--quiet", "sample", "--device", "cpu", "--sampler", "ddim", "--steps", "2", "--model"]);
    cmd.arg(model).arg("--out").arg(out);
    cmd
}

#[test]
fn sizes_too_large_for_memory_fail_naming_the_value_instead_of_aborting() {
    let dir = temp_dir("absurd-sizes");
    let out = dir.join("grid.png");
    let huge = shipped_model_with_sample_size(&dir, "huge", 100_000);
    fails_naming(sample_on(&huge, &out).args(["--num", "1"]), &["config.json", "sample_size = 100000", "fits"]);
    let mut eval = bin();
    eval.args(["--quiet", "eval", "--device", "cpu", "--sampler", "ddim", "--steps", "2", "--num", "4", "--features"])
        .arg(classifier_a_path())
        .arg("--model")
        .arg(&huge)
        .arg("--ref")
        .arg(repo("tests/fixtures/fid/pytorch_fid_stats.npz"));
    fails_naming(&mut eval, &["config.json", "sample_size = 100000"]);
    let data = dir.join("images.idx");
    write_idx(&data, 16, 8);
    let search_config = dir.join("search.toml");
    std::fs::write(&search_config, tiny_search_config(&huge, &data, 2)).expect("config");
    let mut search = bin();
    search.args(["--quiet", "search", "--config"]).arg(&search_config).arg("--out").arg(dir.join("run"));
    fails_naming(&mut search, &["config.json", "sample_size = 100000"]);

    let shipped = Path::new(&shipped_model()).to_path_buf();
    let billion = "1000000000000";
    fails_naming(
        sample_on(&shipped, &out).args(["--num", billion, "--batch", "16"]),
        &["--num 1000000000000", "--num"],
    );
    fails_naming(sample_on(&shipped, &out).args(["--num", billion, "--batch", billion]), &["--batch 1000000000000"]);
    let mut eval_batch = bin();
    eval_batch
        .args(["--quiet", "eval", "--device", "cpu", "--sampler", "ddim", "--steps", "2", "--features"])
        .arg(classifier_a_path())
        .args(["--num", billion, "--batch", billion, "--model"])
        .arg(&shipped)
        .arg("--ref")
        .arg(repo("tests/fixtures/fid/pytorch_fid_stats.npz"));
    fails_naming(&mut eval_batch, &["--batch 1000000000000"]);
    let train_config = dir.join("train.toml");
    std::fs::write(&train_config, TINY_TRAIN_CONFIG.replace("batch_size = 4", &format!("batch_size = {billion}")))
        .expect("config");
    fails_naming(train_cmd(&data, &train_config, &dir.join("model")).arg("--quiet"), &["[train] batch_size", billion]);
    assert!(!out.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// `ddss-cli ARGS` run in `dir` with stderr captured; must succeed; returns stderr.
fn run_in(dir: &Path, args: &[&str]) -> String {
    let out = run_ok(bin().current_dir(dir).args(args));
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn sample_without_arguments_samples_the_shipped_model_with_the_default_search_sampler_or_unipc() {
    let dir = temp_dir("sample-defaults");
    std::fs::create_dir_all(dir.join("models")).expect("models");
    std::os::unix::fs::symlink(shipped_model(), dir.join("models/fashion-mnist-ddpm")).expect("symlink");
    let log = run_in(&dir, &["sample"]);
    for needle in
        ["models/fashion-mnist-ddpm", "--model DIR", "unipc with 10 steps", "--sampler", "samples.png", "--out"]
    {
        assert!(log.contains(needle), "stderr does not name `{needle}`:\n{log}");
    }
    let grid = image::open(dir.join("samples.png")).expect("a PNG grid");
    // 28 px samples scaled up 3x to 84 px tiles.
    assert_eq!((grid.width(), grid.height()), (8 * 86 + 2, 8 * 86 + 2), "64 samples of 84x84 with 2-pixel gaps");

    // Once the default search has run, its learned sampler is the default.
    let data = dir.join("images.idx");
    write_idx(&data, 32, 28);
    let config = dir.join("search.toml");
    std::fs::write(&config, tiny_search_config(Path::new(&shipped_model()), &data, 1)).expect("config");
    run_ok(
        bin()
            .args(["--quiet", "search", "--skip-eval", "--config"])
            .arg(&config)
            .arg("--out")
            .arg(dir.join("runs/fashion_mnist")),
    );
    let log = run_in(&dir, &["sample", "--num", "4", "--out", "learned.png"]);
    assert!(log.contains("runs/fashion_mnist/sampler.json") && log.contains("(3 steps)"), "{log}");
    assert!(dir.join("learned.png").is_file());
    let _ = std::fs::remove_dir_all(&dir);
}
