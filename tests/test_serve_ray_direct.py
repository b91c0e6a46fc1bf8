"""`sdrt serve --ray --direct-ingress`: the ingress replica itself listens on --port (no Serve HTTP proxy hop).

One `sdrt serve --ray --direct-ingress` subprocess (its own local cluster on 127.0.0.1, 2 replicas of the built-in
model) for the module: the same images over the A1111 and OpenAI APIs as the pipeline in process; the process on
--port is the ingress replica, not Serve's proxy; a model replica SIGKILLed under 8 requests -> all answer, same
images; the ingress SIGKILLed -> Ray restarts it on the same port; SIGINT -> exit 0 within seconds, no Ray process
left. Plus the errors before anything starts.

This module's cluster must not overlap test_serve_ray.py's (whose `ray stop --force` stops every cluster on the
machine): pytest runs modules one after the other in name order, and that module's cluster is gone when it ends."""

import concurrent.futures
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

os.environ["RAY_AUTH_MODE"] = "disabled"  # the subprocess's local cluster (loopback only) without a token
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
pytest.importorskip("ray.serve")
psutil = pytest.importorskip("psutil")

import sdrt  # noqa: E402
from serve_util import alone, free_port, png_pixels, wait_for  # noqa: E402

STEPS = 6
RAY_PROCESSES = "raylet|gcs_server|ServeReplica|ServeController"
CLI = [sys.executable, "-c", "import sys; from sdrt.cli import main; sys.exit(main())"]


def post(url, path, **kw):
    return httpx.post(url + path, timeout=120, **kw)


def titled(prefix: str) -> list[psutil.Process]:
    """Ray's worker processes by title (`ray::ServeReplica:sdrt:ingress`, ...)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if cmd.startswith(prefix):
            found.append(p)
    return found


def _ready(url) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture(scope="module")
def served():
    """(url, process) of `sdrt serve --ray --direct-ingress` on a free port; stopped by the last test (or here)."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([*CLI, "serve", "--ray", "--direct-ingress", "--port", str(port), "--replicas", "2",
                             "--cpus-per-replica", "0.5", "--ray-cpus", "2", "--threads", "1", "--quick-start",
                             "--max-batch", "8", "--batch-wait-ms", "30", "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _ready(url) or proc.poll() is not None, timeout=180, every=0.25)
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="module")
def pipe():
    return sdrt.Pipeline.from_pretrained(None, backend="onnx", threads=1)


