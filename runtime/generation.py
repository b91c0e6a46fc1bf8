"""What the pipeline's steps pass along: one checked request (`GenerationPlan`) and the rows in flight (`Batch`).

A plan is a request with every argument checked and every default resolved (size, seeds, scheduler), made
before any network runs. A batch is one or more plans that can share each UNet call (same `batch_key`):
their rows are stacked in plan order, each row keeps its own prompt, negative prompt, seed and guidance scale,
and a plan's rows can leave the batch between steps (a cancelled request) without touching the other rows.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sdrt.errors import InputError
from sdrt.noise import TorchCPUGenerator


@dataclasses.dataclass
class GenerationPlan:
    """One request, checked: an image per entry of `prompts` (a prompt repeated for its images)."""

    prompts: list[str]  # per image
    negatives: list[str]  # per image
    seeds: list[int]  # per image: image k alone is reproduced by seeds[k]
    steps: int
    guidance_scale: float
    height: int
    width: int
    scheduler: str | None  # an sdrt scheduler name, or None for the model's own
    init_image: object | None  # a PIL image for img2img
    strength: float
    latents: np.ndarray | None  # the caller's initial noise [batch, C, h, w]
    output_type: str  # "pil", "np" or "latent"
    loras: tuple = ()  # ((registered name, scale), ...) sorted by name, scales != 0: run-time LoRAs (Pipeline.register_lora)
    timestep_spacing: str | None = None  # "leading"/"linspace"/"trailing" instead of the scheduler config's (None: its own)
    cfg: bool = True  # guidance by an [uncond, cond] batch; False for LCM-distilled UNets (guidance embedding)
    mask: object | None = None  # sdrt.inpaint.Mask: inpaint the init image (None: img2img or text-to-image)
    # SDXL (empty/None/False for SD 1.x/2.x): micro-conditioning per image, the zeroed negative, the hand-over.
    time_ids: tuple = ()  # original size, crop corner, target size (or aesthetic score), as the UNet takes them
    negative_time_ids: tuple = ()
    zero_negatives: bool = False  # no negative prompt and force_zeros_for_empty_prompt: uncond states are zeros
    denoising_start: float | None = None  # start at this fraction of the schedule from init_latents
    denoising_end: float | None = None  # stop at this fraction (the base's part of a base + refiner run)
    init_latents: np.ndarray | None = None  # [batch, C, h, w] latents handed over from a base (denoising_start)

    @property
    def batch(self) -> int:
        return len(self.prompts)

    @property
    def guided(self) -> bool:
        """Classifier-free guidance runs (two UNet rows per image): guidance_scale > 1 on a UNet without a guidance
        embedding. At guidance <= 1 each step is one UNet pass over the images alone."""
        return self.cfg and self.guidance_scale > 1.0

    @property
    def batch_key(self) -> tuple:
        """Plans with equal keys share UNet calls: same shapes, schedule, guidance on/off and LoRA set."""
        img2img = self.init_image is not None
        return (self.height, self.width, self.steps, self.scheduler, img2img, self.strength if img2img else None, self.guided,
                self.loras, self.mask is not None, self.timestep_spacing, self.denoising_start, self.denoising_end)

    def parameters(self, k: int, scheduler: str, model: str, backend: str) -> dict:
        """Image k's generation parameters, as its PNG records them (sdrt.outputs.a1111_parameters writes them)."""
        from sdrt import __version__

        img2img = self.init_image is not None
        mask = self.mask
        return {
            "prompt": self.prompts[k],
            "negative_prompt": self.negatives[k],
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "seed": self.seeds[k],
            "width": self.width,
            "height": self.height,
            "scheduler": scheduler,
            "img2img": img2img,
            "strength": self.strength if img2img else None,
            **({"denoising_start": self.denoising_start} if self.denoising_start is not None else {}),
            **({"denoising_end": self.denoising_end} if self.denoising_end is not None else {}),
            "model": model,
            "backend": backend,
            "sdrt_version": __version__,
            **({"loras": ", ".join(f"{name}:{scale:g}" for name, scale in self.loras)} if self.loras else {}),
            **({"inpaint": True, "mask_blur": mask.blur, "keep_unmasked": mask.keep_unmasked,
                "mask_coverage": round(mask.coverage, 4)} if mask is not None else {}),
            **({"masked_content": mask.content} if mask is not None and mask.content != "original" else {}),
            **({"timestep_spacing": self.timestep_spacing} if self.timestep_spacing else {}),
        }


