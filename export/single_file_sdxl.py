"""SDXL single-file checkpoints (Stability's generative-models "SGM" layout) -> diffusers components, offline.

An SGM file holds the UNet under model.diffusion_model. (LDM's layout plus `label_emb.0` for the "text_time" added
embedding), the VAE under first_stage_model., and the text encoders under conditioner.embedders.N.: the base's CLIP
ViT-L (transformers layout, .transformer.) and OpenCLIP ViT-bigG (.model.); the refiner's bigG alone at N = 0.
The weights are renamed by diffusers' own functions (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
convert_ldm_clip_checkpoint, convert_open_clip_checkpoint), as for SD 1.x/2.x (sdrt.export.single_file).

diffusers' loader takes the configs from the model hub (stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0);
sdrt infers the architecture from the tensor shapes instead, with SDXL's fixed conventions for what shapes cannot
tell, each as stabilityai's diffusers configs of SDXL 1.0 and Stability's generative-models configs
(configs/inference/sd_xl_base.yaml, sd_xl_refiner.yaml: scale_factor 0.13025, num_head_channels 64) state it: 32 normalisation groups and 64-wide attention
heads everywhere; both encoders' penultimate states are used (all layers kept, no truncation as in SD 2.x); the
encoders' configs carry CLIP's legacy token ids (bos 0, eos 2, pad 1), so the pooled token is at argmax(ids); the
VAE's scaling factor 0.13025 and force_upcast; the Euler scheduler config (sdrt.export.tiny.SDXL_SCHEDULER); the
base zeroes the empty negative prompt, the refiner conditions on aesthetic scores (5 time ids, not 6).
`addition_time_embed_dim` follows from the shapes: label_emb's input is pooled width + time ids x that dim.
"""

from __future__ import annotations

from pathlib import Path

from sdrt.errors import ModelError

UNET = "model.diffusion_model."
CLIP_L = "conditioner.embedders.0.transformer."  # the base's first encoder (transformers' CLIP layout)
BIG_G = {"sdxl": "conditioner.embedders.1.model.", "sdxl_refiner": "conditioner.embedders.0.model."}  # OpenCLIP layout
SDXL_VAE_SCALING = 0.13025
HEAD_WIDTH = 64
LEGACY_TOKEN_IDS = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}


def detect(state: dict) -> str | None:
    """'sdxl' (base: two encoders), 'sdxl_refiner' (bigG alone at embedders.0), or None for a non-SDXL file."""
    keys = list(state)
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    if any(k.startswith(BIG_G["sdxl_refiner"]) for k in keys):
        return "sdxl_refiner"
    return None


def _count(keys, pattern: str) -> int:
    n = 0
    while any(k.startswith(pattern.format(n)) for k in keys):
        n += 1
    return n


