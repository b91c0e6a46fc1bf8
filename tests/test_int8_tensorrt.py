"""`sdrt build --int8/--fp8` (issue 22): Model Optimizer's ONNX Q/DQ pass before a strongly typed TensorRT build.

Neither TensorRT nor Model Optimizer runs here: a fake quantiser with Model Optimizer's documented signature
(modelopt.onnx.quantization.quantize) and a fake engine builder stand in, on the tiny model's real ONNX export, so
the calibration recorded from the export, the arguments passed, the flags and keys, and the refusals are what is
tested. The real call never ran.
"""

import json

import numpy as np
import pytest

from sdrt.cli import main
from sdrt.errors import BackendError, InputError
from sdrt.backends.tensorrt_machine import MachineInfo
from sdrt.export.tensorrt_build import build_engines

H100 = MachineInfo("NVIDIA H100 80GB HBM3", "9.0", "11.4.0")


class FakeQuantizer:
    """modelopt.onnx.quantization.quantize's keyword signature: records the call, copies the graph to output_path."""

    def __init__(self):
        self.calls = []

    def __call__(self, onnx_path, quantize_mode="int8", calibration_data=None, output_path=None, **kwargs):
        from pathlib import Path

        self.calls.append({"onnx_path": onnx_path, "quantize_mode": quantize_mode, "calibration_data": calibration_data,
                           "output_path": output_path, **kwargs})
        Path(output_path).write_bytes(Path(onnx_path).read_bytes())


def fake_builder(onnx_path, profile, flags, timing_cache):
    timing_cache.write_bytes(b"t")
    return f"engine {onnx_path.parent.name} {json.dumps(flags)}".encode()


def fake_fp16(src, dst, upcast):
    dst.write_bytes(src.read_bytes())


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_unet_goes_through_model_optimizer_with_recorded_calibration(onnx_sd1, tmp_path, mode):
    quantizer = FakeQuantizer()
    out = tmp_path / "trt"
    report = build_engines(onnx_sd1, out, machine=H100, engine_builder=fake_builder, fp16_converter=fake_fp16,
                           progress=False, timing_cache=tmp_path / "t.cache", quantize=mode,
                           calibration_prompts=["a red cat", "a blue dog"], quantizer=quantizer)
    assert len(quantizer.calls) == 1  # the UNet only
    call = quantizer.calls[0]
    assert call["quantize_mode"] == mode and call["high_precision_dtype"] == "fp16"
    assert call["calibration_method"] == {"int8": "entropy", "fp8": "max"}[mode]
    assert call["onnx_path"].endswith("unet/model.onnx") and len(call["nodes_to_exclude"]) == 2  # first/last conv
    data = call["calibration_data"]
    assert set(data) == {"sample", "timestep", "encoder_hidden_states"}
    n = data["sample"].shape[0]
    assert n >= 4 and data["timestep"].shape == (n,) and data["encoder_hidden_states"].shape[0] == n
    assert len(np.unique(data["timestep"])) >= 3  # a spread of timesteps, not one
    flags = {name: plan.flags for name, plan in report.plans.items()}
    assert flags["unet"]["precision"] == f"{mode}+fp16" and flags["unet"]["strongly_typed"]
    assert flags["vae_decoder"]["precision"] == "fp16"
    assert mode in report.plans["unet"].key or report.plans["unet"].fields["flags"]["precision"] == f"{mode}+fp16"


def test_refusals_before_any_work(onnx_sd1, tmp_path, capsys):
    with pytest.raises(BackendError, match="Model Optimizer"):
        build_engines(onnx_sd1, tmp_path / "a", machine=H100, engine_builder=fake_builder, progress=False, quantize="int8")
    assert not (tmp_path / "a").exists()
    with pytest.raises(InputError, match="not one of"):
        build_engines(onnx_sd1, tmp_path / "b", dry_run=True, quantize="int4")
    assert main(["build", str(onnx_sd1), str(tmp_path / "c"), "--calibration-prompts", "p.txt", "--dry-run"]) == 2
    assert "goes with --int8" in capsys.readouterr().err


def test_ort_int8_export_is_refused(onnx_sd1, tmp_path):
    import shutil

    from sdrt.model.manifest import read_manifest

    copy = tmp_path / "int8"
    shutil.copytree(onnx_sd1, copy)
    manifest = read_manifest(copy)
    manifest.networks["unet"]["precision"] = "int8"
    manifest.write(copy)
    with pytest.raises(InputError, match="already int8"):
        build_engines(copy, tmp_path / "out", dry_run=True, quantize="fp8")


def test_dry_run_shows_the_quantised_unet(onnx_sd1, tmp_path, capsys):
    assert main(["build", str(onnx_sd1), str(tmp_path / "d"), "--int8", "--dry-run"]) == 0
    assert "int8+fp16" in capsys.readouterr().out
