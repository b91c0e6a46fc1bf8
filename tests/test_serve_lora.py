"""Run-time LoRAs through `sdrt serve --lora-dir` (issue 18): A1111's `<lora:NAME:SCALE>` prompt syntax, the `loras`
field of the OpenAI and jobs routes, GET /sdapi/v1/loras, batching by LoRA set, and the refusals.

A real uvicorn server on 127.0.0.1 serves the tiny SD 1.x export with LoRA slots (and the same model exported
without slots). Served images must equal the pipeline called in process with the same LoRA alone within one level
of 255 (PNG rounding of the same float image; ORT may pick other kernels at another batch size)."""

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("torch")
httpx = pytest.importorskip("httpx")

import sdrt  # noqa: E402
from serve_util import alone, png_pixels, post, running_server, wait_for  # noqa: E402
from test_customisation import make_lora  # noqa: E402

STEPS = 4
SIZE = dict(height=64, width=64)


@pytest.fixture(scope="module")
def lora_dir(tiny_sd1, tmp_path_factory):
    """style (kohya), sub/detail (diffusers/PEFT), an aliased file, a corrupt one and a file that is no LoRA."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("loras")
    style, _ = make_lora(tiny_sd1, "kohya", seed=91)
    detail, _ = make_lora(tiny_sd1, "diffusers", seed=92)
    shutil.copy(style, folder / "style.safetensors")
    (folder / "sub").mkdir()
    shutil.copy(detail, folder / "sub" / "detail.safetensors")
    save_file(load_file(str(style)), str(folder / "crayon_v2.safetensors"),
              metadata={"ss_output_name": "Crayon", "ss_network_dim": "4", "ss_tag_frequency": '{"a": {"cat": 3}}'})
    (folder / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    (folder / "readme.txt").write_text("not a LoRA")
    return folder


@pytest.fixture(scope="module")
def url(onnx_sd1_slots, onnx_sd1, lora_dir):
    from sdrt.serve import Limits, ServeConfig

    config = ServeConfig(models={"sd1": str(onnx_sd1_slots), "plain": str(onnx_sd1)}, threads=1, warm_all_batches=False,
                         max_batch=8, batch_wait_ms=30, max_queue=16, timeout=120, lora_dir=str(lora_dir),
                         limits=Limits(max_steps=1000, max_images=4))
    with running_server(config) as base:
        yield base


@pytest.fixture(scope="module")
def ref(onnx_sd1_slots, lora_dir):
    pipe = sdrt.Pipeline.from_pretrained(onnx_sd1_slots, backend="onnx", threads=1)
    pipe.register_lora(lora_dir / "style.safetensors", name="style")
    pipe.register_lora(lora_dir / "sub" / "detail.safetensors", name="detail")
    return pipe


def assert_alone(images_b64, want):
    assert len(images_b64) == len(want)
    for b64, ref_image in zip(images_b64, want):
        assert np.abs(png_pixels(b64) - ref_image.astype(int)).max() <= 1


def test_loras_listed_as_a1111_lists_them(url):
    import webuiapi

    port = int(url.rsplit(":", 1)[1])
    listed = {item["name"]: item for item in webuiapi.WebUIApi(host="127.0.0.1", port=port).get_loras()}
    assert sorted(listed) == ["broken", "crayon_v2", "detail", "style"]
    detail = listed["detail"]
    assert (detail["alias"], detail["path"], detail["metadata"]["format"]) == ("detail", "sub/detail.safetensors", "pt")
    crayon = listed["crayon_v2"]
    assert crayon["alias"] == "Crayon" and crayon["path"] == "crayon_v2.safetensors"
    assert crayon["metadata"]["ss_network_dim"] == "4" and crayon["metadata"]["ss_tag_frequency"] == {"a": {"cat": 3}}
    assert listed["broken"]["metadata"] == {}
    assert post(url, "/sdapi/v1/refresh-loras").status_code == 200


def test_a1111_prompt_lora_equals_the_pipeline(url, ref):
    import webuiapi

    port = int(url.rsplit(":", 1)[1])
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="DDIM", steps=STEPS)
    api.util_set_model("sd1")
    result = api.txt2img(prompt="a cat <lora:style:0.8>, at dusk", seed=3, cfg_scale=2.0, **SIZE)
    want = alone(ref, "a cat, at dusk", loras={"style": 0.8}, seed=3, guidance_scale=2.0, num_inference_steps=STEPS,
                 scheduler="ddim", **SIZE)
    got = np.asarray(result.images[0].convert("RGB")).astype(int)
    assert np.abs(got - want[0].astype(int)).max() <= 1
    assert result.info["all_prompts"] == ["a cat, at dusk"]
    assert result.info["infotexts"][0].startswith("a cat, at dusk <lora:style:0.8>\nSteps: 4")
    plain = alone(ref, "a cat, at dusk", seed=3, guidance_scale=2.0, num_inference_steps=STEPS, scheduler="ddim", **SIZE)
    assert np.abs(got - plain[0].astype(int)).max() > 8  # the LoRA did something
    # then a request without LoRA: the plain image (no trace of the one before), and the alias of a file
    result = api.txt2img(prompt="a cat, at dusk", seed=3, cfg_scale=2.0, **SIZE)
    assert np.abs(np.asarray(result.images[0].convert("RGB")).astype(int) - plain[0].astype(int)).max() <= 1
    assert api.txt2img(prompt="a cat <lora:Crayon:0.5>", seed=3, cfg_scale=2.0, **SIZE).images


def test_openai_loras_field_equals_the_pipeline(url, ref):
    body = {"model": "sd1", "prompt": "a dog", "size": "64x64", "steps": STEPS, "guidance_scale": 2.0, "seed": 7,
            "n": 2, "loras": {"detail": 0.5, "style": 1.5}}
    response = post(url, "/v1/images/generations", json=body)
    assert response.status_code == 200, response.text
    want = alone(ref, "a dog", loras={"detail": 0.5, "style": 1.5}, seed=7, guidance_scale=2.0, num_inference_steps=STEPS,
                 num_images_per_prompt=2, **SIZE)
    assert_alone([d["b64_json"] for d in response.json()["data"]], want)


def test_requests_batch_by_lora_set_and_each_equals_its_alone_result(url, ref):
    response = post(url, "/v1/jobs", json={"model": "sd1", "prompt": "a 0", "steps": 990, "scheduler": "ddim", "guidance_scale": 1.0,
                                           "width": 128, "height": 128})  # ~4x the work of 64x64: still running below
    assert response.status_code == 202, response.text
    blocker = response.json()["id"]
    wait_for(lambda: httpx.get(f"{url}/v1/jobs/{blocker}").json()["status"] == "running")
    requests = [dict(prompt="a red cat", seed=1, loras={"style": 0.8}), dict(prompt="a green dog", seed=2, loras={"detail": 1.0}),
                dict(prompt="a blue bird", seed=3, loras={"style": 0.8}), dict(prompt="a fish", seed=4, n=2, loras={"detail": 1.0}),
                dict(prompt="a plain house", seed=5)]
    ids = [post(url, "/v1/jobs", json={**r, "model": "sd1", "steps": STEPS, "guidance_scale": 2.0, **SIZE}).json()["id"]
           for r in requests]
    assert [httpx.get(f"{url}/v1/jobs/{i}").json()["position"] for i in ids] == [0, 1, 2, 3, 4]
    httpx.delete(f"{url}/v1/jobs/{blocker}")
    done = [wait_for(lambda i=i: (j := httpx.get(f"{url}/v1/jobs/{i}").json())["status"] == "done" and j) for i in ids]
    assert [d["batch_images"] for d in done] == [2, 3, 2, 3, 1]  # same LoRA set together, different sets apart
    for r, d in zip(requests, done):
        want = alone(ref, r["prompt"], loras=r.get("loras"), seed=r["seed"], num_images_per_prompt=r.get("n", 1),
                     guidance_scale=2.0, num_inference_steps=STEPS, **SIZE)
        assert_alone(d["images"], want)


@pytest.mark.parametrize("model, loras, words", [
    ("sd1", {"nope": 1.0}, ["'nope'", "broken, crayon_v2, detail, style"]),
    ("sd1", {"../style": 1.0}, ["bare name"]),
    ("sd1", {"broken": 1.0}, ["'broken'"]),
    ("plain", {"style": 1.0}, ["'plain'", "--lora-slots"]),
])
def test_bad_loras_get_422_naming_them(url, model, loras, words):
    response = post(url, "/v1/images/generations", json={"model": model, "prompt": "a cat", "size": "64x64", "steps": 2,
                                                          "loras": loras})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == "loras" and all(w in error["message"] for w in words), error["message"]


def test_bad_prompt_tags_get_422_on_the_prompt(url):
    for prompt, words in (("a <lora:nope:1> cat", "'nope'"), ("a <lora:style:0.5:0.2> cat", "one scale")):
        body = {"prompt": prompt, "steps": 2, "width": 64, "height": 64, "override_settings": {"sd_model_checkpoint": "sd1"}}
        response = post(url, "/sdapi/v1/txt2img", json=body)
        assert response.status_code == 422 and response.json()["error"]["param"] == "prompt", response.text
        assert words in response.json()["error"]["message"]
    form = {"prompt": "a cat", "model": "sd1", "loras": "[1, 2]"}
    image = {"image": ("in.png", _png(), "image/png")}
    response = post(url, "/v1/images/edits", data=form, files=image)
    assert response.status_code == 422 and response.json()["error"]["param"] == "loras", response.text
    response = post(url, "/v1/images/edits", data={**form, "loras": json.dumps({"style": 0.7}), "steps": "2"}, files=image)
    assert response.status_code == 200, response.text


def test_a_server_without_lora_dir_says_how_to_serve_loras(tiny_sd1):
    from sdrt.errors import InputError
    from sdrt.serve.loras import LoraLibrary
    from sdrt.serve.schemas import FieldError

    with pytest.raises(FieldError, match="--lora-dir DIR"):
        LoraLibrary(None).prepare(None, "sd1", {"style": 1.0}, "loras")
    assert LoraLibrary(None).listing() == []
    with pytest.raises(InputError, match="no such folder"):
        LoraLibrary(tiny_sd1 / "missing")


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 30, 200)).save(buf, format="PNG")
    return buf.getvalue()


def test_ray_ingress_asks_a_replica_for_loras(tmp_path):
    """Under --ray the LoRA folder and the pipeline are the replicas' (the folder need not exist at the ingress): the
    ingress hands a request's LoRAs to the remote batcher (a replica checks and registers them, sdrt.serve.ray_replica)
    and plans with the names it answers; the Ray module (test_serve_ray.py) runs it on a cluster."""
    import asyncio
    from types import SimpleNamespace

    from sdrt.serve import Limits, ServeConfig
    from sdrt.serve.app import Service

    asked = []

    async def prepare_loras(loras, field):
        asked.append((loras, field))
        return {"style": 0.5}

    remote = SimpleNamespace(remote=True, limits=Limits(), facts=SimpleNamespace(default_size=64, size_step=8),
                             prepare_loras=prepare_loras, planner=SimpleNamespace(plan=lambda **kw: kw),
                             remote_plan=lambda plan, kw: plan)
    service = Service(ServeConfig(models={"m": None}, lora_dir=str(tmp_path / "on-the-replicas")), metrics=None,
                      batchers={"m": remote})
    planned = asyncio.run(service.plan(remote, loras={"Style": 0.5}, lora_field="prompt", prompt="a cat", num_inference_steps=2))
    assert planned["loras"] == {"style": 0.5} and asked == [({"Style": 0.5}, "prompt")]


def test_a_lora_changed_in_place_is_read_again_and_the_registered_set_is_bounded(onnx_sd1_slots, tiny_sd1, tmp_path):
    """The library behind --lora-dir, on a real pipeline: a file rewritten under the same name is read again on its
    next request (its images then equal a pipeline given the new file), an unchanged one is not; beyond
    max_registered the least recently requested LoRA not in use is unregistered, and read again when asked for."""
    import os

    from sdrt.serve.loras import MAX_LORAS, LoraLibrary

    old, _ = make_lora(tiny_sd1, "kohya", seed=91)
    new, _ = make_lora(tiny_sd1, "kohya", seed=93)
    folder = tmp_path / "loras"
    folder.mkdir()
    shutil.copy(old, folder / "x.safetensors")
    pipe = sdrt.Pipeline.from_pretrained(onnx_sd1_slots, backend="onnx", threads=1)
    library = LoraLibrary(folder, max_registered=MAX_LORAS)
    run = lambda p: alone(p, "a cat", seed=3, num_inference_steps=2, guidance_scale=2.0, loras={"x": 1.0}, **SIZE)  # noqa: E731

    assert library.prepare(pipe, "sd1", {"x": 1.0}, "loras") == {"x": 1.0}
    first = pipe.registered_loras["x"]
    before = run(pipe)
    library.prepare(pipe, "sd1", {"x": 1.0}, "loras")
    assert pipe.registered_loras["x"] is first, "an unchanged file was read again"

    shutil.copy(new, folder / "x.safetensors")  # same size: the mtime tells
    stat = (folder / "x.safetensors").stat()
    os.utime(folder / "x.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    library.prepare(pipe, "sd1", {"x": 1.0}, "loras")
    assert pipe.registered_loras["x"] is not first
    after = run(pipe)
    fresh = sdrt.Pipeline.from_pretrained(onnx_sd1_slots, backend="onnx", threads=1)
    fresh.register_lora(folder / "x.safetensors", name="x")
    assert np.array_equal(after, run(fresh)) and not np.array_equal(after, before)

    for k in range(MAX_LORAS + 1):
        shutil.copy(old, folder / f"l{k}.safetensors")
    assert pipe.active_loras == (("x", 1.0),)
    for k in range(MAX_LORAS):  # x, l0..l15: one over the bound; x is active, so l0 goes
        library.prepare(pipe, "sd1", {f"l{k}": 1.0}, "loras")
    assert "x" in pipe.registered_loras and "l0" not in pipe.registered_loras, "the active LoRA was dropped"
    pipe.activate_loras(())
    library.prepare(pipe, "sd1", {f"l{MAX_LORAS}": 1.0}, "loras", in_use={"l1"})  # x is idle now: it goes
    assert "x" not in pipe.registered_loras and "l1" in pipe.registered_loras
    library.prepare(pipe, "sd1", {"l0": 1.0}, "loras", in_use={"l1"})  # read again; l1 is queued: l2 goes
    assert "l0" in pipe.registered_loras and "l1" in pipe.registered_loras and "l2" not in pipe.registered_loras
    assert library.registered(pipe)[-1] == "l0" and len(library.registered(pipe)) == len(pipe.registered_loras) == MAX_LORAS
