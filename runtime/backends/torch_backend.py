"""The PyTorch backend: diffusers/transformers model classes loaded from a diffusers-format folder.

The fallback, and the only backend that needs no export. fp32 on CPU; fp16 on CUDA when a GPU is there.
Imported lazily: `import sdrt` never loads torch.
"""

from __future__ import annotations

import numpy as np
import torch

from sdrt.backends.base import Backend
from sdrt.backends.torch_modules import load_contract_modules


def pick_device(device: str | None) -> tuple[torch.device, torch.dtype]:
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return device, (torch.float16 if device.type == "cuda" else torch.float32)


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, model_dir, facts, contracts, device: str | None = None, dtype: str | None = None, threads: int | None = None):
        super().__init__(contracts)
        self.device, self.dtype = pick_device(device)
        if dtype is not None:
            self.dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
        if threads:
            torch.set_num_threads(threads)
        self.modules = load_contract_modules(model_dir, facts, self.device, self.dtype)

    @torch.inference_mode()
    def run(self, network: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        contract = self.contracts[network]
        contract.check_feeds(feeds)
        args = []
        for spec in contract.inputs:
            t = torch.from_numpy(np.ascontiguousarray(feeds[spec.name])).to(self.device)
            # The timestep stays float32 even in fp16 (fractional Karras/Euler timesteps lose precision in fp16).
            args.append(t if spec.name == "timestep" else t.to(self.dtype))
        out = self.modules[network](*args)
        outs = out if isinstance(out, tuple) else (out,)
        return {spec.name: o.float().cpu().numpy() for spec, o in zip(contract.outputs, outs)}

    def describe(self) -> str:
        precision = "fp16" if self.dtype == torch.float16 else "fp32"
        return f"torch {torch.__version__} on {self.device} ({precision}, {torch.get_num_threads()} threads)"
