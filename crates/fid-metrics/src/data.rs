//! Image data for the metrics (DESIGN.md section 3, "Real data here": the loader reads IDX(.gz)
//! files from any path and folders of images of any size; section 7: `stats`/`fid` take a folder,
//! an IDX(.gz) file, and `.npy` sample arrays are float32 N x C x H x W in [-1, 1]).
//!
//! Every loader returns float32 samples in [-1, 1], N x C x H x W on the CPU, with 8-bit pixels
//! mapped by `x = x_uint8 / 127.5 - 1` (the inverse of the Inception preprocessing's
//! `x_uint8 = (x + 1) * 127.5`, so real images reach the network with their exact pixel values).
//! IDX files may be gzip-compressed (detected from the content, not the name).
//!
//! Image folders are read as pytorch-fid 0.3.0 reads them (`compute_statistics_of_path`): the files
//! with its image extensions (bmp, jpg, jpeg, pgm, png, ppm, tif, tiff, webp), in sorted file-name
//! order; other files are skipped and counted in one INFO line. Two differences: the extensions
//! match in any case (`A.PNG` is read; pytorch-fid's glob on Linux is case-sensitive and skips
//! it), and names starting with `.` are skipped (pytorch-fid's `pathlib` glob takes `._a.png`, the
//! resource forks macOS leaves, and fails on them). Subfolders, symlinked ones included, are
//! skipped unless [`ReadOptions::recursive`]: then they are walked depth first, the entries of each
//! folder in name order, and a folder reached a second time (a symlink loop, or two links to one
//! folder) is read once. All images must share one size and channel count (grey -> 1 channel,
//! colour -> 3); pixels are what PIL's `convert('RGB')` (pytorch-fid's only conversion) gives:
//! alpha is dropped, palettes are looked up, 16-bit grey values above 255 are clipped to 255 (PIL
//! clips rather than rescales), and 16-bit colour or grey-with-alpha images keep their high byte.
//! [`ReadOptions::limit`] reads only the first images of a folder, so a command that needs `num`
//! images never decodes, or reserves memory for, the rest.
//!
//! `.npy` and `.npz` inputs must hold finite values: a NaN or infinity is an error naming the file
//! and the index of the first one.

use std::collections::HashSet;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageReader};
use ndarray::ArrayD;
use ndarray_npy::ReadNpyExt;
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::rng::SplitMix64;

/// IDX magic number of an unsigned-byte 3-dimensional array (images N x H x W).
pub const IDX_IMAGES_MAGIC: u32 = 0x0000_0803;
/// IDX magic number of an unsigned-byte 1-dimensional array (labels).
pub const IDX_LABELS_MAGIC: u32 = 0x0000_0801;

/// The file extensions an image folder is read for: pytorch-fid 0.3.0's `IMAGE_EXTENSIONS`
/// (matched here in any case).
pub const IMAGE_EXTENSIONS: [&str; 9] = ["bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp"];

/// How many example names the skipped-files line of a folder lists.
const SKIPPED_EXAMPLES: usize = 3;

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

/// How [`load_images_with`] reads a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReadOptions {
    /// Also read the images of subfolders (see the module documentation for the order).
    pub recursive: bool,
    /// Read only the first `limit` images (all when `None`).
    pub limit: Option<usize>,
}

/// The entries of an image folder, sorted into what is read and what is skipped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageFiles {
    /// The image files, in reading order.
    pub files: Vec<PathBuf>,
    /// Files without one of the [`IMAGE_EXTENSIONS`].
    pub not_images: Vec<PathBuf>,
    /// Entries whose names start with `.`.
    pub hidden: Vec<PathBuf>,
    /// Subfolders (symlinked ones included) left unread because the listing is not recursive.
    pub subfolders: Vec<PathBuf>,
    /// Subfolders reached a second time in a recursive listing (symlink loops, repeated links).
    pub repeated_folders: Vec<PathBuf>,
}

