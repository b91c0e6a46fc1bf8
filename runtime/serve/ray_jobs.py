"""Async jobs' state beyond the ingress replica (`sdrt serve --ray`). The ingress drives its jobs and keeps them in its
memory; a `jobs` deployment (one replica, no CPU) keeps each job's status as the ingress last wrote it: when it
was submitted, and when it ended (with its images). An ingress that Ray Serve restarted answers from it:
finished jobs as they were, and jobs that were in flight as failed (their ingress drove them; resubmitting with the
same seed makes the same image). The store is memory too: it survives the ingress, not its own death."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict

from sdrt.serve.app import FINISHED_JOB_TTL, MAX_FINISHED_JOBS

log = logging.getLogger("sdrt.serve")

FINAL = ("done", "failed", "cancelled")
GET_TIMEOUT_S = 5.0  # a store that does not answer in this time is treated as having no such job


class JobStore:
    """The deployment: job id -> its status (JobStatus as a dict), the newest MAX_FINISHED_JOBS for FINISHED_JOB_TTL."""

    def __init__(self):
        from sdrt.serve.ray_replica import bind_loopback

        bind_loopback()
        self.jobs: OrderedDict[str, tuple[float, dict]] = OrderedDict()

    def put(self, job_id: str, status: dict) -> None:
        old = self.jobs.get(job_id)
        if old is not None and old[1]["status"] in FINAL and status["status"] not in FINAL:
            return  # the submitted status arrived after the final one
        self.jobs[job_id] = (time.monotonic(), status)
        self.jobs.move_to_end(job_id)
        now = time.monotonic()
        for key in [k for k, (t, s) in self.jobs.items() if s["status"] in FINAL and now - t > FINISHED_JOB_TTL]:
            del self.jobs[key]
        while len(self.jobs) > MAX_FINISHED_JOBS:
            self.jobs.popitem(last=False)

    def get(self, job_id: str) -> dict | None:
        entry = self.jobs.get(job_id)
        return entry[1] if entry else None


class RemoteJobStore:
    """The ingress's side: writes each job's status as it is submitted and when it ends, reads one back."""

    def __init__(self, handle):
        self.handle = handle
        self._pending: set[asyncio.Task] = set()

    def track(self, job, status) -> None:
        """`status(images: bool)`: the job's JobStatus (a coroutine). Written now, and again once the job ends."""
        loop = asyncio.get_running_loop()
        self._spawn(self._put(job, status, False))
        job.future.add_done_callback(lambda _f: loop.call_soon_threadsafe(self._spawn, self._put(job, status, True)))

    def _spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _put(self, job, status, images: bool) -> None:
        try:
            body = (await status(images)).model_dump()
            body["seed"] = job.plan.kwargs.get("seed")  # (for the message if this ingress dies first)
            await self.handle.put.remote(job.id, body)
        except Exception as err:  # noqa: BLE001 - the store is a fallback: the job itself goes on
            log.warning("job %s: not written to the job store (%s)", job.id, err)

    async def get(self, job_id: str) -> dict | None:
        """The stored status (JobStatus fields); a job stored unfinished was lost with the ingress that drove it."""
        try:
            stored = await asyncio.wait_for(self.handle.get.remote(job_id), timeout=GET_TIMEOUT_S)
        except Exception as err:  # noqa: BLE001 - the store is down or restarting: as if it had no such job
            log.warning("job store unavailable for job %s (%s)", job_id, type(err).__name__)
            return None
        if stored is None:
            return None
        seed = stored.pop("seed", None)
        if stored["status"] not in FINAL:
            again = f" with seed {seed}" if seed is not None else ""
            stored.update(status="failed", position=None,
                          error=f"the server's ingress restarted while this job was {stored['status']}; submit it "
                                f"again{again} for the same image")
        return stored
