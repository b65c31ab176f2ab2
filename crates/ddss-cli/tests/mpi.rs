//! Data-parallel `search` and sharded `eval` under `mpirun` (CPU, the shipped Fashion-MNIST model,
//! tiny settings): 2 ranks must learn the sampler one process learns from the same global batch
//! and seed, a run may be resumed with another number of ranks, and a 2-rank `eval` must report
//! the FID of a 1-rank one; 2-rank `stats` and `sample` write what 1 process writes. Built only
//! with the `mpi` feature; skipped when `mpirun` is missing.
#![cfg(feature = "mpi")]

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::Command;

/// `mpirun` when it can start processes here.
fn mpirun_available() -> bool {
    Command::new("mpirun").arg("--version").output().is_ok_and(|o| o.status.success())
}

/// `ddss-cli` started as `ranks` MPI ranks (one thread each, so that runs compare exactly).
fn mpirun(ranks: usize) -> Command {
    let mut cmd = Command::new("mpirun");
    cmd.args(["-n", &ranks.to_string(), "--allow-run-as-root", "--oversubscribe", "--bind-to", "none"])
        .args(["--mca", "btl", "self,vader", "-x", "OMP_NUM_THREADS=1", "-x", "DDSS_INCEPTION"])
        .arg(env!("CARGO_BIN_EXE_ddss-cli"));
    cmd.env("OMP_NUM_THREADS", "1");
    cmd
}

/// `ddss-cli` as one plain process with the same thread count as the ranks.
fn single() -> Command {
    let mut cmd = bin();
    cmd.env("OMP_NUM_THREADS", "1");
    cmd
}

fn search_config(dir: &Path, data: &Path, steps: u64) -> PathBuf {
    let text = shipped_search_head(data)
        + &format!(
            r#"
[optim]
steps = {steps}
batch_size = 8
micro_batch = 4
validate_every = 1
validation_num = 6
checkpoint_every = 1

[optim.lr]
lr = 0.01

[eval]
num = 8
batch = 4
reference = "{data}"
compare = ["ddim"]
seed = 7
grid_num = 4
many_step = {{ steps = 0 }}
"#,
            data = data.display(),
        );
    let path = dir.join(format!("search-{steps}.toml"));
    std::fs::write(&path, text).expect("config");
    path
}

/// Every number in `a` and `b` (same structure) agrees to `tol`; `provenance` is skipped.
fn assert_close(a: &serde_json::Value, b: &serde_json::Value, tol: f64, at: &str) {
    use serde_json::Value;
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().expect("f64"), y.as_f64().expect("f64"));
            assert!((x - y).abs() <= tol, "{at}: {x} vs {y}");
        }
        (Value::Array(x), Value::Array(y)) => {
            assert_eq!(x.len(), y.len(), "{at}: lengths");
            for (i, (x, y)) in x.iter().zip(y).enumerate() {
                assert_close(x, y, tol, &format!("{at}[{i}]"));
            }
        }
        (Value::Object(x), Value::Object(y)) => {
            for (key, x) in x {
                if key != "provenance" {
                    assert_close(x, y.get(key).unwrap_or(&Value::Null), tol, &format!("{at}.{key}"));
                }
            }
        }
        (x, y) => assert_eq!(x, y, "{at}"),
    }
}

fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .expect("metrics.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).expect("metrics line"))
        .collect()
}

/// A search; with `compare`, also the final comparison (results.json).
fn search(cmd: &mut Command, config: &Path, run: &Path, resume: bool, compare: bool) {
    cmd.args(["--quiet", "search", "--device", "cpu", "--config"]).arg(config).arg("--out").arg(run);
    if !compare {
        cmd.arg("--skip-eval");
    }
    if resume {
        cmd.arg("--resume");
    }
    run_ok(cmd);
}

