//! CPU kernel sets: libtorch picks its CPU kernels by the instruction set it finds (ATen:
//! AVX-512, AVX2 or none; oneDNN's convolutions separately), so the last bits of a result, and
//! everything that depends on them, differ between machines. Two environment variables make this
//! machine pick another machine's kernels: `ATEN_CPU_CAPABILITY` (`avx512`, `avx2`, `default`) and
//! `ONEDNN_MAX_CPU_ISA` (`AVX512_CORE`, `AVX2`, `SSE41`, ...). Setting only the first leaves the
//! convolutions on this machine's oneDNN kernels, which is not what another machine runs.
//!
//! `cargo xtask test-kernels` runs the numerics-sensitive test targets (the reference-fixture tests
//! of ggdm-core, ggdm-nets, fid-metrics, ddss-opt and tests/) under the AVX2 and the unvectorised kernel sets;
//! `cargo xtask test` says which kernels it runs with.

use crate::util::{cargo, run_cmd};
use anyhow::{bail, Result};
use std::path::Path;
use std::process::Command;

/// The packages whose tests compare against committed reference numbers.
const NUMERICS_PACKAGES: [&str; 5] = ["ggdm-core", "ggdm-nets", "fid-metrics", "ddss-opt", "ddss-tests"];

/// A kernel set another x86-64 machine would use: ATen's capability and the matching oneDNN ISA.
#[derive(Debug, Clone, Copy)]
pub struct KernelSet {
    pub aten: &'static str,
    pub onednn: &'static str,
}

/// AVX2 without AVX-512 (e.g. AMD EPYC Rome/Milan, most desktops), and no vectorisation at all.
pub const OTHER_MACHINES: [KernelSet; 2] =
    [KernelSet { aten: "avx2", onednn: "AVX2" }, KernelSet { aten: "default", onednn: "SSE41" }];

impl KernelSet {
    /// By ATen's name (`avx512`, `avx2`, `default`).
    pub fn named(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "avx512" => Ok(KernelSet { aten: "avx512", onednn: "AVX512_CORE" }),
            "avx2" => Ok(OTHER_MACHINES[0]),
            "default" => Ok(OTHER_MACHINES[1]),
            other => bail!("unknown kernel set `{other}` (expected avx512, avx2 or default)"),
        }
    }

    /// Sets both variables on `cmd`.
    pub fn apply<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        cmd.env("ATEN_CPU_CAPABILITY", self.aten).env("ONEDNN_MAX_CPU_ISA", self.onednn)
    }
}

/// When the caller set `ATEN_CPU_CAPABILITY` but not `ONEDNN_MAX_CPU_ISA`, sets the matching
/// oneDNN ISA for this process's children, so that both halves of libtorch use the same machine's
/// kernels. Returns a line saying which kernels the children use.
pub fn align_with_caller() -> Result<String> {
    let aten = std::env::var("ATEN_CPU_CAPABILITY").ok().filter(|v| !v.is_empty());
    let onednn = std::env::var("ONEDNN_MAX_CPU_ISA").ok().filter(|v| !v.is_empty());
    Ok(match (aten, onednn) {
        (None, None) => "this machine's own (ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA unset)".to_string(),
        (Some(aten), None) => {
            let set = KernelSet::named(&aten)?;
            // Only this process's children read it; xtask itself is single-threaded here.
            std::env::set_var("ONEDNN_MAX_CPU_ISA", set.onednn);
            format!("ATEN_CPU_CAPABILITY={aten}, ONEDNN_MAX_CPU_ISA={} (set to match)", set.onednn)
        }
        (aten, Some(onednn)) => {
            format!("ATEN_CPU_CAPABILITY={}, ONEDNN_MAX_CPU_ISA={onednn}", aten.as_deref().unwrap_or("unset"))
        }
    })
}

/// The capability torch itself reports under `set` (`None`: this machine's own choice).
fn reported_capability(python: &Path, set: Option<KernelSet>) -> String {
    let mut cmd = Command::new(python);
    cmd.args(["-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"]);
    if let Some(set) = set {
        set.apply(&mut cmd);
    }
    match cmd.output() {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().to_string(),
        _ => "unknown (torch could not be asked)".to_string(),
    }
}

/// Runs the numerics-sensitive test targets once per kernel set, saying which set each run used.
pub fn test_kernels(root: &Path, python: &Path, sets: &[KernelSet], extra: &[String]) -> Result<()> {
    for set in sets {
        println!(
            "[test-kernels] ATEN_CPU_CAPABILITY={} ONEDNN_MAX_CPU_ISA={} (torch reports {}; this machine alone: {})",
            set.aten,
            set.onednn,
            reported_capability(python, Some(*set)),
            reported_capability(python, None)
        );
        let start = std::time::Instant::now();
        let mut cmd = cargo();
        cmd.current_dir(root).arg("test");
        for package in NUMERICS_PACKAGES {
            cmd.args(["-p", package]);
        }
        run_cmd(set.apply(cmd.args(extra)))?;
        println!("[test-kernels] {} kernels: passed in {:.0} s", set.aten, start.elapsed().as_secs_f64());
    }
    Ok(())
}
