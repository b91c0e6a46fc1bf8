"""The batcher: one queue and one worker thread per model, merging requests that can share UNet calls.

It owns the queue (FIFO; `max_queue` requests wait at most, then `QueueFull`), the limits, timeouts and
cancellation, and runs the pipeline's own steps (plan -> encode_text -> prepare_latents -> denoise -> finish)
over each group of plans; the loop itself stays in `Pipeline.denoise`. A cancelled or timed-out request leaves
its batch between steps (`Batch.drop`); the other rows go on unchanged.

Grouping: the oldest queued request is always served next (no starvation across keys). It takes along later
requests with the same model and `plan.batch_key`, in arrival order, up to `max_batch` images, and waits at most
`batch_wait` seconds for such company when the server is busy (an idle server with one client does not pay it).

Nothing here imports FastAPI: a Ray Serve deployment (or any other host) can wrap a `Batcher` as it is.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import math
import threading
import time
import uuid
from collections import deque
from typing import Callable

from sdrt.errors import InputError, SdrtError
from sdrt.observers import Observer
from sdrt.serve.limits import Limits


log = logging.getLogger("sdrt.serve")


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class NotAccepting(Exception):
    """The batcher is loading, draining or closed."""


class Job:
    """One request in the batcher: its plan, state, progress and result. Thread-safe to read."""

    _ids = itertools.count()

    def __init__(self, plan, model: str, timeout: float, preview_every: int = 0, preview_decode: bool = False):
        self.id = uuid.uuid4().hex
        self.seq = next(Job._ids)
        self.plan = plan
        self.model = model
        self.state = "queued"
        self.step = 0
        self.total = 0
        self.created = time.time()
        self.enqueued = time.monotonic()
        self.started: float | None = None
        self.ended: float | None = None
        self.deadline = self.enqueued + timeout
        self.preview_every = preview_every
        self.preview_decode = preview_decode
        self.latents = None  # this job's rows of the batch's latents after the last step (for previews)
        self.output = None  # PipelineOutput when done
        self.error: str | None = None
        self.error_status = 500
        self.cancel_reason: str | None = None  # set by cancel(); "timeout" answers 504
        self.batch_images = 0
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self._listeners: list[Callable[[str, dict], None]] = []
        self._history: list[tuple[str, dict]] = []  # progress events and the latest preview, for late listeners
        self._lock = threading.Lock()
        self.cache: dict = {}  # encoded outputs, filled by the routes

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed", "cancelled")

    @property
    def timed_out(self) -> bool:
        return self.cancel_reason == "timeout"

    def listen(self, callback: Callable[[str, dict], None]) -> Callable[[], None]:
        """callback(event, data) from the worker thread for each event, after the events so far (every progress
        event and the latest preview) are replayed to it; returns the unsubscribe function."""
        with self._lock:
            for event, data in self._history:
                callback(event, data)
            self._listeners.append(callback)

        def unsubscribe():
            with self._lock:
                if callback in self._listeners:
                    self._listeners.remove(callback)

        return unsubscribe

    @property
    def listened(self) -> bool:
        return bool(self._listeners)

    def emit(self, event: str, data: dict) -> None:
        with self._lock:
            if event == "preview":
                self._history = [(e, d) for e, d in self._history if e != "preview"]
            if event in ("progress", "preview"):
                self._history.append((event, data))
            listeners = list(self._listeners)
        for callback in listeners:
            try:
                callback(event, data)
            except Exception:  # a listener's failure never stops the batch
                log.exception("job event listener failed")

    def _end(self, state: str, **fields) -> None:
        for k, v in fields.items():
            setattr(self, k, v)
        self.state = state
        self.ended = time.monotonic()
        self.emit(state, {"status": state, "error": self.error})
        if not self.future.done():
            self.future.set_result(self)


class _Watch(Observer):
    """Per step: progress and previews for each job, and cancelled or timed-out jobs' rows dropped."""

    def __init__(self, batcher: "Batcher", jobs: dict):
        self.batcher, self.jobs = batcher, jobs

    def on_step(self, batch, step: int) -> None:
        now = time.monotonic()
        total = batch.sched.num_calls
        for plan in list(batch.plans):
            job = self.jobs[id(plan)]
            if job.cancel_reason is None and now > job.deadline:
                job.cancel_reason = "timeout"
            if job.cancel_reason is not None:
                batch.drop(plan)
                self.batcher._cancelled(job, f"stopped after step {step + 1} of {total}")
                continue
            job.step, job.total = step + 1, total
            job.latents = batch.x[batch.rows_of(plan)]
            job.emit("progress", {"step": job.step, "total": total})
            if job.listened or job.preview_every:  # previews cost a projection: made when asked for or watched
                every = job.preview_every or self.batcher.preview_every
                if every and (job.step % every == 0) and job.step < total:
                    job.emit("preview", {"step": job.step, "total": total, "images": self.batcher.preview(job)})


