"""AUTOMATIC1111's web UI API (/sdapi/v1), as its clients (webuiapi, editors' plugins, scripts) speak it:
field names, sampler names and the response shape (`images` as base64 PNGs with the parameters chunk,
`parameters`, `info` as a JSON string). Routes validate and enqueue; the batcher runs the work."""

from __future__ import annotations

import dataclasses
import json
import re
import time

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from sdrt.adapters.prompt_loras import parse_prompt_loras
from sdrt.errors import InputError
from sdrt.images import SAMPLER_NAMES, a1111_parameters
from sdrt.serve import a1111_inpaint
from sdrt.serve.media import b64_to_bytes, decode_image, output_pngs
from sdrt.serve.schemas import (
    A1111ImagesResponse, EmbeddingItem, EmbeddingsResponse, FieldError, Img2ImgRequest, LoraItem, OptionsRequest,
    OptionsResponse, ProgressResponse, ProgressState, SamplerItem, SchedulerItem, ScriptsResponse, SDModelItem,
    Txt2ImgRequest,
)

router = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111"])

A1111_SAMPLERS = {a1111: sdrt for sdrt, a1111 in SAMPLER_NAMES.items()}  # "Euler a" -> "euler_a", ...
ALIASES = {"k_euler": "euler", "k_euler_a": "euler_a", "k_dpmpp_2m": "dpmpp_2m", "k_dpmpp_2m_ka": "dpmpp_2m_karras",
           "plms": "pndm", "ddim": "ddim"}
SCHEDULE_TYPES = {"automatic": "", "uniform": "", "karras": "_karras", "exponential": "_exponential"}


def resolve_sampler(sampler: str | None, schedule: str | None = None, field: str = "sampler_name") -> str | None:
    """An A1111 sampler name (or alias, or sdrt scheduler name) and schedule type (A1111 1.9's separate
    `scheduler` field: Automatic, Uniform, Karras, Exponential) -> an sdrt scheduler name (None: the model's own).
    Unknown names are a 422 listing what is served."""
    base = None
    if sampler:
        lowered = {k.lower(): v for k, v in {**A1111_SAMPLERS, **ALIASES, **{v: v for v in SAMPLER_NAMES}}.items()}
        base = lowered.get(sampler.strip().lower())
        if base is None:
            raise FieldError(field, f"{field} {sampler!r} is not served; choose one of {', '.join(A1111_SAMPLERS)}")
    if schedule is None:
        return base
    suffix = SCHEDULE_TYPES.get(schedule.strip().lower())
    if suffix is None:
        raise FieldError("scheduler", f"scheduler {schedule!r} is not served; choose Automatic, Uniform, Karras or Exponential")
    if not suffix:
        return base
    if base is None:
        raise FieldError("scheduler", f"the {schedule} schedule needs a sampler_name (e.g. 'DPM++ 2M')")
    root = base.removesuffix("_karras").removesuffix("_exponential")
    if root + suffix not in SAMPLER_NAMES:
        with_it = sorted(SAMPLER_NAMES[n[: -len(suffix)]] for n in SAMPLER_NAMES if n.endswith(suffix))
        raise FieldError("scheduler", f"the {schedule} schedule is served with {', '.join(with_it)}; not {sampler!r}")
    return root + suffix


def model_name(checkpoint: str) -> str:
    """A1111 titles look like 'name.safetensors [hash]': served names match without the hash and extension."""
    name = re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", checkpoint.strip())
    return re.sub(r"\.(safetensors|ckpt)$", "", name)


