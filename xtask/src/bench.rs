//! `cargo xtask bench`: ours (`ddss-cli bench-unroll`) next to the PyTorch reference of
//! `bench/reference/` (DDSS step time and memory, sampling and feature throughput), one process per
//! measurement, as a Markdown table.

use crate::search::resolve_config;
use crate::setup::setup;
use crate::util::{cargo, output_of, relative_to, repo_root, run_cmd, DIFFUSERS};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

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
    switches: Switches,
    out: PathBuf,
}

/// The on/off choices of `cargo xtask bench`, the same as given and as planned.
struct Switches {
    /// `--json`: print the JSON lines too.
    json: bool,
    /// Also run the PyTorch reference (`--no-reference` turns it off).
    reference: bool,
    /// Also run ours with the fixed-budget remat (`--no-budget` turns it off).
    budget: bool,
    /// Also run ours with a memory-budget remat of this many MiB.
    memory_budget: Option<String>,
    /// Also run ours with `--cuda-graphs` (per-call/budget steps and sampling).
    cuda_graphs: bool,
    /// cuDNN benchmark mode on both sides.
    cudnn_benchmark: bool,
}

/// The flags of `cargo xtask bench` as given; [`parse_bench`] fills in the defaults that depend on
/// the device and the model.
struct BenchArgs {
    device: String,
    batch: Option<String>,
    steps: Vec<String>,
    sample_batch: Option<String>,
    features_batch: Option<String>,
    warmup: String,
    repeat: String,
    config: Option<String>,
    model: Option<String>,
    random_weights: bool,
    switches: Switches,
    out: Option<PathBuf>,
}

impl BenchArgs {
    /// Reads the flags from `rest`; an error for an unknown flag or a flag without its value.
    fn parse(rest: &[String]) -> Result<Self> {
        let mut args = BenchArgs {
            device: "cpu".to_string(),
            batch: None,
            steps: vec!["5".to_string(), "10".to_string(), "20".to_string()],
            sample_batch: None,
            features_batch: None,
            warmup: "1".to_string(),
            repeat: "3".to_string(),
            config: None,
            model: None,
            random_weights: false,
            switches: Switches {
                json: false,
                reference: true,
                budget: true,
                memory_budget: None,
                cuda_graphs: false,
                cudnn_benchmark: false,
            },
            out: None,
        };
        let mut it = rest.iter();
        while let Some(arg) = it.next() {
            let mut value = || it.next().cloned().with_context(|| format!("{arg} needs a value"));
            match arg.as_str() {
                "--device" => args.device = value()?,
                "--batch" => args.batch = Some(value()?),
                "--steps" => args.steps = value()?.split(',').map(str::to_string).collect(),
                "--sample-batch" => args.sample_batch = Some(value()?),
                "--features-batch" => args.features_batch = Some(value()?),
                "--warmup" => args.warmup = value()?,
                "--repeat" => args.repeat = value()?,
                "--config" => args.config = Some(value()?),
                "--model" => args.model = Some(value()?),
                "--random-weights" => args.random_weights = true,
                "--json" => args.switches.json = true,
                "--no-reference" => args.switches.reference = false,
                "--no-budget" => args.switches.budget = false,
                "--memory-budget" => {
                    let mib = value()?;
                    mib.parse::<u64>()
                        .with_context(|| format!("--memory-budget {mib}: expected a whole number of MiB"))?;
                    args.switches.memory_budget = Some(mib);
                }
                "--cuda-graphs" => args.switches.cuda_graphs = true,
                "--cudnn-benchmark" => args.switches.cudnn_benchmark = true,
                "--out" => args.out = Some(PathBuf::from(value()?)),
                other => bail!(
                    "bench: unknown argument `{other}` (expected --device D, --batch B, --steps 5,10,20, \
                     --sample-batch B, --features-batch B, --warmup N, --repeat N, --config NAME, --model DIR, \
                     --random-weights, --json, --no-reference, --no-budget, --memory-budget MIB, --cuda-graphs, --cudnn-benchmark, --out FILE)"
                ),
            }
        }
        Ok(args)
    }
}

