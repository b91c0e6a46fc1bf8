"""Export-time split of the UNet into what changes every denoising step and what does not.

Within one generation only the UNet's `sample` and `timestep` change from step to step. Everything it computes from
its other inputs alone is the same at every step: the cross-attention keys and values of the text
(encoder_hidden_states through every to_k / to_v), SDXL's added text-and-time embedding, an LCM UNet's guidance
embedding, run-time LoRA factors on those layers. A 20-step image computes them 20 times. The split writes two more
graphs beside the UNet's model.onnx, sharing its weights file (no weight is copied):

- `prepass.onnx`: those step-invariant nodes, from the fixed inputs to the tensors the rest reads ("carried");
- `step.onnx`: the rest, taking `sample`, `timestep`, the carried tensors and any fixed input it reads directly.

The ONNX Runtime backend on CPU runs the prepass once per generation (sdrt.backends.onnx_split caches its outputs by
its inputs) and the step graph at every step. model.onnx stays whole: the C host, TensorRT and the CUDA route read
it. On SDXL's shape at 256 px the cross-attention keys and values are ~10 of the UNet call's multiply-adds at batch 2
(~6%); on SD 1.5's ~3 GMAC (~1.5%). The split is exact: the same nodes on the same values, in two sessions.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

STEP_INPUTS = ("sample", "timestep")  # the UNet inputs that change from step to step (sdrt.families: the rest is fixed)
PREPASS_FILE, STEP_FILE = "prepass.onnx", "step.onnx"
# Ops whose presence makes a prepass worth a second session: the ones that multiply (anything else is cheap to repeat).
COMPUTE_OPS = {"MatMul", "Gemm", "Conv", "MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv",
               "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "FusedMatMul", "FusedConv", "Attention",
               "MultiHeadAttention", "QAttention"}  # fmt: skip
INLINE_LIMIT = 64 * 2**20  # weights stored inside model.onnx above this go to a side file first, so both graphs share it


@dataclasses.dataclass
class Split:
    prepass: object  # onnx.ModelProto
    step: object  # onnx.ModelProto
    carried: list[str]  # prepass outputs the step graph takes as inputs


def split_step_invariant(model, step_inputs=STEP_INPUTS) -> Split | None:
    """Split a loaded ONNX model (weights not loaded: load_external_data=False) in two; None when there is nothing
    worth moving (no multiply in the step-invariant part) or the graph has a form the split does not follow (a name
    defined nowhere, or an output that does not depend on the step inputs). A node with subgraphs (the LoRA slots'
    If gates) counts the outer names its branches read as inputs."""
    graph = model.graph
    graph_inputs = [i.name for i in graph.input]
    if not set(step_inputs) <= set(graph_inputs):
        return None
    kind = {name: "step" if name in step_inputs else "fixed" for name in graph_inputs}
    for t in graph.initializer:
        kind.setdefault(t.name, "const")
    kind[""] = "const"  # an omitted optional input
    node_kind = []
    for node in graph.node:
        kinds = {kind.get(name) for name in reads(node)}
        if None in kinds:  # a name defined nowhere: not a graph this split understands
            return None
        k = "step" if "step" in kinds else "fixed" if "fixed" in kinds else "const"
        node_kind.append(k)
        for out in node.output:
            kind[out] = k
    if any(kind.get(o.name) != "step" for o in graph.output):
        return None
    fixed_nodes = [i for i, k in enumerate(node_kind) if k == "fixed"]
    if not any(graph.node[i].op_type in COMPUTE_OPS for i in fixed_nodes):
        return None
    step_nodes = [i for i, k in enumerate(node_kind) if k == "step"]
    read_by_step = {name for i in step_nodes for name in reads(graph.node[i])}
    carried = sorted(name for name in read_by_step if kind.get(name) == "fixed" and name not in graph_inputs)
    prepass_nodes = sorted(fixed_nodes + _constants_for(graph, node_kind, fixed_nodes))
    step_nodes = sorted(step_nodes + _constants_for(graph, node_kind, step_nodes))
    prepass = _subgraph(model, prepass_nodes, extra_inputs=[], outputs=[_untyped(name) for name in carried],
                        name="prepass")  # fmt: skip
    step = _subgraph(model, step_nodes, extra_inputs=carried, outputs=list(graph.output), name="step")
    return Split(prepass, step, carried)


def _constants_for(graph, node_kind, nodes) -> list[int]:
    """The constant nodes (no graph input upstream) that `nodes` read, transitively: both graphs need their own."""
    needed = {name for i in nodes for name in reads(graph.node[i])}
    picked = []
    for i in range(len(graph.node) - 1, -1, -1):
        node = graph.node[i]
        if node_kind[i] == "const" and any(out in needed for out in node.output):
            picked.append(i)
            needed.update(reads(node))
    return picked


def reads(node) -> list[str]:
    """The names a node reads: its inputs, and the outer names its subgraphs (If/Loop/Scan branches) read."""
    names = list(node.input)
    for attr in node.attribute:
        for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
            names.extend(_outer_names(sub))
    return names


def _outer_names(graph) -> set[str]:
    """Names a subgraph reads from outside itself."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    outer = set()
    for node in graph.node:
        outer.update(name for name in reads(node) if name not in defined)
        defined.update(node.output)
    outer.update(o.name for o in graph.output if o.name not in defined)
    return outer