impl ImageFiles {
    /// The number of skipped entries.
    pub fn skipped(&self) -> usize {
        self.not_images.len() + self.hidden.len() + self.subfolders.len() + self.repeated_folders.len()
    }

    /// What was skipped and why, in words (`None` when nothing was).
    pub fn skipped_summary(&self) -> Option<String> {
        let parts: Vec<String> = [
            (&self.not_images, "without an image extension"),
            (&self.subfolders, "subfolder(s), not read without recursive"),
            (&self.hidden, "hidden (name starting with `.`)"),
            (&self.repeated_folders, "folder(s) reached again through a symlink"),
        ]
        .into_iter()
        .filter(|(paths, _)| !paths.is_empty())
        .map(|(paths, why)| format!("{} {why} ({})", paths.len(), example_names(paths)))
        .collect();
        (!parts.is_empty()).then(|| format!("skipped {}: {}", self.skipped(), parts.join(", ")))
    }
}

/// The first few file names of `paths`, comma-separated.
fn example_names(paths: &[PathBuf]) -> String {
    let mut names: Vec<String> = paths
        .iter()
        .take(SKIPPED_EXAMPLES)
        .map(|p| p.file_name().map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().to_string()))
        .collect();
    if paths.len() > SKIPPED_EXAMPLES {
        names.push("...".to_string());
    }
    names.join(", ")
}

/// Whether `path` ends in one of the [`IMAGE_EXTENSIONS`], in any case.
pub fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|ext| ext.to_str())
        .is_some_and(|ext| IMAGE_EXTENSIONS.contains(&ext.to_ascii_lowercase().as_str()))
}

/// Lists the image files of `dir` as the folder loaders read them (see the module documentation).
pub fn list_image_files(dir: impl AsRef<Path>, recursive: bool) -> Result<ImageFiles> {
    let dir = dir.as_ref();
    let mut listing = ImageFiles::default();
    let mut visited = HashSet::new();
    visited.insert(fs::canonicalize(dir).map_err(|e| Error::io(dir, e))?);
    walk_folder(dir, recursive, &mut visited, &mut listing)?;
    Ok(listing)
}

/// The entries of one folder, sorted by name.
fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut entries = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        entries.push(entry.map_err(|e| Error::io(dir, e))?.path());
    }
    entries.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(entries)
}

fn walk_folder(dir: &Path, recursive: bool, visited: &mut HashSet<PathBuf>, listing: &mut ImageFiles) -> Result<()> {
    for path in sorted_entries(dir)? {
        if path.file_name().is_some_and(|name| name.to_string_lossy().starts_with('.')) {
            listing.hidden.push(path);
            continue;
        }
        // `metadata` follows symlinks: a link to a folder is a folder. A dangling link is taken as
        // a file, so that reading it names it.
        if !fs::metadata(&path).is_ok_and(|m| m.is_dir()) {
            if has_image_extension(&path) {
                listing.files.push(path);
            } else {
                listing.not_images.push(path);
            }
        } else if !recursive {
            listing.subfolders.push(path);
        } else if visited.insert(fs::canonicalize(&path).map_err(|e| Error::io(&path, e))?) {
            walk_folder(&path, recursive, visited, listing)?;
        } else {
            listing.repeated_folders.push(path);
        }
    }
    Ok(())
}

/// Loads samples from `path`: a folder of images, a `.npy` array (N x C x H x W float, already in
/// [-1, 1]) or an IDX(.gz) image file.
pub fn load_images(path: impl AsRef<Path>) -> Result<Tensor> {
    load_images_with(path, ReadOptions::default())
}

/// [`load_images`] with [`ReadOptions`]: `limit` keeps the first images of any source (and reads
/// only those of a folder), `recursive` applies to folders.
pub fn load_images_with(path: impl AsRef<Path>, options: ReadOptions) -> Result<Tensor> {
    let path = path.as_ref();
    if path.is_dir() {
        load_image_folder_with(path, options)
    } else if path.extension().is_some_and(|ext| ext == "npy") {
        first_rows(load_samples_npy(path)?, options.limit)
    } else {
        load_idx_images_with(path, options.limit)
    }
}

