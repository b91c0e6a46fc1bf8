"""`sdrt serve` operations: the API key, back-pressure (429 + Retry-After), the request timeout (504), no route
answering 500 under schemathesis fuzzing, and a SIGTERM drain of a real `sdrt serve` process (exit 0)."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from serve_util import free_port, running_server, wait_for  # noqa: E402

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def tight():
    """One request at a time, two may wait, 1.5 s per request, an API key."""
    from sdrt.serve import Limits, ServeConfig

    config = ServeConfig(threads=1, warm_all_batches=False, max_batch=1, max_queue=2, timeout=1.5, api_key=KEY,
                         cors=["http://app.test"],
                         limits=Limits(max_steps=1000))
    with running_server(config) as url:
        yield url


def test_api_key_on_every_route_but_the_health_checks(tight):
    assert httpx.get(f"{tight}/healthz").status_code == 200
    assert httpx.get(f"{tight}/readyz").status_code == 200
    for method, path in (("GET", "/metrics"), ("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/sdapi/v1/sd-models"),
                         ("POST", "/v1/images/generations"), ("GET", "/v1/jobs/x")):
        r = httpx.request(method, tight + path)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", path
        assert httpx.request(method, tight + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{tight}/sdapi/v1/sd-models", headers=AUTH).status_code == 200
    r = httpx.post(f"{tight}/v1/images/generations", headers=AUTH, json={"prompt": "a 1", "steps": 2})
    assert r.status_code == 200 and len(r.json()["data"]) == 1


def test_a_schedule_the_scheduler_cannot_space_is_a_422_at_submit(tight):
    r = httpx.post(f"{tight}/v1/jobs", headers=AUTH, json={"prompt": "a 1", "steps": 1000})
    assert r.status_code == 422 and "num_inference_steps 1000" in r.json()["error"]["message"]


def test_cors_origin_when_asked(tight):
    preflight = {"Origin": "http://app.test", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    r = httpx.options(f"{tight}/v1/images/generations", headers=preflight)  # browsers send no key on a preflight
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.test"
    r = httpx.options(f"{tight}/v1/images/generations", headers={**preflight, "Origin": "http://other.test"})
    assert r.headers.get("access-control-allow-origin") != "http://other.test"


def test_full_queue_answers_429_with_retry_after(tight):
    submit = lambda steps: httpx.post(f"{tight}/v1/jobs", headers=AUTH, json={"prompt": "a 1", "steps": steps})  # noqa: E731
    running = submit(500).json()["id"]
    wait_for(lambda: httpx.get(f"{tight}/v1/jobs/{running}", headers=AUTH).json()["status"] == "running")
    queued = [submit(2).json()["id"] for _ in range(2)]
    r = submit(2)
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1 and "queue is full" in r.json()["error"]["message"]
    r = httpx.post(f"{tight}/sdapi/v1/txt2img", headers=AUTH, json={"prompt": "a", "steps": 2, "width": 64, "height": 64})
    assert r.status_code == 429
    for job in queued + [running]:
        httpx.delete(f"{tight}/v1/jobs/{job}", headers=AUTH)
    assert [httpx.get(f"{tight}/v1/jobs/{j}", headers=AUTH).json()["status"] for j in queued] == ["cancelled"] * 2


def test_timeout_answers_504_and_drops_the_work(tight):
    t0 = time.monotonic()
    # ~10 s of work on an idle machine (900 steps at 128 px), so it cannot finish inside the 1.5 s timeout
    r = httpx.post(f"{tight}/sdapi/v1/txt2img", headers=AUTH, timeout=30,
                   json={"prompt": "a 4", "steps": 900, "width": 128, "height": 128})
    assert r.status_code == 504 and "timeout" in r.json()["error"]["message"]
    assert time.monotonic() - t0 < 5
    wait_for(lambda: httpx.get(f"{tight}/sdapi/v1/progress", headers=AUTH).json()["state"]["job_count"] == 0, timeout=5)
    assert 'reason="timeout"' in httpx.get(f"{tight}/metrics", headers=AUTH).text


def test_no_route_answers_500_under_fuzzing():
    """schemathesis drives every operation of the OpenAPI schema with generated bodies, bounded in count."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    from sdrt.serve import Limits, ServeConfig

    config = ServeConfig(threads=1, warm_all_batches=False, max_batch=4, timeout=10,
                         limits=Limits(max_steps=2, max_images=2, max_pixels=64 * 64, max_input_pixels=256 * 256))
    with running_server(config) as url:
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        failures, calls = [], 0
        for result in schema.get_all_operations():
            operation = result.ok()
            if operation.path.endswith("/events"):
                continue  # a stream; its 404 for unknown ids is covered in test_serve

            @settings(max_examples=12, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy())
            def fuzz(case):
                nonlocal calls
                response = case.call(base_url=url, timeout=30)
                calls += 1
                if response.status_code >= 500 or "Traceback" in response.text:
                    failures.append((case.method, case.path, response.status_code, response.text[:200]))

            fuzz()
        assert calls > 100 and failures == []


def test_sigterm_drains_in_flight_work_then_exits_0(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sdrt.cli", "serve", "--port", str(port), "--threads", "1",
                             "--drain-timeout", "60", "--log-level", "warning", "--quick-start"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: _status(f"{url}/readyz") == 200, timeout=60, every=0.1)
        holder = {}
        request = threading.Thread(target=lambda: holder.setdefault("r", httpx.post(
            f"{url}/sdapi/v1/txt2img", timeout=60, json={"prompt": "a 6", "steps": 120, "width": 64, "height": 64,
                                                         "sampler_name": "DDIM", "seed": 1})))
        request.start()
        wait_for(lambda: httpx.get(f"{url}/sdapi/v1/progress").json()["state"]["sampling_step"] >= 1)
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: _status(f"{url}/readyz") == 503)
        refused = httpx.post(f"{url}/v1/images/generations", json={"prompt": "a 1", "steps": 2})
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
        request.join(60)
        r = holder["r"]
        assert r.status_code == 200 and len(r.json()["images"]) == 1  # the in-flight request finished
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _status(url):
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.TransportError:
        return None
