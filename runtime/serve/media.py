"""Images on the wire: safe decoding of uploaded images, PNGs (with A1111's `parameters` chunk) as base64, and
the cheap latent preview (a fixed linear map from latent channels to RGB, fitted once from the model's decoder)."""

from __future__ import annotations

import base64
import binascii
import io
import json
import warnings

import numpy as np
from PIL import Image, PngImagePlugin

from sdrt.images import a1111_parameters, decoded_to_uint8
from sdrt.serve.schemas import FieldError

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")


def b64_to_bytes(data: str, field: str) -> bytes:
    """Base64 text (optionally a data: URL, as webuiapi sends) -> bytes."""
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise FieldError(field, f"{field} is not valid base64 (a PNG or JPEG, optionally as a data: URL)") from None


def decode_image(data: bytes, field: str, max_pixels: int, rgb: bool = True) -> Image.Image:
    """Bytes -> RGB PIL image (rgb=False: in its own mode, e.g. a mask's alpha), refusing anything but PNG/JPEG/WEBP/BMP and images over `max_pixels` before the
    pixels are decompressed (the header gives the size; PIL's own bomb check is an error here, not a warning)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
            w, h = image.size
            if w * h > max_pixels:
                raise FieldError(field, f"{field} is {w}x{h} = {w * h} pixels; at most {max_pixels} pixels are accepted")
            image.load()
    except FieldError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise FieldError(field, f"{field} is too large to decode safely ({err})") from None
    except Exception:  # PIL raises many types for broken files
        raise FieldError(field, f"{field} cannot be read as an image; send a PNG, JPEG, WEBP or BMP") from None
    if not rgb:
        return image
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.split()[-1])
        return background
    return image.convert("RGB")


def png_bytes(image: Image.Image, params: dict | None = None) -> bytes:
    """A PNG carrying A1111's `parameters` text and sdrt's JSON (what sd-parsers and image browsers read)."""
    info = None
    if params is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", a1111_parameters(params))
        info.add_text("sdrt", json.dumps(params, sort_keys=True))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info, compress_level=1)
    return buf.getvalue()


def png_b64(image: Image.Image, params: dict | None = None) -> str:
    return base64.b64encode(png_bytes(image, params)).decode("ascii")


INLINE_PIXELS = 256 * 256  # below this many pixels in all, encoding costs less than a hop to a worker thread


async def output_pngs(out) -> list[str]:
    """A PipelineOutput's images as base64 PNGs with their parameters; big ones encoded off the event loop."""
    from starlette.concurrency import run_in_threadpool

    def encode():
        return [png_b64(image, params) for image, params in zip(out.images, out.parameters)]

    if sum(image.width * image.height for image in out.images) <= INLINE_PIXELS:
        return encode()
    return await run_in_threadpool(encode)


class LatentPreview:
    """Latents -> RGB by one affine map per pixel: rgb = latent_channels @ W + b, fitted by least squares against
    the model's own VAE decoder (its output averaged over each latent pixel's patch) on a few smooth random latents.
    No per-model constants: fitted at load for whatever model is served."""

    def __init__(self, weights: np.ndarray, scale: int):
        self.weights = weights  # [C + 1, 3]
        self.scale = scale  # image pixels per latent pixel

    @classmethod
    def fit(cls, pipe, samples: int = 8, seed: int = 0) -> "LatentPreview":
        f = pipe.facts
        size = f.default_size // f.vae_scale_factor
        rng = np.random.default_rng(seed)
        coarse = rng.standard_normal((samples, f.latent_channels, max(1, size // 4), max(1, size // 4)))
        latents = np.kron(coarse, np.ones((1, 1, 4, 4)))[:, :, :size, :size].astype(np.float32)
        decoded = pipe.decode(latents)  # [N, 3, H, W] in about [-1, 1]
        s = f.vae_scale_factor
        n, _, h, w = decoded.shape
        pooled = decoded.reshape(n, 3, h // s, s, w // s, s).mean(axis=(3, 5))  # one colour per latent pixel
        x = latents.transpose(0, 2, 3, 1).reshape(-1, f.latent_channels)
        y = pooled.transpose(0, 2, 3, 1).reshape(-1, 3)
        design = np.concatenate([x, np.ones((len(x), 1), np.float32)], axis=1)
        weights, *_ = np.linalg.lstsq(design, y, rcond=None)
        return cls(weights.astype(np.float32), s)

    def __call__(self, latents: np.ndarray) -> list[Image.Image]:
        """[B, C, h, w] latents -> B RGB images at the output size (nearest-upscaled)."""
        x = latents.transpose(0, 2, 3, 1)
        rgb = x @ self.weights[:-1] + self.weights[-1]  # [B, h, w, 3] in about [-1, 1]
        pixels = decoded_to_uint8(rgb.transpose(0, 3, 1, 2))
        out = []
        for p in pixels:
            image = Image.fromarray(p)
            out.append(image.resize((image.width * self.scale, image.height * self.scale), Image.NEAREST))
        return out
