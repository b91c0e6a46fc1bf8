"""SDXL single-file checkpoints (the SGM layout Stability and the trainers publish), converted offline.

Tiny random-weight SDXL base and refiner built to SDXL's conventions (32 norm groups, 64-wide heads, CLIP's legacy
token ids, SDXL's VAE scaling), written in the SGM layout by `to_sgm` (the inverse of diffusers' renaming, from the
original repositories' layout), then loaded with Pipeline.from_single_file: configs and weights equal the folder's,
and the latents are bit-equal. The real SDXL 1.0 shapes (built on torch's meta device: no memory, no weights) infer
stabilityai's own diffusers configs.
"""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import sdrt
from test_customisation import ARCH_KEYS, component_state, unet_to_original, vae_to_original

LEGACY_IDS = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1)


def open_clip_to_sgm(sd, prefix):
    """A CLIPTextModelWithProjection state dict in OpenCLIP's layout (fused in_proj, ln_final, text_projection)."""
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    out = {prefix + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
           prefix + "positional_embedding": sd["embeddings.position_embedding.weight"],
           prefix + "ln_final.weight": sd["final_layer_norm.weight"], prefix + "ln_final.bias": sd["final_layer_norm.bias"],
           prefix + "text_projection": sd["text_projection.weight"].T.contiguous()}
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers."))
    for i in range(layers):
        src = {k[len(f"encoder.layers.{i}."):]: v for k, v in sd.items() if k.startswith(f"encoder.layers.{i}.")}
        r = f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[r + f"attn.in_proj_{kind}"] = torch.cat([src[f"self_attn.{q}_proj.{kind}"] for q in "qkv"])
            out[r + f"attn.out_proj.{kind}"] = src[f"self_attn.out_proj.{kind}"]
            out[r + f"ln_1.{kind}"], out[r + f"ln_2.{kind}"] = src[f"layer_norm1.{kind}"], src[f"layer_norm2.{kind}"]
            out[r + f"mlp.c_fc.{kind}"], out[r + f"mlp.c_proj.{kind}"] = src[f"mlp.fc1.{kind}"], src[f"mlp.fc2.{kind}"]
    return out


def to_sgm(unet, vae, text_2, text_1=None):
    """SGM's single-file state dict: LDM's UNet plus label_emb.0 (the added embedding), the VAE, and the text encoders
    under conditioner.embedders (base: CLIP-L at 0, bigG at 1; refiner: bigG at 0)."""
    added = {"add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2."}
    sd = unet.state_dict()
    state = unet_to_original({k: v for k, v in sd.items() if not k.startswith("add_embedding.")}, unet.config)
    for key, value in sd.items():
        for hf, sgm in added.items():
            if key.startswith(hf):
                state["model.diffusion_model." + sgm + key[len(hf):]] = value
    state.update(vae_to_original(vae.state_dict(), vae.config))
    if text_1 is not None:
        state.update({"conditioner.embedders.0.transformer.text_model." + k.removeprefix("text_model."): v
                      for k, v in text_1.state_dict().items()})
    state.update(open_clip_to_sgm(text_2.state_dict(), f"conditioner.embedders.{0 if text_1 is None else 1}.model."))
    return state


