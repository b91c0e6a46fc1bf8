"""int8 / fp8 TensorRT engines for the UNet through NVIDIA Model Optimizer's ONNX flow (`sdrt build --int8/--fp8`).

TensorRT 11 removed implicit quantisation (BuilderFlag.INT8/FP8 and calibrators): low precision comes only from
explicit Q/DQ nodes in the ONNX graph, built strongly typed. Model Optimizer's documented ONNX path writes them:
`modelopt.onnx.quantization.quantize(onnx_path, quantize_mode="int8"|"fp8", calibration_data=..., output_path=...,
high_precision_dtype="fp16")` places Q/DQ per TensorRT's rules (inputs of Conv/MatMul/Gemm), calibrates ranges
(entropy for int8, max for fp8) and casts what stays unquantised to fp16; `sdrt build` then builds that graph
strongly typed, as it builds every engine.

Calibration data: the UNet's real inputs, recorded while the ONNX export itself samples prompts on the CPU
(sdrt.export.int8_quality.record_unet_feeds, as `sdrt export --int8` does), stacked into one array per input.

Never run here: no GPU, TensorRT or Model Optimizer on the machines this was written on. Written to Model
Optimizer's documented signature and tested with a fake quantiser (tests/test_int8_tensorrt.py).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from sdrt.errors import BackendError, InputError

MODES = ("int8", "fp8")
QUANTIZED = "unet"  # the network quantised; the text encoder and VAE stay fp16
CALIBRATION = {"int8": "entropy", "fp8": "max"}  # Model Optimizer's defaults per mode
MODELOPT_HINT = "pip install 'nvidia-modelopt[onnx]' (NVIDIA Model Optimizer) on the GPU machine"


def require_modelopt() -> None:
    """BackendError with the install hint when Model Optimizer's ONNX quantisation cannot be imported."""
    if importlib.util.find_spec("modelopt") is None:
        raise BackendError(f"sdrt build --int8/--fp8 needs NVIDIA Model Optimizer (modelopt), which is not installed: {MODELOPT_HINT}")
    try:
        from modelopt.onnx.quantization import quantize  # noqa: F401
    except Exception as err:  # an install without the onnx extra, or a broken one
        raise BackendError(f"modelopt.onnx.quantization cannot be imported ({type(err).__name__}: {err}): {MODELOPT_HINT}") from None


def check_mode(mode: str | None, precision: str) -> None:
    if mode is None:
        return
    if mode not in MODES:
        raise InputError(f"quantisation {mode!r} is not one of {', '.join(MODES)}")
    if precision == "int8":
        raise InputError("this export's UNet is already int8 for ONNX Runtime (`sdrt export --int8`); build TensorRT "
                         "engines from an fp32 or fp16 export (`sdrt export` without --int8)")


def stack_feeds(feeds: list[dict]) -> dict[str, np.ndarray]:
    """Recorded UNet calls -> one array per input, concatenated along the batch axis (Model Optimizer's format)."""
    if not feeds:
        raise InputError("no calibration data: the UNet was never called while sampling the calibration prompts")
    return {name: np.concatenate([f[name] for f in feeds]) for name in feeds[0]}


def first_last_convs(path: Path) -> list[str]:
    """Names of the UNet's first and last Conv, kept in high precision (as for the CPU int8 export)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    convs = [n.name for n in model.graph.node if n.op_type == "Conv" and n.name]
    return sorted({convs[0], convs[-1]}) if convs else []


def quantize_onnx(src: Path, dst: Path, mode: str, calibration: dict[str, np.ndarray], quantizer=None) -> None:
    """Write `dst`: `src` with Model Optimizer's Q/DQ nodes for `mode`, the rest in fp16. quantizer: the function to
    call (default modelopt.onnx.quantization.quantize; tests pass a fake with the same signature)."""
    if quantizer is None:
        require_modelopt()
        from modelopt.onnx.quantization import quantize as quantizer
    src, dst = Path(src), Path(dst)
    big = sum(p.stat().st_size for p in src.parent.iterdir() if p.name.startswith(src.name)) > 1_800_000_000
    dst.parent.mkdir(parents=True, exist_ok=True)
    quantizer(
        onnx_path=str(src),
        quantize_mode=mode,
        calibration_data=calibration,
        calibration_method=CALIBRATION[mode],
        calibration_eps=["cuda:0", "cpu"],
        op_types_to_quantize=["Conv", "MatMul", "Gemm"],
        nodes_to_exclude=first_last_convs(src),
        high_precision_dtype="fp16",
        use_external_data_format=big,
        output_path=str(dst),
    )
    if not dst.exists():
        raise BackendError(f"Model Optimizer wrote no quantised model at {dst}")


def record_calibration(onnx_dir: Path, prompts, size: int, steps: int = 4, limit: int = 16) -> dict[str, np.ndarray]:
    """UNet inputs recorded from the export sampling `prompts` at `size` on the CPU (ONNX Runtime), stacked."""
    from sdrt.export.int8_quality import record_unet_feeds

    return stack_feeds(record_unet_feeds(Path(onnx_dir), prompts, size, steps, 7.5, limit=limit))
