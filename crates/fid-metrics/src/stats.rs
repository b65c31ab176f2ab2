//! Feature statistics and their files (DESIGN.md section 4, "Metrics": reference statistics are
//! `.npz` files with keys `mu` and `sigma`, the same files pytorch-fid writes and reads).
//!
//! [`FeatureStats`] holds the mean and the unbiased covariance of a feature set in f64, computed
//! like numpy's `np.mean(axis=0)` and `np.cov(rowvar=False)` (divide by N - 1). Its `.npz` file is
//! what pytorch-fid's `--save-stats` writes, `np.savez_compressed(path, mu=mu, sigma=sigma)`:
//! a deflate-compressed zip with members `mu.npy` (float64 [d]) and `sigma.npy` (float64 [d, d]).
//! Reading also accepts float32 arrays and uncompressed files. Feature sets for KID are stored as
//! `.npz` with the single key `features` (float32 or float64 [N, d]). Every error of a read names
//! the file (and the array), and arrays holding NaN or infinity are refused.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use ndarray::{Array1, Array2, ArrayD, IxDyn, OwnedRepr};
use ndarray_npy::{NpzReader, NpzWriter};
use tch::{Device, Kind, Tensor};

use crate::data::check_finite;
use crate::error::{Error, Result};

/// Key of the mean in a statistics file.
pub const MU_KEY: &str = "mu";
/// Key of the covariance in a statistics file.
pub const SIGMA_KEY: &str = "sigma";
/// Key of the feature matrix in a features file.
pub const FEATURES_KEY: &str = "features";

/// Mean and covariance of a feature set, in f64.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureStats {
    /// Mean feature vector, length d.
    pub mu: Array1<f64>,
    /// Unbiased covariance (divided by N - 1), d x d.
    pub sigma: Array2<f64>,
}

impl FeatureStats {
    /// Builds statistics from parts, checking that `sigma` is d x d for d = `mu.len()`.
    pub fn new(mu: Array1<f64>, sigma: Array2<f64>) -> Result<Self> {
        let d = mu.len();
        if sigma.dim() != (d, d) {
            return Err(Error::shape(
                "sigma",
                format!("{d} x {d} (the length of mu)"),
                sigma.shape().iter().map(|&s| s as i64).collect(),
            ));
        }
        Ok(Self { mu, sigma })
    }

    /// Statistics of an N x d feature tensor (any float kind and device; N >= 2), computed in f64
    /// on the CPU: `mu = mean over rows`, `sigma = (X - mu)^T (X - mu) / (N - 1)`.
    pub fn from_features(features: &Tensor) -> Result<Self> {
        let size = features.size();
        if size.len() != 2 || size[0] < 2 {
            return Err(Error::shape("features", "N x d with N >= 2", size));
        }
        let (n, d) = (size[0], size[1]);
        let (mu, sigma) = tch::no_grad(|| -> Result<(Tensor, Tensor)> {
            let x = features.f_to_device(Device::Cpu)?.f_to_kind(Kind::Double)?;
            let mu = x.f_mean_dim(0, false, Kind::Double)?;
            let centered = x.f_sub(&mu)?;
            let sigma = centered.f_tr()?.f_mm(&centered)?.f_div_scalar((n - 1) as f64)?;
            Ok((mu, sigma))
        })?;
        Self::new(
            Array1::from_vec(tensor_to_vec_f64(&mu)?),
            Array2::from_shape_vec((d as usize, d as usize), tensor_to_vec_f64(&sigma)?)
                .map_err(|e| Error::invalid("covariance", e.to_string()))?,
        )
    }

    /// Feature dimension d.
    pub fn dim(&self) -> usize {
        self.mu.len()
    }

