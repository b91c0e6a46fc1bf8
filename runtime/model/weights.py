"""Reading weight files: .safetensors (bfloat16 included) and torch pickles, shared by LoRA and textual inversion.

Pickles load only through torch.load(weights_only=True) (tensors, no code), and only when torch is installed.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from sdrt.errors import ModelError, torch_install_hint

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")



_MAGIC = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"RIFF", "a RIFF (WebP/WAV) file"),
          (b"GIF8", "a GIF image"), (b"\x08", "an ONNX model or other protobuf"), (b"\x1f\x8b", "a gzip archive"))


def sniff(path: Path) -> str:
    """What a weight file is by its content, never its suffix: "safetensors", "pickle" (torch zip or legacy
    pickle), or a description of something else ("a PNG image", "not a weight file")."""
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) >= 9 and head[8:9] == b"{":  # safetensors: 8-byte little-endian header size, then the JSON header
        return "safetensors"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch.save's zip, or a protocol-2+ pickle
        return "pickle"
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    return "empty" if not head else "unrecognised (neither safetensors nor a torch pickle)"


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
                       "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_, "BF16": np.uint16}


def _read_header(f) -> dict:
    """A .safetensors file's JSON header (8-byte little-endian size, then the JSON); leaves f at the tensor data."""
    (size,) = struct.unpack("<Q", f.read(8))
    if not 2 <= size <= 100_000_000:
        raise ValueError(f"header size {size} is not plausible")
    return json.loads(f.read(size))


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """All tensors of a .safetensors file as numpy arrays (bfloat16 widened to float32), and its metadata.

    Read directly (the format is an 8-byte header size, a JSON header, raw data) because safetensors' own numpy
    API refuses bfloat16, the usual dtype of published LoRAs and embeddings.
    """
    try:
        with open(path, "rb") as f:
            header = _read_header(f)
            data = f.read()
        metadata = header.pop("__metadata__", None) or {}
        tensors = {}
        for name, info in header.items():
            dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                raise ValueError(f"tensor {name!r} has dtype {info['dtype']}, which sdrt does not read")
            start, end = info["data_offsets"]
            if end > len(data):
                raise ValueError(f"tensor {name!r} runs past the end of the file (truncated?)")
            array = np.frombuffer(data[start:end], dtype=dtype).reshape(info["shape"])
            tensors[name] = _bf16_to_f32(array) if info["dtype"] == "BF16" else array
        return tensors, metadata
    except (OSError, ValueError, KeyError, TypeError, struct.error) as err:
        raise ModelError(f"{path} is not a readable .safetensors file ({err}); is it complete?") from None


def check_safetensors_complete(path: Path) -> None:
    """Header and size only (no tensor is read): a truncated or damaged file is named before a library fails on it
    with a message that does not say which file."""
    try:
        with open(path, "rb") as f:
            header = _read_header(f)
            data_start = f.tell()
        header.pop("__metadata__", None)
        end = max((int(info["data_offsets"][1]) for info in header.values()), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error) as err:
        raise ModelError(f"{path} is not a readable .safetensors file ({err}); re-download or re-save it") from None
    actual = Path(path).stat().st_size
    if actual < data_start + end:
        raise ModelError(f"{path} is truncated: {actual} bytes, its header needs {data_start + end}; re-download or re-save it")


def to_numpy(value):
    """torch tensors (nested in dicts and lists) -> numpy; other values as they are."""
    if hasattr(value, "detach") and hasattr(value, "numpy"):
        value = value.detach().cpu()
        return value.float().numpy() if value.is_floating_point() else value.numpy()
    if isinstance(value, dict):
        return {k: to_numpy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_numpy(v) for v in value)
    return value


def read_pickle(path: Path, what: str) -> dict:
    """A torch pickle file (.bin/.pt) read with torch.load(weights_only=True): tensors only, no code runs."""
    from sdrt.backends.base import module_available

    if not module_available("torch"):
        raise ModelError(
            f"{path} is a pickle file ({path.suffix}), which only torch can read: convert the {what} to .safetensors "
            "(e.g. on a machine with torch: safetensors.torch.save_file(torch.load(FILE, weights_only=True), OUT)), "
            f"or {torch_install_hint()}"
        )
    import torch

    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise ModelError(
            f"{path} could not be read as a {what} with torch.load(weights_only=True) ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); sdrt never unpickles arbitrary objects: convert it to "
            ".safetensors where you trust it"
        ) from None
    return to_numpy(data)


def read_weights(path: str | Path, what: str) -> tuple[dict, dict[str, str]]:
    """A .safetensors (by its content) or torch pickle file -> (tensors and values, safetensors metadata)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(f"{what} file {path} does not exist")
    kind = sniff(path)
    if kind == "safetensors":
        return read_safetensors(path)
    if kind == "pickle":
        return read_pickle(path, what), {}
    raise ModelError(f"{path} is not a {what} file: its content is {kind}; pass a .safetensors (or torch pickle) {what}")


# --- CLIP text encoder keys that transformers 4.x and 5.x both load -------------------------------------------------

CLIP_PREFIX = "text_model."


def add_clip_text_prefix(path: str | Path, align: int = 64) -> int:
    """Rename a CLIPTextModel safetensors file's keys in place to `text_model.<key>` (4.x's layout, which 5.x loads
    too; 5.x saves them without the prefix, and 4.x then loads a freshly initialised encoder with only a log
    warning). Only the header changes: the tensor bytes are copied as they are, shifted by a multiple of `align`
    bytes so their alignment stays. Returns the shift in bytes (0: already prefixed, nothing written)."""
    import json
    import os
    import struct

    path = Path(path)
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        if all(k.startswith(CLIP_PREFIX) for k in header if k != "__metadata__"):
            return 0
        renamed = {k if k == "__metadata__" or k.startswith(CLIP_PREFIX) else CLIP_PREFIX + k: v for k, v in header.items()}
        text = json.dumps(renamed, separators=(",", ":")).encode()
        shift = -(-(8 + len(text) - 8 - size) // align) * align  # the data moves by a multiple of `align`
        text += b" " * (size + shift - len(text))  # safetensors pads its header with spaces
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        with open(tmp, "wb") as out:
            out.write(struct.pack("<Q", len(text)) + text)
            while chunk := f.read(1 << 20):
                out.write(chunk)
    tmp.replace(path)
    return shift


def prefix_text_encoder_keys(model_dir: str | Path) -> None:
    """After save_pretrained: make `<model_dir>/text_encoder*/model.safetensors` loadable by transformers 4.x and 5.x."""
    for file in sorted(Path(model_dir).glob("text_encoder*/model.safetensors")):
        add_clip_text_prefix(file)
