"""Images in and out: init-image preprocessing, decoded arrays to PIL, PNGs with their parameters.

PNG text metadata follows AUTOMATIC1111's `parameters` layout (what image browsers and web UIs read),
plus a `sdrt` chunk holding the same as JSON.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from sdrt.errors import InputError
from sdrt.schedulers import A1111_NAMES

SAMPLER_NAMES = A1111_NAMES  # sdrt scheduler name -> the name A1111's metadata uses


def load_image(image, max_pixels: int | None = None) -> Image.Image:
    """A path, PIL image or HxW(x1/3/4) uint8 array as an RGB PIL image (alpha on white, 16-bit and float scaled).

    Paths are opened header first: an image over `max_pixels` (the memory budget's share, or PIL's own limit) is
    refused before its pixels are decoded, so a small compressed file cannot expand to gigabytes."""
    if isinstance(image, (str, Path)):
        image = _open_path(Path(image), max_pixels)
    elif isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
            raise InputError(f"init image array has shape {image.shape}; pass an HxWx3 uint8 array")
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise InputError(f"init image array has shape {image.shape}: it has no pixels; pass an HxWx3 uint8 array")
        if image.dtype != np.uint8:
            raise InputError(f"init image array has dtype {image.dtype}; pass uint8 pixels in 0..255")
        image = Image.fromarray(np.ascontiguousarray(image[..., 0] if image.shape[-1] == 1 else image))
    elif not isinstance(image, Image.Image):
        raise InputError(f"init image of type {type(image).__name__} is not supported; pass a path, PIL image or uint8 array")
    if image.width < 1 or image.height < 1:
        raise InputError(f"init image is {image.width}x{image.height}: it has no pixels")
    return to_rgb(image)


def _open_path(path: Path, max_pixels: int | None, what: str = "init image") -> Image.Image:
    """Decode an image file with a pixel limit; errors name it as `what` ("init image", "mask image")."""
    image = None
    try:
        with warnings.catch_warnings():
            # Over PIL's warning limit is refused unless a memory budget says what fits; over twice it, PIL refuses.
            warnings.simplefilter("ignore" if max_pixels else "error", Image.DecompressionBombWarning)
            image = Image.open(path)
            if max_pixels is not None and image.width * image.height > max_pixels:
                raise Image.DecompressionBombError(f"{image.width * image.height} pixels")
            image.load()
    except FileNotFoundError:
        raise InputError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise InputError(f"{what} {path} is a folder; pass an image file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        if image is not None:
            size, limit = f"{image.width}x{image.height}", max_pixels or Image.MAX_IMAGE_PIXELS
        else:  # PIL refused at open: over twice its own limit, whatever the budget
            found = re.search(r"\((\d+) pixels\)", str(err))
            size, limit = (f"{int(found.group(1)):,} pixels" if found else "too large"), 2 * Image.MAX_IMAGE_PIXELS
        raise InputError(
            f"{what} {path} is {size}, more than the {limit:,} pixels it may decode to here "
            "(the memory budget, or a decompression-bomb limit); scale it down first"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise InputError(f"{what} {path} cannot be read as an image ({str(err).splitlines()[0] if str(err) else type(err).__name__}); use a PNG or JPEG") from None
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, converting what PIL's own convert gets wrong: 16-bit and 32-bit greyscale (I;16, I) would clip to
    white, float (F) is taken as 0..1 when it is; transparency is composited on white."""
    if image.mode.startswith("I") or image.mode == "F":
        grey = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            grey = grey * 255.0 if np.nanmax(grey, initial=0.0) <= 1.0 else grey
        elif image.mode != "I" or np.max(grey, initial=0) > 255:  # I;16*: 0..65535; I: 16-bit when above 255
            grey = grey / 257.0
        grey = np.nan_to_num(grey).clip(0, 255).round().astype(np.uint8)
        image = Image.fromarray(grey)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
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
    """The `parameters` text of AUTOMATIC1111's PNGs. Run-time LoRAs ("name:scale, ...") go back into the prompt as
    A1111 writes them (`<lora:name:scale>`), so pasting the text into A1111 applies them again."""
    tags = "".join(f" <lora:{item.strip()}>" for item in (params.get("loras") or "").split(",") if item.strip())
    lines = [params.get("prompt", "") + tags]
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
        ("Mask blur", params.get("mask_blur") if params.get("inpaint") else None),
        ("Inpaint area", "Only masked" if params.get("inpaint_full_res") else None),
        ("Masked area padding", params.get("inpaint_full_res_padding") if params.get("inpaint_full_res") else None),
        ("Backend", params.get("backend")),
        ("Version", f"sdrt {params.get('sdrt_version')}"),
    ]
    lines.append(", ".join(f"{k}: {v}" for k, v in fields if v is not None))
    return "\n".join(lines)


def save_png(image: Image.Image, path: str | Path, params: dict) -> Path:
    """Save with the generation parameters (kept for callers of the PNG-only API; see sdrt.outputs)."""
    from sdrt.outputs import save_image

    return save_image(image, path, params)
