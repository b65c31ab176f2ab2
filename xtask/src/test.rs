//! `cargo xtask test`: setup, then `cargo fmt --check`, `cargo clippy -D warnings`,
//! `cargo test --workspace`, the benchmark table's tests and the Python package's tests; the
//! cuda-graphs feature's clippy and test where this libtorch has the CUDA headers; with `--mpi`,
//! also clippy with `ddss-cli/mpi` and the `mpirun` test of `ddss-cli`.
//!
//! `cargo xtask test-kernels`: the numerics-sensitive tests under other machines' CPU kernels
//! ([`crate::kernels`]).

use crate::kernels;
use crate::setup::{mpi_setup, setup, site_packages};
use crate::util::{cargo, repo_root, run_cmd};
use anyhow::Result;
use std::path::Path;
use std::process::Command;

/// `cargo xtask test [--mpi] [cargo test arguments]`.
pub fn test(extra: &[String]) -> Result<()> {
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
    python_tests(&root, &env.python)?;
    let cuda_headers = site_packages(&env.venv)
        .map(|site| site.join("nvidia/cu13/include/crt/host_config.h").exists())
        .unwrap_or(false);
    if cuda_headers {
        cuda_graphs_tests(&root)?;
    } else {
        println!("[test] the cuda-graphs feature: skipped (this libtorch has no CUDA runtime headers)");
    }
    if with_mpi {
        mpi_tests(&root)?;
    }
    Ok(())
}

/// The benchmark table's tests (`bench/reference`, unittest) and the Python package's tests
/// (`python/tests`, pytest), with the venv's `python`.
fn python_tests(root: &Path, python: &Path) -> Result<()> {
    println!("[test] bench/reference/test_table.py (the benchmark table's verdicts)");
    run_cmd(Command::new(python).current_dir(root.join("bench").join("reference")).args([
        "-m",
        "unittest",
        "discover",
        "-p",
        "test_*.py",
    ]))?;
    println!("[test] python/tests (the Python package against ddss-cli's fixtures and diffusers)");
    run_cmd(
        Command::new(python)
            .current_dir(root)
            .env("PYTHONPATH", root.join("python"))
            .env("OMP_NUM_THREADS", std::env::var("OMP_NUM_THREADS").unwrap_or_else(|_| "1".into()))
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "python/tests"]),
    )
}

/// Clippy with the cuda-graphs feature, and its test (which skips without a GPU).
fn cuda_graphs_tests(root: &Path) -> Result<()> {
    println!("[test] the cuda-graphs feature: clippy -D warnings, and its test (skips without a GPU)");
    run_cmd(
        cargo()
            .current_dir(root)
            .args(["clippy", "-p", "ggdm-nets", "-p", "ddss-cli", "--all-targets", "--features"])
            .args(["ddss-cli/cuda-graphs,ggdm-nets/cuda-graphs", "--", "-D", "warnings"]),
    )?;
    run_cmd(cargo().current_dir(root).args([
        "test",
        "-p",
        "ggdm-nets",
        "--features",
        "cuda-graphs",
        "--test",
        "cuda_graphs",
    ]))
}

/// Clippy with the mpi feature, and the `mpirun` test of `ddss-cli`.
fn mpi_tests(root: &Path) -> Result<()> {
    println!("[test] cargo clippy -p ddss-cli --features mpi -D warnings");
    run_cmd(
        cargo()
            .current_dir(root)
            .args(["clippy", "-p", "ddss-opt", "-p", "ddss-cli", "--all-targets", "--features", "ddss-cli/mpi", "--"])
            .args(["-D", "warnings"]),
    )?;
    println!("[test] cargo test -p ddss-cli --features mpi --test mpi (mpirun -n 2)");
    run_cmd(cargo().current_dir(root).args(["test", "-p", "ddss-cli", "--features", "mpi", "--test", "mpi"]))
}

/// `cargo xtask test-kernels [avx2|default ...] [-- cargo test arguments]`.
pub fn test_kernels(args: &[String]) -> Result<()> {
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
