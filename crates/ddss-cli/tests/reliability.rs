//! Crash safety of `ddss-cli search`: a run killed with SIGKILL at several points (after its
//! first checkpoint, after its third, and at a seeded pseudo-random moment that may fall inside a
//! write) and then continued with `--resume` ends with exactly the learned parameters of an
//! uninterrupted run, and a `metrics.jsonl` without torn or duplicate lines.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const STEPS: u64 = 12;

fn search_cmd(config: &Path, out: &Path, resume: bool) -> Command {
    let mut cmd = bin();
    cmd.args(["--quiet", "search", "--device", "cpu"]).arg("--config").arg(config).arg("--out").arg(out);
    if resume {
        cmd.arg("--resume");
    }
    cmd
}

fn spawn(mut cmd: Command) -> Child {
    cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("start ddss-cli")
}

/// The step of the run directory's checkpoint (0 when there is none or it cannot be read yet).
fn checkpoint_step(run: &Path) -> u64 {
    let path = run.join("checkpoint.safetensors");
    if !path.is_file() {
        return 0;
    }
    match tch::Tensor::read_safetensors(&path) {
        Ok(named) => named
            .iter()
            .find(|(n, _)| n == "meta")
            .map(|(_, t)| t.double_value(&[0]) as u64)
            .expect("a readable checkpoint always has its meta entry"),
        Err(e) => panic!("a checkpoint must never be torn: {e}"),
    }
}

/// Waits until the checkpoint reaches `step` (or the child exits), then kills the child with
/// SIGKILL. Returns the checkpoint's step after the kill.
fn kill_at_checkpoint(child: &mut Child, run: &Path, step: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            panic!("the run ended ({status}) before checkpoint {step}");
        }
        if checkpoint_step(run) >= step {
            break;
        }
        assert!(Instant::now() < deadline, "no checkpoint {step} after 120 s");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().expect("SIGKILL");
    let status = child.wait().expect("reap");
    let at = checkpoint_step(run);
    eprintln!("killed ({status}) with the checkpoint at step {at}");
    at
}

/// `sampler.json` without `provenance` (which records wall-clock seconds).
fn learned_part(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut value: serde_json::Value = serde_json::from_str(&text).expect("sampler.json is JSON");
    value.as_object_mut().expect("an object").remove("provenance");
    value
}

fn checkpoint_tensors(run: &Path) -> Vec<(String, tch::Tensor)> {
    let mut named = tch::Tensor::read_safetensors(run.join("checkpoint.safetensors")).expect("checkpoint");
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

fn metrics_steps(run: &Path) -> Vec<u64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .expect("metrics.jsonl")
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("torn line {line:?}: {e}"));
            v["step"].as_u64().expect("step")
        })
        .collect()
}

#[test]
fn killed_and_resumed_search_equals_uninterrupted() {
    let started = Instant::now();
    let dir = temp_dir("kill");
    let (model, data) = tiny_model(&dir);
    let config = dir.join("search.toml");
    std::fs::write(&config, tiny_search_config(&model, &data, STEPS)).expect("config");

    let straight = dir.join("straight");
    let t0 = Instant::now();
    run_ok(&mut search_cmd(&config, &straight, false));
    let straight_time = t0.elapsed();

    let killed: PathBuf = dir.join("killed");
    // 1. Killed right after its first checkpoint.
    let mut child = spawn(search_cmd(&config, &killed, false));
    let at = kill_at_checkpoint(&mut child, &killed, 1);
    assert!(at < STEPS, "the kill must interrupt the search (checkpoint at step {at})");
    // A torn final line, as a kill inside an append leaves it.
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(killed.join("metrics.jsonl")).expect("metrics");
        f.write_all(b"{\"step\":99,\"loss\":0.1").expect("torn line");
    }
    // 2. Resumed, killed after its third checkpoint.
    let mut child = spawn(search_cmd(&config, &killed, true));
    let at = kill_at_checkpoint(&mut child, &killed, 3);
    assert!(at < STEPS, "the kill must interrupt the search (checkpoint at step {at})");
    // 3. Resumed and killed at seeded pseudo-random moments: once a chosen checkpoint exists, after a
    //    random fraction of one step's time, so the kill can land inside a step, inside the
    //    checkpoint or metrics write, or (for the last) inside the final sampler.json/results write.
    let step_time = straight_time.as_secs_f64() / STEPS as f64;
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for target in [4 + next() % 3, 7 + next() % 3, STEPS] {
        let mut child = spawn(search_cmd(&config, &killed, true));
        let deadline = Instant::now() + Duration::from_secs(120);
        while checkpoint_step(&killed) < target && child.try_wait().expect("wait").is_none() {
            assert!(Instant::now() < deadline, "no checkpoint {target} after 120 s");
            std::thread::sleep(Duration::from_millis(1));
        }
        let delay = Duration::from_secs_f64(step_time * (next() % 1000) as f64 / 1000.0);
        std::thread::sleep(delay);
        let _ = child.kill();
        let status = child.wait().expect("reap");
        eprintln!(
            "killed {:.3} s after checkpoint {target} ({status}); checkpoint now at step {}",
            delay.as_secs_f64(),
            checkpoint_step(&killed)
        );
    }
    // 4. Resumed to the end.
    run_ok(&mut search_cmd(&config, &killed, true));

    assert_eq!(
        learned_part(&straight.join("sampler.json")),
        learned_part(&killed.join("sampler.json")),
        "the learned sampler must be bit-identical to the uninterrupted run's"
    );
    let (a, b) = (checkpoint_tensors(&straight), checkpoint_tensors(&killed));
    assert_eq!(a.len(), b.len());
    for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(ta.equal(tb), "checkpoint entry {na} differs");
    }
    assert_eq!(metrics_steps(&killed), (1..=STEPS).collect::<Vec<_>>(), "one complete line per step");
    let results = |run: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(run.join("results.json")).expect("results")).expect("json")
    };
    assert_eq!(results(&straight), results(&killed));
    let leftovers: Vec<String> = std::fs::read_dir(&killed)
        .expect("run dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files of killed runs are removed on resume: {leftovers:?}");
    assert!(!killed.join(".lock").exists(), "the run lock is released");
    eprintln!(
        "uninterrupted run {:.1} s, whole test {:.1} s",
        straight_time.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_running_search_locks_its_directory() {
    let dir = temp_dir("lock");
    let (model, data) = tiny_model(&dir);
    let config = dir.join("search.toml");
    std::fs::write(&config, tiny_search_config(&model, &data, 2)).expect("config");
    let run = dir.join("run");
    std::fs::create_dir_all(&run).expect("run dir");
    // A live process (this test) holds the lock: refused, naming the pid.
    std::fs::write(run.join(".lock"), std::process::id().to_string()).expect("lock");
    let err = run_err(&mut search_cmd(&config, &run, false));
    assert!(err.contains(&format!("pid {}", std::process::id())) && err.contains(".lock"), "{err}");
    // A lock and a temporary file left by a killed process (pid above Linux's pid_max) are taken over.
    std::fs::write(run.join(".lock"), "4194305").expect("lock");
    std::fs::write(run.join(".checkpoint.safetensors.tmp-4194305-0"), "partial").expect("tmp");
    run_ok(&mut search_cmd(&config, &run, false));
    assert!(!run.join(".lock").exists());
    assert!(!run.join(".checkpoint.safetensors.tmp-4194305-0").exists());
    let _ = std::fs::remove_dir_all(&dir);
}
