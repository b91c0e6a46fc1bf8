"""`sdrt serve` through the real HTTP stack (uvicorn on a free 127.0.0.1 port) on the built-in model: every route,
the webuiapi and openai clients as users call them, batched == alone, cancellation of one row, limits."""

import base64
import io
import threading

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import sdrt  # noqa: E402
from serve_util import alone, png_pixels, post, running_server, sse_events, wait_for  # noqa: E402

from PIL import Image  # noqa: E402

STEPS = 6


@pytest.fixture(scope="module")
def url():
    from sdrt.serve import Limits, ServeConfig

    config = ServeConfig(models={"digits": None, "alt": None}, threads=1, warm_all_batches=False, max_batch=8, batch_wait_ms=30,
                         max_queue=16, timeout=120, preview_every=3,
                         limits=Limits(max_steps=400, max_images=4, max_prompt_chars=200, max_body_bytes=2_000_000))
    with running_server(config) as base:
        yield base


@pytest.fixture(scope="module")
def pipe():
    return sdrt.Pipeline.from_pretrained(None, backend="onnx", threads=1)


# --- operations -------------------------------------------------------------------------------------------------


def test_health_ready_docs_and_metrics(url):
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{url}/readyz").json() == {"status": "ready", "models": {"digits": "ready", "alt": "ready"}}
    schema = httpx.get(f"{url}/openapi.json").json()
    for path in ("/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/v1/images/generations", "/v1/images/edits", "/v1/jobs",
                 "/v1/jobs/{job_id}/events", "/metrics"):
        assert path in schema["paths"]
    assert httpx.get(f"{url}/docs").status_code == 200
    post(url, "/v1/images/generations", json={"prompt": "a 1", "size": "64x64", "steps": 2})
    text = httpx.get(f"{url}/metrics").text
    for name in ('sdrt_requests_total{method="POST",route="/v1/images/generations",status="200"}', "sdrt_queue_depth",
                 "sdrt_batch_images_bucket", 'sdrt_stage_seconds_bucket{le="0.5",stage="denoise"}', "sdrt_images_total"):
        assert name in text, name


# --- AUTOMATIC1111 ------------------------------------------------------------------------------------------------


def test_webuiapi_txt2img_img2img_and_metadata(url, pipe):
    import webuiapi
    from sd_parsers import ParserManager

    host, port = url.rsplit(":", 1)
    api = webuiapi.WebUIApi(host="127.0.0.1", port=int(port), sampler="DDIM", steps=STEPS)
    result = api.txt2img(prompt="a red 7", negative_prompt="blue", seed=11, cfg_scale=6.0, width=64, height=64, batch_size=2)
    assert len(result.images) == 2 and result.images[0].size == (64, 64)
    assert result.info["all_seeds"] == [11, 12] and result.info["sampler_name"] == "DDIM"
    assert result.parameters["prompt"] == "a red 7"
    want = alone(pipe, "a red 7", negative_prompt="blue", seed=11, guidance_scale=6.0, num_inference_steps=STEPS,
                 scheduler="ddim", num_images_per_prompt=2)
    for got, ref in zip(result.images, want):
        assert np.abs(np.asarray(got.convert("RGB")).astype(int) - ref.astype(int)).max() <= 1
    prompt_info = ParserManager().parse(result.images[0])  # the PNG's A1111 `parameters` chunk, as tools read it
    assert prompt_info is not None and prompt_info.full_prompt == "a red 7"
    assert prompt_info.full_negative_prompt == "blue"
    (sampler,) = prompt_info.samplers
    assert sampler.name == "DDIM" and sampler.parameters == {"cfg_scale": "6.0", "seed": "11", "steps": str(STEPS)}
    assert sampler.model.name == "digits" and prompt_info.metadata["Size"] == "64x64"

    init = Image.fromarray(want[0])
    edited = api.img2img(images=[init], prompt="a green 7", denoising_strength=0.5, seed=3, width=64, height=64, cfg_scale=5.0)
    assert len(edited.images) == 1 and edited.info["denoising_strength"] == 0.5
    ref = alone(pipe, "a green 7", image=init, strength=0.5, seed=3, guidance_scale=5.0, num_inference_steps=STEPS, scheduler="ddim")
    assert np.abs(np.asarray(edited.images[0].convert("RGB")).astype(int) - ref[0].astype(int)).max() <= 1


