"""Argument checks of the Python API: every argument is checked and resolved here, before any work.

Pure functions: each returns the argument resolved (a list of prompts, a float, an int seed...) or raises
InputError with one line naming the argument, the bad value and the fix. `Pipeline.__call__` (and its plan
step) call them; nothing here loads a network or allocates more than the arguments themselves.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings

import numpy as np

from sdrt.errors import InputError, ModelError

OUTPUT_TYPES = ("pil", "np", "latent")


def _short(value, limit: int = 60) -> str:
    """repr of a value, cut to `limit` characters, so that a message stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def check_text(text: str, name: str) -> str:
    """Refuse lone surrogates (undecodable bytes from a terminal in another encoding): the tokenizer needs valid
    UTF-8, and replacing them would silently change the prompt, so the user is asked to fix it instead."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = text[err.start : err.end]
        raise InputError(
            f"{name} {_short(text)} holds characters that are not valid UTF-8 ({bad!r} at position {err.start}, "
            "bytes the terminal did not decode); retype it or set a UTF-8 locale (LANG=C.UTF-8)"
        ) from None
    return text


def check_prompts(prompt) -> list[str]:
    """A string or a non-empty list of strings -> list of prompts."""
    if isinstance(prompt, str):
        return [check_text(prompt, "prompt")]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return [check_text(p, f"prompt {k}") for k, p in enumerate(prompt)]
    raise InputError(f"prompt {_short(prompt)} is not a string or a non-empty list of strings; pass e.g. \"a red 7\"")


def check_negatives(negative_prompt, n: int) -> list[str]:
    """None, a string (for every prompt) or one string per prompt -> n negative prompts."""
    if negative_prompt is None:
        return [""] * n
    if isinstance(negative_prompt, str):
        return [check_text(negative_prompt, "negative_prompt")] * n
    if not isinstance(negative_prompt, (list, tuple)) or not all(isinstance(p, str) for p in negative_prompt):
        raise InputError(f"negative_prompt {_short(negative_prompt)} is not a string or a list of strings; pass e.g. \"blue\"")
    if len(negative_prompt) != n:
        raise InputError(f"negative_prompt has {len(negative_prompt)} prompts for {n} prompts; pass one per prompt, or one string")
    return [check_text(p, f"negative_prompt {k}") for k, p in enumerate(negative_prompt)]


def check_seed(seed, batch: int = 1) -> int | None:
    """None (random) or an integer, numpy integers included, with seed + batch - 1 in torch's seed range."""
    if seed is None:
        return None
    if not _is_int(seed):
        raise InputError(f"seed {_short(seed)} is not an integer; pass e.g. seed=42 (or None for a random seed)")
    seed = int(seed)
    if not 0 <= seed <= 2**64 - batch:
        raise InputError(f"seed {seed} is outside 0..2**64-{batch} (image k of the batch uses seed + k); pass e.g. seed=42")
    return seed


def check_guidance(guidance_scale) -> float:
    """A finite real number >= 0 (<= 1 turns guidance off)."""
    if not _is_real(guidance_scale):
        raise InputError(f"guidance_scale {_short(guidance_scale)} is not a number; pass e.g. 7.5 (<= 1 turns guidance off)")
    value = float(guidance_scale)
    if not math.isfinite(value) or abs(value) > float(np.finfo(np.float32).max):  # the loop computes in float32
        raise InputError(f"guidance_scale {value} is not finite in float32; pass e.g. 7.5 (<= 1 turns guidance off)")
    if value < 0:
        raise InputError(f"guidance_scale {value} is negative; use 0-1 for no guidance, or e.g. 7.5")
    return value


def check_strength(strength) -> float:
    """img2img strength: a real number in (0, 1]."""
    if not _is_real(strength):
        raise InputError(f"strength {_short(strength)} is not a number; pass a value in (0, 1], e.g. 0.8")
    value = float(strength)
    if not 0.0 < value <= 1.0:  # NaN fails this too
        raise InputError(f"strength {value} is outside (0, 1]; 0.3 keeps most of the image, 1.0 replaces it")
    return value


def check_count(value, name: str) -> int:
    """A positive integer (num_images_per_prompt, num_inference_steps)."""
    if not _is_int(value) or value < 1:
        raise InputError(f"{name} {_short(value)} must be an integer >= 1")
    return int(value)


def _schedule_ok(scheduler, steps: int, strength: float) -> bool:
    """Whether `scheduler` builds finite tables for `steps` (past its maximum some index outside the training
    timesteps or divide by zero: DDIM/PNDM at 1000 of 1000 timesteps, DPM++ 2M from 999)."""
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            scheduler.set_timesteps(steps, strength)
    except InputError:
        return False
    tables = (scheduler.timesteps, scheduler.coefficients, scheduler.input_scale, scheduler.noise_coefficients)
    return all(np.all(np.isfinite(t)) for t in tables)