/// The first `limit` rows of `x` (all of them when `None`).
fn first_rows(x: Tensor, limit: Option<usize>) -> Result<Tensor> {
    match limit {
        Some(n) if (n as i64) < x.size()[0] => Ok(x.f_narrow(0, 0, n as i64)?),
        _ => Ok(x),
    }
}

/// Loads an IDX image file (magic 0x00000803, N x H x W bytes) as N x 1 x H x W samples.
pub fn load_idx_images(path: impl AsRef<Path>) -> Result<Tensor> {
    load_idx_images_with(path, None)
}

/// [`load_idx_images`] keeping only the first `limit` images (all when `None`).
pub fn load_idx_images_with(path: impl AsRef<Path>, limit: Option<usize>) -> Result<Tensor> {
    let path = path.as_ref();
    let bytes = read_maybe_gzip(path)?;
    let (dims, data) = parse_idx(path, &bytes, IDX_IMAGES_MAGIC, "image")?;
    if dims.contains(&0) {
        return Err(Error::format(path, format!("the IDX file holds no pixels (dimensions {dims:?})")));
    }
    let (h, w) = (dims[1], dims[2]);
    let n = limit.map_or(dims[0], |limit| limit.min(dims[0]));
    let data = &data[..n * h * w];
    uint8_to_samples(Tensor::from_slice(data).f_reshape([n as i64, 1, h as i64, w as i64])?)
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
    load_image_folder_with(dir, ReadOptions::default())
}

/// [`load_image_folder`] with [`ReadOptions`]. Logs one INFO line when entries were skipped.
pub fn load_image_folder_with(dir: impl AsRef<Path>, options: ReadOptions) -> Result<Tensor> {
    let dir = dir.as_ref();
    let listing = list_image_files(dir, options.recursive)?;
    let total = listing.files.len();
    let read = options.limit.map_or(total, |limit| limit.min(total));
    if let Some(skipped) = listing.skipped_summary() {
        let first = if read < total { format!(", reading the first {read}") } else { String::new() };
        tracing::info!("{}: {total} image file(s){first}; {skipped}", dir.display());
    }
    if total == 0 {
        let why = listing.skipped_summary().unwrap_or_else(|| "it is empty".to_string());
        return Err(Error::format(
            dir,
            format!("the folder holds no image files (extensions {}); {why}", IMAGE_EXTENSIONS.join(", ")),
        ));
    }
    read_image_files(dir, &listing.files[..read])
}

/// Loads one image file as a 1 x C x H x W sample (pixels as in a folder).
pub fn load_image_file(path: impl AsRef<Path>) -> Result<Tensor> {
    let path = path.as_ref();
    read_image_files(path, &[path.to_path_buf()])
}

/// One decoded image's pixels, as PIL's `convert('RGB')` gives them (grey kept as 1 channel).
struct Pixels {
    width: u32,
    height: u32,
    channels: usize,
    bytes: Vec<u8>,
    /// 16-bit grey, whose values above 255 were clipped (as PIL does).
    grey16: bool,
}

