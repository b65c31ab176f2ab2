//! The native `UNet2DModel` and the TorchScript denoiser against diffusers 0.42.1.
//!
//! Reference numbers come from `tests/scripts/gen_unet_fixtures.py` (committed under
//! `tests/fixtures/unet/`). The equivalent PyTorch code of the main comparison is
//!
//! ```python
//! model = UNet2DModel.from_pretrained("tests/fixtures/unet/<name>").eval()
//! output = model(x, torch.tensor([3.7, 512.25])).sample
//! ```

use ddss_tests::fixture_path;
use ggdm_core::torchscript::{TorchScriptDenoiser, TorchScriptSidecar};
use ggdm_core::{Denoiser, PredictionType};
use ggdm_nets::unet::{UNet2DConfig, UNet2DModel, UNetDenoiser, WeightStorage, UNET_2D_CONFIG_KEYS};
use ggdm_nets::DifferentiableDenoiser;
use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// The tiny random-weight configurations of the fixture script.
const TINY_MODELS: &[&str] =
    &["tiny_attn_pos", "tiny_noattn_3lvl", "tiny_fourier", "tiny_1lvl_scale_shift", "tiny_resnet_updown"];

/// Largest tolerated |ours - diffusers| on network outputs and on the DDIM loop's final sample.
const TOLERANCE: f64 = 1e-4;

fn unet_fixture(name: &str) -> PathBuf {
    fixture_path(&format!("unet/{name}"))
}

fn read_tensors(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).into_iter().collect()
}

fn tensor<'a>(tensors: &'a HashMap<String, Tensor>, key: &str) -> &'a Tensor {
    tensors.get(key).unwrap_or_else(|| panic!("fixture has no tensor `{key}`"))
}

