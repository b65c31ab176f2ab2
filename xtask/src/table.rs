//! `cargo xtask table`: learns a sampler with a search config at each K and for each search seed,
//! then scores them with `ddss-cli table` next to the baselines (by default the training-free
//! solvers on the config's spacing and on the log-SNR-uniform grid) and the many-step reference
//! line, in one command, on the same noise.
//!
//! Everything goes into one output folder: the searches into `searches/k<K>_seed<S>/`, the
//! comparison (`results.json`, `table.md`, `fid_vs_steps*.png`) next to them. The folder records
//! the command that made it (`table_command.txt`): the same command continues it (a finished
//! search is reused, an interrupted one resumed), any other command is refused, so a table never
//! mixes samplers learned by another config.

use crate::search::resolve_config;
use crate::setup::setup;
use crate::util::{repo_root, run_cmd, FASHION_MNIST_DIR};
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::Command;

/// The baselines scored by default: the best training-free solvers, each on the search's default
/// grid and on DPM-Solver's log-SNR-uniform one, and DDIM (any `ddss-cli sample --sampler` name;
/// NAME@SPACING picks another grid).
const TABLE_BASELINES: &str =
    "ddim,dpmpp2m,dpmpp3m,unipc,unipc3,dpmpp2m@logsnr,dpmpp3m@logsnr,unipc@logsnr,unipc3@logsnr";

/// The options of `cargo xtask table`.
struct TableOptions {
    num: String,
    steps: Vec<String>,
    seeds: Vec<String>,
    device: String,
    out: String,
    samplers: String,
    config: String,
    features: Vec<String>,
    many_step: String,
}

impl TableOptions {
    fn parse(rest: &[String]) -> Result<Self> {
        let mut options = Self {
            num: "2000".into(),
            steps: list("5,10,20"),
            seeds: list("0"),
            device: "auto".into(),
            out: "runs/table".into(),
            samplers: TABLE_BASELINES.into(),
            config: "configs/fashion_mnist.toml".into(),
            features: vec!["models/fmnist-classifier-b.safetensors".into()],
            many_step: "unipc:100".into(),
        };
        let mut it = rest.iter();
        while let Some(arg) = it.next() {
            let mut value = || it.next().cloned().with_context(|| format!("{arg} needs a value"));
            match arg.as_str() {
                "--num" => options.num = value()?,
                "--steps" => options.steps = list(&value()?),
                "--seeds" | "--seed" => options.seeds = list(&value()?),
                "--device" => options.device = value()?,
                "--out" => options.out = value()?,
                "--samplers" => options.samplers = value()?,
                "--config" => options.config = value()?,
                "--many-step" => options.many_step = value()?,
                "--inception" => options.features.push("inception".into()),
                other => bail!(
                    "table: unknown argument `{other}` (expected --num N, --steps LIST, --seeds LIST, --device D, \
                     --out DIR, --samplers LIST, --config FILE, --many-step SAMPLER:STEPS|none, --inception)"
                ),
            }
        }
        if options.steps.is_empty() || options.seeds.is_empty() {
            bail!("table: --steps and --seeds need at least one value each");
        }
        if let Some(bad) = options.seeds.iter().find(|s| s.parse::<u64>().is_err()) {
            bail!("table: --seeds: `{bad}` is not a seed (a non-negative integer)");
        }
        Ok(options)
    }

    /// What makes a table folder: a second run with the same record continues it.
    fn record(&self, config: &Path) -> Result<String> {
        let text = std::fs::read_to_string(config).with_context(|| format!("reading {}", config.display()))?;
        Ok(format!(
            "config: {}\nconfig text sha256: {}\nsteps: {}\nseeds: {}\nnum: {}\nsamplers: {}\nfeatures: {}\n\
             many-step: {}\ndevice: {}\n",
            config.display(),
            crate::util::sha256_hex(text.as_bytes()),
            self.steps.join(","),
            self.seeds.join(","),
            self.num,
            self.samplers,
            self.features.join(","),
            self.many_step,
            self.device
        ))
    }
}

fn list(text: &str) -> Vec<String> {
    text.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()
}

/// Claims `out` for this command: creates it with its record, or checks that the record it holds
/// is this command's.
fn claim(out: &Path, record: &str) -> Result<()> {
    let path = out.join("table_command.txt");
    match std::fs::read_to_string(&path) {
        Ok(existing) if existing == record => {
            println!("[table] continuing {} (same command)", out.display());
            Ok(())
        }
        Ok(existing) => bail!(
            "{} holds a table made by another command:\n{existing}\nchoose another --out, or remove that folder",
            out.display()
        ),
        Err(_) if out.is_dir() && std::fs::read_dir(out)?.next().is_some() => bail!(
            "{} exists and is not a `cargo xtask table` folder; choose another --out, or remove it",
            out.display()
        ),
        Err(_) => {
            std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
            std::fs::write(&path, record).with_context(|| format!("writing {}", path.display()))
        }
    }
}

