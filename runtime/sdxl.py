"""SDXL's conditioning, as diffusers' StableDiffusionXL(Img2Img)Pipeline builds it, for the pipeline's steps.

- Text: each prompt through every text encoder of the family (base: CLIP ViT-L and OpenCLIP bigG; refiner: bigG
  only); their penultimate hidden states concatenated along the channels are the UNet's encoder_hidden_states,
  the last encoder's pooled, projected output is `text_embeds`. With force_zeros_for_empty_prompt and no negative
  prompt, the unconditional rows are zeros (not the encoded empty string).
- Micro-conditioning `time_ids`: original size, crop corner and target size (the refiner: an aesthetic score in
  place of the target size), with negative twins for the unconditional rows.
"""

from __future__ import annotations

import numpy as np

from sdrt.errors import InputError

MICRO_ARGS = ("original_size", "crops_coords_top_left", "target_size", "negative_original_size",
              "negative_crops_coords_top_left", "negative_target_size", "aesthetic_score", "negative_aesthetic_score")


def _pair(value, name: str) -> tuple[float, float] | None:
    if value is None:
        return None
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and np.isfinite(v) for v in value)):
        raise InputError(f"{name} {value!r} is not a pair of numbers (height, width) / (top, left); pass e.g. (1024, 1024)")
    return (float(value[0]), float(value[1]))


