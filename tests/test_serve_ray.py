"""`sdrt serve --ray`: the same HTTP app on Ray Serve, on a two-node Ray cluster made on this machine (`ray start
--head` plus a second `ray start --address`, each with its own custom resource), 2 replicas of the built-in model,
one per node. Requests served as by `sdrt serve` (bad input refused at POST, job progress, previews and queue
position, inpainting); a replica SIGKILLed under 16 requests and 2 jobs -> all answer, same images, 2 replicas again;
autoscaling 1:2 up under load and down; run-time LoRAs from the replicas' --lora-dir; clear errors before anything is
deployed; nothing of Ray left behind.

Everything binds to 127.0.0.1; one cluster for the module (~1 minute in all here)."""

import concurrent.futures
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

# A test cluster on 127.0.0.1 only (Ray's single-machine mode keeps 127.0.0.1 as the node address, for the head and
# this driver: set before ray is imported), without a token (Ray 2.60's `ray start --head` otherwise wants one).
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
pytest.importorskip("ray.serve")

import sdrt  # noqa: E402
import serve_util  # noqa: E402
from serve_util import alone, free_port, png_pixels, running_server, sse_events, wait_for  # noqa: E402

# the autoscaling test's short metrics interval (Serve 2.60 reads it still; its replacement is an environment variable)
pytestmark = pytest.mark.filterwarnings("ignore:The `metrics_interval_s` field:DeprecationWarning")

RAY = str(Path(sys.executable).with_name("ray"))
STEPS = 6
RAY_PROCESSES = "raylet|gcs_server|ServeReplica|ServeController"


# `ray start --address` refuses single-machine mode; the second node keeps 127.0.0.1 through this wrapper instead
# (Ray otherwise resolves 127.0.0.1 to the machine's routable address).
JOIN = ("import sys, ray._private.services as s; s.resolve_ip_for_localhost = lambda host: host; "
        "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; sys.exit(main())")


def ray_cli(*args, check=True, timeout=120, join=False):
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    if join:
        env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    command = [sys.executable, "-c", JOIN, *args] if join else [RAY, *args]
    done = subprocess.run(command, env=env, timeout=timeout, capture_output=True, text=True)
    if check and done.returncode:
        raise RuntimeError(f"ray {' '.join(args)} failed: {done.stderr[-2000:]}")
    return done


def node_args(resource: str) -> list[str]:
    ports = {f"--{name}": free_port() for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                     "metrics-export-port", "runtime-env-agent-port")}
    return ["--node-ip-address=127.0.0.1", "--num-cpus=1", f"--resources={json.dumps({resource: 1})}",
            "--disable-usage-stats", *(f"{k}={v}" for k, v in ports.items())]


def stop_cluster():
    import ray

    try:
        from ray import serve

        if ray.is_initialized():
            serve.shutdown()
    finally:
        ray.shutdown()
        ray_cli("stop", "--force", check=False)


@pytest.fixture(scope="module")
def cluster():
    """A two-node cluster: head (CPU 1, node_a) + worker (CPU 1, node_b); yields the head's address."""
    import ray

    from sdrt.serve.ray_app import loopback_only

    loopback_only()  # (in case ray was imported before this module)
    port = free_port()
    address = f"127.0.0.1:{port}"
    try:
        ray_cli("start", "--head", f"--port={port}", "--include-dashboard=false", *node_args("node_a"))
        ray_cli("start", f"--address={address}", *node_args("node_b"), join=True)
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
        wait_for(lambda: len([n for n in ray.nodes() if n["Alive"]]) == 2, timeout=60, every=0.2)
        yield address
    finally:
        stop_cluster()


def serve_config():
    from sdrt.serve import Limits, ServeConfig

    return ServeConfig(threads=1, warm_all_batches=False, max_batch=8, batch_wait_ms=30, max_queue=32, timeout=120,
                       limits=Limits(max_steps=400, max_images=4))


@pytest.fixture(scope="module")
def url(cluster):
    from sdrt.serve.ray_app import RayOptions, deploy

    config = serve_config()
    options = RayOptions(address=cluster, replicas=2, cpus_per_replica=0.5, max_replicas_per_node=1, port=free_port(),
                         health_check_period_s=2.0)
    return deploy(config, options, ready_timeout=180)


