"""The model deployment of `sdrt serve --ray`: each replica holds a warm Pipeline behind sdrt's own Batcher and
streams each request's life to the ingress (queue position, running, per-step progress, previews, then the result),
so jobs followed at the ingress look as they do on one machine (sdrt.serve.ray_remote reads the stream)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

from sdrt.errors import InputError
from sdrt.serve.app import ServeConfig, load_pipeline
from sdrt.serve.batcher import Batcher, NotAccepting, QueueFull
from sdrt.serve.loras import LoraLibrary
from sdrt.serve.schemas import FieldError

PROGRESS_EVERY_S = 0.25  # a synchronous request's state is sampled this often (a shorter one sends only its result)
POSITION_EVERY_S = 0.25  # how often a queued request's place is looked at


def bind_loopback() -> None:
    """On a node whose address is 127.0.0.1 (see ray_app.loopback_only), the replica's inter-deployment gRPC server
    listens on 127.0.0.1 too: Ray Serve 2.60 binds it to [::] unconditionally (replica.py, `_on_initialized`, which
    runs after this constructor). Elsewhere nothing changes."""
    try:
        import ray
        from ray.serve._private import replica
    except ImportError:
        return
    if ray.util.get_node_ip_address() != "127.0.0.1":
        return
    original = getattr(replica, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "_sdrt_loopback", False):
        return

    def add_port(server, address):
        return original(server, "127.0.0.1:0" if address == "[::]:0" else address)

    add_port._sdrt_loopback = True
    replica.add_port_to_grpc_server = add_port


class ModelReplica:
    """One replica of one model: a warm Pipeline behind sdrt's own Batcher (its queue, batching, timeouts)."""

    def __init__(self, name: str, path: str | None, config: ServeConfig):
        import ray

        bind_loopback()
        self.name = name
        self.batcher = Batcher(name, lambda: load_pipeline(path, config.backend, config.threads, config.max_batch),
                               max_batch=config.max_batch, batch_wait_ms=config.batch_wait_ms, max_queue=config.max_queue,
                               timeout=config.timeout, preview_every=config.preview_every, limits=config.limits,
                               warm_all_batches=config.warm_all_batches).start()
        while self.batcher.state == "loading":  # Serve routes to a replica only once its constructor returns
            time.sleep(0.02)
        if self.batcher.state != "ready":
            raise RuntimeError(f"model {name!r} failed to load: {self.batcher.load_error}")
        self.loras = LoraLibrary(config.lora_dir, config.max_loras)  # --lora-dir on this replica's node (None: serves no LoRAs)
        self.node = ray.get_runtime_context().get_node_id()
        self.pid = os.getpid()

    def facts(self):
        return self.batcher.pipe.facts

    def planner(self):
        """The pipeline's planning copy (sdrt.planning): the ingress plans with it to refuse bad input at once."""
        from sdrt.planning import planning_copy

        return planning_copy(self.batcher.pipe)

    async def prepare_loras(self, loras: dict, field) -> dict:
        """The ingress's LoRA check at POST time, by sdrt.serve.loras on this replica's folder and pipeline (names,
        aliases, files the model can take; each registered here): {"loras": {registered name: scale}}, or
        {"error": message, "loc": loc} for a 422 (an answer, not an exception, so the ingress gets the text as is)."""
        try:
            return {"loras": await asyncio.to_thread(self.loras.prepare, self.batcher.pipe, self.name, loras, field,
                                                      self.batcher.loras_in_use())}
        except FieldError as err:
            return {"error": err.message, "loc": list(err.loc or ())}

    def lora_listing(self) -> list[dict]:
        """GET /sdapi/v1/loras (and refresh-loras) under --ray: this replica's --lora-dir, rescanned."""
        return self.loras.listing()

    def whoami(self) -> dict:
        return {"node": self.node, "pid": self.pid, "queued": self.batcher.queued, "running": len(self.batcher.running())}

    async def stream(self, kwargs: dict, preview_every: int = 0, preview_decode: bool = False, watched: bool = False):
        """Plan, queue and yield the request's events: "queued" {position} when its place changes (`watched`: an
        async job), "running", "progress" {step, total} (each step when watched, else sampled every 0.25 s),
        "preview" {step, total, images} (watched: every preview_every steps, or the server's default), and last
        {"event": "result", ...}: every outcome, errors included, never a traceback. Ending the stream early (the
        ingress cancelled: client gone, timeout, DELETE) drops the request's rows from its batch."""
        where = {"node": self.node, "pid": self.pid}
        try:
            if kwargs.get("loras"):  # checked at the ingress by a replica; registered here on first use
                kwargs = {**kwargs, "loras": await asyncio.to_thread(self.loras.prepare, self.batcher.pipe, self.name,
                                                                     kwargs["loras"], "loras")}
            if kwargs.get("image") is not None or kwargs.get("loras"):
                plan = await asyncio.to_thread(self.batcher.pipe.plan, **kwargs)
            else:
                plan = self.batcher.pipe.plan(**kwargs)
        except (InputError, FieldError) as err:
            yield {"event": "result", "state": "failed", "error": getattr(err, "message", str(err)), "status": 422, **where}
            return
        try:
            job = self.batcher.submit(plan, preview_every, preview_decode)
        except QueueFull as err:
            yield {"event": "result", "state": "failed", "error": str(err), "status": 429, "retry_after": err.retry_after, **where}
            return
        except NotAccepting as err:
            yield {"event": "result", "state": "failed", "error": str(err), "status": 503, **where}
            return
        try:
            async with contextlib.aclosing(self._every_event(job) if watched else self._sampled(job)) as events:
                async for event in events:
                    yield event
            yield {"event": "result", "state": job.state, "output": job.output, "error": job.error,
                   "status": job.error_status, "batch_images": job.batch_images, "step": job.step, "total": job.total,
                   "timed_out": job.timed_out, **where}
        finally:
            if not job.finished:  # the ingress went away mid-stream: free the batch row
                self.batcher.cancel(job, "cancelled")

    async def _every_event(self, job):
        """An async job's events as they happen (its queue place looked at every 0.25 s), until it ends."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        unsubscribe = job.listen(lambda event, data: loop.call_soon_threadsafe(events.put_nowait, (event, data)))
        getter, position = None, None
        try:
            while True:
                if job.state == "queued":
                    now = self.batcher.position(job)
                    if now is not None and now != position:
                        position = now
                        yield {"event": "queued", "position": position}
                getter = getter or asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({getter}, timeout=POSITION_EVERY_S if job.state == "queued" else None)
                if not done:
                    continue
                event, data = getter.result()
                getter = None
                if event in ("done", "failed", "cancelled"):
                    return
                yield {"event": event, **data}
        finally:
            unsubscribe()
            if getter is not None:
                getter.cancel()

    async def _sampled(self, job):
        """A synchronous request's state every 0.25 s ("running" once, then "progress" when it moved): a request
        that ends sooner sends its result alone, as a plain call would."""
        ended = asyncio.wrap_future(job.future)
        running, step = False, 0
        while True:
            await asyncio.wait({ended}, timeout=PROGRESS_EVERY_S)
            if ended.done():
                return
            if job.state == "running" and not running:
                running = True
                yield {"event": "running", "status": "running", "batch_images": job.batch_images}
            if job.step != step:
                step = job.step
                yield {"event": "progress", "step": job.step, "total": job.total}

    def check_health(self) -> None:
        """A tiny generation through the batcher (1 step, 1 image): a wedged worker fails the check."""
        if self.batcher.state != "ready":
            raise RuntimeError(f"model {self.name!r} is {self.batcher.state}")
        plan = self.batcher.pipe.plan("health", num_inference_steps=1, seed=0, output_type="np")
        job = self.batcher.submit(plan)
        job.future.result(timeout=25.0)
        if job.state != "done":
            raise RuntimeError(f"health generation {job.state}: {job.error}")

    def __del__(self):
        batcher = getattr(self, "batcher", None)
        if batcher is not None and batcher.state in ("ready", "draining"):
            batcher.drain(10.0)
