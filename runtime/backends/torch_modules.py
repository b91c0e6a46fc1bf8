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


class PenultimateTextEncoder(TextEncoderOnEmbeddings):
    """SDXL's text encoders: token embeddings -> the penultimate layer's hidden states (diffusers' hidden_states[-2],
    clip_skip None); with `projection`, also CLIPTextModelWithProjection's pooled output: the final layer (for the
    one-hot `pool_weights` position, CLIP's end-of-text token, only), the final layer norm, the text projection.

    The layers run one by one: transformers 5's encoder no longer returns every layer's states by itself."""

    def __init__(self, text_model: nn.Module, projection: nn.Module | None = None):
        super().__init__(text_model)
        self.projection = projection
        import inspect

        # transformers 4.x's layer takes (states, attention_mask, causal_attention_mask) and returns a tuple.
        self._tf4 = "causal_attention_mask" in inspect.signature(self.encoder.layers[0].forward).parameters

    def _layer(self, layer, hidden, mask):
        out = layer(hidden, mask, None) if self._tf4 else layer(hidden, mask)
        return out[0] if isinstance(out, tuple) else out

    def forward(self, inputs_embeds: torch.Tensor, pool_weights: torch.Tensor | None = None):
        hidden = self.embeddings(inputs_embeds=inputs_embeds)
        seq = inputs_embeds.shape[1]
        blocked = torch.ones(seq, seq, dtype=torch.bool, device=hidden.device).triu(1)
        mask = torch.zeros(seq, seq, dtype=hidden.dtype, device=hidden.device)
        mask = mask.masked_fill(blocked, torch.finfo(hidden.dtype).min)[None, None].expand(hidden.shape[0], 1, seq, seq)
        layers = self.encoder.layers
        for layer in layers[:-1]:
            hidden = self._layer(layer, hidden, mask)
        if self.projection is None:
            return hidden
        return hidden, self.projection(self.final_layer_norm(self._pooled_last_layer(layers[-1], hidden, pool_weights)))

    @staticmethod
    def _pooled_last_layer(layer, hidden, pool_weights):
        """The final layer's output at the pooled position only, [batch, width]: nothing else of that layer is used.
        Its keys and values need every token; its query, attention row, output projection and MLP only the pooled
        one (about a sixth of the layer's multiply-adds). Exact: the same ops on the same rows, up to float rounding."""
        attn, w = layer.self_attn, pool_weights.to(hidden.dtype).unsqueeze(-1)  # one-hot [b, seq, 1]
        b, seq, width = hidden.shape
        heads, head_dim = attn.num_heads, attn.head_dim
        x = layer.layer_norm1(hidden)
        q = attn.q_proj((w * x).sum(dim=1, keepdim=True)).reshape(b, 1, heads, head_dim).transpose(1, 2)
        k = attn.k_proj(x).reshape(b, seq, heads, head_dim).transpose(1, 2)
        v = attn.v_proj(x).reshape(b, seq, heads, head_dim).transpose(1, 2)
        # CLIP's causal mask, the pooled row of it: keys after the pooled position are blocked.
        positions = torch.arange(seq, device=hidden.device, dtype=hidden.dtype)
        at = (w[..., 0] * positions).sum(dim=1, keepdim=True)  # [b, 1]
        blocked = torch.zeros_like(w[..., 0]).masked_fill(positions > at, torch.finfo(hidden.dtype).min)
        scores = (q @ k.transpose(-1, -2)) * attn.scale + blocked[:, None, None, :]
        context = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, 1, width)
        state = (w * hidden).sum(dim=1, keepdim=True) + attn.out_proj(context)
        state = state + layer.mlp(layer.layer_norm2(state))
        return state[:, 0]