@pytest.fixture(scope="module")
def alone_url():
    """`sdrt serve` alone with the module's config: what the Ray app's answers must equal."""
    with running_server(serve_config()) as base:
        yield base


@pytest.fixture(scope="module")
def pipe():
    return sdrt.Pipeline.from_pretrained(None, backend="onnx", threads=1)


def post(url, path, **kw):
    return serve_util.post(url, path, timeout=120, **kw)


def replicas(pipe_name="model-digits"):
    from ray import serve

    dep = serve.status().applications["sdrt"].deployments[pipe_name]
    return dep.replica_states.get("RUNNING", 0)


def who(times=24) -> dict:
    """{pid: node} of the model's replicas, asked through the deployment handle."""
    from ray import serve

    handle = serve.get_deployment_handle("model-digits", app_name="sdrt")
    seen = {}
    for _ in range(times):
        info = handle.whoami.remote().result(timeout_s=30)
        seen[info["pid"]] = info["node"]
    return seen


# --- served as by `sdrt serve` ----------------------------------------------------------------------------------


def test_same_api_same_images(url, pipe):
    ready = httpx.get(f"{url}/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "models": {"digits": "ready"}}
    r = post(url, "/sdapi/v1/txt2img", json={"prompt": "a red 7", "negative_prompt": "blue", "seed": 11, "cfg_scale": 6.0,
                                             "width": 64, "height": 64, "steps": STEPS, "batch_size": 2,
                                             "sampler_name": "DDIM"})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["all_seeds"] == [11, 12] and info["sampler_name"] == "DDIM"
    want = alone(pipe, "a red 7", negative_prompt="blue", seed=11, guidance_scale=6.0, num_inference_steps=STEPS,
                 scheduler="ddim", num_images_per_prompt=2)
    for got, ref in zip(r.json()["images"], want):
        assert np.abs(png_pixels(got) - ref.astype(int)).max() <= 1

    r = post(url, "/v1/images/generations", json={"prompt": "a blue 4", "size": "64x64", "steps": STEPS, "seed": 21,
                                                  "scheduler": "euler_a", "guidance_scale": 5.0})
    assert r.status_code == 200, r.text
    ref = alone(pipe, "a blue 4", seed=21, guidance_scale=5.0, num_inference_steps=STEPS, scheduler="euler_a")[0]
    assert np.abs(png_pixels(r.json()["data"][0]["b64_json"]) - ref.astype(int)).max() <= 1

    # no seed: drawn at the ingress and reported, so the request can be repeated exactly
    r = post(url, "/sdapi/v1/txt2img", json={"prompt": "a green 2", "width": 64, "height": 64, "steps": STEPS})
    seed = json.loads(r.json()["info"])["seed"]
    again = post(url, "/sdapi/v1/txt2img", json={"prompt": "a green 2", "width": 64, "height": 64, "steps": STEPS, "seed": seed})
    assert np.abs(png_pixels(r.json()["images"][0]) - png_pixels(again.json()["images"][0])).max() <= 1

    # errors as on one machine: the limits at the ingress, the pipeline's own checks on the replica
    bad = post(url, "/v1/images/generations", json={"prompt": "x", "size": "64x64", "steps": 999})
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "steps"
    bad = post(url, "/v1/images/generations", json={"prompt": "x", "size": "64x65", "steps": 2})
    assert bad.status_code == 422 and "multiple of" in bad.json()["error"]["message"]
    bad = post(url, "/v1/images/generations", json={"prompt": "x", "model": "nope"})
    assert bad.status_code == 422 and "not served" in bad.json()["error"]["message"]

    job = post(url, "/v1/jobs", json={"prompt": "a red 2", "steps": 9, "seed": 4, "scheduler": "ddim"})
    assert job.status_code == 202
    done = wait_for(lambda: (s := httpx.get(f"{url}/v1/jobs/{job.json()['id']}").json())["status"] == "done" and s, timeout=60)
    assert done["seeds"] == [4] and done["step"] == done["total"] == 9
    ref = alone(pipe, "a red 2", seed=4, num_inference_steps=9, scheduler="ddim")[0]
    assert np.abs(png_pixels(done["images"][0]) - ref.astype(int)).max() <= 1


def test_bad_input_refused_at_post_as_on_one_machine(url, alone_url):
    """The ingress plans as one machine does (the pipeline's planning copy): a bad size, a step count the scheduler
    cannot run from an init image, an unknown scheduler -> 422 from the POST itself, body for body as `sdrt serve`."""
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buf, format="PNG")
    image = base64.b64encode(buf.getvalue()).decode()
    bad = [
        ("/v1/jobs", {"prompt": "x", "width": 65, "height": 64, "steps": 4}),
        ("/sdapi/v1/txt2img", {"prompt": "x", "width": 64, "height": 70, "steps": 4}),
        ("/v1/jobs", {"prompt": "x", "init_image": image, "strength": 0.01, "steps": 2, "scheduler": "dpmpp_2m"}),
        ("/sdapi/v1/img2img", {"prompt": "x", "init_images": [image], "denoising_strength": 0.01, "steps": 2}),
        ("/v1/jobs", {"prompt": "x", "scheduler": "nope"}),
        ("/sdapi/v1/txt2img", {"prompt": "x", "sampler_name": "nope"}),
    ]
    served = [post(url, path, json=body) for path, body in bad]
    want = [post(alone_url, path, json=body) for path, body in bad]
    for (path, _), got, ref in zip(bad, served, want):
        assert ref.status_code == 422, (path, ref.text)
        assert (got.status_code, got.json()) == (422, ref.json()), path