async def generate(req, request: Request, image=None, strength: float = 0.8, inpaint=None) -> A1111ImagesResponse:
    """One A1111 request through the batcher; `inpaint` (sdrt.serve.a1111_inpaint.Prepared): its mask goes to the
    plan and its paste-back runs on the images before they are encoded."""
    service = request.app.state.service
    override = (req.override_settings or {}).get("sd_model_checkpoint")
    if override is not None and not isinstance(override, str):
        raise FieldError(("body", "override_settings", "sd_model_checkpoint"), "sd_model_checkpoint must be a model name")
    batcher = service.batcher(model_name(override or service.a1111_model), field="override_settings.sd_model_checkpoint")
    scheduler = resolve_sampler(req.sampler_name or req.sampler_index, req.scheduler)
    try:  # A1111's <lora:NAME:SCALE> tags: taken out of the prompt, applied as run-time LoRAs
        prompt, loras = parse_prompt_loras(req.prompt)
    except InputError as err:
        raise FieldError("prompt", str(err)) from None
    plan = await service.plan(
        batcher, fields={"images": "batch_size"}, loras=loras, lora_field="prompt",
        prompt=prompt, negative_prompt=req.negative_prompt or None,
        num_inference_steps=req.steps, guidance_scale=req.cfg_scale, height=req.height, width=req.width,
        seed=None if req.seed == -1 else req.seed, scheduler=scheduler, image=image, strength=strength,
        num_images_per_prompt=req.batch_size * req.n_iter, **({"mask_image": inpaint.mask, "masked_content": inpaint.masked_content} if inpaint else {}),
    )
    job = service.submit(batcher, plan)
    await service.wait(job, request)
    out = job.output
    if inpaint is not None:
        out = dataclasses.replace(out, images=await run_in_threadpool(a1111_inpaint.finish, inpaint, out.images),
                                  parameters=[{**p, **inpaint.params} for p in out.parameters])
    images = await output_pngs(out) if req.send_images else []
    parameters = req.model_dump()
    if image is not None and not getattr(req, "include_init_images", False):
        parameters["init_images"] = None
    return A1111ImagesResponse(images=images, parameters=parameters,
                               info=json.dumps(info(req, out, batcher.name, batcher.facts.inpainting_unet and inpaint is not None)))


def info(req, out, model: str, inpainting_conditioning: bool = False) -> dict:
    """A1111's `info` object (the fields its clients read)."""
    first = out.parameters[0]
    return {
        "prompt": req.prompt, "all_prompts": [p["prompt"] for p in out.parameters],
        "negative_prompt": req.negative_prompt, "all_negative_prompts": [p["negative_prompt"] for p in out.parameters],
        "seed": out.seeds[0], "all_seeds": out.seeds, "subseed": -1, "all_subseeds": [-1] * len(out.seeds),
        "subseed_strength": 0, "width": first["width"], "height": first["height"],
        "sampler_name": SAMPLER_NAMES.get(first["scheduler"], first["scheduler"]), "cfg_scale": req.cfg_scale,
        "steps": req.steps, "batch_size": req.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": model, "sd_model_hash": None, "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": first["strength"],
        "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": [a1111_parameters(p) for p in out.parameters],
        "styles": req.styles or [], "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": 1,
        "is_using_inpainting_conditioning": inpainting_conditioning, "version": f"sdrt {first['sdrt_version']}",
        "timings": out.timings,
    }


@router.post("/txt2img", response_model=A1111ImagesResponse)
async def txt2img(req: Txt2ImgRequest, request: Request):
    if req.enable_hr:
        raise FieldError("enable_hr", "enable_hr (hires fix) is not supported; send false")
    return await generate(req, request)


@router.post("/img2img", response_model=A1111ImagesResponse)
async def img2img(req: Img2ImgRequest, request: Request):
    limits = request.app.state.service.config.limits
    data = b64_to_bytes(req.init_images[0], "init_images")
    image = await run_in_threadpool(decode_image, data, "init_images", limits.max_input_pixels)
    prepared = None
    if req.mask:  # inpainting: A1111's fields, done as its web UI does them (sdrt.serve.a1111_inpaint)
        mask = await run_in_threadpool(decode_image, b64_to_bytes(req.mask, "mask"), "mask", limits.max_input_pixels, False)
        prepared = await run_in_threadpool(
            a1111_inpaint.prepare, image, mask, req.width, req.height, req.mask_blur, req.inpainting_fill,
            req.inpaint_full_res, req.inpaint_full_res_padding, bool(req.inpainting_mask_invert))
        image = prepared.image
    return await generate(req, request, image=image, strength=req.denoising_strength, inpaint=prepared)


