//! Helpers shared by the CLI end-to-end tests: running the binary and checking its outcome.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The `ddss-cli` binary under test.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ddss-cli"))
}

/// Runs a command that must succeed; returns its output.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("start ddss-cli");
    assert!(
        out.status.success(),
        "ddss-cli failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs a command that must fail cleanly (non-zero exit, no panic); returns its stderr.
pub fn run_err(cmd: &mut Command) -> String {
    let out = cmd.output().expect("start ddss-cli");
    assert!(!out.status.success(), "expected failure, got success: {}", String::from_utf8_lossy(&out.stdout));
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked"), "panic instead of an error: {stderr}");
    stderr
}

/// A fresh temporary folder for one test.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ddss-cli-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// A tiny UNet training config (8x8 grey images, two levels, attention) for fast CLI runs.
pub const TINY_TRAIN_CONFIG: &str = r#"
[model]
sample_size = 8
in_channels = 1
out_channels = 1
block_out_channels = [8, 16]
down_block_types = ["DownBlock2D", "AttnDownBlock2D"]
up_block_types = ["AttnUpBlock2D", "UpBlock2D"]
layers_per_block = 1
norm_num_groups = 4
attention_head_dim = 8

[train]
steps = 4
batch_size = 4
checkpoint_every = 2
log_every = 1
seed = 3

[train.lr]
lr = 1e-3
"#;

/// The shipped domain classifier `a` (a feature set that needs no Inception weights).
pub fn classifier_a_path() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/fmnist-classifier-a.safetensors")
}

/// An uncompressed IDX file of `count` deterministic grey `size` x `size` images.
pub fn write_idx(path: &std::path::Path, count: u32, size: u32) {
    write_idx_with(path, count, size, |i, x, y| ((i * 37 + y * 11 + x * 5 + (x * y) % 7 * 20) % 256) as u8);
}

/// An uncompressed IDX file of `count` grey `size` x `size` images, image `i` having
/// `pixel(i, x, y)` at (x, y).
pub fn write_idx_with(path: &std::path::Path, count: u32, size: u32, pixel: impl Fn(u32, u32, u32) -> u8) {
    let mut bytes = vec![0u8, 0, 8, 3];
    for d in [count, size, size] {
        bytes.extend(d.to_be_bytes());
    }
    for i in 0..count {
        for y in 0..size {
            for x in 0..size {
                bytes.push(pixel(i, x, y));
            }
        }
    }
    std::fs::write(path, bytes).expect("write idx");
}

/// `ddss-cli train` on the CPU with the given data, config and output folder.
pub fn train_cmd(data: &Path, config: &Path, out: &Path) -> Command {
    let mut cmd = bin();
    cmd.args(["train", "--device", "cpu"]).arg("--data").arg(data).arg("--config").arg(config).arg("--out").arg(out);
    cmd
}

/// Trains the tiny model of [`TINY_TRAIN_CONFIG`] for one step on 32 8x8 images in `dir`; returns
/// (model dir, data file).
pub fn tiny_model(dir: &std::path::Path) -> (PathBuf, PathBuf) {
    let data = dir.join("images.idx");
    write_idx(&data, 32, 8);
    let config = dir.join("tiny_train.toml");
    std::fs::write(&config, TINY_TRAIN_CONFIG).expect("config");
    let model = dir.join("model");
    run_ok(train_cmd(&data, &config, &model).args(["--quiet", "--steps", "1"]));
    (model, data)
}

/// The `[model]`, `[data]` (32 images), `[sampler]` (K = 3, trailing) and `[loss]` (classifier-a
/// KID) sections of a search config for the shipped model; callers add `[optim]` and `[eval]`.
pub fn shipped_search_head(data: &std::path::Path) -> String {
    model_and_data(std::path::Path::new(&repo("models/fashion-mnist-ddpm")), data, 32)
        + &format!(
            r#"
[sampler]
steps = 3
spacing = "trailing"

[loss]
kind = "kid"
features = "{classifier_a}"
"#,
            classifier_a = repo("models/fmnist-classifier-a.safetensors"),
        )
}

/// The `[model]` and `[data]` sections of a search config.
fn model_and_data(model: &std::path::Path, data: &std::path::Path, num: usize) -> String {
    format!("\n[model]\npath = \"{}\"\n\n[data]\npath = \"{}\"\nnum = {num}\n", model.display(), data.display())
}