class UNetContract(nn.Module):
    """UNet2DConditionModel with the contract's (sample, timestep[batch] float, encoder_hidden_states[, timestep_cond])
    signature (timestep_cond: an LCM-distilled UNet's guidance embedding)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, timestep_cond=None):
        return self.unet(sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond, return_dict=False)[0]


class UNetAddedContract(UNetContract):
    """SDXL's UNet: the contract's signature plus `text_embeds` and `time_ids` for the "text_time" added embedding
    (and an LCM-distilled one's `timestep_cond`, last)."""

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, timestep_cond=None):
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond, added_cond_kwargs=added,
                         return_dict=False)[0]


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
    """Scaled latents (as the UNet sees them) -> image; divides by the model's own scaling factor inside (a VAE with
    latents_mean/latents_std: latent * std / scaling_factor + mean, as diffusers' SDXL pipelines decode)."""

    def __init__(self, vae: nn.Module, scaling_factor: float, latents_mean=None, latents_std=None):
        super().__init__()
        self.vae = vae
        self.inv_scale = 1.0 / scaling_factor
        self.scaling_factor = scaling_factor
        self.normalised = latents_mean is not None
        if self.normalised:
            channel = (1, len(latents_mean), 1, 1)
            self.register_buffer("latents_mean", torch.tensor(latents_mean, dtype=torch.float32).view(channel), persistent=False)
            self.register_buffer("latents_std", torch.tensor(latents_std, dtype=torch.float32).view(channel), persistent=False)

    def forward(self, latent):
        if self.normalised:
            latent = latent * self.latents_std.to(latent.dtype) / self.scaling_factor + self.latents_mean.to(latent.dtype)
        else:
            latent = latent * self.inv_scale
        return self.vae.decode(latent, return_dict=False)[0]


