//! `cargo xtask search`: setup, a release build of `ddss-cli` and `ddss-cli search --config`, with
//! the config given by name or path ([`resolve_config`], which `cargo xtask bench` and
//! `cargo xtask table` use too).

use crate::setup::setup;
use crate::util::{cargo, repo_root, run_cmd};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Resolves `fashion_mnist.toml`, `fashion_mnist` or a path against `configs/`.
pub fn resolve_config(root: &Path, name: &str) -> Result<PathBuf> {
    let direct = PathBuf::from(name);
    if direct.is_file() {
        return Ok(direct);
    }
    let mut candidates = vec![root.join(name), root.join("configs").join(name)];
    if !name.ends_with(".toml") {
        candidates.push(root.join("configs").join(format!("{name}.toml")));
    }
    candidates.into_iter().find(|p| p.is_file()).with_context(|| {
        let known: Vec<String> = std::fs::read_dir(root.join("configs"))
            .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().to_string()).collect())
            .unwrap_or_default();
        format!("config `{name}` not found as a path or under configs/ (known: {})", known.join(", "))
    })
}

/// `cargo xtask search [--config NAME_OR_PATH] [ddss-cli search arguments]` (default config:
/// `fashion_mnist.toml`); the other arguments go to `ddss-cli search` as they are.
pub fn search(rest: &[String]) -> Result<()> {
    let root = repo_root();
    let mut forwarded = Vec::new();
    let mut config = None;
    let mut it = rest.iter();
    while let Some(arg) = it.next() {
        if arg == "--config" {
            config = Some(it.next().context("--config needs a value")?.clone());
        } else if let Some(v) = arg.strip_prefix("--config=") {
            config = Some(v.to_string());
        } else {
            forwarded.push(arg.clone());
        }
    }
    let config = config.unwrap_or_else(|| "fashion_mnist.toml".to_string());
    let config = resolve_config(&root, &config)?;
    setup()?;
    println!("[search] building ddss-cli (release)");
    run_cmd(cargo().current_dir(&root).args(["build", "--release", "-p", "ddss-cli"]))?;
    let bin = root.join("target").join("release").join("ddss-cli");
    println!("[search] {} search --config {}", bin.display(), config.display());
    run_cmd(Command::new(bin).current_dir(&root).arg("search").arg("--config").arg(&config).args(forwarded))
}
