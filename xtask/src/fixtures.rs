//! `cargo xtask fixtures`: installs the pinned reference packages (diffusers, pytorch-fid, ...)
//! into the venv and regenerates the committed reference fixtures by running each script of
//! `tests/scripts/` (but `common.py`) in name order.

use crate::setup::{installed_version, setup, site_packages};
use crate::util::{repo_root, run_cmd, DIFFUSERS, TORCH_VERSION};
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::process::Command;

/// `cargo xtask fixtures`.
pub fn fixtures() -> Result<()> {
    let env = setup()?;
    let root = repo_root();
    let site = site_packages(&env.venv).context("venv has no site-packages")?;
    let diffusers_ok = installed_version(&site, "diffusers-").as_deref() == Some(&DIFFUSERS["diffusers==".len()..]);
    if !diffusers_ok || installed_version(&site, "pytorch_fid-").is_none() {
        println!("[fixtures] installing {DIFFUSERS} scipy pytorch-fid into the venv (torch stays {TORCH_VERSION})");
        // pytorch-fid pulls in torchvision; naming torch's version keeps pip from upgrading the
        // libtorch that tch links against to whatever the newest torchvision wants.
        let torch = format!("torch=={TORCH_VERSION}");
        run_cmd(Command::new(&env.python).args(["-m", "pip", "install", "--disable-pip-version-check", "-q"]).args([
            DIFFUSERS,
            "scipy",
            "pytorch-fid==0.3.0",
            "safetensors",
            torch.as_str(),
        ]))?;
    }
    let scripts = root.join("tests").join("scripts");
    let mut names: Vec<PathBuf> = std::fs::read_dir(&scripts)
        .with_context(|| format!("reading {}", scripts.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "py") && !p.ends_with("common.py"))
        .collect();
    names.sort();
    for script in names {
        println!("[fixtures] {}", script.display());
        run_cmd(Command::new(&env.python).arg(&script).current_dir(&root))?;
    }
    Ok(())
}
