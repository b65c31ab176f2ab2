//! Loaders: IDX(.gz) images and labels, image folders, `.npy` samples, subsampling, and the errors
//! for wrong magic numbers, non-image files, mixed sizes and empty folders; image folders read as
//! pytorch-fid reads them (its file selection and PIL's conversions, from fixtures made by
//! `tests/scripts/gen_image_fixtures.py`), every decoder, and non-finite `.npy`/`.npz` inputs.

mod common;

use std::io::Write;
use std::path::Path;

use common::{fixture_dir, read_json, read_tensors, ScratchDir};
use fid_metrics::data::{
    list_image_files, load_idx_images, load_idx_labels, load_image_file, load_image_folder, load_image_folder_with,
    load_images, load_images_with, load_samples_npy, subsample, ReadOptions, Subsample,
};
use fid_metrics::{Error, Result};
use tch::Kind;

const FASHION_TEST_IMAGES: &str = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz";
const FASHION_TEST_LABELS: &str = "/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz";

/// An IDX file: magic, dimensions, bytes.
fn idx_bytes(magic: u32, dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut bytes = magic.to_be_bytes().to_vec();
    for d in dims {
        bytes.extend_from_slice(&d.to_be_bytes());
    }
    bytes.extend_from_slice(data);
    bytes
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).expect("gzip");
    encoder.finish().expect("gzip")
}

#[test]
fn idx_images_load_plain_and_gzipped() -> Result<()> {
    let scratch = ScratchDir::new("idx");
    // Two 2x3 images with pixels 0, 51, 102, ...
    let pixels: Vec<u8> = (0..12u32).map(|i| ((i * 51) % 256) as u8).collect();
    let raw = idx_bytes(0x0000_0803, &[2, 2, 3], &pixels);
    let plain = scratch.path().join("images-idx3-ubyte");
    let packed = scratch.path().join("images-idx3-ubyte.gz");
    std::fs::write(&plain, &raw).map_err(|e| Error::io(&plain, e))?;
    std::fs::write(&packed, gzip(&raw)).map_err(|e| Error::io(&packed, e))?;
    for path in [&plain, &packed] {
        let x = load_images(path)?;
        assert_eq!(x.size(), vec![2, 1, 2, 3]);
        assert_eq!(x.kind(), Kind::Float);
        let values = Vec::<f32>::try_from(x.reshape([-1]))?;
        for (v, p) in values.iter().zip(&pixels) {
            assert!((v - (*p as f32 / 127.5 - 1.0)).abs() < 1e-7);
        }
    }
    let labels = scratch.path().join("labels-idx1-ubyte");
    std::fs::write(&labels, idx_bytes(0x0000_0801, &[4], &[3, 1, 4, 1])).map_err(|e| Error::io(&labels, e))?;
    assert_eq!(load_idx_labels(&labels)?, vec![3, 1, 4, 1]);
    Ok(())
}

#[test]
fn idx_with_wrong_magic_or_truncated_data_is_refused() {
    let scratch = ScratchDir::new("idx-errors");
    let labels = scratch.path().join("labels-idx1-ubyte");
    std::fs::write(&labels, idx_bytes(0x0000_0801, &[4], &[3, 1, 4, 1])).expect("write");
    let err = load_idx_images(&labels).expect_err("a label file is not an image file");
    let msg = err.to_string();
    assert!(matches!(err, Error::Format { .. }), "{msg}");
    assert!(msg.contains("labels-idx1-ubyte") && msg.contains("0x00000801") && msg.contains("0x00000803"), "{msg}");
    let images = scratch.path().join("images.gz");
    std::fs::write(&images, gzip(&idx_bytes(0x0000_0803, &[2, 2, 2], &[0; 8]))).expect("write");
    let msg = load_idx_labels(&images).expect_err("images are not labels").to_string();
    assert!(msg.contains("images.gz") && msg.contains("0x00000803"), "{msg}");
    let truncated = scratch.path().join("short-idx3");
    std::fs::write(&truncated, idx_bytes(0x0000_0803, &[2, 2, 2], &[0; 5])).expect("write");
    let msg = load_idx_images(&truncated).expect_err("truncated").to_string();
    assert!(msg.contains("short-idx3") && msg.contains("truncated"), "{msg}");
    let msg = load_idx_images(scratch.path().join("absent.gz")).expect_err("missing").to_string();
    assert!(msg.contains("absent.gz"), "{msg}");
}

