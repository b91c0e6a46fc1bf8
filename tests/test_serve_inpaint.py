"""A1111 inpainting through `sdrt serve` (uvicorn on 127.0.0.1, the built-in model, the webuiapi client): the mask,
mask_blur, inpainting_fill, inpaint_full_res (+ padding) and inpainting_mask_invert fields, the paste-back that keeps
pixels outside the mask, the metadata, and bad masks answered 422."""

import base64
import io

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
webuiapi = pytest.importorskip("webuiapi")

import sdrt  # noqa: E402
from PIL import Image  # noqa: E402
from serve_util import png_b64, post, running_server  # noqa: E402

from sdrt.serve import a1111_inpaint  # noqa: E402

STEPS = 4
INIT = Image.fromarray((np.random.default_rng(0).uniform(0, 1, (128, 128, 3)) * 255).astype(np.uint8))
MASK = np.zeros((128, 128), np.uint8)
MASK[70:100, 20:44] = 255  # a 24x30 box: full_res crops around it


@pytest.fixture(scope="module")
def url():
    from sdrt.serve import Limits, ServeConfig

    config = ServeConfig(models={"digits": None}, threads=1, warm_all_batches=False, max_batch=4, batch_wait_ms=10,
                         max_queue=8, timeout=120, limits=Limits(max_steps=400, max_images=4))
    with running_server(config) as base:
        yield base


@pytest.fixture(scope="module")
def api(url):
    return webuiapi.WebUIApi(host="127.0.0.1", port=int(url.rsplit(":", 1)[1]), sampler="Euler a", steps=STEPS)


@pytest.fixture(scope="module")
def pipe():
    return sdrt.Pipeline.from_pretrained(None, backend="onnx", threads=1)


def pixels(image):
    return np.asarray(image.convert("RGB")).astype(int)


def test_whole_picture_inpainting_equals_the_pipeline_with_paste_back(api, pipe):
    """inpaint_full_res=False, no blur, fill 'original': where A1111's overlay (the resized mask, doubled) is 1 the
    answer is the pipeline's inpainting, where it is 0 the init image (resized) exactly."""
    result = api.img2img(images=[INIT], mask_image=Image.fromarray(MASK), prompt="a red 3", seed=4, cfg_scale=3.0,
                         width=64, height=64, denoising_strength=0.9, mask_blur=0, inpainting_fill=1, inpaint_full_res=False)
    want = pipe("a red 3", image=INIT, mask_image=MASK, seed=4, guidance_scale=3.0, width=64, height=64, strength=0.9,
                num_inference_steps=STEPS, scheduler="euler_a", output_type="np", progress=False)
    overlay = a1111_inpaint.prepare(INIT, Image.fromarray(MASK), 64, 64, 0, 1, False, 0, False).overlay
    got = pixels(result.images[0])
    assert got.shape == (64, 64, 3) and (overlay == 1).sum() >= 12 * 15 and (overlay == 0).sum() >= 64 * 64 - 20 * 23
    assert np.abs(got - want.images[0].astype(int))[overlay == 1].max() <= 1
    assert np.array_equal(got[overlay == 0], pixels(INIT.resize((64, 64), Image.LANCZOS))[overlay == 0])
    text = result.images[0].info["parameters"]
    assert "Mask blur: 0" in text and "Denoising strength: 0.9" in text and "Inpaint area" not in text
    assert result.info["is_using_inpainting_conditioning"] is False  # the digits model's UNet has 4 channels


@pytest.mark.parametrize("fill,content", [(2, "latent_noise"), (3, "latent_nothing")])
def test_latent_noise_and_latent_nothing_fills(api, pipe, fill, content):
    """inpainting_fill 2 / 3: the pipeline's masked_content (the repainted region starts from the seed's noise / from
    zeros), pasted back as for fill 1; and they change the answer inside the mask."""
    kwargs = dict(images=[INIT], mask_image=Image.fromarray(MASK), prompt="a red 3", seed=4, cfg_scale=3.0, width=64,
                  height=64, denoising_strength=0.6, mask_blur=0, inpaint_full_res=False)
    result = api.img2img(inpainting_fill=fill, **kwargs)
    want = pipe("a red 3", image=INIT, mask_image=MASK, seed=4, guidance_scale=3.0, width=64, height=64, strength=0.6,
                masked_content=content, num_inference_steps=STEPS, scheduler="euler_a", output_type="np", progress=False)
    overlay = a1111_inpaint.prepare(INIT, Image.fromarray(MASK), 64, 64, 0, fill, False, 0, False).overlay
    got, original = pixels(result.images[0]), pixels(api.img2img(inpainting_fill=1, **kwargs).images[0])
    assert np.abs(got - want.images[0].astype(int))[overlay == 1].max() <= 1
    assert np.abs(got - original)[overlay == 1].mean() > 2  # the region started elsewhere
    assert np.array_equal(got[overlay == 0], original[overlay == 0])


