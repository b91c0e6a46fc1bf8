"""Model families: per family, in one place, what sdrt must know beyond a model's own configs.

A `FamilySpec` names the diffusers pipelines the family covers, its networks (in export order) and their I/O
contracts, the UNet's conditioning inputs beyond the latents and the timestep, and the default scheduler. An
export writes `spec.to_manifest()` into manifest.json ("family"), with every scheduler's default config, so the
C/C++ host reads network names, tensor names and scheduler defaults from the export and hard-codes none.

A new family (SDXL: a second text encoder, pooled embeddings, time ids; inpainting: a 9-channel UNet) is a new
spec here, its contracts and its conditioning functions (sdrt.conditioning: what the UNet takes beyond the latents and
the timestep), not edits across the loader, the pipeline's steps, the exporter and the host.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable

from sdrt import conditioning
from sdrt.contracts import NETWORKS, SDXL_NETWORKS, SDXL_REFINER_NETWORKS, NetworkContract, sd_contracts, sdxl_contracts
from sdrt.errors import ModelError
from sdrt.schedulers import DEFAULT_SCHEDULER

if TYPE_CHECKING:
    from sdrt.model.facts import ModelFacts


@dataclasses.dataclass(frozen=True)
class FamilySpec:
    name: str  # the key stored in ModelFacts.family and the manifest
    title: str  # for messages and `sdrt info`
    pipelines: tuple[str, ...]  # diffusers pipeline classes (model_index.json `_class_name`) of this family
    networks: tuple[str, ...]  # contract names, in the order the exporter writes them
    conditioning: tuple[str, ...]  # UNet inputs beyond the latent sample and the timestep
    default_scheduler: str  # sdrt scheduler name used when a config names a class sdrt lacks
    build_contracts: Callable[[ModelFacts], dict[str, NetworkContract]]
    # (text-encoder network, its tokenizer folder, its diffusers component folder), in the order their hidden
    # states are concatenated for the UNet's cross-attention.
    text_encoders: tuple[tuple[str, str, str], ...] = (("text_encoder", "tokenizer", "text_encoder"),)
    # The UNet's conditioning (sdrt.conditioning), so the pipeline's steps need not know the family:
    # encode_texts(pipe, texts, observers) -> {UNet input: [n, ...]} per distinct text ("encoder_hidden_states", ...);
    # added_rows(plans) -> {UNet input: [rows, ...]} not from text; time_ids(facts, h, w, img2img, micro) -> a plan's
    # (time ids, negative time ids).
    encode_texts: Callable = conditioning.sd_encode
    added_rows: Callable = conditioning.no_added_rows
    time_ids: Callable = conditioning.no_time_ids

    @property
    def components(self) -> tuple[str, ...]:
        """The diffusers folders a model of this family must hold."""
        return tuple(c for _, tok, enc in self.text_encoders for c in (enc, tok)) + ("unet", "vae", "scheduler")

    def contracts(self, facts: ModelFacts) -> dict[str, NetworkContract]:
        return self.build_contracts(facts)

    def to_manifest(self, facts: ModelFacts | None = None) -> dict:
        """The manifest's "family" section: what the C/C++ host reads instead of hard-coding it (an LCM-distilled
        UNet adds its guidance embedding `timestep_cond` to the conditioning)."""
        from sdrt.schedulers import scheduler_defaults

        extra = ["timestep_cond"] if facts is not None and facts.time_cond_proj_dim else []
        return {
            "name": self.name,
            "networks": list(self.networks),
            "conditioning": list(self.conditioning) + extra,
            "text_encoders": [{"network": n, "tokenizer": t} for n, t, _ in self.text_encoders],
            "default_scheduler": self.default_scheduler,
            "schedulers": scheduler_defaults(),
        }


# Inpainting is a capability of these families, not a family: a dedicated inpainting UNet differs only in its input
# channels (ModelFacts.unet_in_channels, read from its config; the UNet contract's `sample` takes them). So is an
# LCM-distilled UNet: it takes the guidance embedding `timestep_cond` (ModelFacts.time_cond_proj_dim).
_SD_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "OnnxStableDiffusionPipeline",
                 "StableDiffusionInpaintPipeline", "OnnxStableDiffusionInpaintPipeline", "LatentConsistencyModelPipeline")

SD1 = FamilySpec("sd1", "Stable Diffusion 1.x", _SD_PIPELINES, NETWORKS, ("encoder_hidden_states",), DEFAULT_SCHEDULER, sd_contracts)
SD2 = FamilySpec("sd2", "Stable Diffusion 2.x", _SD_PIPELINES, NETWORKS, ("encoder_hidden_states",), DEFAULT_SCHEDULER, sd_contracts)
# SDXL: two CLIP encoders (penultimate states concatenated), the second's pooled projection as `text_embeds` and
# the micro-conditioning `time_ids` through the UNet's "text_time" added embedding. The refiner has the second
# encoder only and conditions on aesthetic scores instead of the target size (facts.requires_aesthetics_score).
_SDXL_CONDITIONING = ("encoder_hidden_states", "text_embeds", "time_ids")
_SDXL_ROWS = dict(encode_texts=conditioning.sdxl_encode, added_rows=conditioning.sdxl_added_rows,
                  time_ids=conditioning.sdxl_time_ids)
SDXL = FamilySpec(
    "sdxl", "Stable Diffusion XL", ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                                    "StableDiffusionXLInpaintPipeline"), SDXL_NETWORKS,
    _SDXL_CONDITIONING, "euler", sdxl_contracts,
    (("text_encoder", "tokenizer", "text_encoder"), ("text_encoder_2", "tokenizer_2", "text_encoder_2")), **_SDXL_ROWS,
)
SDXL_REFINER = FamilySpec(
    "sdxl_refiner", "Stable Diffusion XL refiner", ("StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"),
    SDXL_REFINER_NETWORKS,
    _SDXL_CONDITIONING, "euler", sdxl_contracts, (("text_encoder_2", "tokenizer_2", "text_encoder_2"),), **_SDXL_ROWS,
)
FAMILIES: dict[str, FamilySpec] = {spec.name: spec for spec in (SD1, SD2, SDXL, SDXL_REFINER)}

# Pipelines sdrt knows of and refuses by name: a clear message beats a shape error deep inside a network.
NOT_YET_SUPPORTED = {
    "StableDiffusion3Pipeline": "SD3",
    "StableDiffusionUpscalePipeline": "SD x4 upscaler",
    "StableDiffusionDepth2ImgPipeline": "SD 2 depth-to-image",
    "StableDiffusionInstructPix2PixPipeline": "InstructPix2Pix",
    "StableCascadeCombinedPipeline": "Stable Cascade",
    "FluxPipeline": "FLUX",
    "PixArtAlphaPipeline": "PixArt",
    "KandinskyV22Pipeline": "Kandinsky",
}


def supported_pipelines() -> set[str]:
    return {p for spec in FAMILIES.values() for p in spec.pipelines}


def family_spec(name: str) -> FamilySpec:
    """The spec of family `name` (from ModelFacts.family or a manifest)."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ModelError(
            f"model family {name!r} is not one this sdrt runs ({', '.join(FAMILIES)}); a newer sdrt may: "
            "upgrade, or re-export the model with this version"
        ) from None


def check_pipeline_class(cls: str, where: str) -> None:
    """Refuse a diffusers pipeline class no family covers, naming what it is when sdrt knows it."""
    if cls in NOT_YET_SUPPORTED:
        titles = ", ".join(spec.title for spec in FAMILIES.values())
        raise ModelError(f"{where} holds a {NOT_YET_SUPPORTED[cls]} model ({cls}); sdrt runs {titles} models only, for now")
    if cls not in supported_pipelines():
        raise ModelError(f"{where} holds a {cls}, which sdrt does not know; it runs {', '.join(sorted(supported_pipelines()))}")


def detect_family(text_config: dict, unet_config: dict | None = None, model_index: dict | None = None) -> FamilySpec:
    """SDXL: a UNet with the "text_time" added embedding (the refiner: no first text encoder). SD 1.x and 2.x share
    every network; 2.x's OpenCLIP text encoder is the one with plain GELU."""
    if (unet_config or {}).get("addition_embed_type") == "text_time":
        first = (model_index or {}).get("text_encoder")
        return SDXL if isinstance(first, list) and first and first[0] is not None else SDXL_REFINER
    return SD2 if text_config.get("hidden_act", "quick_gelu") == "gelu" else SD1