#[test]
fn two_ranks_search_like_one_process_and_resume_with_another_rank_count() {
    if !mpirun_available() {
        eprintln!("skipped: mpirun not found (install Open MPI: cargo xtask setup --mpi)");
        return;
    }
    let dir = temp_dir("mpi-search");
    let data = dir.join("images.idx");
    write_idx_28(&data, 32);
    let config = search_config(&dir, &data, 3);

    let one = dir.join("one");
    search(&mut single(), &config, &one, false, true);
    let two = dir.join("two");
    search(&mut mpirun(2), &config, &two, false, true);

    let (a, b) = (json(&one.join("sampler.json")), json(&two.join("sampler.json")));
    assert_close(&a, &b, 1e-6, "sampler");
    let (ma, mb) = (metrics(&one), metrics(&two));
    assert_eq!(ma.len(), 3);
    assert_eq!(mb.len(), 3, "rank 0 alone writes metrics.jsonl");
    for (x, y) in ma.iter().zip(&mb) {
        for key in ["loss", "grad_norm", "validation_kid"] {
            let (x, y) = (x[key].as_f64().expect(key), y[key].as_f64().expect(key));
            assert!((x - y).abs() <= 1e-9 * x.abs().max(1.0), "{key}: {x} vs {y}");
        }
        assert!(x.get("comm_bytes").is_none());
        // 8 gathered 128-d f32 features + the f64 gradients of the learnable parameters.
        let bytes = y["comm_bytes"].as_u64().expect("comm_bytes");
        assert!(bytes > 8 * 128 * 4 && bytes < 8 * 128 * 4 + 8 * 1000, "{bytes}");
    }

    // 2 ranks for 2 steps, then 1 process resumes to step 3: the same sampler again.
    // The comparison (sharded sampling of ddim and the learned sampler) gives the same table.
    let (ra, rb) = (json(&one.join("results.json")), json(&two.join("results.json")));
    assert_eq!(ra.as_array().expect("rows").len(), 2);
    assert_close(&ra, &rb, 1e-9, "results");
    let pictures = ["before.png", "after.png", "before_after.png", "curves.png", "sampler.png"];
    for file in pictures.into_iter().chain(["grid_ddim.png", "grid_learned.png", "checkpoint.safetensors"]) {
        assert!(two.join(file).is_file(), "the 2-rank search did not write {file}");
    }

    let config2 = search_config(&dir, &data, 2);
    let resumed = dir.join("resumed");
    search(&mut mpirun(2), &config2, &resumed, false, false);
    search(&mut single(), &config, &resumed, true, false);
    assert_close(&a, &json(&resumed.join("sampler.json")), 1e-6, "resumed sampler");
    assert_eq!(metrics(&resumed).len(), 3);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn two_ranks_eval_gives_the_one_process_fid() {
    if !mpirun_available() {
        eprintln!("skipped: mpirun not found (install Open MPI: cargo xtask setup --mpi)");
        return;
    }
    let dir = temp_dir("mpi-eval");
    let data = dir.join("images.idx");
    write_idx_28(&data, 24);
    let classifier = repo("models/fmnist-classifier-b.safetensors");
    let reference = dir.join("ref.npz");
    run_ok(
        single()
            .args(["--quiet", "stats", "--device", "cpu", "--features", &classifier, "--out"])
            .arg(&reference)
            .arg(&data),
    );
    let eval = |cmd: &mut Command| -> serde_json::Value {
        cmd.args(["--quiet", "eval", "--device", "cpu", "--model", &repo("models/fashion-mnist-ddpm")])
            .args(["--sampler", "ddim", "--steps", "3", "--num", "10", "--batch", "4", "--seed", "5", "--json"])
            .args(["--features", &classifier, "--ref"])
            .arg(&reference);
        let out = run_ok(cmd);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = stdout.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "rank 0 alone prints: {stdout}");
        serde_json::from_str(lines[0]).expect("eval --json")
    };
    // stats with 2 ranks: the same features as 1 process.
    let reference2 = dir.join("ref2.npz");
    run_ok(
        mpirun(2)
            .args(["--quiet", "stats", "--device", "cpu", "--features", &classifier, "--batch", "5", "--out"])
            .arg(&reference2)
            .arg(&data),
    );
    let reference1 = dir.join("ref1.npz");
    run_ok(
        single()
            .args(["--quiet", "stats", "--device", "cpu", "--features", &classifier, "--batch", "5", "--out"])
            .arg(&reference1)
            .arg(&data),
    );
    assert_eq!(npz_features(&reference1), npz_features(&reference2), "stats features differ");

    let one = eval(&mut single());
    let two = eval(&mut mpirun(2));
    assert_eq!(one["num"], 10);
    let (fa, fb) = (one["fid"].as_f64().expect("fid"), two["fid"].as_f64().expect("fid"));
    assert!(fa.is_finite() && (fa - fb).abs() <= 1e-9 * fa.abs().max(1.0), "FID {fa} (1 rank) vs {fb} (2 ranks)");
    assert_close(&one, &two, 1e-9, "eval");
    let _ = std::fs::remove_dir_all(&dir);
}

fn npz_features(path: &Path) -> ndarray::Array2<f32> {
    let file = std::fs::File::open(path).expect("open npz");
    let mut npz = ndarray_npy::NpzReader::new(file).expect("npz");
    npz.by_name("features").expect("features")
}

#[test]
fn two_ranks_sample_what_one_process_samples() {
    if !mpirun_available() {
        eprintln!("skipped: mpirun not found (install Open MPI: cargo xtask setup --mpi)");
        return;
    }
    let dir = temp_dir("mpi-sample");
    let sample = |cmd: &mut Command, name: &str| {
        cmd.args(["--quiet", "sample", "--device", "cpu", "--model", &repo("models/fashion-mnist-ddpm")])
            .args(["--sampler", "ddim", "--steps", "2", "--num", "7", "--batch", "3", "--seed", "9", "--out-npy"])
            .arg(dir.join(format!("{name}.npy")))
            .arg("--out-dir")
            .arg(dir.join(name))
            .arg("--out")
            .arg(dir.join(format!("{name}.png")));
        run_ok(cmd);
    };
    sample(&mut single(), "one");
    sample(&mut mpirun(2), "two");
    let read = |p: PathBuf| std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert_eq!(read(dir.join("one.npy")), read(dir.join("two.npy")), "samples differ");
    assert_eq!(read(dir.join("one.png")), read(dir.join("two.png")), "grids differ");
    for i in 0..7 {
        let name = format!("{i:06}.png");
        assert_eq!(read(dir.join("one").join(&name)), read(dir.join("two").join(&name)), "{name} differs");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
