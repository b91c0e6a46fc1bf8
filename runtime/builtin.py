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