def open_clip_config(state: dict, prefix: str, name: str) -> dict:
    """bigG's config from its shapes: every layer (SDXL reads the penultimate state of the full model)."""
    keys = [k for k in state if k.startswith(prefix)]
    if prefix + "text_projection" not in state:
        raise ModelError(f"{name} has no {prefix}text_projection; SDXL's second text encoder needs it for the pooled embedding")
    table = state[prefix + "token_embedding.weight"]
    hidden = int(table.shape[1])
    return {
        "architectures": ["CLIPTextModelWithProjection"],
        "vocab_size": int(table.shape[0]),
        "hidden_size": hidden,
        "intermediate_size": int(state[prefix + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        "num_hidden_layers": _count(keys, prefix + "transformer.resblocks.{}."),
        "num_attention_heads": max(1, hidden // HEAD_WIDTH),
        "max_position_embeddings": int(state[prefix + "positional_embedding"].shape[0]),
        "hidden_act": "gelu",
        "projection_dim": int(state[prefix + "text_projection"].shape[1]),
        **LEGACY_TOKEN_IDS,
    }


def clip_l_config(state: dict) -> dict:
    root = CLIP_L + "text_model."
    keys = [k for k in state if k.startswith(root)]
    table = state[root + "embeddings.token_embedding.weight"]
    hidden = int(table.shape[1])
    return {
        "architectures": ["CLIPTextModel"],
        "vocab_size": int(table.shape[0]),
        "hidden_size": hidden,
        "intermediate_size": int(state[root + "encoder.layers.0.mlp.fc1.weight"].shape[0]),
        "num_hidden_layers": _count(keys, root + "encoder.layers.{}."),
        "num_attention_heads": max(1, hidden // HEAD_WIDTH),
        "max_position_embeddings": int(state[root + "embeddings.position_embedding.weight"].shape[0]),
        "hidden_act": "quick_gelu",
        "projection_dim": hidden,
        **LEGACY_TOKEN_IDS,
    }


def infer_configs(state: dict, family: str, image_size: int, prediction_type: str, name: str) -> dict:
    """Every component's diffusers config from the file's shapes and SDXL's conventions."""
    from sdrt.export.single_file import unet_config, vae_config
    from sdrt.export.tiny import SDXL_SCHEDULER

    texts = {"text_encoder_2": open_clip_config(state, BIG_G[family], name)}
    if family == "sdxl":
        if CLIP_L + "text_model.embeddings.token_embedding.weight" not in state:
            raise ModelError(f"{name} has no {CLIP_L}text_model.*; an SDXL base checkpoint holds both text encoders")
        texts["text_encoder"] = clip_l_config(state)
    vae = dict(vae_config(state, image_size), scaling_factor=SDXL_VAE_SCALING, force_upcast=True)
    unet = unet_config(state, family, image_size, 2 ** (len(vae["block_out_channels"]) - 1), prediction_type)
    if UNET + "label_emb.0.0.weight" not in state:
        raise ModelError(f"{name} has no {UNET}label_emb.0.0.weight; an SDXL UNet conditions on its added embedding")
    added = int(state[UNET + "label_emb.0.0.weight"].shape[1])
    pooled = texts["text_encoder_2"]["projection_dim"]
    time_ids = 5 if family == "sdxl_refiner" else 6
    if (added - pooled) <= 0 or (added - pooled) % time_ids:
        raise ModelError(f"{name}: the UNet's added embedding takes {added} inputs, not {time_ids} time ids x a width + "
                         f"the pooled width {pooled}; pass config= a diffusers folder of this model")
    unet.update(addition_embed_type="text_time", addition_time_embed_dim=(added - pooled) // time_ids,
                projection_class_embeddings_input_dim=added, upcast_attention=False)
    scheduler = dict(SDXL_SCHEDULER, prediction_type=prediction_type)
    return {"unet": unet, "vae": vae, "scheduler": scheduler, **texts}


def read_config_folder(folder: Path, family: str) -> dict:
    from sdrt.model.facts import read_json

    names = ["unet", "vae", "text_encoder_2"] + (["text_encoder"] if family == "sdxl" else [])
    configs = {n: read_json(folder / n / "config.json") for n in names}
    configs["scheduler"] = read_json(folder / "scheduler" / "scheduler_config.json")
    return configs


def build_pipeline(state: dict, family: str, configs: dict, tmp: Path, name: str, config_folder, load_strict):
    """The diffusers SDXL pipeline of `state` (its tokenizers written into tmp first), weights checked by load_strict."""
    import diffusers
    from diffusers import (AutoencoderKL, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    unet = UNet2DConditionModel(**configs["unet"])
    load_strict(unet, convert_ldm_unet_checkpoint(state, configs["unet"]), "UNet", name)
    vae = AutoencoderKL(**configs["vae"])
    load_strict(vae, convert_ldm_vae_checkpoint(state, configs["vae"]), "VAE", name)

    def text_config(key):
        return CLIPTextConfig(**{k: v for k, v in configs[key].items() if k not in ("architectures", "model_type")})

    text_2 = CLIPTextModelWithProjection(text_config("text_encoder_2"))
    prefix = BIG_G[family]
    load_strict(text_2, convert_open_clip_checkpoint(text_2, {k: v for k, v in state.items() if k.startswith(prefix)}, prefix),
                "second text encoder (OpenCLIP bigG)", name)
    text_1 = None
    if family == "sdxl":
        text_1 = CLIPTextModel(text_config("text_encoder"))
        clip = convert_ldm_clip_checkpoint({k: v for k, v in state.items() if k.startswith(CLIP_L)})
        load_strict(text_1, clip, "first text encoder (CLIP ViT-L)", name)

    tokenizers = {}
    for folder, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        if folder == "tokenizer" and text_1 is None:
            continue
        if config_folder is not None:
            import shutil

            shutil.copytree(Path(config_folder).expanduser() / folder, tmp / folder)
        else:
            from sdrt.export.clip_vocab import write_clip_tokenizer

            try:  # SDXL's two tokenizers are CLIP's vocabulary; the second pads with "!" (id 0)
                write_clip_tokenizer(tmp / folder, pad_token=pad)
            except RuntimeError as err:
                raise ModelError(f"{err}; or pass config= a diffusers SDXL folder to take its tokenizers") from None
        tokenizers[folder] = CLIPTokenizer.from_pretrained(tmp / folder)

    dtype = state[UNET + "input_blocks.0.0.weight"].dtype
    if dtype != next(unet.parameters()).dtype:  # keep the file's precision: fp16 files stay fp16
        unet, vae, text_2 = unet.to(dtype), vae.to(dtype), text_2.to(dtype)
        text_1 = text_1.to(dtype) if text_1 is not None else None
    sched_cls = getattr(diffusers, configs["scheduler"].get("_class_name") or "", None) or diffusers.EulerDiscreteScheduler
    scheduler = sched_cls.from_config({k: v for k, v in configs["scheduler"].items() if not k.startswith("_")})
    inpainting = configs["unet"].get("in_channels", 4) == 2 * configs["vae"].get("latent_channels", 4) + 1
    parts = dict(vae=vae, text_encoder_2=text_2, tokenizer_2=tokenizers["tokenizer_2"], unet=unet, scheduler=scheduler)
    if family == "sdxl_refiner":
        cls = StableDiffusionXLInpaintPipeline if inpainting else StableDiffusionXLImg2ImgPipeline
        return cls(text_encoder=None, tokenizer=None, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
                   **parts)
    cls = StableDiffusionXLInpaintPipeline if inpainting else StableDiffusionXLPipeline
    return cls(text_encoder=text_1, tokenizer=tokenizers["tokenizer"], force_zeros_for_empty_prompt=True, **parts)