def _untyped(name: str):
    import onnx

    info = onnx.ValueInfoProto()
    info.name = name
    return info


def _subgraph(model, node_ids, extra_inputs, outputs, name: str):
    """A model of `node_ids` of `model`'s graph: the graph inputs and initializers they read, `extra_inputs` (typed
    later, from the prepass session) and `outputs`."""
    import onnx

    graph = model.graph
    nodes = [graph.node[i] for i in node_ids]
    read = {n for node in nodes for n in reads(node)}
    sub = onnx.GraphProto()
    sub.name = f"{graph.name}_{name}"
    sub.node.extend(nodes)
    sub.input.extend(i for i in graph.input if i.name in read)
    sub.input.extend(_untyped(n) for n in extra_inputs)
    sub.output.extend(outputs)
    sub.initializer.extend(t for t in graph.initializer if t.name in read)
    produced = {out for node in nodes for out in node.output}
    sub.value_info.extend(v for v in graph.value_info if v.name in produced and v.name not in extra_inputs)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.CopyFrom(sub)
    return out


def write_step_split(network_file: Path) -> dict | None:
    """Write prepass.onnx and step.onnx beside `network_file` (a UNet's model.onnx); returns the manifest record
    {"prepass", "step", "carried"} (paths relative to the file's folder) or None when the graph does not split.

    Weights stored inside model.onnx (over INLINE_LIMIT) are first moved to `model.onnx.data`, so that all three
    graphs read one copy."""
    import onnx
    import onnxruntime as ort

    network_file = Path(network_file)
    folder = network_file.parent
    for stale in (folder / PREPASS_FILE, folder / STEP_FILE):
        stale.unlink(missing_ok=True)
    model = onnx.load(str(network_file), load_external_data=False)
    inline = sum(len(t.raw_data) for t in model.graph.initializer)
    if inline > INLINE_LIMIT:
        full = onnx.load(str(network_file))
        tmp = network_file.with_name(network_file.name + ".tmp")
        onnx.save_model(full, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=network_file.name + ".data", size_threshold=1024)
        del full
        tmp.replace(network_file)
        model = onnx.load(str(network_file), load_external_data=False)
    split = split_step_invariant(model)
    if split is None:
        return None
    prepass_path, step_path = folder / PREPASS_FILE, folder / STEP_FILE
    _save(split.prepass, prepass_path)
    # The carried tensors' types, as ONNX Runtime infers them (onnx's own inference does not know ORT's contrib ops).
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(str(prepass_path), options, providers=["CPUExecutionProvider"])
    types = {o.name: o.type for o in session.get_outputs()}
    del session
    for info in list(split.prepass.graph.output) + [i for i in split.step.graph.input if i.name in split.carried]:
        info.type.tensor_type.elem_type = getattr(onnx.TensorProto, types[info.name][len("tensor("):-1].upper())  # FLOAT, INT64, ...
    _save(split.prepass, prepass_path)
    _save(split.step, step_path)
    return {"prepass": PREPASS_FILE, "step": STEP_FILE, "carried": len(split.carried)}


def _save(model, path: Path) -> None:
    """Graph only (the weights stay where model.onnx keeps them); written under a temporary name, then renamed."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(model.SerializeToString())
    tmp.replace(path)