def build_sgm_tiny(folder, refiner=False, in_channels=4):
    """A tiny SDXL of SGM's conventions in diffusers format, and the same weights as one SGM .safetensors file."""
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline,
                           StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from sdrt.export.clip_vocab import write_clip_tokenizer
    from sdrt.export.tiny import SDXL_SCHEDULER

    torch.manual_seed(3)
    pooled, time_dim, hidden = 48, 8, 64

    def clip(act, projection):
        return CLIPTextConfig(hidden_size=hidden, intermediate_size=128, num_attention_heads=1, num_hidden_layers=2,
                              hidden_act=act, vocab_size=49408, projection_dim=projection, **LEGACY_IDS)

    unet = UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, block_out_channels=(32, 64, 128), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(1, 1, 2), use_linear_projection=True, cross_attention_dim=hidden if refiner else 2 * hidden,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=pooled + (5 if refiner else 6) * time_dim, norm_num_groups=32)
    vae = AutoencoderKL(block_out_channels=(32, 32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=1, norm_num_groups=32,
                        sample_size=64, scaling_factor=0.13025, force_upcast=True)
    with torch.no_grad():  # random weights with some scale, so that every tensor matters in the comparisons
        for p in list(unet.parameters()) + list(vae.parameters()):
            p.add_(torch.randn_like(p) * 0.02)
    text_2 = CLIPTextModelWithProjection(clip("gelu", pooled))
    tok_2 = CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder / "tokenizer_2", pad_token="!"))
    parts = dict(vae=vae, unet=unet, text_encoder_2=text_2, tokenizer_2=tok_2,
                 scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER))
    text_1 = None
    inpainting = in_channels == 9
    if refiner:
        cls = StableDiffusionXLInpaintPipeline if inpainting else StableDiffusionXLImg2ImgPipeline
        pipe = cls(text_encoder=None, tokenizer=None, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False, **parts)
    else:
        text_1 = CLIPTextModel(clip("quick_gelu", hidden))
        tok_1 = CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder / "tokenizer"))
        cls = StableDiffusionXLInpaintPipeline if inpainting else StableDiffusionXLPipeline
        pipe = cls(text_encoder=text_1, tokenizer=tok_1, force_zeros_for_empty_prompt=True, **parts)
    pipe.save_pretrained(folder)
    single = folder.with_suffix(".safetensors")
    save_file({k: v.contiguous() for k, v in to_sgm(unet, vae, text_2, text_1).items()}, str(single))
    return folder, single


SDXL_KEYS = {
    "unet": ARCH_KEYS["unet"] + ["addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim"],
    "vae": ARCH_KEYS["vae"] + ["force_upcast"],
    "text_encoder_2": ARCH_KEYS["text_encoder"] + ["projection_dim", "bos_token_id", "eos_token_id", "pad_token_id"],
    "text_encoder": ARCH_KEYS["text_encoder"] + ["bos_token_id", "eos_token_id", "pad_token_id"],
}


@pytest.mark.parametrize("refiner", [False, True], ids=["base", "refiner"])
def test_sdxl_single_file_converts_to_the_original(refiner, tmp_path):
    original, single = build_sgm_tiny(tmp_path / "tiny-xl", refiner=refiner)
    pipe = sdrt.Pipeline.from_single_file(single, cache_dir=tmp_path / "cache", image_size=64)
    converted = pipe.source.path
    index = json.loads((converted / "model_index.json").read_text())
    assert index["_class_name"] == ("StableDiffusionXLImg2ImgPipeline" if refiner else "StableDiffusionXLPipeline")
    for name, keys in SDXL_KEYS.items():
        if refiner and name == "text_encoder":
            assert index["text_encoder"] == [None, None]
            continue
        want, got = (json.loads((f / name / "config.json").read_text()) for f in (original, converted))
        assert {k: want.get(k) for k in keys} == {k: got.get(k) for k in keys}, name
        a, b = component_state(original, name), component_state(converted, name)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), name
    reference = sdrt.Pipeline.from_pretrained(original, backend="torch")
    assert pipe.facts == reference.facts and pipe.facts.family == ("sdxl_refiner" if refiner else "sdxl")
    kw = dict(negative_prompt="blue", num_inference_steps=3, guidance_scale=2.0, seed=4, output_type="latent", progress=False)
    if refiner:
        kw["image"] = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    assert np.array_equal(pipe("a red cat", **kw).images, reference("a red cat", **kw).images)
    if refiner:  # config= takes a diffusers folder's configs and tokenizers instead of inferring them
        again = sdrt.Pipeline.from_single_file(single, cache_dir=tmp_path / "cache2", config=original)
        assert again.facts == reference.facts