/// Decodes `files` (at least one; all of one size and channel count) into samples; `source`
/// names the folder in memory errors.
fn read_image_files(source: &Path, files: &[PathBuf]) -> Result<Tensor> {
    let Some((first_path, rest)) = files.split_first() else {
        return Err(Error::format(source, "no image files to read"));
    };
    let first = decode_pixels(first_path)?;
    let mut pixels = reserve_pixels(source, files.len(), first.bytes.len())?;
    let mut grey16 = Vec::new();
    let layout = (first.width, first.height, first.channels);
    for (path, image) in std::iter::once((first_path, Ok(first))).chain(rest.iter().map(|p| (p, decode_pixels(p)))) {
        let image = image?;
        let this = (image.width, image.height, image.channels);
        if this != layout {
            return Err(layout_mismatch(path, this, first_path, layout));
        }
        if image.grey16 {
            grey16.push(path.clone());
        }
        pixels.extend_from_slice(&image.bytes);
    }
    if !grey16.is_empty() {
        tracing::warn!(
            "{} 16-bit grey image(s) ({}): read as PIL's convert('RGB') (pytorch-fid) reads them, values \
             above 255 clipped to 255 rather than rescaled; convert them to 8-bit for meaningful statistics",
            grey16.len(),
            example_names(&grey16)
        );
    }
    let (w, h, c) = layout;
    let nhwc = Tensor::from_slice(&pixels).f_reshape([files.len() as i64, h as i64, w as i64, c as i64])?;
    uint8_to_samples(nhwc.f_permute([0, 3, 1, 2])?.f_contiguous()?)
}

/// An empty buffer with room for `count` images of `per_image` bytes, or an error naming `source`
/// when that much memory cannot be had.
fn reserve_pixels(source: &Path, count: usize, per_image: usize) -> Result<Vec<u8>> {
    let needed = count.checked_mul(per_image);
    let mut pixels = Vec::new();
    match needed.map(|bytes| pixels.try_reserve_exact(bytes)) {
        Some(Ok(())) => Ok(pixels),
        _ => Err(Error::format(
            source,
            format!(
                "{count} images of {per_image} bytes need {:.1} GiB, more than this machine can allocate; \
                 read fewer (--num)",
                count as f64 * per_image as f64 / (1u64 << 30) as f64
            ),
        )),
    }
}

fn layout_mismatch(path: &Path, this: (u32, u32, usize), first: &Path, expected: (u32, u32, usize)) -> Error {
    Error::format(
        path,
        format!(
            "image is {}x{} with {} channel(s), but {} is {}x{} with {} channel(s); all images of a folder must \
             share size and channel count",
            this.0,
            this.1,
            this.2,
            first.display(),
            expected.0,
            expected.1,
            expected.2
        ),
    )
}

fn decode_pixels(path: &Path) -> Result<Pixels> {
    let image = decode_image(path)?;
    let (width, height) = (image.width(), image.height());
    let high_byte = |v: &u16| (v >> 8) as u8;
    let (channels, bytes, grey16) = match image {
        DynamicImage::ImageLuma8(buffer) => (1, buffer.into_raw(), false),
        DynamicImage::ImageLumaA8(buffer) => (1, keep_channels(buffer.as_raw(), 2, 1, |v| *v), false),
        DynamicImage::ImageRgb8(buffer) => (3, buffer.into_raw(), false),
        DynamicImage::ImageRgba8(buffer) => (3, keep_channels(buffer.as_raw(), 4, 3, |v| *v), false),
        DynamicImage::ImageLuma16(buffer) => (1, buffer.as_raw().iter().map(|&v| v.min(255) as u8).collect(), true),
        DynamicImage::ImageLumaA16(buffer) => (1, keep_channels(buffer.as_raw(), 2, 1, high_byte), false),
        DynamicImage::ImageRgb16(buffer) => (3, buffer.as_raw().iter().map(high_byte).collect(), false),
        DynamicImage::ImageRgba16(buffer) => (3, keep_channels(buffer.as_raw(), 4, 3, high_byte), false),
        other => {
            return Err(Error::format(
                path,
                format!("{:?} pixels are not supported; convert the image to 8-bit", other.color()),
            ))
        }
    };
    Ok(Pixels { width, height, channels, bytes, grey16 })
}

/// The first `keep` of every `stride` values, mapped to bytes.
fn keep_channels<T>(raw: &[T], stride: usize, keep: usize, to_byte: impl Fn(&T) -> u8) -> Vec<u8> {
    raw.chunks_exact(stride).flat_map(|pixel| pixel[..keep].iter().map(&to_byte)).collect()
}

