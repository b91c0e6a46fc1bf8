"""The original (LDM/SGM) UNet layer names -> diffusers' names, read from the model's own layers: SDXL LoRA trainers
(sd-scripts) write the UNet's keys in the original layout (input_blocks/middle_block/output_blocks)."""

from __future__ import annotations

import re

_RESNET_LDM = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_TOP_LDM = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2"}
_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)$")
_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")


def ldm_unet_names(names) -> dict[str, str]:
    """{original (LDM/SGM) layer name: diffusers name} for a UNet2DConditionModel's layer names: input_blocks.i.0 is a
    down block's resnet (.1 its attention, .0.op its downsampler), middle_block.0/1/2 resnet/attention/resnet,
    output_blocks.i.0/.1 an up block's resnet/attention and its last .1 or .2 the upsampler; inside resnets conv1 ->
    in_layers.2, conv2 -> out_layers.3, time_emb_proj -> emb_layers.1, conv_shortcut -> skip_connection. The number
    of layers per block is read from the names themselves."""
    names = list(names)
    per_block = 1 + max((int(m.group(4)) for m in map(_BLOCK.match, names)  # (attention-only LoRA slots: no resnets)
                         if m and m.group(1) == "down_blocks" and m.group(3) in ("resnets", "attentions")), default=0)
    up_attention = {int(m.group(2)) for m in map(_BLOCK.match, names) if m and m.group(1) == "up_blocks" and m.group(3) == "attentions"}

    def inner(kind, rest):
        if kind == "resnets":
            head, _, tail = rest.partition(".")
            return _RESNET_LDM.get(head, head) + ("." + tail if tail else "")
        return rest

    out = {}
    for name in names:
        if name in _TOP_LDM:
            out[_TOP_LDM[name]] = name
            continue
        m = _BLOCK.match(name)
        if m:
            where, b, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
            if where == "down_blocks":
                if kind == "downsamplers":  # conv -> op
                    out[f"input_blocks.{(b + 1) * (per_block + 1)}.0.op" + rest[len("conv"):]] = name
                else:
                    out[f"input_blocks.{1 + b * (per_block + 1) + j}.{0 if kind == 'resnets' else 1}.{inner(kind, rest)}"] = name
            else:
                if kind == "upsamplers":
                    sub = 2 if b in up_attention else 1
                    out[f"output_blocks.{b * (per_block + 1) + per_block}.{sub}.{rest}"] = name
                else:
                    out[f"output_blocks.{b * (per_block + 1) + j}.{0 if kind == 'resnets' else 1}.{inner(kind, rest)}"] = name
            continue
        m = _MID.match(name)
        if m:
            kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
            out[f"middle_block.{1 if kind == 'attentions' else 2 * j}.{inner(kind, rest)}"] = name
    return out
