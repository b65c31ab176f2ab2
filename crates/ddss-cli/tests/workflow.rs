//! The main job end to end on the shipped Fashion-MNIST model with tiny settings (CPU): `search`
//! (with the FID-vs-steps plot), `export`, `sample --sampler sampler.json`, `search --steps
//! --skip-eval` and `table`, checking the files each writes.

mod common;
use common::*;

use std::path::{Path, PathBuf};

fn search_config(dir: &Path, data: &Path) -> PathBuf {
    let text = shipped_search_head(data)
        + &format!(
            r#"
[optim]
steps = 2
batch_size = 8
validate_every = 1
validation_num = 8
checkpoint_every = 1

[optim.lr]
lr = 0.005

[eval]
num = 16
batch = 8
features = ["{classifier_b}"]
reference = "{data}"
compare = ["ddim", "ddpm"]
seed = 7
grid_num = 4
plot_steps = [2]
many_step = {{ sampler = "unipc", steps = 20 }}
"#,
            data = data.display(),
            classifier_b = repo("models/fmnist-classifier-b.safetensors"),
        );
    let path = dir.join("search.toml");
    std::fs::write(&path, text).expect("config");
    path
}

/// `search` into `run`: the table, the verdict and the many-step reference on stdout, the
/// reference samples in the cache, and the run directory's files.
fn search_writes_the_run_directory(config: &Path, run: &Path, cache: &Path) {
    let out = run_ok(
        bin()
            .env("DDSS_CACHE", cache)
            .args(["--quiet", "search", "--device", "cpu", "--config"])
            .arg(config)
            .arg("--out")
            .arg(run),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("| sampler | steps | features |"), "{stdout}");
    assert!(stdout.contains("| unipc (many-step reference) | 20 |"), "{stdout}");
    assert!(stdout.contains("Reference: unipc at 20 steps") && stdout.contains("K = 3: learned FID"), "{stdout}");
    let cached = std::fs::read_dir(cache.join("teacher")).expect("the reference samples are cached").count();
    assert!(cached >= 1, "nothing in the cache");
    assert!(stdout.contains("run directory:"), "{stdout}");
    for file in [
        "config.toml",
        "sampler.json",
        "checkpoint.safetensors",
        "metrics.jsonl",
        "before.png",
        "after.png",
        "before_after.png",
        "curves.png",
        "curves.svg",
        "sampler.png",
        "sampler.svg",
        "grid_ddim.png",
        "grid_ddpm.png",
        "grid_learned.png",
        "results.json",
        "fid_vs_steps.png",
        "fid_vs_steps.svg",
        "fid_vs_steps_classifier-fmnist-classifier-a.png",
        "fid_vs_steps_classifier-fmnist-classifier-b.png",
        "kid_vs_steps.png",
        "kid_vs_steps.svg",
    ] {
        assert!(run.join(file).is_file(), "search did not write {file}");
    }
}

/// The search's results.json: results at K and at the plot's extra K, and the many-step
/// reference line, with the held-out network marked.
fn search_results_cover_every_sampler_and_step_count(run: &Path) {
    let rows = json(&run.join("results.json"));
    let rows = rows.as_array().expect("rows");
    // (ddim, ddpm) x (K = 3, 2) + learned, each with two feature networks, and the many-step
    // reference line (UniPC at 20 steps) on each.
    let (references, rows): (Vec<_>, Vec<_>) = rows.iter().partition(|r| r["reference"] == true);
    assert_eq!(rows.len(), 10, "{rows:?}");
    assert_eq!(references.len(), 2, "{references:?}");
    assert!(references.iter().all(|r| r["sampler"] == "unipc" && r["steps"] == 20), "{references:?}");
    for row in rows {
        assert!(row["fid"].as_f64().expect("fid").is_finite());
        let held_out = row["held_out"].as_bool().expect("held_out");
        let features = row["features"].as_str().expect("features");
        assert_eq!(held_out, features.ends_with("classifier-b"), "{row}");
        let steps = row["steps"].as_u64().expect("steps");
        assert!(steps == 3 || (steps == 2 && row["sampler"] != "learned"), "{row}");
    }
}

