"""The device loop (sdrt.device_loop) against the host loop of Pipeline.__call__, on the tiny models.

On the CPU the device loop runs the same float32 arithmetic as the host loop in the same order, so the final
latents must agree to float32 rounding (measured here: bit-equal) for every scheduler, the
ancestral one included (its noise is drawn up front in the host loop's order). On CUDA (tests marked gpu,
skipped without one) the whole-step CUDA graph must equal the uncaptured device loop to fp16 rounding.
"""

import contextlib

import numpy as np
import pytest

import sdrt
from sdrt.errors import Cancelled
from sdrt.noise import TorchCPUGenerator
from sdrt.schedulers import SCHEDULER_NAMES, make_scheduler

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from sdrt.device_loop import DeviceLoop, draw_step_noise, step_table  # noqa: E402

RTOL = 1e-6
PROMPT = "a photo of a red cat"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (two spin ~20x slower on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def pipe(request, tiny_sd1, tiny_sd2):
    """A tiny model on the torch CPU backend; the pipeline itself runs the host loop (device_loop off)."""
    return sdrt.Pipeline.from_pretrained(tiny_sd1 if request.param == "sd1" else tiny_sd2, backend="torch", device_loop=False)


def device_run(pipe, scheduler, steps, guidance, seed, batch=1, height=64, width=64, callback=None):
    """txt2img through backend.denoise, after the pipeline's own steps 0-2 (plan, text states, initial latents)."""
    plan = pipe.plan(PROMPT, num_inference_steps=steps, guidance_scale=guidance, height=height, width=width, seed=seed,
                     scheduler=scheduler, num_images_per_prompt=batch)  # fmt: skip
    run = pipe.prepare_latents([plan], pipe.encode_text([plan]))
    noise = draw_step_noise(run.generators, run.sched, run.latent_shape)
    return pipe.backend.denoise(run.sched, run.x, run.text_states, run.uniform_guidance(), noise, callback)


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_device_loop_equals_host_loop(pipe, scheduler):
    kwargs = dict(num_inference_steps=5, guidance_scale=3.0, seed=7)
    expected = pipe(PROMPT, **kwargs, scheduler=scheduler, output_type="latent", progress=False).images
    got = device_run(pipe, scheduler, 5, 3.0, 7)
    assert got.dtype == np.float32 and np.all(np.isfinite(got))
    assert rel(got, expected) <= RTOL, f"{scheduler}: {rel(got, expected):.2e}"


def test_batch_and_no_guidance(pipe):
    """Batch 2 (one generator per image, seed + k) and guidance off (the UNet sees the cond states alone)."""
    for guidance in (1.0, 2.5):
        kwargs = dict(num_inference_steps=3, guidance_scale=guidance, seed=3, num_images_per_prompt=2, width=96)
        expected = pipe(PROMPT, **kwargs, scheduler="euler_a", output_type="latent", progress=False).images
        got = device_run(pipe, "euler_a", 3, guidance, 3, batch=2, width=96)
        assert rel(got, expected) <= RTOL


def test_callback_sees_each_step_and_cancels(pipe):
    seen = []
    with pytest.raises(Cancelled, match="after step 2 of"):
        device_run(pipe, "ddim", 4, 2.0, 1, callback=lambda i, t, x: seen.append((i, t, x.shape)) or i < 1)
    assert [s[0] for s in seen] == [0, 1] and seen[0][2] == (1, 4, 8, 8)


def test_step_table_and_noise_order():
    from sdrt.export.tiny import SD15_SCHEDULER

    sched = make_scheduler("euler_a", SD15_SCHEDULER)
    sched.set_timesteps(4)
    table = step_table(sched, 7.5)
    assert table.shape == (4, 3 + 3) and table.dtype == np.float32
    assert np.array_equal(table[:, 4], sched.timesteps) and np.all(table[:, 5] == 7.5)
    gens = [TorchCPUGenerator(5), TorchCPUGenerator(6)]
    noise = draw_step_noise(gens, sched, (1, 4, 2, 2))
    assert noise.shape == (4, 2, 4, 2, 2)
    second = TorchCPUGenerator(6)
    second.randn((1, 4, 2, 2))  # call 0's draw
    assert np.array_equal(noise[1, 1], second.randn((1, 4, 2, 2))[0])  # call 1, image 1
    assert draw_step_noise(gens, make_scheduler("ddim", SD15_SCHEDULER), (1, 4, 2, 2)) is None


def test_pipeline_hook_uses_device_loop(tiny_sd1):
    """With the backend's device_loop on, Pipeline.__call__ hands the loop over and gets the host loop's latents."""
    on = sdrt.Pipeline.from_pretrained(tiny_sd1, backend="torch", device_loop=True)
    off = sdrt.Pipeline.from_pretrained(tiny_sd1, backend="torch", device_loop=False)
    kwargs = dict(num_inference_steps=4, guidance_scale=2.0, seed=5, scheduler="euler_a", output_type="latent", progress=False)
    got = on(PROMPT, **kwargs).images
    assert on.backend.loop.runs == 1 and off.backend.loop.runs == 0  # the pipeline handed the loop over, or not
    assert rel(got, off(PROMPT, **kwargs).images) <= RTOL
    image = (np.random.default_rng(0).uniform(0, 1, (64, 64, 3)) * 255).astype(np.uint8)
    i2i = dict(kwargs, strength=0.6)
    assert rel(on("a dog", image=image, **i2i).images, off("a dog", image=image, **i2i).images) <= RTOL


@pytest.mark.parametrize("family", ["sdxl", "lcm"])
def test_step_invariant_unet_inputs_ride_the_device_loop(family, tiny_sdxl, tmp_path_factory):
    """SDXL's text_embeds/time_ids and an LCM UNet's timestep_cond are static buffers of the device loop: the loop
    takes them (no fallback to the host loop) and gives the host loop's latents."""
    if family == "sdxl":
        model, kwargs = tiny_sdxl, dict(guidance_scale=2.0, scheduler="euler_a", negative_prompt="blurry")
    else:
        from sdrt.export.tiny import build_tiny_sd

        model, kwargs = build_tiny_sd(tmp_path_factory.mktemp("tiny") / "lcm", "lcm"), dict(guidance_scale=4.0)
    on = sdrt.Pipeline.from_pretrained(model, backend="torch", device_loop=True)
    off = sdrt.Pipeline.from_pretrained(model, backend="torch", device_loop=False)
    kwargs.update(num_inference_steps=3, seed=11, output_type="latent", progress=False, num_images_per_prompt=2)
    got = on(PROMPT, **kwargs).images
    assert on.backend.loop.runs == 1, "the pipeline kept the host loop"
    assert rel(got, off(PROMPT, **kwargs).images) <= RTOL


def test_sdxl_refiner_hand_over_on_the_device_loop(tiny_sdxl, tiny_sdxl_refiner):
    """denoising_end / denoising_start windows: base and refiner each hand their window to the device loop (Heun's
    odd call count included) and equal the host loop."""
    runs = {}
    for device_loop in (True, False):
        base, refiner = (sdrt.Pipeline.from_pretrained(m, backend="torch", device_loop=device_loop)
                         for m in (tiny_sdxl, tiny_sdxl_refiner))
        runs[device_loop] = [base("a cat", num_inference_steps=5, guidance_scale=2.0, seed=3, refiner=refiner, refiner_start=0.7,
                                  scheduler=s, output_type="latent", progress=False).images for s in ("euler", "heun")]
        assert base.backend.loop.runs == refiner.backend.loop.runs == (2 if device_loop else 0)
    for got, expected in zip(runs[True], runs[False]):
        assert rel(got, expected) <= RTOL


@pytest.mark.parametrize("unet,scheduler,strength", [("9ch", "euler_a", 0.75), ("9ch", "pndm", 1.0), ("4ch", "euler_a", 0.75),
                                                    ("4ch", "dpmpp_2m", 1.0), ("4ch", "heun", 0.6)])
def test_inpainting_on_the_device_loop(unet, scheduler, strength, tiny_sd1, tiny_sd1_inpaint):
    """An inpainting UNet's mask channels (a static buffer on its input) and an ordinary UNet's kept region (blended
    back after each step from per-call latents computed on the host) give the host loop's latents, batch 2."""
    model = tiny_sd1_inpaint if unet == "9ch" else tiny_sd1
    rng = np.random.default_rng(0)
    image = (rng.uniform(0, 1, (64, 64, 3)) * 255).astype(np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 8:40] = 255
    kwargs = dict(image=image, mask_image=mask, strength=strength, num_inference_steps=4, guidance_scale=2.0, seed=9,
                  scheduler=scheduler, num_images_per_prompt=2, output_type="latent", progress=False)
    on = sdrt.Pipeline.from_pretrained(model, backend="torch", device_loop=True)
    off = sdrt.Pipeline.from_pretrained(model, backend="torch", device_loop=False)
    got = on(PROMPT, **kwargs).images
    assert on.backend.loop.runs == 1, "the pipeline kept the host loop"
    assert rel(got, off(PROMPT, **kwargs).images) <= RTOL


def test_extra_inputs_must_match_the_unet_rows(pipe):
    loop = DeviceLoop(pipe.backend.modules["unet"], "cpu", torch.float32)
    sched = make_scheduler("ddim", pipe.source.scheduler_config)
    sched.set_timesteps(2)
    x = np.zeros((1, 4, 8, 8), np.float32)
    with pytest.raises(ValueError, match="time_ids has 1 rows; the UNet runs 2"):
        loop.run(sched, x, np.zeros((2, 77, 32), np.float32), 2.0, extra={"time_ids": np.zeros((1, 6), np.float32)})


def test_rejects_bad_input(pipe):
    loop = DeviceLoop(pipe.backend.modules["unet"], "cpu", torch.float32)
    sched = make_scheduler("euler_a", pipe.source.scheduler_config)
    sched.set_timesteps(2)
    x = np.zeros((1, 4, 8, 8), np.float32)
    with pytest.raises(ValueError, match="step_noise"):
        loop.run(sched, x, np.zeros((2, 77, 32), np.float32), 2.0)
    with pytest.raises(ValueError, match="CUDA"):
        loop.run(sched, x, np.zeros((2, 77, 32), np.float32), 2.0, np.zeros((2, 1, 4, 8, 8), np.float32), graph=True)
    with pytest.raises(ValueError, match="do not fit"):
        loop.run(make_scheduler("ddim", pipe.source.scheduler_config), x, np.zeros((1, 77, 32), np.float32), 2.0)


def tiny_unet(device, dtype):
    """The tiny models' UNet (sdrt.export.tiny's config), random weights; no tokenizer needed (GPU machines lack one)."""
    from diffusers import UNet2DConditionModel

    from sdrt.backends.torch_modules import UNetContract

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 32, 64), layers_per_block=1, cross_attention_dim=32, norm_num_groups=16,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8,
    )  # fmt: skip
    return UNetContract(unet).to(device, dtype).eval()