    /// Reads a pytorch-fid statistics file (keys `mu`, `sigma`).
    pub fn read_npz(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let mut reader = open_npz(path)?;
        let mu = read_float_array(&mut reader, path, MU_KEY)?;
        let sigma = read_float_array(&mut reader, path, SIGMA_KEY)?;
        check_finite(path, Some(MU_KEY), &mu, false)?;
        check_finite(path, Some(SIGMA_KEY), &sigma, false)?;
        if mu.ndim() != 1 {
            return Err(Error::bad_array(path, MU_KEY, format!("expected a vector [d], found shape {:?}", mu.shape())));
        }
        let d = mu.len();
        if sigma.shape() != [d, d] {
            return Err(Error::bad_array(
                path,
                SIGMA_KEY,
                format!("expected shape [{d}, {d}] (d = length of `mu`), found shape {:?}", sigma.shape()),
            ));
        }
        let mu = mu.into_dimensionality().map_err(|e| Error::bad_array(path, MU_KEY, e.to_string()))?;
        let sigma = sigma.into_dimensionality().map_err(|e| Error::bad_array(path, SIGMA_KEY, e.to_string()))?;
        Ok(Self { mu, sigma })
    }

    /// Writes the statistics as pytorch-fid does (`np.savez_compressed(path, mu=mu, sigma=sigma)`:
    /// deflated zip, members `mu.npy` and `sigma.npy`, float64, C order).
    pub fn write_npz(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let mut buffer = std::io::Cursor::new(Vec::new());
        let mut writer = NpzWriter::new_compressed(&mut buffer);
        writer
            .add_array(MU_KEY, &self.mu)
            .and_then(|_| writer.add_array(SIGMA_KEY, &self.sigma))
            .map_err(|e| Error::format(path, format!("cannot write .npz: {e}")))?;
        writer.finish().map_err(|e| Error::format(path, format!("cannot write .npz: {e}")))?;
        Ok(ggdm_core::io::write_atomic(path, buffer.get_ref())?)
    }
}

/// Reads an N x d feature matrix from the key `features` of an `.npz` file. The tensor keeps the
/// stored element type (f32 or f64) and lives on the CPU.
pub fn read_features_npz(path: impl AsRef<Path>) -> Result<Tensor> {
    let path = path.as_ref();
    let mut reader = open_npz(path)?;
    require_key(&mut reader, path, FEATURES_KEY)?;
    let tensor = match reader.by_name::<OwnedRepr<f32>, IxDyn>(FEATURES_KEY) {
        Ok(array) => {
            check_finite(path, Some(FEATURES_KEY), &array, false)?;
            array_to_tensor_f32(&array)?
        }
        Err(err_f32) => match reader.by_name::<OwnedRepr<f64>, IxDyn>(FEATURES_KEY) {
            Ok(array) => {
                check_finite(path, Some(FEATURES_KEY), &array, false)?;
                array_to_tensor_f64(&array)?
            }
            Err(_) => {
                return Err(Error::bad_array(
                    path,
                    FEATURES_KEY,
                    format!("expected float32 or float64 data: {err_f32}"),
                ))
            }
        },
    };
    let size = tensor.size();
    if size.len() != 2 || size[0] < 1 {
        return Err(Error::bad_array(
            path,
            FEATURES_KEY,
            format!("expected shape [N, d] with N >= 1, found shape {size:?}"),
        ));
    }
    Ok(tensor)
}

