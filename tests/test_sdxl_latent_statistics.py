"""SDXL VAEs with latents_mean/latents_std in their config: encoded latents are (sample - mean) * scaling_factor / std
and decoded ones latents * std / scaling_factor + mean, as diffusers' StableDiffusionXL(Img2Img)Pipeline do. Checked on
the tiny SDXL with statistics written into its VAE config: txt2img decoded images and img2img latents against diffusers
(float32, same seed: <= 1e-5 relative on latents as tests/test_sdxl.py; <= 1e-4 on decoded images in [0, 1])."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import sdrt
from sdrt.errors import ModelError
from sdrt.model.facts import ModelFacts, read_model_facts
from test_sdxl import assert_close, reference

MEAN, STD = [0.5, -0.3, 0.2, 0.1], [0.8, 1.3, 0.9, 1.1]


def with_statistics(tiny_sdxl, folder, mean=MEAN, std=STD):
    shutil.copytree(tiny_sdxl, folder)
    config = json.loads((folder / "vae" / "config.json").read_text())
    (folder / "vae" / "config.json").write_text(json.dumps(dict(config, latents_mean=mean, latents_std=std)))
    return folder


@pytest.fixture(scope="module")
def normalised(tiny_sdxl, tmp_path_factory):
    return with_statistics(tiny_sdxl, tmp_path_factory.mktemp("stats") / "sdxl")


def test_facts_carry_the_statistics_through_a_manifest(normalised, tiny_sdxl):
    facts = read_model_facts(normalised)
    assert facts.latents_mean == tuple(MEAN) and facts.latents_std == tuple(STD)
    assert ModelFacts.from_dict(json.loads(json.dumps(facts.to_dict()))) == facts
    assert "latents_mean" not in read_model_facts(tiny_sdxl).to_dict()  # older manifests stay as they were


def test_txt2img_decodes_and_img2img_encodes_as_diffusers(normalised, tiny_sdxl):
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    ref = StableDiffusionXLPipeline.from_pretrained(normalised)
    ref.set_progress_bar_config(disable=True)
    ours = sdrt.Pipeline.from_pretrained(normalised, backend="torch")
    kwargs = dict(prompt="a cat", negative_prompt="blue", num_inference_steps=3, guidance_scale=2.0, height=64, width=64)
    with torch.no_grad():
        want = ref(generator=torch.Generator().manual_seed(3), output_type="np", **kwargs).images
    latents = ours(**kwargs, seed=3, output_type="latent", progress=False).images
    got = np.clip(ours.decode(latents).transpose(0, 2, 3, 1) / 2 + 0.5, 0, 1)
    err = np.abs(got - want).max()
    assert err <= 1e-4, f"decoded image: max abs diff {err:.2e}"
    plain = sdrt.Pipeline.from_pretrained(tiny_sdxl, backend="torch")  # same weights, no statistics
    assert np.abs(np.clip(plain.decode(latents).transpose(0, 2, 3, 1) / 2 + 0.5, 0, 1) - want).max() > 1e-2

    i2i = StableDiffusionXLImg2ImgPipeline(**ref.components)
    i2i.set_progress_bar_config(disable=True)
    image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    kwargs = dict(prompt="a cat", image=image, strength=0.6, num_inference_steps=4, guidance_scale=2.0, seed=5)
    got = ours(**kwargs, output_type="latent", progress=False).images
    assert_close(got, reference(i2i, **kwargs), "img2img with latents_mean/std")
    assert np.abs(got - plain(**kwargs, output_type="latent", progress=False).images).max() > 1e-2


@pytest.mark.parametrize("mean,std,what", [([0.1, 0.2], STD, "latents_mean"), (MEAN, [1.0, 0.0, 1.0, 1.0], "latents_std")])
def test_bad_statistics_are_refused(tiny_sdxl, tmp_path, mean, std, what):
    folder = with_statistics(tiny_sdxl, tmp_path / "bad", mean, std)
    with pytest.raises(ModelError, match=f"{what} .* 4 finite numbers"):
        read_model_facts(folder)
