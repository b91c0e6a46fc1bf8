"""Single-file checkpoints (the original Stable Diffusion layout DreamBooth trainers publish) -> a diffusers folder.

The weights are renamed by diffusers' own conversion functions (convert_ldm_unet_checkpoint,
convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint, convert_open_clip_checkpoint). diffusers' single-file
loader also fetches configs from a model hub that sdrt cannot reach, so sdrt infers the architecture from the tensor
shapes instead (block widths, layers per block, attention levels, transformer depth, context width, latent
channels, text width/depth), with SD's fixed conventions for what shapes cannot tell (32 normalisation groups;
8 attention heads in SD 1.x's UNet, 64-wide heads in SD 2.x's UNet and in both text encoders; SD 2.x's text
encoder stops at the penultimate layer); SDXL base and refiner files likewise (sdrt.export.single_file_sdxl). `config=` takes a diffusers folder whose configs, tokenizer and scheduler
are used instead. SD 2.x files predict v unless their global_step is 875000 (SD 2.x-base), as diffusers guesses;
pass prediction_type= to say otherwise.

.safetensors only, unless allow_pickle=True: a .ckpt is a pickle, and unpickling a file can run its code.
"""

from __future__ import annotations

from sdrt.model.weights import prefix_text_encoder_keys

import hashlib
import json
import pickle
import os
import re
import shutil
from pathlib import Path

from sdrt import __version__
from sdrt.errors import BackendError, InputError, ModelError, torch_install_hint

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer."
OPEN_CLIP = "cond_stage_model.model."
NORM_GROUPS = 32  # LDM's Normalize(): GroupNorm(32, C) everywhere in SD's UNet and VAE
HEAD_WIDTH = 64
SD1_UNET_HEADS = 8
SD_VAE_SCALING = 0.18215
SD2_BASE_GLOBAL_STEP = 875000


# --- reading and recognising --------------------------------------------------------------------------------------


def load_checkpoint(path: Path, allow_pickle: bool = False) -> tuple[dict, int | None]:
    """The file's state dict (torch tensors) and its global_step when it records one."""
    import torch

    from sdrt.model.weights import sniff

    kind = sniff(path)  # by content: a PNG or garbage named .ckpt/.safetensors is neither
    if kind == "safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path)), None
        except Exception as err:
            raise ModelError(f"{path} is not a readable .safetensors checkpoint ({str(err).splitlines()[0]}); is it complete?") from None
    if kind != "pickle":
        raise ModelError(f"{path} is not a checkpoint: its content is {kind}; pass an SD 1.x/2.x .safetensors or .ckpt file")
    if not allow_pickle:
        raise ModelError(
            f"{path} is a pickle checkpoint; loading one unpickles it, which can run code from the file. Convert it to "
            ".safetensors, or, if you trust its source, convert it once with `sdrt export FILE OUT --allow-pickle` "
            "(Python: allow_pickle=True) and use OUT"
        )
    try:
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # Lightning .ckpt files hold callbacks and other objects: the full unpickler, as allowed
            data = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as err:  # truncated zip, damaged pickle: torch raises many kinds
        raise ModelError(f"{path} cannot be read as a torch checkpoint ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); is it complete?") from None
    step = data.get("global_step") if isinstance(data, dict) else None
    state = data.get("state_dict", data) if isinstance(data, dict) else None
    if not isinstance(state, dict):
        raise ModelError(f"{path} holds no state dict; it is not a Stable Diffusion checkpoint")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, (int(step) if isinstance(step, int) else None)


