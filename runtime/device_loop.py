"""The denoising loop on the device: latents, text states and scheduler arithmetic stay there between steps.

The same loop as `Pipeline.__call__` (scale the input, one batched [uncond, cond] UNet call, the guidance
combine, the scheduler's `update`), with everything the host would compute per step computed once up front:

- `step_table(sched, guidance)`: one float32 row per UNet call, [scheduler coefficients..., input scale,
  timestep, guidance scale], uploaded once as a [num_calls, K + 3] device tensor;
- `draw_step_noise(generators, sched, shape)`: the ancestral noise for every call, drawn on the host in
  diffusers' order (each image's generator, after its initial latents, one draw per call), uploaded once.

A step then reads and writes only static device buffers (latents, scheduler history, text states, the row,
the noise slice), so it can be captured whole (UNet + guidance + scheduler update) in one CUDA graph per
(scheduler, shapes, guidance on/off) and replayed: before each replay the loop only copies the row and the
noise slice from device to device. Nothing in the loop waits for the device.

Graph memory: every captured step shares one graph memory pool (steps never run at once, and nothing a graph
allocates outlives its replay: its results are copied into the step's static buffers), and at most
`max_steps` steps (MAX_CACHED_STEPS by default) are kept, least recently used dropped first: a long-running
process serving many sizes, batches and schedulers holds a bounded amount of GPU memory. Capture runs on the
loop's own device with streams made there (`cuda:1` works; torch.cuda.graph's default capture stream is made once
per process on whichever device came first).

Backend-neutral: `DeviceLoop` takes any callable `unet(sample, timestep, encoder_hidden_states, **extra) -> tensor` on
device tensors (the PyTorch backend's contract module; a TensorRT engine can be wrapped the same way). `extra` are
the UNet's other inputs that stay the same for every step (SDXL's text_embeds and time_ids, an LCM UNet's
timestep_cond): static buffers loaded once per run, like the text states. Inpainting rides the same way
(`inpaint`, from sdrt.inpaint.InpaintRows.device_tables): an inpainting UNet's mask and masked-image channels are a
static buffer stacked onto its input; an ordinary UNet's kept region, precomputed per call on the host like the
ancestral noise, is blended back after each step. Latents
and the scheduler arithmetic are float32; the UNet sees its own dtype (fp16 on CUDA), as on the host path.
torch is imported lazily: `draw_step_noise` and `step_table` need numpy only.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from sdrt.errors import Cancelled

MAX_CACHED_STEPS = 8  # captured steps kept per loop: (scheduler, shapes, guidance) combinations in use at once


def step_table(sched, guidance_scale: float | None) -> np.ndarray:
    """float32 [num_calls, K + 3]: each call's coefficient row, then input scale, timestep and guidance scale."""
    n = sched.num_calls
    extra = np.stack([sched.input_scale, sched.timesteps, np.full(n, guidance_scale or 1.0)], axis=1)
    return np.concatenate([sched.coefficients, extra], axis=1).astype(np.float32)


def draw_step_noise(generators, sched, latent_shape) -> np.ndarray | None:
    """[num_calls, batch, C, h, w] fresh noise for an ancestral scheduler (None for the others).

    Call it after the initial latents are drawn: image k's generator then continues exactly as in the host
    loop, which draws one [1, C, h, w] array per image per call.
    """
    if not sched.needs_noise:
        return None
    per_image = [np.stack([g.randn(latent_shape)[0] for _ in range(sched.num_calls)]) for g in generators]
    return np.stack(per_image, axis=1).astype(np.float32)


