//! The on-disk cache of teacher pairs ([`crate::teacher::Pairs`]), shared across runs, step
//! counts K and search seeds (DESIGN.md section 4, "Starting solver and teacher").
//!
//! An entry is one safetensors file, `pairs-<hash>.safetensors` in the cache folder, holding
//! `noise` and `teacher` (f32, `N x C x H x W`) and two entries in the safetensors metadata header:
//! `ddss_teacher_pairs`, the JSON of `{"format": 1, "key": KEY}` whose SHA-256 names the file, and
//! `sha256`, the digest of the two tensors' bytes. `KEY` is the caller's description of everything
//! the pairs depend on (the CLI's: the model's weights hash, the scheduler, the teacher, the noise
//! seed and index range, dtype, device kind and network precision). Entries are written with
//! [`ggdm_core::io::write_atomic`], so a killed run leaves a whole entry or none.
//!
//! A read entry is used only when its metadata names exactly the expected key, its digest matches
//! and its tensors have the stored shape and finite values; any other entry (torn, truncated,
//! edited, written for another key) is recomputed, with a warning naming the file.
//!
//! [`files_sha256`] hashes a model's weight files, remembering each file's digest by path, size
//! and modification time (`hashes.json` in the cache folder) so large checkpoints are read once.

use crate::teacher::Pairs;
use crate::{Error, Result};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// Version of the entry layout, part of every key.
pub const FORMAT: u64 = 1;
const META_KEY: &str = "ddss_teacher_pairs";
const META_DIGEST: &str = "sha256";

/// What [`load_or_compute`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheOutcome {
    /// The entry was read (the teacher did not run).
    Read(PathBuf),
    /// There was no entry: the pairs were computed (and written there, if the folder is writable).
    Computed(PathBuf),
    /// The entry could not be used (`reason`) and was recomputed.
    Recomputed {
        /// The entry.
        path: PathBuf,
        /// Why it was not used.
        reason: String,
    },
}

impl CacheOutcome {
    /// Whether the teacher ran.
    pub fn computed(&self) -> bool {
        !matches!(self, CacheOutcome::Read(_))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What an entry's metadata holds for `key`.
fn stored_key(key: &serde_json::Value) -> serde_json::Value {
    serde_json::json!({ "format": FORMAT, "key": key })
}

/// The file of the entry for `key` in `dir`.
pub fn entry_path(dir: &Path, key: &serde_json::Value) -> PathBuf {
    let digest = Sha256::digest(stored_key(key).to_string().as_bytes());
    dir.join(format!("pairs-{}.safetensors", &hex(&digest)[..32]))
}

/// The pairs for `key`: read from `dir` when a valid entry is there, else computed by `compute`
/// and written there. An entry that cannot be used is recomputed with a warning naming it; a
/// folder that cannot be written only costs a warning.
pub fn load_or_compute(
    dir: &Path,
    key: &serde_json::Value,
    compute: impl FnOnce() -> Result<Pairs>,
) -> Result<(Pairs, CacheOutcome)> {
    let path = entry_path(dir, key);
    let problem = match read_entry(&path, key) {
        Ok(Some(pairs)) => return Ok((pairs, CacheOutcome::Read(path))),
        Ok(None) => None,
        Err(reason) => {
            tracing::warn!("teacher pair cache {}: {reason}; recomputing it", path.display());
            Some(reason)
        }
    };
    let pairs = compute()?;
    let written = std::fs::create_dir_all(dir)
        .map_err(|e| Error::File { path: dir.to_path_buf(), msg: format!("cannot create the cache folder: {e}") })
        .and_then(|()| write_entry(&path, key, &pairs));
    if let Err(e) = written {
        tracing::warn!("the teacher pairs are not cached: {e}");
    }
    let outcome = match problem {
        Some(reason) => CacheOutcome::Recomputed { path, reason },
        None => CacheOutcome::Computed(path),
    };
    Ok((pairs, outcome))
}

/// The bytes of a tensor as f32 little-endian values.
fn f32_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let flat = t.to_device(tch::Device::Cpu).to_kind(Kind::Float).contiguous().reshape([-1]);
    let values = Vec::<f32>::try_from(&flat)?;
    Ok(values.iter().flat_map(|v| v.to_le_bytes()).collect())
}

/// Writes the entry for `key` (atomically).
pub fn write_entry(path: &Path, key: &serde_json::Value, pairs: &Pairs) -> Result<()> {
    let (noise, target) = (f32_bytes(&pairs.noise)?, f32_bytes(&pairs.target)?);
    let shape: Vec<usize> = pairs.noise.size().iter().map(|&d| d as usize).collect();
    let mut digest = Sha256::new();
    digest.update(&noise);
    digest.update(&target);
    let metadata = HashMap::from([
        (META_KEY.to_string(), stored_key(key).to_string()),
        (META_DIGEST.to_string(), hex(&digest.finalize())),
    ]);
    let view = |data| {
        TensorView::new(Dtype::F32, shape.clone(), data)
            .map_err(|e| Error::File { path: path.to_path_buf(), msg: format!("cannot write the teacher pairs: {e}") })
    };
    let tensors = [("noise", view(&noise)?), ("teacher", view(&target)?)];
    let bytes = safetensors::tensor::serialize(tensors, &Some(metadata))
        .map_err(|e| Error::File { path: path.to_path_buf(), msg: format!("cannot write the teacher pairs: {e}") })?;
    ggdm_core::io::write_atomic(path, &bytes)?;
    Ok(())
}

/// Reads the entry at `path`: `Ok(None)` when there is none, `Err(reason)` when it cannot be
/// used for `key`.
pub fn read_entry(path: &Path, key: &serde_json::Value) -> std::result::Result<Option<Pairs>, String> {
    if !path.exists() {
        return Ok(None);
    }
    let bytes = std::fs::read(path).map_err(|e| format!("cannot be read ({e})"))?;
    let (_, metadata) = SafeTensors::read_metadata(&bytes).map_err(|e| format!("not a safetensors file ({e:?})"))?;
    let meta = metadata.metadata().clone().unwrap_or_default();
    let stored: serde_json::Value = meta
        .get(META_KEY)
        .and_then(|text| serde_json::from_str(text).ok())
        .ok_or_else(|| format!("its metadata lacks a readable `{META_KEY}`"))?;
    if stored != stored_key(key) {
        return Err(format!("written for another key ({stored}, expected {})", stored_key(key)));
    }
    let file = SafeTensors::deserialize(&bytes).map_err(|e| format!("not a safetensors file ({e:?})"))?;
    let (noise, target) = (tensor_view(&file, "noise")?, tensor_view(&file, "teacher")?);
    if noise.shape() != target.shape() || noise.shape().len() != 4 || noise.shape()[0] == 0 {
        return Err(format!(
            "`noise` {:?} and `teacher` {:?} must be equal N x C x H x W",
            noise.shape(),
            target.shape()
        ));
    }
    let mut digest = Sha256::new();
    digest.update(noise.data());
    digest.update(target.data());
    if meta.get(META_DIGEST).map(String::as_str) != Some(hex(&digest.finalize()).as_str()) {
        return Err("its tensors do not match the recorded sha256 (a corrupt file)".into());
    }
    let shape: Vec<i64> = noise.shape().iter().map(|&d| d as i64).collect();
    let tensor = |view: &TensorView| -> Tensor {
        let values: Vec<f32> =
            view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        Tensor::from_slice(&values).reshape(&shape)
    };
    let (noise, target) = (tensor(&noise), tensor(&target));
    let finite = |t: &Tensor| t.isfinite().all().int64_value(&[]) != 0;
    if !finite(&noise) || !finite(&target) {
        return Err("it holds non-finite values".into());
    }
    Pairs::new(noise, target, &path.display().to_string()).map(Some).map_err(|e| e.to_string())
}

fn tensor_view<'a>(file: &'a SafeTensors<'a>, name: &str) -> std::result::Result<TensorView<'a>, String> {
    let view = file.tensor(name).map_err(|_| format!("it lacks the tensor `{name}`"))?;
    if view.dtype() != Dtype::F32 {
        return Err(format!("`{name}` is {:?}, not F32", view.dtype()));
    }
    Ok(view)
}

/// One remembered file digest of `hashes.json`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct KnownDigest {
    size: u64,
    modified_ns: u64,
    sha256: String,
}