/// Loads a `.npy` array of samples (float32 or float64, N x C x H x W with C = 1 or 3) as f32.
/// The header's shape is checked against the file's size before anything is allocated, and every
/// value must be finite.
pub fn load_samples_npy(path: impl AsRef<Path>) -> Result<Tensor> {
    let path = path.as_ref();
    let samples = load_float_npy(path)?;
    let shape = samples.size();
    if shape.len() != 4 || !(shape[1] == 1 || shape[1] == 3) {
        return Err(Error::format(
            path,
            format!("expected samples N x C x H x W with C = 1 or 3, found shape {shape:?}"),
        ));
    }
    Ok(samples)
}

/// Loads a float32 or float64 `.npy` array of any shape as an f32 tensor, with the checks of
/// [`load_samples_npy`] (the header against the file's size, every value finite, naming the file).
pub fn load_float_npy(path: impl AsRef<Path>) -> Result<Tensor> {
    let path = path.as_ref();
    let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
    check_npy_size(path, &bytes)?;
    let data: ArrayD<f32> = match ArrayD::<f32>::read_npy(bytes.as_slice()) {
        Ok(array) => array,
        Err(err_f32) => match ArrayD::<f64>::read_npy(bytes.as_slice()) {
            Ok(array) => {
                check_finite(path, None, &array, true)?;
                array.mapv(|v| v as f32)
            }
            Err(_) => return Err(Error::format(path, format!("cannot read as a float .npy array: {err_f32}"))),
        },
    };
    check_finite(path, None, &data, false)?;
    let shape: Vec<i64> = data.shape().iter().map(|&s| s as i64).collect();
    let flat: Vec<f32> = data.iter().copied().collect();
    Ok(Tensor::from_slice(&flat).f_reshape(&shape)?)
}

/// The index and value of the first NaN or infinity of `array` (in row-major order), if any;
/// float64 values too large for float32 count as infinite when `for_f32`.
pub(crate) fn first_non_finite<A: Copy + Into<f64>>(array: &ArrayD<A>, for_f32: bool) -> Option<(Vec<usize>, f64)> {
    array.indexed_iter().find_map(|(index, &v)| {
        let v: f64 = v.into();
        let bad = !v.is_finite() || (for_f32 && v.abs() > f32::MAX as f64);
        bad.then(|| (ndarray::Dimension::slice(&index).to_vec(), v))
    })
}

/// Fails, naming the file (and the `.npz` key), when `array` holds a NaN or an infinity (or, when
/// `for_f32`, a value too large for float32).
pub(crate) fn check_finite<A: Copy + Into<f64>>(
    path: &Path,
    key: Option<&str>,
    array: &ArrayD<A>,
    for_f32: bool,
) -> Result<()> {
    let Some((index, value)) = first_non_finite(array, for_f32) else {
        return Ok(());
    };
    let what = if value.is_finite() { format!("{value:e}, too large for float32,") } else { format!("{value}") };
    let msg = format!("holds {what} at index {index:?} (the first non-finite value); every value must be finite");
    Err(match key {
        Some(key) => Error::bad_array(path, key, msg),
        None => Error::format(path, msg),
    })
}

/// Checks that an `.npy` file holds the bytes its header's shape declares, so that reading it
/// never allocates more than the file's size.
fn check_npy_size(path: &Path, bytes: &[u8]) -> Result<()> {
    let layout = match npy_layout(bytes, bytes.len() as u64) {
        Ok(Some(layout)) => layout,
        // Left to the reader, whose message says what is wrong.
        Ok(None) => return Ok(()),
        Err(msg) => return Err(Error::format(path, format!("not a valid .npy file: {msg}"))),
    };
    if layout.fits() {
        return Ok(());
    }
    Err(Error::format(
        path,
        format!(
            "the header declares shape {:?} ({} bytes of data), but the file holds {} bytes",
            layout.shape,
            layout.declared_bytes(),
            layout.data
        ),
    ))
}

