//! Loaders: IDX(.gz) images and labels, image folders, `.npy` samples, subsampling, and the errors
//! for wrong magic numbers, non-image files, mixed sizes and empty folders.

mod common;

use std::io::Write;
use std::path::Path;

use common::{read_tensors, ScratchDir};
use fid_metrics::data::{load_idx_images, load_idx_labels, load_image_folder, load_images, subsample, Subsample};
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
    // The fixture's grey image is test image 0, mapped the same way in Python.
    let fixture = read_tensors("inception_reference.safetensors");
    assert!(images.narrow(0, 0, 1).equal(&fixture["grey28.samples"]));
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
    std::fs::write(scratch.path().join("notes.txt"), b"not an image").expect("write");
    let err = load_image_folder(scratch.path()).expect_err("a text file is no image");
    let msg = err.to_string();
    assert!(matches!(err, Error::Image { .. }), "{msg}");
    assert!(msg.contains("notes.txt") && msg.contains("not a readable image"), "{msg}");

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
