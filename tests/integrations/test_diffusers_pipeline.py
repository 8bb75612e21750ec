"""genfast schedulers inside diffusers pipelines: ``pipe.save_pretrained`` / ``from_pretrained``
keep the genfast class and its config, the loaded pipeline makes the same images, genfast's
``sampler_step`` is what runs, and the images match diffusers' own scheduler (float64 reference).

DDPMPipeline is the pipeline under test because it keeps the scheduler it is given (DDIMPipeline
turns any scheduler into diffusers' DDIMScheduler in its __init__, so also when it is loaded)."""
import json
import subprocess
import sys

import pytest
import torch

import genfast
from genfast import schedulers as G
from genfast.schedulers import _diffusers, _ops
from genfast.testing import error_vs_reference

diffusers = pytest.importorskip("diffusers")
from diffusers.pipelines import pipeline_loading_utils  # noqa: E402

STEPS = 4
# diffusers configs as a checkpoint would have them (non-default values, so a config that fell
# back to defaults on the way would show); DPM-Solver++ 2M with Karras sigmas is the sigma-based one.
SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
CASES = [
    ("DDIMScheduler", dict(SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1)),
    ("DPMSolverMultistepScheduler", dict(SD_BETAS, use_karras_sigmas=True, steps_offset=1)),
]


def _tiny_unet(seed):
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(4, 8), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=2)


def _pipeline(name, cfg, seed):
    """A DDPMPipeline whose scheduler was swapped for genfast's, as a user does it."""
    pipe = diffusers.DDPMPipeline(unet=_tiny_unet(seed), scheduler=getattr(diffusers, name)(**cfg))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = getattr(G, name).from_config(pipe.scheduler.config)
    return pipe


def _run(pipe, seed):
    """The pipeline's images and its last sample before the [0, 1] clamp (a random UNet
    saturates most pixels, which would hide differences)."""
    samples = []
    step = pipe.scheduler.step

    def recording_step(*args, **kwargs):
        out = step(*args, **kwargs)
        samples.append(out.prev_sample)
        return out

    pipe.scheduler.step = recording_step
    try:
        images = pipe(batch_size=3, generator=torch.Generator().manual_seed(seed), num_inference_steps=STEPS,
                      output_type="pt").images
    finally:
        del pipe.scheduler.step
    assert len(samples) == STEPS
    return images, samples[-1]


@pytest.fixture
def step_calls(monkeypatch):
    """Counts genfast's sampler_step launches (every scheduler step goes through _ops: its loop
    fast path, or sampler_step where that does not apply)."""
    calls = []
    real, real_in_loop = _ops.sampler_step, _ops.sampler_step_in_loop

    def counted(*args, **kwargs):
        calls.append(args[0].dtype)
        return real(*args, **kwargs)

    def counted_in_loop(*args):
        result = real_in_loop(*args)
        if result is not None:
            calls.append(args[0].dtype)
        return result

    monkeypatch.setattr(_ops, "sampler_step", counted)
    monkeypatch.setattr(_ops, "sampler_step_in_loop", counted_in_loop)
    return calls


def _public(config):
    # the settings; "_" keys are bookkeeping (as in diffusers, a saved config drops
    # _use_default_values, and a loaded one keeps the file's _class_name)
    return {k: v for k, v in config.items() if not k.startswith("_")}


@pytest.mark.parametrize("name,cfg", CASES)
def test_save_load_same_images(tmp_path, name, cfg, seed, step_calls, monkeypatch):
    pipe = _pipeline(name, cfg, seed)
    before, last_before = _run(pipe, seed)
    assert len(step_calls) == STEPS

    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["scheduler"] == ["genfast.schedulers", name]
    saved = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == name

    # mmapped weights sit at odd addresses, where CPU convolutions round differently; copied
    # weights give the UNet the same arithmetic as before saving, so any difference is the scheduler's
    loaded = diffusers.DiffusionPipeline.from_pretrained(tmp_path, disable_mmap=True)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is diffusers.DDPMPipeline
    assert type(loaded.scheduler) is getattr(G, name)
    assert _public(loaded.scheduler.config) == _public(pipe.scheduler.config)
    after, last_after = _run(loaded, seed)
    assert len(step_calls) == 2 * STEPS, "the loaded pipeline did not step through genfast's sampler_step"
    assert torch.equal(before, after) and torch.equal(last_before, last_after)

    # diffusers' own scheduler of that kind, from the config genfast saved and loaded: float32,
    # and float64 (the truth: float64 schedule, same float32 starting noise)
    loaded.scheduler = getattr(diffusers, name).from_config(loaded.scheduler.config)
    _, theirs32 = _run(loaded, seed)
    _use_float64_schedule(loaded.scheduler, torch.from_numpy(pipe.scheduler._abar.copy()))
    draw = diffusers.pipelines.ddpm.pipeline_ddpm.randn_tensor
    monkeypatch.setattr(diffusers.pipelines.ddpm.pipeline_ddpm, "randn_tensor",
                        lambda shape, dtype=None, **kw: draw(shape, dtype=torch.float32, **kw).to(dtype))
    _, theirs64 = _run(loaded.to(torch.float64), seed)
    assert len(step_calls) == 2 * STEPS  # the references ran diffusers' step
    assert last_before.dtype == torch.float32 and theirs64.dtype == torch.float64
    error_vs_reference(last_before, theirs64, theirs32, name=f"{name} pipeline's last sample")


