"""What the runtime must know about a model, read from its own config files (never assumed from SD 1.5).

`ModelFacts` is the single source of latent channels, VAE scale and scaling factors, prediction type and
the size step. It is read from a diffusers-format folder's JSON configs (no torch needed) and stored in
an export's manifest, so every backend and the exporter agree.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from sdrt.errors import ModelError
from sdrt.families import check_pipeline_class, detect_family

COMPONENTS = ("text_encoder", "tokenizer", "unet", "vae", "scheduler")  # SD 1.x/2.x; see FamilySpec.components


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    """Facts about one Stable Diffusion model that the loop, the contracts and the exporter need. The fields with
    defaults are SDXL's (an export made before they existed is an SD 1.x/2.x one, where they are 0/False)."""

    family: str  # a key of sdrt.families.FAMILIES: "sd1", "sd2", "sdxl", "sdxl_refiner"
    latent_channels: int
    vae_scale_factor: int  # image pixels per latent pixel (8 for SD)
    scaling_factor: float  # latents fed to the UNet = posterior sample * scaling_factor
    prediction_type: str  # "epsilon" or "v_prediction"
    unet_downsamples: int  # 2 ** this must divide the latent size
    text_seq_len: int  # tokens per prompt (77)
    text_hidden_size: int  # width of the (first) token-embedding table; 0 for SDXL's refiner, which has no first encoder
    cross_attention_dim: int  # width of the UNet's encoder_hidden_states
    default_size: int  # the image size the model was trained at (unet sample_size * vae scale)
    vocab_size: int
    unet_in_channels: int | None = None  # None: latent_channels; 2 * latent + 1 for an inpainting UNet
    # LCM-distilled UNets (time_cond_proj_dim in the UNet config): the width of the guidance embedding `timestep_cond`
    # the UNet takes instead of a classifier-free-guidance batch; 0 for every other model (and exports before it).
    time_cond_proj_dim: int = 0
    text_hidden_size_2: int = 0  # SDXL: width of text_encoder_2 (OpenCLIP bigG: 1280)
    pooled_dim: int = 0  # SDXL: text_encoder_2's projection_dim, the UNet's `text_embeds` width
    time_ids_dim: int = 0  # SDXL: micro-conditioning values per image (6 base, 5 refiner), from the UNet's config
    pool_at_argmax: bool = False  # SDXL: CLIP pools at argmax(ids) (its config's legacy eos_token_id 2), else the first eos
    requires_aesthetics_score: bool = False  # SDXL refiner: time ids end with an aesthetic score, not the target size
    force_zeros_for_empty_prompt: bool = False  # SDXL: no negative prompt -> zero states, not the encoded ""
    force_upcast: bool = False  # the VAE overflows in fp16 (SDXL's): fp16 runs keep it in fp32
    # SDXL VAEs whose config has latents_mean and latents_std (per latent channel): the UNet's latents are
    # (posterior sample - mean) * scaling_factor / std, and the decoder takes latents * std / scaling_factor + mean,
    # as diffusers' SDXL pipelines do when both are given. None: plain scaling_factor (and exports made before them).
    latents_mean: tuple | None = None
    latents_std: tuple | None = None

    def __post_init__(self):  # JSON gives lists; tuples keep facts hashable and comparable
        for name in ("latents_mean", "latents_std"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(float(v) for v in value))

    @property
    def unet_input_channels(self) -> int:
        """Channels of the UNet's `sample` input: the latents, plus mask and masked-image latents when inpainting."""
        return self.latent_channels if self.unet_in_channels is None else self.unet_in_channels

    @property
    def inpainting_unet(self) -> bool:
        """A dedicated inpainting UNet (SD 1.5/2 inpainting): [latents, mask, masked-image latents] in."""
        return self.unet_input_channels == 2 * self.latent_channels + 1

    @property
    def size_step(self) -> int:
        """Image height and width must be multiples of this (64 for SD 1.x/2.x)."""
        return self.vae_scale_factor * 2**self.unet_downsamples

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        if data["unet_in_channels"] is None:  # ordinary models' manifests stay as they were
            del data["unet_in_channels"]
        if not data["time_cond_proj_dim"]:
            del data["time_cond_proj_dim"]
        for name in ("latents_mean", "latents_std"):
            if data[name] is None:
                del data[name]
            else:
                data[name] = list(data[name])
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "ModelFacts":
        names = {f.name for f in dataclasses.fields(cls)}
        optional = {f.name for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
        missing = names - set(data) - optional
        if missing:
            raise ModelError(f"the manifest's model facts lack {sorted(missing)}; re-export the model with `sdrt export`")
        return cls(**{k: data[k] for k in names if k in data})


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ModelError(f"{path} is missing; the model folder is incomplete") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelError(f"{path} is not valid JSON ({err}); the model folder is damaged") from None


def read_pipeline_class(model_dir: Path) -> str:
    """The folder's diffusers pipeline class; families sdrt does not run are refused by name, before any weights load."""
    index_path = model_dir / "model_index.json"
    cls = read_json(index_path).get("_class_name", "StableDiffusionPipeline") if index_path.exists() else "StableDiffusionPipeline"
    check_pipeline_class(cls, str(model_dir))
    return cls


def read_model_facts(model_dir: str | Path) -> ModelFacts:
    """Read ModelFacts from a diffusers-format Stable Diffusion folder (configs only; no weights load)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelError(f"model folder {model_dir} does not exist; pass a diffusers-format folder or an sdrt export")
    cls = read_pipeline_class(model_dir)
    index = read_json(model_dir / "model_index.json") if (model_dir / "model_index.json").exists() else {}
    unet = read_json(model_dir / "unet" / "config.json") if (model_dir / "unet" / "config.json").exists() else {}
    spec = detect_family({}, unet, index)
    xl = spec.name.startswith("sdxl")
    if xl != ("XL" in cls):
        raise ModelError(
            f"{model_dir} holds a {cls}, but its UNet {'has' if xl else 'lacks'} SDXL's text_time added embedding; "
            "fix _class_name in model_index.json (or the unet config)"
        )
    if xl:
        return _read_sdxl_facts(model_dir, spec, index)
    missing = [c for c in COMPONENTS if not (model_dir / c).is_dir()]
    if missing:
        raise ModelError(
            f"model folder {model_dir} lacks {', '.join(missing)}; a diffusers-format Stable Diffusion folder holds "
            f"{', '.join(COMPONENTS)}"
        )
    unet = read_json(model_dir / "unet" / "config.json")
    vae = read_json(model_dir / "vae" / "config.json")
    text = read_json(model_dir / "text_encoder" / "config.json")
    sched = read_json(model_dir / "scheduler" / "scheduler_config.json")

    vae_latents = vae.get("latent_channels", 4)
    unet_in = int(unet.get("in_channels", 4))
    if unet_in not in (vae_latents, 2 * vae_latents + 1):
        raise ModelError(
            f"{model_dir}'s UNet takes {unet_in} input channels but the VAE makes {vae_latents}: not a text-to-image "
            f"({vae_latents}) or inpainting ({2 * vae_latents + 1}) UNet (a depth or upscaler UNet?), which sdrt does not run yet"
        )
    vae_scale = 2 ** (len(vae.get("block_out_channels", [64])) - 1)
    family = detect_family(text).name
    return ModelFacts(
        family=family,
        latent_channels=int(vae_latents),
        vae_scale_factor=int(vae_scale),
        # 0.18215 is AutoencoderKL's own default, used by diffusers too when the config lacks the key.
        scaling_factor=float(vae.get("scaling_factor", 0.18215)),
        prediction_type=str(sched.get("prediction_type", "epsilon")),
        unet_downsamples=len(unet.get("down_block_types", [])) - 1,
        text_seq_len=int(text.get("max_position_embeddings", 77)),
        text_hidden_size=int(text["hidden_size"]),
        cross_attention_dim=int(unet.get("cross_attention_dim", text["hidden_size"])),
        default_size=int(unet.get("sample_size", 64)) * vae_scale,
        vocab_size=int(text.get("vocab_size", 49408)),
        unet_in_channels=unet_in if unet_in != vae_latents else None,
        time_cond_proj_dim=int(unet.get("time_cond_proj_dim") or 0),
    )


def _read_sdxl_facts(model_dir: Path, spec, index: dict) -> ModelFacts:
    """SDXL base or refiner: both text encoders' widths, the pooled width and the number of time ids, all from the
    configs (the UNet's added embedding must take exactly time ids x addition_time_embed_dim + pooled width)."""
    missing = [c for c in spec.components if not (model_dir / c).is_dir()]
    if missing:
        raise ModelError(f"SDXL folder {model_dir} lacks {', '.join(missing)}; it must hold {', '.join(spec.components)}")
    unet = read_json(model_dir / "unet" / "config.json")
    vae = read_json(model_dir / "vae" / "config.json")
    sched = read_json(model_dir / "scheduler" / "scheduler_config.json")
    text2 = read_json(model_dir / "text_encoder_2" / "config.json")
    text1 = read_json(model_dir / "text_encoder" / "config.json") if spec.name == "sdxl" else {}
    pooled = int(text2.get("projection_dim", 0))
    time_dim, added = unet.get("addition_time_embed_dim"), unet.get("projection_class_embeddings_input_dim")
    if not (pooled and time_dim and added) or (added - pooled) % time_dim:
        raise ModelError(
            f"{model_dir}: the UNet's projection_class_embeddings_input_dim {added} is not time ids x "
            f"addition_time_embed_dim {time_dim} + text_encoder_2's projection_dim {pooled}; the configs disagree"
        )
    time_ids = (added - pooled) // time_dim
    aesthetics = bool(index.get("requires_aesthetics_score", False))  # diffusers' default
    if time_ids != (5 if aesthetics else 6):
        raise ModelError(
            f"{model_dir}'s UNet takes {time_ids} time ids, but requires_aesthetics_score={aesthetics} in model_index.json "
            f"means {5 if aesthetics else 6}; fix requires_aesthetics_score"
        )
    hidden1, hidden2 = int(text1.get("hidden_size", 0)), int(text2["hidden_size"])
    if unet.get("cross_attention_dim") != hidden1 + hidden2:
        raise ModelError(
            f"{model_dir}'s UNet cross-attends to {unet.get('cross_attention_dim')} channels, but its text encoders "
            f"give {hidden1} + {hidden2}; the configs disagree"
        )
    vae_latents = int(vae.get("latent_channels", 4))
    unet_in = int(unet.get("in_channels", 4))
    if unet_in not in (vae_latents, 2 * vae_latents + 1):
        raise ModelError(f"{model_dir}'s UNet takes {unet_in} input channels but the VAE makes {vae_latents}: not a "
                         f"text-to-image ({vae_latents}) or inpainting ({2 * vae_latents + 1}) UNet, which sdrt does not run")
    latents_mean, latents_std = _latent_statistics(model_dir, vae, vae_latents)
    vae_scale = 2 ** (len(vae.get("block_out_channels", [64])) - 1)
    return ModelFacts(
        family=spec.name,
        latent_channels=vae_latents,
        vae_scale_factor=int(vae_scale),
        scaling_factor=float(vae.get("scaling_factor", 0.18215)),
        prediction_type=str(sched.get("prediction_type", "epsilon")),
        unet_downsamples=len(unet.get("down_block_types", [])) - 1,
        text_seq_len=int(text2.get("max_position_embeddings", 77)),
        text_hidden_size=hidden1,
        cross_attention_dim=int(unet["cross_attention_dim"]),
        default_size=int(unet.get("sample_size", 128)) * vae_scale,
        vocab_size=int(text2.get("vocab_size", 49408)),
        text_hidden_size_2=hidden2,
        pooled_dim=pooled,
        time_ids_dim=int(time_ids),
        pool_at_argmax=text2.get("eos_token_id", 2) == 2,
        requires_aesthetics_score=aesthetics,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),  # diffusers' default
        force_upcast=bool(vae.get("force_upcast", True)),
        unet_in_channels=unet_in if unet_in != vae_latents else None,
        latents_mean=latents_mean,
        latents_std=latents_std,
        time_cond_proj_dim=int(unet.get("time_cond_proj_dim") or 0),
    )


def _latent_statistics(model_dir: Path, vae: dict, channels: int) -> tuple:
    """The VAE config's latents_mean and latents_std, used (as diffusers' SDXL pipelines use them) only when both are
    given; one number per latent channel, the std positive."""
    mean, std = vae.get("latents_mean"), vae.get("latents_std")
    if mean is None or std is None:
        return None, None
    for name, values in (("latents_mean", mean), ("latents_std", std)):
        ok = isinstance(values, list) and len(values) == channels and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
        if not ok or (name == "latents_std" and min(values) <= 0):
            raise ModelError(f"{model_dir}'s VAE config has {name} {values!r}; it must be {channels} finite numbers (one "
                             f"per latent channel{', positive' if name == 'latents_std' else ''}); fix vae/config.json")
    return tuple(map(float, mean)), tuple(map(float, std))


def check_size(facts: ModelFacts, height: int, width: int) -> None:
    """Refuse image sizes the networks cannot run (kept for callers; the checks live in sdrt.inputs)."""
    from sdrt.inputs import check_size as check

    check(facts, height, width)
