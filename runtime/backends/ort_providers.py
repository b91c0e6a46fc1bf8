"""ONNX Runtime's TensorRT and CUDA execution providers: the other route to the same GPU, from the same contracts.

`session_providers(route, network, manifest)` is the `providers=` list for one network's InferenceSession:

    "tensorrt": TensorRT EP (profile from the contract's ShapeLimits, fp16, engine + timing cache), then CUDA, CPU
    "cuda":     CUDA EP, then CPU
    "cpu":      CPU EP

The TensorRT EP's profile shapes are per network (each network has its own inputs), so the ONNX backend asks
for its providers network by network. ORT's engine cache does not notice a new TensorRT or GPU by itself, so
the cache folder is keyed by both: `<export>/.ort_trt_cache/<key>/`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from sdrt.contracts import ShapeLimits
from sdrt.model.manifest import Manifest

ROUTES = ("tensorrt", "cuda", "cpu")
CACHE_DIR = ".ort_trt_cache"


def shape_string(shapes: dict[str, tuple]) -> str:
    """{'sample': (1, 4, 8, 8), 'timestep': (1,)} -> 'sample:1x4x8x8,timestep:1' (the TensorRT EP's format)."""
    return ",".join(f"{name}:{'x'.join(str(d) for d in shape)}" for name, shape in shapes.items())


def tensorrt_ep_options(profile: dict, fp16: bool, cache_dir, device_id: int = 0) -> dict:
    """TensorRT EP options for one network: explicit min/opt/max shapes, fp16, engine and timing caches."""
    return {
        "device_id": device_id,
        "trt_fp16_enable": bool(fp16),
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache_dir),
        "trt_profile_min_shapes": shape_string({n: p[0] for n, p in profile.items()}),
        "trt_profile_opt_shapes": shape_string({n: p[1] for n, p in profile.items()}),
        "trt_profile_max_shapes": shape_string({n: p[2] for n, p in profile.items()}),
    }


def cuda_ep_options(device_id: int = 0) -> dict:
    return {"device_id": device_id}


def ort_trt_cache_dir(export_dir, device_id: int = 0) -> Path:
    """`<export>/.ort_trt_cache/<key>`: key of ORT's version, the GPU and the tensorrt package's version."""
    import onnxruntime as ort

    from sdrt.backends.tensorrt_backend import machine_info

    m = machine_info(device_id)
    key = hashlib.sha256(f"{ort.__version__}|{m.gpu}|{m.compute_capability}|{m.tensorrt}".encode()).hexdigest()[:12]
    return Path(export_dir) / CACHE_DIR / key


def session_providers(
    route: str,
    network: str,
    manifest: Manifest,
    export_dir=None,
    device_id: int = 0,
    fp16: bool | None = None,
    limits: ShapeLimits | None = None,
) -> list:
    """The `providers=` list for `network`'s InferenceSession on `route` (one of ROUTES).

    fp16: TensorRT EP precision (default: on, as for `sdrt build`). limits: shapes to serve (default: the
    export's). export_dir: where the TensorRT EP caches engines (required for the "tensorrt" route)."""
    if route not in ROUTES:
        raise ValueError(f"execution-provider route {route!r} is not one of {', '.join(ROUTES)}")
    if route == "cpu":
        return ["CPUExecutionProvider"]
    cuda = ("CUDAExecutionProvider", cuda_ep_options(device_id))
    if route == "cuda":
        return [cuda, "CPUExecutionProvider"]
    if export_dir is None:
        raise ValueError("the tensorrt route needs export_dir, where ORT keeps its engine cache")
    if limits is None:
        fields = set(ShapeLimits.__dataclass_fields__)
        limits = ShapeLimits(**{k: v for k, v in manifest.limits.items() if k in fields})
    profile = limits.profile(manifest.contracts[network], manifest.facts)
    cache_dir = ort_trt_cache_dir(export_dir, device_id)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass  # a read-only export: ORT then builds its engines each time
    options = tensorrt_ep_options(profile, True if fp16 is None else fp16, cache_dir, device_id)
    return [("TensorrtExecutionProvider", options), cuda, "CPUExecutionProvider"]
