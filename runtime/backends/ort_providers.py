"""Kept for imports from before the ONNX backend's split: everything here lives in sdrt.backends.onnx_providers."""

from sdrt.backends.onnx_providers import (  # noqa: F401
    CACHE_DIR,
    ROUTES,
    cuda_ep_options,
    ort_trt_cache_dir,
    session_providers,
    shape_string,
    tensorrt_ep_options,
)