/// The model directory and the loss features: the config's, else `--model` (default: the shipped
/// Fashion-MNIST model) with the shipped Fashion-MNIST classifier.
fn model_and_features(root: &Path, config: Option<&str>, model: Option<&str>) -> Result<(PathBuf, String)> {
    let Some(name) = config else {
        return Ok((
            root.join(model.unwrap_or("models/fashion-mnist-ddpm")),
            "models/fmnist-classifier-a.safetensors".to_string(),
        ));
    };
    let path = resolve_config(root, name)?;
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let table: toml::Table = text.parse().with_context(|| format!("parsing {}", path.display()))?;
    let model = table
        .get("model")
        .and_then(|m| m.get("path"))
        .and_then(|p| p.as_str())
        .with_context(|| format!("{}: no [model] path", path.display()))?;
    let features =
        table.get("loss").and_then(|l| l.get("features")).and_then(|f| f.as_str()).unwrap_or("inception").to_string();
    Ok((root.join(model), features))
}

/// `--model DIR`, or with random weights `--unet-config FILE`: the model's own `config.json` when
/// it is here, else the committed public config of the same name
/// (`tests/fixtures/unet/<name>.config.json`, e.g. ddpm-cifar10-32).
fn model_args(root: &Path, model_dir: &Path, random_weights: bool) -> Result<Vec<String>> {
    if !random_weights {
        if !model_dir.is_dir() {
            bail!("model directory {} not found (add --random-weights to time its architecture)", model_dir.display());
        }
        return Ok(vec!["--model".to_string(), model_dir.to_string_lossy().to_string()]);
    }
    let own = model_dir.join("config.json");
    let name = model_dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let fixture = root.join("tests").join("fixtures").join("unet").join(format!("{name}.config.json"));
    let config_json = [own, fixture.clone()].into_iter().find(|p| p.is_file()).with_context(|| {
        format!("--random-weights: neither {}/config.json nor {} exists", model_dir.display(), fixture.display())
    })?;
    Ok(vec!["--unet-config".to_string(), config_json.to_string_lossy().to_string()])
}

