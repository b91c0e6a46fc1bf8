"""One network of an export: trace the contract module to ONNX, then finish the file (the contract's I/O names and
dims, LoRA slot gates, fp16, one .onnx plus external data over 2 GB) and check it against PyTorch.
sdrt.export.onnx_export drives these per network and assembles the folder."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from sdrt.contracts import NetworkContract, ShapeLimits
from sdrt.errors import ModelError
from sdrt.model.facts import ModelFacts

EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's limit is 2 GiB; leave room for the graph itself
EXAMPLE_MAX_SIZE = 256  # image side of the example inputs the exporters trace with


def export_dims(limits: ShapeLimits, facts: ModelFacts) -> dict[str, int]:
    """The example shapes: the 'opt' size capped at EXAMPLE_MAX_SIZE, batch 2 (dynamo specialises a batch of 1).

    The example only drives the trace: every axis stays dynamic, and the check runs at another size. The cap
    matters on CPU: tracing SD 1.5's VAE decoder at 512 px, batch 2 took 344 s here (see the report).
    """
    size = min(limits.opt_size, max(facts.size_step, EXAMPLE_MAX_SIZE // facts.size_step * facts.size_step))
    return {**ShapeLimits(min_size=size, opt_size=size, max_size=size).dims(facts, "opt"), "batch": 2, "unet_batch": 2}


def check_dims(limits: ShapeLimits, facts: ModelFacts) -> dict[str, int]:
    """Shapes for the parity check: the 'min' size (cheap) and batches other than the export's 2."""
    return {**limits.dims(facts, "min"), "batch": 1, "unet_batch": 3, "lora_rank": 2}  # torch convs refuse rank 0


def example_args(contract: NetworkContract, dims: dict) -> tuple:
    """The network's example inputs at `dims`, as torch tensors in the contract's order."""
    import torch

    feeds = contract.sample_inputs(dims)
    return tuple(torch.from_numpy(feeds[s.name]) for s in contract.inputs)


