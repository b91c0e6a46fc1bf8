"""The PyTorch backend: diffusers/transformers model classes loaded from a diffusers-format folder.

The fallback, and the only backend that needs no export. fp32 on CPU; fp16 on CUDA when a GPU is there, with
diffusers' default attention (SDPA, AttnProcessor2_0). On CUDA the denoising loop runs on the device
(`sdrt.device_loop`): no host round trip per step, and each whole step replayed from a CUDA graph.
Imported lazily: `import sdrt` never loads torch.
"""

from __future__ import annotations

import numpy as np
import torch

from sdrt.backends.base import Backend
from sdrt.backends.torch_modules import load_contract_modules
from sdrt.contracts import TEXT_ENCODER, TEXT_ENCODER_2, UNET
from sdrt.device_loop import DeviceLoop


def pick_device(device: str | None) -> tuple[torch.device, torch.dtype]:
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return device, (torch.float16 if device.type == "cuda" else torch.float32)


class TorchBackend(Backend):
    """Options: device ("cpu", "cuda", "auto"), dtype ("fp32"/"fp16"), threads; device_loop (None: on CUDA
    only), cuda_graphs (replay each step from a CUDA graph; CUDA only), channels_last (UNet memory format)."""

    name = "torch"

    def __init__(
        self,
        model_dir,
        facts,
        contracts,
        device: str | None = None,
        dtype: str | None = None,
        threads: int | None = None,
        device_loop: bool | None = None,
        cuda_graphs: bool = True,
        channels_last: bool = False,
    ):
        super().__init__(contracts)
        self.device, self.dtype = pick_device(device)
        if dtype is not None:
            self.dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
        if threads:
            torch.set_num_threads(threads)
        self.modules = load_contract_modules(model_dir, facts, self.device, self.dtype)
        # The pipeline hands the whole loop to `denoise` when this is set (see Pipeline.__call__).
        self.use_device_loop = self.device.type == "cuda" if device_loop is None else bool(device_loop)
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.loop = DeviceLoop(self.modules[UNET], self.device, self.dtype)
        self.channels_last = False
        self.set_channels_last(channels_last)
        self._lora_hooks: dict = {}  # network -> LoraHooks, made on first use

    # --- run-time LoRAs: forward hooks adding up(down(x)) on the slot layers; nothing touches the weights ----------

    def _hooks(self, network: str):
        from sdrt.backends.torch_modules import LoraHooks, lora_slot_layers, slot_root

        if network not in self._lora_hooks:
            if network not in (UNET, TEXT_ENCODER, TEXT_ENCODER_2) or network not in self.modules:
                return None
            root = slot_root(self.modules[network])
            self._lora_hooks[network] = LoraHooks(root, lora_slot_layers(root, "all"))
        return self._lora_hooks[network]

    def lora_slots(self, network: str) -> tuple:
        hooks = self._hooks(network)
        return tuple(hooks.slots.values()) if hooks is not None else ()

    def set_lora_factors(self, network: str, factors: dict) -> None:
        hooks = self._hooks(network)
        if hooks is None:
            return super().set_lora_factors(network, factors)
        if not factors and not hooks.factors:
            return
        to = dict(device=self.device, dtype=self.dtype)
        hooks.set({layer: (torch.from_numpy(np.ascontiguousarray(d)).to(**to), torch.from_numpy(np.ascontiguousarray(u)).to(**to))
                   for layer, (d, u) in factors.items()})
        if network == UNET:
            self.loop.clear()  # captured CUDA graphs ran the previous hooks

    def set_channels_last(self, on: bool) -> None:
        """Store the UNet's conv weights NHWC (cuDNN's fast layout on tensor cores) or NCHW; drops captured graphs."""
        if on != self.channels_last:
            self.loop.clear()  # the graphs point at the old weight storage
            self.modules[UNET].to(memory_format=torch.channels_last if on else torch.contiguous_format)
            self.channels_last = on

    @torch.inference_mode()
    def run(self, network: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        contract = self.contracts[network]
        contract.check_feeds(feeds)
        dtype = next(self.modules[network].parameters()).dtype  # an fp16 run keeps a force_upcast VAE in fp32
        args = []
        for spec in contract.inputs:
            t = torch.from_numpy(np.ascontiguousarray(feeds[spec.name])).to(self.device)
            # The timestep stays float32 even in fp16 (fractional Karras/Euler timesteps lose precision in fp16).
            args.append(t if spec.name == "timestep" else t.to(dtype))
        out = self.modules[network](*args)
        outs = out if isinstance(out, tuple) else (out,)
        return {spec.name: o.float().cpu().numpy() for spec, o in zip(contract.outputs, outs)}

    @property
    def uses_host_memory(self) -> bool:
        return self.device.type == "cpu"

    def precision(self, network: str) -> str | None:
        module = self.modules.get(network)
        dtype = next(module.parameters()).dtype if module is not None else self.dtype
        return "fp16" if dtype == torch.float16 else "fp32"

    def device_scope(self):
        return torch.cuda.device(self.device) if self.device.type == "cuda" else super().device_scope()

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def describe(self) -> str:
        precision = "fp16" if self.dtype == torch.float16 else "fp32"
        loop = ("device loop, CUDA graphs" if self.cuda_graphs else "device loop") if self.use_device_loop else "host loop"
        return f"torch {torch.__version__} on {self.device} ({precision}, {loop}, {torch.get_num_threads()} threads)"
