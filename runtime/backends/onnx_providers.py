"""ONNX Runtime's execution providers for sdrt: which onnxruntime is installed, which providers a session gets.

Routes, each a `providers=` list per network (`session_providers`):

    "auto":     CUDA when the installed onnxruntime has it and a session gets it, else CPU (the default)
    "tensorrt": TensorRT EP (profile from the contract's ShapeLimits, fp16, engine + timing cache), then CUDA, CPU
    "cuda":     CUDA EP, then CPU
    "cpu":      CPU EP

A route that names a GPU provider is a request: when the installed onnxruntime lacks it, or a session does not get
it (no GPU, CUDA/cuDNN libraries missing), loading fails with the reason (`require_route`), never a silent CPU
run. The TensorRT EP's profile shapes are per network, so providers are chosen network by network. ORT's engine
cache does not notice a new TensorRT or GPU by itself, so its folder is keyed by both: `<export>/.ort_trt_cache/<key>/`.

`onnxruntime` and `onnxruntime-gpu` install the same `onnxruntime/` package (microsoft/onnxruntime#7748): with
both installed, whichever was installed last owns the files and the other's metadata lies. `ort_distributions`
says which are installed and `ort_install_problem` says when that is a problem (`sdrt info` prints it).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from sdrt.contracts import ShapeLimits
from sdrt.errors import BackendError
from sdrt.model.manifest import Manifest

ROUTES = ("auto", "tensorrt", "cuda", "cpu")
CACHE_DIR = ".ort_trt_cache"
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino", "onnxruntime-training")
SWAP_HINT = "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu"
# ORT's TensorRT EP works with the TensorRT major it was built against: 1.27 on for TensorRT 11.
MIN_ORT_FOR_TENSORRT = {10: (1, 18), 11: (1, 27)}


# --- which onnxruntime ---------------------------------------------------------------------------------------


def ort_distributions() -> dict[str, str]:
    """{distribution: version} of the installed packages that provide the `onnxruntime` module."""
    import importlib.metadata as md

    found = {}
    for dist in md.distributions():
        name = (dist.metadata.get("Name") or "").lower().replace("_", "-")
        if name in ORT_DISTRIBUTIONS:
            found[name] = dist.version
    return dict(sorted(found.items()))


def ort_install_problem(distributions: dict[str, str] | None = None, available: list[str] | None = None) -> str | None:
    """Why the installed onnxruntime cannot use the GPU that onnxruntime-gpu was installed for (None: fine)."""
    dists = ort_distributions() if distributions is None else distributions
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    gpu = "onnxruntime-gpu" in dists
    if gpu and len(dists) > 1:
        others = ", ".join(f"{n} {v}" for n, v in dists.items() if n != "onnxruntime-gpu")
        state = "and its CUDA provider is missing" if "CUDAExecutionProvider" not in available else "(the files are whichever was installed last)"
        return (
            f"onnxruntime-gpu {dists['onnxruntime-gpu']} and {others} are both installed; they share one `onnxruntime` "
            f"package {state}: {SWAP_HINT}"
        )
    if gpu and "CUDAExecutionProvider" not in available:
        return f"onnxruntime-gpu is installed but its CUDA provider is missing (a damaged install?): {SWAP_HINT}"
    return None


# --- provider options ----------------------------------------------------------------------------------------


def shape_string(shapes: dict[str, tuple]) -> str:
    """{'sample': (1, 4, 8, 8), 'timestep': (1,)} -> 'sample:1x4x8x8,timestep:1' (the TensorRT EP's format). The EP
    cuts each entry at its first ':' and the list at ',': a name holding either (the LoRA slots of exports made
    before 2026-12-05, `lora_down:<layer>`) is left out, and the EP sizes that input from the shapes it is fed."""
    return ",".join(f"{name}:{'x'.join(str(d) for d in shape)}" for name, shape in shapes.items()
                    if ":" not in name and "," not in name)


def tensorrt_ep_options(profile: dict, fp16: bool, cache_dir, device_id: int = 0) -> dict:
    """TensorRT EP options for one network: explicit min/opt/max shapes, fp16, engine and timing caches.
    (The C++ host sets the same keys: cpp/src/backend_onnx.cpp.)"""
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

    from sdrt.backends.tensorrt_machine import machine_info

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
    available: list[str] | None = None,
) -> list:
    """The `providers=` list for `network`'s InferenceSession on `route` (one of ROUTES).

    fp16: TensorRT EP precision (default: on, as for `sdrt build`). limits: shapes to serve (default: the
    export's). export_dir: where the TensorRT EP caches engines (required for the "tensorrt" route).
    available: the providers "auto" picks from (default: the installed onnxruntime's)."""
    if route not in ROUTES:
        raise ValueError(f"execution-provider route {route!r} is not one of {', '.join(ROUTES)}")
    if route == "auto":
        if available is None:
            import onnxruntime as ort

            available = ort.get_available_providers()
        route = "cuda" if "CUDAExecutionProvider" in available else "cpu"
    if route == "cpu":
        return ["CPUExecutionProvider"]
    cuda = ("CUDAExecutionProvider", cuda_ep_options(device_id))
    if route == "cuda":
        return [cuda, "CPUExecutionProvider"]
    if export_dir is None:
        raise ValueError("the tensorrt route needs export_dir, where ORT keeps its engine cache")
    if limits is None:
        limits = ShapeLimits.from_dict(manifest.limits)
    profile = limits.profile(manifest.contracts[network], manifest.facts)
    cache_dir = ort_trt_cache_dir(export_dir, device_id)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass  # a read-only export: ORT then builds its engines each time
    options = tensorrt_ep_options(profile, True if fp16 is None else fp16, cache_dir, device_id)
    return [("TensorrtExecutionProvider", options), cuda, "CPUExecutionProvider"]


def provider_names(providers: list) -> list[str]:
    return [p[0] if isinstance(p, tuple) else p for p in providers]


def route_for(providers) -> str:
    """The route an explicit `providers=` list of names asks for (the backend's older argument)."""
    names = list(providers)
    if "TensorrtExecutionProvider" in names:
        return "tensorrt"
    if "CUDAExecutionProvider" in names:
        return "cuda"
    return "cpu"


def check_route_available(route: str, available: list[str] | None = None) -> None:
    """BackendError when the installed onnxruntime lacks a provider the route asks for."""
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    wanted = {"tensorrt": GPU_PROVIDERS, "cuda": ("CUDAExecutionProvider",)}.get(route, ())
    missing = [p for p in wanted if p not in available]
    if not missing:
        if route == "tensorrt":
            check_ort_for_tensorrt()
        return
    import onnxruntime as ort

    problem = ort_install_problem(available=available)
    fix = problem or f"install the GPU build: {SWAP_HINT}"
    raise BackendError(
        f"the {route} route needs {', '.join(missing)}, which onnxruntime {ort.__version__} here does not have "
        f"(it has {', '.join(available)}): {fix}; or run on the CPU with the cpu route"
    )


def check_ort_for_tensorrt() -> None:
    """ORT's TensorRT EP is built for one TensorRT major: refuse a pairing that cannot load (TensorRT 11 needs ORT 1.27+)."""
    import onnxruntime as ort

    from sdrt.backends.tensorrt_machine import tensorrt_status

    ok, why = tensorrt_status(check_gpu=False)
    if not ok:
        return  # ORT reports a missing libnvinfer itself when the session is made
    import tensorrt as trt

    major = int(trt.__version__.split(".")[0])
    need = MIN_ORT_FOR_TENSORRT.get(major)
    have = tuple(int(x) for x in ort.__version__.split(".")[:2])
    if need and have < need:
        raise BackendError(
            f"onnxruntime {ort.__version__}'s TensorRT provider cannot use TensorRT {trt.__version__}: TensorRT {major} needs "
            f"onnxruntime-gpu {need[0]}.{need[1]} or newer (pip install -U onnxruntime-gpu), or use --backend tensorrt"
        )


def require_session_providers(route: str, network: str, got: list[str]) -> None:
    """BackendError when a session did not get the GPU provider its route asked for (ORT falls back silently)."""
    want = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider"}.get(route)
    if want and want not in got:
        raise BackendError(
            f"ONNX Runtime did not put the {network} network on {want} (it got {', '.join(got)}): no usable NVIDIA GPU, "
            "or the CUDA/cuDNN (and for TensorRT, libnvinfer) libraries onnxruntime-gpu needs are missing; check "
            "`sdrt info`, or run on the CPU with the cpu route"
        )
