//! The one error type of `ddss-opt`; every variant names the key, file or shape at fault.

use std::path::PathBuf;

/// Errors of `ddss-opt`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is missing, of the wrong type or out of range (`key` names it).
    #[error("config key `{key}`: {msg}")]
    Config { key: String, msg: String },
    /// A tensor had the wrong shape.
    #[error("shape mismatch for {what}: expected {expected}, got {got:?}")]
    Shape { what: String, expected: String, got: Vec<i64> },
    /// A file could not be read or written.
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    /// A numerical fault (NaN/inf) that could not be recovered from.
    #[error("numerical fault: {0}")]
    Numerical(String),
    /// From the sampler library.
    #[error(transparent)]
    Core(#[from] ggdm_core::Error),
    /// The feature network of the loss or of validation failed (out of memory, a wrongly shaped
    /// input, ...).
    #[error("the feature network failed: {0}")]
    Features(#[from] fid_metrics::Error),
    /// From libtorch.
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
}

impl Error {
    /// Shorthand for [`Error::Config`].
    pub fn config(key: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Config { key: key.into(), msg: msg.into() }
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_feature_network_error_says_the_feature_network_failed() {
        let e = Error::from(fid_metrics::Error::invalid("input", "CUDA out of memory"));
        assert_eq!(e.to_string(), "the feature network failed: invalid input: CUDA out of memory");
    }
}
