//! Image data for the metrics (DESIGN.md section 3, "Real data here": the loader reads IDX(.gz)
//! files from any path and folders of PNG/JPEG images of any size; section 7: `stats`/`fid` take a
//! folder, an IDX(.gz) file, and `.npy` sample arrays are float32 N x C x H x W in [-1, 1]).
//!
//! Every loader returns float32 samples in [-1, 1], N x C x H x W on the CPU, with 8-bit pixels
//! mapped by `x = x_uint8 / 127.5 - 1` (the inverse of the Inception preprocessing's
//! `x_uint8 = (x + 1) * 127.5`, so real images reach the network with their exact pixel values).
//! IDX files may be gzip-compressed (detected from the content, not the name). Image folders are
//! read in file-name order; files whose names start with `.` and subfolders are skipped; every
//! other file must decode as an image, and all images must share one size and channel count
//! (grey or grey+alpha -> 1 channel, RGB or RGBA -> 3 channels; alpha is dropped).

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageReader};
use ndarray::ArrayD;
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::rng::SplitMix64;

/// IDX magic number of an unsigned-byte 3-dimensional array (images N x H x W).
pub const IDX_IMAGES_MAGIC: u32 = 0x0000_0803;
/// IDX magic number of an unsigned-byte 1-dimensional array (labels).
pub const IDX_LABELS_MAGIC: u32 = 0x0000_0801;

/// How [`subsample`] picks `num` of N items.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Subsample {
    /// The first `num` items (default; what `--num N` means).
    #[default]
    First,
    /// `num` items drawn without replacement with this seed, kept in their original order.
    Seeded(u64),
}

/// Loads samples from `path`: a folder of images, a `.npy` array (N x C x H x W float, already in
/// [-1, 1]) or an IDX(.gz) image file.
pub fn load_images(path: impl AsRef<Path>) -> Result<Tensor> {
    let path = path.as_ref();
    if path.is_dir() {
        load_image_folder(path)
    } else if path.extension().is_some_and(|ext| ext == "npy") {
        load_samples_npy(path)
    } else {
        load_idx_images(path)
    }
}

/// Loads an IDX image file (magic 0x00000803, N x H x W bytes) as N x 1 x H x W samples.
pub fn load_idx_images(path: impl AsRef<Path>) -> Result<Tensor> {
    let path = path.as_ref();
    let bytes = read_maybe_gzip(path)?;
    let (dims, data) = parse_idx(path, &bytes, IDX_IMAGES_MAGIC, "image")?;
    let (n, h, w) = (dims[0] as i64, dims[1] as i64, dims[2] as i64);
    if n == 0 || h == 0 || w == 0 {
        return Err(Error::format(path, format!("the IDX file holds no pixels (dimensions {dims:?})")));
    }
    uint8_to_samples(Tensor::from_slice(data).f_reshape([n, 1, h, w])?)
}

/// Loads an IDX label file (magic 0x00000801).
pub fn load_idx_labels(path: impl AsRef<Path>) -> Result<Vec<u8>> {
    let path = path.as_ref();
    let bytes = read_maybe_gzip(path)?;
    let (_, data) = parse_idx(path, &bytes, IDX_LABELS_MAGIC, "label")?;
    Ok(data.to_vec())
}

