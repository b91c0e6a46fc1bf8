"""The TensorRT backend: runs the engines that `sdrt build` made from an sdrt ONNX export (NVIDIA GPUs).

One `Engine` per network, each deserialised once (trt.Runtime.deserialize_cuda_engine), with one execution
context per set of input shapes, all working in one block of context memory the backend's engines share
(user-managed: they never run at once), so a load reserves the largest engine's memory once. A context that
TensorRT cannot create, or an address it refuses, is a BackendError saying what to do. TensorRT 10.12 to 11.x:
11 removed weak typing (precision builder flags, calibrators, platform_has_fast_fp16, device_memory_size);
nothing here uses them. Tensors are bound by address (set_input_shape + set_tensor_address) and run with execute_async_v3
on the caller's current CUDA stream, so the work orders with the caller's own kernels and a CUDA-graph capture
(torch.cuda.graph) records it. Device memory is torch CUDA tensors: torch is already what the device loop holds
its latents in, so a tensor's data_ptr() is the binding and nothing is copied; torch's caching allocator, streams
and graph capture come with it. Output buffers are allocated once per shape and reused.

Before an engine loads, its cache key is checked against this machine and the export (sdrt.backends.tensorrt_machine:
TensorRT and driver checks, machine info, engine keys); importing this module imports neither tensorrt nor torch.

With device_loop (the default) the pipeline hands the whole denoising loop to `denoise`: sdrt.device_loop runs it
on the UNet engine through `device_unet()`, each step captured once in a CUDA graph and replayed.

The text encoder takes token embeddings (the contract's inputs_embeds), so textual-inversion tokens added to the
runtime's table need no rebuild.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sdrt.backends.base import Backend, module_available
from sdrt.backends.tensorrt_machine import MachineInfo, first_line, check_engine, machine_info, require_tensorrt
from sdrt.contracts import UNET, NetworkContract
from sdrt.errors import BackendError, InputError, ModelError
from sdrt.model.manifest import Manifest

# --- the engines ------------------------------------------------------------------------------------------------


class DeviceScratch:
    """One block of device memory every execution context of a backend works in (TensorRT's user-managed
    context memory). The backend's engines run one after another on one stream, never at once, so they can share
    it: a load reserves the largest engine's max-profile memory once, not once per engine and context (four
    engines' reservations at load were what ran a 24 GB GPU out of memory)."""

    def __init__(self, device):
        self.device, self.tensor, self.frozen = device, None, False

    def reserve(self, size: int) -> None:
        """Grow to `size` bytes; only before the first context points into it."""
        if self.tensor is not None and self.tensor.numel() >= size:
            return
        if self.frozen:
            raise BackendError("internal: TensorRT context memory cannot grow after contexts were created")
        import torch

        try:
            self.tensor = torch.empty(max(int(size), 1), dtype=torch.uint8, device=self.device)
        except RuntimeError as err:  # torch.OutOfMemoryError is a RuntimeError
            raise BackendError(
                f"out of GPU memory reserving {size / 2**20:.0f} MiB for TensorRT's context memory ({first_line(err)}); free GPU "
                "memory, or rebuild the engines for smaller shapes with `sdrt build --max-size/--max-batch`"
            ) from None

    def pointer(self) -> tuple[int, int]:
        self.frozen = True
        return self.tensor.data_ptr(), self.tensor.numel()


def _memory_size(engine) -> int:
    """The engine's context memory for its largest profile: device_memory_size_v2 (TensorRT 10.1 on; the old
    device_memory_size is gone in 11)."""
    size = getattr(engine, "device_memory_size_v2", None)
    if size is None:
        size = getattr(engine, "device_memory_size", 0)
    return int(size)