def test_inpainting_as_on_one_machine(url, alone_url):
    """A1111 img2img with a mask (the crop around it, blur, paste-back at the ingress; the masked generation on a
    replica) answers the image `sdrt serve` alone answers, within one level of 255 (ORT kernels per batch size)."""
    import base64
    import io

    from PIL import Image

    def b64(array) -> str:
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    init = (np.random.default_rng(0).uniform(0, 1, (96, 96, 3)) * 255).astype(np.uint8)
    mask = np.zeros((96, 96), np.uint8)
    mask[50:80, 20:44] = 255
    body = {"prompt": "a red 3", "init_images": [b64(init)], "mask": b64(mask), "seed": 4, "cfg_scale": 3.0, "steps": STEPS,
            "width": 64, "height": 64, "denoising_strength": 0.9, "mask_blur": 4, "inpainting_fill": 1,
            "inpaint_full_res": True, "inpaint_full_res_padding": 8, "sampler_name": "Euler a"}
    got, want = post(url, "/sdapi/v1/img2img", json=body), post(alone_url, "/sdapi/v1/img2img", json=body)
    assert got.status_code == want.status_code == 200, got.text
    a, b = png_pixels(got.json()["images"][0]), png_pixels(want.json()["images"][0])
    assert a.shape == b.shape == (96, 96, 3) and np.abs(a - b).max() <= 1
    assert np.abs(a - init.astype(int))[mask > 0].max() > 8  # the masked part was generated
    assert json.loads(got.json()["info"])["seed"] == 4


def loads() -> list[dict]:
    """Each replica's batcher: {pid, queued, running}, asked through the deployment handle."""
    from ray import serve

    handle = serve.get_deployment_handle("model-digits", app_name="sdrt")
    seen = {}
    for _ in range(24):
        info = handle.whoami.remote().result(timeout_s=30)
        seen[info["pid"]] = info
    return list(seen.values())


