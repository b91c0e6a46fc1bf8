"""One copy of the weights for two backends: ONNX initializers that point into the diffusers safetensors.

An ONNX tensor can live outside the .onnx file as raw bytes at an offset of another file ("external data"),
and a .safetensors file is raw tensor bytes at offsets after a JSON header. So an ONNX graph saved beside its
component's safetensors can reference the very bytes the PyTorch backend loads: the folder then runs on both
backends while storing each weight once (the built-in model ships this way, inside its 20 MB budget).
ONNX Runtime requires external data to sit in the model file's own folder, hence one graph per component folder.
Initializers that are not byte-identical to a checkpoint tensor (folded constants) stay inside the graph.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

SAFETENSORS_F32 = "F32"


def safetensors_index(path: Path) -> dict[str, tuple[int, int]]:
    """{sha256 of a float32 tensor's bytes: (absolute offset, length)} for one .safetensors file."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        base = 8 + header_len
        index = {}
        for name, info in header.items():
            if name == "__metadata__" or info["dtype"] != SAFETENSORS_F32:
                continue
            start, end = info["data_offsets"]
            f.seek(base + start)
            index.setdefault(hashlib.sha256(f.read(end - start)).hexdigest(), (base + start, end - start))
    return index


def link_to_safetensors(onnx_path: Path, safetensors_path: Path) -> tuple[int, int]:
    """Rewrite `onnx_path` (in the same folder as `safetensors_path`) so that every float32 initializer whose bytes
    equal a checkpoint tensor is read from the checkpoint. Returns (bytes shared, bytes left inside the graph)."""
    import onnx
    from onnx import numpy_helper

    if onnx_path.parent != safetensors_path.parent:
        raise ValueError("ONNX Runtime reads external data only from the model file's own folder")
    index = safetensors_index(safetensors_path)
    model = onnx.load(str(onnx_path))
    shared = inline = 0
    for tensor in model.graph.initializer:
        if tensor.data_type != onnx.TensorProto.FLOAT or tensor.data_location == onnx.TensorProto.EXTERNAL:
            inline += len(tensor.raw_data)
            continue
        data = numpy_helper.to_array(tensor).astype("<f4").tobytes()
        hit = index.get(hashlib.sha256(data).hexdigest())
        if hit is None:
            inline += len(data)
            continue
        offset, length = hit
        tensor.ClearField("raw_data")
        tensor.ClearField("float_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        del tensor.external_data[:]
        for key, value in (("location", safetensors_path.name), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        shared += length
    onnx.save_model(model, str(onnx_path))
    return shared, inline


def shift_external_offsets(onnx_path: Path, location: str, shift: int) -> int:
    """Move every external-data offset into `location` by `shift` bytes (after that file's header grew, e.g. by
    sdrt.model.weights.add_clip_text_prefix). Returns how many tensors were moved."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    moved = 0
    for tensor in model.graph.initializer:
        entries = {e.key: e for e in tensor.external_data}
        if tensor.data_location == onnx.TensorProto.EXTERNAL and entries.get("location") and entries["location"].value == location:
            entries["offset"].value = str(int(entries["offset"].value) + shift)
            moved += 1
    onnx.save_model(model, str(onnx_path))
    return moved