class _Step:
    """One denoising step on static buffers: what `DeviceLoop` runs eagerly, or captures once and replays."""

    def __init__(self, unet, sched, x_shape, text_shape, guided: bool, device, dtype, extra_shapes=(), inpaint_shapes=()):
        import torch

        self.unet, self.sched, self.guided, self.dtype, self.device = unet, sched, guided, dtype, device
        k = sched.coefficients.shape[1]
        self.scale_col, self.time_col, self.guidance_col = k, k + 1, k + 2
        self.x = torch.zeros(x_shape, dtype=torch.float32, device=device)
        self.history = sched.init_history(self.x)
        self.text = torch.zeros(text_shape, dtype=dtype, device=device)
        self.extra = {name: torch.zeros(shape, dtype=dtype, device=device) for name, shape in extra_shapes}
        # concat: [UNet rows, k, h, w] in the UNet's dtype; mask [B, 1, h, w] and kept [B, C, h, w]: float32 latents
        self.inpaint = {name: torch.zeros(shape, dtype=dtype if name == "concat" else torch.float32, device=device)
                        for name, shape in inpaint_shapes}
        self.row = torch.zeros(k + 3, dtype=torch.float32, device=device)
        self.noise = torch.zeros_like(self.x) if sched.needs_noise else None
        self.graph = None

    def load(self, latents, text, row, noise, extra, inpaint) -> None:
        """Start a run: copy the inputs in, zero the scheduler history."""
        self.x.copy_(latents)
        self.text.copy_(text)
        for name, value in extra.items():
            self.extra[name].copy_(value)
        for name, value in inpaint.items():
            self.inpaint[name].copy_(value)
        self.row.copy_(row)
        for h in self.history:
            h.zero_()
        if self.noise is not None:
            self.noise.copy_(noise)

    def __call__(self) -> None:
        """x <- sched.update(row, x, guided UNet prediction at x), reading and writing only the buffers."""
        import torch

        row = self.row
        x_in = (self.x * row[self.scale_col]).to(self.dtype)
        if self.guided:
            x_in = torch.cat([x_in, x_in])
        if "concat" in self.inpaint:  # an inpainting UNet: [latents, mask, masked-image latents] on the channel axis
            x_in = torch.cat([x_in, self.inpaint["concat"]], dim=1)
        timestep = row[self.time_col].expand(x_in.shape[0])  # float32, as the contract says
        pred = self.unet(x_in, timestep, self.text, **self.extra).float()
        if self.guided:
            uncond, cond = pred.chunk(2)
            pred = uncond + row[self.guidance_col] * (cond - uncond)
        prev, new = self.sched.update(row, self.x, pred, self.history, self.noise)
        for buffer, value in zip(self.history, new):
            buffer.copy_(value)
        if "mask" in self.inpaint:  # an ordinary UNet inpainting: the kept region comes back (sdrt.inpaint.blend)
            mask = self.inpaint["mask"]
            prev = (1 - mask) * self.inpaint["kept"] + mask * prev
        self.x.copy_(prev)

    def capture(self, pool=None, stream=None) -> None:
        """Capture one whole step (see `capture_graph`); pool: the graph memory pool to share; stream: the capture
        stream, made on this step's device (the caller is inside torch.cuda.device(device))."""
        self.graph = capture_graph(self, (self.x, *self.history), self.device, pool, stream)


def capture_graph(step: Callable[[], None], buffers, device, pool=None, stream=None):
    """Warm `step` up on a side stream (as torch asks), restore the `buffers` it changed, then capture one call of it
    in a CUDA graph and return the graph (a failed capture raises, leaving nothing to replay)."""
    import torch

    saved = [b.clone() for b in buffers]
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream(device).wait_stream(side)
    for buffer, value in zip(buffers, saved):
        buffer.copy_(value)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=stream):
        step()
    return graph


