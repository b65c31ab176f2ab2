//! Property tests (fuzzing) of the `sampler.json` reader: arbitrary bytes, byte-mutated valid
//! files and JSON-level mutations of a valid file (version 2 with a DDIM or a UniPC base, and
//! version 1) must give `Ok` or `Err`, never a panic; a file that loads must also sample.
//! `PROPTEST_CASES` overrides the number of cases (default 256).

use ggdm_core::analytic::GaussianDataDenoiser;
use ggdm_core::ggdm::{GgdmBase, GgdmSampler, History, Learnable};
use ggdm_core::grid::Spacing;
use ggdm_core::noise::SeededNoise;
use ggdm_core::scheduler_config::SchedulerConfig;
use proptest::prelude::*;
use proptest::test_runner::Config;
use serde_json::Value;
use tch::Device;

fn config() -> Config {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256);
    Config { cases, failure_persistence: None, ..Config::default() }
}

fn valid_text() -> String {
    let scheduler = SchedulerConfig::default();
    let sampler = GgdmSampler::init_from_spacing(
        &scheduler,
        3,
        Spacing::Trailing,
        0.3,
        History::Full,
        Learnable::all(),
        Device::Cpu,
    )
    .expect("sampler");
    serde_json::to_string_pretty(&sampler.to_file()).expect("json")
}

/// A version 2 file whose base is UniPC (its coefficients run the solver formulas).
fn valid_unipc_text() -> String {
    let sampler = GgdmSampler::init_from_solver_spacing(
        GgdmBase::Unipc,
        &SchedulerConfig::default(),
        3,
        Spacing::Linspace,
        History::Full,
        Learnable::all(),
        Device::Cpu,
    )
    .expect("sampler");
    serde_json::to_string_pretty(&sampler.to_file()).expect("json")
}

/// [`valid_text`] as version 1 wrote it (no `base`, four derived values).
fn valid_version_1_text() -> String {
    let mut value: Value = serde_json::from_str(&valid_text()).expect("valid");
    let file = value.as_object_mut().expect("object");
    file.remove("base");
    file.insert("version".into(), Value::from(1));
    file["derived"]
        .as_object_mut()
        .expect("derived")
        .retain(|k, _| ["timesteps", "sigma", "u", "w"].contains(&k.as_str()));
    value.to_string()
}

/// One of the valid files, by index.
fn valid_file(which: usize) -> String {
    match which % 3 {
        0 => valid_text(),
        1 => valid_unipc_text(),
        _ => valid_version_1_text(),
    }
}

/// Loads `text`; when it loads, samples one small batch with it (what a user does next).
fn exercise(text: &str) {
    let Ok(sampler) = GgdmSampler::from_json(text, Device::Cpu) else { return };
    let _ = sampler.timesteps();
    let _ = sampler.to_file();
    if sampler.steps > 64 {
        return;
    }
    let Ok(schedule) = sampler.scheduler.schedule() else { return };
    let model = GaussianDataDenoiser::new(&schedule, 0.0, 0.5, [1, 2, 2]);
    if let Ok((x_init, z)) = sampler.draw_noise(&mut SeededNoise::new(0), &[2, 1, 2, 2], Device::Cpu) {
        let _ = tch::no_grad(|| sampler.sample(&model, &x_init, &z));
    }
}

/// Any JSON value, small.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        prop_oneof![Just(0.0), Just(-1.0), Just(1e308), Just(-1e-308), Just(999.0), Just(1000.0)].prop_map(Value::from),
        "[a-z_]{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(2, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec(("[a-z_]{1,8}", inner), 0..3).prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// Every path (object keys / array indices) to a node of `value`.
fn paths(value: &Value, prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
    out.push(prefix.clone());
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                let mut p = prefix.clone();
                p.push(k.clone());
                paths(v, p, out);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                let mut p = prefix.clone();
                p.push(i.to_string());
                paths(v, p, out);
            }
        }
        _ => {}
    }
}

fn node_mut<'a>(value: &'a mut Value, path: &[String]) -> Option<&'a mut Value> {
    let mut node = value;
    for key in path {
        node = match node {
            Value::Object(map) => map.get_mut(key)?,
            Value::Array(items) => items.get_mut(key.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(node)
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        exercise(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn byte_mutations_of_a_valid_file_never_panic(
        which in 0usize..3,
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut bytes = valid_file(which).into_bytes();
        for (at, byte) in edits {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len()));
        }
        exercise(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn json_mutations_of_a_valid_file_never_panic(
        which in 0usize..3,
        edits in prop::collection::vec((any::<prop::sample::Index>(), json_value(), any::<bool>()), 1..4),
    ) {
        let mut value: Value = serde_json::from_str(&valid_file(which)).expect("valid");
        for (at, new, delete) in edits {
            let mut all = Vec::new();
            paths(&value, Vec::new(), &mut all);
            let path = all[at.index(all.len())].clone();
            if delete && !path.is_empty() {
                let (last, parent) = path.split_last().expect("non-empty");
                match node_mut(&mut value, parent) {
                    Some(Value::Object(map)) => { map.remove(last); }
                    Some(Value::Array(items)) => {
                        if let Ok(i) = last.parse::<usize>() { if i < items.len() { items.remove(i); } }
                    }
                    _ => {}
                }
            } else if let Some(node) = node_mut(&mut value, &path) {
                *node = new;
            }
        }
        exercise(&value.to_string());
    }
}

#[test]
fn the_valid_files_load_and_sample() {
    for (which, base) in [(0, GgdmBase::Ddim), (1, GgdmBase::Unipc), (2, GgdmBase::Ddim)] {
        let text = valid_file(which);
        let sampler = GgdmSampler::from_json(&text, Device::Cpu).expect("valid file loads");
        assert_eq!((sampler.steps, sampler.base), (3, base));
        exercise(&text);
    }
}

/// Found by `json_mutations_of_a_valid_file_never_panic` (60,000 cases): a huge
/// `num_train_timesteps` made the schedule ask for an impossible allocation (abort).
#[test]
fn huge_num_train_timesteps_is_an_error_not_an_abort() {
    let mut value: Value = serde_json::from_str(&valid_text()).expect("valid");
    value["scheduler"]["num_train_timesteps"] = Value::from(5_362_535_888_224_370_816u64);
    let Err(err) = GgdmSampler::from_json(&value.to_string(), Device::Cpu) else { panic!("must fail") };
    let err = err.to_string();
    assert!(err.contains("num_train_timesteps"), "{err}");
    let err = ggdm_core::grid::timesteps(usize::MAX, 10, Spacing::Trailing, 0).expect_err("must fail").to_string();
    assert!(err.contains("num_train_timesteps"), "{err}");
}
