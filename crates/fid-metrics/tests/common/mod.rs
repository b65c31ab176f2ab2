//! Helpers shared by the integration tests: fixture paths, fixture loading, scratch folders.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};

/// `tests/fixtures/fid` of the workspace (written by `tests/scripts/gen_fid_fixtures.py`).
pub fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/fid")
}

/// All tensors of a fixture safetensors file, by name.
pub fn read_tensors(name: &str) -> HashMap<String, Tensor> {
    let path = fixture_dir().join(name);
    Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", path.display()))
        .into_iter()
        .collect()
}

/// A fixture JSON file.
pub fn read_json(name: &str) -> serde_json::Value {
    let path = fixture_dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("bad JSON in {}: {e}", path.display()))
}

/// `||a - b|| / ||b||` (Frobenius norms, in f64).
pub fn relative_error(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_kind(Kind::Double);
    let b = b.to_kind(Kind::Double);
    let diff = (&a - &b).norm().double_value(&[]);
    diff / b.norm().double_value(&[]).max(f64::MIN_POSITIVE)
}

/// `|a - b| / |b|`.
pub fn relative_diff(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(f64::MIN_POSITIVE)
}

/// A fresh, empty scratch folder for one test, removed when dropped.
pub struct ScratchDir(pub PathBuf);

impl ScratchDir {
    pub fn new(test_name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("fid-metrics-test-{}-{test_name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("cannot create a scratch folder");
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
