//! `[loss] teacher` end to end: the teacher pairs are computed once and then read from the cache
//! (also by a resumed run), a search killed and resumed with a teacher loss ends bit-identical to
//! an uninterrupted one and validates on the teacher distance, and a corrupt cache entry is
//! recomputed with a warning naming it, giving the same search; a `sampler.json` without noise is a
//! teacher too.

mod common;
use common::*;

use std::path::Path;

const STEPS: u64 = 8;

/// A UniPC teacher (8 steps, 8 training and 4 validation pairs) with KID, cached in `cache`.
fn teacher_spec(cache: &Path) -> String {
    format!(
        "sampler = \"unipc\", steps = 8, pairs = 8, validation_pairs = 4, kid_weight = 0.5, cache = \"{}\"",
        cache.display()
    )
}

/// Runs `cmd` (which must succeed) with info-level logs; returns its stderr.
fn logged(cmd: &mut std::process::Command) -> String {
    String::from_utf8_lossy(&run_ok(cmd.env("RUST_LOG", "info")).stderr).to_string()
}

/// The cache's pair entries.
fn entries(cache: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(cache)
        .expect("cache folder")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("pairs-")))
        .collect();
    files.sort();
    files
}

#[test]
fn teacher_pairs_are_cached_and_a_killed_and_resumed_teacher_search_equals_an_uninterrupted_one() {
    let dir = temp_dir("teacher");
    let (model, data) = tiny_model(&dir);
    let cache = dir.join("cache");
    let config = dir.join("search.toml");
    std::fs::write(&config, tiny_teacher_search_config(&model, &data, STEPS, &teacher_spec(&cache))).expect("config");

    // 1. Uninterrupted: the teacher runs for the training and the validation pairs.
    let straight = dir.join("straight");
    let log = logged(&mut search_cmd(&config, &straight, false));
    assert_eq!(log.matches("computed with unipc (8 steps)").count(), 2, "{log}");
    assert!(!log.contains("read from"), "{log}");
    assert_eq!(entries(&cache).len(), 2, "one entry for the training and one for the validation pairs");

    // 2. Killed after its second checkpoint, then resumed: the pairs come from the cache.
    let killed = dir.join("killed");
    let mut child = spawn(search_cmd(&config, &killed, false));
    let at = kill_at_checkpoint(&mut child, &killed, 2);
    assert!(at < STEPS, "the kill must interrupt the search (checkpoint at step {at})");
    let log = logged(&mut search_cmd(&config, &killed, true));
    assert_eq!(log.matches("read from").count(), 2, "{log}");
    assert!(!log.contains("computed with"), "the teacher must not run again: {log}");
    assert_eq!(learned_part(&straight.join("sampler.json")), learned_part(&killed.join("sampler.json")));
    assert_same_checkpoints(&straight, &killed);

    // Validation (every 2 steps) is the teacher distance of the validation pairs.
    let metrics = std::fs::read_to_string(killed.join("metrics.jsonl")).expect("metrics");
    let lines: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).expect("line")).collect();
    assert_eq!(lines.len(), STEPS as usize);
    for line in &lines {
        let step = line["step"].as_u64().expect("step");
        assert!(line.get("validation_kid").is_none(), "{line}");
        assert_eq!(line.get("validation_teacher_distance").is_some(), step % 2 == 0, "{line}");
    }
    let provenance = &json(&straight.join("sampler.json"))["provenance"]["search"];
    assert!(provenance["best_validation_teacher_distance"].as_f64().is_some_and(|d| d > 0.0), "{provenance}");

    // 3. Corrupt entries are recomputed with a warning naming them; the search is the same.
    for entry in entries(&cache) {
        let bytes = std::fs::read(&entry).expect("entry");
        std::fs::write(&entry, &bytes[..bytes.len() / 2]).expect("truncate");
    }
    let recomputed = dir.join("recomputed");
    let log = logged(search_cmd(&config, &recomputed, false).arg("--skip-eval"));
    for entry in entries(&cache) {
        let warning = log.lines().find(|l| l.contains(&entry.display().to_string())).unwrap_or_default();
        assert!(warning.contains("WARN") && warning.contains("recomputing"), "{log}");
    }
    assert_eq!(log.matches("computed with unipc").count(), 2, "{log}");
    assert_eq!(learned_part(&straight.join("sampler.json")), learned_part(&recomputed.join("sampler.json")));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_sampler_json_without_noise_is_a_teacher() {
    let dir = temp_dir("teacher-file");
    let (model, data) = tiny_model(&dir);
    let scheduler = ggdm_core::scheduler_config::SchedulerConfig::from_file(&model.join("scheduler_config.json"))
        .expect("scheduler");
    let mut sampler = ggdm_core::ggdm::GgdmSampler::init_from_spacing(
        &scheduler,
        6,
        ggdm_core::grid::Spacing::Trailing,
        0.0,
        ggdm_core::ggdm::History::Full,
        ggdm_core::ggdm::Learnable::none(),
        tch::Device::Cpu,
    )
    .expect("sampler");
    sampler.model = ggdm_core::ggdm::ModelIdentity { name: "tiny".into(), sample_shape: Some([1, 8, 8]) };
    let file = dir.join("ddim6.json");
    sampler.save(&file).expect("save");
    let spec = format!(
        "sampler = \"{}\", steps = 6, pairs = 4, validation_pairs = 2, cache = \"{}\"",
        file.display(),
        dir.join("cache").display()
    );
    let config = dir.join("search.toml");
    std::fs::write(&config, tiny_teacher_search_config(&model, &data, 2, &spec)).expect("config");
    let log = logged(search_cmd(&config, &dir.join("run"), false).arg("--skip-eval"));
    assert_eq!(log.matches(&format!("computed with {} (6 steps)", file.display())).count(), 2, "{log}");
    let _ = std::fs::remove_dir_all(&dir);
}
