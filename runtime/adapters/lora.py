"""LoRA files: read (kohya and diffusers key layouts), match them to a model, fuse W += scale * alpha/r * up @ down.

Reading and the weight deltas are numpy; fusing into torch modules (the PyTorch backend, the exporter) imports
torch lazily. Layouts read, for the UNet and the CLIP text encoder of SD 1.x/2.x:
- kohya (sd-scripts, A1111): lora_unet_<module path with _>.lora_down/.lora_up/.alpha, lora_te_... (LoCon convs too);
- diffusers/PEFT: unet.<module>.lora_A/.lora_B (alphas from the file's lora_adapter_metadata, else alpha = rank),
  and the older unet.<...>.processor.to_q_lora.down/.up, <module>.lora.down/.up, lora_linear_layer.down/.up.
- LyCORIS LoHa (hada_w1_a/b, hada_w2_a/b) and LoKr (lokr_w1[_a/_b], lokr_w2[_a/_b]) in kohya naming: their deltas
  are exact when fused; run-time LoRA slots take a truncated-SVD factorisation (`slot_factors`, error recorded).
- SDXL (fused by load_lora or `sdrt export --lora`, or per call on LoRA slots): kohya's lora_te1_/lora_te2_ for the
  two text encoders and lora_unet_ in the original (LDM) UNet layout (input_blocks/middle_block/output_blocks, as
  sd-scripts writes it; mapped to diffusers' module names from the model's own layers, sdrt.adapters.ldm_names), or
  diffusers keys (unet., text_encoder., text_encoder_2.).
Unsupported kinds are refused by name: SDXL LoRAs on an SD 1.x/2.x model, Tucker-decomposed LyCORIS
(hada_t1, lokr_t2), DoRA, LoRAs with biases.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np

from sdrt.errors import BackendError, InputError, ModelError
from sdrt.model.manifest import sha256_of
from sdrt.adapters.ldm_names import ldm_unet_names
from sdrt.model.weights import read_weights

COMPONENTS = ("unet", "text_encoder")  # SD 1.x/2.x; SDXL adds "text_encoder_2"
SDXL_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_KOHYA_COMPONENT = {"unet": "unet", "te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2"}
_KOHYA = re.compile(r"^lora_(unet|te|te1|te2)_(.+)\.(lora_down\.weight|lora_up\.weight|alpha|hada_w[12]_[ab]|lokr_w[12](?:_[ab])?)$")
_LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
_LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
SVD_MAX_RANK = 64  # LoHa/LoKr deltas on run-time slots: truncated to at most this rank (their exact rank if lower)
# (suffix of the down key, suffix of the up key) of the dotted layouts, newest first.
_DOTTED = ((".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight"),
           (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"), (".down.weight", ".up.weight"))
# diffusers' old attention-processor names -> module names.
_PROCESSOR = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}
_TEXT_PROCESSOR = {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj", "to_out_lora": "out_proj"}
_UNET_ROOTS = ("down_blocks.", "up_blocks.", "mid_block.", "conv_in", "conv_out", "time_embedding.")


@dataclasses.dataclass
class LoraLayer:
    name: str  # dotted module path in the component (UNet2DConditionModel / the CLIP text model), or kohya's flat name
    flat: bool  # kohya: the path with "." written as "_", resolved against the model's own layer names
    down: np.ndarray  # [rank, in, (kh, kw)]
    up: np.ndarray  # [out, rank, (1, 1)]
    alpha: float | None  # None: alpha = rank (scale 1)
    rslora: bool = False  # PEFT's rank-stabilised scaling alpha / sqrt(rank)
    kind: str = "lora"  # "lora", "loha" or "lokr" (then down/up are None and `parts` holds the LyCORIS tensors)
    parts: dict | None = None

    @property
    def rank(self) -> int:
        if self.kind == "loha":
            return int(self.parts["hada_w1_b"].shape[0])
        if self.kind == "lokr":
            for key in ("lokr_w1_b", "lokr_w2_b"):
                if key in self.parts:
                    return int(self.parts[key].shape[0])
            return 0
        return int(self.down.shape[0])

    @property
    def scaling(self) -> float:
        if self.kind == "lokr" and (self.rank == 0 or self.alpha is None):  # LyCORIS: full w1 and w2 ignore alpha
            return 1.0
        alpha = float(self.rank if self.alpha is None else self.alpha)
        return alpha / (self.rank**0.5 if self.rslora else self.rank)

    def full_delta(self, shape: tuple) -> np.ndarray:
        """The LyCORIS delta (before alpha scaling) shaped like the weight: LoHa (w1a w1b) * (w2a w2b), LoKr kron(w1, w2)."""
        f = {k: np.asarray(v, np.float32) for k, v in self.parts.items()}
        if self.kind == "loha":
            w1 = f["hada_w1_a"].reshape(f["hada_w1_a"].shape[0], -1) @ f["hada_w1_b"].reshape(f["hada_w1_b"].shape[0], -1)
            w2 = f["hada_w2_a"].reshape(f["hada_w2_a"].shape[0], -1) @ f["hada_w2_b"].reshape(f["hada_w2_b"].shape[0], -1)
            if w1.shape != w2.shape or w1.size != int(np.prod(shape)):
                raise ValueError(f"LoHa products {w1.shape} and {w2.shape}")
            return (w1 * w2).reshape(shape)
        w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
        w2 = f["lokr_w2"] if "lokr_w2" in f else f["lokr_w2_a"] @ f["lokr_w2_b"].reshape(f["lokr_w2_b"].shape[0], -1)
        w1 = w1.reshape(w1.shape[0], -1)
        if w1.ndim != 2 or shape[0] % w1.shape[0] or shape[1] % w1.shape[1]:
            raise ValueError(f"LoKr w1 {w1.shape}")
        w2 = w2.reshape((shape[0] // w1.shape[0], shape[1] // w1.shape[1]) + tuple(shape[2:]))
        w1 = w1.reshape(w1.shape + (1,) * (len(shape) - 2))
        return np.kron(w1, w2).reshape(shape)


@dataclasses.dataclass
class LoraFile:
    path: Path
    layout: str  # "kohya" or "diffusers"
    layers: dict[str, list[LoraLayer]]  # component -> layers

    def record(self, scale: float) -> dict:
        """What a manifest or the pipeline records of a fused LoRA."""
        return {"file": self.path.name, "sha256": sha256_of(self.path), "scale": float(scale)}


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """'FILE[:SCALE]' (the CLI's --lora) -> (file, scale); a colon that is not followed by a number stays in the name."""
    path, sep, scale = spec.rpartition(":")
    if sep and path:
        try:
            return path, float(scale)
        except ValueError:
            pass
    return spec, 1.0


# --- reading ------------------------------------------------------------------------------------------------------


def read_lora(path: str | Path, components=COMPONENTS) -> LoraFile:
    """Read a LoRA file (or a built-in LoRA's name, sdrt.builtin.BUILTIN_LORAS) and sort its layers by component;
    refuses what sdrt cannot fuse, by name. components: the model's (SDXL_COMPONENTS for SDXL): an SDXL LoRA elsewhere
    is refused."""
    from sdrt.builtin import builtin_lora

    path = builtin_lora(path) or Path(path).expanduser()
    tensors, metadata = read_weights(path, "LoRA")
    keys = list(tensors)
    refusal = _refusal(keys, sdxl="text_encoder_2" in components)
    if refusal:
        raise ModelError(f"{path} is {refusal}; sdrt fuses plain LoRAs (kohya or diffusers layout) for SD 1.x/2.x, "
                         "and SDXL LoRAs into SDXL models (load_lora or `sdrt export --lora`)")
    if keys and all(_KOHYA.match(k) for k in keys):
        lora = LoraFile(path, "kohya", _read_kohya(path, tensors))
    else:
        lora = LoraFile(path, "diffusers", _read_dotted(path, tensors, metadata))
    _check_shapes(lora)
    return lora


def _check_shapes(lora: LoraFile) -> None:
    """down [rank, in(, kh, kw)] and up [out, rank(, 1, 1)] of one rank; a damaged file is named, not an IndexError."""
    for layers in lora.layers.values():
        for layer in layers:
            if layer.kind != "lora":
                if any(not np.all(np.isfinite(np.asarray(v, np.float32))) for v in layer.parts.values()):
                    raise ModelError(f"{lora.path}: layer {layer.name!r} holds non-finite values; the file is damaged")
                continue
            down, up = np.asarray(layer.down), np.asarray(layer.up)
            if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != down.shape[0] or down.shape[0] < 1:
                raise ModelError(
                    f"{lora.path}: layer {layer.name!r} has lora_down {down.shape} and lora_up {up.shape}; a LoRA needs "
                    "down [rank, in] and up [out, rank] (or 4-d conv kernels): the file is damaged or not a LoRA"
                )
            if layer.alpha is not None and not np.isfinite(layer.alpha):
                raise ModelError(f"{lora.path}: layer {layer.name!r} has alpha {layer.alpha}; the file is damaged")


def _refusal(keys: list[str], sdxl: bool = False) -> str | None:
    if not keys:
        return "empty"
    if not sdxl and any(k.startswith(("lora_te1_", "lora_te2_")) or k.startswith("text_encoder_2.") for k in keys):
        return "an SDXL LoRA (two text encoders)"
    if not sdxl and any(k.startswith("lora_unet_") and ("input_blocks" in k or "output_blocks" in k) for k in keys):
        return "a LoRA in the original (LDM) UNet layout (SDXL trainers write it)"
    if any(k.endswith((".hada_t1", ".hada_t2", ".lokr_t2")) for k in keys):
        return "a LyCORIS LoHa/LoKr with Tucker-decomposed conv kernels (hada_t1/lokr_t2)"
    if any((".hada_" in k or ".lokr_" in k) and not k.startswith(("lora_unet_", "lora_te_")) for k in keys):
        return "a LyCORIS LoHa/LoKr in a layout other than kohya's lora_unet_/lora_te_"
    if any("dora_scale" in k or "lora_magnitude_vector" in k for k in keys):
        return "a DoRA"
    if any(k.endswith(".lora_mid.weight") for k in keys):
        return "a LoCon with a CP-decomposed middle layer (lora_mid)"
    if any(k.endswith(("lora_B.bias", "lora_up.bias", ".up.bias")) for k in keys):
        return "a LoRA with bias terms"
    if not any(("lora" in k or ".hada_" in k or ".lokr_" in k) for k in keys):
        return "not a LoRA (no lora keys)"
    return None


def _read_kohya(path: Path, tensors: dict) -> dict[str, list[LoraLayer]]:
    layers: dict[str, list[LoraLayer]] = {c: [] for c in SDXL_COMPONENTS}
    lycoris: dict[str, dict] = {}
    for key in tensors:
        m = _KOHYA.match(key)
        if m.group(3).startswith(("hada_", "lokr_")):
            lycoris.setdefault(key[: -len(m.group(3)) - 1], {})[m.group(3)] = tensors[key]
        if m.group(3) != "lora_down.weight":
            continue
        base = key[: -len(".lora_down.weight")]
        up = tensors.get(base + ".lora_up.weight")
        if up is None:
            raise ModelError(f"{path}: {base} has lora_down but no lora_up; the LoRA file is damaged")
        alpha = tensors.get(base + ".alpha")
        component = _KOHYA_COMPONENT[m.group(1)]
        layers[component].append(LoraLayer(m.group(2), True, tensors[key], up, None if alpha is None else _scalar(path, base, alpha)))
    for base, parts in lycoris.items():
        m = _KOHYA.match(base + ".alpha")
        kind = "loha" if any(k.startswith("hada_") for k in parts) else "lokr"
        if kind == "loha" and set(parts) != set(_LOHA):
            raise ModelError(f"{path}: LoHa layer {base} has {sorted(parts)}; it needs {list(_LOHA)}: the file is damaged")
        if kind == "lokr" and not (("lokr_w1" in parts) != ({"lokr_w1_a", "lokr_w1_b"} <= set(parts))
                                   and ("lokr_w2" in parts) != ({"lokr_w2_a", "lokr_w2_b"} <= set(parts))):
            raise ModelError(f"{path}: LoKr layer {base} has {sorted(parts)}; it needs lokr_w1 (or _a/_b) and lokr_w2 "
                             "(or _a/_b): the file is damaged")
        alpha = tensors.get(base + ".alpha")
        component = _KOHYA_COMPONENT[m.group(1)]
        layers[component].append(LoraLayer(m.group(2), True, None, None, None if alpha is None else _scalar(path, base, alpha),
                                           kind=kind, parts=parts))
    return layers


def _scalar(path: Path, base: str, value) -> float:
    array = np.asarray(value)
    if array.size != 1 or not np.issubdtype(array.dtype, np.number):
        raise ModelError(f"{path}: {base}.alpha has shape {array.shape}; a LoRA's alpha is one number: the file is damaged")
    return float(array.reshape(()))


def _adapter_config(metadata: dict[str, str], component: str) -> dict:
    """PEFT LoraConfig values diffusers stores in the safetensors metadata ("unet.lora_alpha", ...)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        packed = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    return {k[len(component) + 1:]: v for k, v in packed.items() if k.startswith(component + ".")}


def _pattern_value(pattern: dict, name: str, default):
    for key, value in (pattern or {}).items():
        if name == key or name.endswith("." + key):
            return value
    return default


def _read_dotted(path: Path, tensors: dict, metadata: dict[str, str]) -> dict[str, list[LoraLayer]]:
    layers: dict[str, list[LoraLayer]] = {c: [] for c in SDXL_COMPONENTS}
    used = set()
    configs = {c: _adapter_config(metadata, c) for c in SDXL_COMPONENTS}
    for key in tensors:
        for down_suffix, up_suffix in _DOTTED:
            if key.endswith(down_suffix):
                break
        else:
            continue
        base = key[: -len(down_suffix)]
        up_key = base + up_suffix
        if up_key not in tensors:
            continue
        component, name = _component_and_module(base)
        if component is None:
            raise ModelError(f"{path}: LoRA layer {base!r} is for neither the UNet nor the text encoder")
        config = configs[component]
        if base + ".alpha" in tensors:  # network alphas stored as tensors, as kohya does
            alpha = _scalar(path, base, tensors[base + ".alpha"])
            used.add(base + ".alpha")
        else:
            alpha = _pattern_value(config.get("alpha_pattern"), name, config.get("lora_alpha"))
        layers[component].append(LoraLayer(name, False, tensors[key], tensors[up_key],
                                           None if alpha is None else float(alpha), bool(config.get("use_rslora"))))
        used.update((key, up_key))
    left = [k for k in tensors if k not in used]
    if left:
        raise ModelError(f"{path}: {len(left)} keys of this LoRA are in no layout sdrt reads (e.g. {left[0]!r})")
    return layers


def _component_and_module(base: str) -> tuple[str | None, str]:
    """A dotted LoRA key's base -> (component, module path in it)."""
    if base.startswith("unet."):
        component, name = "unet", base[len("unet."):]
    elif base.startswith("text_encoder."):
        component, name = "text_encoder", base[len("text_encoder."):]
    elif base.startswith("text_encoder_2."):
        component, name = "text_encoder_2", base[len("text_encoder_2."):]
    elif base.startswith(_UNET_ROOTS):
        component, name = "unet", base
    elif base.startswith("text_model."):
        component, name = "text_encoder", base
    else:
        return None, base
    if component.startswith("text_encoder"):
        name = name[len("text_model."):] if name.startswith("text_model.") else name
    parent, _, last = name.rpartition(".")
    if last in _PROCESSOR:  # the old attention-processor layout
        mapping = _PROCESSOR if component == "unet" else _TEXT_PROCESSOR
        parent = parent[: -len(".processor")] if parent.endswith(".processor") else parent
        name = f"{parent}.{mapping[last]}"
    return component, name


# --- matching and deltas -----------------------------------------------------------------------------------------


def _flat_index(component: str, names) -> dict[str, str]:
    index = {}
    for name in names:
        index[name.replace(".", "_")] = name
        if component.startswith("text_encoder"):  # kohya writes the text encoder's paths from CLIPTextModel: text_model_...
            index["text_model_" + name.replace(".", "_")] = name
    if component == "unet":  # SDXL trainers name the UNet's layers in the original (LDM) layout
        index.update({ldm.replace(".", "_"): name for ldm, name in ldm_unet_names(names).items() if ldm.replace(".", "_") not in index})
    return index


def match_layers(lora: LoraFile, targets: dict[str, dict[str, tuple]], what: str = "this model"):
    """[(component, module name, layer)] of the LoRA's layers in `targets` (component -> {module name: weight shape});
    ModelError naming a layer when one is not there: the LoRA was made for another model."""
    matched = []
    for component, layers in lora.layers.items():
        if not layers:
            continue
        shapes = targets.get(component, {})
        index = _flat_index(component, shapes)
        missing = []
        for layer in layers:
            name = index.get(layer.name) if layer.flat else (layer.name if layer.name in shapes else None)
            if name is None:
                missing.append(layer.name)
            else:
                matched.append((component, name, layer))
        if missing:
            raise ModelError(
                f"{lora.path} does not match {what}: {len(missing)} of its {len(layers)} {component} layers are "
                f"not in it (e.g. {missing[0]!r}); it was made for another model or architecture"
            )
    if not matched:
        raise ModelError(f"{lora.path} holds no UNet or text-encoder layers to fuse")
    return matched


def lora_deltas(lora: LoraFile, targets: dict[str, dict[str, tuple]], scale: float) -> dict[str, dict[str, np.ndarray]]:
    """Per component, {module name: float32 delta shaped like its weight} = scale * alpha/rank * up @ down.

    targets: component -> {module name (in the component's own naming): weight shape}. Raises ModelError when a
    layer of the LoRA is not in the model or has another shape: the LoRA was made for another model.
    """
    deltas: dict[str, dict[str, np.ndarray]] = {}
    for component, name, layer in match_layers(lora, targets):
        out = deltas.setdefault(component, {})
        delta = _delta(lora.path, name, layer, tuple(targets[component][name]), scale)
        out[name] = out[name] + delta if name in out else delta
    return deltas


def slot_factors(lora: LoraFile, targets: dict[str, dict[str, tuple]], max_rank: int = SVD_MAX_RANK):
    """Per component, {module name: (down, up)} at scale 1 (alpha/rank folded into up), in the slot's layout: Linear
    down [r, in], up [out, r]; Conv2d down [r, in, kh, kw], up [out, r, 1, 1]. LoHa/LoKr deltas become a truncated
    SVD of rank <= max_rank; returns (factors, worst relative Frobenius error of those, 0.0 when exact)."""
    factors: dict[str, dict[str, tuple]] = {}
    worst = 0.0
    for component, name, layer in match_layers(lora, targets, "this model's LoRA slots"):
        shape = tuple(targets[component][name])
        if layer.kind == "lora":
            _delta(lora.path, name, layer, shape, 1.0, product=False)  # the shape checks, naming the layer
            r = layer.rank
            down = layer.down.astype(np.float32).reshape((r,) + shape[1:] if len(shape) == 4 else (r, -1))
            if len(shape) == 2 and down.shape[1] != shape[1]:
                raise ModelError(f"{lora.path}: layer {name}: down {layer.down.shape} does not fit the weight {list(shape)}")
            up = layer.up.astype(np.float32).reshape(shape[0], r) * np.float32(layer.scaling)
        else:
            delta = _delta(lora.path, name, layer, shape, 1.0).reshape(shape[0], -1).astype(np.float64)
            u, sv, vt = np.linalg.svd(delta, full_matrices=False)
            keep = int(min(max_rank, np.sum(sv > sv[0] * 1e-6))) if sv.size and sv[0] > 0 else 0
            keep = max(keep, 1)
            root = np.sqrt(sv[:keep])
            up, down = (u[:, :keep] * root).astype(np.float32), (root[:, None] * vt[:keep]).astype(np.float32)
            norm = np.linalg.norm(sv)
            worst = max(worst, float(np.linalg.norm(sv[keep:]) / norm) if norm > 0 else 0.0)
            down = down.reshape((keep,) + shape[1:]) if len(shape) == 4 else down
        if len(shape) == 4:
            up = up.reshape(shape[0], -1, 1, 1)
        prev = factors.setdefault(component, {}).get(name)
        if prev is not None:
            down, up = np.concatenate([prev[0], down]), np.concatenate([prev[1], up], axis=1)
        factors[component][name] = (down, up)
    return factors, worst


def _delta(path: Path, name: str, layer: LoraLayer, shape: tuple, scale: float, product: bool = True) -> np.ndarray | None:
    if layer.kind != "lora":
        try:
            delta = layer.full_delta(shape)
        except ValueError as err:
            raise ModelError(
                f"{path} does not match this model: layer {name} has a weight of shape {list(shape)} but the "
                f"{'LoHa' if layer.kind == 'loha' else 'LoKr'} makes another ({err}); it was trained for another base model"
            ) from None
        return delta * np.float32(scale * layer.scaling)
    down, up = layer.down.astype(np.float32), layer.up.astype(np.float32)
    rank = layer.rank
    if up.ndim not in (2, 4) or up.shape[1] != rank or (up.ndim == 4 and up.shape[2:] != (1, 1)):
        raise ModelError(f"{path}: layer {name}: up {tuple(up.shape)} does not fit down {tuple(down.shape)}; "
                         "not a plain LoRA")
    rows, cols = up.shape[0], down.size // rank
    kernel_differs = len(shape) == 4 and down.ndim == 4 and down.shape[1:] != tuple(shape[1:])
    if rows != shape[0] or rows * cols != int(np.prod(shape)) or kernel_differs:
        raise ModelError(
            f"{path} does not match this model: layer {name} has a weight of shape {list(shape)} but the LoRA makes "
            f"{[rows, cols] if not kernel_differs else [rows, *down.shape[1:]]}; it was trained for another base model "
            "(SD 1.x and 2.x differ)"
        )
    if not product:
        return None
    product = up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)
    return (product * np.float32(scale * layer.scaling)).reshape(shape)


