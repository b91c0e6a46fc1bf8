"""LCM-distilled UNets (time_cond_proj_dim): the guidance embedding `timestep_cond` through the contract, the ONNX
export and both backends, against diffusers' LatentConsistencyModelPipeline on a tiny random-weight model.

Compared on the final latents (LCM's last step returns the denoised latents, which the pipeline decodes):
max|diff| <= 1e-5 * max|ref| as tests/test_pipeline.py; PyTorch measured ~1e-7, ONNX ~1e-6 (float32 rounding order).
"""

import json

import numpy as np
import pytest
import torch

import sdrt
from sdrt.errors import InputError
from sdrt.generation import guidance_scale_embedding

pytest.importorskip("diffusers")
RTOL = 1e-5


@pytest.fixture(scope="module")
def tiny_lcm(tmp_path_factory):
    from sdrt.export.tiny import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny") / "lcm", "lcm")


@pytest.fixture(scope="module")
def reference(tiny_lcm):
    from diffusers import LatentConsistencyModelPipeline

    ref = LatentConsistencyModelPipeline.from_pretrained(tiny_lcm, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ref


def run_reference(ref, prompts, steps, guidance, seed):
    gens = [torch.Generator("cpu").manual_seed(seed + k) for k in range(len(prompts))]
    with torch.no_grad():
        return ref(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="latent").images.numpy()


def close(got, expected):
    return np.abs(got - expected).max() / np.abs(expected).max()


def test_guidance_embedding_equals_diffusers():
    """Equal to float32 rounding of the sines' arguments: w * 1000 * freq reaches 6000, where one float32 ulp is 4.9e-4
    (numpy's and torch's exp differ in the last bit of freq; measured max diff 1e-4)."""
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([1.5, 7.0, 0.0]) - 1
    for dim in (32, 33, 256):
        expected = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim).numpy()
        got = guidance_scale_embedding([1.5, 7.0, 0.0], dim)
        assert got.shape == (3, dim) and np.abs(got - expected).max() <= 5e-4


@pytest.mark.parametrize("steps,guidance", [(4, 2.0), (2, 8.5), (1, 1.0)])
def test_torch_backend_equals_diffusers_lcm_pipeline(tiny_lcm, reference, steps, guidance):
    ours = sdrt.Pipeline.from_pretrained(tiny_lcm, backend="torch")
    prompts = ["a photo of a red cat", "a dog"]
    expected = run_reference(reference, prompts, steps, guidance, seed=5)
    got = ours(prompts, num_inference_steps=steps, guidance_scale=guidance, seed=5, output_type="latent", progress=False).images
    assert ours.source.scheduler_config["_class_name"] == "LCMScheduler"
    assert close(got, expected) <= RTOL, close(got, expected)