/// Loads every image of a folder (see the module documentation for the rules).
pub fn load_image_folder(dir: impl AsRef<Path>) -> Result<Tensor> {
    let dir = dir.as_ref();
    let mut files: Vec<PathBuf> = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        let is_dir = entry.file_type().map_err(|e| Error::io(entry.path(), e))?.is_dir();
        if !hidden && !is_dir {
            files.push(entry.path());
        }
    }
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    let Some(first) = files.first().cloned() else {
        return Err(Error::format(dir, "the folder holds no image files (PNG or JPEG expected)"));
    };
    let mut layout: Option<(u32, u32, usize)> = None;
    let mut pixels: Vec<u8> = Vec::new();
    for file in &files {
        let image = decode_image(file)?;
        let channels = if image.color().has_color() { 3 } else { 1 };
        let this = (image.width(), image.height(), channels);
        match layout {
            None => {
                layout = Some(this);
                pixels.reserve(files.len() * (this.0 * this.1) as usize * channels);
            }
            Some(expected) if expected != this => {
                return Err(Error::format(
                    file,
                    format!(
                        "image is {}x{} with {} channel(s), but {} is {}x{} with {} channel(s); all images \
                         of a folder must share size and channel count",
                        this.0,
                        this.1,
                        this.2,
                        first.display(),
                        expected.0,
                        expected.1,
                        expected.2
                    ),
                ));
            }
            Some(_) => {}
        }
        if channels == 3 {
            pixels.extend_from_slice(image.to_rgb8().as_raw());
        } else {
            pixels.extend_from_slice(image.to_luma8().as_raw());
        }
    }
    let (w, h, c) = layout.unwrap_or((0, 0, 1));
    let nhwc = Tensor::from_slice(&pixels).f_reshape([files.len() as i64, h as i64, w as i64, c as i64])?;
    uint8_to_samples(nhwc.f_permute([0, 3, 1, 2])?.f_contiguous()?)
}

/// Loads a `.npy` array of samples (float32 or float64, N x C x H x W with C = 1 or 3) as f32.
pub fn load_samples_npy(path: impl AsRef<Path>) -> Result<Tensor> {
    let path = path.as_ref();
    let data: ArrayD<f32> = match ndarray_npy::read_npy::<_, ArrayD<f32>>(path) {
        Ok(array) => array,
        Err(err_f32) => match ndarray_npy::read_npy::<_, ArrayD<f64>>(path) {
            Ok(array) => array.mapv(|v| v as f32),
            Err(_) => return Err(Error::format(path, format!("cannot read as a float .npy array: {err_f32}"))),
        },
    };
    let shape: Vec<i64> = data.shape().iter().map(|&s| s as i64).collect();
    if shape.len() != 4 || !(shape[1] == 1 || shape[1] == 3) {
        return Err(Error::format(
            path,
            format!("expected samples N x C x H x W with C = 1 or 3, found shape {shape:?}"),
        ));
    }
    let flat: Vec<f32> = data.iter().copied().collect();
    Ok(Tensor::from_slice(&flat).f_reshape(&shape)?)
}

/// The rows [`subsample`] keeps, in increasing order.
pub fn subsample_indices(total: usize, num: usize, how: Subsample) -> Vec<usize> {
    if num >= total {
        return (0..total).collect();
    }
    match how {
        Subsample::First => (0..num).collect(),
        Subsample::Seeded(seed) => {
            let mut chosen = SplitMix64::new(seed).choose_without_replacement(total, num);
            chosen.sort_unstable();
            chosen
        }
    }
}

/// Keeps `num` of the N samples along dimension 0 (all of them if `num >= N`), deterministically:
/// the first `num`, or a seeded subset in original order.
pub fn subsample(x: &Tensor, num: usize, how: Subsample) -> Result<Tensor> {
    let total = x.size().first().copied().unwrap_or(0) as usize;
    if num >= total {
        return Ok(x.shallow_clone());
    }
    match how {
        Subsample::First => Ok(x.f_narrow(0, 0, num as i64)?),
        Subsample::Seeded(_) => {
            let rows: Vec<i64> = subsample_indices(total, num, how).into_iter().map(|i| i as i64).collect();
            Ok(x.f_index_select(0, &Tensor::from_slice(&rows).f_to_device(x.device())?)?)
        }
    }
}

