//! Crash-safe file writing for the files this crate writes (statistics `.npz`, classifier
//! weights and sidecars): a temporary file in the same folder, fsync, rename, fsync of the folder,
//! so a killed process leaves either the old file or the new one. An existing output that is not
//! a regular file (`/dev/full`, a FIFO) is written in place; errors name the output path.

use crate::error::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes `path` atomically with `write`, which fills the file at the path it is given.
pub(crate) fn write_atomic_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let special = std::fs::metadata(path).map(|m| !m.is_file() && !m.is_dir()).unwrap_or(false);
    if special {
        return write(path);
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| Error::invalid("output path", format!("{} has no file name", path.display())))?;
    if !dir.is_dir() {
        let what = if dir.exists() { "is a file, not a folder" } else { "does not exist" };
        return Err(Error::invalid(
            "output path",
            format!("cannot write {}: {} {what}", path.display(), dir.display()),
        ));
    }
    // Unique per process and per call, so threads writing the same file do not share a temporary.
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let temporary = dir.join(format!(".{}.tmp-{}-{n}", name.to_string_lossy(), std::process::id()));
    let result = write(&temporary).and_then(|()| {
        let file = std::fs::File::open(&temporary).map_err(|e| Error::io(path, e))?;
        file.sync_all().map_err(|e| Error::io(path, e))?;
        drop(file);
        std::fs::rename(&temporary, path).map_err(|e| Error::io(path, e))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&temporary);
        return result;
    }
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |target| {
        let mut file = std::fs::File::create(target).map_err(|e| Error::io(path, e))?;
        file.write_all(bytes).and_then(|()| file.flush()).map_err(|e| Error::io(path, e))
    })
}
