"""What a model family feeds the UNet beyond the latents and the timestep, behind FamilySpec (sdrt.families).

Every family encodes each distinct text of a batch once and lays the rows out as diffusers batches them:
[uncond rows; cond rows] when guided, else the cond rows (`text_rows`, `gather_rows`). What a text becomes is the
family's `encode_texts`: SD 1.x/2.x the text encoder's last hidden states ("encoder_hidden_states"); SDXL both
encoders' penultimate states plus the pooled "text_embeds" (sdrt.sdxl.encode), with a row of zeros for a negative
left out under force_zeros_for_empty_prompt. Per-row inputs that do not come from text (SDXL's "time_ids") are the
family's `added_rows`, and a plan's micro-conditioning its `time_ids`.
"""

from __future__ import annotations

import numpy as np

from sdrt.contracts import TEXT_ENCODER


def text_rows(plans) -> tuple[list[str], list[int | None]]:
    """The distinct texts of `plans` (each encoded once: a prompt's images and a batch's empty negatives share it) and,
    per UNet row, the index of its text, or None for a zeroed negative (plan.zero_negatives)."""
    guided = plans[0].guided
    cond = [p for plan in plans for p in plan.prompts]
    negatives = [None if plan.zero_negatives else n for plan in plans for n in plan.negatives] if guided else []
    unique = list(dict.fromkeys(t for t in cond + negatives if t is not None))
    index = {text: k for k, text in enumerate(unique)}
    return unique, [None if t is None else index[t] for t in negatives + cond]


def gather_rows(values: np.ndarray, rows: list[int | None]) -> np.ndarray:
    """values[rows], with zeros where a row is None."""
    if all(r is not None for r in rows):
        return values[rows]
    zero = np.zeros_like(values[:1])
    return np.concatenate([values[r][None] if r is not None else zero for r in rows])


def sd_encode(pipe, texts: list[str], observers=()) -> dict[str, np.ndarray]:
    """SD 1.x/2.x: texts -> the text encoder's hidden states [n, seq, hidden]; the runtime looks up the embeddings."""
    from sdrt.adapters.textual_inversion import expand_prompt

    ids = pipe.tokenizer([expand_prompt(t, pipe.tokenizer, pipe.textual_inversions) for t in texts])
    states = pipe._run(TEXT_ENCODER, {"inputs_embeds": pipe.token_table[ids]}, observers)["last_hidden_state"]
    return {"encoder_hidden_states": states}


def sdxl_encode(pipe, texts: list[str], observers=()) -> dict[str, np.ndarray]:
    from sdrt.sdxl import encode

    return encode(pipe, texts, observers)


def no_added_rows(plans) -> dict[str, np.ndarray]:
    return {}


def sdxl_added_rows(plans) -> dict[str, np.ndarray]:
    from sdrt.sdxl import time_id_rows

    return {"time_ids": time_id_rows(plans)}


def no_time_ids(facts, height: int, width: int, img2img: bool, micro: dict) -> tuple[tuple, tuple]:
    return (), ()


def sdxl_time_ids(facts, height: int, width: int, img2img: bool, micro: dict) -> tuple[tuple, tuple]:
    from sdrt.sdxl import time_ids

    return time_ids(facts, height, width, img2img, micro)
