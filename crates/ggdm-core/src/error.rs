//! The one error type of `ggdm-core`. Every variant names the file, key, value or shape at fault.

use std::path::PathBuf;

/// Errors of `ggdm-core`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is out of range or inconsistent (`what` names the key).
    #[error("invalid {what}: {msg}")]
    Invalid { what: String, msg: String },
    /// A setting (a configuration key or a command-line option, named at the start of the
    /// message) is unknown, out of range or inconsistent; the message is shown as it is.
    #[error("{0}")]
    Config(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file was read but its content is not what it should be.
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    /// A tensor had the wrong shape.
    #[error("shape mismatch for {what}: expected {expected}, got {got:?}")]
    Shape { what: String, expected: String, got: Vec<i64> },
    /// An error raised by libtorch.
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
}

impl Error {
    /// Shorthand for [`Error::Invalid`].
    pub fn invalid(what: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Invalid { what: what.into(), msg: msg.into() }
    }

    /// Shorthand for [`Error::Config`].
    pub fn config(msg: impl Into<String>) -> Self {
        Error::Config(msg.into())
    }

    /// Shorthand for [`Error::Format`].
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format { path: path.into(), msg: msg.into() }
    }

    /// Shorthand for [`Error::Io`].
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
