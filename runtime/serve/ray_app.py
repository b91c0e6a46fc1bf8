"""`sdrt serve --ray`: the same HTTP app on Ray Serve (`pip install 'sdrt[ray]'`).

    Ingress      one deployment running create_app(config, batchers={name: RemoteBatcher}): every route, error,
                 limit, the API key, /metrics and the async jobs' state live here (jobs survive a replica's death)
    model-NAME   one deployment per model; each replica holds a warm Pipeline and its own Batcher, so requests
                 that reach one replica batch together as on one machine
    jobs         one replica keeping the async jobs' last states, for an ingress that restarts (ray_jobs)

The ingress checks every request as one machine does (the limits, then the pipeline's own plan() on its planning
copy: a bad request is a 422 at POST time), fixes its seed (so a retry reproduces it) and streams it from the model's
deployment (ray_remote.RemoteBatcher <- ray_replica.ModelReplica.stream: queue position, per-step progress,
previews, result); a request whose replica died is sent again to another replica and returns the same image. Ray
Serve restarts the replica; `check_health` runs a tiny generation. `--lora-dir` is read on the replicas' nodes: a
request's LoRAs are checked and registered by a replica at POST (`ModelReplica.prepare_loras`), as on one machine.

--direct-ingress (ray_direct): the ingress replica serves HTTP on --port itself, without Serve's HTTP proxy hop.

Nothing here is imported unless --ray is asked for: `import sdrt` and `sdrt serve` never import ray.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time

from sdrt.errors import InputError, SdrtError
from sdrt.serve import ray_direct
from sdrt.serve.app import ServeConfig, create_app
from sdrt.serve.ray_jobs import JobStore, RemoteJobStore
from sdrt.serve.ray_remote import APP_NAME, RemoteBatcher, deployment_name
from sdrt.serve.ray_replica import ModelReplica, bind_loopback

log = logging.getLogger("sdrt.serve")


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
    autoscaling_config: dict = dataclasses.field(default_factory=dict)  # Serve's own keys over sdrt's (with --autoscale)
    direct_ingress: bool = False  # the ingress replica serves HTTP on --port itself (ray_direct)

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
                                             "upscale_delay_s": 3.0, "downscale_delay_s": 60.0,
                                             **self.autoscaling_config}
        else:
            options["num_replicas"] = self.replicas
        return options

    @property
    def must_place(self) -> int:
        return self.autoscale[0] if self.autoscale else self.replicas


class Ingress:
    """The FastAPI app (create_app) over RemoteBatchers; built on the replica (`__serve_build_asgi_app__`)."""

    def __init__(self, config: ServeConfig, handles: dict, jobs=None):
        bind_loopback()
        self.config, self.handles, self.jobs = config, handles, jobs

    def __serve_build_asgi_app__(self):
        from sdrt.serve.ops import Metrics

        metrics = Metrics()
        batchers = {name: RemoteBatcher(name, handle, self.config, metrics) for name, handle in self.handles.items()}
        app = create_app(self.config, batchers=batchers, metrics=metrics)
        if self.jobs is not None:
            app.state.service.job_store = RemoteJobStore(self.jobs)
        return app


def build(config: ServeConfig, options: RayOptions):
    """The Serve application: one deployment per model, the job store, and the ingress bound to their handles."""
    _, serve = require_ray()
    handles = {}
    for name, path in config.models.items():
        model = serve.deployment(ModelReplica, name=deployment_name(name))
        handles[name] = model.options(**options.deployment_options(config)).bind(name, path, config)
    jobs = serve.deployment(JobStore, name="jobs", num_replicas=1, ray_actor_options={"num_cpus": 0},
                            max_ongoing_requests=10_000).bind()
    ingress = serve.deployment(serve.ingress()(Ingress), name="ingress", num_replicas=1,
                               ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000,
                               graceful_shutdown_timeout_s=min(config.drain_timeout, 20.0))
    return ingress.bind(config, handles, jobs)


def app_builder(args: dict):
    """For Serve config files (`serve deploy ray_config.yaml`): args {models: {name: path|null}, replicas,
    autoscale: "MIN:MAX", autoscaling_config: {Serve's keys}, cpus_per_replica, gpus_per_replica, max_batch, backend, ...}."""
    args = dict(args or {})
    options = RayOptions(replicas=int(args.pop("replicas", 1)), autoscale=parse_autoscale(args.pop("autoscale", None)),
                         cpus_per_replica=float(args.pop("cpus_per_replica", 1.0)),
                         gpus_per_replica=float(args.pop("gpus_per_replica", 0.0)),
                         max_replicas_per_node=args.pop("max_replicas_per_node", None),
                         autoscaling_config=dict(args.pop("autoscaling_config", None) or {}))
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


def connect(options: RayOptions) -> int:
    """Join the cluster at --address or start a local one; returns the port Serve's HTTP proxy is to take."""
    ray, _ = require_ray()
    if options.address:
        if not ray.is_initialized():
            check_reachable(options.address)
            ray.init(address=options.address, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING)
        if options.direct_ingress:
            ray_direct.check_joined(ray_direct.node_settings())
        return options.port
    proxy_port = options.port
    if options.direct_ingress:
        if ray.is_initialized():  # its processes read the switch and --port's range when they started
            raise SdrtError("--direct-ingress needs the local Ray cluster started by deploy(): call ray.shutdown() first")
        proxy_port = ray_direct.prepare_local(options.host, options.port)
    if not ray.is_initialized():
        loopback_only()
        # Ray nices its workers (15) by default; the replicas here are the workload, at the priority `sdrt serve` has
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(num_cpus=options.num_cpus, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING, _node_ip_address="127.0.0.1")
    return proxy_port


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

    proxy_port = connect(options)
    _, serve = require_ray()
    check_placement(config, options)
    # With direct ingress Serve keeps this proxy on the head node anyway (its controller overrides the location);
    # on a local cluster it takes another port and the ingress replica --port (ray_direct)
    serve.start(proxy_location="HeadOnly", http_options={"host": options.host, "port": proxy_port})
    serve.run(build(config, options), name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{options.host}:{options.port}"
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    end = time.monotonic() + ready_timeout
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=5, headers=headers).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > end:
            raise SdrtError(f"the Ray Serve app was not ready in {ready_timeout:g} s (see `serve status`)")
        time.sleep(0.2)
    if options.direct_ingress and options.address:  # the proxy answered; the ingress took a port of the cluster's range
        urls = ray_direct.ingress_urls(APP_NAME, proxy_port)
        log.info("direct ingress at %s (Serve's proxy, one hop more: %s)", ", ".join(urls) or "?", url)
        url = urls[0] if urls else url
    return url


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
