"""`sdrt serve --ray`: the same HTTP app on Ray Serve (`pip install 'sdrt[ray]'`).

    Ingress      one deployment running create_app(config, batchers={name: RemoteBatcher}): every route, error,
                 limit, the API key, /metrics and the async jobs' state live here (jobs survive a replica's death)
    model-NAME   one deployment per model; each replica holds a warm Pipeline and its own Batcher, so requests
                 that reach one replica batch together as on one machine

The ingress checks the limits, draws a seed for a request without one (so a retry reproduces it) and calls
`generate` on the model's deployment handle; a request whose replica died is retried on another replica and
returns the same image. Ray Serve restarts the replica; `check_health` runs a tiny generation.

Nothing here is imported unless --ray is asked for: `import sdrt` and `sdrt serve` never import ray.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import secrets
import socket
import time

from sdrt.errors import InputError, SdrtError
from sdrt.serve.app import ServeConfig, create_app, load_pipeline
from sdrt.serve.batcher import Batcher, Job, NotAccepting, QueueFull

log = logging.getLogger("sdrt.serve")

APP_NAME = "sdrt"
RETRIES = 6  # attempts after the first when a replica dies under a request
RETRY_BACKOFF = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0)


def require_ray():
    try:
        import ray
        from ray import serve
    except ImportError:
        raise SdrtError("sdrt serve --ray needs Ray Serve: pip install 'sdrt[ray]'") from None
    return ray, serve


@dataclasses.dataclass
class RayOptions:
    address: str | None = None  # None: start a local cluster
    replicas: int = 1
    autoscale: tuple[int, int] | None = None  # (min, max) replicas, on ongoing requests per replica
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    resources_per_replica: dict = dataclasses.field(default_factory=dict)  # custom resources, e.g. {"sdrt_slot": 1}
    max_replicas_per_node: int | None = None  # 1: spread one replica per node
    num_cpus: int | None = None  # CPUs of a local cluster started here (None: all)
    host: str = "127.0.0.1"
    port: int = 8000
    health_check_period_s: float = 5.0
    health_check_timeout_s: float = 30.0

    def deployment_options(self, config: ServeConfig) -> dict:
        options = {
            "ray_actor_options": {"num_cpus": self.cpus_per_replica, "num_gpus": self.gpus_per_replica,
                                  "resources": dict(self.resources_per_replica)},
            # enough in flight per replica for its batcher to form full batches
            "max_ongoing_requests": max(4, 2 * config.max_batch),
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
            "graceful_shutdown_timeout_s": min(config.drain_timeout, 20.0),
        }
        if self.max_replicas_per_node:
            options["max_replicas_per_node"] = self.max_replicas_per_node
        if self.autoscale:
            low, high = self.autoscale
            options["autoscaling_config"] = {"min_replicas": low, "initial_replicas": low, "max_replicas": high,
                                             "target_ongoing_requests": max(1, config.max_batch),
                                             "upscale_delay_s": 3.0, "downscale_delay_s": 60.0}
        else:
            options["num_replicas"] = self.replicas
        return options

    @property
    def must_place(self) -> int:
        return self.autoscale[0] if self.autoscale else self.replicas


def bind_loopback() -> None:
    """On a node whose address is 127.0.0.1 (see loopback_only), the replica's inter-deployment gRPC server listens on
    127.0.0.1 too: Ray Serve 2.60 binds it to [::] unconditionally (replica.py, `_on_initialized`, which runs after
    this constructor). Elsewhere nothing changes."""
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


# --- the model replica ---------------------------------------------------------------------------------------------

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
        self.node = ray.get_runtime_context().get_node_id()
        self.pid = os.getpid()

    def facts(self):
        return self.batcher.pipe.facts

    def whoami(self) -> dict:
        return {"node": self.node, "pid": self.pid}

    async def generate(self, kwargs: dict) -> dict:
        """Plan, queue and wait; every outcome comes back as a dict (errors included), never a traceback."""
        where = {"node": self.node, "pid": self.pid}
        try:
            if kwargs.get("image") is not None:
                plan = await asyncio.to_thread(self.batcher.pipe.plan, **kwargs)
            else:
                plan = self.batcher.pipe.plan(**kwargs)
        except InputError as err:
            return {"state": "failed", "error": str(err), "status": 422, **where}
        try:
            job = self.batcher.submit(plan)
        except QueueFull as err:
            return {"state": "failed", "error": str(err), "status": 429, "retry_after": err.retry_after, **where}
        except NotAccepting as err:
            return {"state": "failed", "error": str(err), "status": 503, **where}
        try:
            await asyncio.wrap_future(job.future)
        except asyncio.CancelledError:  # the ingress cancelled (client gone, timeout, DELETE): free the batch row
            self.batcher.cancel(job, "cancelled")
            raise
        return {"state": job.state, "output": job.output, "error": job.error, "status": job.error_status,
                "batch_images": job.batch_images, "step": job.step, "total": job.total, "timed_out": job.timed_out, **where}

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


# --- the ingress side ----------------------------------------------------------------------------------------------

class RemotePlan:
    """What the ingress knows of a request before a replica plans it: the pipeline's keyword arguments."""

    def __init__(self, kwargs: dict):
        self.kwargs = kwargs
        self.batch = int(kwargs.get("num_images_per_prompt") or 1)
        self.batch_key = None


