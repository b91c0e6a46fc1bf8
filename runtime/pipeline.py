"""The Stable Diffusion pipeline: prompt in, image out, with the denoising loop in plain sight.

`Pipeline.__call__` is the whole algorithm, top to bottom: check inputs, encode prompts, make the
initial latents (noise, or a noised image for img2img), run the loop (one batched UNet call for
[uncond, cond], the guidance combine, the scheduler step), decode. Backends only run networks.
"""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from sdrt import __version__
from sdrt.contracts import TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER
from sdrt.device_loop import draw_step_noise
from sdrt.errors import BackendError, Cancelled, InputError
from sdrt.images import decoded_to_uint8, image_to_array, load_image
from sdrt.model.facts import check_size
from sdrt.model.source import ModelSource, open_model
from sdrt.noise import TorchCPUGenerator
from sdrt.schedulers import make_scheduler
from sdrt.adapters.textual_inversion import expand_prompt
from sdrt.tokenizer import ClipTokenizer



@dataclasses.dataclass
class PipelineOutput:
    images: list  # PIL images, or a uint8 array [B, H, W, 3] for output_type="np", or latents for "latent"
    seeds: list[int]  # image k alone is reproduced by seed seeds[k]
    parameters: list[dict]  # what made each image (also written into PNG metadata)
    timings: dict  # seconds per stage: text, loop, decode, total