# --- fusing into torch modules -----------------------------------------------------------------------------------


def weight_shapes(module) -> dict[str, tuple]:
    """{module name: weight shape} of a torch module's Linear/Conv layers."""
    return {name: tuple(m.weight.shape) for name, m in module.named_modules()
            if name and getattr(m, "weight", None) is not None and m.weight.ndim in (2, 4)}


def fuse_into_modules(path, scale: float, modules: dict) -> dict:
    """Fuse the LoRA at `path` into torch modules {"unet": UNet2DConditionModel, "text_encoder": the CLIP text model
    (its core: embeddings/encoder/final_layer_norm)}; returns the record {"file", "sha256", "scale"}."""
    import torch

    if not isinstance(scale, (int, float)) or not np.isfinite(scale):
        raise InputError(f"LoRA scale {scale!r} is not a number; use e.g. 0.8")
    lora = read_lora(path, SDXL_COMPONENTS if "text_encoder_2" in modules else COMPONENTS)
    deltas = lora_deltas(lora, {c: weight_shapes(m) for c, m in modules.items()}, scale)
    with torch.no_grad():  # every check passed above: nothing is half-fused
        for component, layer_deltas in deltas.items():
            named = dict(modules[component].named_modules())
            for name, delta in layer_deltas.items():
                weight = named[name].weight
                fused = weight.float() + torch.from_numpy(delta).to(weight.device)
                weight.copy_(fused.to(weight.dtype))
    return lora.record(scale)


def fuse_lora_into_backend(backend, path, scale: float = 1.0) -> dict:
    """Fuse a LoRA into a running PyTorch backend's UNet and text encoder (the pipeline's load_lora)."""
    if getattr(backend, "name", None) != "torch":
        raise BackendError(
            f"load_lora fuses into the weights, which the {backend.name} backend holds compiled: switch LoRAs at run time "
            "with pipe.register_lora / pipe(..., loras={FILE: SCALE}) on an export made with `--lora-slots all`, fuse at "
            "export (`sdrt export MODEL OUT --lora FILE:SCALE`), or run the diffusers folder with --backend torch"
        )
    from sdrt.contracts import TEXT_ENCODER, TEXT_ENCODER_2, UNET

    modules = {"unet": backend.modules[UNET].unet}
    for network in (TEXT_ENCODER, TEXT_ENCODER_2):  # SDXL: both encoders; its refiner: the second only
        if network in backend.modules:
            modules[network] = backend.modules[network]
    return fuse_into_modules(path, scale, modules)