def _retryable() -> tuple:
    import ray.exceptions as rex

    kinds = [rex.RayActorError, rex.ActorUnavailableError]
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
    """Batcher's caller-side interface over a Ray Serve deployment handle (what app.Service and the routes use).
    Jobs live here, at the ingress; a request whose replica dies is sent again (same seed: same image)."""

    remote = True

    def __init__(self, name: str, handle, config: ServeConfig, metrics=None):
        self.name, self.handle, self.config, self.metrics = name, handle, config, metrics
        self.limits = config.limits
        self.timeout = config.timeout
        self.pipe = None  # no pipeline at the ingress
        self._facts = None
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
        """Fetch the model's facts once, then keep the count of RUNNING replicas fresh (for /readyz)."""
        from ray import serve

        while not self.draining:
            try:
                if self._facts is None:
                    self._facts = await self.handle.facts.remote()
                status = await asyncio.to_thread(serve.status)
                app = status.applications.get(APP_NAME)
                dep = app.deployments.get(deployment_name(self.name)) if app else None
                self.running_replicas = int(dep.replica_states.get("RUNNING", 0)) if dep else 0
            except Exception as err:  # noqa: BLE001 - a cluster hiccup: try again
                log.debug("watching %s: %s", self.name, err)
            await asyncio.sleep(1.0)

    @property
    def facts(self):
        return self._facts

    @property
    def state(self) -> str:
        if self.draining:
            return "draining"
        if self._facts is None:
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
        return None  # the queue is on a replica

    def preview(self, job: Job) -> list[str]:
        return []

    # requests -------------------------------------------------------------------------------------------------------

    def plan(self, **kw) -> RemotePlan:
        if kw.get("seed") is None:  # drawn here, so a retry on another replica makes the same image
            kw["seed"] = secrets.randbelow(2**32 - int(kw.get("num_images_per_prompt") or 1))
        return RemotePlan(kw)

    def submit(self, plan: RemotePlan, preview_every: int = 0, preview_decode: bool = False) -> Job:
        if self.draining:
            raise NotAccepting(f"model {self.name!r} is draining")
        job = Job(plan, self.name, self.timeout, preview_every, preview_decode)
        self._inflight[job.id] = job
        task = asyncio.get_running_loop().create_task(self._drive(job))
        self._tasks[job.id] = task
        task.add_done_callback(lambda _t, key=job.id: (self._tasks.pop(key, None), self._inflight.pop(key, None)))
        return job

    async def _drive(self, job: Job) -> None:
        attempt = 0
        try:
            while True:
                response = self.handle.generate.remote(job.plan.kwargs)
                job.state, job.started = "running", job.started or time.monotonic()
                job.emit("running", {"status": "running", "batch_images": 0})
                try:
                    result = await response
                except self._retryable as err:
                    if attempt >= RETRIES or time.monotonic() > job.deadline:
                        job._end("failed", error=f"model {self.name!r}: no replica could finish the request "
                                                 f"({type(err).__name__})", error_status=503)
                        return
                    log.warning("model %s: replica lost under job %s (%s); retrying", self.name, job.id, type(err).__name__)
                    if self.metrics:
                        self.metrics.retry(self.name)
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
            task.cancel()  # cancels the Serve request; the replica's batcher drops the row
        return True

    def cancel_running(self, reason: str = "interrupted") -> int:
        return sum(self.cancel(job, reason) for job in list(self._inflight.values()))

    @property
    def idle(self) -> bool:
        return not self._inflight

    def drain(self, timeout: float) -> bool:
        self.draining = True
        end = time.monotonic() + timeout
        while self._inflight and time.monotonic() < end:
            time.sleep(0.02)
        return not self._inflight