class Pipeline:
    """Stable Diffusion 1.x/2.x text-to-image and image-to-image over any sdrt backend."""

    def __init__(self, source: ModelSource, backend, tokenizer: ClipTokenizer, token_table: np.ndarray):
        self.source = source
        self.facts = source.facts
        self.backend = backend
        self.tokenizer = tokenizer
        self.token_table = token_table  # [vocab (+ textual-inversion rows), hidden], owned by the runtime
        self.textual_inversions: dict[str, list[str]] = {}
        self.loras: list[dict] = []  # LoRAs fused into the PyTorch backend's networks: {"file", "sha256", "scale"}

    @classmethod
    def from_pretrained(cls, model: str | Path | None = None, backend: str = "auto", **backend_options) -> "Pipeline":
        """Load a diffusers-format folder or an sdrt export (None: the built-in digits model)."""
        if model is None:
            from sdrt.builtin import builtin_model_dir

            model = builtin_model_dir()
        source = open_model(model)
        backend_impl = source.create_backend(backend, **backend_options)
        return cls(source, backend_impl, ClipTokenizer.from_folder(source.tokenizer_dir), source.load_token_embeddings())

    @classmethod
    def from_single_file(cls, path: str | Path, backend: str = "torch", cache_dir=None, allow_pickle: bool = False,
                         **options) -> "Pipeline":
        """Load an original-layout SD 1.x/2.x checkpoint (.safetensors; .ckpt with allow_pickle=True, which unpickles):
        converted once to a diffusers folder in the cache (needs torch + diffusers), then run on the PyTorch backend."""
        from sdrt.export.single_file import cached_conversion  # torch-only path, imported lazily

        folder = cached_conversion(path, cache_dir=cache_dir, allow_pickle=allow_pickle,
                                   **{k: options.pop(k) for k in ("image_size", "prediction_type", "config") if k in options})
        return cls.from_pretrained(folder, backend=backend, **options)

    # --- customisation: textual inversion (any backend), LoRA (fused; PyTorch backend) --------------------------

    def load_textual_inversion(self, path_or_dict, token: str | None = None) -> list[str]:
        """Load a diffusers or A1111 embedding (file, folder or {token: vectors}); returns the tokens it added."""
        from sdrt.adapters import textual_inversion as ti

        token, vectors, name = ti.read_embedding(path_or_dict, token, width=self.token_table.shape[1])
        self.token_table = ti.add_embedding(self.tokenizer, self.token_table, self.textual_inversions, token, vectors, name)
        return self.textual_inversions[token]

    def unload_textual_inversion(self, token: str | None = None) -> None:
        """Remove one loaded embedding (by its token), or all of them."""
        from sdrt.adapters.textual_inversion import remove_embedding

        self.token_table = remove_embedding(self.tokenizer, self.token_table, self.textual_inversions, token)

    def load_lora(self, path, scale: float = 1.0) -> None:
        """Fuse a LoRA (kohya or diffusers layout) into the PyTorch backend's UNet and text encoder at `scale`.
        Exports fuse LoRAs when exporting: `sdrt export MODEL OUT --lora FILE:SCALE`."""
        from sdrt.adapters.lora import fuse_lora_into_backend

        self.loras.append(fuse_lora_into_backend(self.backend, path, scale))

    # --- the steps of the algorithm --------------------------------------------------------------------------

    def encode_prompts(self, prompts: list[str]) -> np.ndarray:
        """Prompts -> text-encoder hidden states [len(prompts), seq, hidden]; the runtime looks up the embeddings."""
        ids = self.tokenizer([expand_prompt(p, self.tokenizer, self.textual_inversions) for p in prompts])
        embeds = self.token_table[ids]
        return self.backend.run(TEXT_ENCODER, {"inputs_embeds": embeds})["last_hidden_state"]

    def encode_image(self, pixels: np.ndarray, generators: list[TorchCPUGenerator]) -> np.ndarray:
        """Image [1, 3, H, W] -> scaled latents per image, sampling the posterior with each image's generator."""
        out = self.backend.run(VAE_ENCODER, {"image": pixels})
        mean, std = out["mean"], np.exp(0.5 * out["logvar"])
        samples = [mean + std * g.randn(mean.shape) for g in generators]  # diffusers samples, never takes the mean
        return np.concatenate(samples).astype(np.float32) * np.float32(self.facts.scaling_factor)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        decoded = self.backend.run(VAE_DECODER, {"latent": latents})["image"]
        if not np.all(np.isfinite(decoded)):
            raise BackendError(
                f"the VAE decoder on the {self.backend.name} backend produced NaN/inf"
                + (" (the latents were already NaN: the UNet produced them)" if not np.all(np.isfinite(latents)) else "")
                + "; with an fp16 export, re-export with more ops kept in fp32 or use fp32"
            )
        return decoded

    # --- the loop --------------------------------------------------------------------------------------------

    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 30,
        guidance_scale: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        seed: int | None = None,
        scheduler: str | None = None,
        image=None,
        strength: float = 0.8,
        num_images_per_prompt: int = 1,
        latents: np.ndarray | None = None,
        callback: Callable[[int, float, np.ndarray], bool | None] | None = None,
        output_type: str = "pil",
        progress: bool = True,
    ) -> PipelineOutput:
        t_start = time.perf_counter()
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = self._negative_prompts(negative_prompt, len(prompts))
        init_image = load_image(image) if image is not None else None
        height, width = self._size(height, width, init_image)
        self._check(prompts, num_inference_steps, guidance_scale, strength, num_images_per_prompt, output_type, height, width)
        batch = len(prompts) * num_images_per_prompt
        c = self.facts.latent_channels
        latent_shape = (1, c, height // self.facts.vae_scale_factor, width // self.facts.vae_scale_factor)
        if latents is not None and tuple(latents.shape) != (batch,) + latent_shape[1:]:
            raise InputError(f"latents have shape {tuple(latents.shape)}; expected {(batch,) + latent_shape[1:]}")

        # One generator per image, seeded seed+k: image k alone is reproduced by its own seed
        # (diffusers' equivalent is generator=[torch.Generator().manual_seed(seed + k) for k in range(batch)]).
        if seed is None:
            seed = random.randrange(2**31)
        seeds = [seed + k for k in range(batch)]
        generators = [TorchCPUGenerator(s) for s in seeds]

        sched = make_scheduler(scheduler, self.source.scheduler_config)
        sched.set_timesteps(num_inference_steps, strength if init_image is not None else 1.0)
        do_guidance = guidance_scale > 1.0

        # 1. Text: [uncond, cond] hidden states, each prompt repeated for its images.
        t0 = time.perf_counter()
        cond = np.repeat(self.encode_prompts(prompts), num_images_per_prompt, axis=0)
        if do_guidance:
            uncond = np.repeat(self.encode_prompts(negatives), num_images_per_prompt, axis=0)
            text_states = np.concatenate([uncond, cond])
        else:
            text_states = cond
        t_text = time.perf_counter() - t0

        # 2. Initial latents: pure noise, or the encoded image noised to the first timestep of the truncated schedule.
        if init_image is not None:
            pixels = image_to_array(init_image, width, height)
            image_latents = self.encode_image(pixels, generators)
            noise = latents if latents is not None else np.concatenate([g.randn(latent_shape) for g in generators])
            x = sched.add_noise(image_latents, noise.astype(np.float32), 0)
        else:
            noise = latents if latents is not None else np.concatenate([g.randn(latent_shape) for g in generators])
            x = noise.astype(np.float32) * np.float32(sched.init_noise_sigma)

        # 3. The denoising loop: one batched UNet call per step, guidance, scheduler step.
        #    A backend that can keeps the whole loop on its device (the same steps: sdrt.device_loop).
        t0 = time.perf_counter()
        if getattr(self.backend, "use_device_loop", False):
            step_noise = draw_step_noise(generators, sched, latent_shape)  # after the initial latents, as below
            gs = guidance_scale if do_guidance else None
            x = self.backend.denoise(sched, x, text_states, gs, step_noise, callback, progress)
        else:
            for i in tqdm(range(sched.num_calls), desc="denoising", disable=not progress, leave=False):
                x_in = sched.scale_model_input(x, i)
                unet_in = np.concatenate([x_in, x_in]) if do_guidance else x_in
                timestep = np.full((unet_in.shape[0],), sched.timesteps[i], dtype=np.float32)
                pred = self.backend.run(UNET, {"sample": unet_in, "timestep": timestep, "encoder_hidden_states": text_states})
                pred = pred["out_sample"]
                if do_guidance:
                    pred_uncond, pred_cond = pred[:batch], pred[batch:]
                    pred = pred_uncond + np.float32(guidance_scale) * (pred_cond - pred_uncond)
                step_noise = np.concatenate([g.randn(latent_shape) for g in generators]) if sched.needs_noise else None
                x = sched.step(pred, i, x, step_noise)
                if callback is not None and callback(i, float(sched.timesteps[i]), x) is False:
                    raise Cancelled(f"cancelled by the step callback after step {i + 1} of {sched.num_calls}")
        t_loop = time.perf_counter() - t0

        # 4. Decode with the model's own scaling factor (inside the decoder network, per the contract).
        t0 = time.perf_counter()
        params = [
            self._parameters(p, n, seeds[k], num_inference_steps, guidance_scale, height, width, sched, init_image, strength)
            for k, (p, n) in enumerate(self._per_image(prompts, negatives, num_images_per_prompt))
        ]
        if output_type == "latent":
            images = x
        else:
            pixels = decoded_to_uint8(self.decode(x))
            if pixels.max() == 0:
                raise BackendError(f"the {self.backend.name} backend decoded an all-black image; with an fp16 export, try fp32")
            images = pixels if output_type == "np" else [Image.fromarray(p) for p in pixels]
        t_decode = time.perf_counter() - t0
        timings = {"text": t_text, "loop": t_loop, "decode": t_decode, "total": time.perf_counter() - t_start}
        return PipelineOutput(images, seeds, params, timings)

    # --- input handling --------------------------------------------------------------------------------------

    @staticmethod
    def _negative_prompts(negative_prompt, n: int) -> list[str]:
        if negative_prompt is None:
            return [""] * n
        if isinstance(negative_prompt, str):
            return [negative_prompt] * n
        negatives = list(negative_prompt)
        if len(negatives) != n:
            raise InputError(f"{len(negatives)} negative prompts for {n} prompts; pass one per prompt, or one string")
        return negatives

    @staticmethod
    def _per_image(prompts, negatives, per_prompt):
        for p, n in zip(prompts, negatives):
            for _ in range(per_prompt):
                yield p, n

    def _size(self, height, width, init_image) -> tuple[int, int]:
        step = self.facts.size_step
        if init_image is not None:  # default to the image's own size, rounded down to the size step
            w, h = init_image.size
            height = height if height is not None else max(step, h // step * step)
            width = width if width is not None else max(step, w // step * step)
        height = self.facts.default_size if height is None else height
        width = self.facts.default_size if width is None else width
        return height, width

    def _check(self, prompts, steps, guidance, strength, per_prompt, output_type, height, width) -> None:
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise InputError(f"prompt must be a string or a non-empty list of strings, not {prompts!r}")
        if not isinstance(steps, int) or steps < 1:
            raise InputError(f"num_inference_steps {steps!r} must be an integer >= 1")
        if guidance < 0:
            raise InputError(f"guidance_scale {guidance} is negative; use 0-1 for no guidance, or e.g. 7.5")
        if not 0.0 < strength <= 1.0:
            raise InputError(f"strength {strength} is outside (0, 1]; 0.3 keeps most of the image, 1.0 replaces it")
        if not isinstance(per_prompt, int) or per_prompt < 1:
            raise InputError(f"num_images_per_prompt {per_prompt!r} must be an integer >= 1")
        if output_type not in ("pil", "np", "latent"):
            raise InputError(f"output_type {output_type!r} is not one of 'pil', 'np', 'latent'")
        check_size(self.facts, height, width)

    def _parameters(self, prompt, negative, seed, steps, guidance, height, width, sched, init_image, strength) -> dict:
        return {
            "prompt": prompt,
            "negative_prompt": negative,
            "steps": steps,
            "guidance_scale": guidance,
            "seed": seed,
            "width": width,
            "height": height,
            "scheduler": sched.name,
            "img2img": init_image is not None,
            "strength": strength if init_image is not None else None,
            "model": self.source.path.name,
            "backend": self.backend.name,
            "sdrt_version": __version__,
        }
