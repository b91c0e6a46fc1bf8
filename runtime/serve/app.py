"""The FastAPI app factory: `create_app(ServeConfig(...))` gives an ASGI app serving A1111's API, OpenAI's images
API and async jobs over one batcher per model. uvicorn runs it (`sdrt serve`); a Ray Serve deployment can
mount the same app with `create_app(config, batchers=...)`, where each model's entry is anything with Batcher's
caller-side interface (sdrt.serve.ray_remote.RemoteBatcher forwards to a Ray Serve deployment handle).

Shared here: the config, the `Service` the routes reach through `request.app.state.service` (models, jobs,
metrics, draining), the error handlers (every error is JSON; no traceback text in any response), and one pure
ASGI middleware for the API key, the request-body limit and per-route request counts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import time
from collections import OrderedDict
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from sdrt.errors import BackendError, InputError, SdrtError
from sdrt.serve.batcher import Batcher, Job, NotAccepting, QueueFull
from sdrt.serve.limits import Limits
from sdrt.serve.loras import LoraLibrary
from sdrt.serve.schemas import ApiError, FieldError

log = logging.getLogger("sdrt.serve")

OPEN_PATHS = ("/healthz", "/readyz")  # answered without the API key
MAX_FINISHED_JOBS = 1000  # async jobs kept for GET after they finish (oldest go first) ...
FINISHED_JOB_TTL = 3600.0  # ... and for at most this many seconds


@dataclasses.dataclass
class ServeConfig:
    models: dict[str, str | None] = dataclasses.field(default_factory=lambda: {"digits": None})  # name -> path (None: built-in)
    backend: str = "onnx"
    threads: int | None = None
    max_batch: int = 8
    batch_wait_ms: float = 10.0
    max_queue: int = 64
    timeout: float = 300.0
    drain_timeout: float = 60.0
    preview_every: int = 5
    warm_all_batches: bool = True  # warm every batch size up to max_batch at load (False: batch 1 only, faster start)
    api_key: str | None = None
    cors: list[str] = dataclasses.field(default_factory=list)
    lora_dir: str | None = None  # .safetensors LoRAs requests may name (sdrt.serve.loras); None: no run-time LoRAs
    max_loras: int = 64  # LoRAs kept registered per model; the least recently requested beyond it are dropped
    limits: Limits = dataclasses.field(default_factory=Limits)

    @property
    def default_model(self) -> str:
        return next(iter(self.models))


def load_pipeline(path: str | None, backend: str, threads: int | None, max_batch: int = 8):
    from sdrt.pipeline import Pipeline

    options = {"threads": threads} if threads else {}
    if backend == "onnx":  # a session per batch size the batcher forms (and per text count), not ORT's default 4
        options["shape_sessions"] = 2 * max_batch + 2
    if path is not None and Path(path).expanduser().is_file():
        return Pipeline.from_single_file(path, backend="torch" if backend == "auto" else backend, **options)
    return Pipeline.from_pretrained(path, backend=backend, **options)


class Service:
    """What the routes share: one Batcher per model, the async jobs, the metrics and the drain state."""

    def __init__(self, config: ServeConfig, metrics, batchers: dict | None = None):
        self.config = config
        self.metrics = metrics
        self.draining = False
        self.a1111_model = config.default_model  # A1111's /options sd_model_checkpoint
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        # under --ray the LoRA folder is the replicas' (their nodes'): the ingress asks them (RemoteBatcher)
        remote = batchers is not None and any(getattr(b, "remote", False) for b in batchers.values())
        self.loras = LoraLibrary(None if remote else config.lora_dir, config.max_loras)
        self.job_store = None  # a Ray ingress's copy of job states (sdrt.serve.ray_jobs.RemoteJobStore)
        self.batchers = batchers if batchers is not None else {
            name: Batcher(name, lambda path=path: load_pipeline(path, config.backend, config.threads, config.max_batch),
                          max_batch=config.max_batch, batch_wait_ms=config.batch_wait_ms, max_queue=config.max_queue,
                          timeout=config.timeout, preview_every=config.preview_every, limits=config.limits,
                          metrics=metrics, warm_all_batches=config.warm_all_batches)
            for name, path in config.models.items()
        }

    def start(self) -> None:
        for batcher in self.batchers.values():
            batcher.start()

    @property
    def ready(self) -> bool:
        return not self.draining and all(b.ready for b in self.batchers.values())

    def batcher(self, name: str | None, field: str = "model") -> Batcher:
        """The batcher of a served model, by name (no paths: only the server's own list)."""
        name = self.config.default_model if name in (None, "") else name
        batcher = self.batchers.get(name)
        if batcher is None:
            raise FieldError(field, f"{field} {name!r} is not served here; choose one of {', '.join(self.batchers)}")
        if self.draining:
            raise ApiError(503, "the server is shutting down; no new work is accepted", kind="server_error")
        if not batcher.ready:
            raise ApiError(503, f"model {name!r} is {batcher.state}" + (f": {batcher.load_error}" if batcher.load_error else ""),
                           headers={"Retry-After": "5"}, kind="server_error")
        return batcher

    async def plan(self, batcher: Batcher, *, fields: dict | None = None, loras: dict | None = None,
                   lora_field: str = "loras", **kw):
        """Limits first (422 naming the request's field), then the LoRAs (names from --lora-dir, registered with the
        model's pipeline on first use), then the pipeline's own checks (InputError -> 422)."""
        batcher.limits.check(batcher.facts, prompt=kw["prompt"], negative_prompt=kw.get("negative_prompt"),
                             steps=kw["num_inference_steps"], images=kw.get("num_images_per_prompt", 1),
                             width=kw.get("width"), height=kw.get("height"), fields=fields)
        if loras:  # under --ray a replica checks and registers them (its folder, its pipeline), before queueing
            if getattr(batcher, "remote", False):
                kw["loras"] = await batcher.prepare_loras(loras, lora_field)
            else:
                kw["loras"] = await run_in_threadpool(self.loras.prepare, batcher.pipe, batcher.name, loras, lora_field,
                                                      batcher.loras_in_use())
        # plan() checks the rest through sdrt.inputs (size, schedule, memory budget): a 422 for this request alone.
        # A Ray ingress plans with the pipeline's planning copy (sdrt.planning): the same checks, before queueing.
        planner = batcher.planner
        if kw.get("image") is not None:
            plan = await run_in_threadpool(planner.plan, **kw)
        else:
            plan = planner.plan(**kw)
        return batcher.remote_plan(plan, kw) if getattr(batcher, "remote", False) else plan

    async def lora_listing(self) -> list[dict]:
        """The --lora-dir's LoRAs, rescanned (under --ray: as the default model's replicas see their folder)."""
        batcher = self.batchers[self.config.default_model]
        if getattr(batcher, "remote", False):
            return await batcher.lora_listing()
        return await run_in_threadpool(self.loras.listing)

    def submit(self, batcher: Batcher, plan, **kw) -> Job:
        if self.draining:
            raise ApiError(503, "the server is shutting down; no new work is accepted", kind="server_error")
        try:
            return batcher.submit(plan, **kw)
        except QueueFull as err:
            raise ApiError(429, str(err), headers={"Retry-After": str(err.retry_after)}, kind="rate_limit_error") from None
        except NotAccepting as err:
            raise ApiError(503, str(err), kind="server_error") from None

    def add_job(self, job: Job) -> None:
        self.jobs[job.id] = job
        now = time.monotonic()
        for key in [k for k, j in self.jobs.items() if j.finished and now - j.ended > FINISHED_JOB_TTL]:
            del self.jobs[key]
        while len(self.jobs) > MAX_FINISHED_JOBS:
            oldest = next((k for k, j in self.jobs.items() if j.finished), None)
            if oldest is None:
                break
            del self.jobs[oldest]

    def job(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise ApiError(404, f"no job {job_id!r} (finished jobs are kept for the last {MAX_FINISHED_JOBS})", ("path", "job_id"))
        return job

    async def wait(self, job: Job, request: Request) -> Job:
        """Wait for a synchronous request's job; a client that goes away cancels it, `--timeout` answers 504."""
        batcher = self.batchers[job.model]
        done = asyncio.wrap_future(job.future)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            while not done.done():
                remaining = job.deadline - time.monotonic()
                if remaining <= 0:
                    batcher.cancel(job, "timeout")
                    break
                await asyncio.wait({done, gone}, timeout=remaining + 0.05, return_when=asyncio.FIRST_COMPLETED)
                if gone.done() and not done.done():
                    batcher.cancel(job, "client disconnected")
                    break
        finally:
            gone.cancel()
        if not done.done():
            await asyncio.wait({done}, timeout=5.0)  # the worker ends it at its next step
        if job.timed_out or (job.state != "done" and time.monotonic() > job.deadline):
            raise ApiError(504, f"the request took longer than the server's timeout ({self.config.timeout:g} s) and was stopped",
                           kind="server_error")
        if job.state == "failed":
            status = job.error_status
            if status == 429:  # a Ray replica's queue was full
                raise ApiError(429, job.error or "the queue is full", headers={"Retry-After": str(getattr(job, "retry_after", 1))},
                               kind="rate_limit_error")
            raise ApiError(status, job.error or "failed", ("body",) if status == 422 else None,
                           kind="server_error" if status >= 500 else "invalid_request_error")
        if job.state != "done":
            raise ApiError(409, job.error or "cancelled", kind="cancelled")  # interrupted, or DELETE on its job
        return job

    def drain(self) -> bool:
        """Stop accepting, finish queued and running work (up to the drain timeout). Called from a thread."""
        self.draining = True
        end = time.monotonic() + self.config.drain_timeout
        ok = True
        for batcher in self.batchers.values():
            ok &= batcher.drain(max(0.0, end - time.monotonic()))
        return ok


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the request body has already been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def error_body(status: int, message: str, loc=None, kind: str = "invalid_request_error") -> dict:
    loc = list(loc) if loc else []
    param = ".".join(str(x) for x in loc[1:]) or None if loc and loc[0] in ("body", "query", "path") else None
    return {
        "detail": [{"loc": loc, "msg": message, "type": kind}],
        "error": {"message": message, "type": kind, "param": param, "code": str(status)},
    }


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request, err: ApiError):
        return JSONResponse(error_body(err.status, err.message, err.loc, err.kind), err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, err: RequestValidationError):
        items = [{"loc": [str(x) if not isinstance(x, int) else x for x in e.get("loc", ())], "msg": str(e.get("msg", "invalid")),
                  "type": str(e.get("type", "value_error"))} for e in err.errors()]
        first = items[0] if items else {"loc": [], "msg": "invalid request"}
        field = ".".join(str(x) for x in first["loc"][1:]) or None
        message = f"{field}: {first['msg']}" if field else first["msg"]
        return JSONResponse({"detail": items, "error": {"message": message, "type": "invalid_request_error",
                                                        "param": field, "code": "422"}}, 422)

    @app.exception_handler(InputError)
    async def input_error(request, err: InputError):
        return JSONResponse(error_body(422, str(err), ["body"]), 422)

    @app.exception_handler(SdrtError)
    async def sdrt_error(request, err: SdrtError):
        status = 500 if isinstance(err, BackendError) else 422
        if status == 500:
            log.error("backend error on %s: %s", request.url.path, err)
        return JSONResponse(error_body(status, str(err), kind="server_error" if status == 500 else "invalid_request_error"), status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, err: StarletteHTTPException):
        return JSONResponse(error_body(err.status_code, str(err.detail)), err.status_code, headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request, err: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(500, "internal server error", kind="server_error"), 500)


class Guard:
    """Pure ASGI middleware: API key (all routes but the health checks), request-body limit (413), and request
    counts by route template and status for /metrics."""

    def __init__(self, app, api_key: str | None, max_body: int, metrics):
        self.app, self.api_key, self.max_body, self.metrics = app, api_key, max_body, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        status = {"code": 500}

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if self.api_key and path not in OPEN_PATHS and not self._authorised(scope):
                return await self._reject(send_counted, 401, "a valid `Authorization: Bearer KEY` header is required",
                                          {"www-authenticate": "Bearer"})
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                return await self._reject(send_counted, 413, f"the request body is over the server's limit of {self.max_body} bytes")
            seen = {"bytes": 0}
            max_body = self.max_body

            async def receive_limited():
                message = await receive()
                if message["type"] == "http.request":
                    seen["bytes"] += len(message.get("body", b""))
                    if seen["bytes"] > max_body:
                        # FastAPI re-raises its own HTTPException from body parsing (anything else becomes a 400)
                        raise HTTPException(413, f"the request body is over the server's limit of {max_body} bytes")
                return message

            await self.app(scope, receive_limited, send_counted)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or ("unmatched" if status["code"] == 404 else path)
            if self.metrics:
                self.metrics.request(scope.get("method", ""), template, status["code"])

    def _authorised(self, scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    @staticmethod
    async def _reject(send, status: int, message: str, headers: dict | None = None):
        import json

        body = json.dumps(error_body(status, message, kind="authentication_error" if status == 401 else "invalid_request_error")).encode()
        raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})


