//! Helpers and pins shared by several tasks: the repository root, running commands, the pinned
//! Python packages and where the data lives.

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The libtorch version tch 0.24 matches; setup installs this torch into the venv.
pub const TORCH_VERSION: &str = "2.11.0";
/// The reference packages' UNet (the Python package's tests, fixtures and the bench reference).
pub const DIFFUSERS: &str = "diffusers==0.42.1";
/// Where the Debian package `dataset-fashion-mnist` puts Fashion-MNIST.
pub const FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// Repository root: xtask lives in `<root>/xtask`.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits one level below the repository root")
        .to_path_buf()
}

/// Runs `cmd` to the end; an error if it cannot start or does not succeed.
pub fn run_cmd(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("could not start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

/// The trimmed standard output of `cmd`, or `None` if it cannot start or does not succeed.
pub fn output_of(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A `cargo` command: the cargo that runs xtask (`$CARGO`), else the one on the `PATH`.
pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// The SHA-256 of `bytes` in hexadecimal.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// `path` relative to `root` when it lies inside it, else as it is.
pub fn relative_to(root: &Path, path: &str) -> String {
    Path::new(path).strip_prefix(root).map_or_else(|_| path.to_string(), |p| p.display().to_string())
}
