//! Strict by-name weight loading shared by the feature networks: every variable of the network
//! must get a tensor of its name and shape, and every tensor must name a variable.

use std::collections::HashSet;

use tch::{nn, Tensor};

/// Names that did not match after [`copy_by_name`] (each list sorted; both empty on success).
#[derive(Debug, Default)]
pub(crate) struct NameMismatch {
    /// Variables of the network that no tensor named.
    pub missing: Vec<String>,
    /// Tensors that name no variable.
    pub unexpected: Vec<String>,
}

impl NameMismatch {
    /// Whether every name matched.
    pub fn is_empty(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty()
    }
}

/// What [`copy_by_name`] can fail with besides unmatched names.
#[derive(Debug)]
pub(crate) enum CopyError {
    /// The tensor `name` has shape `got`; the network's variable has `want`.
    Shape { name: String, got: Vec<i64>, want: Vec<i64> },
    /// libtorch refused the copy.
    Torch(tch::TchError),
}

/// Copies each `(name, tensor)` into the variable of that name in `var_store` (converting the
/// dtype to the variable's), stopping at the first shape mismatch; returns the unmatched names.
pub(crate) fn copy_by_name(
    var_store: &nn::VarStore,
    tensors: Vec<(String, Tensor)>,
) -> std::result::Result<NameMismatch, CopyError> {
    let mut variables = var_store.variables();
    let mut loaded = HashSet::new();
    let mut mismatch = NameMismatch::default();
    for (name, src) in tensors {
        let Some(dst) = variables.get_mut(&name) else {
            mismatch.unexpected.push(name);
            continue;
        };
        if dst.size() != src.size() {
            return Err(CopyError::Shape { got: src.size(), want: dst.size(), name });
        }
        tch::no_grad(|| dst.f_copy_(&src)).map_err(CopyError::Torch)?;
        loaded.insert(name);
    }
    mismatch.missing = variables.into_keys().filter(|k| !loaded.contains(k)).collect();
    mismatch.missing.sort();
    mismatch.unexpected.sort();
    Ok(mismatch)
}