/// The SHA-256 of a file, streamed.
fn file_sha256(path: &Path) -> Result<String> {
    use std::io::Read;
    let err = |e: std::io::Error| Error::File { path: path.to_path_buf(), msg: format!("cannot hash: {e}") };
    let mut file = std::fs::File::open(path).map_err(err)?;
    let mut digest = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer).map_err(err)?;
        if n == 0 {
            break;
        }
        digest.update(&buffer[..n]);
    }
    Ok(hex(&digest.finalize()))
}

/// One digest over `files` (each file's name and SHA-256, in the given order), reading only the
/// files whose size or modification time differ from what `memo` (a JSON file, created or
/// updated here) remembers for their path. An unreadable `memo` is rebuilt with a warning.
pub fn files_sha256(files: &[PathBuf], memo: &Path) -> Result<String> {
    let mut known: HashMap<String, KnownDigest> = match std::fs::read_to_string(memo) {
        Ok(text) => serde_json::from_str(&text).unwrap_or_else(|e| {
            tracing::warn!("{}: unreadable ({e}); hashing the model files again", memo.display());
            HashMap::new()
        }),
        Err(_) => HashMap::new(),
    };
    let mut changed = false;
    let mut combined = Sha256::new();
    for path in files {
        let err = |e: std::io::Error| Error::File { path: path.clone(), msg: format!("cannot read: {e}") };
        let stat = std::fs::metadata(path).map_err(err)?;
        let modified_ns = stat
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as u64);
        let name = std::fs::canonicalize(path).map_err(err)?.display().to_string();
        let sha256 = match known.get(&name) {
            Some(k) if k.size == stat.len() && k.modified_ns == modified_ns && modified_ns != 0 => k.sha256.clone(),
            _ => {
                let sha256 = file_sha256(path)?;
                known.insert(name, KnownDigest { size: stat.len(), modified_ns, sha256: sha256.clone() });
                changed = true;
                sha256
            }
        };
        let file_name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        combined.update(format!("{file_name}\0{sha256}\n").as_bytes());
    }
    if changed {
        let written =
            memo.parent().map_or(Ok(()), std::fs::create_dir_all).map_err(|e| ggdm_core::Error::io(memo, e)).and_then(
                |()| {
                    let text = serde_json::to_string_pretty(&known).unwrap_or_default();
                    ggdm_core::io::write_atomic(memo, text.as_bytes())
                },
            );
        if let Err(e) = written {
            tracing::warn!("{}: cannot remember the model files' digests ({e})", memo.display());
        }
    }
    Ok(hex(&combined.finalize()))
}
