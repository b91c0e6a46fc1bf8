"""The whole pipeline against diffusers' own pipelines, same seed, on tiny random-weight models.

Compared on the final latents (before the uint8 rounding of images): max|diff| <= 1e-5 * max|ref|. Measured
here: <= 1e-6 relative at guidance 2.0 and <= 2.7e-6 at 7.5 for every scheduler on both tiny models (the noise
source equals torch's bit for bit on AVX2; the rest is float32 rounding in a different order). Random weights
amplify float noise at high guidance, so the tests use guidance 2-3.
"""

import numpy as np
import pytest
import torch

import sdrt
from sdrt.errors import Cancelled, InputError

LATENT_RTOL = 1e-5
DIFFUSERS_SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "euler_karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "lms_karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "heun": ("HeunDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpmpp_2m_sde_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
    "dpmpp_2s_a": ("DPMSolverSinglestepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "ddpm": ("DDPMScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
}
# sdrt's TCD uses gamma (eta) 0.3, TCDScheduler.step's default; StableDiffusionPipeline passes its own eta (0.0).
PIPELINE_KWARGS = {"tcd": {"eta": 0.3}}


def diffusers_scheduler(name, config):
    import diffusers

    cls_name, extra = DIFFUSERS_SCHEDULERS[name]
    return getattr(diffusers, cls_name).from_config(config, **extra)


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def pipes(request, tiny_sd1, tiny_sd2):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    folder = tiny_sd1 if request.param == "sd1" else tiny_sd2
    ref = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.original_scheduler = ref.scheduler  # the model's own (PNDM / DDIM-v), restored for scheduler=None
    ref_i2i = StableDiffusionImg2ImgPipeline(**ref.components)
    ref_i2i.set_progress_bar_config(disable=True)
    ref_i2i.original_scheduler = ref.scheduler
    ours = sdrt.Pipeline.from_pretrained(folder, backend="torch")
    return ref, ref_i2i, ours


def run_reference(ref, scheduler, **kwargs):
    original = getattr(ref, "original_scheduler", None) or ref.scheduler
    ref.scheduler = diffusers_scheduler(scheduler, original.config) if scheduler else original
    seed = kwargs.pop("seed")
    with torch.no_grad():
        return ref(generator=torch.Generator("cpu").manual_seed(seed), output_type="latent", **kwargs).images.numpy()


def assert_close(got, expected, what):
    err = np.abs(got - expected).max() / np.abs(expected).max()
    print(f"{what}: max relative diff {err:.2e}")  # pytest -s shows the measured figures
    assert err <= LATENT_RTOL, f"{what}: max relative diff {err:.2e}"


@pytest.mark.parametrize("scheduler", list(DIFFUSERS_SCHEDULERS))
def test_txt2img_equals_diffusers(pipes, scheduler):
    ref, _, ours = pipes
    kwargs = dict(prompt="a photo of a red cat", num_inference_steps=6, guidance_scale=2.0, height=64, width=64, seed=7)
    expected = run_reference(ref, scheduler, **kwargs, **PIPELINE_KWARGS.get(scheduler, {}))
    got = ours(**kwargs, scheduler=scheduler, output_type="latent", progress=False).images
    assert_close(got, expected, scheduler)


def test_pndm_runge_kutta_equals_diffusers(pipes, monkeypatch):
    """A model whose PNDM config lacks skip_prk_steps runs diffusers' Runge-Kutta warm-up (n + 9 UNet calls)."""
    ref, _, ours = pipes
    config = {k: v for k, v in ours.source.scheduler_config.items() if k != "skip_prk_steps"}
    monkeypatch.setattr(type(ours.source), "scheduler_config", property(lambda self: config))
    monkeypatch.setattr(ref, "original_scheduler", diffusers_scheduler("pndm", config))
    kwargs = dict(prompt="a photo of a red cat", num_inference_steps=5, guidance_scale=2.0, height=64, width=64, seed=7)
    expected = run_reference(ref, None, **kwargs)
    assert ref.scheduler.config.skip_prk_steps is False and len(ref.scheduler.timesteps) == 14
    got = ours(**kwargs, scheduler="pndm", output_type="latent", progress=False).images
    assert_close(got, expected, "pndm with Runge-Kutta warm-up")


def test_negative_prompt_and_model_default_scheduler(pipes):
    ref, _, ours = pipes
    kwargs = dict(prompt="a cat", negative_prompt="blurry, dog", num_inference_steps=5, guidance_scale=3.0, height=64, width=96, seed=3)
    expected = run_reference(ref, None, **kwargs)
    got = ours(**kwargs, output_type="latent", progress=False).images
    assert_close(got, expected, "negative prompt")


@pytest.mark.parametrize(
    "scheduler,strength",
    [("pndm", 0.6), ("euler_a", 0.75), ("dpmpp_2m", 0.5), ("ddim", 1.0), ("heun", 0.6), ("lms", 0.75),
     ("unipc", 0.6), ("dpmpp_2m_sde", 0.75), ("dpmpp_2s_a", 0.6), ("ddpm", 0.5), ("lcm", 0.75), ("tcd", 0.6)],
)  # fmt: skip
def test_img2img_equals_diffusers(pipes, scheduler, strength):
    _, ref_i2i, ours = pipes
    rng = np.random.default_rng(0)
    init = (rng.uniform(0, 1, (64, 64, 3)) * 255).astype(np.uint8)
    from PIL import Image

    image = Image.fromarray(init)
    kwargs = dict(prompt="a dog", num_inference_steps=8, guidance_scale=2.0, strength=strength, seed=11)
    expected = run_reference(ref_i2i, scheduler, image=image, **kwargs, **PIPELINE_KWARGS.get(scheduler, {}))
    got = ours(**kwargs, image=image, scheduler=scheduler, output_type="latent", progress=False).images
    assert_close(got, expected, f"img2img {scheduler} {strength}")


def test_batch_seeds_reproduce_each_image_alone(pipes):
    _, _, ours = pipes
    batch = ours(["a cat", "a dog"], num_images_per_prompt=2, num_inference_steps=3, guidance_scale=1.5, seed=20, output_type="np", progress=False)
    assert batch.seeds == [20, 21, 22, 23]
    alone = ours("a dog", num_inference_steps=3, guidance_scale=1.5, seed=batch.seeds[3], output_type="np", progress=False)
    assert np.abs(alone.images[0].astype(int) - batch.images[3].astype(int)).max() <= 1


def test_guidance_off_runs_cond_only_and_callback_cancels(pipes):
    _, _, ours = pipes
    seen = []

    def spy(network, feeds, real=ours.backend.run):
        seen.append(feeds.get("sample", np.empty((0,))).shape[0] if network == "unet" else None)
        return real(network, feeds)

    ours.backend.run, original = spy, ours.backend.run
    try:
        ours("a cat", num_inference_steps=2, guidance_scale=1.0, seed=1, scheduler="pndm", progress=False)
    finally:
        ours.backend.run = original
    assert [s for s in seen if s is not None] == [1, 1, 1]  # PNDM: n + 1 UNet calls, batch 1 without guidance
    with pytest.raises(Cancelled):
        ours("a cat", num_inference_steps=4, seed=1, progress=False, callback=lambda i, t, x: i < 1)


def test_explicit_latents_are_used(pipes):
    _, _, ours = pipes
    latents = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
    a = ours("a cat", num_inference_steps=2, seed=1, latents=latents, output_type="latent", progress=False).images
    b = ours("a cat", num_inference_steps=2, seed=999, latents=latents, output_type="latent", progress=False).images
    assert np.array_equal(a, b)
    with pytest.raises(InputError, match="latents have shape"):
        ours("a cat", latents=latents[:, :, :4], progress=False)


def test_decoded_image_equals_diffusers(pipes):
    ref, _, ours = pipes
    kwargs = dict(prompt="a red cat", num_inference_steps=4, guidance_scale=2.0, height=64, width=64)
    ref.scheduler = ref.original_scheduler
    with torch.no_grad():
        expected = ref(generator=torch.Generator("cpu").manual_seed(9), output_type="np", **kwargs).images
    got = ours(**kwargs, seed=9, output_type="np", progress=False).images
    expected_u8 = (expected * 255).round()
    assert np.abs(got.astype(np.float32) - expected_u8).max() <= 1  # one grey level: rounding at a .5 boundary
