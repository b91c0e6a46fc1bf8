"""torch modules that give each network exactly its I/O contract's signature.

The PyTorch backend runs these and the ONNX exporter exports these, so both agree by construction.
This module imports torch at the top: only the PyTorch backend and `sdrt.export` load it, lazily.
"""

from __future__ import annotations

import torch
from torch import nn


class TextEncoderOnEmbeddings(nn.Module):
    """CLIP text encoder from token embeddings: positions added, causal encoder, final layer norm.

    Taking embeddings rather than ids is what lets a textual-inversion token be a new table row in the runtime,
    with no re-export. transformers' CLIPTextModel.forward insists on input_ids, hence this wrapper.
    """

    def __init__(self, text_model: nn.Module):
        super().__init__()
        # transformers 5 flattens CLIPTextModel; older versions keep the parts under `.text_model`.
        core = getattr(text_model, "text_model", text_model)
        self.embeddings = core.embeddings
        self.encoder = core.encoder
        self.final_layer_norm = core.final_layer_norm

    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        hidden = self.embeddings(inputs_embeds=inputs_embeds)
        seq = inputs_embeds.shape[1]
        # An explicit additive causal mask [batch, 1, seq, seq]: exports cleanly and matches CLIP's causal attention.
        # The batch axis is expanded, not broadcast: transformers 4.40-4.42's eager CLIP attention checks the mask's
        # size against [batch, 1, seq, seq] and refused [1, 1, seq, seq] at batch 2.
        blocked = torch.ones(seq, seq, dtype=torch.bool, device=hidden.device).triu(1)
        mask = torch.zeros(seq, seq, dtype=hidden.dtype, device=hidden.device)
        mask = mask.masked_fill(blocked, torch.finfo(hidden.dtype).min)[None, None].expand(hidden.shape[0], 1, seq, seq)
        hidden = self.encoder(inputs_embeds=hidden, attention_mask=mask).last_hidden_state
        return self.final_layer_norm(hidden)


class UNetContract(nn.Module):
    """UNet2DConditionModel with the contract's (sample, timestep[batch] float, encoder_hidden_states) signature."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class VaeEncoderContract(nn.Module):
    """Image in [-1, 1] -> posterior mean and log-variance (clamped as diffusers' DiagonalGaussianDistribution does)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.encoder = vae.encoder
        self.quant_conv = getattr(vae, "quant_conv", None)

    def forward(self, image):
        moments = self.encoder(image)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = torch.chunk(moments, 2, dim=1)
        return mean, torch.clamp(logvar, -30.0, 20.0)


class VaeDecoderContract(nn.Module):
    """Scaled latents (as the UNet sees them) -> image; divides by the model's own scaling factor inside."""

    def __init__(self, vae: nn.Module, scaling_factor: float):
        super().__init__()
        self.vae = vae
        self.inv_scale = 1.0 / scaling_factor

    def forward(self, latent):
        return self.vae.decode(latent * self.inv_scale, return_dict=False)[0]


def load_contract_modules(model_dir, facts, device="cpu", dtype=torch.float32) -> dict[str, nn.Module]:
    """Load a diffusers-format folder's networks and wrap each in its contract module (eval mode)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from sdrt.contracts import TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER

    from pathlib import Path

    from sdrt.errors import ModelError
    from sdrt.model.weights import check_safetensors_complete

    for sub in ("text_encoder", "unet", "vae"):  # name a truncated file before the libraries fail without naming it
        for file in sorted((Path(model_dir) / sub).glob("*.safetensors")):
            check_safetensors_complete(file)

    # sdrt prints its own progress; the libraries' per-file loading bars only clutter stderr.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()

    try:
        text = load_clip_text_model(CLIPTextModel, model_dir, dtype)
        unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae", torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError) as err:  # a damaged pickle or config the check above cannot see
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"{model_dir} could not be loaded by diffusers/transformers ({first}); re-download the model folder") from None
    modules = {
        TEXT_ENCODER: TextEncoderOnEmbeddings(text),
        UNET: UNetContract(unet),
        VAE_ENCODER: VaeEncoderContract(vae),
        VAE_DECODER: VaeDecoderContract(vae, facts.scaling_factor),
    }
    return {name: m.to(device).eval() for name, m in modules.items()}


def load_clip_text_model(cls, model_dir, dtype):
    """CLIPTextModel from `<model_dir>/text_encoder`, on transformers 4.x and 5.x alike: a folder saved by
    transformers 5 (keys without `text_model.`) loads on 4.x with its weights, not a random encoder."""
    from pathlib import Path

    text, info = cls.from_pretrained(model_dir, subfolder="text_encoder", torch_dtype=dtype, output_loading_info=True)
    missing = [k for k in info.get("missing_keys", ()) if not k.endswith("position_ids")]
    if not missing:
        return text
    from safetensors.torch import load_file

    files = sorted((Path(model_dir) / "text_encoder").glob("*.safetensors"))
    state = {k: v for f in files for k, v in load_file(f).items()}
    own = set(text.state_dict())
    fixed = {}
    for key, value in state.items():  # 5.x's flat keys under 4.x's text_model., or the other way round
        for name in (key, "text_model." + key, key.removeprefix("text_model.")):
            if name in own:
                fixed[name] = value
                break
    still = [k for k in missing if k not in fixed]
    if still:
        from sdrt.errors import ModelError

        raise ModelError(f"{model_dir}/text_encoder lacks weights for {still[:3]} ({len(still)} tensors); re-save the model")
    text.load_state_dict(fixed, strict=False)
    return text.to(dtype)
