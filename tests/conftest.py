"""Session fixtures shared by the test files: tiny random-weight models and their ONNX exports.

Each is built once per session (a tiny model ~5-10 s, an export ~12 s here) in pytest's temporary folder.
"""

import os

import pytest

# One torch (OpenMP) thread in tests: on this 2-core machine shared with a training run, a 4-step tiny-model
# pipeline took 13-18 s with torch's default 2 threads (OpenMP threads spin against the other load) and 0.8-0.9 s
# with 1. Set before any test module imports torch; an explicit OMP_NUM_THREADS wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from sdrt.contracts import ShapeLimits

# The exports serve 32-128 px (the tiny models' size step is 32, their default size 64), batch up to 2.
TEST_LIMITS = ShapeLimits(min_size=32, opt_size=64, max_size=128, max_batch=2)


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory):
    from sdrt.export.tiny import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny") / "sd1", "sd1")


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory):
    from sdrt.export.tiny import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny") / "sd2", "sd2")


@pytest.fixture(scope="session")
def tiny_sd1_inpaint(tmp_path_factory):
    """tiny_sd1's shape with a 9-channel inpainting UNet (a StableDiffusionInpaintPipeline folder)."""
    from sdrt.export.tiny import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny") / "sd1-inpaint", "sd1", inpainting=True)


def _export(model_dir, out_dir, **options):
    from sdrt.export.onnx_export import export_model

    export_model(model_dir, out_dir, limits=TEST_LIMITS, progress=False, **options)
    return out_dir


@pytest.fixture(scope="session")
def onnx_sd1(tiny_sd1, tmp_path_factory):
    """fp32 ONNX export of tiny_sd1 (the export's own parity check runs too)."""
    return _export(tiny_sd1, tmp_path_factory.mktemp("onnx") / "sd1")


@pytest.fixture(scope="session")
def onnx_sd1_slots(tiny_sd1, tmp_path_factory):
    """fp32 ONNX export of tiny_sd1 with LoRA slots on every adaptable layer (run-time LoRAs)."""
    return _export(tiny_sd1, tmp_path_factory.mktemp("onnx-slots") / "sd1", lora_slots="all")


@pytest.fixture(scope="session")
def onnx_sd2(tiny_sd2, tmp_path_factory):
    return _export(tiny_sd2, tmp_path_factory.mktemp("onnx") / "sd2")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    from sdrt.export.tiny import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny") / "sdxl")


@pytest.fixture(scope="session")
def tiny_sdxl_refiner(tmp_path_factory):
    from sdrt.export.tiny import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny") / "sdxl-refiner", refiner=True)


@pytest.fixture(scope="session")
def onnx_sdxl(tiny_sdxl, tmp_path_factory):
    """fp32 ONNX export of tiny_sdxl (both text encoders; the export's own parity check runs too)."""
    return _export(tiny_sdxl, tmp_path_factory.mktemp("onnx") / "sdxl")
