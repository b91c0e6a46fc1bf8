"""sdrt's scheduler `update` on torch tensors with static buffers, and captured in a CUDA graph.

The promise of sdrt.schedulers' design: a step is `update(row, ...)` with the scalars in a coefficient row, so
it can run on fixed device buffers, be captured once, and be replayed for every call with only the row buffer
changing. Each test compares the whole chain with the numpy `step` chain. Needs torch, not diffusers; the CUDA
graph test needs a GPU (skipped without one).
"""

import numpy as np
import pytest

from sdrt.device_loop import capture_graph
from sdrt.schedulers import SCHEDULER_NAMES, make_scheduler

torch = pytest.importorskip("torch")

SD15 = {
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "clip_sample": False,
}  # fmt: skip
CONFIGS = {
    "sd15": SD15,
    "sd21_v": {**SD15, "_class_name": "DDIMScheduler", "prediction_type": "v_prediction"},
    "clip": {**SD15, "clip_sample": True, "clip_sample_range": 1.5},
    "prk": {**SD15, "skip_prk_steps": False},  # PNDM's Runge-Kutta warm-up (the same as sd15 for the others)
}


def run_static(name, config, device, graph, shape, n=20, strength=1.0):
    """Max relative difference between the numpy step chain and the static-buffer (graph) chain."""
    s = make_scheduler(name, config)
    s.set_timesteps(n, strength)
    rng = np.random.default_rng(0)
    start = rng.standard_normal(shape, dtype=np.float32) * np.float32(s.init_noise_sigma)
    outputs = rng.standard_normal((s.num_calls, *shape), dtype=np.float32)
    noises = rng.standard_normal((s.num_calls, *shape), dtype=np.float32)
    expected, x = [], start
    for i in range(s.num_calls):
        x = s.step(outputs[i], i, x, noises[i] if s.needs_noise else None)
        expected.append(x)

    # Static buffers: the step reads and writes only these; the host copies a row and the UNet's output in.
    table = torch.from_numpy(s.coefficients).to(device)
    row = table[0].clone()
    sample = torch.from_numpy(start).to(device)
    out, noise = torch.zeros_like(sample), torch.zeros_like(sample)
    history = s.init_history(sample)

    def step():
        prev, new = s.update(row, sample, out, history, noise if s.needs_noise else None)
        for buffer, value in zip(history, new):
            buffer.copy_(value)
        sample.copy_(prev)

    if graph:  # the device loop's own capture (warm-up on a side stream, buffers restored)
        cuda_graph = capture_graph(step, [sample, *history], sample.device)
    worst = 0.0
    for i in range(s.num_calls):
        row.copy_(table[i])
        out.copy_(torch.from_numpy(outputs[i]))
        noise.copy_(torch.from_numpy(noises[i]))
        cuda_graph.replay() if graph else step()
        got = sample.cpu().numpy()
        assert got.dtype == np.float32
        worst = max(worst, float(np.abs(got - expected[i]).max()) / max(1.0, float(np.abs(expected[i]).max())))
    return worst


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_static_buffers_on_cpu(name, config):
    assert run_static(name, CONFIGS[config], "cpu", graph=False, shape=(1, 4, 8, 8), strength=0.8) <= 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_cuda_graph_replay(name, config):
    worst = run_static(name, CONFIGS[config], "cuda", graph=True, shape=(2, 4, 64, 64), n=30)
    print(f"{name} {config}: max relative difference to numpy {worst:.3g}")
    assert worst <= 1e-6
