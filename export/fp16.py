"""fp32 -> fp16 conversion of an exported network, keeping the I/O contract float32.

onnxruntime.transformers.float16 does the conversion (ENVIRONMENT.md: it converted every exporter's graphs;
onnxconverter-common did not). On top of its defaults, these stay float32:

- the timestep path of the UNet: every node that depends on `timestep` and not on the latents or the text
  states (the sinusoidal projection and the time MLP, which are tiny). Fractional Euler/Karras timesteps such
  as 999.37 are not representable in fp16 (its spacing near 1000 is 0.5), and the projection multiplies them by
  frequencies, so rounding there changes the phase of every sin/cos;
- the op types the caller names (KEEP_FP32_OPS adds none: see the measurement below), with the constants
  that only they read;
- with `upcast_attention` (SD 2.1's UNet config sets it: its attention scores overflow fp16), each attention's
  score MatMul and Softmax, as diffusers' upcast does.
The converter rounds every tensor between two kept nodes through fp16; remove_round_trips undoes that.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto

# Op types kept in fp32 by default: none. Measured on the tiny models and an SD 1.5-shape random-weight model
# (max|fp16 - torch| / max|torch| on ORT CPU): keeping InstanceNormalization, LayerNormalization, Pow, Sqrt,
# Sin and Cos in fp32 made the UNet 1.1e-3 (vs 8.2e-4 without) and the VAE decoder 1.9e-3 (vs 1.2e-3); only
# the text encoder gained (3.9e-4 vs 4.4e-4). The timestep path is what matters: without it the UNet was 8.9e-3
# at t=999.37. ORT's own SD pipeline keeps no SD 1.x/2.x op in fp32 either. Name more with keep_ops.
KEEP_FP32_OPS: tuple[str, ...] = ()

# Nodes whose outputs are integer shapes: dependence through them is not a float dependence.
SHAPE_OPS = {"Shape", "Size"}


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def _descendants(graph: onnx.GraphProto, starts, users, through_shape_ops: bool) -> set[str]:
    """Names of the nodes that depend on any tensor in `starts` (optionally not through Shape/Size)."""
    seen_tensors, nodes = set(starts), set()
    frontier = list(starts)
    while frontier:
        tensor = frontier.pop()
        for node in users.get(tensor, ()):
            if node.name in nodes:
                continue
            nodes.add(node.name)
            if node.op_type in SHAPE_OPS and not through_shape_ops:
                continue
            for out in node.output:
                if out not in seen_tensors:
                    seen_tensors.add(out)
                    frontier.append(out)
    return nodes


def fp32_node_names(model: onnx.ModelProto, fp32_inputs=("timestep",), keep_ops=()) -> set[str]:
    """Nodes to keep in fp32: those fed only by `fp32_inputs`, those of the `keep_ops` types, and the
    Constant nodes read only by nodes kept in fp32 (otherwise their values would be rounded to fp16 first)."""
    graph = model.graph
    for i, node in enumerate(graph.node):  # the converter blocks by node name
        if not node.name:
            node.name = f"sdrt_node_{i}"
    users = _consumers(graph)
    inputs = [i.name for i in graph.input]
    kept_inputs = [n for n in inputs if n in fp32_inputs]
    other_inputs = [n for n in inputs if n not in fp32_inputs]
    blocked = _descendants(graph, kept_inputs, users, True) - _descendants(graph, other_inputs, users, False)
    blocked |= {n.name for n in graph.node if n.op_type in keep_ops}
    for node in graph.node:
        if node.op_type == "Constant":
            readers = [u for out in node.output for u in users.get(out, ())]
            if readers and all(u.name in blocked for u in readers):
                blocked.add(node.name)
    return blocked


def attention_score_nodes(graph: onnx.GraphProto) -> set[str]:
    """Each Softmax and, back through the scaling/masking ops before it, the MatMul that makes its scores."""
    producers = {o: n for n in graph.node for o in n.output}
    names = set()
    for node in graph.node:
        if node.op_type != "Softmax":
            continue
        names.add(node.name)
        current = producers.get(node.input[0])
        while current is not None and current.op_type in ("Mul", "Div", "Add", "Where", "Cast", "Reshape"):
            names.add(current.name)
            current = producers.get(current.input[0])
        if current is not None and current.op_type == "MatMul":
            names.add(current.name)
    return names


def convert_to_fp16(
    model: onnx.ModelProto, keep_ops=(), fp32_inputs=("timestep",), shapes_inferred=False, upcast_attention=False
) -> onnx.ModelProto:
    """Return an fp16 copy of `model` whose graph inputs and outputs all stay float32 (LoRA slot gates, if any, are
    undone in `model` and made again in the copy).

    `shapes_inferred`: the caller already ran shape inference (needed for models over 2 GB, where only
    onnx.shape_inference.infer_shapes_path works).
    """
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    from sdrt.export.lora_gates import gate_slots, ungate_slots

    gated = ungate_slots(model)  # the converter and the passes below know no subgraphs: gated again at the end
    keep_ops = tuple(KEEP_FP32_OPS) + tuple(keep_ops)
    present = [i.name for i in model.graph.input if i.name in fp32_inputs]
    blocked = fp32_node_names(model, present, keep_ops)
    if upcast_attention:
        blocked |= attention_score_nodes(model.graph)
    # Inputs such as the timestep get no fp32->fp16 cast at all: everything reading them is kept in fp32.
    users = _consumers(model.graph)
    for name in present:
        loose = [u.name for u in users.get(name, ()) if u.name not in blocked]
        if loose:
            raise RuntimeError(f"input {name!r} also feeds fp16 nodes {loose[:3]}; cannot keep it float32")
    float_io = [v.name for v in list(model.graph.input) + list(model.graph.output) if v.type.tensor_type.elem_type == TensorProto.FLOAT]
    converted = convert_float_to_float16(
        model,
        keep_io_types=[n for n in float_io if n not in present],
        disable_shape_infer=shapes_inferred,
        op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | set(keep_ops)),
        node_block_list=sorted(blocked),
    )
    # The converter typed these inputs float16 and put float->float casts (no-ops) before their readers;
    # restoring the declared type keeps the values exact.
    for value in converted.graph.input:
        if value.name in present:
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    remove_round_trips(converted.graph, blocked)
    sort_nodes(converted.graph)
    if gated:
        gate_slots(converted)
    return converted


def remove_round_trips(graph: onnx.GraphProto, fp32_nodes: set[str]) -> None:
    """Drop the converter's fp32 -> fp16 -> fp32 cast pairs between two fp32 nodes.

    The converter types every float tensor fp16, so it casts each output of a kept node to fp16 and back to fp32
    before the next kept node: a chain of fp32 nodes would still round every intermediate to fp16.
    """
    producers = {o: n for n in graph.node for o in n.output}
    fp32 = {v.name for v in graph.input if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    fp32 |= {t.name for t in graph.initializer if t.data_type == TensorProto.FLOAT}
    graph_outputs = {v.name for v in graph.output}

    def cast_to(node) -> int | None:
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    def is_fp32(tensor) -> bool:
        node = producers.get(tensor)
        return tensor in fp32 or (node is not None and (node.name in fp32_nodes or cast_to(node) == TensorProto.FLOAT))

    rename, dropped = {}, set()
    for down in graph.node:  # down: Cast(to fp32) of up: Cast(to fp16) of an fp32 tensor
        up = producers.get(down.input[0]) if cast_to(down) == TensorProto.FLOAT else None
        if up is None or cast_to(up) != TensorProto.FLOAT16 or not is_fp32(up.input[0]) or down.output[0] in graph_outputs:
            continue
        rename[down.output[0]] = up.input[0]
        dropped.add(down.name)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    used = {name for n in graph.node if n.name not in dropped for name in n.input} | graph_outputs
    keep = [n for n in graph.node if n.name not in dropped and (n.op_type != "Cast" or any(o in used for o in n.output))]
    del graph.node[:]
    graph.node.extend(keep)


def sort_nodes(graph: onnx.GraphProto) -> None:
    """Put the nodes in topological order (the converter appends its I/O casts at the end; the ONNX checker
    and some tools insist on the order)."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        waiting = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                waiting.append(node)
        if len(waiting) == len(pending):
            raise RuntimeError(f"the fp16 graph has a cycle or a dangling input at node {waiting[0].name!r}")
        pending = waiting
    copies = [onnx.NodeProto() for _ in ordered]
    for copy, node in zip(copies, ordered):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)


def convert_file(src, dst, keep_ops=(), upcast_attention=False) -> None:
    """Convert the ONNX file `src` (weights inline or external) to fp16 at `dst` (external data beside it when
    over 2 GB), as `sdrt export --fp16` does; `sdrt build --fp16` uses it on fp32 exports."""
    from pathlib import Path

    from sdrt.export.onnx_network import EXTERNAL_DATA_BYTES, infer_shapes, model_bytes

    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src))
    big = model_bytes(model) > EXTERNAL_DATA_BYTES
    model = convert_to_fp16(infer_shapes(model, dst.parent, big), keep_ops, shapes_inferred=True, upcast_attention=upcast_attention)
    for leftover in ("infer-in.onnx", "infer-out.onnx", "infer.data"):
        (dst.parent / leftover).unlink(missing_ok=True)
    if model_bytes(model) > EXTERNAL_DATA_BYTES:
        onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True, location=dst.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(dst))