def create_app(config: ServeConfig | None = None, batchers: dict | None = None, metrics=None) -> FastAPI:
    """The ASGI app. Models load in their worker threads after startup; /readyz answers 503 until all are warm.
    `batchers` (name -> an object with Batcher's caller-side interface) replaces the local batchers."""
    from contextlib import asynccontextmanager

    from sdrt import __version__
    from sdrt.serve import a1111, jobs, openai_api, ops

    config = config or ServeConfig()
    metrics = metrics or ops.Metrics()
    service = Service(config, metrics, batchers)

    @asynccontextmanager
    async def lifespan(app):
        service.start()
        yield
        if not service.draining:  # stopped without a drain (in-process users, tests): stop the workers
            await run_in_threadpool(service.drain)

    app = FastAPI(title="sdrt", version=__version__, lifespan=lifespan,
                  description="Stable Diffusion as a service: AUTOMATIC1111's API, OpenAI's images API and async jobs, "
                              "with requests batched across clients.")
    app.state.service = service
    install_error_handlers(app)
    for module in (a1111, openai_api, jobs, ops):
        app.include_router(module.router)
    app.add_middleware(Guard, api_key=config.api_key, max_body=config.limits.max_body_bytes, metrics=metrics)
    if config.cors:  # outermost: browsers' preflight requests carry no API key
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=config.cors, allow_methods=["*"], allow_headers=["*"])
    return app
