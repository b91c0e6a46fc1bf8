"""The backend interface: run one network of the I/O contract on numpy arrays.

A backend knows nothing of prompts, schedulers or seeds; the pipeline owns all of that. Keeping the
interface this small is what lets ONNX Runtime, TensorRT and PyTorch be swapped under the same loop.
"""

from __future__ import annotations

import contextlib
import importlib.util

import numpy as np

from sdrt.contracts import NetworkContract
from sdrt.errors import torch_install_hint


class Backend:
    """Runs networks named by the contracts (text_encoder, unet, vae_encoder, vae_decoder).

    Capabilities a backend may declare (the pipeline reads these, never probes with getattr):
    - the device loop: `loop` is an sdrt.device_loop.DeviceLoop over the backend's UNet and `use_device_loop` is
      True; the pipeline then hands the whole denoising loop to `denoise` (one implementation, here), which runs
      inside `device_scope()`; `cuda_graphs` replays each captured step.
    - `synchronize()`: wait for queued device work, so that observers' timings are real.
    - `uses_host_memory`: its networks' activations live in this machine's RAM (the memory check applies).
    - `precision(network)`: "fp16"/"fp32" as it runs, for messages; `check_shapes(...)`: refuse shapes a fixed
      profile cannot run (TensorRT engines) before any network runs.
    """

    name = "base"
    loop = None  # a DeviceLoop, for backends that can keep the loop on their device
    use_device_loop = False  # the pipeline hands the loop to `denoise` (a switch: benchmarks compare both)
    cuda_graphs = False  # the device loop replays each whole step from a CUDA graph

    def __init__(self, contracts: dict[str, NetworkContract]):
        self.contracts = contracts

    def run(self, network: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run `network` on float32 host arrays; return its outputs by the contract's names."""
        raise NotImplementedError

    def denoise(self, sched, latents, text_states, guidance_scale, step_noise=None, callback=None, progress=False,
                extra=None, inpaint=None) -> np.ndarray:
        """The whole denoising loop on the device (sdrt.device_loop.DeviceLoop.run); returns float32 host latents.
        extra: the UNet's step-invariant inputs besides the text states (SDXL's added conditioning, timestep_cond);
        inpaint: sdrt.inpaint.InpaintRows.device_tables."""
        if self.loop is None:
            raise NotImplementedError(f"the {self.name} backend has no device loop; the pipeline runs the host loop")
        with self.device_scope():
            x = self.loop.run(sched, latents, text_states, guidance_scale, step_noise, self.cuda_graphs, callback, progress, extra,
                              inpaint)
        return x.cpu().numpy()

    def device_scope(self):
        """A context in which this backend's device is the current one (CUDA backends enter their device)."""
        return contextlib.nullcontext()

    def synchronize(self) -> None:
        """Wait until the device has finished queued work (a no-op where calls are synchronous)."""

    def forget_fixed_inputs(self) -> None:
        """Drop what a backend kept from calls with the same fixed inputs (the ONNX backend's UNet prepass), so that
        the next call pays for it (a benchmark repeating one prompt measures what a new prompt costs); a no-op here."""

    @property
    def uses_host_memory(self) -> bool:
        return True

    def precision(self, network: str) -> str | None:
        """The precision `network` computes in ("fp16" or "fp32"), or None when the backend cannot tell."""
        return None

    def check_shapes(self, shapes: dict[str, dict[str, tuple]]) -> None:
        """Raise InputError for {network: {input: shape}} this backend cannot run (dynamic-shape backends run all)."""

    def has(self, network: str) -> bool:
        return network in self.contracts

    # --- run-time LoRAs (sdrt.contracts.LoraSlot): the pipeline sets each network's active low-rank factors ---------

    def lora_slots(self, network: str) -> tuple:
        """The LoraSlots of `network` (empty: it takes no run-time LoRA)."""
        contract = self.contracts.get(network)
        return contract.lora_slots if contract is not None else ()

    def set_lora_factors(self, network: str, factors: dict) -> None:
        """Make {layer: (down, up)} (float32 numpy, scales folded into up) the active LoRA factors of `network`,
        replacing all earlier ones; {} runs the network as exported."""
        if factors:
            from sdrt.errors import BackendError

            raise BackendError(f"the {self.name} backend's {network} has no LoRA slots; export with `--lora-slots all`")

    def _lora_feeds(self, network: str, factors: dict) -> dict[str, np.ndarray]:
        """The slot inputs of `network` for `factors`: theirs where given, rank 0 elsewhere."""
        contract = self.contracts[network]
        feeds = contract.empty_lora_feeds()
        slots = {s.layer: s for s in contract.lora_slots}
        for layer, (down, up) in factors.items():
            slot = slots[layer]
            d_spec, u_spec = slot.specs()
            feeds[d_spec.name] = np.ascontiguousarray(down, np.float32)
            feeds[u_spec.name] = np.ascontiguousarray(up, np.float32)
        return feeds

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

        from sdrt.backends.onnx_providers import ort_distributions, ort_install_problem

        dists = ort_distributions()
        dist = "onnxruntime-gpu" if list(dists) == ["onnxruntime-gpu"] else "onnxruntime"
        found["onnx"] = f"{dist} {ort.__version__} (" + ", ".join(ort.get_available_providers()) + ")"
        problem = ort_install_problem(dists)
        if problem:
            found["onnx"] += f"; PROBLEM: {problem}"
    else:
        found["onnx"] = "not installed: pip install onnxruntime (or onnxruntime-gpu for NVIDIA GPUs)"
    if module_available("torch") and module_available("diffusers") and module_available("transformers"):
        found["torch"] = "torch, diffusers and transformers installed"
    else:
        found["torch"] = f"not installed: {torch_install_hint()}"
    from sdrt.backends.tensorrt_machine import tensorrt_status

    usable, why = tensorrt_status()
    if usable:
        found["tensorrt"] = why
    elif why.startswith("import tensorrt failed") or "stub" in why:
        found["tensorrt"] = f"not installed ({why}): pip install 'sdrt[tensorrt]' on a machine with an NVIDIA GPU"
    else:  # installed, but this TensorRT cannot run here: the reason (an old driver, no GPU) says what to do
        found["tensorrt"] = f"refused: {why}"
    return found