/// Longest `.npy` header [`npy_layout`] reads from a stream (numpy itself refuses headers over
/// 10000 bytes unless told otherwise).
pub(crate) const NPY_HEADER_LIMIT: usize = 1 << 16;

/// What an `.npy` header declares, and how many bytes follow it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NpyLayout {
    /// The `'shape'` tuple.
    pub shape: Vec<usize>,
    /// Element count times the `'descr'` element size; `None` when it overflows a `u64`.
    pub declared: Option<u64>,
    /// Bytes after the header.
    pub data: u64,
}

impl NpyLayout {
    /// Whether the data after the header holds at least the declared bytes.
    pub fn fits(&self) -> bool {
        self.declared.is_some_and(|declared| declared <= self.data)
    }

    /// The declared data size in bytes, in words.
    pub fn declared_bytes(&self) -> String {
        self.declared.map_or_else(|| "more than 2^64".to_string(), |d| d.to_string())
    }

    /// The shape as Python writes a tuple: `(3, 4)`, `(5,)`, `()`.
    pub fn shape_tuple(&self) -> String {
        match self.shape.as_slice() {
            [one] => format!("({one},)"),
            dims => format!("({})", dims.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")),
        }
    }
}

/// Parses the header of an `.npy` stream of `total` bytes whose first bytes are `prefix` (the
/// whole file, or at least [`NPY_HEADER_LIMIT`] bytes of it): magic `\x93NUMPY`, the version,
/// the header length (u16 for version 1, u32 for 2 and 3), then a Python dict literal with
/// `'descr'`, `'fortran_order'` and `'shape'`. `Ok(None)` when the dict has no shape or element
/// size this parser understands (the reader then says what is wrong); `Err` when the stream is no
/// `.npy` data or its header is cut short.
pub(crate) fn npy_layout(prefix: &[u8], total: u64) -> std::result::Result<Option<NpyLayout>, String> {
    if prefix.len() < 10 || !prefix.starts_with(b"\x93NUMPY") {
        return Err("no \\x93NUMPY magic".to_string());
    }
    let (header_len, start): (usize, usize) = match prefix[6] {
        1 => (u16::from_le_bytes([prefix[8], prefix[9]]) as usize, 10),
        _ => match prefix.get(8..12) {
            Some(b) => (u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize, 12),
            None => return Err("truncated header".to_string()),
        },
    };
    let end = start.saturating_add(header_len);
    if end as u64 > total {
        return Err("truncated header".to_string());
    }
    let Some(header) = prefix.get(start..end) else {
        return Err(format!("a header of {header_len} bytes (more than {NPY_HEADER_LIMIT})"));
    };
    let header = String::from_utf8_lossy(header);
    let (Some(shape), Some(item_size)) = (npy_header_shape(&header), npy_header_item_size(&header)) else {
        return Ok(None);
    };
    let declared = shape.iter().try_fold(item_size as u64, |acc, &d| acc.checked_mul(d as u64));
    Ok(Some(NpyLayout { shape, declared, data: total - end as u64 }))
}

/// The text after `key` (quoted with `'` or `"`) and its `:` in a Python dict literal.
fn npy_header_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    ['\'', '"'].iter().find_map(|quote| {
        let quoted = format!("{quote}{key}{quote}");
        let after = header[header.find(&quoted)? + quoted.len()..].trim_start();
        after.strip_prefix(':')
    })
}

/// The `'shape': (a, b, ...)` tuple of an `.npy` header (Python 2's `10L` longs accepted).
fn npy_header_shape(header: &str) -> Option<Vec<usize>> {
    let tuple = npy_header_value(header, "shape")?.trim_start().strip_prefix('(')?;
    let tuple = &tuple[..tuple.find(')')?];
    tuple
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches(['L', 'l']).parse().ok())
        .collect()
}