def check_steps(steps, scheduler, strength: float = 1.0) -> int:
    """Steps the scheduler can run: set its timesteps, or name the most it supports."""
    steps = check_count(steps, "num_inference_steps")
    if steps <= scheduler.num_train_timesteps and _schedule_ok(scheduler, steps, 1.0):
        scheduler.set_timesteps(steps, strength)  # strength's own error (e.g. no step left to run)
        return steps
    # The fewest steps that work (PNDM's Runge-Kutta warm-up needs 4), then bisect: lo works, hi does not.
    lo = next((k for k in (1, 2, 3, 4) if k <= steps and _schedule_ok(scheduler, k, 1.0)), None)
    hi = min(steps, scheduler.num_train_timesteps + 1)
    if lo is None or lo >= hi:
        if steps < 4:
            scheduler.set_timesteps(steps, strength)  # the scheduler's own error (e.g. too few steps for it)
        raise ModelError(f"the {scheduler.name} scheduler cannot build a schedule from this model's config")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _schedule_ok(scheduler, mid, 1.0) else (lo, mid)
    raise InputError(f"num_inference_steps {steps} is more than the {scheduler.name} scheduler supports here; use at most {lo}")


def check_output_type(output_type) -> str:
    if output_type not in OUTPUT_TYPES:
        raise InputError(f"output_type {_short(output_type)} is not one of {', '.join(map(repr, OUTPUT_TYPES))}")
    return output_type