def test_onnx_export_takes_timestep_cond_and_equals_diffusers(tiny_lcm, reference, tmp_path):
    from sdrt.contracts import ShapeLimits
    from sdrt.export.onnx_export import export_model

    out = tmp_path / "onnx"
    export_model(tiny_lcm, out, limits=ShapeLimits(min_size=64, opt_size=64, max_size=64, max_batch=2), progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    unet_inputs = [t["name"] for t in manifest["contracts"]["unet"]["inputs"]]
    assert unet_inputs == ["sample", "timestep", "encoder_hidden_states", "timestep_cond"]
    assert manifest["facts"]["time_cond_proj_dim"] == 32
    assert manifest["family"]["conditioning"] == ["encoder_hidden_states", "timestep_cond"]  # the C host refuses it by name
    ours = sdrt.Pipeline.from_pretrained(out, threads=1)
    assert ours.backend.name == "onnx"
    expected = run_reference(reference, ["a photo of a red cat"], 4, 3.0, seed=9)
    got = ours("a photo of a red cat", num_inference_steps=4, guidance_scale=3.0, seed=9, output_type="latent", progress=False).images
    assert close(got, expected) <= RTOL, close(got, expected)


def test_no_cfg_batch_and_negative_prompt_refused(tiny_lcm):
    ours = sdrt.Pipeline.from_pretrained(tiny_lcm, backend="torch")
    seen = []

    def spy(network, feeds, real=ours.backend.run):
        if network == "unet":
            seen.append((feeds["sample"].shape[0], feeds["timestep_cond"].shape))
        return real(network, feeds)

    ours.backend.run = spy
    ours(["a cat", "a dog"], num_inference_steps=3, guidance_scale=8.5, seed=1, output_type="latent", progress=False)
    assert seen == [(2, (2, 32))] * 3  # guidance through the embedding: one row per image, not [uncond; cond]
    with pytest.raises(InputError, match="negative_prompt"):
        ours("a cat", negative_prompt="blurry", num_inference_steps=2, progress=False)


# --- LCM-LoRA: a LoRA on every attention, feed-forward, resnet/sampler conv and time projection of an ordinary UNet --


def make_lcm_lora(folder, path, layout: str, rank: int = 4, seed: int = 0):
    """An LCM-LoRA-shaped file for the model in `folder`: the layers diffusers' LCM-LoRA script targets
    (sdrt.export.digits.lcm.TARGETS), random factors; layout "peft" (unet.X.lora_A/lora_B, as the digits LCM-LoRA
    ships) or "diffusers" (unet.X.lora.down/lora.up, what diffusers' save_lora_weights writes)."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from sdrt.export.digits.lcm import add_lora, lora_state

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    torch.manual_seed(seed)
    wraps = add_lora(unet, rank)
    for w in wraps.values():
        torch.nn.init.normal_(w.up.weight, std=0.1)
    state = lora_state(wraps, torch.float32)
    if layout == "diffusers":
        state = {k.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up."): v for k, v in state.items()}
    save_file(state, str(path))
    assert any(".conv1." in k for k in state) and any("downsamplers.0.conv" in k for k in state)
    return path


@pytest.mark.parametrize("layout", ["peft", "diffusers"])
def test_lcm_lora_fused_and_at_run_time_equal_diffusers(tiny_sd1, tmp_path, layout):
    """The LCM-LoRA recipe (diffusers' docs): load the LoRA, LCMScheduler, few steps, guidance 1 (no CFG batch)."""
    pytest.importorskip("peft", reason="diffusers' load_lora_weights needs peft")
    from diffusers import LCMScheduler, StableDiffusionPipeline

    path = make_lcm_lora(tiny_sd1, tmp_path / f"lcm-{layout}.safetensors", layout)
    ref = StableDiffusionPipeline.from_pretrained(tiny_sd1, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = LCMScheduler.from_config(ref.scheduler.config)
    ref.load_lora_weights(str(path))
    ref.fuse_lora(lora_scale=1.0)
    run = dict(num_inference_steps=4, guidance_scale=1.0, height=64, width=64)
    with torch.no_grad():
        expected = ref("a red cat", generator=torch.Generator().manual_seed(2), output_type="latent", **run).images.numpy()

    ours = sdrt.Pipeline.from_pretrained(tiny_sd1, backend="torch")
    runtime = ours("a red cat", seed=2, scheduler="lcm", loras={str(path): 1.0}, output_type="latent", progress=False, **run)
    plain = ours("a red cat", seed=2, scheduler="lcm", output_type="latent", progress=False, **run).images
    ours.load_lora(path, 1.0)
    fused = ours("a red cat", seed=2, scheduler="lcm", output_type="latent", progress=False, **run).images
    assert close(plain, expected) > 1e-2  # the LoRA changes the result: the comparisons below can fail
    assert close(fused, expected) <= RTOL, close(fused, expected)
    assert close(runtime.images, expected) <= RTOL, close(runtime.images, expected)


def test_lcm_distilled_sdxl_equals_diffusers_on_torch_and_onnx(tmp_path):
    """An LCM-distilled SDXL UNet (time_cond_proj_dim; LCM-SDXL): timestep_cond after SDXL's text_embeds/time_ids in
    the contract, no CFG batch; PyTorch and the ONNX export equal diffusers' StableDiffusionXLPipeline with its
    LCMScheduler on the final latents (1e-5 rel; PyTorch measured ~4e-7)."""
    from diffusers import StableDiffusionXLPipeline

    from sdrt.contracts import ShapeLimits
    from sdrt.export.onnx_export import export_model
    from sdrt.export.tiny import build_tiny_sdxl

    folder = build_tiny_sdxl(tmp_path / "lcm-sdxl", time_cond_proj_dim=32)
    ref = StableDiffusionXLPipeline.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    prompts = ["a photo of a red cat", "a dog"]
    gens = [torch.Generator("cpu").manual_seed(5 + k) for k in range(2)]
    with torch.no_grad():
        expected = ref(prompts, num_inference_steps=4, guidance_scale=4.0, generator=gens, output_type="latent").images.numpy()
    kwargs = dict(num_inference_steps=4, guidance_scale=4.0, seed=5, output_type="latent", progress=False)
    got = sdrt.Pipeline.from_pretrained(folder, backend="torch")(prompts, **kwargs).images
    assert close(got, expected) <= RTOL, close(got, expected)
    out = tmp_path / "onnx"
    export_model(folder, out, limits=ShapeLimits(min_size=64, opt_size=64, max_size=64, max_batch=2), progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    names = [t["name"] for t in manifest["contracts"]["unet"]["inputs"]]
    assert names == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids", "timestep_cond"]
    got = sdrt.Pipeline.from_pretrained(out, threads=1)(prompts, **kwargs).images
    assert close(got, expected) <= RTOL, close(got, expected)
