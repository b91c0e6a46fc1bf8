"""Run-time LoRAs (issue 18): one export with LoRA slots, LoRAs switched per call on ONNX Runtime and PyTorch.

Checked on the tiny SD 1.x model against diffusers' load_lora_weights + fuse_lora and against sdrt's own fused
weights (W + scale * delta): every format (kohya incl. LoCon, diffusers/PEFT, older diffusers, LoHa, LoKr), two
LoRAs stacked, scales 0 / 0.5 / 1.5, the no-bleed sequence plain -> A -> B -> none (bit-equal to plain), refusals
(another model's LoRA names its layer; a corrupt file), the prompt syntax and the plan's batch key."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import sdrt
from sdrt.adapters.prompt_loras import parse_prompt_loras
from sdrt.cli import main as cli_main
from sdrt.errors import InputError, ModelError
from sdrt.model.manifest import read_manifest

from conftest import _export
from test_customisation import TEXT_TARGETS, UNET_TARGETS, assert_close, diffusers_pipe, layer_shapes, make_lora, reference_latents

RUN = dict(num_inference_steps=4, guidance_scale=2.0, height=64, width=64)
BOUND = 2e-5  # run-time factors vs fused weights: float summation order only


def latents(pipe, prompt="a photo of a cat", **kw):
    return pipe(prompt, seed=5, output_type="latent", progress=False, **RUN, **kw).images


@pytest.fixture(scope="module")
def slots_export(onnx_sd1_slots):
    return onnx_sd1_slots


@pytest.fixture(scope="module")
def pipes(tiny_sd1, slots_export):
    return {"onnx": sdrt.Pipeline.from_pretrained(slots_export, backend="onnx"),
            "torch": sdrt.Pipeline.from_pretrained(tiny_sd1, backend="torch")}


def make_lycoris(folder, kind, rank=2, seed=0):
    """A random kohya-named LyCORIS file (LoHa or LoKr) on the same layers as make_lora, convs included."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g) * 0.3  # noqa: E731
    state = {}
    for component, targets in (("unet", UNET_TARGETS), ("text_encoder", TEXT_TARGETS)):
        for name, shape in layer_shapes(folder, component).items():
            if not name.endswith(targets):
                continue
            key = ("lora_unet_" if component == "unet" else "lora_te_text_model_") + name.replace(".", "_")
            out, inp, k = shape[0], shape[1], int(np.prod(shape[2:]))
            if kind == "loha":
                state.update({key + ".hada_w1_a": rnd(out, rank), key + ".hada_w1_b": rnd(rank, inp * k),
                              key + ".hada_w2_a": rnd(out, rank), key + ".hada_w2_b": rnd(rank, inp * k)})
            else:  # w1 full [2, 2], w2 decomposed
                state.update({key + ".lokr_w1": rnd(2, 2), key + ".lokr_w2_a": rnd(out // 2, rank),
                              key + ".lokr_w2_b": rnd(rank, inp // 2 * k)})
            state[key + ".alpha"] = torch.tensor(1.0)
    path = folder.parent / f"{folder.name}-{kind}-{seed}.safetensors"
    save_file(state, str(path))
    return path


def fused_torch(folder, loras):
    """A PyTorch pipeline with `loras` [(file, scale)] fused into its weights (sdrt's fusing, exact deltas)."""
    pipe = sdrt.Pipeline.from_pretrained(folder, backend="torch")
    for path, scale in loras:
        pipe.load_lora(path, scale)
    return pipe


def test_export_records_slots(slots_export):
    manifest = read_manifest(slots_export)
    assert manifest.extras["lora_slots"]["set"] == "all"
    unet = manifest.contracts["unet"]
    layers = {s.layer for s in unet.lora_slots}
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" in layers
    assert "down_blocks.0.resnets.0.conv1" in layers and any(s.upsample for s in unet.lora_slots)
    assert manifest.extras["lora_slots"]["layers"] == {"text_encoder": len(manifest.contracts["text_encoder"].lora_slots),
                                                        "unet": len(layers)}
    assert unet.input_names[:3] == ["sample", "timestep", "encoder_hidden_states"]
    assert len(unet.inputs) == 3 + 2 * len(layers)
    assert unet.input_names[3].startswith("lora_down/")  # a name ORT's TensorRT provider can take in its profiles
    import onnx

    graph = onnx.load(str(slots_export / "unet" / "model.onnx"), load_external_data=False).graph
    gates = [n for n in graph.node if n.op_type == "If"]  # every slot's branch runs only at rank > 0
    assert len(gates) == len(layers) and not any(n.op_type == "MatMul" and n.input[1].startswith("lora_") for n in graph.node)


def test_slot_names_of_older_exports_and_tensorrt_profiles():
    """Exports from before the "/" name slots lora_down:<layer> (no "sep" in their manifest): read as they are; ORT's
    TensorRT provider cuts profile entries at the first ':', so those are left out of its shape strings."""
    from sdrt.backends.onnx_providers import shape_string
    from sdrt.contracts import LoraSlot

    new = LoraSlot("mid.to_q", (8, 4))
    old = LoraSlot.from_dict({"layer": "mid.to_q", "weight": [8, 4]})
    assert [s.name for s in new.specs()] == ["lora_down/mid.to_q", "lora_up/mid.to_q"]
    assert [s.name for s in old.specs()] == ["lora_down:mid.to_q", "lora_up:mid.to_q"]
    assert LoraSlot.from_dict(new.to_dict()) == new
    shapes = {"sample": (1, 4), "lora_down:mid.to_q": (0, 4), "lora_down/mid.to_q": (16, 4)}
    assert shape_string(shapes) == "sample:1x4,lora_down/mid.to_q:16x4"


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_runtime_lora_equals_diffusers_on_onnx_and_torch(tiny_sd1, pipes, layout):
    pytest.importorskip("peft", reason="diffusers' load_lora_weights needs peft")
    path, _ = make_lora(tiny_sd1, layout, seed=11)
    ref = diffusers_pipe(tiny_sd1)
    ref.load_lora_weights(str(path))
    ref.fuse_lora(lora_scale=0.7)
    expected = reference_latents(ref, "a photo of a cat")
    for backend, pipe in pipes.items():
        got = latents(pipe, loras={str(path): 0.7})
        assert_close(got, expected, BOUND, f"{layout} LoRA at run time on {backend}")


def test_no_bleed_switching_and_stacking(tiny_sd1, pipes):
    a, _ = make_lora(tiny_sd1, "kohya", seed=21)
    b, _ = make_lora(tiny_sd1, "diffusers", seed=22)
    for backend, pipe in pipes.items():
        pipe.register_lora(a, name="a")
        pipe.register_lora(b, name="b")
        plain = latents(pipe)
        first_a = latents(pipe, loras={"a": 1.0})
        assert not np.allclose(first_a, plain, atol=1e-4)
        latents(pipe, loras={"b": 0.5})
        none = latents(pipe)
        assert np.array_equal(none, plain), f"{backend}: LoRA-free call after A and B differs from the first"
        assert np.array_equal(latents(pipe, loras={"a": 1.0}), first_a), f"{backend}: A after B differs"
        assert np.array_equal(latents(pipe, loras={"a": 0.0}), plain), f"{backend}: scale 0 is not plain"
        stacked = latents(pipe, loras={"a": 0.5, "b": 1.5})
        if backend == "onnx":
            onnx_stacked = stacked
    fused = fused_torch(tiny_sd1, [(a, 0.5), (b, 1.5)])
    assert_close(onnx_stacked, latents(fused), BOUND, "two LoRAs stacked (0.5, 1.5) vs fused")
    assert_close(stacked, latents(fused), BOUND, "torch hooks, two LoRAs stacked vs fused")


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_lycoris_formats(tiny_sd1, pipes, kind):
    path = make_lycoris(tiny_sd1, kind, seed=31)
    expected = latents(fused_torch(tiny_sd1, [(path, 1.5)]))  # fused: the exact LyCORIS delta
    for backend, pipe in pipes.items():
        name = pipe.register_lora(path)
        assert pipe.registered_loras[name].svd_error < 1e-5  # the tiny layers' exact rank fits: no truncation
        assert_close(latents(pipe, loras={name: 1.5}), expected, BOUND, f"{kind} on {backend}")


def test_older_diffusers_layout_and_locon(tiny_sd1, pipes):
    """The attention-processor layout and a kohya LoCon (conv layers incl. an upsampler) give the fused result."""
    g = torch.Generator().manual_seed(41)
    shapes = layer_shapes(tiny_sd1, "unet")
    state = {}
    block = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    for proj, module in (("to_q_lora", "to_q"), ("to_out_lora", "to_out.0")):
        out, inp = shapes[f"{block}.{module}"]
        state[f"unet.{block}.processor.{proj}.down.weight"] = torch.randn(4, inp, generator=g) * 0.3
        state[f"unet.{block}.processor.{proj}.up.weight"] = torch.randn(out, 4, generator=g) * 0.3
    old = tiny_sd1.parent / "old-processor-lora.safetensors"
    save_file(state, str(old))
    up = next(n for n in shapes if "upsamplers" in n and n.endswith("conv"))
    locon = {}
    for name in (up, "up_blocks.1.resnets.0.conv_shortcut", "down_blocks.0.downsamplers.0.conv"):
        if name not in shapes:
            continue
        shape = shapes[name]
        key = "lora_unet_" + name.replace(".", "_")
        locon[key + ".lora_down.weight"] = torch.randn(3, *shape[1:], generator=g) * 0.3
        locon[key + ".lora_up.weight"] = torch.randn(shape[0], 3, 1, 1, generator=g) * 0.3
        locon[key + ".alpha"] = torch.tensor(3.0)
    conv = tiny_sd1.parent / "locon.safetensors"
    save_file(locon, str(conv))
    expected = latents(fused_torch(tiny_sd1, [(old, 1.0), (conv, 0.8)]))
    for backend, pipe in pipes.items():
        assert_close(latents(pipe, loras={str(old): 1.0, str(conv): 0.8}), expected, BOUND, f"old layout + LoCon on {backend}")


def test_refusals(tiny_sd1, pipes, tmp_path):
    bad = tmp_path / "other-model.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 48),
               "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(32, 4)}, str(bad))
    path, _ = make_lora(tiny_sd1, "kohya", seed=51)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    for backend, pipe in pipes.items():
        with pytest.raises(ModelError, match="attn1.to_q"):
            pipe.register_lora(bad)
        with pytest.raises(ModelError):
            pipe.register_lora(corrupt)
        with pytest.raises(InputError, match="neither a registered name"):
            pipe.plan("a cat", loras={"nothing-here": 1.0})
        with pytest.raises(InputError, match="finite"):
            pipe.plan("a cat", loras={str(path): float("nan")})
        assert "other-model" not in pipe.registered_loras and "corrupt" not in pipe.registered_loras


def test_plain_export_refuses_and_plan_key(onnx_sd1, pipes, tiny_sd1):
    plain = sdrt.Pipeline.from_pretrained(onnx_sd1, backend="onnx")
    path, _ = make_lora(tiny_sd1, "kohya", seed=61)
    with pytest.raises(ModelError, match="--lora-slots"):
        plain.register_lora(path)
    pipe = pipes["onnx"]
    pipe.register_lora(path, name="x")
    p1, p2, p3 = (pipe.plan("a cat", loras=lo) for lo in ({"x": 0.5}, [("x", 0.5)], None))
    assert p1.loras == p2.loras == (("x", 0.5),) and p1.batch_key == p2.batch_key != p3.batch_key


def test_parse_prompt_loras():
    assert parse_prompt_loras("a castle <lora:style:0.8>, <lora:detail:0.4> at dusk") == (
        "a castle, at dusk", {"style": 0.8, "detail": 0.4})
    assert parse_prompt_loras("<lyco:x> a dog <lora:x:0.5>") == ("a dog", {"x": 1.5})
    assert parse_prompt_loras("no tags") == ("no tags", {})
    with pytest.raises(InputError):
        parse_prompt_loras("a <lora:x:0.5:0.2> cat")
    with pytest.raises(InputError):
        parse_prompt_loras("a <lora:x:big> cat")


def test_cli_generate_with_loras_on_onnx(slots_export, tiny_sd1, tmp_path):
    a, _ = make_lora(tiny_sd1, "kohya", seed=71)
    b = make_lycoris(tiny_sd1, "loha", seed=72)
    out = tmp_path / "img.png"
    assert cli_main(["generate", "a cat", "-m", str(slots_export), "--backend", "onnx", "--lora", f"{a}:0.8",
                     "--lora", str(b), "--steps", "2", "-W", "64", "-H", "64", "-o", str(out), "-q"]) == 0
    assert out.exists()


def test_fp16_export_with_slots(tiny_sd1, pipes, tmp_path):
    """An fp16 export keeps float32 slot inputs: LoRAs switch there too (fp16 tolerance) and leave no trace."""
    out = _export(tiny_sd1, tmp_path / "fp16", lora_slots="all", fp16=True)
    path, _ = make_lora(tiny_sd1, "kohya", seed=81)
    pipe = sdrt.Pipeline.from_pretrained(out, backend="onnx")
    plain = latents(pipe)
    assert_close(latents(pipe, loras={str(path): 1.0}), latents(pipes["torch"], loras={str(path): 1.0}), 5e-3, "fp16")
    assert np.array_equal(latents(pipe), plain)


def test_fp16_conversion_of_a_gated_export(slots_export, tmp_path):
    """`sdrt build --fp16` converts fp32 exports (sdrt.export.fp16.convert_file): the slots' If gates are undone for
    the converter (it knows no subgraphs) and made again; the fp16 UNet stays within fp16 error of the fp32 one, with
    and without LoRA factors (5e-3 of the output's range: fp16 graphs measured 5e-4..2e-3)."""
    import onnx
    import onnxruntime as ort

    from sdrt.export.fp16 import convert_file

    src = slots_export / "unet" / "model.onnx"
    convert_file(src, tmp_path / "unet16.onnx")
    onnx.checker.check_model(str(tmp_path / "unet16.onnx"))
    gates = lambda path: sum(n.op_type == "If" for n in onnx.load(str(path), load_external_data=False).graph.node)  # noqa: E731
    assert gates(tmp_path / "unet16.onnx") == gates(src) > 0
    contract = read_manifest(slots_export).contracts["unet"]
    for rank in (0, 2):
        feeds = contract.sample_inputs({"unet_batch": 2, "latent_height": 8, "latent_width": 8, "lora_rank": rank})
        want, got = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
                     for p in (src, tmp_path / "unet16.onnx"))
        assert np.abs(got - want).max() / np.abs(want).max() <= 5e-3, rank
