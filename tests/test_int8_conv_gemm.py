"""int8 convs as im2col + one int8 GEMM (sdrt.export.int8_conv_gemm): the rewrite computes what the QDQ graph it
replaces computes, for every conv form the exporter writes, at every image size.

Reference: the QDQ graph before the rewrite, quantised without the convs' output rounding and run by ONNX Runtime
with graph optimisations off, so each quantised conv runs as DequantizeLinear + a float Conv: the same integer values
and scales, summed in float. The rewrite sums them in int32 (exact) and scales once, so the two differ by float
rounding only: 1e-5 of the output's range. The exports quantise conv outputs (QLinearConv needs it); the rewrite
bypasses that rounding, which the second test checks against the same reference.
"""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from sdrt.export.int8_conv_gemm import convs_as_int8_gemm  # noqa: E402

# (name, weight shape, attributes): the forms sdrt's exports hold (3x3 same-size, stride-2 downsampler, 1x1
# shortcut/proj, an asymmetric pad) and two the rewrite must leave alone (grouped, dilated).
CONVS = [
    ("same3x3", (8, 4, 3, 3), {"pads": [1, 1, 1, 1]}),
    ("down3x3", (8, 8, 3, 3), {"pads": [1, 1, 1, 1], "strides": [2, 2]}),
    ("shortcut1x1", (6, 8, 1, 1), {}),
    ("asym2x2", (6, 6, 2, 2), {"pads": [0, 0, 1, 1]}),
    ("grouped", (6, 3, 3, 3), {"pads": [1, 1, 1, 1], "group": 2}),
    ("dilated", (5, 6, 3, 3), {"pads": [2, 2, 2, 2], "dilations": [2, 2]}),
]
REWRITTEN = {"same3x3", "down3x3", "shortcut1x1", "asym2x2"}


def _float_model(path):
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i, (name, shape, attrs) in enumerate(CONVS):
        inits += [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.3, f"w{i}"),
                  numpy_helper.from_array(rng.standard_normal(shape[0]).astype(np.float32), f"b{i}")]
        out = f"y{i}" if i == len(CONVS) - 1 else f"h{i}"
        nodes.append(helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], name=name, **attrs))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [out], name=f"relu{i}"))  # between convs: float
        prev = out
    graph = helper.make_graph(nodes, "convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, "h", "w"])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, None)], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _run(model, x, optimise):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if not optimise:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.fixture(scope="module")
def quantised(tmp_path_factory):
    """The float model quantised as sdrt's static schemes do (QDQ, per-channel int8 weights in this CPU's range, uint8
    activations; one calibration): ("float_outputs": convs' outputs left float, the reference; "int8_outputs": as the
    exports)."""
    from sdrt.cpu import int8_weight_bits
    from sdrt.export.int8 import _static

    reduce = int8_weight_bits() == 7  # 8-bit weights saturate ORT's u8s8 GEMM on x86 without VNNI (sdrt.cpu)

    folder = tmp_path_factory.mktemp("convgemm")
    _float_model(folder / "m.onnx")
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((1, 4, 12, 12)).astype(np.float32)} for _ in range(3)]
    names = [c[0] for c in CONVS]
    ranges = folder / "ranges.json"
    _static(folder / "m.onnx", folder / "f.onnx", names, feeds, big=False, cache=ranges,
            extra={"OpTypesToExcludeOutputQuantization": ["MatMul", "Conv"]}, reduce=reduce)
    _static(folder / "m.onnx", folder / "q.onnx", names, feeds, big=False, cache=ranges, reduce=reduce)
    return {"float_outputs": onnx.load(str(folder / "f.onnx")), "int8_outputs": onnx.load(str(folder / "q.onnx"))}


@pytest.fixture
def qdq(quantised):
    return quantised["float_outputs"]