def load_contract_modules(model_dir, facts, device="cpu", dtype=torch.float32) -> dict[str, nn.Module]:
    """Load a diffusers-format folder's networks and wrap each in its contract module (eval mode)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from sdrt.contracts import TEXT_ENCODER, TEXT_ENCODER_2, UNET, VAE_DECODER, VAE_ENCODER
    from sdrt.families import family_spec

    spec = family_spec(facts.family)
    sdxl = TEXT_ENCODER_2 in spec.networks

    from pathlib import Path

    from sdrt.errors import ModelError
    from sdrt.model.weights import check_safetensors_complete

    for sub in [enc for _, _, enc in spec.text_encoders] + ["unet", "vae"]:  # name a truncated file before the libraries fail without naming it
        for file in sorted((Path(model_dir) / sub).glob("*.safetensors")):
            check_safetensors_complete(file)

    # sdrt prints its own progress; the libraries' per-file loading bars only clutter stderr.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()

    # An fp16 run keeps a VAE that overflows in fp16 (SDXL's: force_upcast) in fp32, as diffusers does.
    vae_dtype = torch.float32 if facts.force_upcast else dtype
    modules = {}
    try:
        if not sdxl:
            modules[TEXT_ENCODER] = TextEncoderOnEmbeddings(load_clip_text_model(CLIPTextModel, model_dir, dtype))
        else:
            for network, _, folder in spec.text_encoders:
                if network == TEXT_ENCODER:
                    modules[network] = PenultimateTextEncoder(load_clip_text_model(CLIPTextModel, model_dir, dtype, folder))
                else:
                    text = load_clip_text_model(CLIPTextModelWithProjection, model_dir, dtype, folder)
                    modules[network] = PenultimateTextEncoder(text, text.text_projection)
        unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae", torch_dtype=vae_dtype)
    except (OSError, ValueError, RuntimeError) as err:  # a damaged pickle or config the check above cannot see
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"{model_dir} could not be loaded by diffusers/transformers ({first}); re-download the model folder") from None
    modules.update({
        UNET: UNetAddedContract(unet) if sdxl else UNetContract(unet),
        VAE_ENCODER: VaeEncoderContract(vae),
        VAE_DECODER: VaeDecoderContract(vae, facts.scaling_factor, facts.latents_mean, facts.latents_std),
    })  # fmt: skip
    return {name: m.to(device).eval() for name, m in modules.items()}


def load_clip_text_model(cls, model_dir, dtype, subfolder: str = "text_encoder"):
    """CLIPTextModel (or WithProjection) from `<model_dir>/<subfolder>`, on transformers 4.x and 5.x alike: a folder
    saved by transformers 5 (keys without `text_model.`) loads on 4.x with its weights, not a random encoder."""
    from pathlib import Path

    text, info = cls.from_pretrained(model_dir, subfolder=subfolder, torch_dtype=dtype, output_loading_info=True)
    missing = [k for k in info.get("missing_keys", ()) if not k.endswith("position_ids")]
    if not missing:
        return text
    from safetensors.torch import load_file

    files = sorted((Path(model_dir) / subfolder).glob("*.safetensors"))
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

        raise ModelError(f"{model_dir}/{subfolder} lacks weights for {still[:3]} ({len(still)} tensors); re-save the model")
    text.load_state_dict(fixed, strict=False)
    return text.to(dtype)


# --- LoRA slots: run-time low-rank factors added to chosen layers (sdrt.contracts.LoraSlot) -------------------------

# The layers that get slots: every Linear and Conv2d of the blocks LoRA trainers adapt. "attention": the UNet's
# transformer blocks (attention, feed-forward, proj_in/out) and the text encoder's attention and MLP, what kohya's
# LoRA and diffusers/PEFT LoRAs touch; "all" adds the UNet's resnets, down/upsamplers and time-embedding
# projections (kohya LoCon, LyCORIS conv layers).
SLOT_SETS = ("none", "attention", "all")
_ATTENTION_PARENTS = ("Transformer2DModel", "CLIPAttention", "CLIPMLP")
_ALL_PARENTS = _ATTENTION_PARENTS + ("ResnetBlock2D", "Downsample2D", "Upsample2D")


def lora_slot_layers(root: nn.Module, which: str = "all"):
    """The LoraSlots of `root` (a UNet2DConditionModel or the CLIP text model's core) for slot set `which`."""
    from sdrt.contracts import LoraSlot

    if which == "none":
        return ()
    parents = _ATTENTION_PARENTS if which == "attention" else _ALL_PARENTS
    slots, seen = [], set()
    for pname, parent in root.named_modules():
        if type(parent).__name__ not in parents:
            continue
        for cname, child in parent.named_modules():
            name = f"{pname}.{cname}" if cname else pname
            if name in seen or not isinstance(child, (nn.Linear, nn.Conv2d)):
                continue
            seen.add(name)
            if isinstance(child, nn.Conv2d):
                if child.groups != 1 or child.dilation != (1, 1) or child.padding_mode != "zeros" or isinstance(child.padding, str):
                    continue
                upsample = type(parent).__name__ == "Upsample2D"
                slots.append(LoraSlot(name, tuple(child.weight.shape), child.stride[0], child.padding[0], upsample))
            else:
                slots.append(LoraSlot(name, tuple(child.weight.shape)))
    return tuple(slots)


class LoraHooks:
    """Forward hooks adding up(down(x)) to slot layers of one module tree; `set({layer: (down, up)})` replaces the
    active factors (removing every earlier hook: nothing of a previous LoRA stays). An Upsample2D's conv is hooked on
    the Upsample2D (export rewrites replace its conv's call), applied to the upsampled input."""

    def __init__(self, root: nn.Module, slots):
        self.root, self.slots = root, {s.layer: s for s in slots}
        self.modules = dict(root.named_modules())
        self.handles = []
        self.factors: dict = {}

    def set(self, factors: dict) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles, self.factors = [], dict(factors)
        for layer in self.factors:
            slot = self.slots[layer]
            target = self.modules[layer.rpartition(".")[0]] if slot.upsample else self.modules[layer]
            self.handles.append(target.register_forward_hook(self._hook(layer, slot)))

    def _hook(self, layer, slot):
        import torch.nn.functional as F

        def hook(module, args, output):
            down, up = self.factors[layer]
            x = args[0] if args else None
            if x.dtype != down.dtype:  # (no Cast nodes in exports: the dtypes agree there)
                x = x.to(down.dtype)
            if slot.conv:
                if slot.upsample:
                    x = F.interpolate(x, scale_factor=2.0, mode="nearest")
                delta = F.conv2d(F.conv2d(x, down, None, slot.stride, slot.padding), up)
            else:
                delta = F.linear(F.linear(x, down), up)
            return output + (delta if delta.dtype == output.dtype else delta.to(output.dtype))

        return hook


class WithLoraSlots(nn.Module):
    """A contract module whose extra inputs are its LoRA slots' factors (what the exporter traces): forward(*inputs,
    *[down, up per slot])."""

    def __init__(self, module: nn.Module, root: nn.Module, slots, n_inputs: int):
        super().__init__()
        self.module, self.n_inputs = module, n_inputs
        self.slots = tuple(slots)
        self.hooks = LoraHooks(root, slots)

    def forward(self, *args):
        plain, lora = args[: self.n_inputs], args[self.n_inputs:]
        self.hooks.set({s.layer: (lora[2 * k], lora[2 * k + 1]) for k, s in enumerate(self.slots)})
        try:
            return self.module(*plain)
        finally:
            self.hooks.set({})


def slot_root(module: nn.Module) -> nn.Module:
    """The module tree LoRA layer names are relative to: the UNet2DConditionModel, or the text encoder wrapper."""
    return module.unet if isinstance(module, UNetContract) else module