#[test]
fn fashion_mnist_loads_and_matches_the_inception_fixture_image() -> Result<()> {
    if !Path::new(FASHION_TEST_IMAGES).is_file() {
        eprintln!("note: {FASHION_TEST_IMAGES} not installed (run `cargo xtask setup`); skipped");
        return Ok(());
    }
    let images = load_idx_images(FASHION_TEST_IMAGES)?;
    assert_eq!(images.size(), vec![10_000, 1, 28, 28]);
    assert!(images.min().double_value(&[]) >= -1.0 && images.max().double_value(&[]) <= 1.0);
    // The fixture's grey image is test image 0, mapped the same way in Python, then moved by at
    // most 0.04 (`0.98 x + 0.02 u`, u in [-1, 1]: the fixture script's tie-breaking noise).
    let fixture = read_tensors("inception_reference.safetensors");
    let distance = |i: i64| (images.narrow(0, i, 1) - &fixture["grey28.samples"]).abs().max().double_value(&[]);
    assert!(distance(0) <= 0.04 + 1e-6, "{}", distance(0));
    assert!(distance(1) > 0.5, "{}", distance(1));
    let labels = load_idx_labels(FASHION_TEST_LABELS)?;
    assert_eq!(labels.len(), 10_000);
    assert!(labels.iter().all(|&l| l < 10));
    Ok(())
}

fn save_png(path: &Path, width: u32, height: u32, rgb: bool, seed: u8) {
    let channels = if rgb { 3 } else { 1 };
    let data: Vec<u8> = (0..width * height * channels).map(|i| (i as u8).wrapping_mul(37).wrapping_add(seed)).collect();
    if rgb {
        image::RgbImage::from_raw(width, height, data).expect("rgb buffer").save(path).expect("save png");
    } else {
        image::GrayImage::from_raw(width, height, data).expect("grey buffer").save(path).expect("save png");
    }
}

#[test]
fn image_folder_loads_in_name_order() -> Result<()> {
    let scratch = ScratchDir::new("folder-rgb");
    save_png(&scratch.path().join("b.png"), 5, 4, true, 1);
    save_png(&scratch.path().join("a.png"), 5, 4, true, 2);
    image::RgbImage::from_raw(5, 4, vec![9u8; 60])
        .expect("buffer")
        .save(scratch.path().join("c.jpg"))
        .expect("save jpeg");
    std::fs::write(scratch.path().join(".hidden"), b"skipped").map_err(|e| Error::io(scratch.path(), e))?;
    std::fs::create_dir(scratch.path().join("subfolder")).map_err(|e| Error::io(scratch.path(), e))?;
    let x = load_image_folder(scratch.path())?;
    assert_eq!(x.size(), vec![3, 3, 4, 5]);
    // First image is a.png (seed 2): pixel (row 0, col 0) has RGB bytes 2, 39, 76.
    let first = Vec::<f32>::try_from(x.get(0).permute([1, 2, 0]).reshape([-1]))?;
    assert!((first[0] - (2.0 / 127.5 - 1.0)).abs() < 1e-7);
    assert!((first[1] - (39.0 / 127.5 - 1.0)).abs() < 1e-7);
    // JPEG of a constant image decodes to (almost) that constant.
    let jpeg_mean = x.get(2).mean(Kind::Float).double_value(&[]);
    assert!((jpeg_mean - (9.0 / 127.5 - 1.0)).abs() < 0.02, "{jpeg_mean}");

    let grey = ScratchDir::new("folder-grey");
    save_png(&grey.path().join("0.png"), 3, 3, false, 0);
    save_png(&grey.path().join("1.png"), 3, 3, false, 5);
    assert_eq!(load_images(grey.path())?.size(), vec![2, 1, 3, 3]);
    Ok(())
}