/// The search's pictures: the plot (PNG and SVG), the grids and the curves.
fn search_pictures_have_their_sizes(run: &Path) {
    let plot = image::open(run.join("fid_vs_steps.png")).expect("plot is a PNG");
    assert!(plot.width() >= 600 && plot.height() >= 400);
    let svg = std::fs::read_to_string(run.join("fid_vs_steps.svg")).expect("svg");
    for label in ["ddim", "ddpm", "learned", "sampling steps"] {
        assert!(svg.contains(label), "fid_vs_steps.svg lacks `{label}`");
    }
    // Grids of 28 px samples have 84 px tiles: 2 x 2 tiles and 2 px gaps.
    let after = image::open(run.join("after.png")).expect("after.png");
    assert_eq!((after.width(), after.height()), (2 * 86 + 2, 2 * 86 + 2));
    let pair = image::open(run.join("before_after.png")).expect("before_after.png");
    assert!(pair.width() > 2 * after.width() && pair.height() > after.height());
    for picture in ["curves.png", "sampler.png"] {
        let image = image::open(run.join(picture)).expect(picture);
        assert!(image.width() >= 800 && image.height() >= 600, "{picture}");
    }
}

/// `export` of the learned sampler: its grid as diffusers integer timesteps.
fn export_lists_the_learned_grid(run: &Path) {
    let out = run_ok(bin().args(["export", "--sampler"]).arg(run.join("sampler.json")));
    let list = String::from_utf8_lossy(&out.stdout);
    let parsed: Vec<i64> = serde_json::from_str(list.trim()).expect("an integer list");
    assert_eq!(parsed.len(), 3);
    assert!(parsed.windows(2).all(|w| w[0] > w[1]), "{parsed:?}");
}

/// `sample` with the learned sampler, with bf16 network calls, and a clear error for an unknown
/// precision.
fn sample_with_the_learned_sampler(dir: &Path, run: &Path) {
    let npy = dir.join("samples.npy");
    run_ok(
        bin()
            .args(["--quiet", "sample", "--device", "cpu", "--model", &repo("models/fashion-mnist-ddpm"), "--sampler"])
            .arg(run.join("sampler.json"))
            .args(["--num", "3", "--out-npy"])
            .arg(&npy),
    );
    assert!(npy.is_file());
    run_ok(
        bin()
            .args(["--quiet", "sample", "--device", "cpu", "--model", &repo("models/fashion-mnist-ddpm")])
            .args(["--sampler", "ddim", "--steps", "2", "--num", "2", "--precision", "bf16", "--out-npy"])
            .arg(dir.join("bf16.npy")),
    );
    let err = run_err(
        bin()
            .args(["sample", "--device", "cpu", "--model", &repo("models/fashion-mnist-ddpm"), "--sampler", "ddim"])
            .args(["--steps", "2", "--num", "2", "--precision", "fp8", "--out-npy"])
            .arg(dir.join("fp8.npy")),
    );
    assert!(err.contains("fp8"), "{err}");
}

/// `search --steps K --skip-eval` into `run2`: only the sampler and the grids.
fn search_skip_eval_writes_only_the_sampler_and_grids(config: &Path, run2: &Path) {
    run_ok(
        bin()
            .args(["--quiet", "search", "--device", "cpu", "--steps", "2", "--skip-eval", "--config"])
            .arg(config)
            .arg("--out")
            .arg(run2),
    );
    assert_eq!(json(&run2.join("sampler.json"))["steps"], 2);
    for file in ["after.png", "before_after.png", "curves.png", "sampler.png"] {
        assert!(run2.join(file).is_file(), "search --skip-eval did not write {file}");
    }
    assert!(!run2.join("results.json").exists());
}