/// Rounds samples in [-1, 1] to the 256 levels an 8-bit image can hold (clamping outside values),
/// as saving them to PNG and loading them back would. Not differentiable (use it for evaluation,
/// not inside a loss).
pub fn quantize_to_uint8_levels(x: &Tensor) -> Result<Tensor> {
    Ok(x.f_add_scalar(1.0)?
        .f_mul_scalar(127.5)?
        .f_round()?
        .f_clamp(0.0, 255.0)?
        .f_div_scalar(127.5)?
        .f_sub_scalar(1.0)?)
}

/// uint8 tensor -> f32 samples `x / 127.5 - 1`.
fn uint8_to_samples(pixels: Tensor) -> Result<Tensor> {
    Ok(pixels.f_to_kind(Kind::Float)?.f_div_scalar(127.5)?.f_sub_scalar(1.0)?.f_to_device(Device::Cpu)?)
}

fn decode_image(path: &Path) -> Result<DynamicImage> {
    let reader = ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    reader.decode().map_err(|source| Error::Image { path: path.to_path_buf(), source })
}

/// The file's bytes, gunzipped if they start with the gzip magic 1f 8b.
fn read_maybe_gzip(path: &Path) -> Result<Vec<u8>> {
    let raw = fs::read(path).map_err(|e| Error::io(path, e))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut decoded = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice())
            .read_to_end(&mut decoded)
            .map_err(|e| Error::format(path, format!("not a valid gzip stream: {e}")))?;
        Ok(decoded)
    } else {
        Ok(raw)
    }
}

/// Checks the magic number and returns (dimensions, data) of an IDX file.
fn parse_idx<'a>(path: &Path, bytes: &'a [u8], expected_magic: u32, what: &str) -> Result<(Vec<usize>, &'a [u8])> {
    let Some(magic_bytes) = bytes.get(0..4) else {
        return Err(Error::format(path, format!("too short for an IDX {what} file ({} bytes)", bytes.len())));
    };
    let magic = u32::from_be_bytes([magic_bytes[0], magic_bytes[1], magic_bytes[2], magic_bytes[3]]);
    if magic != expected_magic {
        return Err(Error::format(
            path,
            format!("not an IDX {what} file: magic number 0x{magic:08x}, expected 0x{expected_magic:08x}"),
        ));
    }
    let num_dims = (magic & 0xff) as usize;
    let header_len = 4 + 4 * num_dims;
    let Some(header) = bytes.get(4..header_len) else {
        return Err(Error::format(path, "truncated IDX header"));
    };
    let dims: Vec<usize> =
        header.chunks_exact(4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize).collect();
    let Some(expected_len) = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)) else {
        return Err(Error::format(path, format!("IDX dimensions {dims:?} are too large to be real")));
    };
    let data = &bytes[header_len..];
    if data.len() < expected_len {
        return Err(Error::format(
            path,
            format!("truncated IDX data: dimensions {dims:?} need {expected_len} bytes, the file has {}", data.len()),
        ));
    }
    Ok((dims, &data[..expected_len]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_subsample_is_sorted_distinct_and_reproducible() {
        let a = subsample_indices(1000, 10, Subsample::Seeded(3));
        assert_eq!(a, subsample_indices(1000, 10, Subsample::Seeded(3)));
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(subsample_indices(5, 10, Subsample::Seeded(3)), vec![0, 1, 2, 3, 4]);
        assert_eq!(subsample_indices(100, 3, Subsample::First), vec![0, 1, 2]);
    }

    #[test]
    fn quantize_rounds_to_pixel_levels() -> Result<()> {
        let x = Tensor::from_slice(&[-1.5f32, -1.0, 0.0, 0.999, 1.2]);
        let q = Vec::<f32>::try_from(quantize_to_uint8_levels(&x)?)?;
        let expected = [-1.0f32, -1.0, 128.0 / 127.5 - 1.0, 1.0, 1.0];
        for (got, want) in q.iter().zip(expected) {
            assert!((got - want).abs() < 1e-6, "{q:?}");
        }
        Ok(())
    }
}
