"""Operations: /healthz (the process answers), /readyz (every model loaded and warm, not draining), /metrics
(Prometheus), and the metrics themselves (one registry per app, so several apps can live in one process)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from sdrt.serve.schemas import HealthResponse, ReadyResponse

router = APIRouter(tags=["operations"])

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self._requests = Counter("sdrt_requests", "HTTP requests by route and status", ["method", "route", "status"], registry=r)
        self._queue = Gauge("sdrt_queue_depth", "requests waiting per model", ["model"], registry=r)
        self._running = Gauge("sdrt_running_requests", "requests in the running batch per model", ["model"], registry=r)
        self._batch = Histogram("sdrt_batch_images", "images per batched UNet call", ["model"],
                                buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64), registry=r)
        self._stage = Histogram("sdrt_stage_seconds", "seconds per stage (queue, text, denoise, decode, batch, request)",
                                ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self._images = Counter("sdrt_images", "images made", ["model"], registry=r)
        self._cancelled = Counter("sdrt_cancelled", "requests stopped before their images were made, by reason",
                                  ["model", "reason"], registry=r)
        self._replica = None  # under Ray Serve: requests answered per replica, and retries after a replica died

    def _ray_counters(self) -> None:
        if self._replica is None:
            self._replica = Counter("sdrt_replica_requests", "requests answered per Ray Serve replica",
                                    ["model", "node", "pid"], registry=self.registry)
            self._retries = Counter("sdrt_replica_retries", "requests sent again after their replica died", ["model"],
                                    registry=self.registry)

    def replica_request(self, model: str, node: str, pid: str) -> None:
        self._ray_counters()
        self._replica.labels(model, node, pid).inc()

    def retry(self, model: str) -> None:
        self._ray_counters()
        self._retries.labels(model).inc()

    def request(self, method: str, route: str, status: int) -> None:
        self._requests.labels(method, route, str(status)).inc()

    def queue(self, model: str, queued: int, running: int) -> None:
        self._queue.labels(model).set(queued)
        self._running.labels(model).set(running)

    def batch(self, model: str, images: int) -> None:
        self._batch.labels(model).observe(images)

    def stage(self, stage: str, seconds: float) -> None:
        self._stage.labels(stage).observe(seconds)

    def cancelled(self, model: str, reason: str) -> None:
        self._cancelled.labels(model, reason).inc()

    def images(self, model: str, count: int) -> None:
        self._images.labels(model).inc(count)


@router.get("/healthz", response_model=HealthResponse)
def healthz():
    return HealthResponse(status="ok")


@router.get("/readyz", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}})
def readyz(request: Request):
    service = request.app.state.service
    models = {name: b.state for name, b in service.batchers.items()}
    if service.ready:
        return ReadyResponse(status="ready", models=models)
    status = "draining" if service.draining else "loading"
    return JSONResponse(ReadyResponse(status=status, models=models).model_dump(), 503)


@router.get("/metrics", response_class=Response)
def metrics(request: Request):
    return Response(generate_latest(request.app.state.service.metrics.registry), media_type=CONTENT_TYPE_LATEST)