def test_a1111_model_sampler_and_option_routes(url):
    import webuiapi

    api = webuiapi.WebUIApi(host="127.0.0.1", port=int(url.rsplit(":", 1)[1]))
    names = [s["name"] for s in api.get_samplers()]
    assert {"DDIM", "Euler a", "Euler", "DPM++ 2M", "DPM++ 2M Karras", "PLMS"} <= set(names)
    assert [m["title"] for m in api.get_sd_models()] == ["digits", "alt"]
    assert api.get_options()["sd_model_checkpoint"] == "digits"
    api.util_set_model("alt")
    assert api.get_options()["sd_model_checkpoint"] == "alt"
    r = api.txt2img(prompt="a 3", steps=2, width=64, height=64, sampler_name="DPM++ 2M", scheduler="Karras")
    assert r.info["sd_model_name"] == "alt" and r.info["sampler_name"] == "DPM++ 2M Karras"
    api.set_options({"sd_model_checkpoint": "digits"})
    r = api.txt2img(prompt="a 3", steps=2, width=64, height=64, override_settings={"sd_model_checkpoint": "alt"})
    assert r.info["sd_model_name"] == "alt"
    assert api.get_embeddings() == {"loaded": {}, "skipped": {}}
    bad = post(url, "/sdapi/v1/options", json={"sd_model_checkpoint": "/etc/passwd"})
    assert bad.status_code == 422 and "digits, alt" in bad.json()["detail"][0]["msg"]
    assert api.get_progress()["state"]["sampling_steps"] == 0


def test_progress_preview_and_interrupt(url):
    holder = {}
    thread = threading.Thread(target=lambda: holder.setdefault(
        "r", post(url, "/sdapi/v1/txt2img", json={"prompt": "a 5", "steps": 400, "width": 64, "height": 64})))
    thread.start()
    progress = wait_for(lambda: (p := httpx.get(f"{url}/sdapi/v1/progress").json())["state"]["sampling_step"] >= 2 and p)
    assert progress["state"]["sampling_steps"] == 400 and 0 < progress["progress"] < 1
    preview = Image.open(io.BytesIO(base64.b64decode(progress["current_image"])))
    assert preview.size == (64, 64)
    assert httpx.post(f"{url}/sdapi/v1/interrupt").json() == {"interrupted": 1}
    thread.join(30)
    assert holder["r"].status_code == 409 and "interrupted" in holder["r"].json()["error"]["message"]


# --- OpenAI ---------------------------------------------------------------------------------------------------------


def test_timestep_spacing_field(url, pipe):
    """sdrt's `timestep_spacing` extra field reaches the scheduler (issue #20: few-step models want 'trailing')."""
    body = {"prompt": "a red 7", "size": "64x64", "steps": 2, "seed": 4, "scheduler": "euler_a", "guidance_scale": 1.0}
    got = post(url, "/v1/images/generations", json={**body, "timestep_spacing": "trailing"}).json()["data"][0]["b64_json"]
    want = alone(pipe, "a red 7", seed=4, num_inference_steps=2, scheduler="euler_a", guidance_scale=1.0, timestep_spacing="trailing")
    other = alone(pipe, "a red 7", seed=4, num_inference_steps=2, scheduler="euler_a", guidance_scale=1.0, timestep_spacing="leading")
    assert np.abs(png_pixels(got) - want[0].astype(int)).max() <= 1 < np.abs(want[0].astype(int) - other[0]).max()
    assert post(url, "/v1/images/generations", json={**body, "timestep_spacing": "last"}).status_code == 422


def test_openai_client_generations_and_edits(url, pipe):
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    result = client.images.generate(model="digits", prompt="a blue 4", n=2, size="64x64", response_format="b64_json",
                                    extra_body={"steps": STEPS, "seed": 21, "guidance_scale": 5.0, "scheduler": "euler_a",
                                                "negative_prompt": "red"})
    want = alone(pipe, "a blue 4", negative_prompt="red", seed=21, guidance_scale=5.0, num_inference_steps=STEPS,
                 scheduler="euler_a", num_images_per_prompt=2)
    assert len(result.data) == 2
    for item, ref in zip(result.data, want):
        assert np.abs(png_pixels(item.b64_json) - ref.astype(int)).max() <= 1

    buf = io.BytesIO()
    Image.fromarray(want[0]).save(buf, format="PNG")
    edit = client.images.edit(image=("four.png", buf.getvalue(), "image/png"), prompt="a white 4", model="alt",
                              extra_body={"strength": 0.6, "steps": STEPS, "seed": 2, "scheduler": "ddim"})
    ref = alone(pipe, "a white 4", image=Image.fromarray(want[0]), strength=0.6, seed=2, num_inference_steps=STEPS, scheduler="ddim")
    assert np.abs(png_pixels(edit.data[0].b64_json) - ref[0].astype(int)).max() <= 1

    with pytest.raises(openai.UnprocessableEntityError, match="size"):
        client.images.generate(prompt="a 1", size="1024x1024")
    with pytest.raises(openai.UnprocessableEntityError, match="not served"):
        client.images.generate(prompt="a 1", model="dall-e-3")


