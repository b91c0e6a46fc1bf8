"""Few-step knobs (issue #20): `timestep_spacing=` per call (default: the model's scheduler config), equal to diffusers'
`Scheduler.from_config(config, timestep_spacing=...)` at 1-4 steps, and guidance <= 1 (Turbo's 0) as one UNet pass
per step over the images alone. Latents compared as tests/test_pipeline.py: max|diff| <= 1e-5 * max|ref|."""

import numpy as np
import pytest
import torch

import sdrt
from sdrt.errors import InputError
from sdrt.schedulers import make_scheduler

pytest.importorskip("diffusers")
RTOL = 1e-5
CLASSES = {"euler_a": "EulerAncestralDiscreteScheduler", "euler": "EulerDiscreteScheduler", "ddim": "DDIMScheduler",
           "lcm": "LCMScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}


@pytest.fixture(scope="module")
def pipes(tiny_sd1):
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(tiny_sd1, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ref, ref.scheduler.config, sdrt.Pipeline.from_pretrained(tiny_sd1, backend="torch")


@pytest.mark.parametrize("scheduler,steps,guidance", [
    ("euler_a", 1, 0.0), ("euler_a", 2, 0.0), ("euler_a", 4, 2.0), ("lcm", 1, 1.0), ("lcm", 4, 0.0), ("lcm", 3, 2.0),
    ("euler", 4, 0.0), ("ddim", 2, 1.0), ("dpmpp_2m", 4, 0.0)])  # fmt: skip
def test_trailing_spacing_equals_diffusers(pipes, scheduler, steps, guidance):
    import diffusers

    ref, config, ours = pipes
    ref.scheduler = getattr(diffusers, CLASSES[scheduler]).from_config(config, timestep_spacing="trailing")
    with torch.no_grad():
        expected = ref("a red cat", num_inference_steps=steps, guidance_scale=guidance, height=64, width=64,
                       generator=torch.Generator().manual_seed(3), output_type="latent").images.numpy()
    got = ours("a red cat", num_inference_steps=steps, guidance_scale=guidance, seed=3, scheduler=scheduler,
               timestep_spacing="trailing", output_type="latent", progress=False)
    err = np.abs(got.images - expected).max() / np.abs(expected).max()
    assert err <= RTOL, err
    assert got.parameters[0]["timestep_spacing"] == "trailing"


def test_spacing_defaults_to_the_config_and_overrides_it(pipes):
    _, config, _ = pipes
    trailing = make_scheduler("euler_a", {**config, "timestep_spacing": "trailing"})
    override = make_scheduler("euler_a", config, "trailing")
    default = make_scheduler("euler_a", config)
    for s in (trailing, override, default):
        s.set_timesteps(4)
    assert np.array_equal(trailing.timesteps, override.timesteps) and trailing.timesteps[0] == 999
    assert not np.array_equal(default.timesteps, override.timesteps)  # linspace (Euler a's default) starts at 999 too
    with pytest.raises(InputError, match="timestep_spacing 'last'"):
        make_scheduler("euler_a", config, "last")
    with pytest.raises(InputError, match="dpmpp_2s_a scheduler has no timestep spacing"):
        make_scheduler("dpmpp_2s_a", config, "trailing")


@pytest.mark.parametrize("guidance", [0.0, 1.0])
def test_guidance_off_is_one_unet_pass_per_step(pipes, guidance):
    _, _, ours = pipes
    batches = []

    def spy(network, feeds, real=ours.backend.run):
        if network == "unet":
            batches.append(feeds["sample"].shape[0])
        return real(network, feeds)

    ours.backend.run = spy
    try:
        ours(["a cat", "a dog"], num_inference_steps=3, guidance_scale=guidance, seed=1, scheduler="euler_a",
             timestep_spacing="trailing", output_type="latent", progress=False)
        ours(["a cat", "a dog"], num_inference_steps=1, guidance_scale=2.0, seed=1, scheduler="euler_a", output_type="latent",
             progress=False)
    finally:
        del ours.backend.run
    assert batches == [2, 2, 2, 4]  # 2 images: 2 rows per call without guidance, [uncond; cond] = 4 with it


def test_cli_flag(tiny_sd1, tmp_path):
    from PIL import Image

    from sdrt.cli import main

    out = tmp_path / "x.png"
    assert main(["generate", "a cat", "-m", str(tiny_sd1), "--backend", "torch", "-o", str(out), "--steps", "2",
                 "--scheduler", "euler_a", "--timestep-spacing", "trailing", "-g", "0", "-s", "1", "-q"]) == 0
    assert "trailing" in Image.open(out).text["sdrt"]
