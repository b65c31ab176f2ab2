"""Reading sampler files and scheduler folders: exact save/load round trips, version 1 files, the
folder ddss-cli exports, and clear errors for files, models and calls that do not fit."""

import copy
import json
import math

import pytest
import torch
from conftest import FIXTURES, MODEL, sampler_path

from ddss_sampler import GGDMSampler, GGDMScheduler, SamplerFileError, load_sampler, sample_ggdm


def file_value(name):
    return json.loads(sampler_path(name).read_text())


def test_save_pretrained_round_trips_exactly(tmp_path):
    for name in ("marginal", "learned_deterministic"):
        scheduler = GGDMScheduler.from_sampler_file(sampler_path(name))
        scheduler.save_pretrained(tmp_path / name)
        loaded = GGDMScheduler.from_pretrained(tmp_path / name)
        assert dict(loaded.config) == dict(scheduler.config)
        assert loaded.config["sampler"] == file_value(name)
        assert torch.equal(loaded.timesteps, scheduler.timesteps)
        assert loaded.ggdm.step_coefficients == scheduler.ggdm.step_coefficients
        loaded.save_pretrained(tmp_path / f"{name}-again")
        first = (tmp_path / name / "scheduler_config.json").read_text()
        assert (tmp_path / f"{name}-again" / "scheduler_config.json").read_text() == first


def test_the_exported_scheduler_folder_loads():
    """`ddss-cli export --format diffusers-scheduler` of a version 1 file: the same sampler, as
    version 2, with the model's settings next to it."""
    exported = GGDMScheduler.from_pretrained(FIXTURES / "scheduler")
    direct = GGDMScheduler.from_sampler_file(sampler_path("learned_stochastic"))
    assert exported.config["sampler"] == direct.config["sampler"]
    assert {k: v for k, v in exported.config.items() if not k.startswith("_")} == {
        k: v for k, v in direct.config.items() if not k.startswith("_")
    }
    model_settings = json.loads((MODEL / "scheduler_config.json").read_text())
    for key in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type", "clip_sample"):
        assert exported.config[key] == model_settings[key]


def test_version_1_files_give_the_coefficients_ddss_cli_derives():
    """A version 1 file (no p, q or query coefficients) is completed here; ddss-cli's re-export
    of the same file (version 2) holds its own derivation."""
    ours = load_sampler(FIXTURES / "learned_stochastic_v1.json")
    theirs = load_sampler(sampler_path("learned_stochastic"))
    assert ours.source["version"] == 2 and ours.source["base"] == "ddim"
    for key in ("p", "q", "query_timesteps", "query_abar", "input_scale", "sigma", "timesteps"):
        for a, b in zip(ours.source["derived"][key], theirs.source["derived"][key]):
            assert math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12), key


def test_version_1_in_the_marginal_mode_gives_the_coefficients_ddss_cli_derives():
    value = file_value("marginal")
    theirs = value["derived"]
    value["version"] = 1
    del value["base"]
    value["derived"] = {key: theirs[key] for key in ("timesteps", "sigma", "u", "w")}
    ours = GGDMSampler(value).source["derived"]
    for key in ("p", "q", "query_timesteps", "query_abar", "input_scale"):
        for a, b in zip(ours[key], theirs[key]):
            assert math.isclose(a, b, rel_tol=1e-10, abs_tol=1e-10), (key, a, b)


def broken(name, edit):
    value = file_value(name)
    edit(value)
    return value


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda v: v.update(format="something-else"), ["`format`", "something-else"]),
        (lambda v: v.update(version=3), ["`version`", "3", "1 and 2"]),
        (lambda v: v.pop("derived"), ["`derived`"]),
        (lambda v: v["derived"]["p"].pop(), ["derived.p", "steps = 10"]),
        (lambda v: v["derived"]["u"][3].append(0.0), ["derived.u", "10 x 10"]),
        (lambda v: v["derived"]["q"].__setitem__(2, float("nan")), ["derived.q", "nan"]),
        (lambda v: v["model"].update(sample_shape=[1, 28]), ["model.sample_shape", "[1, 28]"]),
        (lambda v: v["scheduler"].update(prediction_type="flow"), ["prediction_type", "flow"]),
        (lambda v: v.update(query="sideways"), ["`query`", "sideways"]),
    ],
)
def test_bad_sampler_files_are_named(tmp_path, edit, words):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(broken("learned_deterministic", edit)))
    with pytest.raises(SamplerFileError) as err:
        GGDMScheduler.from_sampler_file(path)
    message = str(err.value)
    assert str(path) in message
    for word in words:
        assert word in message, message