def test_the_ingress_replica_answers_on_port_with_the_same_images(served, pipe):
    url, _ = served
    port = int(url.rsplit(":", 1)[1])
    listening = {c.pid for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
    ingress = {p.pid for p in titled("ray::ServeReplica:sdrt:ingress")}
    assert listening and listening <= ingress, (listening, ingress)  # not Serve's proxy (ray::ProxyActor)
    assert all(c.laddr.ip == "127.0.0.1" for c in psutil.net_connections(kind="inet") if c.laddr.port == port
               and c.status == psutil.CONN_LISTEN)

    ready = httpx.get(f"{url}/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "models": {"digits": "ready"}}
    r = post(url, "/sdapi/v1/txt2img", json={"prompt": "a red 7", "negative_prompt": "blue", "seed": 11, "cfg_scale": 6.0,
                                             "width": 64, "height": 64, "steps": STEPS, "batch_size": 2,
                                             "sampler_name": "DDIM"})
    assert r.status_code == 200, r.text
    want = alone(pipe, "a red 7", negative_prompt="blue", seed=11, guidance_scale=6.0, num_inference_steps=STEPS,
                 scheduler="ddim", num_images_per_prompt=2)
    for got, ref in zip(r.json()["images"], want, strict=True):  # PNG rounding: within 1/255
        assert np.abs(png_pixels(got) - ref.astype(int)).max() <= 1
    r = post(url, "/v1/images/generations", json={"prompt": "a blue 4", "size": "64x64", "steps": STEPS, "seed": 21,
                                                  "scheduler": "euler_a", "guidance_scale": 5.0})
    assert r.status_code == 200, r.text
    ref = alone(pipe, "a blue 4", seed=21, guidance_scale=5.0, num_inference_steps=STEPS, scheduler="euler_a")[0]
    assert np.abs(png_pixels(r.json()["data"][0]["b64_json"]) - ref.astype(int)).max() <= 1
    bad = post(url, "/v1/images/generations", json={"prompt": "x", "size": "64x65", "steps": 2})
    assert bad.status_code == 422 and "multiple of" in bad.json()["error"]["message"]


def busiest(procs: list[psutil.Process], seconds: float = 0.4) -> psutil.Process:
    before = {p.pid: sum(p.cpu_times()[:2]) for p in procs}
    time.sleep(seconds)
    return max(procs, key=lambda p: sum(p.cpu_times()[:2]) - before[p.pid])


def test_model_replica_killed_under_8_requests(served, pipe):
    url, _ = served
    models = wait_for(lambda: len(m := titled("ray::ServeReplica:sdrt:model-digits")) == 2 and m, timeout=60, every=0.5)
    bodies = [{"prompt": f"a {['red', 'green'][k % 2]} {k}", "size": "64x64", "steps": 60, "seed": 300 + k,
               "scheduler": "euler"} for k in range(8)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(post, url, "/v1/images/generations", json=b) for b in bodies]
        time.sleep(0.3)  # the 8 reach the replicas
        victim = busiest(models)  # working on requests now
        victim.kill()
        answers = [f.result() for f in futures]
    assert [a.status_code for a in answers] == [200] * 8, [a.text[:200] for a in answers if a.status_code != 200]
    for body, answer in zip(bodies, answers):  # the same image, retried or not
        ref = alone(pipe, body["prompt"], seed=body["seed"], num_inference_steps=60, scheduler="euler")[0]
        assert np.abs(png_pixels(answer.json()["data"][0]["b64_json"]) - ref.astype(int)).max() <= 1
    metrics = httpx.get(f"{url}/metrics").text
    retried = [float(line.split()[-1]) for line in metrics.splitlines()
               if line.startswith('sdrt_replica_retries_total{model="digits"}')]
    assert retried and retried[0] >= 1, retried


def test_a_killed_ingress_comes_back_on_the_same_port(served):
    """One port in the range and Ray's port quarantine off (ray_direct): the restarted ingress takes --port again."""
    url, _ = served
    (ingress,) = titled("ray::ServeReplica:sdrt:ingress")
    ingress.kill()
    ingress.wait(10)
    wait_for(lambda: _ready(url), timeout=90, every=0.25)
    (again,) = titled("ray::ServeReplica:sdrt:ingress")
    assert again.pid != ingress.pid
    r = post(url, "/v1/images/generations", json={"prompt": "a 1", "size": "64x64", "steps": 2, "seed": 1})
    assert r.status_code == 200


def test_sigint_stops_in_seconds_and_leaves_no_ray_processes(served):
    """No drain hold on a local cluster (RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S=0 set by sdrt)."""
    _, proc = served
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0, proc.stderr.read()[-2000:]
    assert time.monotonic() - t0 < 25  # Ray's default 30 s hold would not fit
    def left() -> list[str]:
        return subprocess.run(["pgrep", "-f", RAY_PROCESSES], capture_output=True, text=True).stdout.split()

    try:
        wait_for(lambda: not left(), timeout=10, every=0.2)
    except TimeoutError:
        pids = ",".join(left())
        pytest.fail(subprocess.run(["ps", "-o", "pid,args", "-p", pids], capture_output=True, text=True).stdout)


# --- a joined cluster started with direct ingress (slow: a second cluster start) ---------------------------------


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SDRT_SLOW_TESTS") != "1", reason="a second Ray cluster (~30 s); set SDRT_SLOW_TESTS=1")
def test_joined_cluster_started_with_direct_ingress():
    """`ray start --head` with RAY_SERVE_ENABLE_DIRECT_INGRESS=1 and a one-port range, then `sdrt serve --ray
    --direct-ingress --address`: the ingress replica answers on that port, Serve's proxy on --port; `ray stop`."""
    gcs, ingress_port, proxy_port = free_port(), free_port(), free_port()
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
           "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(ingress_port),
           "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(ingress_port + 1),
           "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0"}  # Ray's 30 s hold would only slow the stop
    ports = [f"--{name}={free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                     "metrics-export-port", "runtime-env-agent-port")]
    ray = str(Path(sys.executable).with_name("ray"))
    subprocess.run([ray, "start", "--head", f"--port={gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                    "--include-dashboard=false", "--disable-usage-stats", *ports], env=env, check=True,
                   capture_output=True, timeout=120)
    proc = None
    try:
        proc = subprocess.Popen([*CLI, "serve", "--ray", "--direct-ingress", "--address", f"127.0.0.1:{gcs}",
                                 "--port", str(proxy_port), "--cpus-per-replica", "1", "--quick-start", "--threads", "1"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        url = f"http://127.0.0.1:{ingress_port}"
        wait_for(lambda: _ready(url) or proc.poll() is not None, timeout=180, every=0.25)
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        listening = {c.pid for c in psutil.net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == ingress_port}
        assert listening and listening <= {p.pid for p in titled("ray::ServeReplica:sdrt:ingress")}
        assert _ready(f"http://127.0.0.1:{proxy_port}")  # and Serve's proxy, one hop more
        r = post(url, "/v1/images/generations", json={"prompt": "a 1", "size": "64x64", "steps": 2, "seed": 1})
        assert r.status_code == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(90) == 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        subprocess.run([ray, "stop", "--force"], capture_output=True, timeout=120)


# --- errors before anything starts (no cluster) -----------------------------------------------------------------


def test_direct_ingress_errors():
    import socket

    from sdrt.errors import SdrtError
    from sdrt.serve import ray_direct

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SdrtError, match=f"--port {port} on 127.0.0.1 is taken"):
            ray_direct.check_free("127.0.0.1", port)
        done = subprocess.run([*CLI, "serve", "--ray", "--direct-ingress", "--port", str(port)], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
        assert f"--port {port} on 127.0.0.1 is taken" in done.stderr
    settings = [{"node": "10.0.0.1", ray_direct.ENABLE: "1"}, {"node": "10.0.0.2", ray_direct.ENABLE: None}]
    ray_direct.check_joined(settings[:1])
    with pytest.raises(SdrtError, match=r"node\(s\) 10.0.0.2 run without direct ingress; start every node with "
                                        r"RAY_SERVE_ENABLE_DIRECT_INGRESS=1 in the environment of `ray start`"):
        ray_direct.check_joined(settings)
    done = subprocess.run([*CLI, "serve", "--direct-ingress"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--direct-ingress is a Ray Serve option: add --ray" in done.stderr