#[test]
fn bad_folders_give_errors_naming_the_file() {
    let scratch = ScratchDir::new("folder-text");
    save_png(&scratch.path().join("a.png"), 4, 4, true, 0);
    std::fs::write(scratch.path().join("notes.png"), b"not an image").expect("write");
    let err = load_image_folder(scratch.path()).expect_err("a text file is no image");
    let msg = err.to_string();
    assert!(matches!(err, Error::Image { .. }), "{msg}");
    assert!(msg.contains("notes.png") && msg.contains("not a readable image"), "{msg}");

    let mixed = ScratchDir::new("folder-mixed");
    save_png(&mixed.path().join("a.png"), 4, 4, true, 0);
    save_png(&mixed.path().join("b.png"), 6, 4, true, 0);
    let msg = load_image_folder(mixed.path()).expect_err("mixed sizes").to_string();
    assert!(msg.contains("b.png") && msg.contains("6x4") && msg.contains("a.png"), "{msg}");

    let channels = ScratchDir::new("folder-channels");
    save_png(&channels.path().join("a.png"), 4, 4, true, 0);
    save_png(&channels.path().join("b.png"), 4, 4, false, 0);
    let msg = load_image_folder(channels.path()).expect_err("mixed channels").to_string();
    assert!(msg.contains("b.png") && msg.contains("1 channel"), "{msg}");

    let empty = ScratchDir::new("folder-empty");
    let msg = load_image_folder(empty.path()).expect_err("empty folder").to_string();
    assert!(msg.contains("folder-empty") && msg.contains("no image files"), "{msg}");
}

#[test]
fn npy_samples_load_and_subsampling_is_deterministic() -> Result<()> {
    let scratch = ScratchDir::new("npy");
    let path = scratch.path().join("samples.npy");
    let array = ndarray::Array4::<f32>::from_shape_fn((6, 1, 2, 2), |(n, _, h, w)| {
        n as f32 * 0.1 + h as f32 * 0.01 + w as f32 * 0.001
    });
    ndarray_npy::write_npy(&path, &array).expect("write npy");
    let x = load_images(&path)?;
    assert_eq!(x.size(), vec![6, 1, 2, 2]);
    let first = subsample(&x, 2, Subsample::First)?;
    assert!(first.equal(&x.narrow(0, 0, 2)));
    let seeded = subsample(&x, 3, Subsample::Seeded(11))?;
    assert_eq!(seeded.size(), vec![3, 1, 2, 2]);
    assert!(seeded.equal(&subsample(&x, 3, Subsample::Seeded(11))?));
    assert!(subsample(&x, 10, Subsample::First)?.equal(&x));

    let bad = scratch.path().join("bad.npy");
    ndarray_npy::write_npy(&bad, &ndarray::Array2::<f32>::zeros((2, 3))).expect("write npy");
    let msg = load_images(&bad).expect_err("2-D array").to_string();
    assert!(msg.contains("bad.npy") && msg.contains("[2, 3]"), "{msg}");
    Ok(())
}

/// The file names of `paths` relative to `root`, as strings.
fn relative_names(paths: &[std::path::PathBuf], root: &Path) -> Vec<String> {
    paths.iter().map(|p| p.strip_prefix(root).expect("inside the folder").to_string_lossy().to_string()).collect()
}

