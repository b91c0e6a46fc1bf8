"""The digits LCM-LoRA (issue #20): the built-in model draws in 4 steps, judged by the oracle, and the package stays
inside its size budget. Measured figures and the comparison with the base model's samplers: runtime/models/digits/
README.md ("Four steps") and benchmarks/results/lcm-digits.md."""

from pathlib import Path

import numpy as np
import pytest

import sdrt
from sdrt.builtin import BUILTIN_LORAS, MODELS_DIR, builtin_lora
from sdrt.oracle import DigitOracle

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
PROMPTS = [(d, COLOURS[(d * 3 + k) % 8]) for k in range(5) for d in range(10)]  # tests/test_digits.py's 50 prompts
PACKAGE_BUDGET = 22_000_000  # bytes: every shipped model together (issue #20)
# The bars, held over 150 images (the 50 prompts at seeds 0, 1000 and 2000: 50 images alone move 2 points per
# image) at 4 steps, guidance 1 (PyTorch backend, run-time LoRA). Measured: digit 98/100/96%, colour 78/90/98% (mean
# 98.0% / 88.7%); at seed 0 alone, the quality table's protocol, colour misses the bar (78%).
DIGIT_AT_4, COLOUR_AT_4 = 0.95, 0.85
SEEDS = (0, 1000, 2000)


def test_shipped_models_fit_the_package_budget():
    # (hidden folders are caches the runtime writes beside a model, e.g. ONNX Runtime's .ort_cache, never shipped)
    files = [f for f in Path(MODELS_DIR).rglob("*") if f.is_file() and not any(
        part.startswith(".") for part in f.relative_to(MODELS_DIR).parts)]
    total = sum(f.stat().st_size for f in files)
    assert total <= PACKAGE_BUDGET, f"runtime/models holds {total / 1e6:.2f} MB > {PACKAGE_BUDGET / 1e6:.0f} MB"
    assert builtin_lora("digits-lcm") == MODELS_DIR / BUILTIN_LORAS["digits-lcm"] and builtin_lora("elsewhere") is None


def test_four_lcm_steps_draw_digit_and_colour():
    pytest.importorskip("diffusers")
    pipe = sdrt.Pipeline.from_pretrained(MODELS_DIR / "digits", backend="torch", threads=1)
    read = []
    for seed in SEEDS:
        images = pipe([f"a {c} {d}" for d, c in PROMPTS], num_inference_steps=4, guidance_scale=1.0, seed=seed, scheduler="lcm",
                      loras={"digits-lcm": 1.0}, output_type="np", progress=False).images
        read += DigitOracle.load().classify(images)
    digit = float(np.mean([r[0] == d for r, (d, _) in zip(read, PROMPTS * len(SEEDS))]))
    colour = float(np.mean([r[1] == c for r, (_, c) in zip(read, PROMPTS * len(SEEDS))]))
    assert digit >= DIGIT_AT_4 and colour >= COLOUR_AT_4, (digit, colour)


def test_distillation_command_runs(tmp_path):
    """`python -m sdrt.export.digits.lcm` end to end (a few steps): it writes a LoRA that sdrt reads for the built-in model."""
    pytest.importorskip("diffusers")
    from sdrt.adapters.lora import read_lora
    from sdrt.export.digits.lcm import main

    main(["--smoke", "--out", str(tmp_path)])
    log = (tmp_path / "lcm_log.txt").read_text()
    assert "lcm step" in log and "done:" in log
    lora = read_lora(tmp_path / "digits_lcm_lora.safetensors")
    shipped = read_lora("digits-lcm")
    assert {layer.name for layer in lora.layers["unet"]} == {layer.name for layer in shipped.layers["unet"]}
    assert len(lora.layers["unet"]) > 100 and not lora.layers["text_encoder"]
