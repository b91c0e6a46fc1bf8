"""Load benchmark of `sdrt serve` on loopback: locust (headless) against two servers side by side, batching on
(`--max-batch 8`) and off (`--max-batch 1`), at 1, 4 and 16 concurrent clients; the in-process latency of the
same request for the server's overhead; RSS after 100 and after 2,000 requests; time from start to /readyz with
a cold and a warm page cache. Writes JSON and a markdown table.

    python benchmarks/serve_load.py --out benchmarks/results/serve-load
Every server listens on 127.0.0.1 and every run is bounded (--duration seconds per point, --rss-requests total).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

HERE = Path(__file__).resolve().parent
BODY = {"prompt": "a red 7", "steps": 20, "width": 64, "height": 64, "cfg_scale": 7.5, "sampler_name": "DDIM"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(max_batch: int, extra=()) -> tuple[subprocess.Popen, str, float]:
    port = free_port()
    cmd = [sys.executable, "-m", "sdrt.cli", "serve", "--port", str(port), "--max-batch", str(max_batch),
           "--log-level", "warning", *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.perf_counter() - t0 > 120:
            raise RuntimeError(f"server did not get ready: {shlex.join(cmd)}")
        time.sleep(0.01)
    return proc, url, time.perf_counter() - t0


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def percentile(values, q):
    values = sorted(values)
    if not values:
        return None
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def in_process(runs: int, pipe, rounds: int = 3, warm: bool = True) -> dict:
    """The same request in process: its latency alone, and 8 images as one batch against 8 one at a time (the
    pipeline's steps over 8 plans, as the batcher runs them), alternated over `rounds` after a warm-up of both."""
    kw = dict(num_inference_steps=BODY["steps"], guidance_scale=BODY["cfg_scale"], scheduler="ddim", output_type="np")

    def batch_of_8():
        plans = [pipe.plan(f"a red {k}", seed=k, **kw) for k in range(8)]
        batch = pipe.prepare_latents(plans, pipe.encode_text(plans))
        pipe.denoise(batch)
        pipe.finish(batch)

    for _ in range(3 if warm else 0):
        pipe(BODY["prompt"], seed=0, progress=False, **kw)
        batch_of_8()
    times = []
    for k in range(runs):
        t0 = time.perf_counter()
        pipe(BODY["prompt"], seed=k, progress=False, **kw)
        times.append(time.perf_counter() - t0)
    gains = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for k in range(8):
            pipe(f"a red {k}", seed=k, progress=False, **kw)
        t1 = time.perf_counter()
        batch_of_8()
        gains.append((t1 - t0) / (time.perf_counter() - t1))
    return {"p50_ms": 1000 * statistics.median(times) if times else None,
            "p95_ms": 1000 * percentile(times, 95) if times else None, "runs": runs,
            "batch8_speedup": statistics.median(gains), "batch8_speedups": gains}


def paired_overhead(url: str, pipe, pairs: int) -> dict:
    """The server's overhead at one client, measured in pairs (in process, then the same request over HTTP, back
    to back) so the other agents' load hits both sides alike; the median of the per-pair differences."""
    kw = dict(num_inference_steps=BODY["steps"], guidance_scale=BODY["cfg_scale"], scheduler="ddim", progress=False)
    diffs, local, remote = [], [], []
    with httpx.Client() as client:
        for k in range(pairs + 3):
            t0 = time.perf_counter()
            pipe(BODY["prompt"], seed=k, **kw)
            t1 = time.perf_counter()
            r = client.post(f"{url}/sdapi/v1/txt2img", json={**BODY, "seed": k}, timeout=60)
            t2 = time.perf_counter()
            assert r.status_code == 200
            if k >= 3:
                local.append(t1 - t0), remote.append(t2 - t1), diffs.append((t2 - t1) - (t1 - t0))
    return {"pairs": pairs, "in_process_p50_ms": 1000 * statistics.median(local), "http_p50_ms": 1000 * statistics.median(remote),
            "overhead_ms": 1000 * statistics.median(diffs),
            "overhead_pct": 100 * statistics.median(diffs) / statistics.median(local)}


def run_locust(url: str, clients: int, duration: float) -> dict:
    """One locust run: every request's (end time, latency ms, ok)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        raw = f.name
    env = {**os.environ, "LOAD_RAW": raw, "LOAD_STEPS": str(BODY["steps"]), "LOAD_SIZE": str(BODY["width"])}
    cmd = [sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--headless", "-u", str(clients),
           "-r", str(clients), "-t", f"{duration:g}s", "-H", url, "--only-summary", "--loglevel", "WARNING",
           "--stop-timeout", "60"]
    subprocess.run(cmd, env=env, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=duration + 120)
    records = json.loads(Path(raw).read_text())
    os.unlink(raw)
    return records


def summarise(clients: int, runs: list) -> dict:
    """Images/s over the steady part of each run (the first `clients` completions are the ramp-up), latencies
    pooled over the runs."""
    images, seconds, latencies, requests, errors = 0, 0.0, [], 0, 0
    for records in runs:
        ok = sorted((end, ms) for end, ms, good in records if good)
        requests += len(records)
        errors += sum(1 for _, _, good in records if not good)
        steady = ok[max(clients, len(ok) // 10):]
        if len(steady) > 2:
            images += len(steady) - 1
            seconds += steady[-1][0] - steady[0][0]
            latencies += [ms for _, ms in steady]
    return {"clients": clients, "runs": len(runs), "requests": requests, "errors": errors,
            "images_per_s": images / seconds if seconds else None, "p50_ms": percentile(latencies, 50),
            "p95_ms": percentile(latencies, 95), "p99_ms": percentile(latencies, 99)}


def rss_growth(total: int, steps: int, concurrency: int = 8) -> dict:
    proc, url, _ = start_server(8)
    try:
        body = {**BODY, "steps": steps}
        server = psutil.Process(proc.pid)
        done = 0

        def one(k):
            r = httpx.post(f"{url}/sdapi/v1/txt2img", json={**body, "seed": k}, timeout=120)
            return r.status_code == 200

        rss = {}
        errors = 0
        with httpx.Client(), concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            for checkpoint in (100, total):
                results = list(pool.map(one, range(done, checkpoint)))
                errors += results.count(False)
                done = checkpoint
                time.sleep(0.5)
                rss[checkpoint] = server.memory_info().rss
        return {"requests": total, "steps": steps, "concurrency": concurrency, "errors": errors,
                "rss_mb_after_100": rss[100] / 2**20, f"rss_mb_after_{total}": rss[total] / 2**20,
                "growth_pct": 100 * (rss[total] / rss[100] - 1)}
    finally:
        stop(proc)


def model_files() -> list[Path]:
    import onnxruntime

    from sdrt.builtin import builtin_model_dir

    files = [p for p in builtin_model_dir().rglob("*") if p.is_file()]
    files += [p for p in Path(onnxruntime.__file__).parent.rglob("*.so*")]
    return files


def drop_from_page_cache(paths) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def startup(runs: int) -> dict:
    out = {"cold_s": [], "warm_s": [], "cold_quick_s": [], "warm_quick_s": []}
    files = model_files()
    for _ in range(runs):
        for key, extra in (("", ()), ("_quick", ("--quick-start",))):
            drop_from_page_cache(files)
            proc, _, seconds = start_server(8, extra)
            stop(proc)
            out[f"cold{key}_s"].append(seconds)
            proc, _, seconds = start_server(8, extra)
            stop(proc)
            out[f"warm{key}_s"].append(seconds)
    out["files"] = len(files)
    out["bytes"] = sum(p.stat().st_size for p in files)
    return out


def markdown(result: dict) -> str:
    ip = result["in_process"]
    lines = [
        "# sdrt serve: load on loopback (built-in model, 64x64, 20 steps DDIM, guidance 7.5)", "",
        f"- machine: {result['machine']}",
        f"- load average (1, 5, 15 min) before: {', '.join(f'{x:.1f}' for x in result['load_before'])}; after: "
        f"{', '.join(f'{x:.1f}' for x in result['load_after'])} (other jobs share these 2 cores)",
        f"- command: `{result['command']}`",
        f"- in process: one image p50 {ip['p50_ms']:.1f} ms (p95 {ip['p95_ms']:.1f}); 8 images as one batch vs one at "
        f"a time: {ip['batch8_speedup']:.2f}x (median of {', '.join(f'{g:.2f}' for g in ip['batch8_speedups'])})", "",
        "| clients | --max-batch | images/s | p50 ms | p95 ms | p99 ms | requests (runs) | errors | in-process batch-8 gain, same window |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["load"]:
        lines.append(f"| {row['clients']} | {row['max_batch']} | {row['images_per_s']:.2f} | {row['p50_ms']:.1f} | "
                     f"{row['p95_ms']:.1f} | {row['p99_ms']:.1f} | {row['requests']} ({row['runs']}) | {row['errors']} | "
                     f"{row['in_process_batch8_speedup']:.2f}x |")
    s, pr = result["summary"], result["paired"]
    by = {(r["clients"], r["max_batch"]): r for r in result["load"]}
    lines += ["", f"- server overhead at 1 client, paired (in process then over HTTP, back to back, {pr['pairs']} pairs): "
                  f"median difference {pr['overhead_ms']:.1f} ms ({pr['overhead_pct']:.1f}%; in process p50 "
                  f"{pr['in_process_p50_ms']:.1f} ms, HTTP p50 {pr['http_p50_ms']:.1f} ms; target <= 5 ms or 5%)",
              f"- the same from the locust run (1 client, batching on, p50) against the in-process p50 measured first: "
              f"{s['overhead_ms_1_client']:+.1f} ms ({s['overhead_pct_1_client']:+.1f}%)",
              f"- batching gain at 16 clients: {s['batching_gain_16']:.2f}x images/s (target >= 1.5x); the same machine's "
              f"in-process gain for 8 images as one batch, measured between those runs: "
              f"{by[(16, 8)]['in_process_batch8_speedup'] if (16, 8) in by else float('nan'):.2f}x"]
    r = result["rss"]
    after = r["rss_mb_after_%d" % r["requests"]]
    lines.append(f"- RSS: {r['rss_mb_after_100']:.0f} MB after 100 requests, {after:.0f} MB "
                 f"after {r['requests']} ({r['growth_pct']:+.1f}%; target < 5%; {r['steps']} steps, {r['concurrency']} clients, "
                 f"{r['errors']} errors)")
    st = result["startup"]
    med = {k: statistics.median(v) for k, v in st.items() if k.endswith("_s")}
    lines.append(f"- start to /readyz (median of {len(st['warm_s'])}): cold page cache {med['cold_s']:.2f} s, warm "
                 f"{med['warm_s']:.2f} s, warming every batch size 1-8; with --quick-start (batch 1 only) cold "
                 f"{med['cold_quick_s']:.2f} s, warm {med['warm_quick_s']:.2f} s. Cold = posix_fadvise DONTNEED on the "
                 f"{st['files']} model and ONNX Runtime files ({st['bytes'] / 2**20:.0f} MB) before the start")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--batches", default="8,1")
    parser.add_argument("--duration", type=float, default=12.0, help="seconds per locust run")
    parser.add_argument("--rounds", type=int, default=3, help="alternated runs per (clients, --max-batch) point")
    parser.add_argument("--pairs", type=int, default=40, help="in-process/HTTP pairs for the 1-client overhead")
    parser.add_argument("--rss-requests", type=int, default=2000)
    parser.add_argument("--rss-steps", type=int, default=5)
    parser.add_argument("--startup-runs", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/serve-load")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite OUT.md from OUT.json")
    args = parser.parse_args()
    if args.markdown_only:
        out = Path(args.out)
        out.with_suffix(".md").write_text(markdown(json.loads(out.with_suffix(".json").read_text())))
        return 0
    result = {"command": shlex.join([Path(sys.executable).name, *sys.argv]), "load_before": os.getloadavg(),
              "machine": f"{platform.processor() or platform.machine()}, {psutil.cpu_count(logical=False)} cores, "
                         f"{psutil.virtual_memory().total / 2**30:.0f} GiB; {platform.platform()}",
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    import sdrt

    pipe = sdrt.Pipeline.from_pretrained(None, backend="onnx", shape_sessions=18)  # as the server keeps them
    result["in_process"] = in_process(30, pipe)
    print("in process:", result["in_process"], flush=True)
    batches = [int(b) for b in args.batches.split(",")]
    servers = {b: start_server(b) for b in batches}
    result["load"] = []
    try:
        result["paired"] = paired_overhead(servers[batches[0]][1], pipe, args.pairs)
        print("paired:", result["paired"], flush=True)
        for clients in (int(c) for c in args.clients.split(",")):
            runs = {b: [] for b in batches}
            gains = []
            for _ in range(args.rounds):  # side by side: both servers up, short runs alternated
                gains.append(in_process(0, pipe, rounds=1, warm=False)["batch8_speedup"])  # the machine, right now
                for b in batches:
                    runs[b].append(run_locust(servers[b][1], clients, args.duration))
            for b in batches:
                row = {"max_batch": b, **summarise(clients, runs[b]), "in_process_batch8_speedup": statistics.median(gains)}
                print(row, flush=True)
                result["load"].append(row)
    finally:
        for proc, _, _ in servers.values():
            stop(proc)
    by = {(r["clients"], r["max_batch"]): r for r in result["load"]}
    one = by.get((1, batches[0]))
    result["summary"] = {
        "overhead_ms_1_client": one["p50_ms"] - result["in_process"]["p50_ms"] if one else None,
        "overhead_pct_1_client": 100 * (one["p50_ms"] / result["in_process"]["p50_ms"] - 1) if one else None,
        "batching_gain_16": by[(16, 8)]["images_per_s"] / by[(16, 1)]["images_per_s"] if (16, 8) in by and (16, 1) in by else None,
    }
    result["rss"] = rss_growth(args.rss_requests, args.rss_steps)
    print("rss:", result["rss"], flush=True)
    result["startup"] = startup(args.startup_runs)
    print("startup:", result["startup"], flush=True)
    result["load_after"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
