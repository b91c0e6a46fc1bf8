"""The ingress side of `sdrt serve --ray`: `RemoteBatcher` gives app.Service the Batcher's caller-side interface
over a model deployment's handle. Jobs live here, at the ingress.

- Requests are planned here with the pipeline's planning copy (sdrt.planning, fetched once from a replica): bad
  input is a 422 at POST time, as on one machine, and the seed is drawn here, so a retry makes the same image.
- Each request is a stream from its replica (ray_replica.ModelReplica.stream): queue position, running, per-step
  progress and previews update the ingress's Job as the local batcher would, then the result ends it.
- A stream broken by a replica's death is sent again from the start (same seed, same image), up to RETRIES times.
"""

from __future__ import annotations

import asyncio
import logging
import time

from sdrt.serve.app import ServeConfig
from sdrt.serve.batcher import Job, NotAccepting

log = logging.getLogger("sdrt.serve")

APP_NAME = "sdrt"
RETRIES = 6  # attempts after the first when a replica dies under a request
RETRY_BACKOFF = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0)


def deployment_name(model: str) -> str:
    return f"model-{model}"


class RemotePlan:
    """A request planned at the ingress, as the replica will plan it again: the pipeline's keyword arguments with the
    seed fixed."""

    def __init__(self, kwargs: dict):
        self.kwargs = kwargs
        self.batch = int(kwargs.get("num_images_per_prompt") or 1)
        self.batch_key = None


class StreamEnded(Exception):
    """A replica's stream ended without a result (the replica stopped mid-request): retried like a death."""


def _retryable() -> tuple:
    import ray.exceptions as rex

    kinds = [rex.RayActorError, rex.ActorUnavailableError, StreamEnded]
    for name in ("ActorDiedError", "WorkerCrashedError", "NodeDiedError", "OutOfMemoryError"):
        if hasattr(rex, name):
            kinds.append(getattr(rex, name))
    try:
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        kinds += [BackPressureError, DeploymentUnavailableError]
    except ImportError:
        pass
    return tuple(kinds)