# --- async jobs ---------------------------------------------------------------------------------------------------


def test_events_of_a_finished_job_replay_progress_and_the_latest_preview(url):
    """A client that opens /events after the job is done still sees every step and the latest preview."""
    r = post(url, "/v1/jobs", json={"prompt": "a blue 5", "steps": 6, "seed": 1, "preview_every": 2, "scheduler": "ddim"})
    job_id = r.json()["id"]
    wait_for(lambda: httpx.get(f"{url}/v1/jobs/{job_id}").json()["status"] == "done", timeout=60)
    events = sse_events(f"{url}/v1/jobs/{job_id}/events")
    assert [d["step"] for e, d in events if e == "progress"] == [1, 2, 3, 4, 5, 6]
    assert [d["step"] for e, d in events if e == "preview"] == [4] and events[-1][0] == "done"


def test_job_lifecycle_with_events(url, pipe):
    r = post(url, "/v1/jobs", json={"prompt": "a red 2", "steps": 9, "seed": 4, "preview_every": 3, "scheduler": "ddim"})
    assert r.status_code == 202 and r.json()["status"] in ("queued", "running")
    job_id = r.json()["id"]
    events = sse_events(f"{url}/v1/jobs/{job_id}/events")
    kinds = [e for e, _ in events]
    assert kinds[0] == "status" and kinds[-1] == "done"
    steps = [d["step"] for e, d in events if e == "progress"]
    assert steps == sorted(steps) and steps[-1] == 9 or kinds.count("progress") >= 1
    previews = [d for e, d in events if e == "preview"]
    assert previews and all(Image.open(io.BytesIO(base64.b64decode(p["images"][0]))).size == (64, 64) for p in previews)
    final = events[-1][1]
    assert final["status"] == "done" and final["step"] == final["total"] == 9 and final["seeds"] == [4]
    ref = alone(pipe, "a red 2", seed=4, num_inference_steps=9, scheduler="ddim")
    assert np.abs(png_pixels(final["images"][0]) - ref[0].astype(int)).max() <= 1
    polled = httpx.get(f"{url}/v1/jobs/{job_id}").json()
    assert polled["status"] == "done" and polled["images"] == final["images"]
    assert httpx.get(f"{url}/v1/jobs/nope").status_code == 404
    assert httpx.delete(f"{url}/v1/jobs/nope").status_code == 404