def _score(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not np.isfinite(value):
        raise InputError(f"{name} {value!r} is not a finite number; pass e.g. 6.0")
    return float(value)


def time_ids(facts, height: int, width: int, img2img: bool, micro: dict) -> tuple[tuple, tuple]:
    """(time ids, negative time ids) of one request, with diffusers' defaults: sizes are the image's own, the crop
    corner (0, 0), the aesthetic scores 6.0 and 2.5. txt2img uses the negative twins only when both negative sizes
    are given; img2img (and the refiner) default each to its positive twin, as diffusers' two pipelines do."""
    original = _pair(micro.get("original_size"), "original_size") or (float(height), float(width))
    target = _pair(micro.get("target_size"), "target_size") or (float(height), float(width))
    crops = _pair(micro.get("crops_coords_top_left"), "crops_coords_top_left") or (0.0, 0.0)
    neg_original = _pair(micro.get("negative_original_size"), "negative_original_size")
    neg_target = _pair(micro.get("negative_target_size"), "negative_target_size")
    neg_crops = _pair(micro.get("negative_crops_coords_top_left"), "negative_crops_coords_top_left") or (0.0, 0.0)
    aesthetic = _score(micro.get("aesthetic_score", 6.0), "aesthetic_score")
    neg_aesthetic = _score(micro.get("negative_aesthetic_score", 2.5), "negative_aesthetic_score")
    if facts.requires_aesthetics_score:
        return original + crops + (aesthetic,), (neg_original or original) + neg_crops + (neg_aesthetic,)
    positive = original + crops + target
    if img2img:  # diffusers' img2img pairs the negative sizes with the positive crop corner
        return positive, (neg_original or original) + crops + (neg_target or target)
    if neg_original is not None and neg_target is not None:
        return positive, neg_original + neg_crops + neg_target
    return positive, positive


def check_micro(facts, micro: dict) -> dict:
    """Refuse micro-conditioning on a model that has none, and unknown names."""
    given = {k: v for k, v in micro.items() if v is not None}
    unknown = sorted(set(given) - set(MICRO_ARGS))
    if unknown:
        raise InputError(f"unknown argument(s) {', '.join(unknown)}; SDXL's micro-conditioning takes {', '.join(MICRO_ARGS)}")
    if given and not facts.time_ids_dim:
        raise InputError(f"{', '.join(sorted(given))} condition SDXL models only; this is a {facts.family} model")
    return given


def pool_weights(ids: np.ndarray, eos_id: int, at_argmax: bool) -> np.ndarray:
    """One-hot rows [n, seq] at the token CLIP pools: argmax(ids) for configs with the legacy eos_token_id 2 (SDXL's
    own), else the first end-of-text token, as transformers' CLIPTextTransformer picks it."""
    index = ids.argmax(axis=1) if at_argmax else (ids == eos_id).argmax(axis=1)
    weights = np.zeros(ids.shape, np.float32)
    weights[np.arange(len(ids)), index] = 1.0
    return weights


def encode(pipe, texts: list[str], observers=()) -> dict[str, np.ndarray]:
    """texts -> {"encoder_hidden_states": [n, seq, sum of widths], "text_embeds": [n, pooled]} through every text
    encoder of the family (pipe.text_encoders: (network, tokenizer, token table))."""
    from sdrt.adapters.textual_inversion import expand_prompt

    states, pooled = [], None
    for network, tokenizer, table in pipe.text_encoders:
        ids = tokenizer([expand_prompt(t, tokenizer, pipe.textual_inversions) for t in texts])
        feeds = {"inputs_embeds": table[ids]}
        contract = pipe.backend.contracts[network]
        if "pool_weights" in contract.input_names:
            feeds["pool_weights"] = pool_weights(ids, tokenizer.eos_id, pipe.facts.pool_at_argmax)
        out = pipe._run(network, feeds, observers)
        states.append(out["hidden_states"])
        pooled = out.get("text_embeds", pooled)
    return {"encoder_hidden_states": np.concatenate(states, axis=-1), "text_embeds": pooled}


def time_id_rows(plans) -> np.ndarray:
    """The UNet's time_ids per row: [negative rows; positive rows] when guided."""
    positive = [p.time_ids for p in plans for _ in range(p.batch)]
    negative = [p.negative_time_ids for p in plans for _ in range(p.batch)] if plans[0].guided else []
    return np.array(negative + positive, np.float32)


def handed_over_latents(facts, image, batch: int, denoising_start) -> np.ndarray:
    """The latents a base hands to a refiner (`image` with denoising_start), one per image of the request."""
    c = facts.latent_channels
    if not isinstance(image, np.ndarray) or image.ndim != 4 or image.shape[1] != c:
        raise InputError(f"denoising_start {denoising_start} continues from latents: pass image= the base's output_type="
                         f"'latent' array [images, {c}, h, w], not {type(image).__name__}")
    if image.shape[0] not in (1, batch):
        raise InputError(f"image holds {image.shape[0]} latents for {batch} images; pass one or one per image")
    if not np.all(np.isfinite(image)):
        raise InputError("the handed-over latents hold NaN or inf")
    return np.repeat(image, batch // image.shape[0], axis=0).astype(np.float32)


def with_refiner(base, refiner, start: float, prompt, negative_prompt, **request):
    """Base then refiner (diffusers' ensemble of experts): the base runs to `start` of the schedule
    (denoising_end) and hands its latents to the refiner, which runs from there (denoising_start) with the same
    prompts, steps and seeds."""
    if not (base.is_sdxl and refiner.is_sdxl and base.facts.latent_channels == refiner.facts.latent_channels):
        raise InputError(f"refiner= hands SDXL latents to an SDXL refiner; got a {base.facts.family} model and a "
                         f"{refiner.facts.family} refiner")
    if any(request.get(k) is not None for k in ("denoising_start", "denoising_end", "image", "mask_image")):
        raise InputError("refiner= sets denoising_end/denoising_start itself and runs txt2img; drop those arguments")
    output_type = request.pop("output_type", "pil")
    for key in ("denoising_start", "denoising_end", "image", "strength"):
        request.pop(key, None)
    first = base(prompt, negative_prompt, denoising_end=start, output_type="latent", **request)
    request.pop("latents", None)
    out = refiner(prompt, negative_prompt, image=first.images, denoising_start=start, output_type=output_type, **request)
    out.timings = {k: first.timings.get(k, 0.0) + v for k, v in out.timings.items()}
    return out