class RemoteBatcher:
    """Batcher's caller-side interface over a Ray Serve deployment handle (what app.Service and the routes use)."""

    remote = True

    def __init__(self, name: str, handle, config: ServeConfig, metrics=None):
        self.name, self.handle, self.config, self.metrics = name, handle, config, metrics
        self.streams = handle.options(stream=True)
        self.limits = config.limits
        self.timeout = config.timeout
        self.pipe = None  # no pipeline at the ingress ...
        self.planner = None  # ... but its planning copy, once a replica has sent it
        self.running_replicas = 0
        self.load_error: str | None = None
        self.draining = False
        self._tasks: dict[str, asyncio.Task] = {}
        self._inflight: dict[str, Job] = {}
        self._started = False
        self._retryable = _retryable()

    # state ----------------------------------------------------------------------------------------------------------

    def start(self) -> "RemoteBatcher":
        if not self._started:
            self._started = True
            asyncio.get_running_loop().create_task(self._watch())
        return self

    async def _watch(self) -> None:
        """Fetch the planning copy once, then keep the count of RUNNING replicas fresh (for /readyz)."""
        from ray import serve

        while not self.draining:
            try:
                if self.planner is None:
                    self.planner = await self.handle.planner.remote()
                status = await asyncio.to_thread(serve.status)
                app = status.applications.get(APP_NAME)
                dep = app.deployments.get(deployment_name(self.name)) if app else None
                self.running_replicas = int(dep.replica_states.get("RUNNING", 0)) if dep else 0
            except Exception as err:  # noqa: BLE001 - a cluster hiccup: try again
                log.debug("watching %s: %s", self.name, err)
            await asyncio.sleep(1.0)

    @property
    def facts(self):
        return self.planner.facts if self.planner is not None else None

    @property
    def state(self) -> str:
        if self.draining:
            return "draining"
        if self.planner is None:
            return "loading"
        return "ready" if self.running_replicas > 0 else "unavailable"

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def queued(self) -> int:
        return sum(1 for j in self._inflight.values() if j.state == "queued")

    def running(self) -> list[Job]:
        return [j for j in self._inflight.values() if j.state == "running"]

    def position(self, job: Job) -> int | None:
        """Requests ahead of `job` in its replica's queue, as the replica last said (None: not queued, or not yet
        known: still routed by Ray Serve)."""
        return job.cache.get("position") if job.state == "queued" else None

    def preview(self, job: Job) -> list[str]:
        """The latest previews its replica sent (the replica makes them for async jobs)."""
        return job.cache.get("preview", [])

    # requests -------------------------------------------------------------------------------------------------------

    def remote_plan(self, plan, kwargs: dict) -> RemotePlan:
        """`plan` (made here by the planning copy: the input is valid) as the replica's arguments, its seed fixed."""
        return RemotePlan({**kwargs, "seed": plan.seeds[0]})

    async def prepare_loras(self, loras: dict, field) -> dict:
        """{request name or alias: scale} -> {registered name: scale}, checked by a replica as sdrt.serve.loras does
        on one machine (its folder, its model's slots, the file itself): a FieldError (422) at POST time. The
        planning copy learns the names, so the ingress plans the request as the replica will."""
        from sdrt.planning import RegisteredName
        from sdrt.serve.schemas import FieldError

        for attempt in range(2):  # once more if the replica asked died under the call
            try:
                answer = await self.handle.prepare_loras.remote(loras, field)
                break
            except self._retryable:
                if attempt:
                    raise
        if "error" in answer:
            raise FieldError(tuple(answer["loc"]), answer["error"])
        for name in answer["loras"]:
            self.planner.registered_loras.setdefault(name, RegisteredName(name))
        return answer["loras"]

    async def lora_listing(self) -> list[dict]:
        return await self.handle.lora_listing.remote()

    def submit(self, plan: RemotePlan, preview_every: int = 0, preview_decode: bool = False, watchable: bool = False) -> Job:
        if self.draining:
            raise NotAccepting(f"model {self.name!r} is draining")
        job = Job(plan, self.name, self.timeout, preview_every, preview_decode)
        job.cache["watchable"] = watchable
        self._inflight[job.id] = job
        task = asyncio.get_running_loop().create_task(self._drive(job))
        self._tasks[job.id] = task
        task.add_done_callback(lambda _t, key=job.id: (self._tasks.pop(key, None), self._inflight.pop(key, None)))
        return job

    async def _drive(self, job: Job) -> None:
        attempt = 0
        try:
            while True:
                try:
                    result = await self._attempt(job)
                except self._retryable as err:
                    if attempt >= RETRIES or time.monotonic() > job.deadline:
                        job._end("failed", error=f"model {self.name!r}: no replica could finish the request "
                                                 f"({type(err).__name__})", error_status=503)
                        return
                    log.warning("model %s: replica lost under job %s (%s); retrying", self.name, job.id, type(err).__name__)
                    if self.metrics:
                        self.metrics.retry(self.name)
                    job.state = "queued"  # from the start, on another replica
                    job.cache.pop("position", None)
                    await asyncio.sleep(RETRY_BACKOFF[min(attempt, len(RETRY_BACKOFF) - 1)])
                    attempt += 1
                    continue
                break
        except asyncio.CancelledError:
            reason = job.cancel_reason or "cancelled"
            job._end("cancelled", error=f"{reason}: stopped", error_status=504 if reason == "timeout" else 409)
            raise
        except Exception as err:  # noqa: BLE001 - the replica raised: a 500 without its traceback
            log.error("model %s: request failed on its replica: %s", self.name, err)
            job._end("failed", error=f"internal error ({type(err).__name__})", error_status=500)
            return
        self._finish(job, result)

    async def _attempt(self, job: Job) -> dict:
        """One stream from a replica: its events update `job`; returns the result (StreamEnded if none came)."""
        stream = self.streams.stream.remote(job.plan.kwargs, job.preview_every, job.preview_decode,
                                            job.cache.get("watchable", False))
        try:
            async for event in stream:
                kind = event.pop("event")
                if kind == "result":
                    return event
                self._update(job, kind, event)
        except asyncio.CancelledError:
            stream.cancel()  # the replica drops the request's rows at its next step
            raise
        raise StreamEnded("the replica's stream ended without a result")

    @staticmethod
    def _update(job: Job, kind: str, data: dict) -> None:
        if kind == "queued":
            job.cache["position"] = data["position"]
        elif kind == "running":
            job.state, job.started = "running", job.started or time.monotonic()
            job.batch_images = data.get("batch_images", 0)
            job.emit("running", data)
        elif kind == "progress":
            job.step, job.total = data["step"], data["total"]
            job.emit("progress", data)
        elif kind == "preview":
            job.cache["preview"] = data["images"]
            job.emit("preview", data)

    def _finish(self, job: Job, result: dict) -> None:
        if self.metrics:
            self.metrics.replica_request(self.name, result.get("node", "?")[:12], str(result.get("pid", "?")))
            if result["state"] == "done":
                self.metrics.images(self.name, job.plan.batch)
        if result["state"] == "done":
            job._end("done", output=result["output"], step=result["step"], total=result["total"],
                     batch_images=result["batch_images"])
        elif result["state"] == "cancelled":
            job.cancel_reason = job.cancel_reason or ("timeout" if result.get("timed_out") else "cancelled")
            job._end("cancelled", error=result["error"], error_status=504 if result.get("timed_out") else 409)
        else:
            job.retry_after = result.get("retry_after", 1)
            job._end("failed", error=result["error"], error_status=result["status"])

    def cancel(self, job: Job, reason: str = "cancelled") -> bool:
        if job.finished:
            return False
        if job.cancel_reason is None:
            job.cancel_reason = reason
        task = self._tasks.get(job.id)
        if task is not None:
            task.cancel()  # cancels the stream; the replica's batcher drops the row
        return True

    def cancel_running(self, reason: str = "interrupted") -> int:
        return sum(self.cancel(job, reason) for job in self.running())

    @property
    def idle(self) -> bool:
        return not self._inflight

    def drain(self, timeout: float) -> bool:
        self.draining = True
        end = time.monotonic() + timeout
        while self._inflight and time.monotonic() < end:
            time.sleep(0.02)
        return not self._inflight