def test_unreadable_files_are_named(tmp_path):
    path = tmp_path / "sampler.json"
    path.write_text("{ not json")
    with pytest.raises(SamplerFileError, match="not valid JSON") as err:
        load_sampler(path)
    assert str(path) in str(err.value)
    with pytest.raises(SamplerFileError, match="missing.json"):
        load_sampler(tmp_path / "missing.json")


def test_a_model_of_another_prediction_type_or_schedule_is_refused():
    config = json.loads((MODEL / "scheduler_config.json").read_text())
    with pytest.raises(SamplerFileError, match="prediction_type.*v_prediction.*epsilon"):
        GGDMScheduler.from_sampler_file(sampler_path("marginal"), model_config=dict(config, prediction_type="v_prediction"))
    with pytest.raises(SamplerFileError, match="beta_schedule"):
        GGDMScheduler.from_sampler_file(sampler_path("marginal"), model_config=dict(config, beta_schedule="scaled_linear"))
    GGDMScheduler.from_sampler_file(sampler_path("marginal"), model_config=MODEL / "scheduler_config.json")


def test_a_model_of_another_shape_is_refused():
    scheduler = GGDMScheduler.from_sampler_file(sampler_path("learned_deterministic"))
    scheduler.set_timesteps(10)
    sample = torch.zeros(2, 3, 32, 32)
    with pytest.raises(SamplerFileError, match=r"\[2, 3, 32, 32\].*\[N, 1, 28, 28\]"):
        scheduler.step(sample, scheduler.timesteps[0], sample)
    with pytest.raises(SamplerFileError, match=r"\[N, 1, 28, 28\]"):
        sample_ggdm(lambda x, sigma: x, torch.zeros(1, 1, 32, 32), sampler_path("learned_deterministic"))


def test_step_counts_and_order_are_checked():
    scheduler = GGDMScheduler.from_sampler_file(sampler_path("learned_stochastic"))
    with pytest.raises(SamplerFileError, match="K = 10.*num_inference_steps = 1000"):
        scheduler.set_timesteps(1000)
    with pytest.raises(SamplerFileError, match="custom"):
        scheduler.set_timesteps(timesteps=[999, 500])
    scheduler.set_timesteps(10)
    x = torch.zeros(1, 1, 28, 28)
    with pytest.raises(SamplerFileError, match="step 0 is at timestep 999"):
        scheduler.step(x, 500, x)
    for t in scheduler.timesteps:
        x = scheduler.step(torch.zeros_like(x), t, x, variance_noise=torch.zeros_like(x)).prev_sample
    with pytest.raises(SamplerFileError, match="all K = 10 steps are done"):
        scheduler.step(x, scheduler.timesteps[-1], x)


def test_a_config_without_or_against_its_sampler_is_refused():
    with pytest.raises(SamplerFileError, match="needs a learned sampler"):
        GGDMScheduler()
    config = dict(GGDMScheduler.from_sampler_file(sampler_path("marginal")).config)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with pytest.raises(SamplerFileError, match="`prediction_type` = 'sample'"):
        GGDMScheduler(**dict(copy.deepcopy(config), prediction_type="sample"))


def test_the_exported_pipeline_folder_loads_in_diffusers(tmp_path, unet):
    """`ddss-cli export --format diffusers-pipeline`'s model_index.json, the exported scheduler
    folder and the shipped model's files: DDPMPipeline.from_pretrained loads the GGDMScheduler
    (ddss_sampler is imported) and runs it; the pipeline saves and loads again."""
    import shutil

    from diffusers import DDPMPipeline

    folder = tmp_path / "pipeline"
    (folder / "unet").mkdir(parents=True)
    shutil.copy(FIXTURES / "pipeline_model_index.json", folder / "model_index.json")
    shutil.copytree(FIXTURES / "scheduler", folder / "scheduler")
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        shutil.copy(MODEL / name, folder / "unet" / name)
    pipe = DDPMPipeline.from_pretrained(folder)
    assert isinstance(pipe.scheduler, GGDMScheduler)
    assert pipe.scheduler.config["sampler"] == GGDMScheduler.from_pretrained(FIXTURES / "scheduler").config["sampler"]
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=1, num_inference_steps=pipe.scheduler.steps, output_type="pt").images
    assert images.shape == (1, 1, 28, 28) and torch.isfinite(images).all()
    pipe.save_pretrained(tmp_path / "saved")
    again = DDPMPipeline.from_pretrained(tmp_path / "saved")
    assert dict(again.scheduler.config) == dict(pipe.scheduler.config)
