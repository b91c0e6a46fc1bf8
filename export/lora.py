"""LoRAs fused at export, and the export's way in for single-file checkpoints.

Both prepare a diffusers folder that stands in for the model: a single file is converted (sdrt.export.single_file),
LoRAs are fused into the UNet and text encoder (sdrt.adapters.lora, W += scale * alpha/rank * up @ down), and the export of
that folder (sdrt.export.onnx_export.export_model) records the original source and each LoRA's file, sha256 and
scale in its manifest (extras["loras"]).
"""

from __future__ import annotations

from sdrt.model.weights import prefix_text_encoder_keys

import contextlib
import shutil
import tempfile
from pathlib import Path

from sdrt.errors import ModelError
from sdrt.adapters.lora import fuse_into_modules


def fuse_into_folder(model_dir, loras, out_dir) -> list[dict]:
    """Write `model_dir` with `loras` [(file, scale)] fused into its UNet and text encoder to `out_dir` (VAE linked,
    tokenizer and scheduler copied); returns the LoRA records."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    text = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder")
    dtypes = next(unet.parameters()).dtype, next(text.parameters()).dtype
    if dtypes != (torch.float32, torch.float32):  # fuse in float32, store in the folder's own precision
        unet, text = unet.float(), text.float()
    modules = {"unet": unet, "text_encoder": getattr(text, "text_model", text)}
    records = [fuse_into_modules(path, scale, modules) for path, scale in loras]
    out_dir.mkdir(parents=True)
    if dtypes != (torch.float32, torch.float32):
        unet, text = unet.to(dtypes[0]), text.to(dtypes[1])
    unet.save_pretrained(out_dir / "unet")
    text.save_pretrained(out_dir / "text_encoder")
    prefix_text_encoder_keys(out_dir)  # loadable by transformers 4.x too
    (out_dir / "vae").symlink_to((model_dir / "vae").resolve(), target_is_directory=True)
    for name in ("tokenizer", "scheduler"):
        shutil.copytree(model_dir / name, out_dir / name)
    shutil.copy2(model_dir / "model_index.json", out_dir / "model_index.json")
    return records


@contextlib.contextmanager
def prepared_model(model, loras=(), allow_pickle: bool = False, workdir=None, **single_file_options):
    """Yield (diffusers folder, LoRA records) for `model` (a folder or a single file) with `loras` fused; the
    temporary folders made for it are removed afterwards."""
    from sdrt.export.single_file import convert_single_file

    model = Path(model).expanduser()
    if not model.exists():
        raise ModelError(f"model {model} does not exist; pass a diffusers-format folder or a single-file checkpoint")
    if model.is_dir() and not loras:
        yield model, []
        return
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".sdrt-prepare-", dir=workdir))
    try:
        folder = model
        if model.is_file():
            folder = convert_single_file(model, tmp / "converted", allow_pickle=allow_pickle, **single_file_options)
        records = []
        if loras:
            records = fuse_into_folder(folder, loras, tmp / "fused")
            folder = tmp / "fused"
        yield folder, records
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