@router.get("/progress", response_model=ProgressResponse)
def progress(request: Request, skip_current_image: bool = False):
    service = request.app.state.service
    queued = sum(b.queued for b in service.batchers.values())
    running = [(b, j) for b in service.batchers.values() for j in b.running()]
    if not running:
        return ProgressResponse(progress=0.0, eta_relative=0.0, state=ProgressState(job_count=queued))
    batcher, job = max(running, key=lambda bj: bj[1].started or 0)
    fraction = job.step / job.total if job.total else 0.0
    elapsed = time.monotonic() - (job.started or time.monotonic())
    eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
    image = None
    if not skip_current_image:  # (none before the first step; under --ray, the latest preview its replica sent)
        previews = batcher.preview(job)
        image = previews[0] if previews else None
    state = ProgressState(job=job.id, job_count=queued + len(running), job_timestamp=time.strftime("%Y%m%d%H%M%S"),
                          sampling_step=job.step, sampling_steps=job.total, interrupted=job.cancel_reason is not None)
    return ProgressResponse(progress=fraction, eta_relative=eta, state=state, current_image=image)


@router.post("/interrupt")
def interrupt(request: Request) -> dict:
    """Stop the running requests at their next step (their rows leave their batches; others go on)."""
    service = request.app.state.service
    stopped = sum(b.cancel_running("interrupted") for b in service.batchers.values())
    return {"interrupted": stopped}


@router.post("/skip")
def skip(request: Request) -> dict:
    return interrupt(request)


@router.get("/sd-models", response_model=list[SDModelItem])
def sd_models(request: Request):
    return [SDModelItem(title=name, model_name=name, filename=name) for name in request.app.state.service.batchers]


@router.get("/samplers", response_model=list[SamplerItem])
def samplers():
    aliases = {}
    for alias, name in ALIASES.items():
        aliases.setdefault(name, []).append(alias)
    return [SamplerItem(name=a1111, aliases=[sdrt] + [a for a in aliases.get(sdrt, []) if a != sdrt], options={})
            for a1111, sdrt in A1111_SAMPLERS.items()]


@router.get("/schedulers", response_model=list[SchedulerItem])
def schedulers():
    return [SchedulerItem(name="automatic", label="Automatic"), SchedulerItem(name="uniform", label="Uniform"),
            SchedulerItem(name="karras", label="Karras", default_rho=7.0), SchedulerItem(name="exponential", label="Exponential")]


@router.get("/options", response_model=OptionsResponse)
def get_options(request: Request):
    return OptionsResponse(sd_model_checkpoint=request.app.state.service.a1111_model)


@router.post("/options")
def set_options(req: OptionsRequest, request: Request) -> None:
    """Only `sd_model_checkpoint` is read: the model A1111 routes use when a request does not override it."""
    service = request.app.state.service
    if req.sd_model_checkpoint is not None:
        name = model_name(req.sd_model_checkpoint)
        if name not in service.batchers:
            raise FieldError("sd_model_checkpoint", f"sd_model_checkpoint {req.sd_model_checkpoint!r} is not served; "
                                                    f"choose one of {', '.join(service.batchers)}")
        service.a1111_model = name
    return None


@router.get("/embeddings", response_model=EmbeddingsResponse)
def embeddings(request: Request):
    service = request.app.state.service
    batcher = service.batchers[service.a1111_model]
    loaded = {}
    if batcher.pipe is not None:
        width = int(batcher.pipe.token_table.shape[1])
        for token, tokens in batcher.pipe.textual_inversions.items():
            loaded[token] = EmbeddingItem(shape=width, vectors=len(tokens))
    return EmbeddingsResponse(loaded=loaded, skipped={})


@router.get("/loras", response_model=list[LoraItem])
async def loras(request: Request):
    """The LoRAs of `--lora-dir` (empty without one), as A1111 lists them; `path` is relative to that folder."""
    return await request.app.state.service.lora_listing()


@router.post("/refresh-loras")
async def refresh_loras(request: Request) -> None:
    """Re-read the LoRA folder (requests also rescan it when they name a file not seen yet)."""
    await request.app.state.service.lora_listing()
    return None


@router.get("/scripts", response_model=ScriptsResponse)
def scripts():
    return ScriptsResponse()