/// The plan of `cargo xtask bench` from its command line: batch sizes by device, the model's
/// arguments and features, and the output file (default `bench/results-<device>.md`).
fn parse_bench(root: &Path, rest: &[String]) -> Result<BenchPlan> {
    let args = BenchArgs::parse(rest)?;
    let cuda = args.device.starts_with("cuda");
    let (model_dir, features) = model_and_features(root, args.config.as_deref(), args.model.as_deref())?;
    let features =
        if args.random_weights && features == "inception" { "inception-random".to_string() } else { features };
    let model_args = model_args(root, &model_dir, args.random_weights)?;
    let default_batch = if cuda { "64" } else { "32" };
    let default_throughput = if cuda { "256" } else { "64" };
    let device_name = args.device.replace(':', "");
    Ok(BenchPlan {
        batch: args.batch.unwrap_or_else(|| default_batch.to_string()),
        sample_batch: args.sample_batch.unwrap_or_else(|| default_throughput.to_string()),
        features_batch: args.features_batch.unwrap_or_else(|| default_throughput.to_string()),
        out: args.out.unwrap_or_else(|| root.join("bench").join(format!("results-{device_name}.md"))),
        device: args.device,
        steps: args.steps,
        warmup: args.warmup,
        repeat: args.repeat,
        model_args,
        features,
        switches: args.switches,
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

/// The measurements of one `cargo xtask bench`, each in its own process, and the JSON lines of
/// those that succeeded.
struct Measurements<'a> {
    root: &'a Path,
    plan: &'a BenchPlan,
    /// Ours: `target/release/ddss-cli`.
    bin: PathBuf,
    /// The venv's Python, which runs the reference.
    python: &'a Path,
    /// The reference: `bench/reference/ddss_ref.py`.
    reference: PathBuf,
    lines: Vec<String>,
}

impl Measurements<'_> {
    /// The arguments ours and the reference share: the workload, K, the batch size, the device, the
    /// warm-up and timed runs, the features, the model and cuDNN's benchmark mode.
    fn common(&self, what: &str, k: &str, batch: &str) -> Vec<String> {
        let plan = self.plan;
        let mut v: Vec<String> = ["--what", what, "--steps", k, "--batch", batch, "--device", &plan.device]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(["--warmup".into(), plan.warmup.clone(), "--repeat".into(), plan.repeat.clone()]);
        v.extend(["--features".into(), plan.features.clone()]);
        v.extend(plan.model_args.iter().cloned());
        if plan.switches.cudnn_benchmark {
            v.push("--cudnn-benchmark".into());
        }
        v
    }

    /// `ddss-cli --quiet bench-unroll` with the common arguments.
    fn ours(&self, what: &str, k: &str, batch: &str) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.current_dir(self.root).arg("--quiet").arg("bench-unroll").args(self.common(what, k, batch));
        cmd
    }

    /// `python ddss_ref.py` with the common arguments.
    fn theirs(&self, what: &str, k: &str, batch: &str) -> Command {
        let mut cmd = Command::new(self.python);
        cmd.current_dir(self.root).arg(&self.reference).args(self.common(what, k, batch));
        cmd
    }

    /// Runs one measurement and keeps its JSON line (printed too with `--json`).
    fn run(&mut self, cmd: &mut Command, what: &str) {
        if let Some(line) = bench_run(cmd, what) {
            if self.plan.switches.json {
                println!("{line}");
            }
            self.lines.push(line);
        }
    }

    /// The DDSS step at `k` steps under each remat (ours with the reference's noise saved to
    /// `scratch`, ours with CUDA graphs, the reference where it has that remat).
    fn step(&mut self, k: &str, scratch: &Path) {
        let plan = self.plan;
        let noise = scratch.join(format!("noise-k{k}-b{}.safetensors", plan.batch));
        let mut remats = vec!["naive".to_string(), "per_call".to_string()];
        if plan.switches.budget {
            let half = k.parse::<usize>().unwrap_or(2) / 2;
            remats.push(format!("budget:{half}"));
        }
        if let Some(mib) = &plan.switches.memory_budget {
            remats.push(format!("memory:{mib}"));
        }
        for remat in &remats {
            let what = format!("step K={k} B={} {remat}", plan.batch);
            println!("[bench] {what}: ours");
            let mut ours = self.ours("step", k, &plan.batch);
            ours.args(["--remat", remat]).arg("--save-noise").arg(&noise);
            self.run(&mut ours, &format!("{what} (ours)"));
            if plan.switches.cuda_graphs && remat != "naive" {
                println!("[bench] {what}: ours, CUDA graphs");
                let mut graphed = self.ours("step", k, &plan.batch);
                graphed.args(["--remat", remat, "--cuda-graphs"]);
                self.run(&mut graphed, &format!("{what} (ours, CUDA graphs)"));
            }
            if plan.switches.reference && !remat.starts_with("budget") && !remat.starts_with("memory") {
                println!("[bench] {what}: reference");
                let mut theirs = self.theirs("step", k, &plan.batch);
                theirs.args(["--remat", remat]).arg("--noise").arg(&noise);
                self.run(&mut theirs, &format!("{what} (reference)"));
            }
        }
    }

    /// Sampling and feature throughput (ours, ours with CUDA graphs for sampling, the reference).
    fn throughput(&mut self) {
        let plan = self.plan;
        for (what, k, batch) in [("sample", "10", &plan.sample_batch), ("features", "10", &plan.features_batch)] {
            println!("[bench] {what} B={batch}: ours");
            let mut ours = self.ours(what, k, batch);
            self.run(&mut ours, &format!("{what} (ours)"));
            if plan.switches.cuda_graphs && what == "sample" {
                println!("[bench] {what} B={batch}: ours, CUDA graphs");
                let mut graphed = self.ours(what, k, batch);
                graphed.arg("--cuda-graphs");
                self.run(&mut graphed, &format!("{what} (ours, CUDA graphs)"));
            }
            if plan.switches.reference {
                println!("[bench] {what} B={batch}: reference");
                let mut theirs = self.theirs(what, k, batch);
                self.run(&mut theirs, &format!("{what} (reference)"));
            }
        }
    }
}