def test_job_progress_previews_and_queue_position(url, pipe):
    """Each step's progress and the previews stream from the replica to the ingress's job and its events; a job
    queued on a replica shows its place; DELETE stops the replica's work; a synchronous request shows its progress
    in A1111's /progress and /interrupt stops it."""
    r = post(url, "/v1/jobs", json={"prompt": "a red 2", "steps": 12, "seed": 4, "preview_every": 4, "scheduler": "ddim"})
    assert r.status_code == 202
    events = sse_events(f"{url}/v1/jobs/{r.json()['id']}/events", timeout=120)
    assert [d["step"] for e, d in events if e == "progress"] == list(range(1, 13))
    assert all(d["total"] == 12 for e, d in events if e == "progress")
    previews = [d for e, d in events if e == "preview"]
    assert previews and all(d["step"] in (4, 8) for d in previews)
    assert png_size(previews[-1]["images"][0]) == (64, 64)
    final = events[-1][1]
    assert events[-1][0] == "done" and final["step"] == final["total"] == 12
    ref = alone(pipe, "a red 2", seed=4, num_inference_steps=12, scheduler="ddim")[0]
    assert np.abs(png_pixels(final["images"][0]) - ref.astype(int)).max() <= 1

    # four long jobs that cannot share a batch (different step counts) on two replicas: some wait in a replica's queue
    ids = [post(url, "/v1/jobs", json={"prompt": "a 1", "steps": 390 + k, "width": 64, "height": 64, "seed": k}).json()["id"]
           for k in range(4)]
    try:
        def seen():
            states = [httpx.get(f"{url}/v1/jobs/{job_id}").json() for job_id in ids]
            queued = [s["position"] for s in states if s["status"] == "queued"]
            running = [s for s in states if s["status"] == "running" and s["step"] > 0]
            return queued and all(isinstance(p, int) for p in queued) and running and (queued, running)
        queued, running = wait_for(seen, timeout=60, every=0.2)
        assert min(queued) == 0 and all(s["total"] == 390 + ids.index(s["id"]) for s in running)
    finally:
        for job_id in ids:
            httpx.delete(f"{url}/v1/jobs/{job_id}", timeout=30)
    assert {httpx.get(f"{url}/v1/jobs/{job_id}").json()["status"] for job_id in ids} == {"cancelled"}

    # a synchronous request's progress (sampled by its replica) in A1111's /progress, and /interrupt stops it
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(post, url, "/sdapi/v1/txt2img", json={"prompt": "a 5", "steps": 400, "width": 64, "height": 64})
        progress = wait_for(lambda: (p := httpx.get(f"{url}/sdapi/v1/progress").json())["state"]["sampling_step"] > 0 and p,
                            timeout=60, every=0.1)
        assert progress["state"]["sampling_steps"] == 400 and 0 < progress["progress"] < 1
        assert httpx.post(f"{url}/sdapi/v1/interrupt").json() == {"interrupted": 1}
        assert answer.result().status_code == 409
    wait_for(lambda: all(x["queued"] == 0 and x["running"] == 0 for x in loads()), timeout=30, every=0.5)


def png_size(b64: str) -> tuple:
    return tuple(png_pixels(b64).shape[1::-1])


def test_replicas_on_both_nodes_serve(url):
    import ray

    seen = who()
    nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    assert len(seen) == 2 and len(set(seen.values())) == 2  # one replica per node (max_replicas_per_node=1)
    assert {"node_a", "node_b"} == {next(r for r in nodes[node] if r.startswith("node_")) for node in seen.values()}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda k: post(url, "/v1/images/generations", json={"prompt": f"a {k}", "size": "64x64",
                                                                                     "steps": 12, "seed": k}), range(16)))
    assert all(a.status_code == 200 for a in answers)
    served = [line for line in httpx.get(f"{url}/metrics").text.splitlines() if line.startswith("sdrt_replica_requests_total")]
    assert len({line.split('node="')[1][:12] for line in served}) == 2, served  # both nodes answered requests


def test_everything_listens_on_loopback(url):
    import psutil

    def is_ray(cmd: str) -> bool:
        return cmd.startswith("ray::") or "site-packages/ray/" in cmd

    ray_pids = {p.pid for p in psutil.process_iter(["cmdline"]) if is_ray(" ".join(p.info["cmdline"] or []))}
    listening = [(c.pid, c.laddr) for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in ray_pids]
    def loopback(ip: str) -> bool:
        address = ipaddress.ip_address(ip)
        return (getattr(address, "ipv4_mapped", None) or address).is_loopback

    assert listening and all(loopback(addr.ip) for _, addr in listening), [x for x in listening if not loopback(x[1].ip)]


# --- a replica dies under load ----------------------------------------------------------------------------------