/// The element size in bytes of an `.npy` header's `'descr'` (e.g. `'<f4'` -> 4, `'<U3'` -> 12);
/// `None` for a structured dtype (a list of fields).
fn npy_header_item_size(header: &str) -> Option<usize> {
    let value = npy_header_value(header, "descr")?.trim_start();
    let quote = value.chars().next().filter(|c| *c == '\'' || *c == '"')?;
    let value = &value[1..];
    let value = &value[..value.find(quote)?];
    let count: usize = value.trim_start_matches(|c: char| !c.is_ascii_digit()).parse().ok()?;
    // A unicode string's count is in characters of 4 bytes.
    count.checked_mul(if value.contains('U') { 4 } else { 1 })
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

    /// `.npy` bytes: version `version`, header `dict`, then `data` zero bytes.
    fn npy_bytes(version: u8, dict: &str, data: usize) -> Vec<u8> {
        let mut bytes = vec![0x93, b'N', b'U', b'M', b'P', b'Y', version, 0];
        let header = format!("{dict}\n");
        if version == 1 {
            bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
        } else {
            bytes.extend_from_slice(&(header.len() as u32).to_le_bytes());
        }
        bytes.extend_from_slice(header.as_bytes());
        bytes.resize(bytes.len() + data, 0);
        bytes
    }

    fn layout(bytes: &[u8]) -> std::result::Result<Option<NpyLayout>, String> {
        npy_layout(bytes, bytes.len() as u64)
    }

    #[test]
    fn npy_headers_are_parsed_in_every_version_and_spelling() {
        let dict = "{'descr': '<f8', 'fortran_order': False, 'shape': (3, 4), }";
        for version in [1, 2, 3] {
            let l = layout(&npy_bytes(version, dict, 96)).expect("valid").expect("understood");
            assert_eq!((l.shape.clone(), l.declared, l.data, l.fits()), (vec![3, 4], Some(96), 96, true));
            assert_eq!(l.shape_tuple(), "(3, 4)");
        }
        // Python 2's longs, double quotes, spaces, a 1-tuple, a scalar, strings of 4-byte characters.
        let l = layout(&npy_bytes(1, "{'descr':'<i8','fortran_order':True,'shape':(10L, 5L)}", 0)).unwrap().unwrap();
        assert_eq!((l.shape.clone(), l.declared, l.fits()), (vec![10, 5], Some(400), false));
        let l = layout(&npy_bytes(1, r#"{"descr" : "|u1", "shape" : ( 7 , ) }"#, 7)).unwrap().unwrap();
        assert_eq!((l.shape_tuple(), l.declared, l.fits()), ("(7,)".to_string(), Some(7), true));
        let l = layout(&npy_bytes(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (), }", 4)).unwrap().unwrap();
        assert_eq!((l.shape_tuple(), l.declared), ("()".to_string(), Some(4)));
        let l =
            layout(&npy_bytes(1, "{'descr': '<U3', 'fortran_order': False, 'shape': (2,), }", 24)).unwrap().unwrap();
        assert_eq!(l.declared, Some(24));
        // A product beyond u64, a structured dtype (left to the reader), bad magic, a cut header.
        let huge = "{'descr': '<f8', 'fortran_order': False, 'shape': (4294967296, 4294967296), }";
        let l = layout(&npy_bytes(1, huge, 8)).unwrap().unwrap();
        assert_eq!((l.declared, l.fits(), l.declared_bytes()), (None, false, "more than 2^64".to_string()));
        let structured = "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2,), }";
        assert_eq!(layout(&npy_bytes(1, structured, 8)), Ok(None));
        assert!(layout(b"PK\x03\x04 not an npy file").is_err());
        let bytes = npy_bytes(2, dict, 0);
        assert_eq!(layout(&bytes[..20]), Err("truncated header".to_string()));
        assert!(npy_layout(&bytes[..20], 1 << 20).expect_err("header beyond the prefix").contains("more than"));
    }
}
