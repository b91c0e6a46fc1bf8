"""The pipeline's steps (plan, encode_text, prepare_latents, denoise, finish) used alone, as a batcher uses them:
several requests share each UNet call and each gets the image it would get alone; a request leaves mid-run."""

import numpy as np
import pytest

import sdrt
from sdrt.errors import Cancelled, InputError
from sdrt.observers import NetworkTimer, Observer

STEPS = 6
# Rows of one ONNX Runtime call are computed independently, but a different batch size may pick other kernels
# (and the batch split across threads regroups rows): latents agree to float32 rounding, images to one level.
LATENT_RTOL = 1e-4


@pytest.fixture(scope="module")
def pipe():
    return sdrt.Pipeline.from_pretrained(None, backend="onnx", threads=1)


def run_batch(pipe, plans, observers=()):
    batch = pipe.prepare_latents(plans, pipe.encode_text(plans), observers)
    pipe.denoise(batch, observers)
    return batch, pipe.finish(batch)


def close(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-6))


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a", "dpmpp_2m"])
def test_batched_requests_equal_each_alone(pipe, scheduler):
    kw = dict(num_inference_steps=STEPS, scheduler=scheduler, output_type="np")
    a = pipe.plan("a red 7", negative_prompt="blue", guidance_scale=3.0, seed=1, **kw)
    b = pipe.plan("a green 2", guidance_scale=6.5, seed=2, num_images_per_prompt=2, **kw)
    _, (out_a, out_b) = run_batch(pipe, [a, b])
    alone_a = pipe("a red 7", negative_prompt="blue", guidance_scale=3.0, seed=1, progress=False, **kw)
    alone_b = pipe("a green 2", guidance_scale=6.5, seed=2, num_images_per_prompt=2, progress=False, **kw)
    for got, want in ((out_a, alone_a), (out_b, alone_b)):
        assert got.seeds == want.seeds and got.parameters == want.parameters
        assert np.abs(got.images.astype(int) - want.images.astype(int)).max() <= 1


def test_a_request_leaves_mid_run_without_disturbing_the_others(pipe):
    kw = dict(num_inference_steps=STEPS, scheduler="dpmpp_2m", output_type="latent", guidance_scale=4.0)
    stays, leaves = pipe.plan("a blue 4", seed=3, **kw), pipe.plan("a white 9", seed=4, num_images_per_prompt=2, **kw)

    class LeaveAfter(Observer):
        def on_step(self, batch, step):
            if step == 2:
                batch.drop(leaves)  # multistep history and generators are cut to the remaining rows

    batch, (out,) = run_batch(pipe, [leaves, stays], [LeaveAfter()])
    assert batch.plans == [stays] and batch.rows == 1
    alone = pipe("a blue 4", seed=3, progress=False, **kw).images
    assert close(out.images, alone) <= LATENT_RTOL


def test_img2img_requests_share_a_batch(pipe):
    image = np.zeros((64, 64, 3), np.uint8)
    image[16:48, 28:36] = (255, 0, 0)
    kw = dict(image=image, strength=0.6, num_inference_steps=STEPS, output_type="latent", guidance_scale=2.0)
    plans = [pipe.plan("a red 1", seed=5, **kw), pipe.plan("a green 1", seed=6, **kw)]
    _, outs = run_batch(pipe, plans)
    for prompt, seed, out in zip(("a red 1", "a green 1"), (5, 6), outs):
        assert close(out.images, pipe(prompt, seed=seed, progress=False, **kw).images) <= LATENT_RTOL


def test_plans_that_cannot_share_are_refused(pipe):
    a = pipe.plan("a 1", num_inference_steps=4)
    for b in (pipe.plan("a 1", num_inference_steps=5), pipe.plan("a 1", num_inference_steps=4, guidance_scale=1.0),
              pipe.plan("a 1", num_inference_steps=4, scheduler="euler")):
        with pytest.raises(InputError, match="cannot share a batch"):
            pipe.encode_text([a, b])


def test_plan_checks_before_any_network_runs(pipe):
    timer = NetworkTimer()
    with pytest.raises(InputError, match="unknown scheduler"):
        pipe("a 1", scheduler="nope", observers=[timer])
    assert timer.calls == []


def test_observers_see_every_network_call_and_can_cancel(pipe):
    timer = NetworkTimer()
    out = pipe("a 3", num_inference_steps=5, seed=0, progress=False, observers=[timer])
    assert len(timer.seconds("unet")) == 5 and len(timer.seconds("text_encoder")) == 1  # "" and "a 3" in one call
    assert len(timer.seconds("vae_decoder")) == 1 and all(s > 0 for _, s, _ in timer.calls)
    assert set(out.timings) == {"text", "loop", "decode", "total"}
    seen = []
    with pytest.raises(Cancelled, match="after step 2 of 5"):
        pipe("a 3", num_inference_steps=5, progress=False, callback=lambda i, t, x: seen.append(i) or i < 1)
    assert seen == [0, 1]
