"""The built-in model: a tiny Stable Diffusion of coloured handwritten digits, shipped inside the package."""

from __future__ import annotations

from pathlib import Path

from sdrt.errors import ModelError

MODELS_DIR = Path(__file__).parent / "models"


def builtin_model_dir() -> Path:
    path = MODELS_DIR / "digits"
    if not (path / "model_index.json").exists() and not (path / "manifest.json").exists():
        raise ModelError(f"the built-in digits model is missing from this install ({path}); pass --model FOLDER")
    return path


# LoRAs shipped beside the built-in model, by the name a LoRA file path may be given as (when no such file exists).
BUILTIN_LORAS = {
    # issue #20: latent consistency distillation (sdrt.export.digits.lcm) for 4-step images with the `lcm` scheduler
    # at guidance 1: `sdrt generate "a red 7" --lora digits-lcm --scheduler lcm --steps 4 -g 1 --backend torch`
    "digits-lcm": "digits_lcm_lora.safetensors",
}


def builtin_lora(path) -> Path | None:
    """The packaged file of a built-in LoRA name ("digits-lcm"), or None when `path` is not one (or is a real file)."""
    key = str(path)
    if key not in BUILTIN_LORAS or Path(key).expanduser().exists():
        return None
    return MODELS_DIR / BUILTIN_LORAS[key]