def test_only_masked_crops_generates_at_full_resolution_and_pastes_back(api, pipe):
    """inpaint_full_res: the answer has the init image's size; outside the blurred mask it is the init image exactly,
    inside it is the crop inpainted at width x height and scaled back (what prepare/finish + the pipeline give)."""
    fields = dict(mask_blur=2, inpainting_fill=0, inpaint_full_res=True, inpaint_full_res_padding=8)
    result = api.img2img(images=[INIT], mask_image=Image.fromarray(MASK), prompt="a blue 5", seed=9, cfg_scale=3.0,
                         width=64, height=64, denoising_strength=0.8, **fields)
    got = pixels(result.images[0])
    assert got.shape == (128, 128, 3)
    prep = a1111_inpaint.prepare(INIT, Image.fromarray(MASK), 64, 64, 2, 0, True, 8, False)
    x1, y1, x2, y2 = prep.box
    assert x1 <= 20 - 8 and y1 <= 70 - 8 and x2 >= 44 + 8 and y2 >= 100 + 8 and (x2 - x1) == (y2 - y1)  # square, as 64x64
    out = pipe("a blue 5", image=prep.image, mask_image=prep.mask, seed=9, guidance_scale=3.0, strength=0.8,
               num_inference_steps=STEPS, scheduler="euler_a", progress=False)
    want = pixels(a1111_inpaint.finish(prep, out.images)[0])
    assert np.abs(got - want).max() <= 1
    far = np.ones((128, 128), bool)
    far[60:110, 10:54] = False  # beyond the 2 px blur of the mask
    assert np.array_equal(got[far], pixels(INIT)[far])
    assert not np.array_equal(got[MASK > 0], pixels(INIT)[MASK > 0])
    text = result.images[0].info["parameters"]
    assert "Mask blur: 2" in text and "Inpaint area: Only masked" in text and "Masked area padding: 8" in text


def test_inverted_mask_keeps_the_white(api):
    result = api.img2img(images=[INIT], mask_image=Image.fromarray(MASK), prompt="a 1", seed=1, width=64, height=64,
                         mask_blur=0, inpaint_full_res=False, inpainting_mask_invert=1, inpainting_fill=1)
    inner = a1111_inpaint.prepare(INIT, Image.fromarray(MASK), 64, 64, 0, 1, False, 0, True).overlay == 0
    assert inner.sum() >= 80  # the 12x15 box, less the ring where the doubled resized mask is not 0
    init_small = pixels(INIT.resize((64, 64), Image.LANCZOS))
    got = pixels(result.images[0])
    assert np.array_equal(got[inner], init_small[inner]) and not np.array_equal(got[:30], init_small[:30])


def test_crop_box_grows_to_the_aspect_ratio_inside_the_image():
    mask = np.zeros((100, 200), bool)
    mask[90:100, 190:200] = True  # bottom-right corner
    assert a1111_inpaint.crop_box(mask, 5, 64, 64) == (185, 85, 200, 100)
    assert a1111_inpaint.crop_box(mask, 0, 128, 64) == (180, 90, 200, 100)  # 2:1, shifted left to stay inside
    assert a1111_inpaint.crop_box(np.zeros((8, 8), bool), 4, 64, 64) is None


