"""SDXL inpainting against diffusers' StableDiffusionXLInpaintPipeline, same seed, on tiny random-weight models: an
ordinary 4-channel SDXL base and refiner (the kept region put back after each step, sdrt.inpaint) and a dedicated
9-channel SDXL inpainting UNet (mask and masked-image latents as UNet inputs). Same tolerance and reason as
tests/test_inpaint.py and tests/test_sdxl.py: max|diff| <= 1e-5 * max|ref| on the final latents at guidance 2.
"""

import numpy as np
import pytest
from PIL import Image

import sdrt
from sdrt.errors import InputError
from test_inpaint import INIT, LATENT_RTOL, MASK, reference, relative


@pytest.fixture(scope="module")
def tiny_sdxl_inpaint(tmp_path_factory):
    from sdrt.export.tiny import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny") / "sdxl-inpaint", inpainting=True)


@pytest.fixture(scope="module")
def models(tiny_sdxl, tiny_sdxl_refiner, tiny_sdxl_inpaint):
    """name -> (diffusers StableDiffusionXLInpaintPipeline, sdrt Pipeline on the PyTorch backend)."""
    from diffusers import StableDiffusionXLInpaintPipeline

    out = {}
    for name, folder in (("base-4ch", tiny_sdxl), ("refiner-4ch", tiny_sdxl_refiner), ("base-9ch", tiny_sdxl_inpaint)):
        ref = StableDiffusionXLInpaintPipeline.from_pretrained(folder)
        ref.set_progress_bar_config(disable=True)
        ref.original_scheduler = ref.scheduler
        out[name] = (ref, sdrt.Pipeline.from_pretrained(folder, backend="torch"))
    return out


@pytest.mark.parametrize(
    "model,scheduler,strength,extra",
    [("base-4ch", None, 1.0, {}), ("base-4ch", "euler_a", 0.75, {}),
     ("base-4ch", "dpmpp_2m", 0.6, dict(original_size=(96, 80), crops_coords_top_left=(4, 2), negative_target_size=(32, 32))),
     ("refiner-4ch", None, 0.7, dict(aesthetic_score=7.0, negative_aesthetic_score=2.0)),
     ("base-9ch", None, 1.0, {}), ("base-9ch", "dpmpp_2m", 0.6, {})],
)  # fmt: skip
def test_sdxl_inpainting_equals_diffusers(models, model, scheduler, strength, extra):
    ref, ours = models[model]
    kwargs = dict(prompt="a dog", negative_prompt="blurry", num_inference_steps=5, guidance_scale=2.0, strength=strength,
                  height=64, width=64, **extra)
    mask = Image.fromarray(MASK)
    expected = reference(ref, scheduler, 5, image=INIT, mask_image=mask, **kwargs)
    got = ours(image=INIT, mask_image=mask, seed=5, scheduler=scheduler, output_type="latent", progress=False, **kwargs).images
    err = relative(got, expected)
    print(f"sdxl inpaint {model} {scheduler} {strength}: max relative diff {err:.2e}")
    assert err <= LATENT_RTOL


def test_sdxl_inpainting_model_facts_and_refusals(models, tiny_sdxl_inpaint):
    _, ours = models["base-9ch"]
    assert ours.facts.family == "sdxl" and ours.facts.inpainting_unet and ours.facts.unet_input_channels == 9
    assert ours.backend.contracts["unet"].inputs[0].shape[1] == 9
    with pytest.raises(InputError, match="inpainting model"):
        ours.plan("a cat")
    _, base = models["base-4ch"]
    with pytest.raises(InputError, match="mask_image with denoising_start/denoising_end"):
        base.plan("a cat", image=INIT, mask_image=MASK, denoising_end=0.8)
    # The kept region stays the image's own latents: decoded and pasted, the unmasked pixels are the image's.
    out = base("a cat", image=INIT, mask_image=MASK, keep_unmasked=True, num_inference_steps=2, guidance_scale=2.0, seed=1,
               output_type="np", progress=False)
    assert np.array_equal(out.images[0][MASK == 0], np.asarray(INIT)[MASK == 0])
    assert out.parameters[0]["inpaint"] is True



def test_sdxl_inpainting_on_the_device_loop(tiny_sdxl):
    """SDXL's added inputs and an ordinary UNet's kept region together on the device loop (sdrt.device_loop; CPU
    here): the host loop's latents, batch 2 (on the CPU the same float32 arithmetic in the same order, as
    tests/test_device_loop.py, which covers the 9-channel UNet's mask input with SD)."""
    model = tiny_sdxl
    kwargs = dict(image=INIT, mask_image=MASK, strength=0.75, num_inference_steps=3, guidance_scale=2.0, seed=9,
                  scheduler="euler_a", num_images_per_prompt=2, output_type="latent", progress=False)
    on = sdrt.Pipeline.from_pretrained(model, backend="torch", device_loop=True)
    off = sdrt.Pipeline.from_pretrained(model, backend="torch", device_loop=False)
    got = on("a dog", **kwargs).images
    assert on.backend.loop.runs == 1, "the pipeline kept the host loop"
    assert relative(got, off("a dog", **kwargs).images) <= 1e-6
