"""Images in and out: init-image preprocessing, decoded arrays to PIL, PNGs with their parameters.

PNG text metadata follows AUTOMATIC1111's `parameters` layout (what image browsers and web UIs read),
plus a `sdrt` chunk holding the same as JSON.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from sdrt.errors import InputError
from sdrt.schedulers import A1111_NAMES

SAMPLER_NAMES = A1111_NAMES  # sdrt scheduler name -> the name A1111's metadata uses


def load_image(image) -> Image.Image:
    """A path, PIL image or HxWx3 uint8 array as an RGB PIL image (RGBA and greyscale are converted)."""
    if isinstance(image, (str, Path)):
        try:
            image = Image.open(image)
            image.load()
        except FileNotFoundError:
            raise InputError(f"init image {image} does not exist") from None
        except (UnidentifiedImageError, OSError) as err:
            raise InputError(f"init image {image} cannot be read as an image ({err}); use a PNG or JPEG") from None
    elif isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
            raise InputError(f"init image array has shape {image.shape}; pass an HxWx3 uint8 array")
        if image.dtype != np.uint8:
            raise InputError(f"init image array has dtype {image.dtype}; pass uint8 pixels in 0..255")
        image = Image.fromarray(image[..., :3] if image.shape[-1] != 1 else image[..., 0])
    elif not isinstance(image, Image.Image):
        raise InputError(f"init image of type {type(image).__name__} is not supported; pass a path, PIL image or uint8 array")
    if image.mode == "RGBA":  # composite on white, as people expect from a transparent PNG
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.split()[-1])
        return background
    return image.convert("RGB")


def image_to_array(image: Image.Image, width: int, height: int) -> np.ndarray:
    """RGB PIL image -> float32 [1, 3, H, W] in [-1, 1], resized with Lanczos as diffusers does."""
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    return (pixels.transpose(2, 0, 1)[None] * 2.0 - 1.0).astype(np.float32)


def decoded_to_uint8(decoded: np.ndarray) -> np.ndarray:
    """VAE output [B, 3, H, W] in about [-1, 1] -> uint8 [B, H, W, 3], rounded as diffusers rounds."""
    pixels = np.clip(decoded / 2.0 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
    return (pixels * 255.0).round().astype(np.uint8)


def a1111_parameters(params: dict) -> str:
    """The `parameters` text of AUTOMATIC1111's PNGs."""
    lines = [params.get("prompt", "")]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    fields = [
        ("Steps", params.get("steps")),
        ("Sampler", SAMPLER_NAMES.get(params.get("scheduler"), params.get("scheduler"))),
        ("CFG scale", params.get("guidance_scale")),
        ("Seed", params.get("seed")),
        ("Size", f"{params.get('width')}x{params.get('height')}"),
        ("Model", params.get("model")),
        ("Denoising strength", params.get("strength") if params.get("img2img") else None),
        ("Backend", params.get("backend")),
        ("Version", f"sdrt {params.get('sdrt_version')}"),
    ]
    lines.append(", ".join(f"{k}: {v}" for k, v in fields if v is not None))
    return "\n".join(lines)


def save_png(image: Image.Image, path: str | Path, params: dict) -> Path:
    """Save with the generation parameters as PNG text; written to a temporary name, then renamed."""
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", a1111_parameters(params))
    info.add_text("sdrt", json.dumps(params, sort_keys=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a PNG should get the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
