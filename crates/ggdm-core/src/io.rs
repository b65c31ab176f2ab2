//! Crash-safe file writing: every file the project writes goes through [`write_atomic`] or
//! [`write_atomic_with`] (temporary file in the same folder, fsync, rename, fsync of the folder),
//! so a killed process leaves either the old file or the new one, never a torn one.
//!
//! An output path that already exists and is not a regular file (`/dev/null`, `/dev/full`, a
//! FIFO) is written in place instead: renaming over it would replace the device node, and such
//! targets have no "old content" to protect. Write errors (e.g. "No space left on device") are
//! returned with the path.
//!
//! Append-only logs (`metrics.jsonl`) use [`append_line`]; a line torn by a kill is dropped by
//! [`read_jsonl_prefix`] / [`truncate_jsonl`] when a run resumes.

use crate::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// True when `path` exists and is not a regular file (a device, a FIFO, a socket).
fn is_special_file(path: &Path) -> bool {
    std::fs::metadata(path).map(|m| !m.is_file() && !m.is_dir()).unwrap_or(false)
}

/// The folder of `path` (`.` for a bare file name) and the temporary file next to it.
fn temporary_for(path: &Path) -> Result<(PathBuf, PathBuf)> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| Error::invalid("output path", format!("{} has no file name", path.display())))?;
    // Unique per process and per call, so threads writing the same file do not share a temporary.
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{}.tmp-{}-{n}", name.to_string_lossy(), std::process::id()));
    Ok((dir, tmp))
}

/// Checks, before any work is done, that `path` can be written: its folder exists and is a
/// folder (or `path` is an existing special file such as `/dev/null`).
pub fn check_output_path(path: &Path) -> Result<()> {
    if is_special_file(path) {
        return Ok(());
    }
    if path.is_dir() {
        return Err(Error::invalid("output path", format!("cannot write {}: it is a folder", path.display())));
    }
    let (dir, _) = temporary_for(path)?;
    if !dir.is_dir() {
        let what = if dir.exists() { "is a file, not a folder" } else { "does not exist" };
        return Err(Error::invalid(
            "output path",
            format!("cannot write {}: {} {what}", path.display(), dir.display()),
        ));
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |tmp| {
        let mut file = std::fs::File::create(tmp).map_err(|e| Error::io(path, e))?;
        file.write_all(bytes).map_err(|e| Error::io(path, e))?;
        file.flush().map_err(|e| Error::io(path, e))
    })
}

/// Writes `path` atomically with a writer that fills a file at the path it is given (for
/// libraries that only write to paths, e.g. safetensors). The file is fsynced, renamed over
/// `path`, and the folder fsynced. Special files (see the module doc) are written in place.
///
/// The writer may return any error type that a [`crate::Error`] converts into (other crates of
/// the workspace pass their own), and that is the type returned.
pub fn write_atomic_with<E: From<Error>>(path: &Path, write: impl FnOnce(&Path) -> Result<(), E>) -> Result<(), E> {
    if is_special_file(path) {
        return write(path);
    }
    let (dir, tmp) = temporary_for(path)?;
    if !dir.is_dir() {
        let what = if dir.exists() { "is a file, not a folder" } else { "does not exist" };
        return Err(Error::invalid(
            "output path",
            format!("cannot write {}: {} {what}", path.display(), dir.display()),
        )
        .into());
    }
    let result = write(&tmp).and_then(|()| {
        let file = std::fs::File::open(&tmp).map_err(|e| Error::io(path, e))?;
        file.sync_all().map_err(|e| Error::io(path, e))?;
        drop(file);
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e).into())
    });
    if result.is_err() {
        // Best effort: the error being returned matters more than a leftover temporary file.
        let _ = std::fs::remove_file(&tmp);
        return result;
    }
    if let Ok(d) = std::fs::File::open(&dir) {
        // Makes the rename durable; not every platform allows syncing a folder.
        let _ = d.sync_all();
    }
    Ok(())
}

/// Appends one line (a `\n` is added) to `path` and syncs it to disk.
pub fn append_line(path: &Path, line: &str) -> Result<()> {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| Error::io(path, e))?;
    f.write_all(format!("{line}\n").as_bytes()).map_err(|e| Error::io(path, e))?;
    f.sync_data().map_err(|e| Error::io(path, e))
}

/// The complete JSON lines of a `.jsonl` log, each parsed, stopping at the first line that is
/// not a complete JSON object (a line torn by a kill). A missing file is empty.
pub fn read_jsonl_prefix(path: &Path) -> Result<Vec<serde_json::Value>> {
    let text = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(path, e)),
    };
    let mut values = Vec::new();
    for line in text.split_inclusive(|&b| b == b'\n') {
        // A line without its newline was cut short, even if what is there happens to parse.
        let Some(line) = line.strip_suffix(b"\n") else { break };
        match serde_json::from_slice::<serde_json::Value>(line) {
            Ok(v @ serde_json::Value::Object(_)) => values.push(v),
            _ => break,
        }
    }
    Ok(values)
}

/// Rewrites a `.jsonl` log (atomically) keeping only its complete lines whose numeric `key` is
/// `<= last`: what a resumed run must start from so that no step appears twice and a torn final
/// line is gone. Returns the number of lines kept.
pub fn truncate_jsonl(path: &Path, key: &str, last: u64) -> Result<usize> {
    if !path.exists() {
        return Ok(0);
    }
    let mut out = String::new();
    let mut kept = 0;
    for value in read_jsonl_prefix(path)? {
        if value.get(key).and_then(|s| s.as_u64()).is_some_and(|s| s <= last) {
            out.push_str(&value.to_string());
            out.push('\n');
            kept += 1;
        }
    }
    write_atomic(path, out.as_bytes())?;
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ggdm-io-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        dir
    }

    #[test]
    fn torn_and_later_lines_are_dropped() {
        let dir = temp("jsonl");
        let path = dir.join("metrics.jsonl");
        std::fs::write(&path, "{\"step\":1}\n{\"step\":2}\n{\"step\":3}\n{\"step\":4,\"lo").expect("write");
        assert_eq!(read_jsonl_prefix(&path).expect("read").len(), 3);
        assert_eq!(truncate_jsonl(&path, "step", 2).expect("truncate"), 2);
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "{\"step\":1}\n{\"step\":2}\n");
        // A final line without its newline is torn even when it parses.
        std::fs::write(&path, "{\"step\":1}\n{\"step\":2}").expect("write");
        assert_eq!(truncate_jsonl(&path, "step", 9).expect("truncate"), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn write_errors_name_the_path() {
        let dir = temp("errors");
        let file = dir.join("regular");
        std::fs::write(&file, "x").expect("write");
        let err = write_atomic(&file.join("out.json"), b"{}").expect_err("parent is a file").to_string();
        assert!(err.contains("regular") && err.contains("not a folder"), "{err}");
        if Path::new("/dev/full").exists() {
            let err = write_atomic(Path::new("/dev/full"), b"data").expect_err("disk full").to_string();
            assert!(err.contains("/dev/full"), "{err}");
            assert!(Path::new("/dev/full").exists() && is_special_file(Path::new("/dev/full")));
        }
        write_atomic(&dir.join("ok.txt"), b"fine").expect("write");
        assert_eq!(std::fs::read(dir.join("ok.txt")).expect("read"), b"fine");
        let leftovers = std::fs::read_dir(&dir).expect("dir").filter_map(|e| e.ok()).count();
        assert_eq!(leftovers, 2, "no temporary files are left behind");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
