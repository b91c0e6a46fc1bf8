"""int8 convolutions as one int8 GEMM each: im2col on the quantised input, then ONNX Runtime's MatMulIntegerToFloat.

    shapes = conv_geometry(model, dims)                # each conv's shape at the export's opt size
    count = convs_as_int8_gemm(model, choose=lambda name: rule_form(shapes[name]) == "gemm")

ONNX Runtime runs a QDQ convolution as QLinearConv, whose x86 kernel is MLAS's "symmetric conv" (AVX-512 VNNI, one
weight layout for every machine). Its int8 GEMM (MlasGemm u8s8, used by MatMulIntegerToFloat) takes AMX tiles where
the CPU has them. On this project's Sapphire-Rapids-class Xeon (2 cores) the SD 1.5 UNet's 3x3 convs measured
360-620 GMAC/s as QLinearConv and 850-1390 GMAC/s as the GEMM below, gather included; the VAE's full-resolution
convs with few channels the other way round (benchmarks/results/int8-conv-gemm.md): the gather and the GEMM's packing
of it cost per row, the multiply-adds per row and output channel. Hence a choice per conv: rule_form (this machine's
measurements as a rule), or each shape timed on the machine at export (`--conv-tactics measure`, time_forms, cached
with sdrt.export.tactics' timings). The GEMM's output is float, so a rewritten conv's output is no longer rounded to
int8 either (as for the export's MatMuls: FLOAT_OUTPUT_OPS): its output QuantizeLinear/DequantizeLinear pair is
bypassed for every consumer that is not itself a quantised Conv/MatMul (those keep their input's rounding).

The rewrite, for a Conv whose input and weight come from DequantizeLinear (activation per tensor, weight int8 per
output channel, symmetric), group 1, dilation 1:

    x_q (uint8/int8, NCHW) -> Transpose to NHWC -> Pad (with the zero point: the quantised 0.0) -> one strided Slice
    per kernel tap -> Concat on channels = [N, Ho, Wo, kh*kw*C]  (a 1x1 conv, stride 1, no pad: the NHWC input as is)
    -> MatMulIntegerToFloat (weight [kh*kw*C, K] int8, per-column scale, float bias) -> Transpose to NCHW

It is exact: the same integer sums and scales as QLinearConv, less the output requantisation. Slices end at negative
offsets from the padded edge, so one graph serves every image size the export's profile allows.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

_INT64_MAX = np.iinfo(np.int64).max
FORMS = ("qlinearconv", "gemm")
# rule_form, from the measurements on the 2-core Xeon (int8-conv-gemm.md): the GEMM won every conv with at most 8192
# output rows (batch x height x width) by 0.8-3.1x (the one loss, 0.2 ms on a 1 ms conv) and every one with 512 output
# channels by 1.1-1.7x; QLinearConv won the 128-256-channel convs at 128x128 and 256x256 (1.1-1.6x).
GEMM_MAX_ROWS = 8192
GEMM_MIN_OUT_CHANNELS = 512


@dataclasses.dataclass(frozen=True)
class ConvShape:
    batch: int
    in_channels: int
    out_channels: int
    height: int  # input
    width: int
    kernel: int  # square kernels and strides only (other convs keep the rule)
    stride: int
    rows: int  # output positions: batch x output height x output width

    def kind(self) -> str:
        return f"int8conv{self.kernel}x{self.kernel}/{self.stride}"

    @classmethod
    def padded(cls, batch: int, in_channels: int, out_channels: int, height: int, width: int, kernel: int,
               stride: int) -> "ConvShape":
        """A conv padded by kernel // 2 on every side (as form_models builds it), its output rows computed."""
        out_h, out_w = ((n + 2 * (kernel // 2) - kernel) // stride + 1 for n in (height, width))
        return cls(batch, in_channels, out_channels, height, width, kernel, stride, batch * out_h * out_w)

    @classmethod
    def of_kind(cls, kind: str, batch: int, in_channels: int, out_channels: int, height: int, width: int) -> "ConvShape":
        """The padded conv a tactic-cache key names (kind() and sdrt.export.tactics.conv_key's other fields)."""
        import re

        kernel, stride = (int(v) for v in re.fullmatch(r"int8conv(\d+)x\d+/(\d+)", kind).groups())
        return cls.padded(batch, in_channels, out_channels, height, width, kernel, stride)


def rule_form(shape: ConvShape | None) -> str:
    """The form the rule picks for a conv of `shape` (None: unknown, the GEMM)."""
    if shape is None or shape.rows <= GEMM_MAX_ROWS or shape.out_channels >= GEMM_MIN_OUT_CHANNELS:
        return "gemm"
    return "qlinearconv"


def conv_geometry(model, dims: dict) -> dict:
    """{Conv node name: ConvShape} of `model` (weights loaded) with its symbolic input dimensions set to `dims`
    ({dim_param: value}, e.g. ShapeLimits.dims(facts, "opt")), by ONNX Runtime's symbolic shape inference (which knows
    its contrib ops, ONNX's own does not). A conv whose shapes stay unknown is left out."""
    from onnx import ModelProto
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    probe = ModelProto()
    probe.CopyFrom(model)
    for value in probe.graph.input:
        for d in value.type.tensor_type.shape.dim:
            if d.dim_param in dims:
                d.dim_value = int(dims[d.dim_param])
    inferred = SymbolicShapeInference.infer_shapes(probe, auto_merge=True, guess_output_rank=True)
    del probe
    known = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims_of = [d.dim_value if d.HasField("dim_value") else 0 for d in v.type.tensor_type.shape.dim]
        if dims_of and all(dims_of):
            known[v.name] = dims_of
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    shapes = {}
    for n in inferred.graph.node:
        if n.op_type != "Conv" or n.input[0] not in known or n.output[0] not in known:
            continue
        w = n.input[1]
        if w not in inits and w in producer and producer[w].op_type == "DequantizeLinear":
            w = producer[w].input[0]
        kernel, stride = inits.get(w, [0, 0, 0, 0])[2:], list(_attr(n, "strides", [1, 1]))
        x, y = known[n.input[0]], known[n.output[0]]
        if len(x) != 4 or len(kernel) != 2 or kernel[0] != kernel[1] or stride[0] != stride[1]:
            continue
        shapes[n.name] = ConvShape(x[0], x[1], y[1], x[2], x[3], kernel[0], stride[0], y[0] * y[2] * y[3])
    return shapes


def convs_as_int8_gemm(model, choose=None) -> int:
    """Rewrite each eligible QDQ Conv of `model` (an onnx.ModelProto with its weights loaded) as above, in place;
    `choose(conv name) -> bool` picks among the eligible ones (None: all). Returns the number of convs rewritten."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}

    def const(name):
        if name in inits:
            return numpy_helper.to_array(inits[name])
        return None

    new_inits, rewritten, rewritten_outputs = [], 0, set()
    nhwc_of: dict[str, str] = {}  # quantised input -> its NHWC transpose (shared by convs reading one input)
    body = []
    for node in graph.node:
        plan = _plan(node, producer, const)
        if plan is not None and choose is not None and not choose(node.name):
            plan = None
        if plan is None:
            body.append(node)
            continue
        rewritten += 1
        rewritten_outputs.add(node.output[0])
        nodes, tensors = _rewrite(node, plan, nhwc_of)
        body.extend(nodes)
        new_inits.extend(tensors)
    _bypass_output_rounding(body, rewritten_outputs)
    # The DequantizeLinears now read by nobody (the weights', biases', inputs only a rewritten conv read, the
    # bypassed outputs'), then the QuantizeLinears read by nobody, go, with the initializers only they read.
    for op in ("DequantizeLinear", "QuantizeLinear"):
        used = {i for n in body for i in n.input} | {o.name for o in graph.output}
        body = [n for n in body if n.op_type != op or set(n.output) & used]
    used = {i for n in body for i in n.input} | {o.name for o in graph.output}
    del graph.node[:]
    graph.node.extend(body)
    kept_inits = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits + [numpy_helper.from_array(a, n) for n, a in new_inits])
    if rewritten and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.add(domain="com.microsoft", version=1)
    return rewritten


def rewrite_convs(model, conv_forms: dict | None) -> dict:
    """Rewrite `model`'s quantised convs as int8 GEMMs where conv_forms' rule or timings pick it (conv_forms as
    sdrt.export.int8.quantize_network takes it; None: every eligible conv); returns {"gemm": n, "qlinearconv": n,
    "by": "rule"|"measure"|"all"}."""
    if conv_forms is None:
        return {"gemm": convs_as_int8_gemm(model), "qlinearconv": 0, "by": "all"}
    shapes = conv_geometry(model, conv_forms["dims"])
    picker = conv_forms.get("picker")
    picks = {}

    def choose(name):
        shape = shapes.get(name)
        form = rule_form(shape)
        if picker is not None and shape is not None:
            form = picker.pick(shape.kind(), shape.in_channels, shape.out_channels, shape.batch, shape.height,
                               shape.width, form)
        picks[name] = form
        return form == "gemm"

    gemm = convs_as_int8_gemm(model, choose)
    return {"gemm": gemm, "qlinearconv": sum(f == "qlinearconv" for f in picks.values()),
            "by": "measure" if picker is not None else "rule"}


def _bypass_output_rounding(body, outputs) -> None:
    """Consumers of a rewritten conv's QuantizeLinear -> DequantizeLinear output read the float output instead,
    except quantised Convs/MatMuls (weight from a DequantizeLinear), which ONNX Runtime fuses only with a
    DequantizeLinear input."""
    producer = {o: n for n in body for o in n.output}
    readers: dict[str, list] = {}
    for n in body:
        for i in n.input:
            readers.setdefault(i, []).append(n)

    def quantised(n):
        weight = producer.get(n.input[1]) if len(n.input) > 1 else None
        return n.op_type in ("Conv", "MatMul", "Gemm") and weight is not None and weight.op_type == "DequantizeLinear"

    for q in [n for n in body if n.op_type == "QuantizeLinear" and n.input[0] in outputs]:
        for dq in [n for n in readers.get(q.output[0], []) if n.op_type == "DequantizeLinear"]:
            for reader in readers.get(dq.output[0], []):
                if not quantised(reader):
                    for k, name in enumerate(reader.input):
                        if name == dq.output[0]:
                            reader.input[k] = q.input[0]


def _attr(node, name, default):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _plan(node, producer, const):
    """What the rewrite of Conv `node` needs, or None when it is not an eligible QDQ conv."""
    if node.op_type != "Conv" or len(node.input) < 2:
        return None
    x_dq, w_dq = producer.get(node.input[0]), producer.get(node.input[1])
    if not x_dq or not w_dq or x_dq.op_type != "DequantizeLinear" or w_dq.op_type != "DequantizeLinear":
        return None
    w_q, w_scale = const(w_dq.input[0]), const(w_dq.input[1])
    w_zero = const(w_dq.input[2]) if len(w_dq.input) > 2 and w_dq.input[2] else None
    x_scale = const(x_dq.input[1])
    x_zero = const(x_dq.input[2]) if len(x_dq.input) > 2 and x_dq.input[2] else None
    if w_q is None or w_scale is None or x_scale is None or w_q.dtype != np.int8 or w_q.ndim != 4:
        return None
    if x_scale.size != 1 or (x_zero is not None and x_zero.size != 1):
        return None  # per-tensor activations only (MatMulIntegerToFloat's a_scale is per tensor here)
    out_channels = w_q.shape[0]
    if w_zero is not None and np.any(w_zero != 0):
        return None
    if w_scale.size not in (1, out_channels) or (w_scale.size > 1 and _attr(w_dq, "axis", 1) != 0):
        return None
    kh, kw = w_q.shape[2:]
    if _attr(node, "group", 1) != 1 or any(d != 1 for d in _attr(node, "dilations", [1, 1])):
        return None
    if _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return None
    pads = list(_attr(node, "pads", [0, 0, 0, 0]))
    strides = list(_attr(node, "strides", [1, 1]))
    if len(pads) != 4 or len(strides) != 2:
        return None
    bias = None
    if len(node.input) > 2 and node.input[2]:
        bias = const(node.input[2])
        b_dq = producer.get(node.input[2])
        if bias is None and b_dq is not None and b_dq.op_type == "DequantizeLinear":
            b_q, b_scale = const(b_dq.input[0]), const(b_dq.input[1])
            if b_q is None or b_scale is None:
                return None
            bias = b_q.astype(np.float64) * b_scale.astype(np.float64)  # int32 bias at x_scale * w_scale
        if bias is None:
            return None
    # [K, C, kh, kw] -> [kh, kw, C, K] -> [kh*kw*C, K]: the order the gather concatenates the taps in.
    weight = np.ascontiguousarray(w_q.transpose(2, 3, 1, 0).reshape(-1, out_channels))
    scale = np.broadcast_to(w_scale.astype(np.float32).reshape(-1), (out_channels,)).copy()
    return {"x_q": x_dq.input[0], "x_scale": x_dq.input[1], "x_zero": x_dq.input[2] if len(x_dq.input) > 2 else "",
            "weight": weight, "scale": scale, "bias": None if bias is None else np.asarray(bias, np.float32).reshape(-1),
            "kernel": (kh, kw), "pads": pads, "strides": strides}


def _rewrite(node, plan, nhwc_of):
    """(nodes, [(name, array)]) that replace Conv `node` by the gather and MatMulIntegerToFloat."""
    from onnx import helper

    base = node.name or node.output[0]
    nodes, tensors = [], []

    def tensor(suffix, array):
        name = f"{base}/{suffix}"
        tensors.append((name, np.asarray(array)))
        return name

    x_q = plan["x_q"]
    if x_q not in nhwc_of:
        nhwc_of[x_q] = f"{x_q}/nhwc"
        nodes.append(helper.make_node("Transpose", [x_q], [nhwc_of[x_q]], name=f"{x_q}/to_nhwc", perm=[0, 2, 3, 1]))
    nhwc = nhwc_of[x_q]
    (kh, kw), (top, left, bottom, right), (sh, sw) = plan["kernel"], plan["pads"], plan["strides"]
    if (kh, kw, top, left, bottom, right, sh, sw) == (1, 1, 0, 0, 0, 0, 1, 1):
        columns = nhwc
    else:
        padded = nhwc
        if any((top, left, bottom, right)):
            padded = f"{base}/padded"
            pad_inputs = [nhwc, tensor("pads", np.array([0, top, left, 0, 0, bottom, right, 0], np.int64))]
            if plan["x_zero"]:
                pad_inputs.append(plan["x_zero"])  # the quantised 0.0
            nodes.append(helper.make_node("Pad", pad_inputs, [padded], name=f"{base}/pad"))
        axes, steps = tensor("axes", np.array([1, 2], np.int64)), tensor("steps", np.array([sh, sw], np.int64))
        taps = []
        for i in range(kh):
            for j in range(kw):
                # From tap (i, j) to kernel-size-1-tap before the padded edge: Ho = floor((Hp - kh) / sh) + 1 rows.
                ends = [-(kh - 1 - i) if i < kh - 1 else _INT64_MAX, -(kw - 1 - j) if j < kw - 1 else _INT64_MAX]
                tap = f"{base}/tap{i}_{j}"
                nodes.append(helper.make_node(
                    "Slice", [padded, tensor(f"starts{i}_{j}", np.array([i, j], np.int64)),
                              tensor(f"ends{i}_{j}", np.array(ends, np.int64)), axes, steps], [tap],
                    name=f"{base}/slice{i}_{j}"))
                taps.append(tap)
        columns = f"{base}/columns"
        nodes.append(helper.make_node("Concat", taps, [columns], name=f"{base}/gather", axis=3))
    inputs = [columns, tensor("weight", plan["weight"]), plan["x_scale"], tensor("weight_scale", plan["scale"]),
              plan["x_zero"], ""]
    if plan["bias"] is not None:
        inputs.append(tensor("bias", plan["bias"]))
    out_nhwc = f"{base}/out_nhwc"
    nodes.append(helper.make_node("MatMulIntegerToFloat", inputs, [out_nhwc], name=f"{base}/gemm", domain="com.microsoft"))
    nodes.append(helper.make_node("Transpose", [out_nhwc], [node.output[0]], name=f"{base}/to_nchw", perm=[0, 3, 1, 2]))
    return nodes, tensors


def form_models(shape: ConvShape, folder, seed: int = 0) -> dict:
    """{"float": ..., "qlinearconv": ..., "gemm": ...}: serialized one-conv models of `shape` (random weights and
    bias) in fp32 and in the two int8 forms, quantised as sdrt's static schemes do (calibrated on 3 random inputs;
    the QLinearConv form keeps its int8 output, which ONNX Runtime needs to fuse it)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from sdrt.export.int8 import _static

    rng = np.random.default_rng(seed)
    ci, co, k, s = shape.in_channels, shape.out_channels, shape.kernel, shape.stride
    w = (rng.standard_normal((co, ci, k, k)) / np.sqrt(ci * k * k)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[k // 2] * 4, strides=[s, s])
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", ci, "h", "w"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w"),
                               numpy_helper.from_array((0.1 * rng.standard_normal(co)).astype(np.float32), "b")])
    folder = Path(folder)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(folder / "float.onnx"))
    feeds = [{"x": rng.standard_normal((shape.batch, ci, shape.height, shape.width)).astype(np.float32)} for _ in range(3)]
    _static(folder / "float.onnx", folder / "qdq.onnx", ["conv"], feeds, big=False, cache=folder / "ranges.json")
    gemm = onnx.load(str(folder / "qdq.onnx"))
    convs_as_int8_gemm(gemm)
    return {"float": (folder / "float.onnx").read_bytes(), "qlinearconv": (folder / "qdq.onnx").read_bytes(),
            "gemm": gemm.SerializeToString()}


def time_forms(shape: ConvShape, forms, threads: int, repeats: int = 5, budget_s: float = 2.0) -> dict:
    """{form: best seconds per call} in ONNX Runtime (CPU, `threads` intra-op threads, ENABLE_ALL), the forms' runs
    taking turns (as sdrt.export.tactics.time_tactics)."""
    import tempfile

    import onnxruntime as ort

    from sdrt.export.tactics import time_in_turns

    with tempfile.TemporaryDirectory(prefix="sdrt-int8conv-") as work:
        models = form_models(shape, work)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    sessions = {f: ort.InferenceSession(models[f], options, providers=["CPUExecutionProvider"]) for f in forms}
    feed = {"x": np.random.default_rng(1).standard_normal(
        (shape.batch, shape.in_channels, shape.height, shape.width)).astype(np.float32)}
    return time_in_turns(sessions, feed, repeats, budget_s)