def _use_float64_schedule(theirs, alphas_cumprod):
    """diffusers forms alphas_cumprod in float32 even for float64 samples (1e-6 relative off at
    t = 999 with these betas, more than the float32 sampling error): the float64 truth takes the
    float64 alpha_bar genfast steps with (checked against the formula in test_schedulers)."""
    theirs.alphas_cumprod = alphas_cumprod
    if hasattr(theirs, "final_alpha_cumprod") and not theirs.config.set_alpha_to_one:  # DDIM
        theirs.final_alpha_cumprod = alphas_cumprod[0]
    if hasattr(theirs, "lambda_t"):  # DPM-Solver derives these in __init__
        theirs.alpha_t, theirs.sigma_t = alphas_cumprod.sqrt(), (1 - alphas_cumprod).sqrt()
        theirs.lambda_t = theirs.alpha_t.log() - theirs.sigma_t.log()


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler", "LCMScheduler", "EulerDiscreteScheduler",
                                  "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
                                  "DPMSolverMultistepScheduler", "FlowMatchEulerDiscreteScheduler"])
def test_every_scheduler_round_trips_through_a_pipeline(tmp_path, name, seed):
    """Config only (no sampling): the pipeline's own class loads every genfast scheduler back."""
    unet = _tiny_unet(seed)
    scheduler = getattr(G, name)(num_train_timesteps=900)
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=scheduler)
    assert pipe.config.scheduler == ("genfast.schedulers", name)
    pipe.save_pretrained(tmp_path)
    loaded = diffusers.DDPMPipeline.from_pretrained(tmp_path, unet=unet)  # only the scheduler is read
    assert type(loaded.scheduler) is type(scheduler) and loaded.unet is unet
    assert _public(loaded.scheduler.config) == _public(scheduler.config)
    assert loaded.scheduler.config.num_train_timesteps == 900


def test_components_to_and_from_pipe(seed):
    pipe = _pipeline(*CASES[1], seed)
    scheduler = pipe.scheduler
    assert pipe.components["scheduler"] is scheduler
    assert pipe.to(torch.float64).scheduler is scheduler and pipe.unet.dtype == torch.float64
    other = diffusers.DDPMPipeline.from_pipe(pipe)
    assert other.scheduler is scheduler and other.unet is pipe.unet
    assert other.config.scheduler == ("genfast.schedulers", "DPMSolverMultistepScheduler")
    # swapping back to diffusers' class through the config works too
    back = diffusers.DPMSolverMultistepScheduler.from_config(scheduler.config)
    assert back.config.use_karras_sigmas and back.config.beta_schedule == "scaled_linear"


def test_registered_when_diffusers_came_first(monkeypatch):
    """genfast imported after diffusers' loader: install registers at once (here undone first)."""
    monkeypatch.delitem(pipeline_loading_utils.LOADABLE_CLASSES, _diffusers.LIBRARY)
    _diffusers.install()
    assert pipeline_loading_utils.LOADABLE_CLASSES[_diffusers.LIBRARY] == {"SchedulerMixin": ["save_pretrained",
                                                                                           "from_pretrained"]}
    assert pipeline_loading_utils.ALL_IMPORTABLE_CLASSES["SchedulerMixin"] == ["save_pretrained", "from_pretrained"]
    # what a Hub download checks first: a listed library, not custom code the repo must ship
    pipeline_loading_utils._get_custom_components_and_folders(
        "user/repo", {"scheduler": ["genfast.schedulers", "DDIMScheduler"]}, filenames=[])
    # the base class diffusers looks up by that name in the library
    assert all(issubclass(getattr(G, n), genfast.schedulers.SchedulerMixin)
               for n in G.__all__ if n.endswith("Scheduler"))


def test_genfast_first_does_not_import_diffusers_and_registers_later():
    code = ("import sys, genfast\n"
            "assert 'diffusers' not in sys.modules, 'importing genfast imported diffusers'\n"
            "from diffusers.pipelines import pipeline_loading_utils as u\n"
            "assert u.LOADABLE_CLASSES['genfast.schedulers'] == "
            "{'SchedulerMixin': ['save_pretrained', 'from_pretrained']}\n"
            "import diffusers.pipelines.pipeline_loading_utils as v\n"
            "assert v.__loader__.get_source(v.__name__)  # the wrapped loader still serves the source\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