def test_replica_killed_under_16_requests(url, pipe):
    bodies = [{"prompt": f"a {['red', 'green', 'blue', 'white'][k % 4]} {k % 10}", "size": "64x64", "steps": 40,
               "seed": 100 + k, "scheduler": "euler"} for k in range(16)]
    # "ready" needs one replica; this test needs both up and known to the handle's router
    before = wait_for(lambda: len(w := who(8)) == 2 and w, timeout=120, every=0.5)
    # Two long jobs (399 and 400 steps at 64x64: several seconds each on an idle machine; different step counts, so they
    # cannot share a batch) go first: Serve's router sends them to different replicas (the less loaded of the two).
    # The victim is a replica seen running work just before the kill, so the kill always hits work in flight.
    # (With 120-step jobs at the default size an idle machine had finished everything before the kill: no retry.)
    jobs = [post(url, "/v1/jobs", json={"prompt": "a white 9", "steps": 399 + s, "width": 64, "height": 64, "seed": s}).json()["id"]
            for s in (0, 1)]
    wait_for(lambda: all(httpx.get(f"{url}/v1/jobs/{j}").json()["status"] == "running" for j in jobs), timeout=60, every=0.1)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(post, url, "/v1/images/generations", json=b) for b in bodies]
        time.sleep(0.5)  # the 16 reach the replicas
        busy = [x["pid"] for x in loads() if x["running"] > 0 and x["pid"] in before]
        assert busy, loads()
        victim = busy[0]
        os.kill(victim, signal.SIGKILL)
        answers = [f.result() for f in futures]
    assert [a.status_code for a in answers] == [200] * 16, [a.text[:200] for a in answers if a.status_code != 200]
    for body, answer in zip(bodies, answers):  # the same image as on one machine, retried or not
        ref = alone(pipe, body["prompt"], seed=body["seed"], num_inference_steps=40, scheduler="euler")[0]
        assert np.abs(png_pixels(answer.json()["data"][0]["b64_json"]) - ref.astype(int)).max() <= 1
    for job_id in jobs:  # jobs live at the ingress: they finish too
        status = wait_for(lambda: (s := httpx.get(f"{url}/v1/jobs/{job_id}").json())["status"] != "queued"
                          and s["status"] != "running" and s, timeout=120)
        assert status["status"] == "done", status
    metrics = httpx.get(f"{url}/metrics").text
    retried = [float(line.split()[-1]) for line in metrics.splitlines() if line.startswith('sdrt_replica_retries_total{model="digits"}')]
    assert retried and retried[0] >= 1, retried  # the killed replica's requests were sent again
    wait_for(lambda: replicas() == 2, timeout=120, every=0.5)  # Ray Serve restarted the replica
    after = wait_for(lambda: len(w := who(8)) == 2 and w, timeout=60, every=0.5)  # and the router reaches it
    assert victim not in after
    assert httpx.get(f"{url}/readyz").status_code == 200


# --- autoscaling ----------------------------------------------------------------------------------------------------


def test_autoscale_up_under_load_and_back_down(url):
    """--autoscale 1:2 (the same app updated in place; short delays and look-back): idle -> 1 replica, six jobs in
    flight (target 2 per replica) -> 2, the jobs cancelled -> 1 again."""
    from sdrt.serve.ray_app import RayOptions, deploy

    fast = {"target_ongoing_requests": 2, "upscale_delay_s": 0.5, "downscale_delay_s": 2.0, "look_back_period_s": 2.0,
            "metrics_interval_s": 0.5}
    options = RayOptions(address="auto", autoscale=(1, 2), autoscaling_config=fast, cpus_per_replica=0.5,
                         max_replicas_per_node=1, port=int(url.rsplit(":", 1)[1]), health_check_period_s=2.0)
    assert deploy(serve_config(), options, ready_timeout=120) == url
    t0 = time.monotonic()
    wait_for(lambda: replicas() == 1, timeout=60, every=0.25)
    down = time.monotonic() - t0
    ids = [post(url, "/v1/jobs", json={"prompt": "a 3", "steps": 400, "width": 64, "height": 64, "seed": k}).json()["id"]
           for k in range(6)]
    try:
        t0 = time.monotonic()
        wait_for(lambda: replicas() == 2, timeout=90, every=0.25)
        up = time.monotonic() - t0
    finally:
        for job_id in ids:
            httpx.delete(f"{url}/v1/jobs/{job_id}", timeout=30)
    t0 = time.monotonic()
    wait_for(lambda: replicas() == 1, timeout=60, every=0.25)
    print(f"autoscale: idle 2->1 in {down:.1f} s, under load 1->2 in {up:.1f} s, idle 2->1 in {time.monotonic() - t0:.1f} s")
    assert httpx.get(f"{url}/readyz").status_code == 200