def _copy(model):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def test_rewrite_matches_the_qdq_graph_at_every_size(qdq):
    rewritten = _copy(qdq)
    assert convs_as_int8_gemm(rewritten) == len(REWRITTEN)
    onnx.checker.check_model(rewritten)
    convs = {n.name for n in rewritten.graph.node if n.op_type == "Conv"}
    assert convs == {c[0] for c in CONVS} - REWRITTEN  # grouped and dilated stay as they were
    gemms = [n for n in rewritten.graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert len(gemms) == len(REWRITTEN) and all(n.domain == "com.microsoft" for n in gemms)
    rng = np.random.default_rng(2)
    for size in (12, 9, 16):  # the calibrated size, an odd one (the stride-2 conv's last row), a larger one
        x = rng.standard_normal((2, 4, size, size)).astype(np.float32)
        want = _run(qdq, x, optimise=False)
        got = _run(rewritten, x, optimise=True)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max() + 1e-6, size


def test_rewrite_leaves_no_dangling_dequantize(qdq):
    rewritten = _copy(qdq)
    convs_as_int8_gemm(rewritten)
    read = {i for n in rewritten.graph.node for i in n.input} | {o.name for o in rewritten.graph.output}
    assert all(set(n.output) & read for n in rewritten.graph.node if n.op_type == "DequantizeLinear")
    assert {t.name for t in rewritten.graph.initializer} <= read  # the int8 conv weights now live in the GEMMs
    weights = [t for t in rewritten.graph.initializer if t.name.endswith("/weight")]
    assert len(weights) == len(REWRITTEN) and all(t.data_type == TensorProto.INT8 for t in weights)


def test_output_rounding_is_bypassed_for_float_readers(quantised):
    """From the exports' form (conv outputs quantised): the rewritten convs' outputs reach their float readers (Relu)
    unrounded, so the result is the reference's; a conv not chosen keeps its rounding and runs as QLinearConv."""
    last = f"h{len(REWRITTEN) - 1}"  # after the rewritten convs (grouped and dilated keep their output rounding)
    reference, rewritten = _copy(quantised["float_outputs"]), _copy(quantised["int8_outputs"])
    for model in (reference, rewritten):
        model.graph.output.insert(0, helper.make_tensor_value_info(last, TensorProto.FLOAT, None))
    assert convs_as_int8_gemm(rewritten) == len(REWRITTEN)
    x = np.random.default_rng(3).standard_normal((1, 4, 12, 12)).astype(np.float32)
    want = _run(reference, x, optimise=False)
    got = _run(rewritten, x, optimise=True)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max() + 1e-6
    rounded = {n.input[0] for n in rewritten.graph.node if n.op_type == "QuantizeLinear"}
    assert not rounded & {f"c{i}" for i in range(len(REWRITTEN))} and {"c4", "c5"} <= rounded

    partly = _copy(quantised["int8_outputs"])
    assert convs_as_int8_gemm(partly, choose=lambda name: name != "down3x3") == len(REWRITTEN) - 1
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as work:
        options.optimized_model_filepath = str(Path(work) / "opt.onnx")
        ort.InferenceSession(partly.SerializeToString(), options, providers=["CPUExecutionProvider"])
        fused = [n.name for n in onnx.load(options.optimized_model_filepath).graph.node if n.op_type == "QLinearConv"]
    assert set(fused) == {"down3x3", "grouped", "dilated"}  # ORT fuses every conv left in QDQ form


def test_conv_geometry_and_the_rule(qdq):
    from sdrt.export.int8_conv_gemm import ConvShape, conv_geometry, rule_form

    shapes = conv_geometry(qdq, {"n": 2, "h": 12, "w": 12})
    assert shapes["same3x3"] == ConvShape(2, 4, 8, 12, 12, 3, 1, 2 * 12 * 12)
    assert shapes["down3x3"] == ConvShape(2, 8, 8, 12, 12, 3, 2, 2 * 6 * 6)
    assert shapes["shortcut1x1"].kernel == 1 and shapes["shortcut1x1"].rows == 2 * 6 * 6
    assert "asym2x2" in shapes and shapes["down3x3"].kind() == "int8conv3x3/2"
    assert ConvShape.of_kind("int8conv3x3/2", 2, 8, 8, 12, 12) == shapes["down3x3"]  # a tactic-cache key read back
    # The rule: the GEMM up to 8192 output rows or from 512 output channels (int8-conv-gemm.md).
    assert rule_form(ConvShape(2, 320, 320, 32, 32, 3, 1, 2048)) == "gemm"
    assert rule_form(ConvShape(1, 512, 512, 256, 256, 3, 1, 65536)) == "gemm"
    assert rule_form(ConvShape(1, 256, 128, 256, 256, 3, 1, 65536)) == "qlinearconv"
    assert rule_form(None) == "gemm"


def test_measured_forms_go_through_the_tactic_cache(tmp_path):
    """`--conv-tactics measure` times the two forms per shape once (TacticPicker, a fake timer here) and keeps the
    rule's form unless the other is clearly faster."""
    from sdrt.export.tactics import TacticPicker

    calls = []

    def fake(kind, ci, co, batch, h, w, tactics, threads):
        calls.append((kind, tuple(tactics)))
        return {"qlinearconv": 1.0, "gemm": 2.0} if co < 64 else {"qlinearconv": 1.0, "gemm": 0.98}

    picker = TacticPicker(2, tmp_path, measure=fake)
    assert picker.pick("int8conv3x3/1", 32, 32, 1, 64, 64, "gemm") == "qlinearconv"
    assert picker.pick("int8conv3x3/1", 32, 32, 1, 64, 64, "gemm") == "qlinearconv"  # cached: timed once (twice: confirmed)
    assert picker.pick("int8conv3x3/1", 64, 64, 1, 64, 64, "gemm") == "gemm"  # 2% apart: the rule stands
    assert [c[1] for c in calls][0] == ("qlinearconv", "gemm") and len([c for c in calls if "32" in str(c)]) <= 2


def test_time_forms_runs_both_forms():
    from sdrt.export.int8_conv_gemm import ConvShape, time_forms

    times = time_forms(ConvShape(1, 8, 8, 8, 8, 3, 1, 64), ("qlinearconv", "gemm"), threads=1, repeats=2)
    assert set(times) == {"qlinearconv", "gemm"} and all(0 < t < 5 for t in times.values())


def test_a_float_conv_is_left_alone():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])
    w = numpy_helper.from_array(np.ones((2, 2, 3, 3), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "g", [x],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    model = helper.make_model(graph)
    assert convs_as_int8_gemm(model) == 0 and [n.op_type for n in model.graph.node] == ["Conv"]


def test_quantize_export_times_each_conv_shape_when_asked(tmp_path, monkeypatch):
    """`conv_tactics="measure"` asks the tactic cache for each quantised conv shape at the export's opt size (a fake
    timer that makes QLinearConv faster everywhere here), and the stats say what was picked and how."""
    import json

    from sdrt.builtin import builtin_model_dir
    from sdrt.export import tactics
    from sdrt.export.int8 import quantize_export
    from sdrt.export.int8_quality import record_unet_feeds

    asked = []

    def fake(kind, ci, co, batch, h, w, forms, threads, *rest):
        asked.append(kind)
        assert kind.startswith("int8conv") and list(forms) == ["qlinearconv", "gemm"]
        return {"qlinearconv": 1.0, "gemm": 3.0}

    monkeypatch.setattr(tactics, "time_tactics", fake)
    feeds = record_unet_feeds(builtin_model_dir(), ["a red 7"], 64, 2, 7.5, limit=4, threads=1)
    stats = quantize_export(builtin_model_dir(), tmp_path / "out", "static", ("unet",), {"unet": feeds},
                            conv_tactics="measure", tactic_threads=1, tactic_cache_dir=tmp_path / "cache")
    forms = stats["unet"]["conv_forms"]
    assert forms["by"] == "measure" and forms["gemm"] == 0 and forms["qlinearconv"] > 0 and asked
    cached = json.loads(next((tmp_path / "cache").glob("*.json")).read_text())
    assert all(k.startswith("int8conv") for k in cached) and len(asked) == 2 * len(cached)  # a departure: timed twice
    rule = quantize_export(builtin_model_dir(), tmp_path / "rule", "static", ("unet",), {"unet": feeds})
    assert rule["unet"]["conv_forms"]["by"] == "rule" and rule["unet"]["conv_forms"]["gemm"] > 0


def test_convs_without_bias_and_with_int8_activations(tmp_path):
    """static-s8 (int8 activations with a zero point) and convs without a bias take the GEMM form too, and compute
    what the QDQ graph does."""
    from sdrt.cpu import int8_weight_bits
    from sdrt.export.int8 import _static

    rng = np.random.default_rng(4)
    w0 = numpy_helper.from_array((0.3 * rng.standard_normal((6, 3, 3, 3))).astype(np.float32), "w0")
    w1 = numpy_helper.from_array((0.3 * rng.standard_normal((5, 6, 3, 3))).astype(np.float32), "w1")
    nodes = [helper.make_node("Conv", ["x", "w0"], ["a"], name="first", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Conv", ["b", "w1"], ["y"], name="nobias", pads=[1, 1, 1, 1], strides=[2, 2])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", "w"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w0, w1])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    feeds = [{"x": rng.standard_normal((1, 3, 10, 10)).astype(np.float32)} for _ in range(3)]
    _static(tmp_path / "m.onnx", tmp_path / "q.onnx", ["first", "nobias"], feeds, big=False, activation="s8",
            extra={"OpTypesToExcludeOutputQuantization": ["MatMul", "Conv"]}, reduce=int8_weight_bits() == 7)
    reference = onnx.load(str(tmp_path / "q.onnx"))
    rewritten = _copy(reference)
    assert convs_as_int8_gemm(rewritten) == 2
    gemm = next(n for n in rewritten.graph.node if n.name == "nobias/gemm")
    assert len(gemm.input) == 6  # no bias input
    x = rng.standard_normal((2, 3, 11, 11)).astype(np.float32)
    want, got = _run(reference, x, optimise=False), _run(rewritten, x, optimise=True)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max() + 1e-6
