"""Inpainting against diffusers' StableDiffusionInpaintPipeline, same seed, on tiny random-weight models: a dedicated
9-channel inpainting UNet and an ordinary 4-channel one (latents masked per step); the ONNX export of the 9-channel
UNet; batching and a request leaving mid-run; the paste-back; bad masks.

Compared on the final latents: max|diff| <= 1e-5 * max|ref|, as tests/test_pipeline.py (measured here: <= 5e-7 at
guidance 2: the noise source equals torch's, the rest is float32 rounding in a different order).
"""

import numpy as np
import pytest
import torch
from PIL import Image

import sdrt
from sdrt.errors import InputError
from sdrt.observers import Observer

LATENT_RTOL = 1e-5
RNG = np.random.default_rng(0)
INIT = Image.fromarray((RNG.uniform(0, 1, (64, 64, 3)) * 255).astype(np.uint8))
MASK = np.zeros((64, 64), np.uint8)
MASK[16:48, 8:40] = 255


def relative(got, expected):
    return float(np.abs(got - expected).max() / np.abs(expected).max())


@pytest.fixture(scope="module")
def models(tiny_sd1, tiny_sd1_inpaint):
    """name -> (diffusers StableDiffusionInpaintPipeline, sdrt Pipeline on the PyTorch backend)."""
    from diffusers import StableDiffusionInpaintPipeline

    out = {}
    for name, folder in (("sd1-4ch", tiny_sd1), ("sd1-9ch", tiny_sd1_inpaint)):
        ref = StableDiffusionInpaintPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
        ref.set_progress_bar_config(disable=True)
        ref.original_scheduler = ref.scheduler
        out[name] = (ref, sdrt.Pipeline.from_pretrained(folder, backend="torch"))
    return out


def reference(ref, scheduler, seed, **kwargs):
    from test_pipeline import diffusers_scheduler

    ref.scheduler = diffusers_scheduler(scheduler, ref.original_scheduler.config) if scheduler else ref.original_scheduler
    with torch.no_grad():
        return ref(generator=torch.Generator("cpu").manual_seed(seed), output_type="latent", **kwargs).images.numpy()


@pytest.mark.parametrize(
    "model,scheduler,strength",
    [("sd1-9ch", None, 1.0), ("sd1-9ch", "euler_a", 0.75), ("sd1-9ch", "ddim", 0.6), ("sd1-9ch", "dpmpp_2m", 1.0),
     ("sd1-4ch", None, 1.0), ("sd1-4ch", "euler_a", 0.75), ("sd1-4ch", "dpmpp_2m", 0.6), ("sd1-4ch", "heun", 0.8)],
)  # fmt: skip
def test_inpainting_equals_diffusers(models, model, scheduler, strength):
    ref, ours = models[model]
    kwargs = dict(prompt="a dog", negative_prompt="blurry", num_inference_steps=6, guidance_scale=2.0, strength=strength)
    mask = Image.fromarray(MASK)
    expected = reference(ref, scheduler, 5, image=INIT, mask_image=mask, **kwargs)
    got = ours(image=INIT, mask_image=mask, seed=5, scheduler=scheduler, output_type="latent", progress=False, **kwargs).images
    err = relative(got, expected)
    print(f"inpaint {model} {scheduler} {strength}: max relative diff {err:.2e}")
    assert err <= LATENT_RTOL


def test_unet_sees_the_mask_channels_and_the_kept_region_is_the_image(models):
    """The 9-channel UNet gets [latents, mask, masked latents] (9 channels, from its config); the 4-channel path ends
    with the image's own latents outside the mask (decoded: near the init image there, unlike inside)."""
    _, ours = models["sd1-9ch"]
    seen = []
    real = ours.backend.run
    ours.backend.run = lambda net, feeds: (seen.append(feeds["sample"].shape) if net == "unet" else None) or real(net, feeds)
    try:
        ours("a cat", image=INIT, mask_image=MASK, num_inference_steps=2, guidance_scale=2.0, seed=1, progress=False)
    finally:
        ours.backend.run = real
    assert seen and all(s[:2] == (2, 9) for s in seen)
    assert ours.source.facts.unet_input_channels == 9 and ours.source.facts.inpainting_unet
    _, plain = models["sd1-4ch"]
    out = plain("a cat", image=INIT, mask_image=MASK, num_inference_steps=3, guidance_scale=2.0, strength=1.0, seed=1,
                output_type="latent", progress=False).images
    image_latents = plain.encode_image(np.asarray(INIT, np.float32).transpose(2, 0, 1)[None] / 127.5 - 1,
                                       [sdrt.noise.TorchCPUGenerator(1)])
    kept = MASK[::8, ::8] == 0
    assert np.array_equal(out[0][:, kept], image_latents[0][:, kept])  # the last blend puts the clean latents back