@pytest.mark.parametrize(
    "fields,field,words",
    [({"inpainting_fill": 4}, "inpainting_fill", "less than or equal to 3"),
     ({"mask": "blank"}, "mask", "empty"),
     ({"mask": "tall"}, "mask", "64x128"),
     ({"mask": "blank", "inpaint_full_res": False}, None, "all black"),
     ],
)  # fmt: skip
def test_bad_masks_answer_422(url, fields, field, words):
    masks = {"blank": np.zeros((128, 128), np.uint8), "tall": np.full((128, 64), 255, np.uint8)}
    mask = masks[fields.pop("mask")] if "mask" in fields else MASK
    body = {"prompt": "a 1", "init_images": [png_b64(INIT)], "mask": png_b64(Image.fromarray(mask)), "steps": 2,
            "width": 64, "height": 64, **fields}
    response = post(url, "/sdapi/v1/img2img", json=body)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"][0]
    assert words in detail["msg"] and (field is None or field in detail["loc"])


def test_openai_edits_with_a_transparent_mask(url, pipe):
    """/v1/images/edits with OpenAI's mask (fully transparent = edit): the pipeline's inpainting with paste-back."""
    rgba = np.zeros((128, 128, 4), np.uint8)
    rgba[..., 3] = 255 - MASK  # transparent where MASK is white
    files = {"image": ("in.png", base64.b64decode(png_b64(INIT)), "image/png"),
             "mask": ("mask.png", base64.b64decode(png_b64(Image.fromarray(rgba))), "image/png")}
    form = {"prompt": "a 2", "size": "64x64", "steps": str(STEPS), "seed": "6", "scheduler": "euler_a", "strength": "0.9"}
    response = post(url, "/v1/images/edits", files=files, data=form)
    assert response.status_code == 200, response.text
    got = pixels(Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"]))))
    want = pipe("a 2", image=INIT, mask_image=MASK, keep_unmasked=True, width=64, height=64, num_inference_steps=STEPS,
                seed=6, scheduler="euler_a", strength=0.9, output_type="np", progress=False).images[0]
    assert np.abs(got - want.astype(int)).max() <= 1
    files["mask"] = ("mask.png", base64.b64decode(png_b64(Image.fromarray(MASK))), "image/png")
    response = post(url, "/v1/images/edits", files=files, data=form)
    assert response.status_code == 422 and "no alpha channel" in response.text


def test_inpainting_jobs_with_different_masks_share_a_batch(url, pipe):
    """Two /v1/jobs inpainting requests (different masks, images and seeds) queued behind a long job run as one
    UNet batch, and each equals the pipeline run alone: the mask data are per row."""
    from serve_util import png_pixels, wait_for

    blocker = post(url, "/v1/jobs", json={"prompt": "a 0", "steps": 300, "guidance_scale": 1.0}).json()["id"]
    wait_for(lambda: httpx.get(f"{url}/v1/jobs/{blocker}").json()["status"] == "running")
    other = np.zeros((128, 128), np.uint8)
    other[10:60, 60:120] = 255
    flipped = INIT.transpose(Image.FLIP_LEFT_RIGHT)
    requests = [dict(prompt="a red 3", seed=1, mask=MASK, image=INIT, n=2), dict(prompt="a blue 8", seed=7, mask=other, image=flipped)]
    ids = []
    for r in requests:
        body = {"prompt": r["prompt"], "seed": r["seed"], "n": r.get("n", 1), "steps": STEPS, "scheduler": "euler_a",
                "width": 64, "height": 64, "init_image": png_b64(r["image"]), "mask": png_b64(Image.fromarray(r["mask"])),
                "strength": 0.9, "keep_unmasked": True, "guidance_scale": 3.0}
        response = post(url, "/v1/jobs", json=body)
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    httpx.delete(f"{url}/v1/jobs/{blocker}")
    done = [wait_for(lambda i=i: (j := httpx.get(f"{url}/v1/jobs/{i}").json())["status"] == "done" and j) for i in ids]
    assert [d["batch_images"] for d in done] == [3, 3]
    for r, d in zip(requests, done):
        want = pipe(r["prompt"], image=r["image"], mask_image=r["mask"], keep_unmasked=True, seed=r["seed"],
                    num_images_per_prompt=r.get("n", 1), width=64, height=64, strength=0.9, guidance_scale=3.0,
                    num_inference_steps=STEPS, scheduler="euler_a", output_type="np", progress=False).images
        for b64, ref in zip(d["images"], want):
            assert np.abs(png_pixels(b64) - ref.astype(int)).max() <= 1