class Batcher:
    """One model's queue and worker thread. `load` builds the Pipeline inside the worker (so a slow load never
    blocks the caller); `ready` turns true once it is loaded and warmed."""

    def __init__(self, name: str, load: Callable[[], object], *, max_batch: int = 8, batch_wait_ms: float = 10,
                 max_queue: int = 64, timeout: float = 300, preview_every: int = 5, limits: Limits | None = None,
                 metrics=None, warm_all_batches: bool = True):
        self.name = name
        self._load = load
        self.max_batch = max(1, max_batch)
        self.batch_wait = batch_wait_ms / 1000.0
        self.max_queue = max_queue
        self.timeout = timeout
        self.preview_every = preview_every
        self.limits = limits or Limits()
        self.metrics = metrics
        self.warm_all_batches = warm_all_batches
        self.pipe = None
        self.previewer = None
        self.state = "loading"  # loading -> ready -> draining -> closed; or failed
        self.load_error: str | None = None
        self.load_seconds: float | None = None
        self._queue: deque[Job] = deque()
        self._running: list[Job] = []
        self._cond = threading.Condition()
        self._busy_hint = False  # the last group had company, or requests arrived while it ran
        self._seconds_per_image = 0.0  # moving average, for Retry-After
        self._thread = threading.Thread(target=self._main, name=f"sdrt-batcher-{name}", daemon=True)

    # --- the caller's side -------------------------------------------------------------------------------------

    def start(self) -> "Batcher":
        if not self._thread.is_alive() and self.state == "loading":  # once
            self._thread.start()
        return self

    @property
    def facts(self):
        """The model's facts (default size, size step, ...) for the limits; valid once ready."""
        return self.pipe.facts

    @property
    def planner(self):
        """What plans requests (checks them and resolves defaults) before they are queued: the pipeline itself."""
        return self.pipe

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def submit(self, plan, preview_every: int = 0, preview_decode: bool = False, watchable: bool = False) -> Job:
        """Queue a plan. watchable: an async job that listeners may follow later (here previews are made when one
        listens; a RemoteBatcher asks its replica for them up front)."""
        job = Job(plan, self.name, self.timeout, preview_every, preview_decode)
        with self._cond:
            if self.state != "ready":
                raise NotAccepting(f"model {self.name!r} is {self.state}")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(self._retry_after())
            self._queue.append(job)
            if any(not j.finished for j in self._running):  # (a finished batch's clients may already be back)
                self._busy_hint = True
            self._cond.notify_all()
        self._gauge()
        return job

    def cancel(self, job: Job, reason: str = "cancelled") -> bool:
        """Stop a job: out of the queue at once, or out of its batch at the next step. False if already finished."""
        with self._cond:
            if job.finished:
                return False
            if job.cancel_reason is None:
                job.cancel_reason = reason
            if job in self._queue:
                self._queue.remove(job)
                self._cancelled(job, "cancelled while queued")
                self._cond.notify_all()
        self._gauge()
        return True

    def cancel_running(self, reason: str = "interrupted") -> int:
        with self._cond:
            jobs = list(self._running)
        return sum(self.cancel(job, reason) for job in jobs)

    def position(self, job: Job) -> int | None:
        """Requests ahead of `job` in this queue (0: next), None when it is not queued."""
        with self._cond:
            for k, queued in enumerate(self._queue):
                if queued is job:
                    return k
        return None

    def running(self) -> list[Job]:
        with self._cond:
            return list(self._running)

    def loras_in_use(self) -> set[str]:
        """The run-time LoRA names of the queued and running requests (a LoRA library never unregisters them)."""
        with self._cond:
            jobs = list(self._queue) + list(self._running)
        return {name for job in jobs for name, _ in (getattr(job.plan, "loras", None) or ())}

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def idle(self) -> bool:
        with self._cond:
            return not self._queue and not self._running

    def drain(self, timeout: float) -> bool:
        """Accept nothing new, finish what is queued and running (up to `timeout` s; then cancel the rest)."""
        with self._cond:
            if self.state == "ready":
                self.state = "draining"
            self._cond.notify_all()
        end = time.monotonic() + timeout
        while not self.idle and time.monotonic() < end:
            time.sleep(0.02)
        drained = self.idle
        if not drained:
            with self._cond:
                leftover = list(self._queue) + list(self._running)
            for job in leftover:
                self.cancel(job, "shutdown")
        with self._cond:
            self.state = "closed"
            self._cond.notify_all()
        return drained

    def preview(self, job: Job) -> list[str]:
        """Base64 PNG previews of a job's current latents: the linear projection, or a VAE decode if it asked."""
        from sdrt.images import decoded_to_uint8
        from sdrt.serve.media import png_b64
        from PIL import Image

        latents = job.latents
        if latents is None:
            return []
        if job.preview_decode:
            images = [Image.fromarray(p) for p in decoded_to_uint8(self.pipe.decode(latents))]
        else:
            images = self.previewer(latents)
        return [png_b64(image) for image in images]

    # --- the worker thread -------------------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            t0 = time.perf_counter()
            self.pipe = self._load()
            self._warm()
            self.load_seconds = time.perf_counter() - t0
            with self._cond:
                if self.state == "loading":
                    self.state = "ready"
            log.info("model %s ready in %.2f s", self.name, self.load_seconds)
        except Exception as err:  # a model that does not load: /readyz says why
            log.exception("model %s failed to load", self.name)
            self.state, self.load_error = "failed", f"{type(err).__name__}: {err}"
            return
        while True:
            group = self._next_group()
            if group is None:
                return
            self._run(group)

    def _warm(self) -> None:
        """Short generations at every batch size this batcher can form (ONNX Runtime builds a session per input
        shape for small networks: ~0.1-0.3 s each, paid here rather than by the first requests of each size),
        the text encoder at every count of distinct texts, and the preview projection's fit."""
        from sdrt.serve.media import LatentPreview

        pipe = self.pipe
        for rows in range(1, (self.max_batch if self.warm_all_batches else 1) + 1):
            plan = pipe.plan("warm up", num_inference_steps=2, seed=0, output_type="np", num_images_per_prompt=rows)
            batch = pipe.prepare_latents([plan], pipe.encode_text([plan]))
            pipe.denoise(batch)
            pipe.finish(batch)
        for count in range(3, 2 * self.max_batch + 1 if self.warm_all_batches else 0):  # [negatives; prompts]: up to two distinct texts per image
            pipe.encode_prompts([f"warm up {k}" for k in range(count)])
        self.previewer = LatentPreview.fit(pipe)

    def _next_group(self) -> list[Job] | None:
        with self._cond:
            while True:
                if not self._queue:
                    if self.state == "closed":
                        return None
                    self._cond.wait(0.5)
                    continue
                head = self._queue[0]
                wait_until = head.enqueued + (self.batch_wait if self._busy_hint else 0.0)
                while True:
                    take, more = self._company(head)
                    now = time.monotonic()
                    if more or sum(j.plan.batch for j in take) >= self.max_batch or now >= wait_until \
                            or self.state != "ready":
                        break
                    self._cond.wait(wait_until - now)
                    if not self._queue or self._queue[0] is not head:
                        break
                if not self._queue or self._queue[0] is not head:
                    continue  # the head was cancelled while waiting: start over
                take, _ = self._company(head)
                for job in take:
                    self._queue.remove(job)
                    job.state, job.started = "running", time.monotonic()
                self._running = take
                self._busy_hint = len(take) > 1 or bool(self._queue)
                break
        self._gauge()
        return take

    def _company(self, head: Job) -> tuple[list[Job], bool]:
        """The head and the later same-key jobs that fit in `max_batch` images; True if more such are waiting."""
        key, take, images = head.plan.batch_key, [head], head.plan.batch
        for job in itertools.islice(self._queue, 1, None):
            if job.plan.batch_key != key:
                continue
            if images + job.plan.batch > self.max_batch:
                return take, True
            take.append(job)
            images += job.plan.batch
        return take, False

    def _run(self, jobs: list[Job]) -> None:
        pipe = self.pipe
        jobs = [j for j in jobs if not self._skip_cancelled(j)]
        plans = [j.plan for j in jobs]
        by_plan = {id(j.plan): j for j in jobs}
        images = sum(p.batch for p in plans)
        for job in jobs:
            job.batch_images = images
            job.emit("running", {"status": "running", "batch_images": images})
        try:
            if plans:
                self._observe_queue(jobs)
                t0 = time.perf_counter()
                text = pipe.encode_text(plans)
                batch = pipe.prepare_latents(plans, text)
                t1 = time.perf_counter()
                pipe.denoise(batch, [_Watch(self, by_plan)])
                t2 = time.perf_counter()
                outputs = pipe.finish(batch) if batch.plans else []
                t3 = time.perf_counter()
                self._record(images, {"text": t1 - t0, "denoise": t2 - t1, "decode": t3 - t2, "batch": t3 - t0})
                for plan, out in zip(batch.plans, outputs):
                    job = by_plan[id(plan)]
                    out.timings.update(text=t1 - t0, loop=t2 - t1, decode=t3 - t2, total=t3 - t0)
                    job._end("done", output=out, step=batch.sched.num_calls, total=batch.sched.num_calls)
                    if self.metrics:
                        self.metrics.images(self.name, plan.batch)
                        self.metrics.stage("request", time.monotonic() - job.enqueued)
        except SdrtError as err:
            status = 422 if isinstance(err, InputError) else 500
            for job in jobs:
                if not job.finished:
                    job._end("failed", error=str(err), error_status=status)
        except Exception as err:  # logged with its traceback here; the client sees no traceback
            log.exception("batch on model %s failed", self.name)
            for job in jobs:
                if not job.finished:
                    job._end("failed", error=f"internal error ({type(err).__name__})", error_status=500)
        finally:
            for job in jobs:  # rows that left the batch already ended; anything else ends now
                if not job.finished:
                    self._cancelled(job, "stopped")
            with self._cond:
                self._running = []
                self._cond.notify_all()
            self._gauge()

    def _skip_cancelled(self, job: Job) -> bool:
        if job.cancel_reason is None and time.monotonic() > job.deadline:
            job.cancel_reason = "timeout"
        if job.cancel_reason is not None:
            self._cancelled(job, "cancelled before it started")
            return True
        return False

    def _cancelled(self, job: Job, detail: str) -> None:
        reason = job.cancel_reason or "cancelled"
        if self.metrics:
            self.metrics.cancelled(self.name, reason)
        job._end("cancelled", error=f"{reason}: {detail}", error_status=504 if reason == "timeout" else 409)

    # --- figures -----------------------------------------------------------------------------------------------

    def _retry_after(self) -> int:
        per_image = self._seconds_per_image or 1.0
        waiting = sum(j.plan.batch for j in self._queue)
        return max(1, math.ceil(per_image * waiting))

    def _record(self, images: int, stages: dict) -> None:
        per_image = stages["batch"] / max(images, 1)
        self._seconds_per_image = per_image if not self._seconds_per_image else 0.8 * self._seconds_per_image + 0.2 * per_image
        if self.metrics:
            self.metrics.batch(self.name, images)
            for stage, seconds in stages.items():
                self.metrics.stage(stage, seconds)

    def _observe_queue(self, jobs: list[Job]) -> None:
        if self.metrics:
            for job in jobs:
                self.metrics.stage("queue", job.started - job.enqueued)

    def _gauge(self) -> None:
        if self.metrics:
            self.metrics.queue(self.name, len(self._queue), len(self._running))