def _has(keys, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def detect_family(state: dict, name: str) -> str:
    """'sd1', 'sd2', 'sdxl' or 'sdxl_refiner' (sdrt.export.single_file_sdxl); any other model is refused by name."""
    from sdrt.export.single_file_sdxl import detect as detect_sdxl

    keys = list(state)
    refusals = [
        (lambda: any("joint_blocks." in k for k in keys), "an SD3 checkpoint"),
        (lambda: any("double_blocks." in k for k in keys), "a FLUX checkpoint"),
        (lambda: _has(keys, "control_model.") or _has(keys, "controlnet_"), "a ControlNet"),
        (lambda: any(k.startswith(("lora_unet_", "lora_te")) or ".lora_" in k for k in keys),
         "a LoRA, not a model: pass it with --lora FILE[:SCALE] (Pipeline.load_lora)"),
        (lambda: any(k.startswith(UNET) and "cond_proj" in k for k in keys),
         "an LCM (its UNet takes a guidance embedding)"),
        (lambda: UNET + "label_emb.0.0.weight" in state and detect_sdxl(state) is None,
         "a class-conditioned UNet (SD x4 upscaler or unCLIP)"),
    ]
    for test, what in refusals:
        if test():
            raise ModelError(f"{name} is {what}; sdrt runs Stable Diffusion 1.x, 2.x and XL text-to-image and inpainting "
                             "models only, for now")
    if UNET + "input_blocks.0.0.weight" not in state:
        vae_only = _has(keys, "encoder.down.") or _has(keys, "decoder.up.")
        what = "a VAE alone" if vae_only else "not an original-layout Stable Diffusion checkpoint"
        raise ModelError(f"{name} is {what} (no {UNET}input_blocks); sdrt converts SD 1.x/2.x/XL single-file checkpoints")
    in_channels = state[UNET + "input_blocks.0.0.weight"].shape[1]
    special = {8: "an InstructPix2Pix checkpoint", 5: "an SD 2 depth-to-image checkpoint", 7: "an SD x4 upscaler"}
    if in_channels in special:  # 9 (an inpainting UNet) converts to a StableDiffusionInpaintPipeline folder
        raise ModelError(f"{name} is {special[in_channels]} (its UNet takes {in_channels} channels); sdrt runs "
                         "text-to-image and inpainting models only, for now")
    if not _has(keys, VAE):
        raise ModelError(f"{name} has no VAE ({VAE}*); it is not a complete Stable Diffusion checkpoint")
    sdxl = detect_sdxl(state)
    if sdxl is not None:
        return sdxl
    if OPEN_CLIP + "token_embedding.weight" in state:
        return "sd2"
    if _has(keys, CLIP):
        return "sd1"
    raise ModelError(f"{name} has no text encoder (cond_stage_model.*); it is not a complete SD 1.x/2.x checkpoint")


# --- architecture from shapes --------------------------------------------------------------------------------------


def _count(keys, pattern: str) -> int:
    """How many consecutive indices {i} from 0 have a key starting with pattern.format(i)."""
    n = 0
    while _has(keys, pattern.format(n)):
        n += 1
    return n


def unet_config(state: dict, family: str, image_size: int, vae_scale: int, prediction_type: str) -> dict:
    keys = [k for k in state if k.startswith(UNET)]
    levels, current, i = [], [], 1
    while _has(keys, f"{UNET}input_blocks.{i}."):
        if f"{UNET}input_blocks.{i}.0.op.weight" in state:  # a downsampler closes a level
            levels.append(current)
            current = []
        else:
            width = state[f"{UNET}input_blocks.{i}.0.out_layers.3.weight"].shape[0]
            depth = _count(keys, f"{UNET}input_blocks.{i}.1.transformer_blocks.{{}}.")
            current.append((int(width), depth))
        i += 1
    levels.append(current)
    layers = len(levels[0])
    if any(len(level) != layers or len({w for w, _ in level}) != 1 for level in levels):
        raise ModelError(f"the UNet's input blocks {levels} do not form SD's regular levels; "
                         "pass config= a diffusers folder")
    widths = [level[0][0] for level in levels]
    depths = [level[0][1] for level in levels]
    proj_in = next(state[k] for k in keys if k.endswith(".proj_in.weight"))
    context = next(state[k] for k in keys if k.endswith("attn2.to_k.weight")).shape[1]
    attended = [d > 0 for d in depths]
    present = sorted({d for d in depths if d})
    return {
        "sample_size": image_size // vae_scale,
        "in_channels": int(state[UNET + "input_blocks.0.0.weight"].shape[1]),
        "out_channels": int(state[UNET + "out.2.weight"].shape[0]),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attended],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attended)],
        "block_out_channels": widths,
        "layers_per_block": layers,
        "transformer_layers_per_block": present[0] if len(present) == 1 else [max(d, 1) for d in depths],
        "cross_attention_dim": int(context),
        "attention_head_dim": SD1_UNET_HEADS if family == "sd1" else [max(1, w // HEAD_WIDTH) for w in widths],
        "use_linear_projection": proj_in.ndim == 2,
        "upcast_attention": family == "sd2" and prediction_type == "v_prediction",  # as SD 2.1-768's config
        "norm_num_groups": NORM_GROUPS,
    }


def vae_config(state: dict, image_size: int) -> dict:
    keys = [k for k in state if k.startswith(VAE)]
    levels = _count(keys, VAE + "encoder.down.{}.block.")
    return {
        "in_channels": int(state[VAE + "encoder.conv_in.weight"].shape[1]),
        "out_channels": int(state[VAE + "decoder.conv_out.weight"].shape[0]),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [int(state[f"{VAE}encoder.down.{i}.block.0.conv2.weight"].shape[0]) for i in range(levels)],
        "latent_channels": int(state[VAE + "decoder.conv_in.weight"].shape[1]),
        "layers_per_block": _count(keys, VAE + "encoder.down.0.block.{}."),
        "norm_num_groups": NORM_GROUPS,
        "sample_size": image_size,
        "scaling_factor": SD_VAE_SCALING,
    }


def text_config(state: dict, family: str) -> dict:
    keys = list(state)
    if family == "sd1":
        root = CLIP + ("text_model." if _has(keys, CLIP + "text_model.") else "")
        table = state[root + "embeddings.token_embedding.weight"]
        positions = state[root + "embeddings.position_embedding.weight"]
        layers = _count(keys, root + "encoder.layers.{}.")
        intermediate = state[root + "encoder.layers.0.mlp.fc1.weight"].shape[0]
        act, pad = "quick_gelu", 49407
    else:
        table = state[OPEN_CLIP + "token_embedding.weight"]
        positions = state[OPEN_CLIP + "positional_embedding"]
        layers = _count(keys, OPEN_CLIP + "transformer.resblocks.{}.") - 1  # SD 2.x uses the penultimate layer
        intermediate = state[OPEN_CLIP + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        act, pad = "gelu", 0
    hidden = int(table.shape[1])
    return {
        "vocab_size": int(table.shape[0]),
        "hidden_size": hidden,
        "intermediate_size": int(intermediate),
        "num_hidden_layers": int(layers),
        "num_attention_heads": max(1, hidden // HEAD_WIDTH),
        "max_position_embeddings": int(positions.shape[0]),
        "hidden_act": act,
        "projection_dim": hidden,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": pad,
    }


def _read_config_folder(folder: Path) -> dict:
    from sdrt.model.facts import read_json

    return {
        "unet": read_json(folder / "unet" / "config.json"),
        "vae": read_json(folder / "vae" / "config.json"),
        "text_encoder": read_json(folder / "text_encoder" / "config.json"),
        "scheduler": read_json(folder / "scheduler" / "scheduler_config.json"),
    }


# --- conversion -----------------------------------------------------------------------------------------------------


def _load_strict(model, state: dict, what: str, name: str):
    """Load converted weights; every weight of the model must come from the file, and the file's shapes must fit."""
    own = model.state_dict()
    if not any(k.startswith("text_model.") for k in own):  # transformers 5 flattens CLIPTextModel
        state = {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in state.items()}
    state = {k: v for k, v in state.items() if k in own or not k.endswith("position_ids")}
    missing = sorted(set(own) - set(state) - {k for k in own if k.endswith("position_ids")})
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        detail = (f"missing {missing[:3]}" if missing else "") + (f" unexpected {unexpected[:3]}" if unexpected else "") \
            + (f" shape of {wrong[:3]}" if wrong else "")
        raise ModelError(f"{name}: the {what} does not convert to the architecture sdrt inferred ({detail.strip()}); "
                         "pass config= a diffusers folder of the same architecture")
    model.load_state_dict(state, strict=False)
    return model


def _sd_pipeline(state: dict, family: str, configs: dict, tmp: Path, name: str, config, prediction_type: str):
    """The diffusers SD 1.x/2.x pipeline of `state` (its tokenizer written into tmp first)."""
    import diffusers
    from diffusers import AutoencoderKL, StableDiffusionInpaintPipeline, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    default_scheduler = "DDIMScheduler" if prediction_type == "v_prediction" else "PNDMScheduler"
    scheduler_class = configs["scheduler"].get("_class_name") or default_scheduler
    configs = {k: {n: v for n, v in c.items() if not n.startswith("_")} for k, c in configs.items()}
    dtype = state[UNET + "input_blocks.0.0.weight"].dtype

    unet = UNet2DConditionModel(**configs["unet"])
    _load_strict(unet, convert_ldm_unet_checkpoint(state, configs["unet"]), "UNet", name)
    vae = AutoencoderKL(**configs["vae"])
    _load_strict(vae, convert_ldm_vae_checkpoint(state, configs["vae"]), "VAE", name)
    text_cfg = {k: v for k, v in configs["text_encoder"].items() if k not in ("architectures", "model_type")}
    text = CLIPTextModel(CLIPTextConfig(**text_cfg))
    if family == "sd1":
        text_state = convert_ldm_clip_checkpoint(state)
        text_state = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in text_state.items()}
    else:  # drop the layers SD 2.x does not use: the last block (penultimate output) and the projection
        last = text.config.num_hidden_layers
        dropped = (f"{OPEN_CLIP}transformer.resblocks.{last}.", OPEN_CLIP + "text_projection")
        text_state = convert_open_clip_checkpoint(text, {k: v for k, v in state.items() if not k.startswith(dropped)})
    _load_strict(text, text_state, "text encoder", name)

    if config is not None:
        shutil.copytree(Path(config).expanduser() / "tokenizer", tmp / "tokenizer")
    else:
        from sdrt.export.clip_vocab import write_clip_tokenizer

        try:  # a single file holds no tokenizer: SD 1.x/2.x use CLIP's vocabulary, which openai-clip ships
            write_clip_tokenizer(tmp / "tokenizer", pad_token="!" if family == "sd2" else "<|endoftext|>")
        except RuntimeError as err:
            raise ModelError(f"{err}; or pass config= a diffusers SD folder to take its tokenizer") from None
    sched_cls = getattr(diffusers, scheduler_class, None) or getattr(diffusers, default_scheduler)
    if dtype != next(unet.parameters()).dtype:  # keep the file's precision: fp16 files stay fp16
        unet, vae, text = unet.to(dtype), vae.to(dtype), text.to(dtype)
    inpainting = configs["unet"].get("in_channels", 4) == 2 * configs["vae"].get("latent_channels", 4) + 1
    return (StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline)(
        vae=vae, text_encoder=text, tokenizer=CLIPTokenizer.from_pretrained(tmp / "tokenizer"),
        unet=unet, scheduler=sched_cls.from_config(configs["scheduler"]), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )


def convert_single_file(path, out_dir, allow_pickle: bool = False, image_size: int | None = None,
                        prediction_type: str | None = None, config=None, force: bool = False) -> Path:
    """Convert an original-layout SD 1.x/2.x/XL checkpoint to the diffusers folder `out_dir` (written atomically)."""
    from sdrt.backends.base import module_available

    missing = [m for m in ("torch", "diffusers", "transformers") if not module_available(m)]
    if missing:
        raise BackendError(f"converting a single-file checkpoint needs {', '.join(missing)}: {torch_install_hint('export')}; "
                           "or convert it once elsewhere with `sdrt export FILE OUT`")
    from sdrt.export import single_file_sdxl as xl
    from sdrt.export.tiny import SD15_SCHEDULER, SD21_SCHEDULER

    path, out_dir = Path(path).expanduser(), Path(out_dir).expanduser()
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    if prediction_type not in (None, "epsilon", "v_prediction"):
        raise InputError(f"prediction_type {prediction_type!r} is not 'epsilon' or 'v_prediction'")
    if out_dir.exists() and not force:
        raise InputError(f"{out_dir} already exists; pick another folder or pass force=True")
    state, global_step = load_checkpoint(path, allow_pickle)
    family = detect_family(state, str(path))
    sdxl = family.startswith("sdxl")
    if prediction_type is None:  # SDXL 1.0 base and refiner predict epsilon
        prediction_type = "epsilon" if family != "sd2" or global_step == SD2_BASE_GLOBAL_STEP else "v_prediction"
    image_size = image_size or (1024 if sdxl else 768 if prediction_type == "v_prediction" and family == "sd2" else 512)

    if config is not None:
        folder = Path(config).expanduser()
        configs = xl.read_config_folder(folder, family) if sdxl else _read_config_folder(folder)
    elif sdxl:
        configs = xl.infer_configs(state, family, image_size, prediction_type, str(path))
    else:
        vae_cfg = vae_config(state, image_size)
        scheduler = dict(SD21_SCHEDULER if prediction_type == "v_prediction" else SD15_SCHEDULER)
        scheduler["prediction_type"] = prediction_type
        configs = {
            "vae": vae_cfg,
            "unet": unet_config(state, family, image_size, 2 ** (len(vae_cfg["block_out_channels"]) - 1), prediction_type),
            "text_encoder": text_config(state, family),
            "scheduler": scheduler,
        }

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    from sdrt.export.onnx_export import remove_stale_partials

    remove_stale_partials(out_dir)  # what killed runs left in this folder
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if sdxl:
            models = {k: {n: v for n, v in c.items() if not n.startswith("_") or k == "scheduler"} for k, c in configs.items()}
            pipe = xl.build_pipeline(state, family, models, tmp, str(path), config, _load_strict)
        else:
            pipe = _sd_pipeline(state, family, configs, tmp, str(path), config, prediction_type)
        pipe.save_pretrained(tmp)
        prefix_text_encoder_keys(tmp)  # loadable by transformers 4.x too
        (tmp / "sdrt_source.json").write_text(json.dumps({
            "converted_from": str(path.resolve()), "family": family, "prediction_type": prediction_type,
            "image_size": image_size, "config": str(config) if config else None, "sdrt_version": __version__,
        }, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def default_cache_dir() -> Path:
    return Path(os.environ.get("SDRT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sdrt")


def cached_conversion(path, cache_dir=None, allow_pickle: bool = False, **options) -> Path:
    """The diffusers folder of a single-file checkpoint, converted once per file version and options."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    stat = path.stat()
    key = json.dumps([str(path.resolve()), stat.st_size, stat.st_mtime_ns, sorted((k, str(v)) for k, v in options.items()),
                      __version__])
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem)[:60] + "-" + hashlib.sha256(key.encode()).hexdigest()[:16]
    folder = Path(cache_dir or default_cache_dir()).expanduser() / "single_file" / name
    if not (folder / "model_index.json").is_file():
        convert_single_file(path, folder, allow_pickle=allow_pickle, force=True, **options)
    return folder