/// Writes an N x d feature tensor to an `.npz` file under the key `features` (float64 if the
/// tensor is f64, else float32; uncompressed, like `np.savez`).
pub fn write_features_npz(path: impl AsRef<Path>, features: &Tensor) -> Result<()> {
    let path = path.as_ref();
    let size = features.size();
    if size.len() != 2 {
        return Err(Error::shape("features", "N x d", size));
    }
    let shape = IxDyn(&[size[0] as usize, size[1] as usize]);
    let cpu = features.f_detach()?.f_to_device(Device::Cpu)?;
    let mut buffer = std::io::Cursor::new(Vec::new());
    let mut writer = NpzWriter::new(&mut buffer);
    let written = if cpu.kind() == Kind::Double {
        let data = tensor_to_vec_f64(&cpu)?;
        let array = ArrayD::from_shape_vec(shape, data).map_err(|e| Error::invalid("features", e.to_string()))?;
        writer.add_array(FEATURES_KEY, &array)
    } else {
        let data = Vec::<f32>::try_from(&cpu.f_to_kind(Kind::Float)?.f_reshape([-1])?)?;
        let array = ArrayD::from_shape_vec(shape, data).map_err(|e| Error::invalid("features", e.to_string()))?;
        writer.add_array(FEATURES_KEY, &array)
    };
    written.map_err(|e| Error::format(path, format!("cannot write .npz: {e}")))?;
    writer.finish().map_err(|e| Error::format(path, format!("cannot write .npz: {e}")))?;
    Ok(ggdm_core::io::write_atomic(path, buffer.get_ref())?)
}

/// The names of the arrays in an `.npz` file (without the `.npy` suffix).
pub fn npz_keys(path: impl AsRef<Path>) -> Result<Vec<String>> {
    let path = path.as_ref();
    let mut reader = open_npz(path)?;
    reader.names().map_err(|e| Error::format(path, format!("cannot list the .npz members: {e}")))
}

fn open_npz(path: &Path) -> Result<NpzReader<BufReader<File>>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    NpzReader::new(BufReader::new(file)).map_err(|e| Error::format(path, format!("not an .npz (zip) file: {e}")))
}

fn require_key(reader: &mut NpzReader<BufReader<File>>, path: &Path, key: &str) -> Result<()> {
    let names = reader.names().map_err(|e| Error::format(path, format!("cannot list the .npz members: {e}")))?;
    if names.iter().any(|n| n == key) {
        Ok(())
    } else {
        Err(Error::MissingKey { path: path.to_path_buf(), key: key.to_string(), available: names })
    }
}

/// Reads `key` as f64, accepting float64 or float32 data.
fn read_float_array(reader: &mut NpzReader<BufReader<File>>, path: &Path, key: &str) -> Result<ArrayD<f64>> {
    require_key(reader, path, key)?;
    match reader.by_name::<OwnedRepr<f64>, IxDyn>(key) {
        Ok(array) => Ok(array),
        Err(err_f64) => match reader.by_name::<OwnedRepr<f32>, IxDyn>(key) {
            Ok(array) => Ok(array.mapv(f64::from)),
            Err(_) => Err(Error::bad_array(path, key, format!("expected float64 (or float32) data: {err_f64}"))),
        },
    }
}

/// Flattens a tensor into a `Vec<f64>` (row-major), on the CPU.
pub(crate) fn tensor_to_vec_f64(t: &Tensor) -> Result<Vec<f64>> {
    let flat = t.f_detach()?.f_to_device(Device::Cpu)?.f_to_kind(Kind::Double)?.f_reshape([-1])?;
    Ok(Vec::<f64>::try_from(&flat)?)
}

fn array_to_tensor_f32(array: &ArrayD<f32>) -> Result<Tensor> {
    let shape: Vec<i64> = array.shape().iter().map(|&s| s as i64).collect();
    let data: Vec<f32> = array.iter().copied().collect();
    Ok(Tensor::from_slice(&data).f_reshape(&shape)?)
}

fn array_to_tensor_f64(array: &ArrayD<f64>) -> Result<Tensor> {
    let shape: Vec<i64> = array.shape().iter().map(|&s| s as i64).collect();
    let data: Vec<f64> = array.iter().copied().collect();
    Ok(Tensor::from_slice(&data).f_reshape(&shape)?)
}

/// An ndarray matrix as an f64 tensor on the CPU.
pub(crate) fn matrix_to_tensor(matrix: ndarray::ArrayView2<f64>) -> Result<Tensor> {
    let (rows, cols) = matrix.dim();
    let data: Vec<f64> = matrix.iter().copied().collect();
    Ok(Tensor::from_slice(&data).f_reshape([rows as i64, cols as i64])?)
}