def host_loop(unet, sched, x, text, guidance, noise):
    """Pipeline.__call__'s loop with numpy arrays between the steps (the reference)."""
    batch = x.shape[0]
    sched.reset()
    for i in range(sched.num_calls):
        x_in = torch.from_numpy(np.concatenate([sched.scale_model_input(x, i)] * 2))
        t = torch.full((2 * batch,), float(sched.timesteps[i]))
        with torch.inference_mode():
            pred = unet(x_in, t, torch.from_numpy(text)).numpy()
        pred = pred[:batch] + np.float32(guidance) * (pred[batch:] - pred[:batch])
        x = sched.step(pred, i, x, None if noise is None else noise[i])
    return x


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_cuda_graph_equals_eager_device_loop(scheduler):
    """fp16 on CUDA: the captured whole step replayed equals the same step run eagerly, and the fp32 host loop."""
    from sdrt.export.tiny import SD15_SCHEDULER

    sched = make_scheduler(scheduler, SD15_SCHEDULER)
    sched.set_timesteps(8)
    rng = np.random.default_rng(0)
    text = rng.standard_normal((4, 77, 32), dtype=np.float32)
    shape = (1, 4, 16, 16)
    gens = [TorchCPUGenerator(11), TorchCPUGenerator(12)]
    x = np.concatenate([g.randn(shape) for g in gens]) * np.float32(sched.init_noise_sigma)
    noise = draw_step_noise(gens, sched, shape)
    loop = DeviceLoop(tiny_unet("cuda", torch.float16), "cuda", torch.float16)
    runs = [loop.run(sched, x, text, 3.0, noise, graph=g).cpu().numpy() for g in (False, True, True)]
    assert np.all(np.isfinite(runs[0]))
    assert rel(runs[1], runs[0]) <= 2e-3  # the same kernels: expected bit-equal
    assert np.array_equal(runs[1], runs[2])  # the second graph run replays the cached graph
    expected = host_loop(tiny_unet("cpu", torch.float32), sched, x, text, 3.0, noise)
    assert rel(runs[1], expected) <= 2e-2, f"{scheduler}: {rel(runs[1], expected):.2e}"  # fp16 UNet vs fp32


