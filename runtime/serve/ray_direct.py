"""`sdrt serve --ray --direct-ingress`: Ray Serve's direct ingress, one HTTP hop fewer per request.

Serve's default path is client -> HTTP proxy actor -> ingress replica -> model replica; with direct ingress
(RAY_SERVE_ENABLE_DIRECT_INGRESS=1, experimental in Ray 2.60) the ingress replica runs its own HTTP server and the
client talks to it: ~5-6 ms added per request at 1 client here instead of ~12 ms (benchmarks/results/).

Ray 2.60 reads the switch and its port range from the environment of Serve's processes when they import Serve (the
controller, the replicas), never from serve.start(), so (read from ray/serve/_private/{constants,controller,replica,
node_port_manager}.py):
- on a local cluster started here, the variables are set before ray.init: the cluster's processes inherit them;
- a joined cluster (--address) must have been started with them (`ray start` inherits its shell's environment):
  checked on every alive node before deploying, else a one-line refusal saying what to set;
- the controller keeps an HTTP proxy on the head node whatever proxy_location says (and a replica serves HTTP only
  if that location is not "Disabled"), so the proxy is given another free port here and the ingress replica the
  range [--port, --port + 1): exactly --port. Each ingress replica takes its own port of the range; sdrt runs one;
- a released port is held out of the pool RAY_SERVE_PORT_QUARANTINE_S (150 s, for HAProxy), which would keep a
  restarted ingress off its only port: 0 here (no HAProxy);
- a stopping ingress replica is held open RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S (30 s) for a load balancer
  to deregister it: 0 on a local cluster started here (nothing in front of it; Ctrl-C returns in seconds). Set
  either variable yourself to keep Ray's value.
"""

from __future__ import annotations

import os
import socket

from sdrt.errors import SdrtError

ENABLE = "RAY_SERVE_ENABLE_DIRECT_INGRESS"
MIN_PORT = "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"
MAX_PORT = "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"
DRAIN_HOLD = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"
QUARANTINE = "RAY_SERVE_PORT_QUARANTINE_S"


def prepare_local(host: str, port: int) -> int:
    """Before ray.init of a local cluster: --port free, the variables set; returns a free port for Serve's proxy."""
    check_free(host, port)
    os.environ.update({ENABLE: "1", MIN_PORT: str(port), MAX_PORT: str(port + 1)})  # range(MIN, MAX): only --port
    os.environ.setdefault(DRAIN_HOLD, "0")
    os.environ.setdefault(QUARANTINE, "0")
    return free_port(host)


def check_free(host: str, port: int) -> None:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError as err:
            raise SdrtError(f"--port {port} on {host} is taken ({err.strerror or err}); the ingress replica must "
                            f"listen on it with --direct-ingress: pick another --port") from None


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def node_settings() -> list[dict]:
    """[{node, ENABLE, MIN_PORT, MAX_PORT}] as Serve's processes on each alive node of the connected cluster see them
    (a task pinned to each node reads its worker's environment, which is the node's `ray start` environment)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def read_env():
        return {k: os.environ.get(k) for k in (ENABLE, MIN_PORT, MAX_PORT)}

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    refs = [read_env.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
            for n in nodes]
    return [{"node": n["NodeManagerAddress"], **env} for n, env in zip(nodes, ray.get(refs, timeout=60))]


def check_joined(settings: list[dict]) -> None:
    """A joined cluster's nodes all run Serve with direct ingress on, else refuse (nothing is deployed)."""
    off = sorted({s["node"] for s in settings if s.get(ENABLE) != "1"})
    if off:
        raise SdrtError(f"--direct-ingress: the Ray cluster's node(s) {', '.join(off)} run without direct ingress; "
                        f"start every node with {ENABLE}=1 in the environment of `ray start` (optionally "
                        f"{MIN_PORT}/{MAX_PORT}: the ingress replica's port range, 30000-31000 by default), "
                        f"or drop --direct-ingress")


def ingress_urls(app_name: str, proxy_port: int) -> list[str]:
    """The HTTP addresses of the app's running ingress replicas, as Serve's controller hands them to load balancers
    (an app without running ingress replicas is listed with the proxy's address instead: left out)."""
    from ray.serve._private.common import RequestProtocol
    from ray.serve.context import _get_global_client

    import ray

    groups = ray.get(_get_global_client()._controller.get_target_groups.remote(app_name), timeout=30)
    return [f"http://{t.ip}:{t.port}" for g in groups if g.protocol == RequestProtocol.HTTP and g.app_name == app_name
            for t in g.targets if t.port != proxy_port]
