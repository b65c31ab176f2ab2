//! Helpers shared by the CLI end-to-end tests: running the binary and checking its outcome.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};

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