def test_batched_rows_equal_each_alone_and_a_request_leaves_mid_run(models):
    """Per-row mask data survive batching: a plan with two images and another plan share UNet calls; each row equals
    its seed alone, also after the other plan's rows leave the batch between steps (Batch.drop)."""
    _, ours = models["sd1-9ch"]
    other = MASK.copy()
    other[:, :] = 0
    other[40:, 30:] = 255
    kw = dict(image=INIT, num_inference_steps=5, guidance_scale=2.0, strength=0.8, scheduler="dpmpp_2m", output_type="latent")
    stays = ours.plan("a red cat", mask_image=MASK, seed=3, num_images_per_prompt=2, **kw)
    leaves = ours.plan("a dog", mask_image=other, seed=9, **kw)

    class LeaveAfter(Observer):
        def on_step(self, batch, step):
            if step == 1:
                batch.drop(leaves)

    plans = [leaves, stays]
    batch = ours.prepare_latents(plans, ours.encode_text(plans))
    ours.denoise(batch, [LeaveAfter()])
    (out,) = ours.finish(batch)
    for k in range(2):
        alone = ours("a red cat", mask_image=MASK, seed=3 + k, progress=False, **kw).images
        assert relative(out.images[k : k + 1], alone) <= 1e-5


def test_keep_unmasked_pastes_back_exactly_and_parameters_record_it(models):
    _, ours = models["sd1-4ch"]
    kw = dict(image=INIT, mask_image=MASK, num_inference_steps=2, guidance_scale=2.0, seed=4, output_type="np", progress=False)
    plain = ours("a cat", **kw)
    kept = ours("a cat", keep_unmasked=True, **kw)
    soft = ours("a cat", keep_unmasked=True, mask_blur=4, **kw)
    init = np.asarray(INIT)
    outside, inside = MASK == 0, MASK == 255
    assert np.array_equal(kept.images[0][outside], init[outside])
    assert np.array_equal(kept.images[0][inside], plain.images[0][inside])
    assert not np.array_equal(plain.images[0][outside], init[outside])  # without paste-back the VAE round trip shows
    far = np.zeros_like(outside)
    far[:, 56:] = True  # > 16 px from the mask: the blurred mask is 0 there
    assert np.array_equal(soft.images[0][far], init[far])
    edge = np.zeros_like(outside)
    edge[16:48, 40:42] = True  # just outside the mask: the blurred edge mixes in generated pixels
    assert not np.array_equal(soft.images[0][edge], init[edge])
    assert kept.parameters[0]["mask_coverage"] == 0.25 and plain.parameters[0]["keep_unmasked"] is False
    params = soft.parameters[0]
    assert params["inpaint"] and params["mask_blur"] == 4 and params["keep_unmasked"]
    from sdrt.images import a1111_parameters

    assert "Mask blur: 4" in a1111_parameters(params) and "Denoising strength" in a1111_parameters(params)


def test_mask_forms_are_read_as_documented(models):
    """RGB masks are greyscaled, an alpha channel holding strokes is the mask, bool/float arrays and a mask at twice
    the image's size (same shape) give the same plan as the plain L mask; a full mask is allowed."""
    _, ours = models["sd1-4ch"]
    kw = dict(image=INIT, num_inference_steps=2)
    want = ours.plan("x", mask_image=Image.fromarray(MASK), **kw).mask.binary
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 3] = MASK  # white strokes... on a transparent layer: the alpha is the mask
    big = Image.fromarray(MASK).resize((128, 128), Image.NEAREST)
    for form in (np.stack([MASK] * 3, -1), Image.fromarray(rgba), MASK > 0, MASK / 255.0, big):
        assert np.array_equal(ours.plan("x", mask_image=form, **kw).mask.binary, want)
    full = ours.plan("x", mask_image=np.full((64, 64), 255, np.uint8), **kw)
    assert full.mask.coverage == 1.0