#[test]
fn folder_selection_equals_pytorch_fid() {
    let fixture = read_json("images/selection.json");
    assert_eq!(fixture["pytorch_fid_version"], "0.3.0");
    let extensions: Vec<&str> =
        fixture["image_extensions"].as_array().expect("list").iter().map(|e| e.as_str().expect("name")).collect();
    let mut ours = fid_metrics::data::IMAGE_EXTENSIONS.to_vec();
    ours.sort_unstable();
    assert_eq!(ours, extensions);
    let scratch = ScratchDir::new("pytorch-fid-selection");
    let root = scratch.path();
    for folder in fixture["folders"].as_array().expect("folders") {
        std::fs::create_dir_all(root.join(folder.as_str().expect("name"))).expect("folder");
    }
    for file in fixture["files"].as_array().expect("files") {
        std::fs::write(root.join(file.as_str().expect("name")), b"").expect("file");
    }
    for (name, target) in fixture["symlinks"].as_object().expect("symlinks") {
        std::os::unix::fs::symlink(target.as_str().expect("target"), root.join(name)).expect("symlink");
    }
    let listing = list_image_files(root, false).expect("listing");
    let expected: Vec<&str> =
        fixture["selected"].as_array().expect("list").iter().map(|n| n.as_str().expect("name")).collect();
    assert_eq!(relative_names(&listing.files, root), expected);
    assert_eq!(relative_names(&listing.subfolders, root), ["empty", "linked", "sub"]);
    assert_eq!(relative_names(&listing.hidden, root), [".ds_store"]);
    assert!(relative_names(&listing.not_images, root).contains(&"readme.txt".to_string()));
    let recursive = list_image_files(root, true).expect("listing");
    // `linked` and `sub` are one folder: it is read once, at its first name in sorted order.
    let mut with_subfolders: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
    let at = with_subfolders.iter().position(|n| n.as_str() > "linked").unwrap_or(with_subfolders.len());
    with_subfolders.insert(at, "linked/x.png".into());
    assert_eq!(relative_names(&recursive.files, root), with_subfolders);
    assert_eq!(relative_names(&recursive.repeated_folders, root), ["sub"]);
}

#[test]
fn folder_skips_other_files_hidden_files_and_subfolders_unless_recursive() -> Result<()> {
    let scratch = ScratchDir::new("folder-skips");
    let outside = ScratchDir::new("folder-skips-outside");
    let root = scratch.path();
    save_png(&root.join("b.png"), 3, 2, false, 1);
    save_png(&root.join("A.PNG"), 3, 2, false, 2);
    for name in ["README.txt", "Thumbs.db", "labels.csv", ".DS_Store", "._b.png"] {
        std::fs::write(root.join(name), b"not an image").map_err(|e| Error::io(root, e))?;
    }
    std::fs::create_dir(root.join("sub")).map_err(|e| Error::io(root, e))?;
    save_png(&root.join("sub/c.png"), 3, 2, false, 3);
    std::os::unix::fs::symlink(root, root.join("sub/loop")).map_err(|e| Error::io(root, e))?;
    save_png(&outside.path().join("d.png"), 3, 2, false, 4);
    std::os::unix::fs::symlink(outside.path(), root.join("linked")).map_err(|e| Error::io(root, e))?;

    let listing = list_image_files(root, false)?;
    assert_eq!(relative_names(&listing.files, root), ["A.PNG", "b.png"], "upper-case extensions are images");
    assert_eq!(listing.skipped(), 7, "{listing:?}");
    let summary = listing.skipped_summary().expect("something was skipped");
    assert!(summary.starts_with("skipped 7:") && summary.contains("3 without an image extension"), "{summary}");
    assert!(summary.contains("2 subfolder(s)") && summary.contains("2 hidden"), "{summary}");
    assert_eq!(load_image_folder(root)?.size(), vec![2, 1, 2, 3]);

    let recursive = list_image_files(root, true)?;
    assert_eq!(relative_names(&recursive.files, root), ["A.PNG", "b.png", "linked/d.png", "sub/c.png"]);
    assert_eq!(relative_names(&recursive.repeated_folders, root), ["sub/loop"], "the loop is not followed");
    let x = load_image_folder_with(root, ReadOptions { recursive: true, limit: None })?;
    assert_eq!(x.size(), vec![4, 1, 2, 3]);
    // Image 2 is d.png (seed 4): its first pixel is 4.
    assert!((x.double_value(&[2, 0, 0, 0]) - (4.0 / 127.5 - 1.0)).abs() < 1e-6);

    let only_other = ScratchDir::new("folder-no-images");
    std::fs::write(only_other.path().join("README.txt"), b"text").map_err(|e| Error::io(only_other.path(), e))?;
    std::fs::create_dir(only_other.path().join("images")).map_err(|e| Error::io(only_other.path(), e))?;
    let msg = load_image_folder(only_other.path()).expect_err("no images").to_string();
    assert!(msg.contains("folder-no-images") && msg.contains("no image files") && msg.contains("1 subfolder"), "{msg}");
    Ok(())
}

