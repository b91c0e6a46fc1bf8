"""Run-time LoRAs: registered once, switched per call on any backend with LoRA slots, the weights never touched.

Each network with slots (sdrt.contracts.LoraSlot: the UNet and the text encoder of an export made with
`--lora-slots`, or the PyTorch backend's own modules) computes y = W x + up(down(x)) on its slot layers. A
registered LoRA keeps its factors per network and layer at scale 1 (alpha/rank folded into up); a request's set
{name: scale} is concatenated along the rank axis with each scale folded into its up factors, and handed to the
backend (`set_lora_factors`), which feeds them as inputs (ONNX Runtime, TensorRT) or adds them by forward hooks
(PyTorch). Layers no active LoRA adapts get rank-0 (empty) factors: the exported graph runs as without LoRAs.
LoHa/LoKr deltas are not low-rank products: they are factorised by a truncated SVD (rank <= max_rank; the
relative Frobenius error is recorded as `svd_error`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from sdrt.contracts import TEXT_ENCODER, TEXT_ENCODER_2, UNET
from sdrt.errors import InputError, ModelError

# LoRA file component -> network (SDXL: kohya's lora_te1_/lora_te2_, diffusers' text_encoder./text_encoder_2.)
SLOT_NETWORKS = {"unet": UNET, "text_encoder": TEXT_ENCODER, "text_encoder_2": TEXT_ENCODER_2}


@dataclasses.dataclass
class RegisteredLora:
    name: str
    path: Path
    sha256: str
    factors: dict  # network -> {layer: (down, up)} at scale 1
    svd_error: float  # worst relative Frobenius error of a LoHa/LoKr layer's factorisation (0: exact)

    @property
    def rank(self) -> int:
        return max((d.shape[0] for layers in self.factors.values() for d, _ in layers.values()), default=0)


def register(pipe, path, name: str | None = None, max_rank: int | None = None) -> str:
    from sdrt.adapters.lora import COMPONENTS, SDXL_COMPONENTS, SVD_MAX_RANK, read_lora, slot_factors
    from sdrt.model.manifest import sha256_of

    from sdrt.builtin import builtin_lora

    path = builtin_lora(path) or Path(path).expanduser()
    name = name or path.stem
    if not isinstance(name, str) or not name or any(c in name for c in "<>:"):
        raise InputError(f"LoRA name {name!r} must be a non-empty string without '<', '>' or ':'")
    slots = {component: pipe.backend.lora_slots(network) for component, network in SLOT_NETWORKS.items()}
    if not any(slots.values()):
        raise ModelError(
            f"the {pipe.backend.name} backend's networks take no run-time LoRAs: export with LoRA slots "
            "(`sdrt export MODEL OUT --lora-slots all`), fuse the LoRA at export (`--lora FILE:SCALE`), or use --backend torch"
        )
    sdxl = bool(getattr(pipe, "is_sdxl", False))  # an SDXL LoRA is refused by name on SD 1.x/2.x models
    lora = read_lora(path, SDXL_COMPONENTS if sdxl else COMPONENTS)
    targets = {c: {s.layer: tuple(s.weight) for s in layer_slots} for c, layer_slots in slots.items()}
    factors, error = slot_factors(lora, targets, max_rank or SVD_MAX_RANK)
    pipe.registered_loras[name] = RegisteredLora(name, path, sha256_of(path),
                                                 {SLOT_NETWORKS[c]: f for c, f in factors.items()}, error)
    _forget_active(pipe, name)  # re-registered under an active name: the next call feeds its new factors
    return name


def _forget_active(pipe, name: str) -> None:
    """The next call re-feeds its LoRAs when `name` is active now. Never a switch here: a server registers from
    another thread while a batch runs, and a switch then would change factors between two of its steps."""
    if pipe.active_loras is None or any(n == name for n, _ in pipe.active_loras):
        pipe.active_loras = None  # unknown: activate() feeds whatever the next call asks, even ()


def unregister(pipe, name: str) -> None:
    if name not in pipe.registered_loras:
        raise InputError(f"no LoRA named {name!r} is registered (registered: {', '.join(pipe.registered_loras) or 'none'})")
    del pipe.registered_loras[name]
    _forget_active(pipe, name)


def resolve_loras(pipe, loras) -> tuple:
    """{name or file: scale} / [(name, scale)] / None -> ((name, scale), ...) sorted by name, zero scales dropped;
    files not registered yet are registered (under their stem, or the path when the stem is taken by another file)."""
    if not loras:
        return ()
    pairs = loras.items() if isinstance(loras, dict) else loras
    out: dict[str, float] = {}
    for item in pairs:
        try:
            key, scale = item
        except (TypeError, ValueError):
            raise InputError(f"loras takes {{name: scale}} or [(name, scale)]; got {item!r}") from None
        if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)) or not np.isfinite(scale):
            raise InputError(f"LoRA scale {scale!r} for {key!r} is not a finite number; use e.g. 0.8")
        name = _name_of(pipe, key)
        out[name] = out.get(name, 0.0) + float(scale)
    return tuple(sorted((n, s) for n, s in out.items() if s != 0.0))


def _name_of(pipe, key) -> str:
    key = str(key)
    if key in pipe.registered_loras:
        return key
    from sdrt.builtin import builtin_lora

    path = builtin_lora(key) or Path(key).expanduser()
    for reg in pipe.registered_loras.values():
        if path.exists() and reg.path.exists() and reg.path.resolve() == path.resolve():
            return reg.name
    if path.is_file():
        name = path.stem if path.stem not in pipe.registered_loras else key.replace(":", "_")
        return register(pipe, path, name)
    raise InputError(
        f"LoRA {key!r} is neither a registered name ({', '.join(pipe.registered_loras) or 'none registered'}) nor a "
        "file; pipe.register_lora(path, name=...) first"
    )


def combined_factors(pipe, loras: tuple) -> dict:
    """network -> {layer: (down, up)}: the LoRAs' factors concatenated along the rank axis, scales folded into up."""
    merged: dict = {}
    for name, scale in loras:
        reg = pipe.registered_loras[name]
        for network, layers in reg.factors.items():
            out = merged.setdefault(network, {})
            for layer, (down, up) in layers.items():
                up = up * np.float32(scale)
                if layer in out:
                    d0, u0 = out[layer]
                    down, up = np.concatenate([d0, down]), np.concatenate([u0, up], axis=1)
                out[layer] = (down, up)
    return merged


def activate(pipe, loras: tuple, force: bool = False) -> None:
    if pipe.active_loras is not None and tuple(loras) == pipe.active_loras and not force:
        return
    for name, _ in loras:
        if name not in pipe.registered_loras:
            raise InputError(f"LoRA {name!r} is not registered")
    merged = combined_factors(pipe, loras)
    for network in SLOT_NETWORKS.values():
        if pipe.backend.lora_slots(network) or merged.get(network):
            pipe.backend.set_lora_factors(network, merged.get(network, {}))
    pipe.active_loras = tuple(loras)