def test_step_cache_is_bounded_lru():
    """A long-running process serving many sizes keeps at most max_steps captured steps (least recently used goes)."""
    from sdrt.export.tiny import SD15_SCHEDULER

    calls = []

    def unet(x, t, text):
        calls.append(x.shape)
        return torch.zeros_like(x)

    loop = DeviceLoop(unet, "cpu", torch.float32, max_steps=2)
    sched = make_scheduler("ddim", SD15_SCHEDULER)
    sched.set_timesteps(1)
    for side in (4, 8, 4, 12):
        loop.run(sched, np.zeros((1, 4, side, side), np.float32), np.zeros((1, 77, 32), np.float32), None)
    assert [k[2] for k in loop._steps] == [(1, 4, 4, 4), (1, 4, 12, 12)]  # 8 was least recently used
    assert DeviceLoop(unet, "cpu", torch.float32).max_steps == 8


def test_capture_uses_the_loops_device_streams_and_one_shared_pool(monkeypatch):
    """On cuda:1, every stream is made on cuda:1 and torch.cuda.graph gets the loop's own capture stream (its
    default one is made once, on whichever device came first) and one pool shared by all steps. Fakes stand in
    for torch.cuda's stream and graph API (no GPU here); the step itself runs on CPU tensors."""
    from sdrt.device_loop import _Step
    from sdrt.export.tiny import SD15_SCHEDULER

    made, graphs = [], []

    class Stream:
        def __init__(self, device=None):
            made.append(str(device))

        def wait_stream(self, other):
            pass

    class Graph:
        def replay(self):
            pass

    @contextlib.contextmanager
    def graph(g, pool=None, stream=None):
        graphs.append((pool, stream))
        yield

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream(device))
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: ("pool", len(graphs)))
    loop = DeviceLoop(lambda x, t, text: torch.zeros_like(x), "cpu", torch.float32)
    loop.device = torch.device("cuda", 1)  # what the loop would hold on a two-GPU machine
    sched = make_scheduler("ddim", SD15_SCHEDULER)
    sched.set_timesteps(1)
    pool, capture_stream = loop._graph_resources()
    for side in (4, 8):
        step = _Step(loop.unet, sched, (1, 4, side, side), (1, 77, 32), False, torch.device("cpu"), torch.float32)
        step.device = loop.device
        step.capture(*loop._graph_resources())
    assert set(made) == {"cuda:1"}
    assert graphs == [(pool, capture_stream)] * 2  # one pool, the loop's stream, for every step
