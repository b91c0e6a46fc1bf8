"""int8 convolutions as one int8 GEMM each: im2col on the quantised input, then ONNX Runtime's MatMulIntegerToFloat.

    count = convs_as_int8_gemm(model)   # a QDQ model from sdrt.export.int8 (weights loaded), rewritten in place

ONNX Runtime runs a QDQ convolution as QLinearConv, whose x86 kernel is MLAS's "symmetric conv" (AVX-512 VNNI, one
weight layout for every machine). Its int8 GEMM (MlasGemm u8s8, used by MatMulIntegerToFloat) takes AMX tiles where
the CPU has them. On this project's Sapphire-Rapids-class Xeon (2 cores) the SD 1.5 UNet's 3x3 convs measured
360-620 GMAC/s as QLinearConv and 850-1390 GMAC/s as the GEMM below, gather included
(benchmarks/results/int8-conv-gemm.md). The GEMM's output is float, so the conv's output is no longer rounded to
int8 either (as for the export's MatMuls: FLOAT_OUTPUT_OPS).

The rewrite, for a Conv whose input and weight come from DequantizeLinear (activation per tensor, weight int8 per
output channel, symmetric), group 1, dilation 1:

    x_q (uint8/int8, NCHW) -> Transpose to NHWC -> Pad (with the zero point: the quantised 0.0) -> one strided Slice
    per kernel tap -> Concat on channels = [N, Ho, Wo, kh*kw*C]  (a 1x1 conv, stride 1, no pad: the NHWC input as is)
    -> MatMulIntegerToFloat (weight [kh*kw*C, K] int8, per-column scale, float bias) -> Transpose to NCHW

It is exact: the same integer sums and scales as QLinearConv, less the output requantisation. Slices end at negative
offsets from the padded edge, so one graph serves every image size the export's profile allows.
"""

from __future__ import annotations

import numpy as np

_INT64_MAX = np.iinfo(np.int64).max


def convs_as_int8_gemm(model) -> int:
    """Rewrite each eligible QDQ Conv of `model` (an onnx.ModelProto with its weights loaded) as above, in place.
    Returns the number of convs rewritten."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}

    def const(name):
        if name in inits:
            return numpy_helper.to_array(inits[name])
        return None

    new_inits, rewritten = [], 0
    nhwc_of: dict[str, str] = {}  # quantised input -> its NHWC transpose (shared by convs reading one input)
    body = []
    for node in graph.node:
        plan = _plan(node, producer, const)
        if plan is None:
            body.append(node)
            continue
        rewritten += 1
        nodes, tensors = _rewrite(node, plan, nhwc_of)
        body.extend(nodes)
        new_inits.extend(tensors)
    # The DequantizeLinears now read by nobody (the weights', biases', and inputs only a rewritten conv read) go,
    # with the initializers only they read.
    used = {i for n in body for i in n.input} | {o.name for o in graph.output}
    body = [n for n in body if n.op_type != "DequantizeLinear" or set(n.output) & used]
    used = {i for n in body for i in n.input} | {o.name for o in graph.output}
    del graph.node[:]
    graph.node.extend(body)
    kept_inits = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits + [numpy_helper.from_array(a, n) for n, a in new_inits])
    if rewritten and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.add(domain="com.microsoft", version=1)
    return rewritten


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
