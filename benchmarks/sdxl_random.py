"""An SDXL-architecture diffusers folder with random weights, from real configs, for `sdrt bench` (issue 19).

    python benchmarks/sdxl_random.py FOLDER [--arch vega|base] [--seed 0]

SDXL base's fp32 UNet alone is ~10 GB (2.6 B parameters): exporting it three times (sdrt, optimum, OpenVINO) and
running four pipelines of it does not fit this 24 GB machine shared with other jobs. "vega" (default) is Segmind
Vega's architecture: SDXL base's configs with the UNet cut down as Segmind published it (745 M parameters), the same
two text encoders (CLIP ViT-L/14 and OpenCLIP ViT-bigG/14) and VAE. Every value below comes from a config file
found in a public repository (SOURCES says where, with the commit); nothing is tuned for sdrt. The model hub is not
reachable here, so Vega's own unet/config.json could not be read: its UNet is SDXL base's config.json with the two
differences ComfyUI's model detection records for Vega's real checkpoint (transformer depth 1 and 2 in the two
attention levels, down and up; a middle block of one ResBlock and no transformer, diffusers' "UNetMidBlock2D").

Writes FOLDER/sources.json with SOURCES. ~6.6 GB of fp32 weights (vega): benchmarks only, never committed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# SDXL base 1.0's unet/config.json (stabilityai/stable-diffusion-xl-base-1.0), as diffusers writes it.
SDXL_UNET = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "center_input_sample": False,
    "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default", "sample_size": 128, "time_cond_proj_dim": None, "time_embedding_act_fn": None,
    "time_embedding_dim": None, "time_embedding_type": "positional", "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10], "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None, "use_linear_projection": True,
}  # fmt: skip
# Segmind Vega's UNet, in ComfyUI's terms: transformer_depth [0, 0, 1, 1, 2, 2] (input blocks), transformer_depth_output
# [0, 0, 0, 1, 1, 1, 2, 2, 2] (output blocks, popped from the end: 2, 2, 2 at 1280 channels, 1, 1, 1 at 640),
# transformer_depth_middle -1 (one ResBlock). In diffusers' terms:
VEGA_UNET = {**SDXL_UNET, "transformer_layers_per_block": [1, 1, 2], "mid_block_type": "UNetMidBlock2D"}
# SDXL base's text_encoder (CLIP ViT-L/14's text tower, SD 1.x's encoder; CLIP's legacy special-token ids) and
# text_encoder_2 (OpenCLIP ViT-bigG/14's text tower: width 1280, 20 heads, 32 layers, projection 1280, GELU).
TEXT_ENCODER = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
                "hidden_act": "quick_gelu", "projection_dim": 768, "max_position_embeddings": 77, "vocab_size": 49408,
                "layer_norm_eps": 1e-05, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}  # fmt: skip
TEXT_ENCODER_2 = {**TEXT_ENCODER, "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20,
                  "num_hidden_layers": 32, "hidden_act": "gelu", "projection_dim": 1280}  # fmt: skip
# SDXL base's vae/config.json.
VAE = {"act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
       "force_upcast": True, "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
       "out_channels": 3, "sample_size": 1024, "scaling_factor": 0.13025, "up_block_types": ["UpDecoderBlock2D"] * 4}  # fmt: skip

SOURCES = {
    "unet (SDXL base)": "stabilityai/stable-diffusion-xl-base-1.0 unet/config.json, as vendored verbatim (diffusers "
                        "0.2x key set) in public repositories found by the code index, e.g. ones holding "
                        "SDXL_Unet_Base_config / UNET_CONFIG dicts; every key here matches those",
    "unet (Vega's differences)": "github.com/comfyanonymous/ComfyUI comfy/model_detection.py @ "
                                 "d415a44fe698d8ba6d1a35dd4592dc52d838933e, unet_config_from_diffusers_unet: "
                                 "Segmind_Vega (and SSD_1B) entries, detected from the real checkpoints; "
                                 "transformer_depth_middle -1 = one ResBlock (comfy/ldm/modules/diffusionmodules/"
                                 "openaimodel.py), which is diffusers' UNetMidBlock2D (num_layers=0)",
    "text_encoder": "SDXL base text_encoder/config.json = openai/clip-vit-large-patch14's text config (the same "
                    "numbers as sdrt's SD 1.5 benchmark model, sdrt.bench.models.build_sd15_random)",
    "text_encoder_2": "github.com/mlfoundations/open_clip src/open_clip/model_configs/ViT-bigG-14.json @ "
                      "4ee12e107803c334f5fc6a4833d4711016cbdbfb (text_cfg: width 1280, heads 20, layers 32, "
                      "embed_dim 1280), as SDXL base's text_encoder_2/config.json (CLIPTextModelWithProjection, gelu)",
    "vae": "SDXL base vae/config.json (SD's AutoencoderKL, scaling_factor 0.13025, force_upcast)",
    "scheduler": "SDXL base scheduler/scheduler_config.json (EulerDiscreteScheduler, leading spacing, steps_offset 1) "
                 "= sdrt.export.tiny.SDXL_SCHEDULER",
    "tokenizers": "CLIP's BPE from openai-clip's bpe_simple_vocab_16e6.txt.gz (sdrt.export.clip_vocab); "
                  "tokenizer_2 pads with '!' as SDXL's does",
}
ARCHS = {"vega": VEGA_UNET, "base": SDXL_UNET}


def build(folder, arch: str = "vega", seed: int = 0) -> Path:
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from sdrt.export.clip_vocab import write_clip_tokenizer
    from sdrt.export.tiny import SDXL_SCHEDULER
    from sdrt.model.weights import prefix_text_encoder_keys

    folder = Path(folder)
    torch.manual_seed(seed)
    with torch.no_grad():
        unet = UNet2DConditionModel(**ARCHS[arch])
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_ENCODER_2))
        vae = AutoencoderKL(**VAE)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder / "tokenizer")),
        tokenizer_2=CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder / "tokenizer_2", pad_token="!")),
        unet=unet, scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER), force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )  # fmt: skip
    pipe.save_pretrained(folder)
    prefix_text_encoder_keys(folder)  # loadable by transformers 4.x too (the optimum baseline's venv)
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in
              (("unet", unet), ("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2), ("vae", vae))}  # fmt: skip
    (folder / "sources.json").write_text(json.dumps({"arch": arch, "seed": seed, "parameters": params, "sources": SOURCES}, indent=1))
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--arch", choices=sorted(ARCHS), default="vega")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build(args.folder, args.arch, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
