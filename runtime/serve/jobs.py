"""Async jobs (/v1/jobs): submit and get 202 with an id, poll the status (queue position, step/total, images),
cancel with DELETE, or follow Server-Sent Events: progress each step, a preview every N steps, then the result."""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Request
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from sdrt.serve.a1111 import resolve_sampler
from sdrt.serve.batcher import Job
from sdrt.serve.media import b64_to_bytes, decode_image, output_pngs
from sdrt.serve.schemas import ErrorResponse, JobRequest, JobStatus

router = APIRouter(prefix="/v1/jobs", tags=["async jobs"])
NOT_FOUND = {404: {"model": ErrorResponse}}


async def status(service, job: Job, images: bool = True) -> JobStatus:
    body = JobStatus(id=job.id, model=job.model, status=job.state, step=job.step, total=job.total,
                     created=job.created, error=job.error if job.state in ("failed", "cancelled") else None)
    if job.state == "queued":
        body.position = service.batchers[job.model].position(job)
    if job.state == "done":
        out = job.output
        if images:
            if "images" not in job.cache:
                job.cache["images"] = await output_pngs(out)
            body.images = job.cache["images"]
        body.seeds, body.parameters, body.batch_images = out.seeds, out.parameters, job.batch_images
    return body


@router.post("", status_code=202, response_model=JobStatus)
async def submit(req: JobRequest, request: Request):
    service = request.app.state.service
    batcher = service.batcher(req.model)
    image = None
    if req.init_image is not None:
        data = b64_to_bytes(req.init_image, "init_image")
        image = await run_in_threadpool(decode_image, data, "init_image", service.config.limits.max_input_pixels)
    inpaint = {}
    if req.mask is not None:  # the pipeline's own inpainting (its checks answer 422: no init_image, an empty mask...)
        raw = b64_to_bytes(req.mask, "mask")
        mask = await run_in_threadpool(decode_image, raw, "mask", service.config.limits.max_input_pixels, False)
        inpaint = {"mask_image": mask, "mask_blur": req.mask_blur, "keep_unmasked": req.keep_unmasked}
    plan = await service.plan(
        batcher, prompt=req.prompt, negative_prompt=req.negative_prompt, num_inference_steps=req.steps,
        guidance_scale=req.guidance_scale, height=req.height, width=req.width, seed=req.seed,
        scheduler=resolve_sampler(req.scheduler, field="scheduler"), image=image, strength=req.strength,
        num_images_per_prompt=req.n, loras=req.loras, timestep_spacing=req.timestep_spacing, **inpaint,
    )
    job = service.submit(batcher, plan, preview_every=req.preview_every, preview_decode=req.preview_decode,
                         watchable=True)
    service.add_job(job)
    if service.job_store is not None:  # (a Ray ingress: the state outlives this process)
        service.job_store.track(job, lambda images: status(service, job, images=images))
    return await status(service, job, images=False)


async def find(service, job_id: str) -> Job | JobStatus:
    """This process's job, or (a Ray ingress restarted since it was submitted) its stored last status; else 404."""
    if job_id not in service.jobs and service.job_store is not None:
        stored = await service.job_store.get(job_id)
        if stored is not None:
            return JobStatus(**stored)
    return service.job(job_id)


@router.get("/{job_id}", response_model=JobStatus, responses=NOT_FOUND)
async def get(job_id: str, request: Request):
    service = request.app.state.service
    job = await find(service, job_id)
    return job if isinstance(job, JobStatus) else await status(service, job)


@router.delete("/{job_id}", response_model=JobStatus, responses=NOT_FOUND)
async def cancel(job_id: str, request: Request):
    """Cancel: a queued job leaves the queue at once, a running one leaves its batch at the next step."""
    service = request.app.state.service
    job = await find(service, job_id)
    if isinstance(job, JobStatus):  # ended with an earlier ingress
        return job
    service.batchers[job.model].cancel(job, "cancelled")
    if not job.finished:
        await asyncio.wait({asyncio.wrap_future(job.future)}, timeout=5.0)
    return await status(service, job, images=False)


@router.get("/{job_id}/events", responses=NOT_FOUND)
async def events(job_id: str, request: Request):
    """Server-Sent Events: `status` first, then `running`, `progress` {step, total} per step, `preview`
    {step, images} every N steps, and one final `done` / `failed` / `cancelled` carrying the job's status."""
    service = request.app.state.service
    job = await find(service, job_id)
    if isinstance(job, JobStatus):  # ended with an earlier ingress: its status, then its end
        stored = job.model_dump_json()
        return EventSourceResponse(iter([{"event": "status", "data": stored}, {"event": job.status, "data": stored}]))
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    unsubscribe = job.listen(lambda event, data: loop.call_soon_threadsafe(queue.put_nowait, (event, data)))

    async def stream():
        try:
            yield {"event": "status", "data": (await status(service, job, images=False)).model_dump_json()}
            while True:
                if job.finished:  # a late listener still gets the replayed progress and latest preview
                    await asyncio.sleep(0)  # let the replay's call_soon_threadsafe puts land
                    if queue.empty():
                        break
                event, data = await queue.get()
                if event in ("done", "failed", "cancelled"):
                    break
                yield {"event": event, "data": json.dumps(data)}
            yield {"event": job.state, "data": (await status(service, job)).model_dump_json()}
        finally:
            unsubscribe()

    return EventSourceResponse(stream(), ping=15)