#[test]
fn a_limit_reads_only_the_first_images() -> Result<()> {
    let scratch = ScratchDir::new("folder-limit");
    for (i, name) in ["0.png", "1.png", "2.png"].iter().enumerate() {
        save_png(&scratch.path().join(name), 4, 4, true, i as u8);
    }
    std::fs::write(scratch.path().join("3.png"), b"broken").map_err(|e| Error::io(scratch.path(), e))?;
    let limited = ReadOptions { recursive: false, limit: Some(2) };
    assert_eq!(load_images_with(scratch.path(), limited)?.size(), vec![2, 3, 4, 4], "3.png is never decoded");
    let msg = load_images(scratch.path()).expect_err("3.png is broken").to_string();
    assert!(msg.contains("3.png"), "{msg}");

    let idx = scratch.path().join("images-idx3-ubyte");
    std::fs::write(&idx, idx_bytes(0x0000_0803, &[3, 2, 2], &[7; 12])).map_err(|e| Error::io(&idx, e))?;
    assert_eq!(load_images_with(&idx, limited)?.size(), vec![2, 1, 2, 2]);
    Ok(())
}

#[test]
fn every_enabled_decoder_reads_its_format() -> Result<()> {
    let scratch = ScratchDir::new("decoders");
    let rgb = image::RgbImage::from_fn(5, 3, |x, y| image::Rgb([(x * 40) as u8, (y * 90) as u8, (x * y * 17) as u8]));
    let grey = image::GrayImage::from_fn(5, 3, |x, y| image::Luma([(x * 50 + y * 7) as u8]));
    for name in ["c.bmp", "c.ppm", "c.tif", "c.tiff", "c.webp", "c.png"] {
        let path = scratch.path().join(name);
        rgb.save(&path).unwrap_or_else(|e| panic!("writing {name}: {e}"));
        let x = load_image_file(&path)?;
        assert_eq!(x.size(), vec![1, 3, 3, 5], "{name}");
        let bytes = to_bytes_hwc(&x);
        assert_eq!(bytes, rgb.as_raw().as_slice(), "{name} decodes to its pixels");
    }
    // (BMP has no grey mode: a grey BMP is a palette image, read as colour.)
    for name in ["g.pgm", "g.tif", "g.png"] {
        let path = scratch.path().join(name);
        grey.save(&path).unwrap_or_else(|e| panic!("writing {name}: {e}"));
        let x = load_image_file(&path)?;
        assert_eq!(x.size(), vec![1, 1, 3, 5], "{name}");
        assert_eq!(to_bytes_hwc(&x), grey.as_raw().as_slice(), "{name}");
    }
    Ok(())
}

/// A 1 x C x H x W sample back to its H x W x C bytes.
fn to_bytes_hwc(x: &tch::Tensor) -> Vec<u8> {
    let pixels = ((x.get(0).permute([1, 2, 0]) + 1.0) * 127.5).round().reshape([-1]);
    Vec::<f32>::try_from(pixels).expect("floats").into_iter().map(|v| v as u8).collect()
}

#[test]
fn pixels_are_what_pil_convert_rgb_gives() -> Result<()> {
    let fixture = read_json("images/conversions.json");
    let images = fixture["images"].as_object().expect("images");
    assert!(images.len() >= 10);
    for (name, expected) in images {
        let x = load_image_file(fixture_dir().join("images").join(name))?;
        let (w, h) = (expected["width"].as_i64().expect("width"), expected["height"].as_i64().expect("height"));
        let size = x.size();
        assert_eq!((size[2], size[3]), (h, w), "{name}");
        let mut rgb = to_bytes_hwc(&x);
        if size[1] == 1 {
            rgb = rgb.iter().flat_map(|&v| [v; 3]).collect();
        }
        let want: Vec<u8> =
            expected["rgb"].as_array().expect("rgb").iter().map(|v| v.as_u64().expect("byte") as u8).collect();
        assert_eq!(rgb, want, "{name} (PIL mode {})", expected["mode"]);
    }
    Ok(())
}

