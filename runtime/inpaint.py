"""Inpainting: repaint the white part of a mask, keep the rest, as diffusers' StableDiffusionInpaintPipeline does.

Two kinds of model, one set of steps (plan -> encode_text -> prepare_latents -> denoise -> finish):
- a dedicated inpainting UNet (SD 1.5/2 inpainting: in_channels = latent + 1 mask + latent masked image, from its
  config) sees [latents, mask, masked-image latents] stacked on the channel axis at every call;
- any ordinary UNet (in_channels = latent) denoises as usual, and after every step the unmasked part of the latents
  is replaced by the image's own latents noised to the next step's level (diffusers' 4-channel path).

The mask, as both libraries take it (sdrt.inpaint.load_mask): white (>= 50% grey after resizing) is repainted, black
is kept. A mask with a non-trivial alpha channel uses the alpha (A1111's rule: painted strokes on a transparent
layer); otherwise colour is converted to greyscale (PIL "L", ITU-R 601 luma, as diffusers converts). A mask of
another size than the init image is resized with it when their aspect ratios agree (as diffusers resizes both to
the output size); one of another shape is refused. An all-black mask (nothing to repaint) is refused; an all-white
one repaints everything (the image still conditions a dedicated inpainting UNet only through its latents at
strength < 1). `mask_blur` (pixels, A1111's field) blurs the mask before it is thresholded and gives the soft edge of
the paste-back; `keep_unmasked` pastes the generated image into the init image through that mask, so pixels
outside it keep their values exactly (when the output size equals the image's).
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from sdrt.errors import InputError

ASPECT_TOLERANCE = 0.01  # relative difference of mask and image aspect ratios still taken as "the same shape"


@dataclasses.dataclass(frozen=True)
class Mask:
    """A checked mask at the output size."""

    binary: np.ndarray  # float32 [1, 1, H, W] in {0, 1}: 1 = repaint (what the networks see)
    soft: np.ndarray  # float32 [H, W] in [0, 1]: the blurred mask for the paste-back (equal to binary without blur)
    blur: int
    keep_unmasked: bool
    content: str = "original"  # what the repainted region starts from (MASKED_CONTENT)

    @property
    def coverage(self) -> float:
        return float(self.binary.mean())


# What the repainted region's latents start from before they are noised to the first timestep (A1111's "masked
# content" 1/2/3): the image's own latents, the row's initial noise, or zeros. (A1111's 0, "fill", is a pixel-space
# step done before encoding: sdrt.serve.a1111_inpaint.) Only strength < 1 sees it: at 1 the start is noise alone.
MASKED_CONTENT = ("original", "latent_noise", "latent_nothing")


def fill_latents(latents: np.ndarray, mask: np.ndarray, noise: np.ndarray, content: str) -> np.ndarray:
    """Image latents [B, C, h, w] with the repainted region (mask [B, 1, h, w], 1 = repaint) replaced as `content` says:
    "latent_noise" by the row's initial noise (A1111 fills with the seed's first draw, the same noise), "latent_nothing"
    by zeros."""
    if content == "original":
        return latents
    fill = noise if content == "latent_noise" else np.zeros_like(latents)
    return (latents * (1 - mask) + fill * mask).astype(np.float32, copy=False)


def _mask_image(mask, max_pixels: int | None) -> Image.Image:
    """A path, PIL image or array as a PIL image (not yet greyscale)."""
    if isinstance(mask, (str, Path)):
        from sdrt.images import _open_path

        return _open_path(Path(mask), max_pixels, "mask image")
    if isinstance(mask, np.ndarray):
        if mask.ndim == 3 and mask.shape[-1] == 1:
            mask = mask[..., 0]
        if mask.ndim not in (2, 3) or (mask.ndim == 3 and mask.shape[-1] not in (3, 4)) or 0 in mask.shape:
            raise InputError(f"mask array has shape {mask.shape}; pass an HxW array (white = repaint)")
        if mask.dtype == np.bool_:
            mask = mask.astype(np.uint8) * 255
        elif np.issubdtype(mask.dtype, np.floating):
            if not np.all(np.isfinite(mask)) or mask.min() < 0 or mask.max() > 1:
                raise InputError("a float mask array must hold values in [0, 1] (1 = repaint); pass uint8 0..255 otherwise")
            mask = np.round(mask * 255).astype(np.uint8)
        elif mask.dtype != np.uint8:
            raise InputError(f"mask array has dtype {mask.dtype}; pass uint8 0..255, bool, or float in [0, 1]")
        return Image.fromarray(np.ascontiguousarray(mask))
    if isinstance(mask, Image.Image):
        return mask
    raise InputError(f"mask of type {type(mask).__name__} is not supported; pass a path, PIL image or HxW array")


def to_grey(mask: Image.Image) -> Image.Image:
    """Greyscale the way A1111 and diffusers read masks: the alpha channel when it holds the strokes, else luma."""
    if mask.mode in ("RGBA", "LA", "PA") or (mask.mode == "P" and "transparency" in mask.info):
        rgba = mask.convert("RGBA")
        alpha = rgba.getchannel("A")
        if alpha.getextrema() != (255, 255):
            return alpha
        return rgba.convert("RGB").convert("L")
    if mask.mode in ("L", "RGB"):
        return mask
    from sdrt.images import to_rgb  # 1, P, I;16, F, CMYK...: as the init image is read

    return to_rgb(mask).convert("L")


def invert_mask(mask, max_pixels: int | None = None) -> Image.Image:
    """The mask with repaint and keep swapped (A1111's inpainting_mask_invert), read as load_mask reads it."""
    return ImageOps.invert(to_grey(_mask_image(mask, max_pixels)).convert("L"))


def load_mask(mask, image_size: tuple[int, int], width: int, height: int, blur=0, keep_unmasked=False,
              max_pixels: int | None = None, content: str = "original") -> Mask:
    """Check and prepare a mask for an init image of `image_size` and an output of width x height (before any
    network runs). Raises InputError naming the problem and the fix."""
    if not isinstance(blur, (int, np.integer)) or isinstance(blur, bool) or not 0 <= blur <= 256:
        raise InputError(f"mask_blur {blur!r} must be an integer number of pixels in 0..256 (A1111's default is 4)")
    if content not in MASKED_CONTENT:
        raise InputError(f"masked_content {content!r} is not one of {', '.join(MASKED_CONTENT)}")
    if not isinstance(keep_unmasked, bool):
        raise InputError(f"keep_unmasked {keep_unmasked!r} must be True or False")
    image = to_grey(_mask_image(mask, max_pixels))
    if image.size != tuple(image_size):
        (mw, mh), (iw, ih) = image.size, image_size
        if abs((mw / mh) / (iw / ih) - 1) > ASPECT_TOLERANCE:
            raise InputError(f"mask is {mw}x{mh} but the init image is {iw}x{ih}: another shape; "
                             "pass a mask of the image's size (white = repaint)")
    if image.size != (width, height):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = image.resize((width, height), resample=Image.LANCZOS)  # as diffusers' mask processor
    image = image.convert("L")
    if blur:
        image = image.filter(ImageFilter.GaussianBlur(int(blur)))
    soft = np.asarray(image, dtype=np.float32) / np.float32(255.0)
    binary = (soft >= 0.5).astype(np.float32)  # diffusers' binarize: < 0.5 -> 0, else 1
    if not binary.any():
        raise InputError("mask is all black after thresholding at 50% grey: nothing to repaint; "
                         "paint the region to repaint white (or run img2img without a mask)")
    return Mask(binary[None, None], soft if blur else binary, int(blur), keep_unmasked, content)


def plan_mask(facts, model_name: str, init_image, mask_image, blur, keep_unmasked, content, width, height,
              max_pixels: int | None):
    """The checked mask for a request (load_mask), or None; an inpainting UNet cannot run without one."""
    if mask_image is None:
        if facts.inpainting_unet:
            raise InputError(f"{model_name} is an inpainting model (its UNet takes the mask and the masked image): "
                             "pass image= and mask_image= (white = repaint)")
        if blur or keep_unmasked or content != "original":
            raise InputError("mask_blur, keep_unmasked and masked_content apply to inpainting; pass mask_image= too")
        return None
    if init_image is None:
        raise InputError("mask_image needs the image it masks: pass image= too")
    return load_mask(mask_image, init_image.size, width, height, blur, keep_unmasked, max_pixels, content)


def latent_mask(binary: np.ndarray, h: int, w: int) -> np.ndarray:
    """[1, 1, H, W] -> [1, 1, h, w] by nearest neighbour, as torch.nn.functional.interpolate's default mode."""
    big_h, big_w = binary.shape[-2:]
    rows = np.minimum(np.floor(np.arange(h) * np.float32(big_h / h)).astype(int), big_h - 1)
    cols = np.minimum(np.floor(np.arange(w) * np.float32(big_w / w)).astype(int), big_w - 1)
    return np.ascontiguousarray(binary[..., rows[:, None], cols[None, :]])


def masked_pixels(pixels: np.ndarray, binary: np.ndarray) -> np.ndarray:
    """The init image [1, 3, H, W] in [-1, 1] with the region to repaint set to 0 (grey), as diffusers masks it."""
    return (pixels * (binary < 0.5)).astype(np.float32)


@dataclasses.dataclass
class InpaintRows:
    """Per-row inpainting data in a Batch, stacked in the batch's row order (dropped with the rows)."""

    mask: np.ndarray  # float32 [rows, 1, h, w]: 1 = repaint
    masked: np.ndarray | None  # [rows, C, h, w] latents of the masked image: a dedicated inpainting UNet's input
    image: np.ndarray | None  # [rows, C, h, w] latents of the init image: the kept region (ordinary UNets)
    noise: np.ndarray | None  # [rows, C, h, w] the initial noise, re-applied to `image` at every step

    @property
    def conditions_unet(self) -> bool:
        return self.masked is not None

    def select(self, keep) -> "InpaintRows":
        fields = (getattr(self, f.name) for f in dataclasses.fields(self))  # (astuple would deep-copy every array)
        return InpaintRows(*(None if a is None else a[keep] for a in fields))

    def unet_input(self, unet_in: np.ndarray, guided: bool) -> np.ndarray:
        """[latents, mask, masked-image latents] on the channel axis (the uncond and cond halves share them)."""
        if not self.conditions_unet:
            return unet_in
        extra = np.concatenate([self.mask, self.masked], axis=1)
        return np.concatenate([unet_in, np.concatenate([extra, extra]) if guided else extra], axis=1)

    def device_tables(self, sched, guided: bool) -> dict:
        """The same data for the device loop (sdrt.device_loop), computed once: `concat` [UNet rows, 1 + C, h, w]
        (an inpainting UNet's extra channels, uncond and cond halves alike), or `mask` [rows, 1, h, w] with `kept`
        [num_calls, rows, C, h, w], the kept region after each call (`blend`'s values, by the same numpy code)."""
        if self.conditions_unet:
            extra = np.concatenate([self.mask, self.masked], axis=1)
            return {"concat": np.concatenate([extra, extra]) if guided else extra}
        return {"mask": self.mask, "kept": np.stack([self.kept_after(sched, i) for i in range(sched.num_calls)])}

    def kept_after(self, sched, i: int) -> np.ndarray:
        """The kept region's latents after call i: the image's, noised to call i+1's level (clean after the last)."""
        return self.image if i + 1 >= sched.num_calls else sched.add_noise(self.image, self.noise, i + 1)

    def blend(self, x: np.ndarray, sched, i: int) -> np.ndarray:
        """After step i (ordinary UNets): the kept region becomes the image's latents at call i+1's noise level
        (clean after the last call), as diffusers' 4-channel inpainting does."""
        if self.image is None:
            return x
        return ((1 - self.mask) * self.kept_after(sched, i) + self.mask * x).astype(x.dtype, copy=False)


def composite(generated: np.ndarray, base: np.ndarray, soft: np.ndarray) -> np.ndarray:
    """uint8 [B, H, W, 3] generated images over uint8 [1, H, W, 3] `base` through `soft` [H, W] in [0, 1]
    (1 = generated): where it is 0 the base's pixels come back exactly."""
    m = soft[None, :, :, None].astype(np.float32)
    base = base.astype(np.float32)
    out = base * (1 - m) + generated.astype(np.float32) * m
    out = np.where(m == 0, base, out)  # exact, whatever the float rounding
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def paste_back(generated: np.ndarray, init_image: Image.Image, mask: Mask) -> np.ndarray:
    """uint8 [B, H, W, 3] generated images composited over the init image (resized to H x W) through the soft
    mask: where it is 0 the init image's pixels come back exactly."""
    h, w = generated.shape[1:3]
    base = init_image if init_image.size == (w, h) else init_image.resize((w, h), resample=Image.LANCZOS)
    return composite(generated, np.asarray(base)[None], mask.soft)