def test_latent_preview_tracks_the_decoder(pipe):
    """The fitted linear map, on latents it was not fitted on, against the real decode pooled to latent pixels."""
    from sdrt.serve.media import LatentPreview

    preview = LatentPreview.fit(pipe)
    latents = pipe(["a red 7", "a green 2", "a blue 4", "a white 9"], seed=9, num_inference_steps=20,
                   output_type="latent", progress=False).images
    decoded = pipe.decode(latents)
    s = pipe.facts.vae_scale_factor
    n, _, h, w = decoded.shape
    pooled = decoded.reshape(n, 3, h // s, s, w // s, s).mean(axis=(3, 5)).transpose(0, 2, 3, 1)
    approx = np.stack([np.asarray(im, np.float32)[::s, ::s] / 127.5 - 1.0 for im in preview(latents)])
    # a rough but faithful picture: this tiny model's decoder is far from linear (the best linear map fitted on
    # these very latents still errs by 0.14 on average, in [-1, 1] units)
    assert np.corrcoef(approx.ravel(), pooled.ravel())[0, 1] > 0.5
    assert np.abs(approx - pooled).mean() < 0.6 * np.abs(pooled).mean()  # well under a flat grey guess
    assert preview.weights.shape == (pipe.facts.latent_channels + 1, 3)


def _blocker(url, steps=300):
    """A long job that keeps the model's worker busy while the requests under test queue up behind it."""
    job = post(url, "/v1/jobs", json={"prompt": "a 0", "steps": steps, "guidance_scale": 1.0}).json()["id"]
    wait_for(lambda: httpx.get(f"{url}/v1/jobs/{job}").json()["status"] == "running")
    return job


def test_batched_requests_equal_each_alone(url, pipe):
    requests = [dict(prompt="a red 7", negative_prompt="blue", guidance_scale=3.0, seed=1),
                dict(prompt="a green 2", guidance_scale=6.5, seed=2, n=2),
                dict(prompt="a white 9", guidance_scale=7.5, seed=3),
                dict(prompt="a blue 4", guidance_scale=4.0, seed=4, n=3)]
    blocker = _blocker(url)
    ids = [post(url, "/v1/jobs", json={**r, "steps": STEPS, "scheduler": "dpmpp_2m"}).json()["id"] for r in requests]
    assert [httpx.get(f"{url}/v1/jobs/{i}").json()["position"] for i in ids] == [0, 1, 2, 3]
    httpx.delete(f"{url}/v1/jobs/{blocker}")
    done = [wait_for(lambda i=i: (j := httpx.get(f"{url}/v1/jobs/{i}").json())["status"] == "done" and j) for i in ids]
    assert [d["batch_images"] for d in done] == [7, 7, 7, 7]  # one UNet batch for all four requests
    equal = 0
    for r, d in zip(requests, done):
        ref = alone(pipe, r["prompt"], negative_prompt=r.get("negative_prompt"), guidance_scale=r["guidance_scale"],
                    seed=r["seed"], num_images_per_prompt=r.get("n", 1), num_inference_steps=STEPS, scheduler="dpmpp_2m")
        for b64, want in zip(d["images"], ref):
            diff = np.abs(png_pixels(b64) - want.astype(int)).max()
            assert diff <= 1
            equal += diff == 0
    assert equal >= 1  # most are bit-equal; ORT may pick other kernels at another batch size (one level at most)


def test_fifo_across_keys_a_lone_request_waits_one_batch(url):
    blocker = _blocker(url)
    job = lambda steps: post(url, "/v1/jobs", json={"prompt": "a 1", "steps": steps}).json()["id"]  # noqa: E731
    a, lone, c = job(4), job(5), job(4)  # a and c share a key; the lone request does not
    httpx.delete(f"{url}/v1/jobs/{blocker}")
    done = {k: wait_for(lambda i=i: (j := httpx.get(f"{url}/v1/jobs/{i}").json())["status"] == "done" and j)
            for k, i in (("a", a), ("lone", lone), ("c", c))}
    assert done["a"]["batch_images"] == done["c"]["batch_images"] == 2  # c rode along with the older a
    assert done["lone"]["batch_images"] == 1  # served next, before anything that arrived after it


def test_one_cancelled_row_leaves_the_others_untouched(url, pipe):
    blocker = _blocker(url)
    stays = post(url, "/v1/jobs", json={"prompt": "a blue 4", "seed": 3, "steps": 60, "guidance_scale": 4.0}).json()["id"]
    leaves = post(url, "/v1/jobs", json={"prompt": "a white 9", "seed": 4, "n": 2, "steps": 60, "guidance_scale": 4.0}).json()["id"]
    httpx.delete(f"{url}/v1/jobs/{blocker}")
    wait_for(lambda: httpx.get(f"{url}/v1/jobs/{leaves}").json()["step"] >= 3)
    cancelled = httpx.delete(f"{url}/v1/jobs/{leaves}").json()
    assert cancelled["status"] == "cancelled" and cancelled["step"] < 60
    done = wait_for(lambda: (j := httpx.get(f"{url}/v1/jobs/{stays}").json())["status"] == "done" and j)
    assert done["batch_images"] == 3
    ref = alone(pipe, "a blue 4", seed=3, num_inference_steps=60, guidance_scale=4.0)
    assert np.abs(png_pixels(done["images"][0]) - ref[0].astype(int)).max() <= 1


def test_client_disconnect_stops_its_request(url):
    before = httpx.get(f"{url}/metrics").text.count('reason="client disconnected"')
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "a 8", "steps": 400, "width": 64, "height": 64}, timeout=0.5)
    wait_for(lambda: 'reason="client disconnected"' in httpx.get(f"{url}/metrics").text, timeout=10)
    assert httpx.get(f"{url}/metrics").text.count('reason="client disconnected"') >= max(before, 1)
    assert httpx.get(f"{url}/sdapi/v1/progress").json()["state"]["job_count"] == 0