/// Installs diffusers into the venv (the reference's UNet) when the reference runs and lacks it.
fn reference_packages(plan: &BenchPlan, python: &Path) -> Result<()> {
    if plan.switches.reference && output_of(Command::new(python).args(["-c", "import diffusers"])).is_none() {
        println!("[bench] installing {DIFFUSERS} into the venv (the reference's UNet)");
        run_cmd(Command::new(python).args(["-m", "pip", "install", "--disable-pip-version-check", "-q", DIFFUSERS]))?;
    }
    Ok(())
}

/// Builds `ddss-cli` (release), with the cuda-graphs feature when the plan uses CUDA graphs.
fn build_ddss_cli(root: &Path, cuda_graphs: bool) -> Result<()> {
    println!("[bench] building ddss-cli (release)");
    let mut build = cargo();
    build.current_dir(root).args(["build", "--release", "-p", "ddss-cli"]);
    if cuda_graphs {
        build.args(["--features", "cuda-graphs"]);
    }
    run_cmd(&mut build)
}

/// Writes the JSON `lines` to `<out>.jsonl` and the Markdown table (`bench/reference/table.py`,
/// under a header saying when, how and on what machine it was measured) to `<out>` and the terminal.
fn write_results(
    root: &Path,
    plan: &BenchPlan,
    python: &Path,
    rest: &[String],
    started: &str,
    lines: &[String],
) -> Result<()> {
    if let Some(dir) = plan.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let jsonl = plan.out.with_extension("jsonl");
    std::fs::write(&jsonl, lines.join("\n") + "\n").with_context(|| format!("writing {}", jsonl.display()))?;
    // The goals of the headline comparisons: on the CPU, no slower than the reference.
    let goals: &[&str] = if plan.device == "cpu" { &["--step-goal", "1", "--sample-goal", "1"] } else { &[] };
    let table = Command::new(python)
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
        plan.model_args.iter().map(|a| relative_to(root, a)).collect::<Vec<_>>().join(" "),
        relative_to(root, &plan.features),
        plan.warmup,
        plan.repeat,
    );
    let text = header + &String::from_utf8_lossy(&table.stdout);
    std::fs::write(&plan.out, &text).with_context(|| format!("writing {}", plan.out.display()))?;
    println!("{text}");
    println!("[bench] table: {}; JSON lines: {}", plan.out.display(), jsonl.display());
    Ok(())
}

/// `cargo xtask bench`: ours (`ddss-cli bench-unroll`) and the PyTorch reference
/// (`bench/reference/ddss_ref.py`) side by side, each setting in its own process so each memory
/// peak is that setting's alone; the JSON lines go to `<out>.jsonl`, the Markdown table
/// (`bench/reference/table.py`) to `<out>` and the terminal.
pub fn bench(rest: &[String]) -> Result<()> {
    let root = repo_root();
    let plan = parse_bench(&root, rest)?;
    let env = setup()?;
    reference_packages(&plan, &env.python)?;
    build_ddss_cli(&root, plan.switches.cuda_graphs)?;
    let scratch = root.join("target").join("bench");
    std::fs::create_dir_all(&scratch)?;
    let started = machine_line();
    let mut measurements = Measurements {
        root: &root,
        plan: &plan,
        bin: root.join("target").join("release").join("ddss-cli"),
        python: &env.python,
        reference: root.join("bench").join("reference").join("ddss_ref.py"),
        lines: Vec::new(),
    };
    for k in &plan.steps {
        measurements.step(k, &scratch);
    }
    measurements.throughput();
    write_results(&root, &plan, &env.python, rest, &started, &measurements.lines)
}
