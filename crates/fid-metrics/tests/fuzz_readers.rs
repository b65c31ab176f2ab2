//! Property tests (fuzzing) of the file readers: the statistics `.npz` reader, the `.npy` sample
//! reader and the IDX reader get arbitrary bytes, byte-mutated valid files and well-formed files
//! with arbitrary keys, element types, shapes and headers. Each must return `Ok` or `Err`, never
//! panic. `PROPTEST_CASES` overrides the number of cases (default 256).

use std::io::Write;
use std::path::{Path, PathBuf};

use fid_metrics::data::{load_idx_images, load_idx_labels, load_samples_npy};
use fid_metrics::stats::{npz_keys, read_features_npz, write_features_npz};
use fid_metrics::FeatureStats;
use ndarray::{ArrayD, IxDyn};
use proptest::prelude::*;
use proptest::test_runner::Config;
use tch::Tensor;

fn config() -> Config {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256);
    Config { cases, failure_persistence: None, ..Config::default() }
}

/// A scratch file for one property (tests run in parallel; cases of one property do not).
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fid-metrics-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir.join(name)
}

/// Every reader a `.npz` goes through, on the file at `path`.
fn read_npz_every_way(path: &Path) {
    let _ = npz_keys(path);
    if let Ok(stats) = FeatureStats::read_npz(path) {
        let _ = stats.dim();
        if stats.dim() <= 64 {
            let _ = fid_metrics::fid::fid_from_stats(&stats, &stats);
        }
    }
    if let Ok(features) = read_features_npz(path) {
        if features.size()[0] >= 2 && features.size()[0] <= 64 && features.size()[1] <= 64 {
            let _ = FeatureStats::from_features(&features);
        }
    }
}

fn valid_npz(compressed: bool) -> Vec<u8> {
    let path = scratch(if compressed { "valid-stats.npz" } else { "valid-features.npz" });
    let features = Tensor::from_slice(&(0..24).map(|i| (i as f32 * 0.37).sin()).collect::<Vec<_>>()).reshape([6, 4]);
    if compressed {
        FeatureStats::from_features(&features).expect("stats").write_npz(&path).expect("write");
    } else {
        write_features_npz(&path, &features).expect("write");
    }
    std::fs::read(&path).expect("read")
}

fn valid_idx(labels: bool) -> Vec<u8> {
    let mut bytes = if labels { vec![0u8, 0, 8, 1] } else { vec![0u8, 0, 8, 3] };
    let dims: &[u32] = if labels { &[5] } else { &[5, 3, 2] };
    for d in dims {
        bytes.extend(d.to_be_bytes());
    }
    let n: u32 = dims.iter().product();
    bytes.extend((0..n).map(|i| (i * 17) as u8));
    bytes
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).expect("gzip");
    encoder.finish().expect("gzip")
}

fn mutate(mut bytes: Vec<u8>, edits: &[(prop::sample::Index, u8)], cut: Option<prop::sample::Index>) -> Vec<u8> {
    for (at, byte) in edits {
        let i = at.index(bytes.len());
        bytes[i] = *byte;
    }
    if let Some(cut) = cut {
        bytes.truncate(cut.index(bytes.len()));
    }
    bytes
}

fn read_idx_every_way(path: &Path) {
    if let Ok(images) = load_idx_images(path) {
        assert_eq!(images.dim(), 4, "images are N x 1 x H x W");
    }
    let _ = load_idx_labels(path);
}

/// One array of an `.npz` built from parts: key, element type, shape.
#[derive(Debug, Clone)]
struct Member {
    key: String,
    dtype: u8,
    shape: Vec<usize>,
}

fn member() -> impl Strategy<Value = Member> {
    (
        prop_oneof![
            Just("mu".to_string()),
            Just("sigma".to_string()),
            Just("features".to_string()),
            Just("feature_set".to_string()),
            "[a-z]{1,6}"
        ],
        0u8..5,
        prop::collection::vec(0usize..6, 0..4),
    )
        .prop_map(|(key, dtype, shape)| Member { key, dtype, shape })
}