def real_sdxl_sgm_shapes(refiner):
    """The SGM state dict of stabilityai's SDXL 1.0 base (or refiner), as meta tensors: shapes only, no memory."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel(**REAL_UNET[refiner])
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2)
        big_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                                                           num_hidden_layers=32, hidden_act="gelu", projection_dim=1280))
        clip_l = None if refiner else CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                                                   num_hidden_layers=12, projection_dim=768))
    return to_sgm(unet, vae, big_g, clip_l)


# stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0, unet/config.json (the keys that fix the architecture):
# the diffusers form of Stability's generative-models configs/inference/sd_xl_base.yaml (model_channels 320 x [1, 2, 4],
# attention at ds 2 and 4, transformer_depth [1, 2, 10] with the first unused, 64-wide heads, context 2048,
# adm_in_channels 2816, 256-wide time embeddings) and sd_xl_refiner.yaml (384 x [1, 2, 4, 4], depth 4, context 1280,
# adm_in_channels 2560), checked against those files.
REAL_UNET = {
    False: dict(sample_size=128, in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280], layers_per_block=2,
                down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20], use_linear_projection=True,
                cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816, norm_num_groups=32),
    True: dict(sample_size=128, in_channels=4, out_channels=4, block_out_channels=[384, 768, 1536, 1536], layers_per_block=2,
               down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
               up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
               transformer_layers_per_block=4, attention_head_dim=[6, 12, 24, 24], use_linear_projection=True,
               cross_attention_dim=1280, addition_embed_type="text_time", addition_time_embed_dim=256,
               projection_class_embeddings_input_dim=2560, norm_num_groups=32),
}


@pytest.mark.parametrize("refiner", [False, True], ids=["base", "refiner"])
def test_real_sdxl_shapes_infer_stabilityais_configs(refiner):
    from sdrt.export.single_file import detect_family
    from sdrt.export.single_file_sdxl import infer_configs

    state = real_sdxl_sgm_shapes(refiner)
    family = detect_family(state, "sd_xl.safetensors")
    assert family == ("sdxl_refiner" if refiner else "sdxl")
    configs = infer_configs(state, family, 1024, "epsilon", "sd_xl.safetensors")
    assert {k: configs["unet"][k] for k in REAL_UNET[refiner]} == REAL_UNET[refiner]
    assert configs["vae"]["scaling_factor"] == 0.13025 and configs["vae"]["block_out_channels"] == [128, 256, 512, 512]
    big_g = configs["text_encoder_2"]
    assert (big_g["hidden_size"], big_g["num_hidden_layers"], big_g["num_attention_heads"], big_g["projection_dim"]) == (1280, 32, 20, 1280)
    assert (big_g["hidden_act"], big_g["eos_token_id"]) == ("gelu", 2)
    if not refiner:
        clip_l = configs["text_encoder"]
        assert (clip_l["hidden_size"], clip_l["num_hidden_layers"], clip_l["num_attention_heads"], clip_l["hidden_act"]) == (768, 12, 12, "quick_gelu")
    assert configs["scheduler"]["_class_name"] == "EulerDiscreteScheduler"


def test_sdxl_inpainting_single_file_converts_and_inpaints(tmp_path):
    """An SGM file whose UNet takes 9 channels becomes a StableDiffusionXLInpaintPipeline folder and inpaints as the
    folder it was written from."""
    from test_inpaint import INIT, MASK

    original, single = build_sgm_tiny(tmp_path / "tiny-xl-inpaint", in_channels=9)
    pipe = sdrt.Pipeline.from_single_file(single, cache_dir=tmp_path / "cache", image_size=64)
    index = json.loads((pipe.source.path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLInpaintPipeline" and pipe.facts.inpainting_unet
    kw = dict(image=INIT, mask_image=MASK, strength=0.8, num_inference_steps=3, guidance_scale=2.0, seed=1,
              output_type="latent", progress=False)
    want = sdrt.Pipeline.from_pretrained(original, backend="torch")("a cat", **kw).images
    assert np.array_equal(pipe("a cat", **kw).images, want)