/// `table` into `table`: baselines at K = 2, 3 plus the learned samplers of `run` and `run2`,
/// then `--render` of its results.json.
fn table_compares_baselines_and_learned_samplers(data: &Path, cache: &Path, runs: [&Path; 2], table: &Path) {
    let learned = format!(
        "learned-x={},learned-x={}",
        runs[0].join("sampler.json").display(),
        runs[1].join("sampler.json").display()
    );
    let out = run_ok(
        bin()
            .env("DDSS_CACHE", cache)
            .args(["--quiet", "table", "--device", "cpu", "--model", &repo("models/fashion-mnist-ddpm")])
            .args(["--samplers", "ddim,ddim@quadratic", "--steps", "2,3", "--learned", &learned])
            .args(["--many-step", "unipc:20"])
            .args(["--features", &repo("models/fmnist-classifier-b.safetensors"), "--num", "8", "--batch", "4"])
            .arg("--ref")
            .arg(data)
            .arg("--out")
            .arg(table),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("| sampler | K = 2 | K = 3 |"), "{stdout}");
    assert!(stdout.contains("| ddim@quadratic |"), "{stdout}");
    assert!(stdout.contains("| **learned-x** |"), "{stdout}");
    assert!(stdout.contains("best baseline"), "{stdout}");
    assert!(stdout.contains("Reference: unipc at 20 steps"), "{stdout}");
    let rows = json(&table.join("results.json"));
    // (ddim, ddim@quadratic) x (K = 2, 3) + two learned, and the many-step reference row.
    let rows = rows.as_array().expect("rows");
    assert_eq!(rows.len(), 7, "{rows:?}");
    assert_eq!(rows.iter().filter(|r| r["reference"] == true).count(), 1, "{rows:?}");
    assert!(table.join("table.md").is_file());
    for file in ["fid_vs_steps.png", "fid_vs_steps.svg", "kid_vs_steps.png", "kid_vs_steps.svg"] {
        assert!(table.join(file).is_file(), "table did not write {file}");
    }
    std::fs::remove_file(table.join("table.md")).unwrap();
    let out = run_ok(bin().args(["--quiet", "table", "--render", "--out"]).arg(table));
    assert!(String::from_utf8_lossy(&out.stdout).contains("| **learned-x** |"));
    assert!(table.join("table.md").is_file());
}

#[test]
fn search_export_sample_and_table_on_the_shipped_model() {
    let dir = temp_dir("workflow");
    let data = dir.join("images.idx");
    write_idx_28(&data, 32);
    let config = search_config(&dir, &data);
    let run = dir.join("run");

    // search: sampler, grids, results at K and at the plot's extra K, the plot.
    let cache = dir.join("cache");
    search_writes_the_run_directory(&config, &run, &cache);
    search_results_cover_every_sampler_and_step_count(&run);
    search_pictures_have_their_sizes(&run);

    // a second search into the same folder needs --resume.
    let err = run_err(bin().args(["search", "--device", "cpu", "--config"]).arg(&config).arg("--out").arg(&run));
    assert!(err.contains("--resume"), "{err}");

    export_lists_the_learned_grid(&run);
    sample_with_the_learned_sampler(&dir, &run);
    let run2 = dir.join("run2");
    search_skip_eval_writes_only_the_sampler_and_grids(&config, &run2);
    let table = dir.join("table");
    table_compares_baselines_and_learned_samplers(&data, &cache, [&run, &run2], &table);

    // table input errors name the culprit.
    let err = run_err(
        bin()
            .args(["table", "--device", "cpu", "--model", &repo("models/fashion-mnist-ddpm"), "--samplers", "nope"])
            .args(["--features", &repo("models/fmnist-classifier-b.safetensors"), "--num", "8", "--ref"])
            .arg(&data)
            .arg("--out")
            .arg(&table),
    );
    assert!(err.contains("nope"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