fn build_npz(members: &[Member], compressed: bool) -> Vec<u8> {
    let mut buffer = std::io::Cursor::new(Vec::new());
    {
        let mut writer = if compressed {
            ndarray_npy::NpzWriter::new_compressed(&mut buffer)
        } else {
            ndarray_npy::NpzWriter::new(&mut buffer)
        };
        for (i, m) in members.iter().enumerate() {
            let n: usize = m.shape.iter().product();
            let shape = IxDyn(&m.shape);
            let duplicate = members[..i].iter().any(|o| o.key == m.key);
            let key = if duplicate { format!("{}_{i}", m.key) } else { m.key.clone() };
            let added = match m.dtype {
                0 => writer.add_array(
                    key,
                    &ArrayD::from_shape_vec(shape, (0..n).map(|v| v as f64 * 0.5).collect()).expect("shape"),
                ),
                1 => writer.add_array(
                    key,
                    &ArrayD::from_shape_vec(shape, (0..n).map(|v| v as f32 - 1.0).collect()).expect("shape"),
                ),
                2 => writer
                    .add_array(key, &ArrayD::from_shape_vec(shape, (0..n).map(|v| v as i32).collect()).expect("shape")),
                3 => writer
                    .add_array(key, &ArrayD::from_shape_vec(shape, (0..n).map(|v| v as u8).collect()).expect("shape")),
                _ => writer.add_array(
                    key,
                    &ArrayD::from_shape_vec(
                        shape,
                        (0..n).map(|v| if v % 2 == 0 { f64::NAN } else { f64::INFINITY }).collect(),
                    )
                    .expect("shape"),
                ),
            };
            added.expect("add array");
        }
        writer.finish().expect("finish");
    }
    buffer.into_inner()
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn npz_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..1024)) {
        let path = scratch("arbitrary.npz");
        std::fs::write(&path, &bytes).expect("write");
        read_npz_every_way(&path);
    }

    #[test]
    fn npz_byte_mutations(
        compressed in any::<bool>(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in prop::option::of(any::<prop::sample::Index>()),
    ) {
        let path = scratch("mutated.npz");
        std::fs::write(&path, mutate(valid_npz(compressed), &edits, cut)).expect("write");
        read_npz_every_way(&path);
    }

    #[test]
    fn npz_arbitrary_keys_types_and_shapes(members in prop::collection::vec(member(), 0..4), compressed in any::<bool>()) {
        let path = scratch("built.npz");
        std::fs::write(&path, build_npz(&members, compressed)).expect("write");
        read_npz_every_way(&path);
    }

    #[test]
    fn npy_arbitrary_and_mutated(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        shape in prop::collection::vec(0usize..5, 0..6),
    ) {
        let path = scratch("arbitrary.npy");
        std::fs::write(&path, &bytes).expect("write");
        let _ = load_samples_npy(&path);
        let n: usize = shape.iter().product();
        let array = ArrayD::from_shape_vec(IxDyn(&shape), (0..n).map(|v| v as f32).collect()).expect("shape");
        let mut valid = Vec::new();
        ndarray_npy::WriteNpyExt::write_npy(&array, &mut valid).expect("npy");
        let _ = std::fs::write(&path, &valid);
        let _ = load_samples_npy(&path);
        std::fs::write(&path, mutate(valid, &edits, None)).expect("write");
        let _ = load_samples_npy(&path);
    }

    #[test]
    fn idx_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512), zipped in any::<bool>()) {
        let path = scratch("arbitrary.idx");
        std::fs::write(&path, if zipped { gzip(&bytes) } else { bytes }).expect("write");
        read_idx_every_way(&path);
    }

    #[test]
    fn idx_byte_mutations(
        labels in any::<bool>(),
        zipped in any::<bool>(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in prop::option::of(any::<prop::sample::Index>()),
    ) {
        let path = scratch("mutated.idx");
        let bytes = mutate(valid_idx(labels), &edits, cut);
        std::fs::write(&path, if zipped { gzip(&bytes) } else { bytes }).expect("write");
        read_idx_every_way(&path);
    }

    #[test]
    fn idx_arbitrary_headers(
        kind in prop_oneof![Just(0x08u8), any::<u8>()],
        dims in prop::collection::vec(prop_oneof![0u32..6, any::<u32>()], 0..5),
        declared in prop_oneof![Just(None), any::<u8>().prop_map(Some)],
        data_len in 0usize..200,
    ) {
        let path = scratch("header.idx");
        let num_dims = declared.unwrap_or(dims.len() as u8);
        let mut bytes = vec![0u8, 0, kind, num_dims];
        for d in &dims {
            bytes.extend(d.to_be_bytes());
        }
        bytes.extend((0..data_len).map(|i| i as u8));
        std::fs::write(&path, &bytes).expect("write");
        read_idx_every_way(&path);
    }
}

#[test]
fn the_valid_files_load() {
    let path = scratch("valid.npz");
    std::fs::write(&path, valid_npz(true)).expect("write");
    assert_eq!(FeatureStats::read_npz(&path).expect("stats").dim(), 4);
    std::fs::write(&path, valid_npz(false)).expect("write");
    assert_eq!(read_features_npz(&path).expect("features").size(), [6, 4]);
    let path = scratch("valid.idx");
    std::fs::write(&path, gzip(&valid_idx(false))).expect("write");
    assert_eq!(load_idx_images(&path).expect("images").size(), [5, 1, 3, 2]);
    std::fs::write(&path, valid_idx(true)).expect("write");
    assert_eq!(load_idx_labels(&path).expect("labels").len(), 5);
}