/// A tiny search config (K = 3, batch 4, a checkpoint every step, classifier-a KID, no baselines)
/// for the model and data of [`tiny_model`].
pub fn tiny_search_config(model: &std::path::Path, data: &std::path::Path, steps: u64) -> String {
    model_and_data(model, data, 16)
        + &format!(
            r#"
[sampler]
steps = 3
eta = 0.0
spacing = "trailing"

[sampler.learn]
timesteps = true
coefficients = true
sigma = true
prediction = false

[loss]
features = "{features}"

[optim]
steps = {steps}
batch_size = 6
seed = 5
grad_clip = 1.0
validate_every = 2
validation_num = 6
checkpoint_every = 1

[optim.lr]
lr = 0.05

[eval]
num = 4
batch = 4
reference = "{data}"
compare = []
grid_num = 4
many_step = {{ steps = 0 }}

[output]
device = "cpu"
"#,
            data = data.display(),
            features = classifier_a_path().display(),
        )
}

/// A path inside the repository (models, configs), as a string for command lines.
pub fn repo(path: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(path).to_string_lossy().to_string()
}

/// Reads and parses a JSON file.
pub fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("read json")).expect("parse json")
}

/// `n` deterministic 28x28 grey images (Fashion-MNIST's size) as an uncompressed IDX file.
pub fn write_idx_28(path: &Path, n: u32) {
    let mut bytes = vec![0u8, 0, 8, 3];
    for d in [n, 28, 28] {
        bytes.extend(d.to_be_bytes());
    }
    for i in 0..n {
        for y in 0..28u32 {
            for x in 0..28u32 {
                let inside = (6..22).contains(&x) && (4 + i % 3..24).contains(&y);
                bytes.push(if inside { ((i * 29 + x * 7 + y * 3) % 160 + 90) as u8 } else { 0 });
            }
        }
    }
    std::fs::write(path, bytes).expect("write idx");
}

/// `ddss-cli --quiet search` on the CPU with `config` into `out` (`--resume` when `resume`).
pub fn search_cmd(config: &Path, out: &Path, resume: bool) -> Command {
    let mut cmd = bin();
    cmd.args(["--quiet", "search", "--device", "cpu"]).arg("--config").arg(config).arg("--out").arg(out);
    if resume {
        cmd.arg("--resume");
    }
    cmd
}

/// Starts `cmd` in the background with its output discarded.
pub fn spawn(mut cmd: Command) -> Child {
    cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("start ddss-cli")
}

/// The step of the run directory's checkpoint (0 when there is none or it cannot be read yet).
pub fn checkpoint_step(run: &Path) -> u64 {
    let path = run.join("checkpoint.safetensors");
    if !path.is_file() {
        return 0;
    }
    match tch::Tensor::read_safetensors(&path) {
        Ok(named) => named
            .iter()
            .find(|(n, _)| n == "meta")
            .map(|(_, t)| t.double_value(&[0]) as u64)
            .expect("a readable checkpoint always has its meta entry"),
        Err(e) => panic!("a checkpoint must never be torn: {e}"),
    }
}

/// Waits until the checkpoint reaches `step` (or the child exits), then kills the child with
/// SIGKILL. Returns the checkpoint's step after the kill.
pub fn kill_at_checkpoint(child: &mut Child, run: &Path, step: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            panic!("the run ended ({status}) before checkpoint {step}");
        }
        if checkpoint_step(run) >= step {
            break;
        }
        assert!(Instant::now() < deadline, "no checkpoint {step} after 120 s");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().expect("SIGKILL");
    let status = child.wait().expect("reap");
    let at = checkpoint_step(run);
    eprintln!("killed ({status}) with the checkpoint at step {at}");
    at
}

/// `sampler.json` without `provenance` (which records wall-clock seconds).
pub fn learned_part(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut value: serde_json::Value = serde_json::from_str(&text).expect("sampler.json is JSON");
    value.as_object_mut().expect("an object").remove("provenance");
    value
}

/// The entries of a run directory's checkpoint, sorted by name.
pub fn checkpoint_tensors(run: &Path) -> Vec<(String, tch::Tensor)> {
    let mut named = tch::Tensor::read_safetensors(run.join("checkpoint.safetensors")).expect("checkpoint");
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

/// Asserts that two run directories' checkpoints hold bit-identical entries.
pub fn assert_same_checkpoints(a: &Path, b: &Path) {
    let (a, b) = (checkpoint_tensors(a), checkpoint_tensors(b));
    assert_eq!(a.len(), b.len());
    for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(ta.equal(tb), "checkpoint entry {na} differs");
    }
}

/// [`tiny_search_config`] with `teacher = { TEACHER }` in its `[loss]` (e.g. `sampler = "unipc",
/// steps = 8, pairs = 8, cache = "..."`).
pub fn tiny_teacher_search_config(model: &Path, data: &Path, steps: u64, teacher: &str) -> String {
    tiny_search_config(model, data, steps).replacen("[loss]\n", &format!("[loss]\nteacher = {{ {teacher} }}\n"), 1)
}