class Engine:
    """One TensorRT engine: deserialised once; one execution context per set of input shapes, all in the
    backend's shared context memory; output buffers allocated once per shape.

    Why a context per shape set: a CUDA graph captured around execute_async_v3 bakes in the addresses and shapes
    the context had then, but a context also keeps shape-dependent state of its own, which a later run at another
    shape rewrites; replaying a graph captured at batch 1 after its context ran batch 2 would read that state. With
    a context per shape set, a context only ever runs the shapes its graphs were captured at (tests/test_tensorrt.py
    captures batch 1, runs batch 2 and replays batch 1 on a fake TensorRT that keeps such state). Contexts are
    cheap: their memory is the shared scratch."""

    def __init__(self, runtime, path: Path, contract: NetworkContract, device, scratch: DeviceScratch | None = None):
        import tensorrt as trt

        self.path, self.contract, self.device = Path(path), contract, device
        self.engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise ModelError(f"TensorRT could not deserialise {path} (damaged, or built by another TensorRT); rebuild it with `sdrt build`")
        self.scratch = scratch
        self.memory_size = _memory_size(self.engine)
        if scratch is not None:
            scratch.reserve(self.memory_size)
        self.contexts: dict[tuple, object] = {}  # input shapes -> execution context
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if sorted(self.input_names) != sorted(contract.input_names) or sorted(self.output_names) != sorted(contract.output_names):
            raise ModelError(
                f"{path} takes {self.input_names} and gives {self.output_names}, but the {contract.name} contract says "
                f"{contract.input_names} -> {contract.output_names}: rebuild the engines with `sdrt build`"
            )
        wrong = [n for n in names if self.engine.get_tensor_dtype(n) != trt.DataType.FLOAT]
        if wrong:
            raise ModelError(f"{path} has non-float32 I/O {wrong}; the contract's I/O is float32: rebuild with `sdrt build`")
        # (min, opt, max) per input, from the engine's single optimisation profile.
        self.limits = {n: tuple(tuple(d) for d in self.engine.get_tensor_profile_shape(n, 0)) for n in self.input_names}
        self.buffers: dict[tuple, object] = {}  # (tensor name, shape) -> torch tensor on self.device

    def _new_context(self):
        """An execution context in the shared scratch (or with its own memory without one); BackendError when
        TensorRT cannot make one (it returns None, e.g. out of GPU memory)."""
        import tensorrt as trt

        strategy = getattr(getattr(trt, "ExecutionContextAllocationStrategy", None), "USER_MANAGED", None)
        try:
            if self.scratch is not None and strategy is not None:
                context = self.engine.create_execution_context(strategy)
                if context is not None:
                    ptr, size = self.scratch.pointer()
                    if hasattr(context, "set_device_memory"):  # TensorRT 10.1 on
                        context.set_device_memory(ptr, size)
                    else:
                        context.device_memory = ptr
            else:
                context = self.engine.create_execution_context()
        except Exception as err:
            raise BackendError(f"TensorRT could not create an execution context for the {self.contract.name} engine ({first_line(err)})") from None
        if context is None:
            mib = self.memory_size / 2**20
            raise BackendError(
                f"TensorRT could not create an execution context for the {self.contract.name} engine ({self.path.name}; it needs "
                f"{mib:.0f} MiB of context memory for its largest shapes): likely out of GPU memory; free GPU memory (other "
                "processes, other loaded models), or rebuild the engines for smaller shapes with `sdrt build --max-size/--max-batch`"
            )
        return context

    def context_for(self, shapes: dict[str, tuple]):
        key = tuple(sorted((n, tuple(s)) for n, s in shapes.items()))
        if key not in self.contexts:
            self.contexts[key] = self._new_context()
        return self.contexts[key]

    def buffer(self, name: str, shape: tuple):
        """A float32 device tensor for `name` at `shape`, allocated on first use and reused after."""
        import torch

        key = (name, tuple(shape))
        if key not in self.buffers:
            self.buffers[key] = torch.empty(shape, dtype=torch.float32, device=self.device)
        return self.buffers[key]

    def check_shapes(self, shapes: dict[str, tuple]) -> None:
        for name, shape in shapes.items():
            lo, _, hi = self.limits[name]
            if len(shape) != len(lo) or any(not a <= s <= b for s, a, b in zip(shape, lo, hi)):
                raise InputError(
                    f"{self.contract.name} input {name!r} has shape {tuple(shape)}; this engine serves {lo} to {hi}: "
                    "rebuild the engines with `sdrt build` and a larger --max-size or --max-batch, or use --backend onnx"
                )

    def _bind(self, context, name: str, tensor) -> None:
        if not context.set_tensor_address(name, tensor.data_ptr()):
            raise BackendError(
                f"TensorRT refused the address of {self.contract.name} tensor {name!r} (shape {tuple(tensor.shape)}, "
                f"on {tensor.device}): it must be a float32 CUDA tensor on {self.device}"
            )

    def infer(self, inputs: dict, stream_handle: int) -> dict:
        """Enqueue one run on `stream_handle`. `inputs`: contiguous float32 tensors on this device, by name.
        Returns the output buffers: owned by the engine and overwritten by its next run at the same shape."""
        shapes = {n: tuple(t.shape) for n, t in inputs.items()}
        self.check_shapes(shapes)
        context = self.context_for({n: shapes[n] for n in self.input_names})
        for name in self.input_names:
            tensor = inputs[name]
            if not context.set_input_shape(name, tuple(tensor.shape)):
                raise BackendError(f"TensorRT refused shape {tuple(tensor.shape)} for {self.contract.name} input {name!r}")
            self._bind(context, name, tensor)
        outputs = {}
        for name in self.output_names:
            out = self.buffer(name, tuple(context.get_tensor_shape(name)))
            self._bind(context, name, out)
            outputs[name] = out
        if not context.execute_async_v3(stream_handle):
            raise BackendError(f"TensorRT failed to run the {self.contract.name} engine ({self.path.name}); see its log above")
        return outputs


