"""OpenAI's images API (/v1/images/generations, /v1/images/edits), so the official `openai` client works;
sdrt's knobs (negative_prompt, steps, guidance_scale, seed, scheduler, strength) ride as extra body fields."""

from __future__ import annotations

import json
import re
import time

import numpy as np
from PIL import Image

from fastapi import APIRouter, File, Form, Request, UploadFile
from starlette.concurrency import run_in_threadpool

from sdrt.serve.a1111 import resolve_sampler
from sdrt.serve.media import decode_image, output_pngs
from sdrt.serve.schemas import MAX_SEED, FieldError, ImageData, ImageGenerationRequest, ImagesResponse

router = APIRouter(prefix="/v1/images", tags=["OpenAI images"])


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """'WxH' -> (width, height); None or 'auto' -> the model's default size."""
    if size is None or size == "auto":
        return None, None
    match = re.fullmatch(r"(\d{1,5})x(\d{1,5})", size.strip())
    if not match:
        raise FieldError("size", f"size {size!r} is not 'WIDTHxHEIGHT' (e.g. '64x64') or 'auto'")
    return int(match.group(1)), int(match.group(2))


async def generate(request: Request, *, prompt: str, model: str | None, n: int, size: str | None,
                   response_format: str | None, negative_prompt: str | None, steps: int, guidance_scale: float,
                   seed: int | None, scheduler: str | None, image=None, strength: float = 0.8,
                   mask_image=None, timestep_spacing: str | None = None, loras: dict | None = None) -> ImagesResponse:
    service = request.app.state.service
    if response_format not in (None, "b64_json"):
        raise FieldError("response_format", f"response_format {response_format!r} is not served; use 'b64_json'")
    batcher = service.batcher(model)
    width, height = parse_size(size)
    plan = await service.plan(
        batcher, fields={"width": "size", "height": "size", "size": "size"}, prompt=prompt, negative_prompt=negative_prompt,
        num_inference_steps=steps, guidance_scale=guidance_scale, height=height, width=width, seed=seed,
        scheduler=resolve_sampler(scheduler, field="scheduler"), image=image, strength=strength, num_images_per_prompt=n,
        timestep_spacing=timestep_spacing,
        loras=loras,
        **({"mask_image": mask_image, "keep_unmasked": True} if mask_image is not None else {}),
    )
    job = service.submit(batcher, plan)
    await service.wait(job, request)
    out = job.output
    data = [ImageData(b64_json=b64) for b64 in await output_pngs(out)]
    return ImagesResponse(created=int(time.time()), data=data)


def parse_loras_form(text: str | None) -> dict | None:
    """The edits route's `loras` form field: a JSON object {name: scale}."""
    if text is None or not text.strip():
        return None
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value.values()):
        raise FieldError("loras", f"loras {text[:80]!r} is not a JSON object of {{name: scale}}, e.g. {{\"style\": 0.8}}")
    return value


@router.post("/generations", response_model=ImagesResponse)
async def generations(req: ImageGenerationRequest, request: Request):
    return await generate(request, prompt=req.prompt, model=req.model, n=req.n, size=req.size,
                          response_format=req.response_format, negative_prompt=req.negative_prompt, steps=req.steps,
                          guidance_scale=req.guidance_scale, seed=req.seed, scheduler=req.scheduler,
                          timestep_spacing=req.timestep_spacing, loras=req.loras)


def transparent_mask(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """OpenAI's edit mask (fully transparent = edit) as sdrt's (white = repaint)."""
    if "A" not in mask.getbands() and not (mask.mode == "P" and "transparency" in mask.info):
        raise FieldError("mask", f"mask has no alpha channel (mode {mask.mode}); send a PNG whose fully transparent "
                         "pixels mark what to edit")
    if mask.size != size:
        raise FieldError("mask", f"mask is {mask.size[0]}x{mask.size[1]} but the image is {size[0]}x{size[1]}; "
                         "send a mask of the image's size")
    alpha = np.asarray(mask.convert("RGBA").getchannel("A"))
    return Image.fromarray(((alpha == 0) * 255).astype(np.uint8))


@router.post("/edits", response_model=ImagesResponse)
async def edits(
    request: Request,
    image: UploadFile = File(..., description="the image to edit (PNG, JPEG, WEBP)"),
    prompt: str = Form(...),
    model: str | None = Form(None),
    n: int = Form(1, ge=1, le=64),
    size: str | None = Form(None),
    response_format: str | None = Form(None),
    mask: UploadFile | None = File(None, description="inpainting: a PNG of the image's size whose fully transparent "
                                   "pixels are repainted; the rest of the image is kept exactly"),
    negative_prompt: str | None = Form(None),
    steps: int = Form(20, ge=1, le=1000),
    guidance_scale: float = Form(7.5, ge=0.0, le=100.0),
    seed: int | None = Form(None, ge=0, le=MAX_SEED),
    scheduler: str | None = Form(None),
    strength: float = Form(0.8, gt=0.0, le=1.0),
    loras: str | None = Form(None, description='run-time LoRAs as JSON, e.g. {"style": 0.8}'),
):
    """img2img: the image is noised to `strength` of the schedule and denoised toward the prompt; with a mask, only
    its transparent part is (OpenAI's rule), and the rest comes back unchanged."""
    limits = request.app.state.service.config.limits
    data = await image.read()
    picture = await run_in_threadpool(decode_image, data, "image", limits.max_input_pixels)
    mask_image = None
    if mask is not None:
        raw = await run_in_threadpool(decode_image, await mask.read(), "mask", limits.max_input_pixels, False)
        mask_image = transparent_mask(raw, picture.size)
    return await generate(request, prompt=prompt, model=model, n=n, size=size, response_format=response_format,
                          negative_prompt=negative_prompt, steps=steps, guidance_scale=guidance_scale, seed=seed,
                          scheduler=scheduler, image=picture, strength=strength, mask_image=mask_image,
                          loras=parse_loras_form(loras))