fn read_json(path: &Path) -> serde_json::Value {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

fn load(name: &str) -> UNet2DModel {
    UNet2DModel::load(unet_fixture(name), Device::Cpu).unwrap_or_else(|e| panic!("loading fixture {name}: {e}"))
}

/// A scratch directory removed when dropped.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(label: &str) -> Self {
        let path = std::env::temp_dir().join(format!("ddss-unet-{}-{label}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("scratch directory");
        ScratchDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Copies a fixture model directory (config + weights) into a scratch directory.
fn scratch_copy(name: &str, label: &str) -> ScratchDir {
    let scratch = ScratchDir::new(label);
    for file in ["config.json", "diffusion_pytorch_model.safetensors"] {
        fs::copy(unet_fixture(name).join(file), scratch.path().join(file)).expect("copy fixture");
    }
    scratch
}

fn load_error(dir: &Path) -> String {
    match UNet2DModel::load(dir, Device::Cpu) {
        Ok(_) => panic!("loading {} should have failed", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(message: &str, needles: &[&str]) {
    for needle in needles {
        assert!(message.contains(needle), "error message should mention `{needle}`:\n{message}");
    }
}

/// Rewrites the weight file of `dir` through `edit`.
fn edit_weights(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) {
    let path = dir.join("diffusion_pytorch_model.safetensors");
    let mut tensors = Tensor::read_safetensors(&path).expect("read weights");
    edit(&mut tensors);
    Tensor::write_safetensors(&tensors, &path).expect("write weights");
}

#[test]
fn matches_diffusers_on_every_tiny_config() {
    for name in TINY_MODELS {
        let model = load(name);
        let io = read_tensors(&unet_fixture(name).join("io.safetensors"));
        let meta = read_json(&unet_fixture(name).join("fixture.json"));
        let output =
            model.forward(tensor(&io, "x"), tensor(&io, "timesteps")).unwrap_or_else(|e| panic!("{name}: {e}"));
        let diff = max_abs_diff(&output, tensor(&io, "output"));
        eprintln!("{name}: max |ours - diffusers| = {diff:e}");
        assert!(diff <= TOLERANCE, "{name}: max |ours - diffusers| = {diff:e}");
        assert_eq!(
            model.num_parameters(),
            meta["num_parameters"].as_i64().expect("num_parameters"),
            "{name}: parameter count"
        );
    }
}

#[test]
fn denoiser_reports_prediction_type_and_sample_shape() {
    let name = "tiny_1lvl_scale_shift";
    let meta = read_json(&unet_fixture(name).join("fixture.json"));
    let prediction_type =
        PredictionType::from_diffusers_name(meta["prediction_type"].as_str().expect("prediction_type"))
            .expect("known prediction type");
    let denoiser = UNetDenoiser::new(load(name), prediction_type);
    assert_eq!(denoiser.prediction_type(), PredictionType::Sample);
    assert_eq!(denoiser.sample_shape(), Some([2, 8, 12]));
    let default = UNetDenoiser::load(unet_fixture("tiny_attn_pos"), Device::Cpu).expect("load");
    assert_eq!(default.prediction_type(), PredictionType::Epsilon);
    assert_eq!(default.sample_shape(), Some([3, 16, 16]));

    // A batch with one shared timestep equals the batch with it repeated.
    let io = read_tensors(&unet_fixture(name).join("io.safetensors"));
    let x = tensor(&io, "x");
    let shared = denoiser.forward(x, &Tensor::from(7.5f32)).expect("scalar tau");
    let repeated = denoiser.forward(x, &Tensor::from_slice(&[7.5f32, 7.5])).expect("tau per sample");
    assert_eq!(max_abs_diff(&shared, &repeated), 0.0);
}

#[test]
fn gradients_flow_to_x_and_tau() {
    for name in ["tiny_attn_pos", "tiny_fourier"] {
        let denoiser = UNetDenoiser::new(load(name), PredictionType::Epsilon);
        let io = read_tensors(&unet_fixture(name).join("io.safetensors"));
        let x = tensor(&io, "x").copy().set_requires_grad(true);
        let tau = tensor(&io, "timesteps").copy().set_requires_grad(true);
        let output = denoiser.forward(&x, &tau).expect("forward");
        let weights = Tensor::randn(output.size(), (Kind::Float, Device::Cpu));
        let loss = (&output * &weights).sum(Kind::Float);
        let grads = Tensor::run_backward(&[&loss], &[&x, &tau], false, false);
        for (what, grad) in [("x", &grads[0]), ("tau", &grads[1])] {
            let finite = bool::try_from(grad.isfinite().all()).expect("bool");
            let norm = grad.abs().sum(Kind::Double).double_value(&[]);
            assert!(finite, "{name}: d loss / d {what} is not finite");
            assert!(norm > 0.0, "{name}: d loss / d {what} is zero");
        }
    }
}

/// Reverse-mode gradients equal central finite differences (model and inputs in f64).
#[test]
fn gradients_match_finite_differences_in_f64() {
    for name in ["tiny_attn_pos", "tiny_fourier"] {
        let mut model = load(name);
        model.var_store_mut().double();
        assert_eq!(model.kind(), Kind::Double);
        let io = read_tensors(&unet_fixture(name).join("io.safetensors"));
        let x = tensor(&io, "x").to_kind(Kind::Double);
        let tau = tensor(&io, "timesteps").to_kind(Kind::Double);
        tch::manual_seed(7);
        let options = (Kind::Double, Device::Cpu);
        let weights = Tensor::randn(x.size(), options);
        let x_direction = Tensor::randn(x.size(), options);
        let tau_direction = Tensor::from_slice(&[0.3f64, -0.7]);
        let loss_at = |x: &Tensor, tau: &Tensor| -> Tensor {
            let output = model.forward(x, tau).expect("forward");
            (output * &weights).sum(Kind::Double)
        };

        let x_var = x.copy().set_requires_grad(true);
        let tau_var = tau.copy().set_requires_grad(true);
        let loss = loss_at(&x_var, &tau_var);
        let grads = Tensor::run_backward(&[&loss], &[&x_var, &tau_var], false, false);
        let analytic = ((&grads[0] * &x_direction).sum(Kind::Double) + (&grads[1] * &tau_direction).sum(Kind::Double))
            .double_value(&[]);

        let step = 1e-5;
        let plus = loss_at(&(&x + &x_direction * step), &(&tau + &tau_direction * step));
        let minus = loss_at(&(&x - &x_direction * step), &(&tau - &tau_direction * step));
        let numeric = (plus - minus).double_value(&[]) / (2.0 * step);
        let relative = (analytic - numeric).abs() / numeric.abs().max(1e-12);
        eprintln!("{name}: autograd {analytic}, finite differences {numeric}, relative {relative:e}");
        assert!(
            relative < 1e-6,
            "{name}: directional derivative {analytic} (autograd) vs {numeric} (finite differences)"
        );
    }
}

#[test]
fn timesteps_change_the_output() {
    let model = load("tiny_noattn_3lvl");
    let io = read_tensors(&unet_fixture("tiny_noattn_3lvl").join("io.safetensors"));
    let x = tensor(&io, "x");
    let a = model.forward(x, &Tensor::from_slice(&[100.0f32, 100.0])).expect("forward");
    let b = model.forward(x, &Tensor::from_slice(&[900.0f32, 900.0])).expect("forward");
    assert!(max_abs_diff(&a, &b) > 1e-3, "timesteps do not reach the output");
}

/// A bf16 network still takes its timesteps in f32: bf16 rounds both 998 and 999 to 1000.
#[test]
fn bf16_network_keeps_timesteps_in_f32() {
    let mut model = UNet2DModel::load(unet_fixture("tiny_attn_pos"), Device::Cpu).expect("load");
    model.var_store_mut().bfloat16();
    let io = read_tensors(&unet_fixture("tiny_attn_pos").join("io.safetensors"));
    let x = tensor(&io, "x");
    let a = model.forward(x, &Tensor::from_slice(&[998.0f32, 998.0])).expect("forward");
    let b = model.forward(x, &Tensor::from_slice(&[999.0f32, 999.0])).expect("forward");
    assert_eq!(a.kind(), Kind::BFloat16);
    assert!(max_abs_diff(&a.to_kind(Kind::Float), &b.to_kind(Kind::Float)) > 0.0, "998 and 999 give the same output");
}

#[test]
fn cifar10_config_has_35_746_307_parameters_with_diffusers_keys() {
    check_public_config("ddpm-cifar10-32", 35_746_307);
}

#[test]
fn church_config_builds_with_diffusers_parameter_count_and_keys() {
    check_public_config("ddpm-ema-church-256", 113_673_219);
}

fn check_public_config(stem: &str, expected_parameters: i64) {
    let config_path = fixture_path(&format!("unet/{stem}.config.json"));
    let config = UNet2DConfig::from_json_file(&config_path).expect("config parses");
    let model = UNet2DModel::new(config, Device::Cpu).expect("model builds");
    let keys = read_json(&fixture_path(&format!("unet/{stem}.keys.json")));
    assert_eq!(keys["num_parameters"].as_i64(), Some(expected_parameters));
    assert_eq!(model.num_parameters(), expected_parameters, "{stem}");
    let diffusers: Vec<(String, Vec<i64>)> = {
        let state_dict = keys["state_dict"].as_object().expect("state_dict");
        let mut shapes: Vec<(String, Vec<i64>)> = state_dict
            .iter()
            .map(|(k, v)| {
                let shape = v.as_array().expect("shape").iter().map(|d| d.as_i64().expect("dim")).collect();
                (k.clone(), shape)
            })
            .collect();
        shapes.sort();
        shapes
    };
    assert_eq!(model.parameter_shapes(), diffusers, "{stem}: state-dict keys and shapes");
}

#[test]
fn missing_directory_and_files_are_explained() {
    let scratch = ScratchDir::new("missing");
    let absent = scratch.path().join("no-such-model");
    let message = load_error(&absent);
    assert_mentions(&message, &["no-such-model", "config.json", "diffusion_pytorch_model.safetensors"]);

    let config_only = scratch.path().join("config-only");
    fs::create_dir_all(&config_only).expect("mkdir");
    fs::copy(unet_fixture("tiny_attn_pos").join("config.json"), config_only.join("config.json")).expect("copy");
    let message = load_error(&config_only);
    assert_mentions(&message, &["config-only", "diffusion_pytorch_model.safetensors"]);

    fs::write(config_only.join("diffusion_pytorch_model.bin"), b"pickle").expect("write");
    let message = load_error(&config_only);
    assert_mentions(&message, &["diffusion_pytorch_model.bin", "save_file"]);

    let empty = scratch.path().join("empty");
    fs::create_dir_all(&empty).expect("mkdir");
    assert_mentions(&load_error(&empty), &["missing config.json"]);
}

#[test]
fn truncated_or_garbage_safetensors_is_an_error_naming_the_file() {
    let scratch = scratch_copy("tiny_attn_pos", "truncated");
    let weights = scratch.path().join("diffusion_pytorch_model.safetensors");
    let length = fs::metadata(&weights).expect("metadata").len();
    fs::OpenOptions::new().write(true).open(&weights).and_then(|file| file.set_len(length / 2)).expect("truncate");
    assert_mentions(&load_error(scratch.path()), &["diffusion_pytorch_model.safetensors", "safetensors"]);

    fs::write(&weights, b"\xff\xff\xff\xff\xff\xff\xff\x7fnot a safetensors file").expect("write");
    assert_mentions(&load_error(scratch.path()), &["diffusion_pytorch_model.safetensors"]);

    fs::write(&weights, b"").expect("write");
    assert_mentions(&load_error(scratch.path()), &["diffusion_pytorch_model.safetensors"]);
}

#[test]
fn extra_key_is_an_error_naming_it() {
    let scratch = scratch_copy("tiny_attn_pos", "extra-key");
    edit_weights(scratch.path(), |tensors| {
        tensors.push(("class_embedding.weight".into(), Tensor::zeros([4, 4], (Kind::Float, Device::Cpu))));
    });
    assert_mentions(&load_error(scratch.path()), &["unexpected key", "class_embedding.weight"]);
}

#[test]
fn missing_key_is_an_error_naming_it() {
    let scratch = scratch_copy("tiny_attn_pos", "missing-key");
    edit_weights(scratch.path(), |tensors| {
        tensors.retain(|(name, _)| name != "mid_block.attentions.0.to_q.weight");
    });
    assert_mentions(&load_error(scratch.path()), &["missing key", "mid_block.attentions.0.to_q.weight"]);
}

#[test]
fn wrong_shape_is_an_error_naming_the_key_and_both_shapes() {
    let scratch = scratch_copy("tiny_attn_pos", "wrong-shape");
    edit_weights(scratch.path(), |tensors| {
        for (name, tensor) in tensors.iter_mut() {
            if name == "conv_in.weight" {
                *tensor = Tensor::zeros([8, 3, 1, 1], (Kind::Float, Device::Cpu));
            }
        }
    });
    assert_mentions(&load_error(scratch.path()), &["conv_in.weight", "[8, 3, 3, 3]", "[8, 3, 1, 1]"]);
}

#[test]
fn unsupported_block_type_is_an_error_naming_it() {
    let scratch = scratch_copy("tiny_attn_pos", "cross-attn");
    let config_path = scratch.path().join("config.json");
    let text = fs::read_to_string(&config_path).expect("read config");
    assert!(text.contains("\"AttnDownBlock2D\""));
    fs::write(&config_path, text.replace("\"AttnDownBlock2D\"", "\"CrossAttnDownBlock2D\"")).expect("write config");
    assert_mentions(&load_error(scratch.path()), &["down_block_types[1]", "CrossAttnDownBlock2D", "config.json"]);
}

#[test]
fn unsupported_or_unknown_config_values_name_the_key() {
    let base = fs::read_to_string(unet_fixture("tiny_attn_pos").join("config.json")).expect("read");
    let base: serde_json::Value = serde_json::from_str(&base).expect("json");
    let with = |key: &str, value: serde_json::Value| {
        let mut config = base.clone();
        config[key] = value;
        match UNet2DConfig::from_json_value(config).and_then(|c| c.validate().map(|()| c)) {
            Ok(_) => panic!("`{key}` should be rejected"),
            Err(e) => e.to_string(),
        }
    };
    assert_mentions(&with("class_embed_type", "timestep".into()), &["class_embed_type"]);
    assert_mentions(&with("num_class_embeds", 10.into()), &["num_class_embeds"]);
    assert_mentions(&with("resnet_time_scale_shift", "spatial".into()), &["resnet_time_scale_shift", "spatial"]);
    assert_mentions(&with("time_embedding_type", "learned".into()), &["time_embedding_type", "learned"]);
    assert_mentions(&with("mid_block_type", "UNetMidBlock2DCrossAttn".into()), &["mid_block_type"]);
    assert_mentions(
        &with("up_block_types", serde_json::json!(["CrossAttnUpBlock2D", "UpBlock2D"])),
        &["up_block_types[0]", "CrossAttnUpBlock2D"],
    );
    assert_mentions(&with("act_fn", "tanh".into()), &["act_fn", "tanh"]);
    assert_mentions(&with("layers_per_block", "two".into()), &["layers_per_block"]);
    assert_mentions(&with("cross_attention_dim", 512.into()), &["cross_attention_dim"]);
    assert_mentions(&with("_class_name", "UNet2DConditionModel".into()), &["_class_name"]);
    assert_mentions(&with("block_out_channels", serde_json::json!([8, 16, 32])), &["down_block_types"]);

    // A group count that does not divide a layer's channels is named at build time.
    let mut config = base.clone();
    config["norm_num_groups"] = 3.into();
    let config = UNet2DConfig::from_json_value(config).expect("parses");
    let message = UNet2DModel::new(config, Device::Cpu).expect_err("3 groups").to_string();
    assert_mentions(&message, &["norm_num_groups"]);

    // diffusers' metadata keys and a null attention_head_dim are accepted.
    let mut config = base.clone();
    config["_name_or_path"] = "google/ddpm-cifar10-32".into();
    config["attention_head_dim"] = serde_json::Value::Null;
    let config = UNet2DConfig::from_json_value(config).expect("metadata accepted");
    assert_eq!(config.attention_head_dim, None);
    config.validate().expect("valid");
}

/// The accepted keys are exactly diffusers' `UNet2DModel.__init__` parameters (plus metadata),
/// and a missing key takes diffusers' default.
#[test]
fn config_keys_and_defaults_match_diffusers_signature() {
    let signature = read_json(&fixture_path("unet/unet2d_signature.json"));
    let defaults = signature["defaults"].as_object().expect("defaults");
    let mut ours: Vec<&str> = UNET_2D_CONFIG_KEYS.iter().copied().filter(|key| !key.starts_with('_')).collect();
    let mut theirs: Vec<&str> = defaults.keys().map(String::as_str).collect();
    ours.sort_unstable();
    theirs.sort_unstable();
    assert_eq!(ours, theirs, "config keys vs UNet2DModel.__init__ parameters");

    let our_defaults = serde_json::to_value(UNet2DConfig::default()).expect("serialize");
    let from_empty = serde_json::to_value(UNet2DConfig::from_json_str("{}").expect("empty config")).expect("serialize");
    assert_eq!(our_defaults, from_empty, "Default and serde defaults disagree");
    for (key, expected) in defaults {
        let actual = &our_defaults[key.as_str()];
        let same = match (actual.as_f64(), expected.as_f64()) {
            (Some(a), Some(b)) => a == b,
            _ => actual == expected,
        };
        assert!(same, "default of `{key}`: ours {actual}, diffusers {expected}");
    }
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let model = load("tiny_attn_pos");
    let options = (Kind::Float, Device::Cpu);
    let tau = Tensor::from_slice(&[1.0f32, 2.0]);
    let wrong_channels = model.forward(&Tensor::zeros([2, 4, 16, 16], options), &tau);
    assert!(wrong_channels.expect_err("4 channels").to_string().contains("in_channels"));
    let odd_size = model.forward(&Tensor::zeros([2, 3, 15, 16], options), &tau);
    assert!(odd_size.expect_err("odd size").to_string().contains("divisible by 2"));
    let three_dims = model.forward(&Tensor::zeros([3, 16, 16], options), &tau);
    assert!(three_dims.is_err());
    let wrong_tau = model.forward(&Tensor::zeros([2, 3, 16, 16], options), &Tensor::zeros([3], options));
    assert!(wrong_tau.expect_err("3 timesteps").to_string().contains("timesteps"));
}

#[test]
fn deprecated_attention_key_names_load_like_diffusers() {
    let name = "tiny_attn_pos";
    let scratch = scratch_copy(name, "legacy-names");
    edit_weights(scratch.path(), |tensors| {
        for (key, _) in tensors.iter_mut() {
            *key = key
                .replace(".to_q.", ".query.")
                .replace(".to_k.", ".key.")
                .replace(".to_v.", ".value.")
                .replace(".to_out.0.", ".proj_attn.");
        }
    });
    let legacy = UNet2DModel::load(scratch.path(), Device::Cpu).expect("legacy names load");
    let io = read_tensors(&unet_fixture(name).join("io.safetensors"));
    let output = legacy.forward(tensor(&io, "x"), tensor(&io, "timesteps")).expect("forward");
    assert!(max_abs_diff(&output, tensor(&io, "output")) <= TOLERANCE);
}

#[test]
fn save_then_load_round_trips_exactly() {
    for name in ["tiny_fourier", "tiny_1lvl_scale_shift"] {
        let model = load(name);
        let scratch = ScratchDir::new(&format!("round-trip-{name}"));
        let out_dir = scratch.path().join("saved");
        model.save(&out_dir).expect("save");
        let reloaded = UNet2DModel::load(&out_dir, Device::Cpu).expect("reload");
        assert_eq!(reloaded.config().block_out_channels, model.config().block_out_channels);
        let io = read_tensors(&unet_fixture(name).join("io.safetensors"));
        let (x, tau) = (tensor(&io, "x"), tensor(&io, "timesteps"));
        let before = model.forward(x, tau).expect("forward");
        let after = reloaded.forward(x, tau).expect("forward");
        assert_eq!(max_abs_diff(&before, &after), 0.0, "{name}");

        let saved_config = read_json(&out_dir.join("config.json"));
        assert_eq!(saved_config["_class_name"], "UNet2DModel");
        let leftovers: Vec<_> = fs::read_dir(&out_dir)
            .expect("read dir")
            .filter_map(|entry| entry.ok())
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .filter(|file| file.starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left behind: {leftovers:?}");
    }
}

#[test]
fn fresh_model_round_trips_and_f16_storage_upcasts() {
    let config = UNet2DConfig::from_json_file(unet_fixture("tiny_attn_pos").join("config.json")).expect("config");
    let model = UNet2DModel::new(config, Device::Cpu).expect("fresh model");
    let scratch = ScratchDir::new("fresh");
    let x = Tensor::randn([2, 3, 16, 16], (Kind::Float, Device::Cpu));
    let tau = Tensor::from_slice(&[10.0f32, 700.0]);
    let before = model.forward(&x, &tau).expect("forward");

    let f32_dir = scratch.path().join("f32");
    model.save(&f32_dir).expect("save");
    let reloaded = UNet2DModel::load(&f32_dir, Device::Cpu).expect("reload");
    assert_eq!(max_abs_diff(&before, &reloaded.forward(&x, &tau).expect("forward")), 0.0);

    let f16_dir = scratch.path().join("f16");
    model.save_with_storage(&f16_dir, WeightStorage::F16).expect("save f16");
    let f32_bytes = fs::metadata(f32_dir.join("diffusion_pytorch_model.safetensors")).expect("f32").len();
    let f16_bytes = fs::metadata(f16_dir.join("diffusion_pytorch_model.safetensors")).expect("f16").len();
    assert!(f16_bytes * 10 < f32_bytes * 6, "f16 file {f16_bytes} B vs f32 {f32_bytes} B");
    let half = UNet2DModel::load(&f16_dir, Device::Cpu).expect("reload f16");
    assert_eq!(half.kind(), Kind::Float);
    let diff = max_abs_diff(&before, &half.forward(&x, &tau).expect("forward"));
    assert!(diff > 0.0 && diff < 5e-2, "f16 storage changed the output by {diff}");
}

#[test]
fn torchscript_fixture_matches_and_gives_input_gradients() {
    let dir = fixture_path("unet/torchscript");
    let denoiser = TorchScriptDenoiser::load(dir.join("model.pt"), Device::Cpu).expect("load");
    assert_eq!(denoiser.prediction_type(), PredictionType::Epsilon);
    assert_eq!(denoiser.sample_shape(), Some([3, 8, 8]));
    assert_eq!(denoiser.num_train_timesteps(), 1000);

    let io = read_tensors(&dir.join("io.safetensors"));
    let x = tensor(&io, "x").copy().set_requires_grad(true);
    let tau = tensor(&io, "timesteps");
    let output = denoiser.forward(&x, tau).expect("forward");
    let diff = max_abs_diff(&output, tensor(&io, "output"));
    eprintln!("TorchScript: max |ours - traced in Python| = {diff:e}");
    assert!(diff <= TOLERANCE, "TorchScript output differs by {diff:e}");

    let grads = Tensor::run_backward(&[&output.sum(Kind::Float)], &[&x], false, false);
    let finite = bool::try_from(grads[0].isfinite().all()).expect("bool");
    assert!(finite && grads[0].abs().sum(Kind::Double).double_value(&[]) > 0.0);
}

#[test]
fn torchscript_missing_files_are_explained() {
    let scratch = ScratchDir::new("torchscript");
    let missing =
        TorchScriptDenoiser::load(scratch.path().join("model.pt"), Device::Cpu).expect_err("no module").to_string();
    assert_mentions(&missing, &["model.pt", "torch.jit"]);

    fs::copy(fixture_path("unet/torchscript/model.pt"), scratch.path().join("model.pt")).expect("copy");
    let no_sidecar =
        TorchScriptDenoiser::load(scratch.path().join("model.pt"), Device::Cpu).expect_err("no sidecar").to_string();
    assert_mentions(&no_sidecar, &["model.json", "prediction_type"]);

    fs::write(scratch.path().join("model.json"), r#"{"prediction": "epsilon"}"#).expect("write");
    let bad_sidecar =
        TorchScriptDenoiser::load(scratch.path().join("model.pt"), Device::Cpu).expect_err("bad sidecar").to_string();
    assert_mentions(&bad_sidecar, &["model.json", "prediction"]);
    assert_eq!(TorchScriptSidecar::path_for(Path::new("dir/model.pt")), PathBuf::from("dir/model.json"));
}

/// `abar_t = prod_{i<=t} (1 - beta_i)` for diffusers' linear betas (1e-4 .. 0.02, T = 1000), f64.
fn linear_abar() -> Vec<f64> {
    let steps = 1000;
    let mut product = 1.0;
    (0..steps)
        .map(|i| {
            let beta = 1e-4 + (0.02 - 1e-4) * i as f64 / (steps - 1) as f64;
            product *= 1.0 - beta;
            product
        })
        .collect()
}

/// A 10-step DDIM (eta = 0) loop written out with the plain formulas equals diffusers'
/// `DDIMScheduler` loop on the same tiny model and initial noise:
/// `x0 = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t)`,
/// `x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps`, `prev = t - 100`, `abar_prev = 1` below 0.
#[test]
fn ddim_loop_matches_diffusers_scheduler() {
    let meta = read_json(&fixture_path("unet/ddim_loop.json"));
    let model_name = meta["model"].as_str().expect("model");
    let denoiser = UNetDenoiser::new(load(model_name), PredictionType::Epsilon);
    let fixture = read_tensors(&fixture_path("unet/ddim_loop.safetensors"));
    let timesteps = Vec::<i64>::try_from(tensor(&fixture, "timesteps")).expect("timesteps");
    assert_eq!(timesteps, vec![900, 800, 700, 600, 500, 400, 300, 200, 100, 0]);

    let abar = linear_abar();
    let mut sample = tensor(&fixture, "initial_noise").copy();
    let batch = sample.size()[0];
    for &t in &timesteps {
        let tau = Tensor::full([batch], t as f64, (Kind::Float, Device::Cpu));
        let eps = denoiser.forward(&sample, &tau).expect("forward");
        let abar_t = abar[t as usize];
        let prev = t - 100;
        let abar_prev = if prev >= 0 { abar[prev as usize] } else { 1.0 };
        let x0 = (&sample - &eps * (1.0 - abar_t).sqrt()) / abar_t.sqrt();
        sample = x0 * abar_prev.sqrt() + eps * (1.0 - abar_prev).sqrt();
    }
    let diff = max_abs_diff(&sample, tensor(&fixture, "final_sample"));
    eprintln!("DDIM loop: max |ours - diffusers| = {diff:e}");
    assert!(diff <= TOLERANCE, "DDIM loop final sample differs by {diff:e}");
}

/// Largest tolerated |CUDA - diffusers on CPU|: cuDNN convolutions run in TF32 by default, which
/// rounds inputs to 10 mantissa bits.
const CUDA_TOLERANCE: f64 = 2e-2;

/// The tiny fixtures on CUDA (outputs against diffusers' CPU reference, finite non-zero gradients
/// to `x` and `tau`), then forward/backward timings of the two public configs (random weights).
#[test]
#[ignore = "needs a CUDA device: cargo test -p ddss-tests --test unet -- --ignored cuda"]
fn cuda_forward_gradients_and_timings() {
    assert!(tch::Cuda::is_available(), "libtorch sees no CUDA device");
    let cuda = Device::Cuda(0);
    for name in TINY_MODELS {
        let model = UNet2DModel::load(unet_fixture(name), cuda).expect("load on CUDA");
        let io = read_tensors(&unet_fixture(name).join("io.safetensors"));
        let x = tensor(&io, "x").to_device(cuda).set_requires_grad(true);
        let tau = tensor(&io, "timesteps").to_device(cuda).set_requires_grad(true);
        let output = model.forward(&x, &tau).expect("forward on CUDA");
        let diff = max_abs_diff(&output.to_device(Device::Cpu), tensor(&io, "output"));
        eprintln!("cuda {name}: max |CUDA - diffusers CPU| = {diff:e}");
        assert!(diff <= CUDA_TOLERANCE, "{name}: CUDA output differs by {diff:e}");
        let grads = Tensor::run_backward(&[&output.sum(Kind::Float)], &[&x, &tau], false, false);
        for (what, grad) in [("x", &grads[0]), ("tau", &grads[1])] {
            let finite = bool::try_from(grad.isfinite().all()).expect("bool");
            let norm = grad.abs().sum(Kind::Double).double_value(&[]);
            assert!(finite && norm > 0.0, "{name}: d output / d {what} on CUDA: finite {finite}, |.|_1 {norm}");
        }
    }

    for (stem, batch) in [("ddpm-cifar10-32", 128), ("ddpm-ema-church-256", 8)] {
        let config_path = fixture_path(&format!("unet/{stem}.config.json"));
        let config = UNet2DConfig::from_json_file(&config_path).expect("config");
        let [channels, height, width] = config.sample_shape().expect("sample_size");
        let mut model = UNet2DModel::new(config, cuda).expect("model on CUDA");
        model.var_store_mut().freeze();
        let x = Tensor::randn([batch, channels, height, width], (Kind::Float, cuda));
        let tau = Tensor::full([batch], 500.5, (Kind::Float, cuda));
        let time = |run: &dyn Fn()| {
            run();
            tch::Cuda::synchronize(0);
            let start = std::time::Instant::now();
            for _ in 0..3 {
                run();
            }
            tch::Cuda::synchronize(0);
            start.elapsed().as_secs_f64() / 3.0
        };
        let forward = time(&|| {
            let _ = tch::no_grad(|| model.forward(&x, &tau).expect("forward"));
        });
        let backward = time(&|| {
            let x = x.copy().set_requires_grad(true);
            let output = model.forward(&x, &tau).expect("forward");
            let _ = Tensor::run_backward(&[&output.sum(Kind::Float)], &[&x], false, false);
        });
        eprintln!(
            "cuda {stem}: batch {batch}: forward {:.1} ms ({:.2} ms/image), forward+input-backward {:.1} ms",
            forward * 1e3,
            forward * 1e3 / batch as f64,
            backward * 1e3
        );
    }
}

/// The memory-lean backward pass of a taped call (`forward_taped` + `backward_taped`) gives the
/// gradients autograd gives through `forward`, on every tiny configuration (f64, so that only
/// rounding separates them), and the taped forward returns the same output without autograd.
#[test]
fn taped_backward_equals_autograd_on_every_tiny_config() {
    for &name in TINY_MODELS {
        let mut model = load(name);
        model.var_store_mut().double();
        let denoiser = UNetDenoiser::new(model, PredictionType::Epsilon);
        let io = read_tensors(&unet_fixture(name).join("io.safetensors"));
        let x = tensor(&io, "x").to_kind(Kind::Double);
        let batch = x.size()[0];
        // Per-sample timesteps, and one shared timestep in both of the shapes a caller may use.
        let per_sample = Tensor::rand([batch], (Kind::Double, Device::Cpu)) * 900.0 + 20.0;
        for tau in [per_sample, Tensor::from_slice(&[333.25f64]), Tensor::from(87.5f64)] {
            let want_out = denoiser.forward(&x, &tau).expect("forward");
            let grad_out = Tensor::randn(want_out.size(), (Kind::Double, Device::Cpu));
            let (want_x, want_tau) =
                ggdm_nets::differentiable::eager_vjp(&denoiser, &x, &tau, &grad_out).expect("autograd");
            let (out, tape) = denoiser.forward_taped(&x, &tau).expect("taped forward").expect("the UNet records tapes");
            assert!(!out.requires_grad(), "{name}: the taped forward builds no autograd graph");
            assert!(max_abs_diff(&out, &want_out) < 1e-12, "{name}: taped output differs");
            let (got_x, got_tau) = denoiser.backward_taped(tape, &grad_out).expect("taped backward");
            assert_eq!(got_tau.size(), tau.size(), "{name}: tau gradient shape");
            let rel = |a: &Tensor, b: &Tensor| max_abs_diff(a, b) / b.abs().max().double_value(&[]).max(1e-300);
            assert!(
                rel(&got_x, &want_x) < 1e-10,
                "{name} tau {:?}: dx differs by {}",
                tau.size(),
                rel(&got_x, &want_x)
            );
            assert!(
                rel(&got_tau, &want_tau) < 1e-9,
                "{name} tau {:?}: dtau {got_tau:?} vs autograd {want_tau:?}",
                tau.size()
            );
        }
    }
}

/// In f32, the taped backward agrees with autograd to float rounding; a tape from one call cannot
/// take an output gradient of another shape.
#[test]
fn taped_backward_in_f32_and_bad_gradient_shapes() {
    let name = "tiny_attn_pos";
    let denoiser = UNetDenoiser::new(load(name), PredictionType::Epsilon);
    let io = read_tensors(&unet_fixture(name).join("io.safetensors"));
    let (x, tau) = (tensor(&io, "x"), tensor(&io, "timesteps"));
    let grad_out = Tensor::randn(x.size(), (Kind::Float, Device::Cpu));
    let (want_x, want_tau) = ggdm_nets::differentiable::eager_vjp(&denoiser, x, tau, &grad_out).expect("autograd");
    let (_, tape) = denoiser.forward_taped(x, tau).expect("taped").expect("tape");
    let (got_x, got_tau) = denoiser.backward_taped(tape, &grad_out).expect("taped backward");
    let rel = |a: &Tensor, b: &Tensor| max_abs_diff(a, b) / b.abs().max().double_value(&[]);
    assert!(rel(&got_x, &want_x) < 1e-4, "dx differs by {}", rel(&got_x, &want_x));
    assert!(rel(&got_tau, &want_tau) < 1e-3, "dtau {got_tau:?} vs {want_tau:?}");
    let (_, tape) = denoiser.forward_taped(x, tau).expect("taped").expect("tape");
    let wrong = Tensor::zeros([1, 3, 4, 4], (Kind::Float, Device::Cpu));
    let message = denoiser.backward_taped(tape, &wrong).expect_err("wrong shape").to_string();
    assert!(message.contains("output gradient"), "{message}");
}
