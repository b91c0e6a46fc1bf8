"""SmoothQuant-style input scaling for static int8 (Xiao et al. 2023), exact in fp32.

    smoothed = smooth_model(model, nodes, feeds, alpha=0.5)   # an onnx.ModelProto with weights loaded

ONNX Runtime's QLinearConv / QLinearMatMul take one activation scale per tensor, so a layer whose input channels
differ in range (an un-normalised residual stream, a concatenated skip connection, a GroupNorm output with
per-channel gamma) spends its 256 levels on the widest channel. Smoothing divides input channel c by s_c and
multiplies the weights that read channel c by s_c: y = (x / s) (s W) = x W exactly, and the int8 ranges of both
sides are evened out. s_c = max|x_c|^alpha / max|W_c|^(1 - alpha), x_c's range from the calibration feeds.

Where the division goes: a per-channel Mul inserted before the layer (one elementwise pass over the input, shared by
the layers that read the same tensor, e.g. q/k/v), which the quantiser then calibrates like any input. A zero stays
zero under the division, so padded 3x3 convolutions stay exact.
"""

from __future__ import annotations

import numpy as np

DEFAULT_ALPHA = 0.5


def _weight_channel_max(op: str, w: np.ndarray) -> np.ndarray:
    """max |W| over everything but the input-channel axis: Conv (O, C, kh, kw), MatMul (C, O)."""
    return np.abs(w).max(axis=(0, 2, 3)) if op == "Conv" else np.abs(w).max(axis=1)


def smoothable(model, nodes: list[str]) -> dict[str, list]:
    """{input tensor: [nodes]} of the named Conv/MatMul `nodes` that can be smoothed: a stored weight (Conv: 4-D,
    one group; MatMul: 2-D, the right operand), grouped by the input they read."""
    inits = {i.name: i for i in model.graph.initializer}
    uses: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    wanted, groups = set(nodes), {}
    for n in model.graph.node:
        if n.name not in wanted or n.op_type not in ("Conv", "MatMul") or len(n.input) < 2 or n.input[1] not in inits:
            continue
        dims = list(inits[n.input[1]].dims)
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        if (n.op_type == "Conv" and (len(dims) != 4 or group != 1)) or (n.op_type == "MatMul" and len(dims) != 2):
            continue
        if uses.get(n.input[1], 0) != 1:  # a weight read twice cannot be scaled for one reader
            continue
        groups.setdefault(n.input[0], []).append(n)
    return groups


def channel_amax(model_path, tensors: dict[str, int], feeds) -> dict[str, np.ndarray]:
    """max |x| per channel of each tensor (name -> channel axis) over the feeds, by a session that also outputs them
    (the model at `model_path` is read without its weights and saved beside it, so external weights stay shared)."""
    import os
    import tempfile

    import onnx
    import onnxruntime as ort

    model = onnx.load(str(model_path), load_external_data=False)
    known = {o.name for o in model.graph.output}
    for name in tensors:
        if name not in known:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    folder = os.path.dirname(os.path.abspath(model_path))
    fd, tmp = tempfile.mkstemp(suffix=".onnx", prefix=".amax-", dir=folder)
    os.close(fd)
    try:
        onnx.save(model, tmp)
        del model
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        session = ort.InferenceSession(tmp, options, providers=["CPUExecutionProvider"])
        names = list(tensors)
        amax: dict[str, np.ndarray] = {}
        for feed in feeds:
            for name, value in zip(names, session.run(names, feed)):
                axis = tensors[name] % value.ndim
                m = np.abs(value).max(axis=tuple(a for a in range(value.ndim) if a != axis))
                amax[name] = m if name not in amax else np.maximum(amax[name], m)
        return amax
    finally:
        os.unlink(tmp)


def scales(x_amax: np.ndarray, w_amax: np.ndarray, alpha: float) -> np.ndarray:
    """s_c = max|x_c|^alpha / max|W_c|^(1-alpha), 1 where a channel is all zero; float32."""
    x_amax, w_amax = np.maximum(x_amax, 0.0).astype(np.float64), np.maximum(w_amax, 0.0).astype(np.float64)
    s = np.ones_like(x_amax)
    ok = (x_amax > 0) & (w_amax > 0)
    s[ok] = x_amax[ok] ** alpha / w_amax[ok] ** (1 - alpha)
    s = np.clip(s, 1e-4, 1e4)
    return (s / np.exp(np.mean(np.log(s)))).astype(np.float32)  # geometric mean 1: ranges stay where they were overall


def smooth_model(model, groups: dict[str, list], amax: dict[str, np.ndarray], alpha: float = DEFAULT_ALPHA) -> int:
    """Scale `model` in place (weights loaded): for each input tensor in `groups`, a Mul by 1/s feeding its nodes,
    whose weights are multiplied by s. Returns the number of layers smoothed."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    done, new_nodes = 0, {}
    for tensor, nodes in groups.items():
        if tensor not in amax:
            continue
        weights = {n.name: numpy_helper.to_array(inits[n.input[1]]) for n in nodes}
        w_amax = np.max([_weight_channel_max(n.op_type, weights[n.name]) for n in nodes], axis=0)
        s = scales(amax[tensor], w_amax, alpha)
        if s.shape != w_amax.shape:
            continue
        conv = nodes[0].op_type == "Conv"
        inv = numpy_helper.from_array((1.0 / s).reshape((1, -1, 1, 1) if conv else (-1,)).astype(np.float32),
                                      f"{tensor}_smooth_inv")
        if any(n.op_type != nodes[0].op_type for n in nodes):
            continue  # a Conv and a MatMul reading one tensor would need two layouts
        model.graph.initializer.append(inv)
        out = f"{tensor}_smoothed"
        mul = helper.make_node("Mul", [tensor, inv.name], [out], name=f"{nodes[0].name}_smooth")
        for n in nodes:
            w = weights[n.name] * (s.reshape((1, -1, 1, 1)) if conv else s.reshape((-1, 1)))
            inits[n.input[1]].CopyFrom(numpy_helper.from_array(w.astype(np.float32), n.input[1]))
            n.input[0] = out
            done += 1
        new_nodes[nodes[0].name] = mul
    # Each Mul goes right before the first node that reads it (the graph stays topologically sorted).
    ordered = []
    for n in model.graph.node:
        if n.name in new_nodes:
            ordered.append(new_nodes[n.name])
        ordered.append(n)
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    return done