@pytest.mark.parametrize(
    "kwargs,message",
    [(dict(mask_image=np.zeros((64, 64), np.uint8)), "all black .* nothing to repaint"),
     (dict(mask_image=np.full((32, 64), 255, np.uint8)), "mask is 64x32 but the init image is 64x64"),
     (dict(mask_image=np.full((64, 64), 2.0)), r"float mask array must hold values in \[0, 1\]"),
     (dict(mask_image=np.full((64, 64, 2), 255, np.uint8)), "mask array has shape"),
     (dict(mask_image="/nonexistent/mask.png"), "mask image /nonexistent/mask.png does not exist"),
     (dict(mask_image=MASK, mask_blur=-1), "mask_blur -1"),
     (dict(mask_image=MASK, keep_unmasked="yes"), "keep_unmasked"),
     (dict(mask_image=MASK, image=None), "mask_image needs the image"),
     (dict(keep_unmasked=True), "pass mask_image"),
     ],
)  # fmt: skip
def test_bad_masks_are_refused_before_any_network_runs(models, kwargs, message):
    _, ours = models["sd1-4ch"]
    calls = []
    real = ours.backend.run
    ours.backend.run = lambda net, feeds: calls.append(net) or real(net, feeds)
    try:
        with pytest.raises(InputError, match=message):
            ours("a cat", **{"image": INIT, **kwargs}, num_inference_steps=2, progress=False)
    finally:
        ours.backend.run = real
    assert calls == []


def test_an_inpainting_model_needs_a_mask(models):
    _, ours = models["sd1-9ch"]
    with pytest.raises(InputError, match="is an inpainting model .* mask_image="):
        ours("a cat", num_inference_steps=2, progress=False)


def test_onnx_export_of_an_inpainting_unet(models, tiny_sd1_inpaint, tmp_path_factory):
    """The export takes the UNet's 9 input channels from its config (the contract, written to the manifest) and the
    ONNX pipeline equals the PyTorch one (ORT vs torch float32: <= 1e-4 relative on the latents)."""
    from conftest import _export

    out = _export(tiny_sd1_inpaint, tmp_path_factory.mktemp("onnx") / "sd1-inpaint", check=False)  # compared below
    onnx = sdrt.Pipeline.from_pretrained(out, backend="onnx", threads=1)
    assert onnx.source.manifest.contracts["unet"].inputs[0].shape[1] == 9
    _, ours = models["sd1-9ch"]
    kw = dict(image=INIT, mask_image=MASK, num_inference_steps=4, guidance_scale=2.0, strength=0.9, seed=2,
              output_type="latent", progress=False)
    assert relative(onnx("a cat", **kw).images, ours("a cat", **kw).images) <= 1e-4


def test_cli_inpaints_with_mask_and_records_it(tiny_sd1, tmp_path, capsys):
    """`sdrt generate --image X --mask M --keep-unmasked --mask-blur N --invert-mask`: the black of M is repainted,
    the rest of X comes back exactly, and the PNG's metadata carries the inpainting parameters."""
    import json

    from sdrt.cli import main

    INIT.save(tmp_path / "in.png")
    Image.fromarray(255 - MASK).save(tmp_path / "mask.png")  # inverted on the command line
    out = tmp_path / "out.png"
    code = main(["generate", "a red cat", "-m", str(tiny_sd1), "--backend", "torch", "-o", str(out), "--steps", "2",
                 "--seed", "5", "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
                 "--keep-unmasked", "--mask-blur", "2", "--invert-mask", "--strength", "0.9", "-q"])
    assert code == 0
    image = Image.open(out)
    far = np.ones((64, 64), bool)
    far[8:56, 0:48] = False  # more than 8 px (4 sigma) from the repainted box [16:48, 8:40]
    assert np.array_equal(np.asarray(image)[far], np.asarray(INIT)[far])
    assert not np.array_equal(np.asarray(image)[MASK > 0], np.asarray(INIT)[MASK > 0])
    assert "Mask blur: 2" in image.text["parameters"] and "Denoising strength: 0.9" in image.text["parameters"]
    params = json.loads(image.text["sdrt"])
    assert params["inpaint"] and params["keep_unmasked"] and params["mask_blur"] == 2 and params["mask_coverage"] > 0.2
    assert main(["generate", "x", "-m", str(tiny_sd1), "--backend", "torch", "--invert-mask", "-o", str(tmp_path / "y.png")]) != 0
    assert "--invert-mask inverts --mask" in capsys.readouterr().err