# --- limits and bad input: 4xx naming the field, never a 500 ------------------------------------------------------


def bomb_png() -> str:
    buf = io.BytesIO()
    Image.new("1", (6000, 6000)).save(buf, format="PNG")  # 36 Mpx in a few kB
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("path, body, field, words", [
    ("/v1/images/generations", {"prompt": "a", "steps": 401}, "steps", "1..400"),
    ("/v1/images/generations", {"prompt": "a", "n": 5}, "n", "1..4"),
    ("/v1/images/generations", {"prompt": "a", "size": "256x256"}, "size", "16384"),
    ("/v1/images/generations", {"prompt": "a", "size": "65x64"}, "body", "multiple of 32"),
    ("/v1/images/generations", {"prompt": "a" * 201}, "prompt", "200"),
    ("/v1/images/generations", {"prompt": "a", "scheduler": "dpm_adaptive"}, "scheduler", "DDIM"),
    ("/v1/images/generations", {"prompt": "a", "response_format": "url"}, "response_format", "b64_json"),
    ("/v1/images/generations", {"prompt": "a", "guidance_scale": -1}, "guidance_scale", "greater than or equal"),
    ("/v1/images/generations", {"n": 1}, "prompt", "required"),
    ("/sdapi/v1/txt2img", {"prompt": "a", "batch_size": 3, "n_iter": 2}, "batch_size", "1..4"),
    ("/sdapi/v1/txt2img", {"prompt": "a", "sampler_name": "DPM adaptive"}, "sampler_name", "Euler a"),
    ("/sdapi/v1/txt2img", {"prompt": "a", "sampler_name": "DDIM", "scheduler": "Karras"}, "scheduler", "DPM++ 2M"),
    ("/sdapi/v1/txt2img", {"prompt": "a", "enable_hr": True}, "enable_hr", "not supported"),
    ("/sdapi/v1/txt2img", {"prompt": "a", "override_settings": {"sd_model_checkpoint": "../x"}}, "sd_model_checkpoint", "digits"),
    ("/sdapi/v1/img2img", {"prompt": "a", "init_images": ["%%%"]}, "init_images", "base64"),
    ("/sdapi/v1/img2img", {"prompt": "a", "init_images": [base64.b64encode(b"not an image").decode()]}, "init_images", "PNG"),
    ("/sdapi/v1/img2img", {"prompt": "a", "init_images": [bomb_png()]}, "init_images", "pixels"),
    ("/sdapi/v1/img2img", {"prompt": "a", "init_images": [], "width": 64}, "init_images", "at least 1"),
    ("/v1/jobs", {"prompt": "a", "strength": 0}, "strength", "greater than"),
    ("/v1/jobs", {"prompt": "a", "model": "/models/evil"}, "model", "not served"),
])
def test_bad_requests_get_422_naming_the_field(url, path, body, field, words):
    r = post(url, path, json=body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"][0]
    assert field in [str(x) for x in detail["loc"]] or field in ".".join(map(str, detail["loc"])), detail
    assert words in detail["msg"], detail
    assert "Traceback" not in r.text


def test_body_limit_and_malformed_json(url):
    r = post(url, "/v1/images/generations", content=b'{"prompt": "' + b"a" * 2_100_000 + b'"}',
             headers={"content-type": "application/json"})
    assert r.status_code == 413 and "2000000" in r.json()["error"]["message"]
    r = post(url, "/sdapi/v1/txt2img", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "Traceback" not in r.text
    r = post(url, "/v1/images/edits", files={"image": ("x.png", b"junk", "image/png")}, data={"prompt": "a"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "image"]


def test_loopback_detection_for_the_no_key_warning():
    from sdrt.serve.server import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and not is_loopback("0.0.0.0")


def test_cors_is_off_unless_asked(url):
    preflight = {"Origin": "http://evil.test", "Access-Control-Request-Method": "POST"}
    r = httpx.options(f"{url}/v1/jobs", headers=preflight)
    assert "access-control-allow-origin" not in r.headers


def test_light_install_never_imports_the_server():
    import subprocess
    import sys

    code = "import sys, sdrt, sdrt.cli; sdrt.cli.build_parser(); assert 'fastapi' not in sys.modules and 'uvicorn' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
