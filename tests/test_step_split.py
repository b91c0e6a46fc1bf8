"""The UNet's step split (sdrt.export.step_split, sdrt.backends.onnx_split): the step-invariant prepass once per
generation, the step graph every step, against model.onnx run whole.

The two halves run the same nodes on the same values, so the results are compared for equality up to ORT's own
float reordering (1e-6 of the output's range: a fused MatMul may sum in another order across the cut)."""

import numpy as np
import pytest

from sdrt.backends.onnx_backend import OnnxBackend
from sdrt.model.manifest import read_manifest

TOLERANCE = 1e-6  # of the output's range (module docstring)


def backends(export, **options):
    manifest = read_manifest(export)
    # static_shapes=False: the tiny models are "small networks", which keep model.onnx (shape-specialised sessions)
    whole = OnnxBackend(export, manifest, threads=1, static_shapes=False, step_split=False, **options)
    split = OnnxBackend(export, manifest, threads=1, static_shapes=False, **options)
    return whole, split


def unet_feeds(backend, seed=0, batch=2, size=8):
    contract = backend.contracts["unet"]
    dims = {"unet_batch": batch, "batch": batch, "latent_height": size, "latent_width": size}
    feeds = contract.sample_inputs({**dims, "lora_rank": 0}, seed)
    return {s.name: feeds[s.name] for s in contract.plain_inputs}


def assert_close(a, b):
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= TOLERANCE * max(1.0, np.abs(a).max())


@pytest.mark.parametrize("fixture", ["onnx_sd1", "onnx_sdxl"])
def test_split_equals_whole_and_runs_the_prepass_once_per_context(fixture, request):
    export = request.getfixturevalue(fixture)
    record = read_manifest(export).networks["unet"]["step_split"]
    assert record["carried"] > 0
    whole, split = backends(export)
    assert "unet" in split.splits and not whole.splits
    assert "step-invariant prepass for unet" in split.describe()
    feeds = unet_feeds(whole)
    state = split.splits["unet"]
    for step, t in enumerate([900.0, 500.0, 100.0]):  # a denoising loop: new sample and timestep, same text
        feeds = {**feeds, "sample": np.random.default_rng(step).standard_normal(feeds["sample"].shape).astype(np.float32),
                 "timestep": np.full_like(feeds["timestep"], t)}
        assert_close(whole.run("unet", feeds)["out_sample"], split.run("unet", dict(feeds))["out_sample"])
    assert state.prepass_runs == 1
    other = {**feeds, "encoder_hidden_states": feeds["encoder_hidden_states"] + 0.5}  # another prompt
    assert_close(whole.run("unet", other)["out_sample"], split.run("unet", other)["out_sample"])
    assert state.prepass_runs == 2
    feeds["encoder_hidden_states"][:] += 0.25  # the same array changed in place: compared by value, not identity
    assert_close(whole.run("unet", feeds)["out_sample"], split.run("unet", feeds)["out_sample"])
    assert state.prepass_runs == 3
    split.forget_fixed_inputs()  # what the bench does before each run: the same text pays for its prepass again
    split.run("unet", feeds)
    assert state.prepass_runs == 4
    single = unet_feeds(whole, seed=3, batch=1)  # another batch size (guidance 0)
    assert_close(whole.run("unet", single)["out_sample"], split.run("unet", single)["out_sample"])


def test_split_with_run_time_lora_factors(onnx_sd1_slots):
    """LoRA slots on to_k/to_v feed the prepass; switching factors is a new set of fixed inputs."""
    whole, split = backends(onnx_sd1_slots)
    contract = whole.contracts["unet"]
    rng = np.random.default_rng(1)
    factors = {}
    for slot in contract.lora_slots:
        if slot.layer.endswith(("attn2.to_k", "attn2.to_v", "attn1.to_q", "proj_in")) and not slot.conv:
            out, inp = slot.weight
            factors[slot.layer] = (0.1 * rng.standard_normal((2, inp)), 0.1 * rng.standard_normal((out, 2)))
    assert any(layer.endswith("attn2.to_k") for layer in factors)
    feeds = unet_feeds(whole)
    plain = split.run("unet", feeds)["out_sample"]
    for backend in (whole, split):
        backend.set_lora_factors("unet", factors)
    adapted = split.run("unet", feeds)["out_sample"]
    assert np.abs(adapted - plain).max() > 1e-3  # the factors changed the result...
    assert_close(whole.run("unet", feeds)["out_sample"], adapted)  # ...as the whole graph computes them
    assert split.splits["unet"].prepass_runs == 2


def test_split_generation_matches_whole(onnx_sdxl):
    """A whole SDXL generation (guided, 3 steps) is the same image either way."""
    from sdrt.pipeline import Pipeline

    images = []
    for step_split in (False, True):
        pipe = Pipeline.from_pretrained(onnx_sdxl, backend="onnx", threads=1, static_shapes=False, step_split=step_split)
        out = pipe(prompt="a red fox", num_inference_steps=3, guidance_scale=2.0, seed=7, height=64, width=64, progress=False)
        images.append(np.asarray(out.images, np.int16))
    assert np.abs(images[0] - images[1]).max() <= 1


def test_graph_without_step_invariant_multiplies_is_not_split():
    """Only a prepass with a multiply in it is worth a second session; control flow reading outer names is followed."""
    from onnx import TensorProto, helper

    from sdrt.export.step_split import split_step_invariant

    def model(nodes, inits=()):
        inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 4]) for n in ("sample", "timestep", "context")]
        out = helper.make_tensor_value_info("out_sample", TensorProto.FLOAT, [2, 4])
        return helper.make_model(helper.make_graph(nodes, "g", inputs, [out], list(inits)))

    cheap = model([helper.make_node("Add", ["context", "timestep"], ["a"]), helper.make_node("Mul", ["a", "sample"], ["out_sample"])])
    assert split_step_invariant(cheap) is None
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.eye(4, dtype=np.float32).ravel())
    kv = model([helper.make_node("MatMul", ["context", "w"], ["k"]), helper.make_node("Relu", ["k"], ["kr"]),
                helper.make_node("Add", ["kr", "sample"], ["s"]), helper.make_node("Mul", ["s", "timestep"], ["out_sample"])], [w])
    split = split_step_invariant(kv)
    assert split.carried == ["kr"]
    assert [n.op_type for n in split.prepass.graph.node] == ["MatMul", "Relu"]
    assert [n.op_type for n in split.step.graph.node] == ["Add", "Mul"]
    assert [i.name for i in split.step.graph.input] == ["sample", "timestep", "kr"]
    assert [t.name for t in split.step.graph.initializer] == []
    import onnxruntime as ort

    feeds = {n: np.random.default_rng(i).standard_normal((2, 4)).astype(np.float32) for i, n in enumerate(("sample", "timestep", "context"))}
    whole = ort.InferenceSession(kv.SerializeToString()).run(None, feeds)[0]
    kr = ort.InferenceSession(split.prepass.SerializeToString()).run(None, {"context": feeds["context"]})[0]
    split.step.graph.input[2].type.tensor_type.elem_type = TensorProto.FLOAT  # what write_step_split reads from ORT
    step = ort.InferenceSession(split.step.SerializeToString()).run(None, {"sample": feeds["sample"], "timestep": feeds["timestep"], "kr": kr})[0]
    np.testing.assert_array_equal(whole, step)
