"""Experiment: Ray Serve's direct ingress (RAY_SERVE_ENABLE_DIRECT_INGRESS=1: no HTTP proxy, the ingress replica
listens itself) against the default proxy path, for the added latency at 1 client of `sdrt serve --ray` (issue 21).

    python benchmarks/ray_direct_ingress.py proxy 3     # rounds on Serve's default path (a fresh cluster each)
    python benchmarks/ray_direct_ingress.py direct 3    # the same with direct ingress

Superseded by the option `sdrt serve --ray --direct-ingress` (sdrt/serve/ray_direct.py), measured through the CLI
by benchmarks/ray_serve_latency.py. When this experiment ran it was not an option yet: here the flag and a port range are set in the environment of the local cluster this process
starts (Serve reads them at import in each of its processes), the proxy sdrt's deploy() still starts answers on
--port, and the ingress replica takes the lowest free port of [port + 1, port + 4), which is measured directly.
An option would start Serve without a proxy and give the ingress exactly --port (one ingress replica per node), and
must say that replicas are then held RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S (30 s) when draining.
Results: benchmarks/results/ray-direct-ingress.md. Loopback only; bounded (60 pairs per round).
"""

import os
import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local cluster on 127.0.0.1 only
from ray_serve_load import paired  # noqa: E402
from serve_load import free_port, start_server, stop  # noqa: E402


def main() -> int:
    from sdrt.serve import ServeConfig
    from sdrt.serve.ray_app import RayOptions, deploy, shutdown

    mode, rounds = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3
    if mode not in ("proxy", "direct"):
        raise SystemExit("usage: ray_direct_ingress.py proxy|direct [ROUNDS]")
    proc, local, _ = start_server(8)
    try:
        for r in range(rounds):
            port = free_port()
            if mode == "direct":
                os.environ.update(RAY_SERVE_ENABLE_DIRECT_INGRESS="1", RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT=str(port + 1),
                                  RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT=str(port + 4))
            options = RayOptions(replicas=1, cpus_per_replica=1, num_cpus=2, port=port)
            try:
                url = deploy(ServeConfig(max_batch=8), options, ready_timeout=90)
                if mode == "direct":
                    url = f"http://127.0.0.1:{port + 1}"
                    assert httpx.get(url + "/readyz").status_code == 200
                res = paired(local, url, 60)
                print(f"{mode} round {r}: added {res['added_ms_median']:.2f} ms (IQR {res['added_ms_iqr'][0]:.1f} .. "
                      f"{res['added_ms_iqr'][1]:.1f}), p50 alone {res['local_p50_ms']:.1f} / through Ray {res['ray_p50_ms']:.1f}",
                      flush=True)
            finally:
                shutdown()
    finally:
        stop(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
