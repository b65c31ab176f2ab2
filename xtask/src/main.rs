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

mod bench;
mod fixtures;
mod kernels;
mod search;
mod setup;
mod table;
mod test;
mod util;

use anyhow::{bail, Result};

fn main() {
    if let Err(err) = run() {
        eprintln!("xtask: error: {err:#}");
        std::process::exit(1);
    }
}

/// The text of `cargo xtask help`.
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
     \x20 test-kernels [avx2|default ...] the numerics-sensitive tests (ggdm-core, ggdm-nets, fid-metrics,\n\
     \x20                                ddss-opt, tests/) with another machine's CPU kernels: ATEN_CPU_CAPABILITY and\n\
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

/// Runs the command named by the first argument with the others.
fn run() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let cmd = args.next().unwrap_or_default();
    let rest: Vec<String> = args.collect();
    match cmd.as_str() {
        "setup" => {
            setup::setup()?;
            if rest.iter().any(|a| a == "--mpi") {
                setup::mpi_setup()?;
            }
            Ok(())
        }
        "test" => test::test(&rest),
        "test-kernels" => test::test_kernels(&rest),
        "search" => search::search(&rest),
        "fixtures" => fixtures::fixtures(),
        "bench" => bench::bench(&rest),
        "table" => table::table(&rest),
        "" | "help" | "-h" | "--help" => {
            println!("{}", usage());
            Ok(())
        }
        other => bail!("unknown command `{other}`\n\n{}", usage()),
    }
}
