"""Ray Serve against `sdrt serve` alone, on loopback (built-in model, the same request as serve_load.py):

- added latency per request at 1 client: paired requests, one to `sdrt serve` (its own process) then one to
  `sdrt serve --ray` (1 replica), back to back; the median of the differences;
- throughput at 16 clients with 1 and 2 replicas (and `sdrt serve` alone for reference);
- time to recover a SIGKILLed replica (to RUNNING again, i.e. loaded and warm), under 8 clients' load.

    python benchmarks/ray_serve_load.py --out benchmarks/results/ray-serve-load
    python benchmarks/ray_serve_load.py --latency-only --rounds 3 --pairs 40 --out /tmp/ray-serve-latency
A local Ray cluster on 127.0.0.1 (`--ray-cpus`, default 2), stopped at the end; every run is bounded.
--latency-only: the added latency at 1 client alone, a fresh cluster per round.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from serve_load import BODY, free_port, start_server, stop  # noqa: E402


def one(client: httpx.Client, url: str, body: dict) -> float:
    t0 = time.perf_counter()
    r = client.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=300)
    r.raise_for_status()
    return time.perf_counter() - t0


def paired(local: str, ray_url: str, pairs: int) -> dict:
    with httpx.Client() as client:
        for _ in range(3):
            one(client, local, BODY), one(client, ray_url, BODY)
        a, b = [], []
        for k in range(pairs):
            first, second = (local, ray_url) if k % 2 == 0 else (ray_url, local)  # alternate the order
            t1, t2 = one(client, first, BODY), one(client, second, BODY)
            a.append(t1 if first == local else t2)
            b.append(t2 if first == local else t1)
    diffs = [y - x for x, y in zip(a, b)]
    return {"pairs": pairs, "local_p50_ms": 1e3 * statistics.median(a), "ray_p50_ms": 1e3 * statistics.median(b),
            "added_ms_median": 1e3 * statistics.median(diffs),
            "added_ms_iqr": [1e3 * q for q in statistics.quantiles(diffs, n=4)[::2]]}


def load(url: str, clients: int, seconds: float) -> dict:
    stop_at = time.monotonic() + seconds
    latencies, errors = [], [0]
    lock = threading.Lock()

    def worker():
        with httpx.Client() as client:
            while time.monotonic() < stop_at:
                try:
                    dt = one(client, url, BODY)
                    with lock:
                        latencies.append(dt)
                except Exception:  # noqa: BLE001
                    with lock:
                        errors[0] += 1

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(worker) for _ in range(clients)]:
            f.result()
    elapsed = time.monotonic() - t0
    lat = sorted(latencies)
    return {"clients": clients, "seconds": round(elapsed, 1), "requests": len(lat), "errors": errors[0],
            "images_per_s": len(lat) / elapsed, "p50_ms": 1e3 * statistics.median(lat) if lat else None,
            "p95_ms": 1e3 * lat[int(0.95 * (len(lat) - 1))] if lat else None}


def running(name="model-digits") -> int:
    from ray import serve

    dep = serve.status().applications["sdrt"].deployments[name]
    return dep.replica_states.get("RUNNING", 0)


def pids() -> set:
    from ray import serve

    handle = serve.get_deployment_handle("model-digits", app_name="sdrt")
    return {handle.whoami.remote().result(timeout_s=30)["pid"] for _ in range(16)}


def wait_running(n: int, timeout: float = 300) -> float:
    t0 = time.monotonic()
    while running() != n:
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{n} replicas not running in {timeout} s")
        time.sleep(0.1)
    return time.monotonic() - t0


def recovery(url: str, seconds: float) -> dict:
    """Kill one of 2 replicas under 8 clients; time until 2 run again; errors seen by the clients."""
    victim = sorted(pids())[0]
    result = {}

    def kill_later():
        time.sleep(seconds / 4)
        os.kill(victim, signal.SIGKILL)
        t0 = time.monotonic()
        while running() == 2:  # Serve notices the death
            time.sleep(0.02)
        result["noticed_s"] = time.monotonic() - t0
        result["recovered_s"] = result["noticed_s"] + wait_running(2)

    killer = threading.Thread(target=kill_later)
    killer.start()
    during = load(url, 8, seconds)
    killer.join()
    result.update(load_during=during)
    return result


def latency_rounds(args, local: str) -> list[dict]:
    """The added latency at 1 client on a fresh cluster per round (what one cluster's start leaves behind varies)."""
    from sdrt.serve import ServeConfig
    from sdrt.serve.ray_app import RayOptions, deploy, shutdown

    rounds = []
    for _ in range(args.rounds):
        options = RayOptions(replicas=1, cpus_per_replica=1, num_cpus=args.ray_cpus, port=free_port())
        try:
            rounds.append(paired(local, deploy(ServeConfig(max_batch=8), options), args.pairs))
        finally:
            shutdown()
        print("latency", rounds[-1], flush=True)
    return rounds


def latency_markdown(r: dict) -> str:
    fmt = lambda t: ", ".join(f"{x:.1f}" for x in t)  # noqa: E731
    lines = [f"# sdrt serve --ray: added latency at 1 client (built-in model, 64x64, {BODY['steps']} steps DDIM)", "",
             f"- machine: {r['machine']}; load average (1, 5, 15 min) before: {fmt(r['load_average_before'])}; "
             f"after: {fmt(r['load_average_after'])} (other jobs share these cores)",
             f"- command: `{r['command']}`", "",
             "| round (fresh cluster) | added ms, median (IQR) | p50 alone / through Ray ms |", "|---|---|---|"]
    for k, x in enumerate(r["latency_rounds"], 1):
        lines.append(f"| {k} | {x['added_ms_median']:.1f} ({x['added_ms_iqr'][0]:.1f} .. {x['added_ms_iqr'][1]:.1f}) | "
                     f"{x['local_p50_ms']:.1f} / {x['ray_p50_ms']:.1f} |")
    lines += ["", f"- median of the rounds' medians: {statistics.median(x['added_ms_median'] for x in r['latency_rounds']):.1f} ms "
              "(target: <= 10 ms)"]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/ray-serve-load")
    ap.add_argument("--pairs", type=int, default=60)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--ray-cpus", type=int, default=2)
    ap.add_argument("--latency-only", action="store_true", help="only the added latency at 1 client, a fresh cluster per round")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local cluster on 127.0.0.1 only

    from ray import serve

    from sdrt.serve import ServeConfig
    from sdrt.serve.ray_app import RayOptions, build, deploy, shutdown

    load_before = os.getloadavg()
    results: dict = {"command": "python " + " ".join(sys.argv), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                     "body": BODY, "load_average_before": load_before}
    proc, local, _ = start_server(8)
    if args.latency_only:
        try:
            results["latency_rounds"] = latency_rounds(args, local)
        finally:
            stop(proc)
        results["load_average_after"] = os.getloadavg()
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
        out.with_suffix(".md").write_text(latency_markdown(results))
        print(latency_markdown(results))
        return 0
    config = ServeConfig(max_batch=8)
    options = RayOptions(replicas=1, cpus_per_replica=1, num_cpus=args.ray_cpus, port=free_port())
    try:
        ray_url = deploy(config, options)
        results["latency_1_client"] = paired(local, ray_url, args.pairs)
        print("latency", results["latency_1_client"], flush=True)
        # throughput in alternating windows (other jobs share these cores: the local server is measured next to each)
        for replicas in (1, 2):
            if replicas == 2:
                options.replicas = 2
                serve.run(build(config, options), name="sdrt", route_prefix="/", blocking=False)
                wait_running(2)
                time.sleep(2)
            rounds = []
            for _ in range(args.rounds):
                rounds.append({"local": load(local, 16, args.duration), "ray": load(ray_url, 16, args.duration)})
                print(replicas, rounds[-1], flush=True)
            results[f"ray_{replicas}_16"] = rounds
        stop(proc)
        proc = None
        results["recovery"] = recovery(ray_url, args.duration)
        print("recovery", results["recovery"], flush=True)
    finally:
        if proc is not None:
            stop(proc)
        shutdown()
    results["load_average_after"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))
    return 0