def export_network(module, contract: NetworkContract, path: Path, args: tuple, opset: int, exporter: str,
                   constant_folding: bool = True) -> None:
    """torch -> ONNX at `path` from example inputs `args` (with the exporter's own external-data layout;
    finish_network tidies it)."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings about code we do not own
        if exporter == "dynamo":
            auto = torch.export.Dim.AUTO
            shapes = {s.name: {i: auto for i, d in enumerate(s.shape) if isinstance(d, str)} for s in contract.inputs}
            torch.onnx.export(
                module, args, str(path), dynamo=True, dynamic_shapes=shapes, opset_version=opset,
                input_names=contract.input_names, output_names=contract.output_names, external_data=True, verbose=False,
            )  # fmt: skip
        else:
            torch.onnx.export(
                module, args, str(path), dynamo=False, dynamic_axes=contract.dynamic_axes(), opset_version=opset,
                input_names=contract.input_names, output_names=contract.output_names, do_constant_folding=constant_folding,
            )  # fmt: skip


def finish_network(path: Path, contract: NetworkContract, fp16: bool, keep_fp32_ops, upcast_attention=False) -> None:
    """Name the I/O dims as the contract does, gate LoRA slots, convert to fp16 if asked, and rewrite `path` as one .onnx file
    (plus one model.onnx.data file when over 2 GB), removing whatever else the exporter left in its folder."""
    import onnx

    model = onnx.load(str(path))  # loads external data too
    restore_unused_slot_inputs(model, contract)
    check_io(model, contract, path)
    name_io_dims(model, contract)
    big = model_bytes(model) > EXTERNAL_DATA_BYTES
    if fp16:
        from sdrt.export.fp16 import convert_to_fp16

        model = convert_to_fp16(infer_shapes(model, path.parent, big), keep_fp32_ops, shapes_inferred=True, upcast_attention=upcast_attention)
        big = model_bytes(model) > EXTERNAL_DATA_BYTES
    if contract.lora_slots:  # empty slots cost nothing (sdrt.export.lora_gates)
        from sdrt.export.lora_gates import gate_slots

        gate_slots(model)
    for leftover in path.parent.iterdir():
        leftover.unlink()
    if big:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    del model
    onnx.checker.check_model(str(path))


def restore_unused_slot_inputs(model, contract: NetworkContract) -> None:
    """Put back the LoRA slot inputs the exporter dropped because the network never runs their layer (SDXL's first
    text encoder stops before its last layer, as diffusers does), in the contract's order: a LoRA trained on that
    layer is then taken, and does nothing, as in diffusers."""
    from onnx import TensorProto, helper

    present = {i.name: i for i in model.graph.input}
    slot_inputs = {spec.name for slot in contract.lora_slots for spec in slot.specs()}
    missing = [s for s in contract.inputs if s.name not in present and s.name in slot_inputs]
    if not missing:
        return
    for spec in missing:
        present[spec.name] = helper.make_tensor_value_info(spec.name, TensorProto.FLOAT, list(spec.shape))
    order = [present[s.name] for s in contract.inputs if s.name in present]
    order += [i for i in model.graph.input if i.name not in {s.name for s in contract.inputs}]
    del model.graph.input[:]
    model.graph.input.extend(order)


def check_io(model, contract: NetworkContract, path: Path) -> None:
    got = ([i.name for i in model.graph.input], [o.name for o in model.graph.output])
    want = (contract.input_names, contract.output_names)
    if got != want:
        raise ModelError(f"{path} has inputs/outputs {got}, the {contract.name} contract says {want}")


def name_io_dims(model, contract: NetworkContract) -> None:
    """Give every I/O axis the contract's symbol (dynamo names them s0, s1, '4*((s2 - 1)//4) + 4', ...)."""
    specs = {s.name: s for s in contract.inputs + contract.outputs}
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        for dim, want in zip(dims, specs[value.name].shape):
            if isinstance(want, str):
                dim.dim_param = want
            else:
                dim.dim_value = want


def infer_shapes(model, workdir: Path, big: bool):
    """Shape inference (the fp16 converter needs value types); over 2 GB only the file-based variant works."""
    import onnx

    if not big:
        return onnx.shape_inference.infer_shapes(model)
    src, dst = workdir / "infer-in.onnx", workdir / "infer-out.onnx"
    onnx.save_model(model, str(src), save_as_external_data=True, all_tensors_to_one_file=True, location="infer.data")
    onnx.shape_inference.infer_shapes_path(str(src), str(dst))
    return onnx.load(str(dst))


def model_bytes(model) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer) + sum(
        len(a.t.raw_data) for n in model.graph.node for a in n.attribute if a.type == a.TENSOR
    )


def network_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith(path.name))


def compare_with_torch(path: Path, module, contract: NetworkContract, dims: dict) -> dict:
    """Worst |ONNX Runtime - PyTorch| per output on random inputs at `dims` (plain numpy; see the report)."""
    import onnxruntime as ort
    import torch

    feeds = contract.sample_inputs(dims, seed=1)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    got = session.run(contract.output_names, feeds)
    del session
    with torch.no_grad():
        ref = module(*[torch.from_numpy(feeds[s.name]) for s in contract.inputs])
    ref = ref if isinstance(ref, tuple) else (ref,)
    errors = {}
    for spec, g, r in zip(contract.outputs, got, ref):
        r = r.float().numpy()
        if g.shape != r.shape:
            raise ModelError(f"the exported {contract.name} gives {spec.name} of shape {g.shape}, PyTorch {r.shape}")
        max_abs, max_ref = float(np.max(np.abs(g - r))), float(np.max(np.abs(r)))
        errors[spec.name] = {"max_abs": max_abs, "max_ref": max_ref, "rel": max_abs / max(max_ref, 1e-12)}
    return errors
