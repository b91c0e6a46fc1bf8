"""Run-time LoRAs on SDXL (issue 18): the UNet and both text encoders exported with LoRA slots, LoRAs switched per
call (`loras=`) on ONNX Runtime and PyTorch, equal to the same LoRAs fused into the weights (load_lora).

LoRAs: kohya as sd-scripts writes SDXL's (lora_unet_ in the original LDM layout, lora_te1_/lora_te2_) and diffusers
keys (unet., text_encoder., text_encoder_2.), stacked. Tolerances: PyTorch hooks vs fused weights differ by float
summation order only (1e-5 of the latents' range); ONNX vs PyTorch as the plain SDXL export (1e-4: per-network
parity is ~1e-6, four steps of Euler amplify it)."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import sdrt

from conftest import _export
from test_sdxl import make_sdxl_kohya_lora

ARGS = dict(prompt="a red cat", negative_prompt="blue", num_inference_steps=4, guidance_scale=2.0, height=64, width=64,
            seed=1, output_type="latent", progress=False)


def rel(got, want):
    return float(np.abs(got - want).max() / np.abs(want).max())


def make_diffusers_lora(pipe, path, seed=3, rank=2):
    """diffusers/PEFT keys (no metadata: alpha = rank) on a UNet attention and conv layer and one layer per encoder."""
    from sdrt.adapters.lora import weight_shapes

    layers = {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"),
              "unet.up_blocks.1.resnets.0.conv2": ("unet", "up_blocks.1.resnets.0.conv2"),
              "text_encoder.text_model.encoder.layers.1.mlp.fc2": ("text_encoder", "encoder.layers.1.mlp.fc2"),
              "text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj": ("text_encoder_2", "encoder.layers.0.self_attn.k_proj")}
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, (network, name) in layers.items():
        module = pipe.backend.modules[network]
        shape = weight_shapes(module.unet if network == "unet" else module)[name]
        kernel = tuple(shape[2:])
        state[key + ".lora_A.weight"] = torch.randn(rank, shape[1], *kernel, generator=g) * 0.3
        state[key + ".lora_B.weight"] = torch.randn(shape[0], rank, *((1, 1) if kernel else ()), generator=g) * 0.3
    save_file(state, str(path))


@pytest.fixture(scope="module")
def setup(tiny_sdxl, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl-loras")
    torch_pipe = sdrt.Pipeline.from_pretrained(tiny_sdxl, backend="torch")
    kohya = folder / "kohya.safetensors"
    make_sdxl_kohya_lora(torch_pipe, kohya, ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "mid_block.resnets.1.conv1",
                                             "up_blocks.0.upsamplers.0.conv", "down_blocks.0.downsamplers.0.conv"],
                         [("lora_te1", "text_encoder", "encoder.layers.0.self_attn.q_proj"),
                          ("lora_te2", "text_encoder_2", "encoder.layers.1.mlp.fc1")], seed=4)
    diffusers = folder / "diffusers.safetensors"
    make_diffusers_lora(torch_pipe, diffusers)
    export = _export(tiny_sdxl, tmp_path_factory.mktemp("onnx-slots") / "sdxl", lora_slots="all")
    return torch_pipe, export, kohya, diffusers


def test_sdxl_runtime_loras_equal_fused_on_onnx_and_torch(tiny_sdxl, setup):
    torch_pipe, export, kohya, diffusers = setup
    loras = {str(kohya): 0.7, str(diffusers): 0.5}
    fused = sdrt.Pipeline.from_pretrained(tiny_sdxl, backend="torch")
    fused.load_lora(kohya, 0.7)
    fused.load_lora(diffusers, 0.5)
    want = fused(**ARGS).images

    plain_torch = torch_pipe(**ARGS).images
    got_torch = torch_pipe(**ARGS, loras=loras).images
    assert rel(got_torch, want) <= 1e-5, f"torch hooks vs fused: {rel(got_torch, want):.2e}"
    assert rel(got_torch, plain_torch) > 1e-2  # the LoRAs did something
    assert np.array_equal(torch_pipe(**ARGS).images, plain_torch), "torch: a LoRA-free call after LoRAs differs"

    onnx = sdrt.Pipeline.from_pretrained(export, backend="onnx", threads=1)
    slots = {n: len(onnx.backend.lora_slots(n)) for n in ("text_encoder", "text_encoder_2", "unet")}
    assert all(slots.values()), slots
    plain_onnx = onnx(**ARGS).images
    got_onnx = onnx(**ARGS, loras=loras).images
    assert rel(got_onnx, got_torch) <= 1e-4, f"onnx vs torch with LoRAs: {rel(got_onnx, got_torch):.2e}"
    assert rel(plain_onnx, plain_torch) <= 1e-4
    only_te = onnx(**ARGS, loras={str(diffusers): 0.5}).images  # another set: switched, then none again
    assert not np.array_equal(only_te, got_onnx)
    assert np.array_equal(onnx(**ARGS).images, plain_onnx), "onnx: a LoRA-free call after LoRAs differs"


def test_sdxl_lora_on_sd1_slots_is_refused(onnx_sd1_slots, setup):
    _, _, kohya, _ = setup
    pipe = sdrt.Pipeline.from_pretrained(onnx_sd1_slots, backend="onnx", threads=1)
    with pytest.raises(sdrt.errors.ModelError, match="SDXL"):
        pipe.register_lora(kohya)