# --- the ingress dies -----------------------------------------------------------------------------------------------


def test_jobs_outlive_the_ingress(url):
    """The ingress killed: Ray Serve restarts it, and the job store answers for the jobs it drove: a finished job
    as it was (images included), one that was running as failed, naming the seed that makes the same image."""
    import ray

    done = post(url, "/v1/jobs", json={"prompt": "a red 1", "steps": 4, "seed": 5}).json()["id"]
    before = wait_for(lambda: (s := httpx.get(f"{url}/v1/jobs/{done}").json())["status"] == "done" and s, timeout=60)
    lost = post(url, "/v1/jobs", json={"prompt": "a 3", "steps": 200, "width": 64, "height": 64, "seed": 9}).json()["id"]
    wait_for(lambda: httpx.get(f"{url}/v1/jobs/{lost}").json()["status"] == "running", timeout=60)
    time.sleep(0.5)  # (the job store has its submitted status)
    # this cluster's ingress replica (by its actor name: other Ray clusters may run on the machine), killed by Ray
    (ingress,) = [a for a in ray.util.list_named_actors(all_namespaces=True) if "#ingress#" in a["name"]]
    ray.kill(ray.get_actor(ingress["name"], namespace=ingress["namespace"]), no_restart=True)
    wait_for(lambda: _ready(url) and ingress["name"] not in str(ray.util.list_named_actors(all_namespaces=True)),
             timeout=90, every=0.25)
    after = httpx.get(f"{url}/v1/jobs/{done}").json()
    assert after == before
    gone = httpx.get(f"{url}/v1/jobs/{lost}").json()
    assert gone["status"] == "failed" and "with seed 9" in gone["error"], gone
    events = sse_events(f"{url}/v1/jobs/{done}/events")
    assert [e for e, _ in events] == ["status", "done"] and events[-1][1]["images"] == before["images"]
    assert httpx.delete(f"{url}/v1/jobs/{done}").json()["status"] == "done"
    assert httpx.get(f"{url}/v1/jobs/nope").status_code == 404