@dataclasses.dataclass
class Batch:
    """The rows in flight: latents, text states and per-row guidance for every plan still in the batch."""

    plans: list[GenerationPlan]
    sched: object  # an sdrt scheduler after set_timesteps
    generators: list[TorchCPUGenerator]  # per row
    latent_shape: tuple  # one row's latents: (1, C, h, w)
    text_states: np.ndarray  # [uncond rows; cond rows] when guided, else the cond rows
    guidance: np.ndarray | None  # float32 [rows, 1, 1, 1], None when guidance is off
    x: np.ndarray  # the current latents [rows, C, h, w]
    step: int = 0  # the next scheduler call
    timings: dict = dataclasses.field(default_factory=dict)
    timestep_cond: np.ndarray | None = None  # LCM-distilled UNets: float32 [rows, time_cond_proj_dim] guidance embedding
    inpaint: object | None = None  # sdrt.inpaint.InpaintRows: per-row mask and image latents when inpainting
    # UNet inputs beyond the text states (SDXL's text_embeds and time_ids), rows laid out as text_states'.
    added: dict = dataclasses.field(default_factory=dict)

    @property
    def rows(self) -> int:
        return self.x.shape[0]

    @property
    def guided(self) -> bool:
        return self.guidance is not None

    def uniform_guidance(self) -> float | None:
        """The one guidance scale of every row (None when guidance is off, or when rows differ)."""
        if self.guidance is None or not np.all(self.guidance == self.guidance.flat[0]):
            return None
        return float(self.guidance.flat[0])

    def rows_of(self, plan: GenerationPlan) -> slice:
        start = 0
        for p in self.plans:
            if p is plan:
                return slice(start, start + p.batch)
            start += p.batch
        raise InputError("that plan is not in this batch")

    def drop(self, plan: GenerationPlan) -> None:
        """Take a plan's rows out between steps (a cancelled request); the other rows go on unchanged."""
        rows = self.rows_of(plan)
        keep = np.r_[0 : rows.start, rows.stop : self.rows]
        self.plans = [p for p in self.plans if p is not plan]
        self.x = self.x[keep]
        self.generators = [self.generators[k] for k in keep]
        def rows_kept(states):
            if not self.guided:
                return states[keep]
            n = len(states) // 2
            return np.concatenate([states[:n][keep], states[n:][keep]])

        self.text_states = rows_kept(self.text_states)
        self.added = {name: rows_kept(value) for name, value in self.added.items()}
        if self.guided:
            self.guidance = self.guidance[keep]
        if self.timestep_cond is not None:
            self.timestep_cond = self.timestep_cond[keep]
        if self.inpaint is not None:
            self.inpaint = self.inpaint.select(keep)
        self.sched.select_rows(keep)


def guidance_scale_embedding(guidance_scales, dim: int) -> np.ndarray:
    """An LCM-distilled UNet's `timestep_cond`: the sinusoidal embedding of w = guidance_scale - 1 (times 1000), as
    diffusers' LatentConsistencyModelPipeline.get_guidance_scale_embedding computes it (float32, [sin, cos], a zero
    column when dim is odd)."""
    w = (np.asarray(guidance_scales, np.float32) - np.float32(1)) * np.float32(1000)
    half = dim // 2
    freq = np.exp(np.arange(half, dtype=np.float32) * -np.float32(np.log(np.float32(10000)) / (half - 1)))
    arg = w[:, None] * freq[None, :]
    emb = np.concatenate([np.sin(arg), np.cos(arg)], axis=1)
    if dim % 2:
        emb = np.pad(emb, ((0, 0), (0, 1)))
    return emb.astype(np.float32)


def stack_plans(plans: list[GenerationPlan]) -> None:
    """Refuse plans that cannot share UNet calls (the batcher groups by `batch_key`)."""
    if not plans:
        raise InputError("no plans to run")
    keys = {p.batch_key for p in plans}
    if len(keys) > 1:
        raise InputError(f"plans with different sizes, schedules, guidance or LoRAs cannot share a batch: {sorted(map(str, keys))}")
