"""The Stable Diffusion pipeline: prompt in, image out, with the denoising loop in plain sight.

`Pipeline.__call__` is the whole algorithm, top to bottom, as five steps that are also methods of their own:
`plan` (check every input, resolve defaults and seeds), `encode_text`, `prepare_latents` (noise, or a noised
image for img2img), `denoise` (one batched UNet call for [uncond, cond], the guidance combine, the scheduler
step) and `finish` (decode). A server's batcher runs the same steps over several requests' plans at once.
Backends only run networks (or, when they declare it, the whole loop on their device).
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

from sdrt.contracts import TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER
from sdrt.device_loop import draw_step_noise
from sdrt.errors import BackendError, InputError
from sdrt.conditioning import gather_rows, text_rows
from sdrt.generation import Batch, GenerationPlan, guidance_scale_embedding, stack_plans
from sdrt import inputs
from sdrt.images import decoded_to_uint8, image_to_array
from sdrt.inpaint import InpaintRows, fill_latents, latent_mask, masked_pixels, paste_back, plan_mask
from sdrt.memory import image_pixel_limit
from sdrt.model.source import ModelSource, open_model
from sdrt.noise import TorchCPUGenerator
from sdrt.observers import Observer, StepCallback, wants_timing
from sdrt.schedulers import make_scheduler
from sdrt.tokenizer import ClipTokenizer



@dataclasses.dataclass
class PipelineOutput:
    images: list  # PIL images, or a uint8 array [B, H, W, 3] for output_type="np", or latents for "latent"
    seeds: list[int]  # image k alone is reproduced by seed seeds[k]
    parameters: list[dict]  # what made each image (also written into PNG metadata)
    timings: dict  # seconds per stage: text, loop, decode, total


class Pipeline:
    """Stable Diffusion 1.x/2.x and SDXL (base and refiner) text-to-image and image-to-image over any sdrt backend."""

    def __init__(self, source: ModelSource, backend, tokenizer: ClipTokenizer, token_table: np.ndarray):
        self.source = source
        self.facts = source.facts
        self.backend = backend
        self.tokenizer = tokenizer
        self.token_table = token_table  # [vocab (+ textual-inversion rows), hidden], owned by the runtime
        self.more_text_encoders: list = []  # SDXL's second encoder: [(network, ClipTokenizer, token table)]
        self.textual_inversions: dict[str, list[str]] = {}
        self.loras: list[dict] = []  # LoRAs fused into the PyTorch backend's networks: {"file", "sha256", "scale"}
        self.registered_loras: dict = {}  # name -> sdrt.adapters.lora_switch.RegisteredLora (run-time, any backend)
        self.active_loras: tuple | None = ()  # ((name, scale), ...) whose factors the backend holds now; None: to re-feed
        self.max_memory = None  # memory budget of every call (sdrt.memory.parse_memory); None: what is available

    @classmethod
    def from_pretrained(cls, model: str | Path | None = None, backend: str = "auto", max_memory=None,
                        **backend_options) -> "Pipeline":
        """Load a diffusers-format folder or an sdrt export (None: the built-in digits model). max_memory: the
        budget each call is checked against (see plan)."""
        if model is None:
            from sdrt.builtin import builtin_model_dir

            model = builtin_model_dir()
        source = open_model(model)
        from sdrt.memory import parse_memory

        parse_memory(max_memory)  # a bad budget fails before loading
        backend_impl = source.create_backend(backend, **backend_options)
        (network, tokenizer, table), *more = source.text_encoders()
        pipe = cls(source, backend_impl, ClipTokenizer.from_folder(tokenizer), source.load_token_embeddings(table))
        pipe.text_network = network
        pipe.more_text_encoders = [(n, ClipTokenizer.from_folder(t), source.load_token_embeddings(f)) for n, t, f in more]
        pipe.max_memory = max_memory
        return pipe

    text_network = TEXT_ENCODER  # the network of `tokenizer` and `token_table` (SDXL's refiner: text_encoder_2)

    @property
    def text_encoders(self) -> list:
        """(network, tokenizer, token table) of every text encoder, in the order their states are concatenated."""
        return [(self.text_network, self.tokenizer, self.token_table)] + list(self.more_text_encoders)

    @property
    def is_sdxl(self) -> bool:
        return bool(self.facts.time_ids_dim)

    @property
    def family(self):
        """The model's FamilySpec: what its UNet is conditioned on (sdrt.conditioning) and how."""
        from sdrt.families import family_spec

        return family_spec(self.facts.family)

    @classmethod
    def from_single_file(cls, path: str | Path, backend: str = "torch", cache_dir=None, allow_pickle: bool = False,
                         **options) -> "Pipeline":
        """Load an original-layout SD 1.x/2.x or SDXL (SGM) checkpoint (.safetensors; .ckpt with allow_pickle=True,
        which unpickles): converted once to a diffusers folder in the cache (needs torch + diffusers), then run on the
        PyTorch backend."""
        from sdrt.export.single_file import cached_conversion  # torch-only path, imported lazily

        folder = cached_conversion(path, cache_dir=cache_dir, allow_pickle=allow_pickle,
                                   **{k: options.pop(k) for k in ("image_size", "prediction_type", "config") if k in options})
        return cls.from_pretrained(folder, backend=backend, **options)

    # --- customisation: textual inversion (any backend), LoRA (fused; PyTorch backend) --------------------------

    def load_textual_inversion(self, path_or_dict, token: str | None = None) -> list[str]:
        """Load a diffusers or A1111 embedding (file, folder or {token: vectors}); SDXL: clip_l/clip_g embeddings
        (token default: the file's stem). Returns the tokens it added."""
        from sdrt.adapters import textual_inversion as ti

        if self.is_sdxl:
            widths = {network: table.shape[1] for network, _, table in self.text_encoders}
            token, vectors, name = ti.read_sdxl_embedding(path_or_dict, token, widths)
            ti.add_to_encoders(self, token, vectors, name)
            return self.textual_inversions[token]
        token, vectors, name = ti.read_embedding(path_or_dict, token, width=self.token_table.shape[1])
        self.token_table = ti.add_embedding(self.tokenizer, self.token_table, self.textual_inversions, token, vectors, name)
        return self.textual_inversions[token]

    def unload_textual_inversion(self, token: str | None = None) -> None:
        """Remove one loaded embedding (by its token), or all of them."""
        from sdrt.adapters.textual_inversion import remove_embedding, remove_from_encoders

        if self.more_text_encoders:
            return remove_from_encoders(self, token)
        self.token_table = remove_embedding(self.tokenizer, self.token_table, self.textual_inversions, token)

    def load_lora(self, path, scale: float = 1.0) -> None:
        """Fuse a LoRA (kohya or diffusers layout; SDXL: kohya's lora_te1_/lora_te2_/lora_unet_ in the original UNet
        layout too) into the PyTorch backend's UNet and text encoder(s) at `scale`.
        Exports fuse LoRAs when exporting: `sdrt export MODEL OUT --lora FILE:SCALE`."""
        from sdrt.adapters.lora import fuse_lora_into_backend

        self.loras.append(fuse_lora_into_backend(self.backend, path, scale))

    def register_lora(self, path, name: str | None = None, max_rank: int | None = None) -> str:
        """Read a LoRA file (kohya incl. LoCon, diffusers/PEFT, older diffusers, LyCORIS LoHa/LoKr) once and keep its
        low-rank factors for run-time use: `pipe(prompt, loras={name: scale})` on any backend whose UNet and text
        encoder have LoRA slots (the PyTorch backend always; exports made with `--lora-slots`). The weights are
        never changed, so switching LoRAs or dropping them leaves no trace. Returns the name (default: the file's
        stem). A LoRA for another model is refused here, naming a layer."""
        from sdrt.adapters.lora_switch import register

        return register(self, path, name, max_rank)

    def unregister_lora(self, name: str) -> None:
        from sdrt.adapters.lora_switch import unregister

        unregister(self, name)

    # --- the steps of the algorithm (each usable alone: the server's batcher, the bench and tests call them) ---

    def plan(
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
        output_type: str = "pil",
        max_memory=None,
        loras=None,
        mask_image=None,
        mask_blur: int = 0,
        keep_unmasked: bool = False,
        masked_content: str = "original",
        timestep_spacing: str | None = None,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        **micro,
    ) -> GenerationPlan:
        """0. Check every argument and resolve every default (size, seeds, scheduler); no network runs, nothing big is
        allocated (sdrt.inputs). max_memory: the budget the request must fit (None: from_pretrained's, else what is
        available; "8G" or bytes; 0/False: no check). loras: {name or file: scale} (or [(name, scale)]) run-time
        LoRAs for this request: registered names, or files (registered on first use); part of the batch key.
        mask_image: inpaint `image` (white = repaint; see sdrt.inpaint for how masks are read); mask_blur: pixels of
        Gaussian blur on the mask (soft paste-back edge); keep_unmasked: paste the result back into the image;
        masked_content: what the repainted region starts from at strength < 1 ("original", "latent_noise",
        "latent_nothing": A1111's masked content 1/2/3; sdrt.inpaint.fill_latents).
        timestep_spacing: "leading", "linspace" or "trailing" instead of the model's scheduler config's (None: the
        config's); "trailing" is what few-step models (SD-Turbo, LCM) want at 1-4 steps.
        SDXL: denoising_end stops at that fraction of the schedule (a base handing over to a refiner, with
        output_type="latent"); denoising_start starts there from `image` given as those latents (the refiner's
        part; strength is then unused); `micro` takes SDXL's micro-conditioning (sdrt.sdxl.MICRO_ARGS)."""
        from sdrt.adapters.lora_switch import resolve_loras
        from sdrt import sdxl

        micro = sdxl.check_micro(self.facts, micro)
        if mask_image is not None and (denoising_start is not None or denoising_end is not None):
            raise InputError("mask_image with denoising_start/denoising_end (an inpainting hand-over between SDXL base and "
                             "refiner) is not supported yet; inpaint with one model, or drop mask_image")
        loras = resolve_loras(self, loras)
        prompts = inputs.check_prompts(prompt)
        negatives = inputs.check_negatives(negative_prompt, len(prompts))
        guidance_scale = inputs.check_guidance(guidance_scale)
        strength = inputs.check_strength(strength)
        num_images_per_prompt = inputs.check_count(num_images_per_prompt, "num_images_per_prompt")
        batch = len(prompts) * num_images_per_prompt
        seed = inputs.check_seed(seed, batch)
        output_type = inputs.check_output_type(output_type)
        budget = self.max_memory if max_memory is None else max_memory
        init_latents = None
        if denoising_start is not None:  # the hand-over: `image` holds the base's latents
            init_latents, image = sdxl.handed_over_latents(self.facts, image, batch, denoising_start), None
            height = height or init_latents.shape[2] * self.facts.vae_scale_factor
            width = width or init_latents.shape[3] * self.facts.vae_scale_factor
        max_pixels = image_pixel_limit(budget)  # init image and mask alike
        init_image = inputs.check_image(image, max_pixels=max_pixels)
        height, width = inputs.check_size(self.facts, height, width, init_image.size if init_image is not None else None)
        if init_latents is not None and init_latents.shape[2:] != self._latent_shape(height, width)[2:]:
            raise InputError(f"the handed-over latents {init_latents.shape} do not match height {height} and width {width}")
        mask = plan_mask(self.facts, self.source.path.name, init_image, mask_image, mask_blur, keep_unmasked, masked_content,
                         width, height, max_pixels)
        latents = inputs.check_latents(latents, (batch,) + self._latent_shape(height, width)[1:])
        # an unknown name or spacing fails here, not after the text
        sched = make_scheduler(scheduler, self.source.scheduler_config, timestep_spacing)
        num_inference_steps = inputs.check_steps(num_inference_steps, sched, strength if init_image is not None else 1.0)
        if denoising_start is not None or denoising_end is not None:
            if not self.is_sdxl:
                raise InputError("denoising_start/denoising_end hand latents between SDXL base and refiner; this is a "
                                 f"{self.facts.family} model")
            sched.set_timesteps(num_inference_steps, 1.0, denoising_start, denoising_end)  # a window with no step fails here
        cfg = not self.facts.time_cond_proj_dim  # an LCM-distilled UNet takes guidance as an embedding, not a batch
        if not cfg and any(negatives):
            raise InputError("negative_prompt: this LCM-distilled UNet takes the guidance scale as an embedding and "
                                    "runs no unconditional pass, so a negative prompt has no effect; leave it empty")
        guided, img2img = cfg and guidance_scale > 1.0, init_image is not None
        inputs.check_export_limits(self.backend, self.facts, batch, height, width, guided, img2img)
        if self.backend.uses_host_memory:
            inputs.check_memory(self.source, self.backend.name, batch, height, width, guided, img2img, budget)
        # One generator per image, seeded seed+k: image k alone is reproduced by its own seed
        # (diffusers' equivalent is generator=[torch.Generator().manual_seed(seed + k) for k in range(batch)]).
        seed = random.randrange(2**31) if seed is None else seed
        per_image = [(p, n) for p, n in zip(prompts, negatives) for _ in range(num_images_per_prompt)]
        time_ids, negative_time_ids = self.family.time_ids(self.facts, height, width, img2img or init_latents is not None, micro)
        return GenerationPlan(
            prompts=[p for p, _ in per_image], negatives=[n for _, n in per_image], seeds=[seed + k for k in range(batch)],
            steps=num_inference_steps, guidance_scale=guidance_scale, height=height, width=width, scheduler=scheduler,
            init_image=init_image, strength=strength, latents=latents, output_type=output_type,
            loras=loras, mask=mask, cfg=cfg, timestep_spacing=timestep_spacing, time_ids=time_ids,
            negative_time_ids=negative_time_ids, zero_negatives=negative_prompt is None and self.facts.force_zeros_for_empty_prompt,
            denoising_start=denoising_start, denoising_end=denoising_end, init_latents=init_latents,
        )  # fmt: skip

    def encode_text(self, plans: list[GenerationPlan], observers=()) -> np.ndarray | dict:
        """1. Text-encoder states for every row of `plans`: [uncond rows; cond rows] when guided, else the cond rows.
        Each distinct text is encoded once (a prompt's images and a batch's empty negatives share it). A family whose
        UNet takes more text inputs (SDXL: text_embeds) gives a dict of them, in the same rows (sdrt.conditioning)."""
        stack_plans(plans)
        self.activate_loras(plans[0].loras)
        texts, rows = text_rows(plans)
        encoded = self.family.encode_texts(self, texts, observers)
        out = {name: gather_rows(values, rows) for name, values in encoded.items()}
        return out if len(out) > 1 else out["encoder_hidden_states"]

    def prepare_latents(self, plans: list[GenerationPlan], text_states: np.ndarray | dict, observers=()) -> Batch:
        """2. The scheduler and the initial latents: pure noise, or the encoded image noised to the first timestep
        of the truncated schedule (img2img), or (SDXL's refiner after a base) the handed-over latents as they are.
        Draws from each row's generator in diffusers' order."""
        stack_plans(plans)
        first = plans[0]
        img2img, inpaint = first.init_image is not None, first.mask is not None
        # The UNet's inputs beyond the text states: the family's other text rows and its rows not from text.
        added = dict(text_states) if isinstance(text_states, dict) else {"encoder_hidden_states": text_states}
        text_states = added.pop("encoder_hidden_states")
        added.update(self.family.added_rows(plans))
        sched = make_scheduler(first.scheduler, self.source.scheduler_config, first.timestep_spacing)
        sched.set_timesteps(first.steps, first.strength if img2img else 1.0, first.denoising_start, first.denoising_end)
        latent_shape = self._latent_shape(first.height, first.width)
        generators = [TorchCPUGenerator(s) for plan in plans for s in plan.seeds]
        conditioned = inpaint and self.facts.inpainting_unet  # the UNet takes the mask and the masked image
        pure_noise = inpaint and first.strength == 1.0  # diffusers' inpainting starts from noise alone at strength 1
        noise, image_latents, starts, masked_latents, masks = [], [], [], [], []
        row = 0
        scales = np.array([p.guidance_scale for p in plans for _ in range(p.batch)], np.float32)
        guidance = scales.reshape(-1, 1, 1, 1) if first.guided else None
        timestep_cond = None
        if self.facts.time_cond_proj_dim:  # LCM-distilled UNet: guidance goes in through its embedding
            timestep_cond = guidance_scale_embedding(scales, self.facts.time_cond_proj_dim)
        if first.init_latents is not None:  # diffusers adds no noise at a hand-over (and draws none)
            x = np.concatenate([plan.init_latents for plan in plans]).astype(np.float32)
            return Batch(plans, sched, generators, latent_shape, text_states, guidance, x, timestep_cond=timestep_cond,
                         added=added)
        for plan in plans:
            gens = generators[row : row + plan.batch]
            row += plan.batch
            pixels = image_to_array(plan.init_image, plan.width, plan.height) if img2img else None
            encoded = None
            if img2img and not (conditioned and pure_noise):  # the posterior is sampled before the noise is drawn
                encoded = self.encode_image(pixels, gens, observers)
                image_latents.append(encoded)
            noise.append(plan.latents if plan.latents is not None else np.concatenate([g.randn(latent_shape) for g in gens]))
            if inpaint:  # then the masked image's posterior: diffusers draws it for either kind of UNet
                masks.append(np.repeat(latent_mask(plan.mask.binary, *latent_shape[2:]), plan.batch, axis=0))
                if conditioned:
                    masked_latents.append(self.encode_image(masked_pixels(pixels, plan.mask.binary), gens, observers))
                else:  # unused by an ordinary UNet: only the draws, to keep each generator's stream in step
                    for g in gens:
                        g.randn(latent_shape)
            if encoded is not None:  # what the denoising starts from (inpainting: A1111's masked content)
                starts.append(fill_latents(encoded, masks[-1], noise[-1], plan.mask.content) if inpaint else encoded)
        noise = np.concatenate(noise).astype(np.float32)
        if pure_noise or not img2img:
            x = noise * np.float32(sched.init_noise_sigma)
        else:
            x = sched.add_noise(np.concatenate(starts), noise, 0)
        rows = None
        if inpaint:
            rows = InpaintRows(np.concatenate(masks), np.concatenate(masked_latents) if conditioned else None,
                               None if conditioned else np.concatenate(image_latents), None if conditioned else noise)
        return Batch(plans, sched, generators, latent_shape, text_states, guidance, x, inpaint=rows, timestep_cond=timestep_cond,
                     added=added)

    def denoise(self, batch: Batch, observers=(), progress: bool = False) -> np.ndarray:
        """3. The denoising loop: one batched UNet call per step ([uncond; cond] rows when guided), the guidance
        combine per row, the scheduler step. Inpainting adds the mask and masked-image latents to the UNet's input
        (inpainting UNets) or puts the kept region back after each step (ordinary UNets; sdrt.inpaint). A backend that
        declares a device loop runs these same steps on its device (sdrt.device_loop) when every row has the same
        guidance scale."""
        sched = batch.sched
        self.activate_loras(batch.plans[0].loras if batch.plans else ())
        if self.backend.use_device_loop and batch.step == 0 and (not batch.guided or batch.uniform_guidance() is not None):
            return self._denoise_on_device(batch, observers, progress)
        for i in tqdm(range(batch.step, sched.num_calls), desc="denoising", disable=not progress, leave=False):
            x_in = sched.scale_model_input(batch.x, i)
            unet_in = np.concatenate([x_in, x_in]) if batch.guided else x_in
            if batch.inpaint is not None:  # read each step: rows may leave the batch (Batch.drop)
                unet_in = batch.inpaint.unet_input(unet_in, batch.guided)
            timestep = np.full((unet_in.shape[0],), sched.timesteps[i], dtype=np.float32)
            feeds = {"sample": unet_in, "timestep": timestep, "encoder_hidden_states": batch.text_states, **batch.added}
            if batch.timestep_cond is not None:
                feeds["timestep_cond"] = batch.timestep_cond
            pred = self._run(UNET, feeds, observers)["out_sample"]
            if batch.guided:
                pred_uncond, pred_cond = pred[: batch.rows], pred[batch.rows :]
                pred = pred_uncond + batch.guidance * (pred_cond - pred_uncond)
            step_noise = np.concatenate([g.randn(batch.latent_shape) for g in batch.generators]) if sched.needs_noise else None
            batch.x = sched.step(pred, i, batch.x, step_noise)
            if batch.inpaint is not None:
                batch.x = batch.inpaint.blend(batch.x, sched, i)
            batch.step = i + 1
            for observer in observers:
                observer.on_step(batch, i)
            if batch.rows == 0:
                break
        return batch.x

    def decode(self, latents: np.ndarray, observers=()) -> np.ndarray:
        """4. Latents -> images in about [-1, 1], with the model's own scaling factor (inside the decoder network)."""
        from sdrt.diagnostics import nonfinite_error

        if not np.all(np.isfinite(latents)):  # the inputs were checked finite: the loop (UNet or scheduler) made it
            raise nonfinite_error(self, UNET, "the latents after the denoising loop")
        decoded = self._run(VAE_DECODER, {"latent": latents}, observers)["image"]
        if not np.all(np.isfinite(decoded)):
            raise nonfinite_error(self, VAE_DECODER, "the decoded image")
        return decoded

    def finish(self, batch: Batch, observers=()) -> list[PipelineOutput]:
        """4. Decode the batch and split it into one PipelineOutput per plan still in it."""
        t0 = time.perf_counter()
        outputs, row = [], 0
        decoded = None
        if any(p.output_type != "latent" for p in batch.plans) and batch.rows:
            pixels = decoded_to_uint8(self.decode(batch.x, observers))
            if pixels.max() == 0:
                from sdrt.diagnostics import precision_hint

                raise BackendError(f"the {self.backend.name} backend decoded an all-black image{precision_hint(self, VAE_DECODER)}")
            decoded = pixels
        for plan in batch.plans:
            rows = slice(row, row + plan.batch)
            row += plan.batch
            if plan.output_type == "latent":
                images = batch.x[rows]
            else:
                pixels = decoded[rows]
                if plan.mask is not None and plan.mask.keep_unmasked:
                    pixels = paste_back(pixels, plan.init_image, plan.mask)
                images = pixels if plan.output_type == "np" else [Image.fromarray(p) for p in pixels]
            params = [plan.parameters(k, batch.sched.name, self.source.path.name, self.backend.name) for k in range(plan.batch)]
            outputs.append(PipelineOutput(images, list(plan.seeds), params, dict(batch.timings)))
        t_decode = time.perf_counter() - t0
        for out in outputs:
            out.timings["decode"] = t_decode
        return outputs

    # --- the loop, top to bottom -----------------------------------------------------------------------------

    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        *,
        callback: Callable[[int, float, np.ndarray], bool | None] | None = None,
        progress: bool = True,
        observers=(),
        refiner: "Pipeline | None" = None,
        refiner_start: float = 0.8,
        **request,
    ) -> PipelineOutput:
        """Make images. `request` takes `plan`'s arguments (num_inference_steps, guidance_scale, height, width, seed,
        scheduler, image, strength, num_images_per_prompt, latents, output_type, loras, mask_image, mask_blur,
        keep_unmasked, timestep_spacing; SDXL: denoising_start/end and the micro-conditioning). callback(step, timestep, latents)
        returning False cancels; observers see every network call and step (sdrt.observers). refiner: an SDXL
        refiner pipeline that takes over the latents at `refiner_start` of the schedule (diffusers' ensemble of
        experts: this pipeline runs with denoising_end=refiner_start, the refiner with denoising_start=refiner_start,
        same prompts, steps and seeds)."""
        if refiner is not None:
            from sdrt.sdxl import with_refiner

            return with_refiner(self, refiner, refiner_start, prompt, negative_prompt, callback=callback,
                                progress=progress, observers=observers, **request)
        t_start = time.perf_counter()
        observers = list(observers) + ([StepCallback(callback)] if callback is not None else [])
        # 0. Check everything before any network runs.
        plan = self.plan(prompt, negative_prompt, **request)
        # 1. Text: [uncond, cond] hidden states, one row per image.
        t0 = time.perf_counter()
        text_states = self.encode_text([plan], observers)
        t_text = time.perf_counter() - t0
        # 2. Initial latents: noise, or the encoded image noised to the schedule's first timestep.
        batch = self.prepare_latents([plan], text_states, observers)
        # 3. The denoising loop.
        t0 = time.perf_counter()
        self.denoise(batch, observers, progress)
        batch.timings.update(text=t_text, loop=time.perf_counter() - t0)
        # 4. Decode.
        out = self.finish(batch, observers)[0]
        out.timings["total"] = time.perf_counter() - t_start
        return out

    def activate_loras(self, loras: tuple) -> None:
        """Give the backend the factors of `loras` ((name, scale), ...): a no-op when they are already active."""
        if tuple(loras) != self.active_loras:
            from sdrt.adapters.lora_switch import activate

            activate(self, tuple(loras))

    # --- running networks ------------------------------------------------------------------------------------

    def encode_prompts(self, prompts: list[str], observers=()) -> np.ndarray:
        """Prompts -> text-encoder hidden states [len(prompts), seq, hidden]; the runtime looks up the embeddings.
        (SDXL: the concatenated states of both encoders; the family's encode_texts gives the pooled embeddings too.)"""
        return self.family.encode_texts(self, prompts, observers)["encoder_hidden_states"]

    def encode_image(self, pixels: np.ndarray, generators: list[TorchCPUGenerator], observers=()) -> np.ndarray:
        """Image [1, 3, H, W] -> scaled latents per image, sampling the posterior with each image's generator (a VAE
        with latents_mean/latents_std: (sample - mean) * scaling_factor / std, as diffusers' SDXL img2img)."""
        out = self._run(VAE_ENCODER, {"image": pixels}, observers)
        mean, std = out["mean"], np.exp(0.5 * out["logvar"])
        samples = np.concatenate([mean + std * g.randn(mean.shape) for g in generators]).astype(np.float32)  # diffusers samples
        f = self.facts
        if f.latents_mean is None:
            return samples * np.float32(f.scaling_factor)
        channel = (1, f.latent_channels, 1, 1)
        lmean, lstd = (np.array(v, np.float32).reshape(channel) for v in (f.latents_mean, f.latents_std))
        return (samples - lmean) * np.float32(f.scaling_factor) / lstd

    def _run(self, network: str, feeds: dict, observers=()) -> dict:
        """backend.run, timed for the observers that read times (synchronising the device around the call)."""
        if not wants_timing(observers):
            return self.backend.run(network, feeds)
        self.backend.synchronize()
        t0 = time.perf_counter()
        out = self.backend.run(network, feeds)
        self.backend.synchronize()
        for observer in observers:
            observer.on_network(network, time.perf_counter() - t0)
        return out

    def _denoise_on_device(self, batch: Batch, observers, progress: bool) -> np.ndarray:
        """The same loop on the backend's device (sdrt.device_loop): step noise drawn up front, in the same order."""
        sched = batch.sched
        step_noise = draw_step_noise(batch.generators, sched, batch.latent_shape)

        def on_step(i, timestep, x):
            batch.x, batch.step = x, i + 1
            for observer in observers:
                observer.on_step(batch, i)

        callback = on_step if any(type(o).on_step is not Observer.on_step for o in observers) else None
        timed = wants_timing(observers)
        t0 = time.perf_counter()
        extra = dict(batch.added) if batch.timestep_cond is None else {**batch.added, "timestep_cond": batch.timestep_cond}
        inpaint = batch.inpaint.device_tables(sched, batch.guided) if batch.inpaint is not None else None
        x = self.backend.denoise(sched, batch.x, batch.text_states, batch.uniform_guidance(), step_noise, callback, progress,
                                 extra, inpaint)
        if timed:
            for observer in observers:
                observer.on_network(UNET, time.perf_counter() - t0, sched.num_calls)
        batch.x, batch.step = x, sched.num_calls
        return x

    # --- input handling --------------------------------------------------------------------------------------

    def _latent_shape(self, height: int, width: int) -> tuple:
        f = self.facts
        return (1, f.latent_channels, height // f.vae_scale_factor, width // f.vae_scale_factor)
