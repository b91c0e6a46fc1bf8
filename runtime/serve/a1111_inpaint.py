"""A1111's img2img inpainting fields, done the way its web UI does them, around sdrt's own inpainting.

`prepare` turns the request's image and mask into what `Pipeline.plan` takes; `finish` pastes the generated images
back. The fields (A1111's StableDiffusionProcessingImg2Img):
- mask: white is repainted (an alpha channel holding strokes is the mask, as A1111 reads RGBA masks);
  inpainting_mask_invert=1 repaints the black instead.
- mask_blur: a Gaussian blur of that many pixels on the mask (PIL's; A1111 uses OpenCV's with the same sigma), before
  the mask is thresholded for the networks and as the soft edge of the paste-back.
- inpainting_fill: 0 "fill" (the masked region is first filled with the surrounding colours by successive blurs),
  1 "original" (left as is), 2 "latent noise" and 3 "latent nothing" (the region's latents start from the seed's
  noise or from zeros: the pipeline's masked_content, sdrt.inpaint.fill_latents).
- inpaint_full_res ("Only masked"): the mask's bounding box, grown by inpaint_full_res_padding pixels and then to the
  request's aspect ratio, is cut out, scaled to width x height, inpainted at that full resolution, scaled back and
  pasted into the original image; the answer has the init image's size. Without it the image is resized to
  width x height and the answer has that size.
Either way the result is composited over the (resized) init image through the blurred mask, so pixels outside it
keep their values (A1111's overlay; without full_res it doubles the mask there, as A1111 does).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from sdrt.inpaint import ASPECT_TOLERANCE, composite, to_grey
from sdrt.serve.schemas import FieldError

FILL_NAMES = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}
MASKED_CONTENT = {0: "original", 1: "original", 2: "latent_noise", 3: "latent_nothing"}  # the pipeline's masked_content


@dataclasses.dataclass
class Prepared:
    image: Image.Image  # what the pipeline inpaints (width x height)
    mask: Image.Image  # "L", blurred: white = repaint
    base: Image.Image  # the image the result is pasted into (init image, or init image at width x height)
    overlay: np.ndarray  # float32 [H, W] of `base`: 1 = generated pixel, 0 = base pixel kept
    box: tuple | None  # (x1, y1, x2, y2) in `base` where the generated image goes (full_res), else None
    params: dict  # what goes into each image's metadata
    masked_content: str = "original"  # the pipeline's masked_content (inpainting_fill 2/3)


def crop_box(mask: np.ndarray, pad: int, width: int, height: int) -> tuple[int, int, int, int] | None:
    """The bounding box of the mask's non-zero pixels grown by `pad`, then to width:height (around its centre,
    shifted to stay inside the image); None when the mask is empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    img_h, img_w = mask.shape
    x1, x2 = max(int(xs.min()) - pad, 0), min(int(xs.max()) + 1 + pad, img_w)
    y1, y2 = max(int(ys.min()) - pad, 0), min(int(ys.max()) + 1 + pad, img_h)

    def grow(lo, hi, want, limit):
        extra = max(0, int(want) - (hi - lo))
        lo, hi = lo - extra // 2, hi + extra - extra // 2
        shift = max(0, hi - limit) - max(0, -lo)  # back inside: right/bottom overflow left, left/top overflow right
        lo, hi = lo - shift, hi - shift
        return max(lo, 0), min(hi, limit)

    if (x2 - x1) / (y2 - y1) > width / height:
        y1, y2 = grow(y1, y2, (x2 - x1) * height / width, img_h)
    else:
        x1, x2 = grow(x1, x2, (y2 - y1) * width / height, img_w)
    return x1, y1, x2, y2


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The masked region replaced by the colours around it: the unmasked pixels blurred at falling radii (large to
    small), each layer composited over the last, so far-away colours fill first and near ones refine."""
    keep = ImageOps.invert(mask.convert("L"))
    layer = Image.new("RGBA", image.size)
    layer.paste(image.convert("RGB"), mask=keep)  # unmasked pixels, alpha = how much they are kept
    premultiplied = layer.convert("RGBa")
    out = Image.new("RGBA", image.size)
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = premultiplied.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA") if radius else layer
        for _ in range(repeats):
            out.alpha_composite(blurred)
    return out.convert("RGB")


def prepare(image: Image.Image, mask: Image.Image, width: int, height: int, mask_blur: int, inpainting_fill: int,
            full_res: bool, padding: int, invert: bool) -> Prepared:
    if inpainting_fill not in FILL_NAMES:
        raise FieldError("inpainting_fill", f"inpainting_fill {inpainting_fill} is not one of 0 (fill), 1 (original), "
                         "2 (latent noise), 3 (latent nothing)")
    mask = to_grey(mask).convert("L")
    if invert:
        mask = ImageOps.invert(mask)
    if mask.size != image.size:
        (mw, mh), (iw, ih) = mask.size, image.size
        if abs((mw / mh) / (iw / ih) - 1) > ASPECT_TOLERANCE:
            raise FieldError("mask", f"mask is {mw}x{mh} but init_images[0] is {iw}x{ih}; send a mask of the image's size")
        mask = mask.resize(image.size, Image.LANCZOS)
    if mask_blur:
        mask = mask.filter(ImageFilter.GaussianBlur(mask_blur))
    soft = np.asarray(mask, np.float32) / 255.0
    params = {"mask_blur": mask_blur, "inpainting_fill": inpainting_fill, "inpaint_full_res": full_res,
              "inpaint_full_res_padding": padding, "inpainting_mask_invert": int(invert)}
    if full_res:
        box = crop_box(np.asarray(mask) > 0, padding, width, height)
        if box is None:
            raise FieldError("mask", "mask is empty (all black): nothing to repaint; paint the region to repaint white")
        work_image = image.crop(box).resize((width, height), Image.LANCZOS)
        work_mask = mask.crop(box).resize((width, height), Image.LANCZOS)
        base, overlay = image, soft
    else:
        box = None
        work_image = image if image.size == (width, height) else image.resize((width, height), Image.LANCZOS)
        work_mask = mask if mask.size == (width, height) else mask.resize((width, height), Image.LANCZOS)
        base = work_image
        overlay = np.clip(np.asarray(work_mask, np.float32) * 2 / 255.0, 0, 1)  # A1111 doubles the mask here
    if inpainting_fill == 0:
        work_image = fill_masked(work_image, work_mask)
    return Prepared(work_image, work_mask, base, overlay, box, params, MASKED_CONTENT[inpainting_fill])


def finish(prep: Prepared, images: list[Image.Image]) -> list[Image.Image]:
    """Generated images (width x height) pasted back into the base image through the overlay mask."""
    out = []
    for image in images:
        if prep.box is not None:
            x1, y1, x2, y2 = prep.box
            canvas = prep.base.copy()
            canvas.paste(image.resize((x2 - x1, y2 - y1), Image.LANCZOS), (x1, y1))
            image = canvas
        merged = composite(np.asarray(image)[None], np.asarray(prep.base.convert("RGB"))[None], prep.overlay)
        out.append(Image.fromarray(merged[0]))
    return out