def test_contracts_profiles_and_manifest_facts_carry_the_unet_channels():
    """TensorRT profiles and the shapes a fixed-profile backend is asked for take the UNet's 9 input channels from the
    facts (no TensorRT here: the profile is what the engine build reads); old manifests without the key read as 4."""
    import dataclasses

    from sdrt import inputs
    from sdrt.contracts import ShapeLimits, build_contracts
    from sdrt.model.facts import ModelFacts

    plain = ModelFacts("sd1", 4, 8, 0.18215, "epsilon", 3, 77, 768, 768, 512, 49408)
    facts = dataclasses.replace(plain, unet_in_channels=9)
    unet = build_contracts(facts)["unet"]
    lo, opt, hi = ShapeLimits(max_batch=2).profile(unet, facts)["sample"]
    assert lo == (1, 9, 8, 8) and opt == (2, 9, 64, 64) and hi == (4, 9, 128, 128)
    assert unet.outputs[0].shape[1] == 4 and build_contracts(plain)["unet"].inputs[0].shape[1] == 4
    assert ModelFacts.from_dict(facts.to_dict()) == facts and "unet_in_channels" not in plain.to_dict()
    assert ModelFacts.from_dict(plain.to_dict()).unet_input_channels == 4 and not plain.inpainting_unet

    class FixedProfiles:
        def check_shapes(self, wanted):
            self.wanted = wanted

    backend = FixedProfiles()
    inputs.check_export_limits(backend, facts, 1, 512, 512, True, True)
    assert backend.wanted["unet"]["sample"] == (2, 9, 64, 64) and backend.wanted["vae_encoder"]["image"] == (1, 3, 512, 512)


def test_single_file_inpainting_checkpoint_converts_and_runs(tmp_path):
    """An original-layout checkpoint whose UNet takes 9 channels converts to a StableDiffusionInpaintPipeline folder
    with the same weights, and inpaints as that folder does."""
    import json

    from test_customisation import build_ldm_tiny, component_state

    original, single = build_ldm_tiny(tmp_path / "tiny-inpaint", "sd1", inpainting=True)
    pipe = sdrt.Pipeline.from_single_file(single, cache_dir=tmp_path / "cache", image_size=64)
    folder = pipe.source.path
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionInpaintPipeline"
    assert pipe.facts.inpainting_unet and pipe.facts == sdrt.Pipeline.from_pretrained(original, backend="torch").facts
    a, b = component_state(original, "unet"), component_state(folder, "unet")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    kw = dict(image=INIT, mask_image=MASK, num_inference_steps=2, guidance_scale=2.0, seed=1, output_type="latent", progress=False)
    want = sdrt.Pipeline.from_pretrained(original, backend="torch")("a cat", **kw).images
    assert np.array_equal(pipe("a cat", **kw).images, want)


def test_info_names_an_inpainting_unet(tiny_sd1_inpaint, capsys):
    from sdrt.cli import main

    assert main(["info", str(tiny_sd1_inpaint)]) == 0
    assert "dedicated inpainting UNet (9 input channels" in capsys.readouterr().out


@pytest.mark.parametrize("content", ["latent_noise", "latent_nothing"])
def test_masked_content_sets_where_the_repainted_region_starts(models, content):
    """A1111's masked content: outside the mask the start latents are unchanged; inside, the image's latents are
    replaced by the row's initial noise (latent noise) or zeros (latent nothing) before noising to the first step."""
    _, ours = models["sd1-4ch"]
    kwargs = dict(image=INIT, mask_image=MASK, strength=0.6, num_inference_steps=5, seed=3, guidance_scale=2.0)
    runs = {}
    for c in ("original", content):
        plan = ours.plan("a dog", masked_content=c, **kwargs)
        runs[c] = ours.prepare_latents([plan], ours.encode_text([plan]))
    plain, filled = runs["original"], runs[content]
    inside = np.broadcast_to(plain.inpaint.mask, plain.x.shape) == 1
    assert inside.any() and (~inside).any()
    assert np.array_equal(filled.x[~inside], plain.x[~inside])
    a, b = plain.sched.noise_coefficients[0].tolist()
    noise = plain.inpaint.noise
    start = noise if content == "latent_noise" else np.zeros_like(noise)
    assert np.allclose(filled.x[inside], (start * a + noise * b)[inside], rtol=1e-6, atol=1e-6)
    assert np.array_equal(filled.inpaint.image, plain.inpaint.image)  # the kept region is the image's, as before
    image = ours("a dog", masked_content=content, output_type="np", progress=False, **kwargs).images
    assert image.shape == (1, 64, 64, 3)
    assert ours("a dog", masked_content=content, num_inference_steps=5, image=INIT, mask_image=MASK, strength=0.6,
                seed=3, guidance_scale=2.0, output_type="np", progress=False).parameters[0]["masked_content"] == content


def test_masked_content_is_checked():
    pipe = sdrt.Pipeline.from_pretrained(None, backend="onnx", threads=1)
    with pytest.raises(InputError, match="masked_content 'noise' is not one of original, latent_noise, latent_nothing"):
        pipe.plan("a 1", image=INIT, mask_image=MASK, masked_content="noise")
    with pytest.raises(InputError, match="apply to inpainting; pass mask_image= too"):
        pipe.plan("a 1", image=INIT, masked_content="latent_nothing")
