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
    """Write `model_dir` with `loras` [(file, scale)] fused into its UNet and text encoder(s) (SDXL: both) to
    `out_dir` (VAE linked, tokenizers and scheduler copied); returns the LoRA records."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from sdrt.families import family_spec
    from sdrt.model.facts import read_model_facts

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    spec = family_spec(read_model_facts(model_dir).family)
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    texts = {folder: (CLIPTextModelWithProjection if folder == "text_encoder_2" else CLIPTextModel).from_pretrained(
        model_dir, subfolder=folder) for _, _, folder in spec.text_encoders}
    dtypes = {name: next(m.parameters()).dtype for name, m in {"unet": unet, **texts}.items()}
    unet = unet.float()  # fuse in float32, store in the folder's own precision
    texts = {name: m.float() for name, m in texts.items()}
    modules = {"unet": unet, **{name: getattr(m, "text_model", m) for name, m in texts.items()}}
    records = [fuse_into_modules(path, scale, modules) for path, scale in loras]
    out_dir.mkdir(parents=True)
    unet.to(dtypes["unet"]).save_pretrained(out_dir / "unet")
    for name, text in texts.items():
        text.to(dtypes[name]).save_pretrained(out_dir / name)
    prefix_text_encoder_keys(out_dir)  # loadable by transformers 4.x too
    (out_dir / "vae").symlink_to((model_dir / "vae").resolve(), target_is_directory=True)
    for _, tokenizer, _ in spec.text_encoders:
        shutil.copytree(model_dir / tokenizer, out_dir / tokenizer)
    shutil.copytree(model_dir / "scheduler", out_dir / "scheduler")
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
