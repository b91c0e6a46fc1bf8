"""The shapes a TensorRT build is made for: sizes as the user writes them, checked against the model's size step,
and each network's optimisation profile read from its I/O contract (the same contract export and runtime read)."""

from __future__ import annotations

import dataclasses
import re

from sdrt.contracts import NetworkContract, ShapeLimits
from sdrt.errors import InputError
from sdrt.model.facts import ModelFacts
from sdrt.model.manifest import Manifest

WHICH = ("min", "opt", "max")


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'512x512,768x768' -> [(512, 512), (768, 768)] (width x height)."""
    sizes = []
    for part in str(text).split(","):
        match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", part)
        if not match:
            raise InputError(f"size {part.strip()!r} is not WIDTHxHEIGHT; write sizes like 512x512,768x768")
        sizes.append((int(match.group(1)), int(match.group(2))))
    return sizes


def _check_side(facts: ModelFacts, what: str, value) -> None:
    step = facts.size_step
    if not isinstance(value, int) or isinstance(value, bool):
        raise InputError(f"{what} {value!r} is not an integer; use a multiple of {step}")
    if value < step or value % step:
        lower, upper = max(step, value // step * step), max(step, -(-value // step) * step)
        options = f"{lower}" if lower == upper else f"{lower} or {upper}"
        raise InputError(f"{what} {value} is not a multiple of {step} for this model; use {options}")


def resolve_shapes(source: Manifest, limits, sizes, static, max_batch) -> tuple[ShapeLimits, tuple[int, int] | None]:
    """The ShapeLimits (and static (W, H), if any) to build for, checked against the model's size step."""
    given = [name for name, value in (("limits", limits), ("sizes", sizes), ("static", static)) if value is not None]
    if len(given) > 1:
        raise InputError(f"pass one of sizes, static and min/opt/max sizes, not {' and '.join(given)}")
    facts = source.facts
    if isinstance(sizes, str):
        sizes = parse_sizes(sizes)
    if isinstance(static, str):
        parsed = parse_sizes(static)
        if len(parsed) != 1:
            raise InputError(f"static size {static!r} must be one WIDTHxHEIGHT; for several sizes use sizes")
        static = parsed[0]
    if limits is None:
        fields = {f.name for f in dataclasses.fields(ShapeLimits)}
        limits = ShapeLimits(**{k: v for k, v in source.limits.items() if k in fields})
    batch = limits.max_batch if max_batch is None else max_batch
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise InputError(f"max batch {batch!r} must be an integer of at least 1")
    if static is not None:
        sizes = [tuple(static)]
    if sizes is not None:
        if not sizes:
            raise InputError("no sizes given; write sizes like 512x512,768x768")
        for w, h in sizes:
            _check_side(facts, f"width of size {w}x{h}", w)
            _check_side(facts, f"height of size {w}x{h}", h)
        sides = [s for wh in sizes for s in wh]
        limits = ShapeLimits(min(sides), max(sizes[0]), max(sides), batch)
    else:
        for which in ("min_size", "opt_size", "max_size"):
            _check_side(facts, which.replace("_", " "), getattr(limits, which))
        if not limits.min_size <= limits.opt_size <= limits.max_size:
            raise InputError(f"sizes must satisfy min {limits.min_size} <= opt {limits.opt_size} <= max {limits.max_size}")
        limits = dataclasses.replace(limits, max_batch=batch)
    return limits, (tuple(static) if static is not None else None)


def network_profile(contract: NetworkContract, facts: ModelFacts, limits: ShapeLimits, static=None) -> dict:
    """{input: (min, opt, max)}: the contract's profile; with `static` (W, H), every size fixed at W x H."""
    if static is None:
        return limits.profile(contract, facts)
    w, h = static
    scale = facts.vae_scale_factor
    fixed = {"image_width": w, "image_height": h, "latent_width": w // scale, "latent_height": h // scale}
    dims = {which: {**limits.dims(facts, which), **fixed} for which in WHICH}
    return {s.name: tuple(contract.resolve(s, dims[which]) for which in WHICH) for s in contract.inputs}