def deployment_name(model: str) -> str:
    return f"model-{model}"


class Ingress:
    """The FastAPI app (create_app) over RemoteBatchers; built on the replica (`__serve_build_asgi_app__`)."""

    def __init__(self, config: ServeConfig, handles: dict):
        bind_loopback()
        self.config, self.handles = config, handles

    def __serve_build_asgi_app__(self):
        from sdrt.serve.ops import Metrics

        metrics = Metrics()
        batchers = {name: RemoteBatcher(name, handle, self.config, metrics) for name, handle in self.handles.items()}
        return create_app(self.config, batchers=batchers, metrics=metrics)


def build(config: ServeConfig, options: RayOptions):
    """The Serve application: one deployment per model and the ingress bound to their handles."""
    _, serve = require_ray()
    handles = {}
    for name, path in config.models.items():
        model = serve.deployment(ModelReplica, name=deployment_name(name))
        handles[name] = model.options(**options.deployment_options(config)).bind(name, path, config)
    ingress = serve.deployment(serve.ingress()(Ingress), name="ingress", num_replicas=1,
                               ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000,
                               graceful_shutdown_timeout_s=min(config.drain_timeout, 20.0))
    return ingress.bind(config, handles)


def app_builder(args: dict):
    """For Serve config files (`serve deploy ray_config.yaml`): args {models: {name: path|null}, replicas,
    autoscale: "MIN:MAX", cpus_per_replica, gpus_per_replica, max_batch, backend, ...}."""
    args = dict(args or {})
    options = RayOptions(replicas=int(args.pop("replicas", 1)), autoscale=parse_autoscale(args.pop("autoscale", None)),
                         cpus_per_replica=float(args.pop("cpus_per_replica", 1.0)),
                         gpus_per_replica=float(args.pop("gpus_per_replica", 0.0)),
                         max_replicas_per_node=args.pop("max_replicas_per_node", None))
    models = args.pop("models", None) or {"digits": None}
    config = ServeConfig(models=dict(models), **args)
    return build(config, options)


def parse_autoscale(text) -> tuple[int, int] | None:
    if text in (None, ""):
        return None
    low, sep, high = str(text).partition(":")
    try:
        low_n, high_n = int(low), int(high)
    except ValueError:
        raise InputError(f"--autoscale {text!r} is not MIN:MAX (e.g. 1:4)") from None
    if not sep or not 0 <= low_n <= high_n or high_n < 1:
        raise InputError(f"--autoscale {text!r} needs 0 <= MIN <= MAX and MAX >= 1 (e.g. 1:4)")
    return low_n, high_n


# --- the cluster -----------------------------------------------------------------------------------------------------