/// Writes `array` as `.npy` to `dir/name`.
fn npy(dir: &Path, name: &str, array: &ndarray::ArrayD<f32>) -> std::path::PathBuf {
    let path = dir.join(name);
    ndarray_npy::write_npy(&path, array).expect("write npy");
    path
}

#[test]
fn npy_with_nan_or_inf_or_a_lying_header_is_refused() {
    let scratch = ScratchDir::new("npy-bad-values");
    let mut array = ndarray::ArrayD::<f32>::zeros(ndarray::IxDyn(&[2, 1, 3, 3]));
    array[[1, 0, 2, 1]] = f32::NAN;
    let path = npy(scratch.path(), "nan.npy", &array);
    let msg = load_samples_npy(&path).expect_err("NaN").to_string();
    assert!(msg.contains("nan.npy") && msg.contains("NaN") && msg.contains("[1, 0, 2, 1]"), "{msg}");
    array[[1, 0, 2, 1]] = 0.0;
    array[[0, 0, 0, 2]] = f32::NEG_INFINITY;
    let path = npy(scratch.path(), "inf.npy", &array);
    let msg = load_images(&path).expect_err("inf").to_string();
    assert!(msg.contains("inf.npy") && msg.contains("-inf") && msg.contains("[0, 0, 0, 2]"), "{msg}");
    let big = ndarray::ArrayD::<f64>::from_elem(ndarray::IxDyn(&[1, 1, 1, 2]), 1e300);
    let path = scratch.path().join("big.npy");
    ndarray_npy::write_npy(&path, &big).expect("write npy");
    let msg = load_samples_npy(&path).expect_err("too large for f32").to_string();
    assert!(msg.contains("big.npy") && msg.contains("float32"), "{msg}");

    // A header declaring 10^18 values over 16 bytes of data is refused before anything that size
    // is allocated.
    let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000, 1, 1000000, 1000000), }";
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    let padded = format!("{header:<width$}\n", width = 64 - 10 - 1);
    bytes.extend_from_slice(&(padded.len() as u16).to_le_bytes());
    bytes.extend_from_slice(padded.as_bytes());
    bytes.extend_from_slice(&[0u8; 16]);
    let lying = scratch.path().join("lying.npy");
    std::fs::write(&lying, &bytes).expect("write");
    let msg = load_samples_npy(&lying).expect_err("lying header").to_string();
    assert!(msg.contains("lying.npy") && msg.contains("declares shape"), "{msg}");
}

#[test]
fn npz_with_nan_names_the_file_and_the_array() {
    let scratch = ScratchDir::new("npz-bad-values");
    let mut sigma = ndarray::Array2::<f64>::eye(3);
    sigma[[2, 1]] = f64::NAN;
    let path = scratch.path().join("stats.npz");
    let mut writer = ndarray_npy::NpzWriter::new(std::fs::File::create(&path).expect("create"));
    writer.add_array("mu", &ndarray::Array1::<f64>::zeros(3)).expect("mu");
    writer.add_array("sigma", &sigma).expect("sigma");
    writer.finish().expect("finish");
    let msg = fid_metrics::FeatureStats::read_npz(&path).expect_err("NaN sigma").to_string();
    assert!(msg.contains("stats.npz") && msg.contains("sigma") && msg.contains("[2, 1]"), "{msg}");

    let mut features = ndarray::Array2::<f32>::zeros((4, 2));
    features[[3, 0]] = f32::INFINITY;
    let path = scratch.path().join("features.npz");
    let mut writer = ndarray_npy::NpzWriter::new(std::fs::File::create(&path).expect("create"));
    writer.add_array("features", &features).expect("features");
    writer.finish().expect("finish");
    let msg = fid_metrics::stats::read_features_npz(&path).expect_err("inf").to_string();
    assert!(msg.contains("features.npz") && msg.contains("features") && msg.contains("[3, 0]"), "{msg}");
}
