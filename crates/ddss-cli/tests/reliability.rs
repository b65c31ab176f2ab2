//! Crash safety of `ddss-cli search`: a run killed with SIGKILL at several points (after its
//! first checkpoint, after its third, and at a seeded pseudo-random moment that may fall inside a
//! write) and then continued with `--resume` ends with exactly the learned parameters of an
//! uninterrupted run, and a `metrics.jsonl` without torn or duplicate lines.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const STEPS: u64 = 12;

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
    assert_same_checkpoints(&straight, &killed);
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