# --- run-time LoRAs ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_dir(tiny_sd1, tmp_path_factory):
    """style (kohya), the same factors aliased (ss_output_name "Crayon") and a corrupt file."""
    pytest.importorskip("torch")
    import shutil

    from safetensors.torch import load_file, save_file
    from test_customisation import make_lora

    folder = tmp_path_factory.mktemp("ray-loras")
    style, _ = make_lora(tiny_sd1, "kohya", seed=91)
    shutil.copy(style, folder / "style.safetensors")
    save_file(load_file(str(style)), str(folder / "crayon_v2.safetensors"), metadata={"ss_output_name": "Crayon"})
    (folder / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    return folder


def test_loras_served_by_the_replicas_as_on_one_machine(url, onnx_sd1_slots, lora_dir):
    """The app updated in place with a second model (the tiny SD 1.x export with LoRA slots) and --lora-dir: the
    replicas read the folder (GET /sdapi/v1/loras), <lora:NAME:SCALE> tags and `loras` fields (names and aliases)
    give the pipeline's own image with those LoRAs, and bad LoRAs are a 422 at POST, body for body as `sdrt serve`."""
    import dataclasses

    from sdrt.serve.ray_app import RayOptions, deploy

    config = dataclasses.replace(serve_config(), models={"digits": None, "sd1": str(onnx_sd1_slots)}, lora_dir=str(lora_dir))
    options = RayOptions(address="auto", replicas=1, cpus_per_replica=0.5, port=int(url.rsplit(":", 1)[1]),
                         health_check_period_s=2.0)
    assert deploy(config, options, ready_timeout=120) == url
    listed = {item["name"]: item for item in httpx.get(f"{url}/sdapi/v1/loras").json()}
    assert sorted(listed) == ["broken", "crayon_v2", "style"] and listed["crayon_v2"]["alias"] == "Crayon"
    assert post(url, "/sdapi/v1/refresh-loras").status_code == 200

    ref = sdrt.Pipeline.from_pretrained(onnx_sd1_slots, backend="onnx", threads=1)
    ref.register_lora(lora_dir / "style.safetensors", name="style")
    ref.register_lora(lora_dir / "crayon_v2.safetensors", name="crayon_v2")
    common = dict(seed=3, guidance_scale=2.0, num_inference_steps=4, scheduler="ddim", height=64, width=64)
    r = post(url, "/sdapi/v1/txt2img", json={"prompt": "a cat <lora:style:0.8>, at dusk", "seed": 3, "cfg_scale": 2.0, "steps": 4,
                                             "sampler_name": "DDIM", "width": 64, "height": 64,
                                             "override_settings": {"sd_model_checkpoint": "sd1"}})
    assert r.status_code == 200, r.text
    got = png_pixels(r.json()["images"][0])
    assert np.abs(got - alone(ref, "a cat, at dusk", loras={"style": 0.8}, **common)[0].astype(int)).max() <= 1
    assert np.abs(got - alone(ref, "a cat, at dusk", **common)[0].astype(int)).max() > 8  # the LoRA did something
    r = post(url, "/v1/jobs", json={"model": "sd1", "prompt": "a dog", "steps": 4, "guidance_scale": 2.0, "seed": 7,
                                    "scheduler": "ddim", "width": 64, "height": 64, "loras": {"Crayon": 0.5, "style": 1.0}})
    assert r.status_code == 202, r.text
    done = wait_for(lambda: (s := httpx.get(f"{url}/v1/jobs/{r.json()['id']}").json())["status"] == "done" and s, timeout=60)
    want = alone(ref, "a dog", loras={"crayon_v2": 0.5, "style": 1.0}, **{**common, "seed": 7})[0]
    assert np.abs(png_pixels(done["images"][0]) - want.astype(int)).max() <= 1

    bad = [("/v1/jobs", {"model": "sd1", "prompt": "a cat", "steps": 2, "loras": {"nope": 1.0}}),
           ("/v1/jobs", {"model": "sd1", "prompt": "a cat", "steps": 2, "loras": {"../style": 1.0}}),
           ("/v1/images/generations", {"model": "sd1", "prompt": "a cat", "size": "64x64", "steps": 2, "loras": {"broken": 1.0}}),
           ("/v1/images/generations", {"model": "digits", "prompt": "a 1", "size": "64x64", "steps": 2, "loras": {"style": 1.0}}),
           ("/sdapi/v1/txt2img", {"prompt": "a <lora:nope:1> cat", "steps": 2, "override_settings": {"sd_model_checkpoint": "sd1"}})]
    served = [post(url, path, json=body) for path, body in bad]
    with running_server(config) as base:
        want = [post(base, path, json=body) for path, body in bad]
    for (path, _), got, ref_answer in zip(bad, served, want):
        assert ref_answer.status_code == 422, (path, ref_answer.text)
        assert (got.status_code, got.json()) == (422, ref_answer.json()), path


# --- errors before anything is deployed, and no ray unless asked ------------------------------------------------


def test_clear_errors():
    from sdrt.errors import SdrtError
    from sdrt.serve import ServeConfig
    from sdrt.serve.ray_app import RayOptions, check_placement, check_reachable, parse_autoscale

    with pytest.raises(SdrtError, match="no Ray cluster answers at 127.0.0.1:"):
        check_reachable(f"127.0.0.1:{free_port()}")
    nodes = [{"CPU": 2.0, "node_a": 1.0}, {"CPU": 1.0, "node_b": 1.0}]
    check_placement(ServeConfig(), RayOptions(replicas=3, cpus_per_replica=1), nodes)
    with pytest.raises(SdrtError, match=r"4 replicas .* 3 fit; missing CPU 1 more"):
        check_placement(ServeConfig(), RayOptions(replicas=4, cpus_per_replica=1), nodes)
    with pytest.raises(SdrtError, match=r"missing GPU 2 more"):
        check_placement(ServeConfig(), RayOptions(replicas=2, gpus_per_replica=1), nodes)
    with pytest.raises(SdrtError, match=r"at most 1 per node"):
        check_placement(ServeConfig(), RayOptions(replicas=3, cpus_per_replica=0.5, max_replicas_per_node=1), nodes)
    assert parse_autoscale("1:4") == (1, 4)
    with pytest.raises(sdrt.errors.InputError):
        parse_autoscale("4:1")


def cli(*args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", "import sys; from sdrt.cli import main; sys.exit(main())", *args],
                          capture_output=True, text=True, timeout=120, env=env)


def test_cli_errors_and_no_ray_import(tmp_path):
    done = cli("serve", "--ray", "--address", f"127.0.0.1:{free_port()}")
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0
    assert "no Ray cluster answers at 127.0.0.1:" in done.stderr
    # without ray installed: one line naming the extra (a `ray` module that fails to import stands in)
    fake = tmp_path / "noray"
    fake.mkdir()
    (fake / "ray.py").write_text("raise ImportError('No module named ray')\n")
    done = cli("serve", "--ray", env_extra={"PYTHONPATH": str(fake)})
    assert done.returncode == 2 and done.stderr.strip() == "sdrt: error: sdrt serve --ray needs Ray Serve: pip install 'sdrt[ray]'"
    probe = ("import sys, sdrt, sdrt.cli, sdrt.serve, sdrt.serve.app, sdrt.serve.server, sdrt.cli.serve; "
             "print('ray' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120).stdout.strip() == "False"


def test_serve_config_file_builds():
    import yaml

    from sdrt.serve import ray_app

    config = yaml.safe_load((Path(ray_app.__file__).with_name("ray_config.yaml")).read_text())
    (application,) = config["applications"]
    module, _, attr = application["import_path"].partition(":")
    assert module == "sdrt.serve.ray_app" and callable(getattr(ray_app, attr))
    assert application["route_prefix"] == "/" and config["http_options"]["host"] == "127.0.0.1"
    built = getattr(ray_app, attr)(application["args"])
    assert type(built).__name__ == "Application"


def test_direct_ingress_refused_on_a_cluster_started_without_it(cluster, url):
    """The module's cluster was started without RAY_SERVE_ENABLE_DIRECT_INGRESS: one line saying what to set, and
    nothing deployed (the module's app is untouched)."""
    from sdrt.errors import SdrtError
    from sdrt.serve.ray_app import RayOptions, deploy

    with pytest.raises(SdrtError, match=r"node\(s\) 127.0.0.1 run without direct ingress; start every "
                                        r"node with RAY_SERVE_ENABLE_DIRECT_INGRESS=1"):
        deploy(serve_config(), RayOptions(address=cluster, direct_ingress=True, port=free_port()), ready_timeout=5)
    assert replicas() >= 1  # the module's app still runs


def test_cli_serves_on_the_cluster_and_stops_on_sigint(cluster):
    """`sdrt serve --ray --address ADDR` (last but one: Serve's HTTP proxy keeps the port it started with, so the
    module's Serve instance goes first)."""
    from ray import serve

    serve.shutdown()
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from sdrt.cli import main; sys.exit(main())", "serve", "--ray",
                             "--address", cluster, "--replicas", "1", "--cpus-per-replica", "0.5", "--quick-start",
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _ready(url) or proc.poll() is not None, timeout=120, every=0.25)
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        r = post(url, "/v1/images/generations", json={"prompt": "a red 7", "size": "64x64", "steps": 4, "seed": 1})
        assert r.status_code == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def _ready(url) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


# --- last: shutdown leaves nothing behind -----------------------------------------------------------------------


def test_shutdown_leaves_no_ray_processes(cluster):
    stop_cluster()
    left = subprocess.run(["pgrep", "-f", RAY_PROCESSES], capture_output=True, text=True).stdout.split()
    assert left == [], subprocess.run(["ps", "-o", "pid,args", "-p", ",".join(left)], capture_output=True, text=True).stdout