def markdown(r: dict) -> str:
    lat = r["latency_1_client"]
    def total(rounds, key):
        reqs = sum(x[key]["requests"] for x in rounds)
        return {"images_per_s": reqs / sum(x[key]["seconds"] for x in rounds), "requests": reqs,
                "errors": sum(x[key]["errors"] for x in rounds),
                "p50_ms": statistics.median(x[key]["p50_ms"] for x in rounds),
                "p95_ms": max(x[key]["p95_ms"] for x in rounds)}

    rows = []
    for replicas in (1, 2):
        rounds = r[f"ray_{replicas}_16"]
        rows.append((f"`sdrt serve` alone (windows next to {replicas} replica{'s' if replicas > 1 else ''})", total(rounds, "local")))
        rows.append((f"Ray Serve, {replicas} replica{'s' if replicas > 1 else ''}", total(rounds, "ray")))
    fmt = lambda t: ", ".join(f"{x:.1f}" for x in t)  # noqa: E731
    rec = r["recovery"]
    lines = [
        f"# sdrt serve --ray: Ray Serve against `sdrt serve` alone (built-in model, 64x64, {BODY['steps']} steps DDIM)", "",
        f"- machine: {r['machine']}; load average (1, 5, 15 min) before: {fmt(r['load_average_before'])}; "
        f"after: {fmt(r['load_average_after'])} (other jobs share these cores)",
        f"- command: `{r['command']}`", "",
        f"- added latency at 1 client ({lat['pairs']} paired requests, order alternating): median "
        f"{lat['added_ms_median']:.1f} ms (IQR {lat['added_ms_iqr'][0]:.1f} .. {lat['added_ms_iqr'][1]:.1f}); "
        f"p50 {lat['local_p50_ms']:.1f} ms alone, {lat['ray_p50_ms']:.1f} ms through Ray Serve (target: <= 10 ms added)", "",
        f"| 16 clients ({len(r['ray_1_16'])} alternating windows each) | images/s | p50 ms | p95 ms | requests | errors |", "|---|---|---|---|---|---|",
    ]
    for name, x in rows:
        lines.append(f"| {name} | {x['images_per_s']:.2f} | {x['p50_ms']:.0f} | {x['p95_ms']:.0f} | {x['requests']} | {x['errors']} |")
    during = rec["load_during"]
    lines += ["", f"- a replica SIGKILLed under 8 clients: Serve saw it in {rec['noticed_s']:.2f} s; 2 replicas RUNNING "
              f"(loaded and warm) again after {rec['recovered_s']:.1f} s; the clients saw {during['errors']} errors in "
              f"{during['requests']} requests (p95 {during['p95_ms']:.0f} ms)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
