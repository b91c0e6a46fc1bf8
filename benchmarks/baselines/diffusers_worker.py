"""Baseline: diffusers' StableDiffusionPipeline (PyTorch), the pipeline most users start from; for an SDXL folder
StableDiffusionXLPipeline (invisible watermark off: it is not a network, and sdrt has none).

Stages are timed by wrapping the pipeline's own components (text_encoder(_2).forward, unet.forward, vae.decode)
and marking each step's end with callback_on_step_end; nothing in diffusers' loop is changed. See common.py
for the protocol. Runs in any environment with torch + diffusers + transformers (sdrt's own venv too).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


class DiffusersRunner:
    name = "diffusers"
    packages = ("torch", "diffusers", "transformers", "numpy")

    def __init__(self):
        self.pipe = None
        self.calls = common.Calls()
        self.step_ends: list[float] = []

    def prepare(self, config: dict) -> dict:
        return {}  # runs the diffusers folder as it is

    def create(self, config: dict):
        """The pipeline, loaded as its users load it; returns (pipeline, one line describing it)."""
        import torch
        import diffusers

        torch.set_num_threads(common.threads_of(config))
        dtype = torch.float16 if config.get("precision") == "fp16" else torch.float32
        if common.is_sdxl(config):
            cls, extra = diffusers.StableDiffusionXLPipeline, {"add_watermarker": False}
        else:
            cls, extra = diffusers.StableDiffusionPipeline, {"safety_checker": None, "requires_safety_checker": False}
        pipe = cls.from_pretrained(config["model"], torch_dtype=dtype, **extra)
        pipe = pipe.to(config.get("device") or "cpu")
        attention = type(next(iter(pipe.unet.attn_processors.values()))).__name__
        return pipe, (f"diffusers {cls.__name__}, torch {torch.__version__} on {pipe.device} "
                      f"({'fp16' if dtype == torch.float16 else 'fp32'}, {torch.get_num_threads()} threads, {attention})")

    def load(self, config: dict) -> dict:
        import torch

        self.config = config
        t0 = time.perf_counter()
        pipe, describe = self.create(config)
        pipe.set_progress_bar_config(disable=True)
        common.cuda_sync()
        load_s = time.perf_counter() - t0
        # Every stage is timed at the pipeline's own component calls; diffusers' loop stays as it is.
        for encoder in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
            if encoder is not None:
                encoder.forward = self.calls.wrap("text", encoder.forward)
        pipe.unet.forward = self.calls.wrap("unet", pipe.unet.forward)
        pipe.vae.decode = self.calls.wrap("decode", pipe.vae.decode)
        self.pipe = pipe
        self.device = config.get("device") or "cpu"
        self.dtype = torch.float16 if config.get("precision") == "fp16" else torch.float32
        return {
            "load_s": load_s,
            "peak_rss_bytes": common.peak_rss_bytes(),
            "versions": common.versions(*self.packages),
            "describe": describe,
            "scheduler": type(pipe.scheduler).__name__,
        }

    def _step_end(self, pipe, i, t, kwargs):
        common.cuda_sync()
        self.step_ends.append(time.perf_counter())
        return kwargs

    def run(self, batch: int, seed: int) -> dict:
        import torch

        c = self.config
        self.calls.clear()
        self.step_ends = []
        generators = [torch.Generator().manual_seed(seed + k) for k in range(batch)]

        def call():
            t0 = time.perf_counter()
            images = self.pipe(
                common.PROMPT, height=c["size"], width=c["size"], num_inference_steps=c["steps"],
                guidance_scale=c.get("guidance", 7.5), num_images_per_prompt=batch, generator=generators,
                output_type="pil", callback_on_step_end=self._step_end,
            ).images  # fmt: skip
            common.cuda_sync()
            assert len(images) == batch
            return time.perf_counter() - t0

        e2e_s, memory = common.memory_sample(call)
        loop_s = self.step_ends[-1] - self.calls.first_start("unet")
        return common.sample(self.calls, e2e_s, loop_s, steps=len(self.step_ends), **memory)

    def vae_encode(self, batch: int, seed: int) -> float:
        import torch

        size = self.config["size"]
        image = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
        image = image.to(self.device, self.dtype)
        with torch.no_grad():
            common.cuda_sync()
            t0 = time.perf_counter()
            self.pipe.vae.encode(image)  # the network only: sampling the posterior is a few element-wise ops
            common.cuda_sync()
            return time.perf_counter() - t0

    def close(self) -> None:
        self.pipe = None


if __name__ == "__main__":
    sys.exit(common.serve(DiffusersRunner()))