def check_reachable(address: str, timeout: float = 3.0) -> None:
    """ADDR (host:port of the GCS, or ray://host:port) answers a TCP connect, else a one-line error."""
    if address == "auto":
        return
    target = address.split("://", 1)[-1]
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise SdrtError(f"--address {address!r} is not HOST:PORT (e.g. 127.0.0.1:6379)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as err:
        raise SdrtError(f"no Ray cluster answers at {address} ({err.strerror or err}); start one with "
                        f"`ray start --head` or pass the head's address") from None


def connect(options: RayOptions):
    ray, _ = require_ray()
    if ray.is_initialized():
        return ray
    if options.address:
        check_reachable(options.address)
        ray.init(address=options.address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    else:
        loopback_only()
        # Ray nices its workers (15) by default; the replicas here are the workload, at the priority `sdrt serve` has
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(num_cpus=options.num_cpus, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING, _node_ip_address="127.0.0.1")
    return ray


def loopback_only() -> None:
    """A local cluster started here listens on 127.0.0.1 only: Ray resolves "127.0.0.1" to the machine's routable
    address unless it runs in single-machine mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read by Ray's processes
    and, once imported, by this one). Token authentication is off for that loopback-only cluster."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def check_placement(config: ServeConfig, options: RayOptions, nodes: list[dict] | None = None) -> None:
    """Every model's MIN (or N) replicas fit on the cluster's nodes, else say what is missing (before deploying).
    `nodes`: [{"CPU": 2, "GPU": 0, "custom": 1, ...}, ...] (default: the connected cluster's alive nodes)."""
    if nodes is None:
        import ray

        nodes = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    need = {"CPU": options.cpus_per_replica, "GPU": options.gpus_per_replica, **options.resources_per_replica}
    need = {k: float(v) for k, v in need.items() if v}
    free = [dict(n) for n in nodes]
    per_node = [0] * len(free)
    wanted = options.must_place * len(config.models)
    placed = 0
    for _ in range(wanted):
        for k, node in enumerate(free):
            if options.max_replicas_per_node and per_node[k] >= options.max_replicas_per_node:
                continue
            if all(node.get(r, 0.0) + 1e-9 >= amount for r, amount in need.items()):
                for r, amount in need.items():
                    node[r] -= amount
                per_node[k] += 1
                placed += 1
                break
        else:
            break
    if placed < wanted:
        totals = {r: sum(n.get(r, 0.0) for n in nodes) for r in need}
        missing = ", ".join(f"{r} {amount * wanted - totals[r]:g} more" for r, amount in need.items()
                            if amount * wanted > totals[r] + 1e-9)
        spread = f"; at most {options.max_replicas_per_node} per node" if options.max_replicas_per_node else ""
        per = ", ".join(f"{r}={amount:g}" for r, amount in need.items()) or "nothing"
        raise SdrtError(f"{wanted} replicas ({options.must_place} x {len(config.models)} models, each {per}{spread}) do not fit "
                        f"on this Ray cluster's {len(nodes)} node(s): {placed} fit; missing "
                        f"{missing or 'room on one node (each replica needs all of its resources on one node)'}")


def deploy(config: ServeConfig, options: RayOptions, ready_timeout: float = 300.0) -> str:
    """Connect (or start a local cluster), check placement, deploy; returns the HTTP base URL once /readyz is 200."""
    import httpx

    ray = connect(options)
    _, serve = require_ray()
    check_placement(config, options)
    serve.start(proxy_location="HeadOnly", http_options={"host": options.host, "port": options.port})
    serve.run(build(config, options), name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{options.host}:{options.port}"
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    end = time.monotonic() + ready_timeout
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=5, headers=headers).status_code == 200:
                return url
        except httpx.TransportError:
            pass
        if time.monotonic() > end:
            raise SdrtError(f"the Ray Serve app was not ready in {ready_timeout:g} s (see `serve status`)")
        time.sleep(0.2)
    del ray


def shutdown() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def run(config: ServeConfig, options: RayOptions) -> int:
    """`sdrt serve --ray`: deploy, wait for SIGINT/SIGTERM, then shut the app (and a local cluster) down."""
    import signal
    import threading

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        url = deploy(config, options)
        log.info("sdrt on Ray Serve at %s (models: %s)", url, ", ".join(config.models))
        stop.wait()
        log.info("stopping the Ray Serve app")
    finally:
        if require_ray()[0].is_initialized():
            shutdown()
    return 0