class DeviceLoop:
    """Runs the denoising loop of one UNet on one device; CUDA graphs are captured on first use and cached."""

    def __init__(self, unet: Callable, device, dtype, max_steps: int = MAX_CACHED_STEPS):
        import torch

        self.unet = unet
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())  # pin "cuda" to the device it means now
        self.dtype = dtype
        self.max_steps = max(1, int(max_steps))
        self._steps: OrderedDict = OrderedDict()  # (scheduler config, shapes, guided, graph) -> _Step, LRU last
        self._pool = None  # one graph memory pool for every captured step
        self._capture_stream = None
        self.runs = 0

    def clear(self) -> None:
        """Drop the cached steps and graphs (and their memory); needed after the UNet's weights move."""
        self._steps.clear()
        self._pool = self._capture_stream = None

    def _graph_resources(self):
        """The shared graph pool and the capture stream, made on this loop's device (call inside it)."""
        import torch

        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
            self._capture_stream = torch.cuda.Stream(device=self.device)
        return self._pool, self._capture_stream

    def run(
        self,
        sched,
        latents,
        text_states,
        guidance_scale: float | None,
        step_noise=None,
        graph: bool = False,
        callback: Callable[[int, float, np.ndarray], bool | None] | None = None,
        progress: bool = False,
        extra: dict | None = None,
        inpaint: dict | None = None,
    ):
        """Denoise `latents` [B, C, h, w] (already scaled by init_noise_sigma, or noised for img2img) on the device.

        sched: a scheduler after set_timesteps. text_states: [B or 2B, seq, hidden], [uncond; cond] when guided.
        guidance_scale: None runs the UNet on the cond states alone. step_noise: `draw_step_noise`'s array for
        ancestral schedulers. graph: capture and replay one CUDA graph per step (CUDA only). callback: as in
        Pipeline (costs a device-to-host copy per step). extra: the UNet's other per-row inputs that every step
        shares (SDXL's text_embeds/time_ids, timestep_cond), one row per UNet row like text_states. inpaint:
        sdrt.inpaint.InpaintRows.device_tables (`concat`, or `mask` and per-call `kept`).
        Returns the final latents, float32 on the device.
        """
        import torch

        if graph and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; this loop runs on {self.device}")
        if sched.needs_noise and step_noise is None:
            raise ValueError(f"{sched.name} adds fresh noise each step; pass step_noise from draw_step_noise")
        guided = guidance_scale is not None
        on_device = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        with on_device, torch.inference_mode():
            latents = torch.as_tensor(latents, device=self.device, dtype=torch.float32)
            text = torch.as_tensor(text_states, device=self.device).to(self.dtype)
            if text.shape[0] != latents.shape[0] * (2 if guided else 1):
                raise ValueError(f"text states for batch {text.shape[0]} do not fit latents of batch {latents.shape[0]}")
            extra = {name: torch.as_tensor(value, device=self.device).to(self.dtype) for name, value in (extra or {}).items()}
            for name, value in extra.items():
                if value.shape[0] != text.shape[0]:
                    raise ValueError(f"{name} has {value.shape[0]} rows; the UNet runs {text.shape[0]} (one per text state)")
            table = torch.as_tensor(step_table(sched, guidance_scale), device=self.device)
            noise = None if step_noise is None else torch.as_tensor(step_noise, device=self.device, dtype=torch.float32)
            # concat feeds the UNet (its dtype); mask and kept meet the float32 latents
            inpaint = {name: torch.as_tensor(value, device=self.device).to(self.dtype if name == "concat" else torch.float32)
                       for name, value in (inpaint or {}).items()}
            kept = inpaint.pop("kept", None)  # one slice per call, copied in before each step like the noise
            if kept is not None:
                if tuple(kept.shape) != (sched.num_calls, *latents.shape):
                    raise ValueError(f"inpainting's kept latents are {tuple(kept.shape)}; the loop needs "
                                     f"{(sched.num_calls, *latents.shape)} (one per call)")
                inpaint["kept"] = kept[0]
            extra_shapes = tuple((name, tuple(value.shape)) for name, value in sorted(extra.items()))
            inpaint_shapes = tuple((name, tuple(value.shape)) for name, value in sorted(inpaint.items()))
            step = self._step(sched, tuple(latents.shape), tuple(text.shape), guided, graph, extra_shapes, inpaint_shapes)
            step.sched = step.sched if graph else sched  # a captured graph already holds its scheduler's ops
            first_noise = None if noise is None else noise[0]
            step.load(latents, text, table[0], first_noise, extra, inpaint)
            if graph and step.graph is None:
                step.capture(*self._graph_resources())
                step.load(latents, text, table[0], first_noise, extra, inpaint)
            for i in tqdm(range(sched.num_calls), desc="denoising", disable=not progress, leave=False):
                step.row.copy_(table[i])
                if noise is not None:
                    step.noise.copy_(noise[i])
                if kept is not None:
                    step.inpaint["kept"].copy_(kept[i])
                step.graph.replay() if graph else step()
                if callback is not None and callback(i, float(sched.timesteps[i]), step.x.cpu().numpy()) is False:
                    raise Cancelled(f"cancelled by the step callback after step {i + 1} of {sched.num_calls}")
            self.runs += 1
            return step.x.clone()

    def _step(self, sched, x_shape, text_shape, guided, graph, extra_shapes=(), inpaint_shapes=()) -> _Step:
        # The captured ops depend on the scheduler's class and config (DDIM's clip_sample, for one), not its tables.
        key = (type(sched).__name__, repr(sorted(sched.config.items())), x_shape, text_shape, guided, graph, extra_shapes,
               inpaint_shapes)
        if key in self._steps:
            self._steps.move_to_end(key)
            return self._steps[key]
        while len(self._steps) >= self.max_steps:
            self._steps.popitem(last=False)  # its graph and buffers go; their pool memory serves the next capture
        self._steps[key] = step = _Step(self.unet, sched, x_shape, text_shape, guided, self.device, self.dtype, extra_shapes,
                                        inpaint_shapes)
        return step