/// Runs `cargo xtask table`.
pub fn table(rest: &[String]) -> Result<()> {
    let root = repo_root();
    let options = TableOptions::parse(rest)?;
    let config = resolve_config(&root, &options.config)?;
    let out = root.join(&options.out);
    claim(&out, &options.record(&config)?)?;
    setup()?;
    println!("[table] building ddss-cli (release)");
    run_cmd(crate::util::cargo().current_dir(&root).args(["build", "--release", "-p", "ddss-cli"]))?;
    let bin = root.join("target").join("release").join("ddss-cli");
    let mut learned = Vec::new();
    for k in &options.steps {
        for seed in &options.seeds {
            let run_dir = out.join("searches").join(format!("k{k}_seed{seed}"));
            search(&bin, &root, &config, &run_dir, k, seed, &options.device)?;
            learned.push(format!("learned-seed{seed}={}", run_dir.join("sampler.json").display()));
        }
    }
    println!("[table] scoring");
    let reference = format!("{FASHION_MNIST_DIR}/t10k-images-idx3-ubyte.gz");
    run_cmd(Command::new(&bin).current_dir(&root).args([
        "table",
        "--model",
        &model_of(&config)?,
        "--samplers",
        &options.samplers,
        "--steps",
        &options.steps.join(","),
        "--learned",
        &learned.join(","),
        "--features",
        &options.features.join(","),
        "--ref",
        &reference,
        "--num",
        &options.num,
        "--many-step",
        &options.many_step,
        "--seed",
        &eval_seed_of(&config)?,
        "--device",
        &options.device,
        "--out",
        &out.display().to_string(),
    ]))
}

/// One search of the table into `run_dir`: skipped when it finished, resumed when interrupted.
fn search(bin: &Path, root: &Path, config: &Path, run_dir: &Path, k: &str, seed: &str, device: &str) -> Result<()> {
    if run_dir.join("sampler.json").is_file() {
        println!("[table] K = {k}, seed {seed}: done in {}", run_dir.display());
        return Ok(());
    }
    let resume = run_dir.join("checkpoint.safetensors").is_file();
    println!(
        "[table] K = {k}, seed {seed}: searching into {}{}",
        run_dir.display(),
        if resume { " (resuming)" } else { "" }
    );
    let mut cmd = Command::new(bin);
    cmd.current_dir(root).arg("search").arg("--config").arg(config);
    cmd.args(["--steps", k, "--seed", seed, "--skip-eval", "--device", device]).arg("--out").arg(run_dir);
    if resume {
        cmd.arg("--resume");
    }
    run_cmd(&mut cmd)
}

/// The `[model] path` of a search config (the model the table scores).
fn model_of(config: &Path) -> Result<String> {
    let table = read_toml(config)?;
    table
        .get("model")
        .and_then(|m| m.get("path"))
        .and_then(|p| p.as_str())
        .map(String::from)
        .with_context(|| format!("{}: no [model] path", config.display()))
}

/// The `[eval] seed` of a search config (default 0xE7A1, as `ddss-cli search`): the table scores
/// on the noise the search's own comparison uses, so their numbers agree and the many-step
/// reference samples are shared through the cache.
fn eval_seed_of(config: &Path) -> Result<String> {
    let table = read_toml(config)?;
    match table.get("eval").and_then(|e| e.get("seed")) {
        None => Ok(0xE7A1u64.to_string()),
        Some(toml::Value::Integer(seed)) if *seed >= 0 => Ok(seed.to_string()),
        Some(other) => bail!("{}: [eval] seed = {other} is not a seed", config.display()),
    }
}

fn read_toml(path: &Path) -> Result<toml::Table> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.parse().with_context(|| format!("parsing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_folder_is_continued_only_by_the_same_command() {
        let dir = std::env::temp_dir().join(format!("xtask-table-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        claim(&dir, "a\n").expect("a new folder is claimed");
        claim(&dir, "a\n").expect("the same command continues it");
        let err = format!("{:#}", claim(&dir, "b\n").expect_err("another command is refused"));
        assert!(err.contains("another command") && err.contains("a\n"), "{err}");
        let other = dir.join("other");
        std::fs::create_dir_all(other.join("x")).unwrap();
        let err = format!("{:#}", claim(&other, "a\n").expect_err("a foreign folder is refused"));
        assert!(err.contains("not a `cargo xtask table` folder"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn options_parse_and_bad_seeds_are_named() {
        let args: Vec<String> = ["--seeds", "0,1,2", "--steps", "5"].iter().map(|s| s.to_string()).collect();
        let options = TableOptions::parse(&args).unwrap();
        assert_eq!((options.seeds.len(), options.steps.clone()), (3, vec!["5".to_string()]));
        let args: Vec<String> = ["--seeds", "x"].iter().map(|s| s.to_string()).collect();
        let err = format!("{:#}", TableOptions::parse(&args).err().unwrap());
        assert!(err.contains("`x`"), "{err}");
    }
}