def check_size(facts, height, width, init_size: tuple[int, int] | None = None) -> tuple[int, int]:
    """Height and width: None takes the init image's size (rounded down to the size step) or the model's default;
    each must be a positive multiple of the model's size step."""
    step = facts.size_step
    resolved = []
    for name, value, index in (("height", height, 1), ("width", width, 0)):
        if value is None:
            value = facts.default_size if init_size is None else max(step, init_size[index] // step * step)
        if not _is_int(value):
            raise InputError(f"{name} {_short(value)} is not an integer; use a multiple of {step}, e.g. {facts.default_size}")
        value = int(value)
        if value < 1:
            raise InputError(f"{name} {value} is not positive; use a positive multiple of {step}, e.g. {facts.default_size}")
        if value % step:
            lower, upper = max(step, value // step * step), (value + step - 1) // step * step
            options = f"{lower}" if lower == upper else f"{lower} or {upper}"
            raise InputError(f"{name} {value} is not a multiple of {step} for this model; use {options}")
        resolved.append(value)
    return resolved[0], resolved[1]


def check_latents(latents, shape: tuple[int, ...]):
    """None, or a finite float numpy array of exactly `shape` [batch, channels, h, w] (returned as float32)."""
    if latents is None:
        return None
    if not isinstance(latents, np.ndarray):
        raise InputError(f"latents of type {type(latents).__name__} are not a numpy array; pass np.ndarray of shape {shape}")
    if tuple(latents.shape) != tuple(shape):
        raise InputError(f"latents have shape {tuple(latents.shape)}; expected {tuple(shape)} (images, latent channels, height and width / the VAE's scale)")
    if not np.issubdtype(latents.dtype, np.floating):
        raise InputError(f"latents have dtype {latents.dtype}; pass float32 noise, e.g. np.random.randn(*{tuple(shape)})")
    if not np.all(np.isfinite(latents)):
        raise InputError("latents hold NaN or inf; pass finite noise, e.g. np.random.randn(...).astype(np.float32)")
    return latents.astype(np.float32, copy=False)


def check_image(image, max_pixels: int | None = None):
    """None, or the init image as an RGB PIL image (paths decoded with a pixel limit; see sdrt.images)."""
    if image is None:
        return None
    from sdrt.images import load_image

    return load_image(image, max_pixels=max_pixels)


def check_memory(source, backend: str, batch: int, height: int, width: int, guidance: bool, img2img: bool,
                 max_memory=None) -> int:
    """Refuse a request whose estimated peak memory exceeds the budget (see sdrt.memory), naming what fits."""
    from sdrt.memory import check_request

    return check_request(source.facts, source.manifest, source.path, batch, height, width, guidance, img2img,
                         max_memory, backend)


def check_export_limits(backend, facts, batch: int, height: int, width: int, guidance: bool, img2img: bool) -> None:
    """Shapes a backend with fixed profiles cannot run are refused before any network runs. TensorRT engines serve
    their build profile only (each engine's check_shapes). ONNX exports have dynamic height, width and batch axes
    (sdrt.contracts), so ONNX Runtime runs past the manifest's `limits`, which then only say what the export was
    parity-checked and tuned for; there the memory check decides what fits."""
    c, lh, lw = facts.latent_channels, height // facts.vae_scale_factor, width // facts.vae_scale_factor
    unet_c = facts.unet_input_channels  # an inpainting UNet also takes the mask and the masked-image latents
    wanted = {"unet": {"sample": (batch * (2 if guidance else 1), unet_c, lh, lw)}, "vae_decoder": {"latent": (batch, c, lh, lw)}}
    if img2img:
        wanted["vae_encoder"] = {"image": (1, 3, height, width)}
    backend.check_shapes(wanted)


# --- backend options ----------------------------------------------------------------------------------------

def _opt_int(v):
    return v is None or (_is_int(v) and v >= 1)


def _bool(v):
    return isinstance(v, bool)


def _opt_bool(v):
    return v is None or isinstance(v, bool)


def _device_id(v):
    return _is_int(v) and v >= 0


def _str_list(v):
    return isinstance(v, (list, tuple)) and all(isinstance(p, str) for p in v)


# backend -> option -> (test, what it takes). tests/test_hardening.py checks these against the constructors.
BACKEND_OPTIONS = {
    "onnx": {
        "providers": (lambda v: v is None or _str_list(v), "a list of ONNX Runtime provider names"),
        "threads": (_opt_int, "an integer >= 1"),
        "optimized_cache": (_bool, "True or False"),
        "fusions": (_bool, "True or False"),
        "device_id": (_device_id, "an integer >= 0"),
        "static_shapes": (_opt_bool, "True, False or None"),
        "batch_parallel": (_opt_bool, "True, False or None"),
        "route": (lambda v: v is None or v in ("auto", "cuda", "tensorrt", "cpu"), "'auto', 'cuda', 'tensorrt' or 'cpu'"),
        "shape_sessions": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
        "step_split": (_bool, "True or False"),
    },
    "torch": {
        "device": (lambda v: v is None or (isinstance(v, str) and (v in ("cpu", "cuda", "auto") or v.startswith("cuda:"))),
                   "'cpu', 'cuda', 'cuda:N' or 'auto'"),
        "dtype": (lambda v: v in (None, "fp32", "fp16"), "'fp32' or 'fp16'"),
        "threads": (_opt_int, "an integer >= 1"),
        "device_loop": (_opt_bool, "True, False or None"),
        "cuda_graphs": (_bool, "True or False"),
        "channels_last": (_bool, "True or False"),
    },
    "tensorrt": {
        "device_id": (_device_id, "an integer >= 0"),
        "threads": (_opt_int, "an integer >= 1"),
        "device_loop": (_bool, "True or False"),
        "cuda_graphs": (_bool, "True or False"),
        "machine": (lambda v: True, "a MachineInfo"),
    },
}
_OPTION_HINTS = {"fp16": "precision is chosen at export (`sdrt export --fp16`); the torch backend takes dtype='fp16'"}


def check_backend_options(backend: str, options: dict) -> dict:
    """Refuse options the backend does not take, or of the wrong type, naming the option and the backend."""
    known = BACKEND_OPTIONS.get(backend, {})
    for name, value in options.items():
        if name not in known:
            hint = _OPTION_HINTS.get(name, f"it takes {', '.join(known) or 'none'}")
            raise InputError(f"{name}={_short(value)} is not an option of the {backend} backend; {hint}")
        test, takes = known[name]
        if not test(value):
            raise InputError(f"{backend} backend option {name}={_short(value)} is invalid; pass {takes}")
    return options


def check_before_load(model, backend: str, height, width, image, batch: int, guidance, max_memory=None) -> None:
    """The memory check from the model folder's files alone, before any network is loaded (the CLI calls this;
    plan() checks again with everything resolved). Only where the backend will run on the CPU: ONNX Runtime
    without CUDA; torch and TensorRT are checked in plan(), once their device is known."""
    from sdrt.model.source import open_model

    if model is None:
        from sdrt.builtin import builtin_model_dir

        model = builtin_model_dir()
    source = open_model(model)
    name = source.default_backend() if backend == "auto" else backend
    if name != "onnx":
        return
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return
    init_size = None
    if isinstance(image, (str, os.PathLike)):
        from PIL import Image

        try:
            with Image.open(image) as im:  # the header only
                init_size = im.size
        except Exception:  # noqa: BLE001 - plan() names what is wrong with the image
            return
    height, width = check_size(source.facts, height, width, init_size)
    guided = check_guidance(guidance) > 1.0
    check_memory(source, name, batch, height, width, guided, image is not None, max_memory)
