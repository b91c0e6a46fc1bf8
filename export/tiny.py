"""Tiny Stable-Diffusion-architecture models with random weights, for tests and for trying sdrt offline.

They keep SD's structure where it matters to a runtime (a VAE that downsamples by 8, a UNet with three
levels and cross-attention, the real CLIP vocabulary, SD's scheduler configs) but are small enough to
build in a second. "sd1" predicts epsilon; "sd2" predicts v, uses linear projections, per-block head
counts, GELU and pads prompts with "!" (id 0), like SD 2.x.
"""

from __future__ import annotations

from sdrt.model.weights import prefix_text_encoder_keys

import argparse
from pathlib import Path

from sdrt.export.clip_vocab import write_clip_tokenizer

# The scheduler configs of the real checkpoints (runwayml SD 1.5; stabilityai SD 2.1 768-v).
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
SD21_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


def build_tiny_sd(folder: str | Path, variant: str = "sd1", seed: int = 0, inpainting: bool = False) -> Path:
    """Build and save a tiny random-weight model in diffusers format; returns the folder. inpainting: a dedicated
    inpainting UNet (in_channels = 4 latent + 1 mask + 4 masked-image latent) saved as a StableDiffusionInpaintPipeline.
    variant "lcm": SD 1.x with an LCM-distilled UNet's guidance embedding (time_cond_proj_dim) and LCMScheduler, a
    LatentConsistencyModelPipeline."""
    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, LatentConsistencyModelPipeline, LCMScheduler, PNDMScheduler,
                           StableDiffusionInpaintPipeline,
                           StableDiffusionPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if variant not in ("sd1", "sd2", "lcm"):
        raise ValueError(f"variant {variant!r} is not one of 'sd1', 'sd2', 'lcm'")
    lcm = variant == "lcm"
    sd2 = variant == "sd2"
    folder = Path(folder)
    torch.manual_seed(seed)
    text_hidden = 32
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=9 if inpainting else 4,
        out_channels=4,
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_hidden,
        attention_head_dim=(2, 4, 4) if sd2 else 8,
        use_linear_projection=sd2,
        norm_num_groups=16,
        time_cond_proj_dim=32 if lcm else None,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=text_hidden,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=3,
            vocab_size=49408,
            max_position_embeddings=77,
            hidden_act="gelu" if sd2 else "quick_gelu",
            projection_dim=text_hidden,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=0 if sd2 else 49407,
        )
    )
    tok_dir = write_clip_tokenizer(folder / "tokenizer", pad_token="!" if sd2 else "<|endoftext|>")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    scheduler = (DDIMScheduler if sd2 else LCMScheduler if lcm else PNDMScheduler).from_config(SD21_SCHEDULER if sd2 else SD15_SCHEDULER)
    pipe_cls = LatentConsistencyModelPipeline if lcm else StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline
    pipe = pipe_cls(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    prefix_text_encoder_keys(folder)  # loadable by transformers 4.x too
    return folder


# stabilityai/stable-diffusion-xl-base-1.0's scheduler config (the refiner's is the same).
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}


def build_tiny_sdxl(folder: str | Path, refiner: bool = False, seed: int = 0, inpainting: bool = False,
                    time_cond_proj_dim: int | None = None) -> Path:
    """A tiny random-weight SDXL base (or refiner) in diffusers format, shaped as the real ones: two CLIP encoders
    (the second with a projection and "!" padding; the refiner has only that one), a "text_time" UNet with more
    than one transformer layer in its deepest block, a factor-8 VAE with SDXL's scaling factor and force_upcast.
    inpainting: a 9-channel UNet (latents, mask, masked-image latents) in a StableDiffusionXLInpaintPipeline.
    time_cond_proj_dim: an LCM-distilled UNet (it takes the guidance embedding `timestep_cond`), with LCMScheduler."""
    import torch
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline,
                           StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = Path(folder)
    torch.manual_seed(seed)
    hidden1, hidden2, pooled, time_dim = 32, 48, 24, 8
    time_ids = 5 if refiner else 6

    def clip_config(hidden, act):  # SDXL's encoders keep CLIP's legacy eos_token_id 2 (pooling at argmax(ids))
        return CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4, num_hidden_layers=3,
                              vocab_size=49408, max_position_embeddings=77, hidden_act=act, projection_dim=pooled,
                              bos_token_id=0, eos_token_id=2, pad_token_id=1)

    cross = hidden2 if refiner else hidden1 + hidden2
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=9 if inpainting else 4,
        out_channels=4,
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 8),
        use_linear_projection=True,
        cross_attention_dim=cross,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=time_dim * time_ids + pooled,
        norm_num_groups=16,
        time_cond_proj_dim=time_cond_proj_dim,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(16, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=1, norm_num_groups=8, sample_size=64,
        scaling_factor=0.13025, force_upcast=True,
    )  # fmt: skip
    text_encoder_2 = CLIPTextModelWithProjection(clip_config(hidden2, "gelu"))
    tokenizer_2 = CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder / "tokenizer_2", pad_token="!"))
    if time_cond_proj_dim:
        from diffusers import LCMScheduler

        scheduler = LCMScheduler.from_config(SDXL_SCHEDULER, timestep_spacing="trailing")
    else:
        scheduler = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER)
    if refiner:
        pipe = (StableDiffusionXLInpaintPipeline if inpainting else StableDiffusionXLImg2ImgPipeline)(
            vae=vae, text_encoder=None, text_encoder_2=text_encoder_2, tokenizer=None, tokenizer_2=tokenizer_2, unet=unet,
            scheduler=scheduler, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
        )  # fmt: skip
    else:
        text_encoder = CLIPTextModel(clip_config(hidden1, "quick_gelu"))
        tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder / "tokenizer"))
        pipe = (StableDiffusionXLInpaintPipeline if inpainting else StableDiffusionXLPipeline)(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
            unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
        )  # fmt: skip
    pipe.save_pretrained(folder)
    prefix_text_encoder_keys(folder)  # loadable by transformers 4.x too
    return folder


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Build a tiny random-weight SD model folder (diffusers format).")
    parser.add_argument("folder", help="where to write it")
    parser.add_argument("--variant", choices=("sd1", "sd2", "lcm", "sdxl", "sdxl_refiner"), default="sd1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--inpainting", action="store_true", help="a 9-channel inpainting UNet")
    args = parser.parse_args(argv)
    if args.variant.startswith("sdxl"):
        print(build_tiny_sdxl(args.folder, args.variant == "sdxl_refiner", args.seed))
    else:
        print(build_tiny_sd(args.folder, args.variant, args.seed, args.inpainting))


if __name__ == "__main__":
    main()
