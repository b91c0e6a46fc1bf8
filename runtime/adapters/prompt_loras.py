"""A1111's prompt syntax for LoRAs: `<lora:NAME:SCALE>` (and `<lyco:...>`, `<lora:NAME>` at 1.0) inside the prompt.

    prompt, loras = parse_prompt_loras("a castle <lora:style:0.8>, <lora:detail:0.4>")
    # "a castle ,", {"style": 0.8, "detail": 0.4}  ->  pipe(prompt, loras=loras) / Pipeline.plan(..., loras=loras)

A server calls this on each request's prompt and passes the result as `loras` (names registered with
`Pipeline.register_lora(path, name=NAME)`); the LoRA set becomes part of the plan's batch key. A1111's third
number (`<lora:NAME:TE:UNET>`, separate text-encoder and UNet weights) is refused: sdrt applies one scale to both.
A name given twice adds its scales, as A1111 does.
"""

from __future__ import annotations

import re

from sdrt.errors import InputError

_TAG = re.compile(r"<(lora|lyco):([^:<>]+)((?::[^:<>]*)*)>")


def parse_prompt_loras(prompt: str) -> tuple[str, dict[str, float]]:
    """-> (the prompt without its LoRA tags, {name: scale}); whitespace left by a tag is collapsed."""
    loras: dict[str, float] = {}

    def take(m: re.Match) -> str:
        name, rest = m.group(2).strip(), [p for p in m.group(3).split(":")[1:]]
        if len(rest) > 1:
            raise InputError(f"{m.group(0)}: sdrt takes one scale per LoRA (<lora:{name}:SCALE>), not separate "
                             "text-encoder and UNet weights")
        try:
            scale = float(rest[0]) if rest and rest[0].strip() else 1.0
        except ValueError:
            raise InputError(f"{m.group(0)}: the scale {rest[0]!r} is not a number") from None
        loras[name] = loras.get(name, 0.0) + scale
        return " "

    text = _TAG.sub(take, prompt)
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"\s+([,.;])", r"\1", text)
    return text, loras