class TensorRTBackend(Backend):
    """Runs an sdrt TensorRT build folder: `run` on host arrays for the pipeline's loop, `run_device` and
    `device_unet` on torch CUDA tensors for the device loop."""

    name = "tensorrt"

    def __init__(
        self,
        path,
        manifest: Manifest,
        device_id: int = 0,
        threads: int | None = None,
        device_loop: bool = True,
        cuda_graphs: bool = True,
        machine: MachineInfo | None = None,
    ):
        """device_loop: the pipeline hands the whole denoising loop to `denoise` (sdrt.device_loop on the UNet
        engine); cuda_graphs: replay each whole step from a CUDA graph. threads: accepted for the CLI's sake and
        ignored (TensorRT runs on the GPU). machine: what the engines' keys must match (default: this machine)."""
        super().__init__(manifest.contracts)
        version = require_tensorrt()
        if not module_available("torch"):
            raise BackendError("the TensorRT backend keeps its buffers in torch CUDA tensors: pip install torch (a CUDA build: "
                               "pytorch.org lists the index URL per CUDA version), then pip install 'sdrt[tensorrt]'")
        import tensorrt as trt
        import torch

        if not torch.cuda.is_available():
            raise BackendError(f"TensorRT {version} is installed but torch {torch.__version__} sees no CUDA GPU: install a CUDA build of torch")
        self.path, self.manifest = Path(path), manifest
        self.machine = machine or machine_info(device_id)
        self.device = torch.device("cuda", device_id)
        files = {n: check_engine(self.path, manifest, n, self.machine) for n in manifest.extras.get("engines", {})}
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        with torch.cuda.device(self.device):
            self.stream = torch.cuda.Stream(self.device)  # the host path's one stream
            self.scratch = DeviceScratch(self.device)  # one context memory for every engine (they never run at once)
            self.engines = {n: Engine(self.runtime, f, self.contracts[n], self.device, self.scratch) for n, f in files.items()}
            for engine in self.engines.values():  # fail at load, with the reason, rather than at the first image
                engine.context_for({n: engine.limits[n][1] for n in engine.input_names})
        from sdrt.device_loop import DeviceLoop

        self.use_device_loop = bool(device_loop) and UNET in self.engines
        self.cuda_graphs = cuda_graphs
        self.loop = DeviceLoop(self.device_unet(), self.device, torch.float32)  # engine I/O is float32

    def has(self, network: str) -> bool:
        return network in self.engines

    def _engine(self, network: str) -> Engine:
        if network not in self.engines:
            raise BackendError(f"this build has no {network} engine (it has {', '.join(self.engines)}); rebuild with `sdrt build`")
        return self.engines[network]

    def set_lora_factors(self, network: str, factors: dict) -> None:
        """Engines built from an export with LoRA slots take the factors as inputs (profiles: rank 0 to
        ShapeLimits.max_lora_rank); they are uploaded once here, not per call. Untested: no TensorRT on the CPU
        machines this was written on."""
        if not self.contracts[network].lora_slots:
            return super().set_lora_factors(network, factors)
        import torch

        if not hasattr(self, "lora_device"):
            self.lora_device = {}
        feeds = self._lora_feeds(network, factors)
        self.lora_device[network] = {n: torch.from_numpy(a).to(self.device) for n, a in feeds.items()}
        if getattr(self, "loop", None) is not None and hasattr(self.loop, "clear"):
            self.loop.clear()  # captured CUDA graphs hold the previous factors' addresses

    def _lora_inputs(self, network: str) -> dict:
        if not self.contracts[network].lora_slots:
            return {}
        if network not in getattr(self, "lora_device", {}):
            self.set_lora_factors(network, {})
        return self.lora_device[network]

    def run(self, network: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Host arrays in, host arrays out: inputs copied into reused device buffers, one run, outputs copied back."""
        import torch

        contract = self.contracts[network]
        lora = self._lora_inputs(network)
        feeds = {**{n: None for n in lora}, **feeds}
        contract.check_feeds({n: (v if v is not None else lora[n]) for n, v in feeds.items()})
        engine = self._engine(network)
        # inference_mode: the buffers may be inference tensors made inside the device loop's inference_mode.
        with torch.inference_mode(), torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            inputs = dict(lora)
            for spec in contract.plain_inputs:
                host = torch.from_numpy(np.ascontiguousarray(feeds[spec.name], dtype=np.float32))
                inputs[spec.name] = engine.buffer("in:" + spec.name, tuple(host.shape)).copy_(host)
            outputs = engine.infer(inputs, self.stream.cuda_stream)
            return {name: t.cpu().numpy() for name, t in outputs.items()}  # .cpu() waits for the stream

    def run_device(self, network: str, tensors: dict) -> dict:
        """torch CUDA tensors in and out, on the current stream (capturable by torch.cuda.graph after one warm-up
        run at the same shapes). The outputs are the engine's buffers, overwritten by the next run at that shape."""
        import torch

        engine = self._engine(network)
        with torch.inference_mode():
            inputs = dict(self._lora_inputs(network))
            for spec in self.contracts[network].plain_inputs:
                t = tensors[spec.name]
                if t.device != self.device or t.dtype != torch.float32 or not t.is_contiguous():
                    t = engine.buffer("in:" + spec.name, tuple(t.shape)).copy_(t)
                inputs[spec.name] = t
            return engine.infer(inputs, torch.cuda.current_stream(self.device).cuda_stream)

    def device_unet(self):
        """`unet(sample, timestep, encoder_hidden_states, **extra) -> out_sample` on device tensors, for the device
        loop (extra: SDXL's text_embeds/time_ids, timestep_cond). A scalar timestep is broadcast to the batch."""

        def unet(sample, timestep, encoder_hidden_states, **extra):
            if tuple(timestep.shape) != (sample.shape[0],):
                timestep = timestep.reshape(1).expand(sample.shape[0])  # run_device copies it into a buffer
            feeds = {"sample": sample, "timestep": timestep, "encoder_hidden_states": encoder_hidden_states, **extra}
            return self.run_device(UNET, feeds)["out_sample"]

        return unet

    @property
    def uses_host_memory(self) -> bool:
        return False

    def precision(self, network: str) -> str | None:
        return self.manifest.extras.get("engines", {}).get(network, {}).get("flags", {}).get("precision")

    def check_shapes(self, shapes: dict[str, dict[str, tuple]]) -> None:
        for network, inputs in shapes.items():
            if network in self.engines:
                self.engines[network].check_shapes(inputs)

    def device_scope(self):
        import torch

        return torch.cuda.device(self.device)

    def synchronize(self) -> None:
        import torch

        self.stream.synchronize()
        torch.cuda.current_stream(self.device).synchronize()

    def describe(self) -> str:
        precisions = sorted({e.get("flags", {}).get("precision", "?") for e in self.manifest.extras.get("engines", {}).values()})
        loop = ("device loop, CUDA graphs" if self.cuda_graphs else "device loop") if self.use_device_loop else "host loop"
        return f"TensorRT {self.machine.tensorrt} on {self.machine.gpu} ({'/'.join(precisions)} engines, {loop})"
