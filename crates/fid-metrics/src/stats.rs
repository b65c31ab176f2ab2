//! Feature statistics and their files (DESIGN.md section 4, "Metrics": reference statistics are
//! `.npz` files with keys `mu` and `sigma`, the same files pytorch-fid writes and reads).
//!
//! [`FeatureStats`] holds the mean and the unbiased covariance of a feature set in f64, computed
//! like numpy's `np.mean(axis=0)` and `np.cov(rowvar=False)` (divide by N - 1). Its `.npz` file is
//! what pytorch-fid's `--save-stats` writes, `np.savez_compressed(path, mu=mu, sigma=sigma)`:
//! a deflate-compressed zip with members `mu.npy` (float64 [d]) and `sigma.npy` (float64 [d, d]).
//! Reading also accepts float32 arrays and uncompressed files. Feature sets for KID are stored as
//! `.npz` with the single key `features` (float32 or float64 [N, d]). Every error of a read names
//! the file (and the array), and arrays holding NaN or infinity are refused. A member whose `.npy`
//! header declares more data than the zip directory says it holds is refused before anything of
//! the declared size is allocated.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use ndarray::{Array1, Array2, ArrayD, IxDyn};
use ndarray_npy::{NpzWriter, ReadNpyExt, ReadableElement};
use tch::{Device, Kind, Tensor};
use zip::{CompressionMethod, ZipArchive};

use crate::data::{check_finite, npy_layout, NPY_HEADER_LIMIT};
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
        let mut npz = Npz::open(path)?;
        let mu = read_float_array(&mut npz, MU_KEY)?;
        let sigma = read_float_array(&mut npz, SIGMA_KEY)?;
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
    let mut npz = Npz::open(path)?;
    let member = npz.member(FEATURES_KEY)?;
    let tensor = match npz.read::<f32>(&member) {
        Ok(array) => {
            check_finite(path, Some(FEATURES_KEY), &array, false)?;
            array_to_tensor_f32(&array)?
        }
        Err(err_f32) => match npz.read::<f64>(&member) {
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
    Npz::open(path.as_ref())?.keys()
}

/// Reads the array `key` of an `.npz` file (element type `A`, any shape), after the checks every
/// read here makes: the key must exist, and the member's `.npy` header must declare no more data
/// than the member holds.
pub fn read_npz_array<A: ReadableElement>(path: impl AsRef<Path>, key: &str) -> Result<ArrayD<A>> {
    let path = path.as_ref();
    let mut npz = Npz::open(path)?;
    let member = npz.member(key)?;
    npz.read(&member)
        .map_err(|e| Error::bad_array(path, key, format!("cannot read as {}: {e}", std::any::type_name::<A>())))
}

/// Compression ratio deflate cannot exceed (a run of one byte: 258 bytes per 2-bit code, about
/// 1032:1), to tell a directory's uncompressed size that cannot be true.
const DEFLATE_MAX_RATIO: u64 = 1032;

/// An open `.npz` (zip) file. Members are read with ndarray-npy, which allocates what a member's
/// header declares before reading the data, so [`Npz::member`] first checks the declared size
/// against the member's uncompressed size in the zip directory (and that size against what the
/// member's compressed bytes can hold).
struct Npz {
    path: PathBuf,
    zip: ZipArchive<BufReader<File>>,
    file_len: u64,
}

impl Npz {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let zip = ZipArchive::new(BufReader::new(file))
            .map_err(|e| Error::format(path, format!("not an .npz (zip) file: {e}")))?;
        Ok(Self { path: path.to_path_buf(), zip, file_len })
    }

    /// The member names, a single `.npy` suffix stripped (as numpy does).
    fn keys(&mut self) -> Result<Vec<String>> {
        (0..self.zip.len())
            .map(|i| {
                let file = self
                    .zip
                    .by_index(i)
                    .map_err(|e| Error::format(&self.path, format!("cannot list the .npz members: {e}")))?;
                let name = file.name();
                Ok(name.strip_suffix(".npy").unwrap_or(name).to_owned())
            })
            .collect()
    }

    /// The member holding `key` (`key` itself, else `key.npy`, as numpy looks), once its header
    /// has been checked against its size.
    fn member(&mut self, key: &str) -> Result<String> {
        let with_suffix = format!("{key}.npy");
        let member = match (self.zip.index_for_name(key), self.zip.index_for_name(&with_suffix)) {
            (Some(_), _) => key.to_string(),
            (None, Some(_)) => with_suffix,
            (None, None) => {
                return Err(Error::MissingKey {
                    path: self.path.clone(),
                    key: key.to_string(),
                    available: self.keys()?,
                })
            }
        };
        self.check_member_size(&member)?;
        Ok(member)
    }

    fn check_member_size(&mut self, member: &str) -> Result<()> {
        let path = &self.path;
        let bad = |msg: String| Error::format(path, format!("member {member} {msg}"));
        let mut file = self.zip.by_name(member).map_err(|e| bad(format!("cannot be opened: {e}")))?;
        let (size, compressed) = (file.size(), file.compressed_size());
        let possible = match file.compression() {
            CompressionMethod::Stored => compressed,
            CompressionMethod::Deflated => compressed.saturating_mul(DEFLATE_MAX_RATIO).saturating_add(1024),
            _ => u64::MAX,
        };
        if compressed > self.file_len || size > possible {
            return Err(bad(format!(
                "has {size} bytes from {compressed} {:?} bytes in the zip directory, which cannot be \
                 (the file has {} bytes)",
                file.compression(),
                self.file_len
            )));
        }
        let mut prefix = Vec::new();
        (&mut file)
            .take(size.min(NPY_HEADER_LIMIT as u64))
            .read_to_end(&mut prefix)
            .map_err(|e| bad(format!("cannot be read: {e}")))?;
        let layout = match npy_layout(&prefix, size) {
            Ok(Some(layout)) => layout,
            // Left to the reader, whose message says what is wrong.
            Ok(None) => return Ok(()),
            Err(msg) => return Err(bad(format!("is no valid .npy data: {msg}"))),
        };
        if layout.fits() {
            return Ok(());
        }
        Err(bad(format!(
            "declares shape {} ({} bytes of data) but holds {} bytes after its header",
            layout.shape_tuple(),
            layout.declared_bytes(),
            layout.data
        )))
    }

    /// Reads a member (checked by [`Npz::member`]) as an array of `A`.
    fn read<A: ReadableElement>(&mut self, member: &str) -> std::result::Result<ArrayD<A>, String> {
        let file = self.zip.by_name(member).map_err(|e| e.to_string())?;
        ArrayD::<A>::read_npy(file).map_err(|e| e.to_string())
    }
}

/// Reads `key` as f64, accepting float64 or float32 data.
fn read_float_array(npz: &mut Npz, key: &str) -> Result<ArrayD<f64>> {
    let member = npz.member(key)?;
    match npz.read::<f64>(&member) {
        Ok(array) => Ok(array),
        Err(err_f64) => match npz.read::<f32>(&member) {
            Ok(array) => Ok(array.mapv(f64::from)),
            Err(_) => Err(Error::bad_array(&npz.path, key, format!("expected float64 (or float32) data: {err_f64}"))),
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
