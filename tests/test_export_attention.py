"""The int8 export's ONNX Runtime CPU forms of the UNet's transformer blocks: self-attention as ORT's fused
MultiHeadAttention (sdrt.export.attention) and GEGLU as two MatMuls (sdrt.export.geglu).

Tolerance: the fused kernel computes the same softmax(Q K^T / sqrt(d)) V in fp32 in another order (scores per head
block, its own exp), and the split GEGLU the same products, so the UNet's output may differ from the stock graph's by
float rounding only: 1e-5 of its range (the export parity check's fp32 bar is 1e-4); a wrong head split, scale,
transpose or half gives errors of order 1.
"""

import re

import numpy as np
import pytest


def _tiny_unet():
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    ).eval()  # fmt: skip


def _args():
    import torch

    return torch.randn(2, 4, 16, 16), torch.tensor([10.0, 10.0]), torch.randn(2, 7, 32)


def _export(unet, path, cpu_forms: bool) -> int:
    import torch

    from sdrt.export.attention import fused_self_attention
    from sdrt.export.geglu import split_geglu

    args = _args()
    axes = {"sample": {0: "b", 2: "h", 3: "w"}, "timestep": {0: "b"}, "encoder_hidden_states": {0: "b", 1: "t"}}
    with fused_self_attention(unet, enabled=cpu_forms) as n, split_geglu(unet, cpu_forms) as g, torch.no_grad():
        assert g == n  # one GEGLU per transformer block
        torch.onnx.export(unet, args, str(path), dynamo=False, opset_version=17, dynamic_axes=axes,
                          input_names=list(axes), output_names=["out_sample"])
    return n


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("attn")
    unet = _tiny_unet()
    n = _export(unet, folder / "fused.onnx", True)
    _export(unet, folder / "stock.onnx", False)
    return folder, n, sum(1 for name, _ in unet.named_modules() if name.endswith(".attn1"))


def test_fused_graph_matches_the_stock_one(graphs):
    import onnxruntime as ort

    folder, n, self_attentions = graphs
    assert n == self_attentions > 0
    rng = np.random.default_rng(1)
    # another batch, size and token count than the export's example
    feeds = {"sample": rng.standard_normal((3, 4, 24, 16), dtype=np.float32), "timestep": np.full(3, 500.0, np.float32),
             "encoder_hidden_states": rng.standard_normal((3, 9, 32), dtype=np.float32)}
    out = {k: ort.InferenceSession(str(folder / f"{k}.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
           for k in ("fused", "stock")}
    err = np.abs(out["fused"] - out["stock"]).max() / np.abs(out["stock"]).max()
    assert err < 1e-5, err


def test_only_self_attention_is_fused_and_cross_attention_kv_stay_matmuls(graphs):
    import onnx

    folder, n, _ = graphs
    graph = onnx.load(str(folder / "fused.onnx")).graph
    mha = [x for x in graph.node if x.op_type == "MultiHeadAttention"]
    assert len(mha) == n and all(x.domain == "com.microsoft" and "/attn1" in x.input[0] for x in mha)
    assert {a.name: a.i for x in mha for a in x.attribute} == {"num_heads": 8}  # SD 1.x: attention_head_dim is heads
    # the run-time split of the UNet finds cross-attention K/V as MatMuls on encoder_hidden_states
    kv = [x for x in graph.node if x.op_type == "MatMul" and "encoder_hidden_states" in x.input]
    assert len(kv) == 2 * n and all(re.search(r"/attn2/to_[kv]/", x.name) for x in kv)
    assert not any(x.op_type == "Softmax" and "/attn1/" in x.name for x in graph.node)
    assert any(x.op_type == "Softmax" and "/attn2/" in x.name for x in graph.node)
    # GEGLU: two MatMuls on stored weights under the module's scope (the int8 keep rules' role), no Slice
    stored = {i.name for i in graph.initializer}
    geglu = [x for x in graph.node if "/ff/net.0/" in x.name]
    assert sum(x.op_type == "MatMul" and x.input[1] in stored for x in geglu) == 2 * n
    assert not any(x.op_type in ("Slice", "Split") for x in geglu)


def test_only_attentions_with_enough_tokens_at_the_opt_size_are_fused():
    from sdrt.export.attention import fused_self_attention

    unet = _tiny_unet()  # example 16x16 latents: 256 tokens in the level-0 blocks (3 attentions), 64 in the mid block
    for opt_scale, min_tokens, expected in ((1.0, 256, 3), (2.0, 256, 4), (1.0, 257, 0), (0.5, 64, 3)):
        with fused_self_attention(unet, _args(), opt_scale, min_tokens=min_tokens) as n:
            assert n == expected, (opt_scale, min_tokens, n)
    assert not any(type(m.processor).__name__ == "FusedSelfAttention" for m in unet.modules() if hasattr(m, "processor"))



def test_fused_graph_splits_at_the_cross_attention_kv(graphs, tmp_path):
    """The step split (sdrt.export.step_split) still moves the cross-attention K/V MatMuls to its prepass, and
    prepass + step equal the whole fused graph."""
    import shutil

    import onnx
    import onnxruntime as ort

    from sdrt.export.step_split import write_step_split

    folder, n, _ = graphs
    whole = tmp_path / "model.onnx"
    shutil.copy(folder / "fused.onnx", whole)
    record = write_step_split(whole)
    assert record and record["carried"] >= 2 * n
    prepass = onnx.load(str(tmp_path / record["prepass"]), load_external_data=False).graph
    assert sum(x.op_type == "MatMul" and re.search(r"/attn2/to_[kv]/", x.name) is not None for x in prepass.node) == 2 * n
    rng = np.random.default_rng(2)
    feeds = {"sample": rng.standard_normal((2, 4, 16, 16), dtype=np.float32), "timestep": np.full(2, 300.0, np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 7, 32), dtype=np.float32)}
    sessions = {k: ort.InferenceSession(str(tmp_path / f), providers=["CPUExecutionProvider"])
                for k, f in (("whole", "model.onnx"), ("prepass", record["prepass"]), ("step", record["step"]))}
    pre = sessions["prepass"]
    pre_feeds = {i.name: feeds[i.name] for i in pre.get_inputs()}
    carried = dict(zip([o.name for o in pre.get_outputs()], pre.run(None, pre_feeds)))
    step_feeds = {i.name: {**feeds, **carried}[i.name] for i in sessions["step"].get_inputs()}
    got, ref = sessions["step"].run(None, step_feeds)[0], sessions["whole"].run(None, feeds)[0]
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
