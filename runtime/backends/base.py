"""The backend interface: run one network of the I/O contract on numpy arrays.

A backend knows nothing of prompts, schedulers or seeds; the pipeline owns all of that. Keeping the
interface this small is what lets ONNX Runtime, TensorRT and PyTorch be swapped under the same loop.
"""

from __future__ import annotations

import importlib.util

import numpy as np

from sdrt.contracts import NetworkContract
from sdrt.errors import torch_install_hint


class Backend:
    """Runs networks named by the contracts (text_encoder, unet, vae_encoder, vae_decoder)."""

    name = "base"

    def __init__(self, contracts: dict[str, NetworkContract]):
        self.contracts = contracts

    def run(self, network: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run `network` on float32 host arrays; return its outputs by the contract's names."""
        raise NotImplementedError

    def has(self, network: str) -> bool:
        return network in self.contracts

    def describe(self) -> str:
        """One line for `sdrt info` and benchmark records: device, precision, providers."""
        return self.name


def module_available(name: str) -> bool:
    """True when `name` can be imported here (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def available_backends() -> dict[str, str]:
    """{backend: why or why not} for what this machine can really run; `sdrt info` prints it."""
    found = {}
    if module_available("onnxruntime"):
        import onnxruntime as ort

        found["onnx"] = "onnxruntime " + ort.__version__ + " (" + ", ".join(ort.get_available_providers()) + ")"
    else:
        found["onnx"] = "not installed: pip install onnxruntime"
    if module_available("torch") and module_available("diffusers") and module_available("transformers"):
        found["torch"] = "torch, diffusers and transformers installed"
    else:
        found["torch"] = f"not installed: {torch_install_hint()}"
    from sdrt.backends.tensorrt_backend import tensorrt_status

    usable, why = tensorrt_status()
    found["tensorrt"] = why if usable else f"not installed ({why}): pip install 'sdrt[tensorrt]' on a machine with an NVIDIA GPU"
    return found
