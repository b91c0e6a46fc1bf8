"""The ONNX Runtime backend: runs an sdrt export's networks (CPU, or CUDA / TensorRT with onnxruntime-gpu).

The Backend itself; its parts live beside it, one concern each:
- sdrt.backends.onnx_providers: which onnxruntime is installed, which providers a route gives each network,
  and the errors when a requested GPU provider is missing (never a silent CPU run);
- sdrt.backends.onnx_sessions: one InferenceSession per network, the optimised-graph cache, ORT's CUDA fusions
  (packed attention for fp16 graphs only), shape-specialised sessions for small networks;
- sdrt.backends.onnx_binding: IO binding on CPU and CUDA, batch splitting across threads for small networks.

Routes (the `route` argument; `providers=[names]` still works): "auto" (CUDA when onnxruntime-gpu has it and a
session gets it, else CPU), "cuda", "tensorrt" (ORT's TensorRT EP with per-network profiles, fp16, engine and
timing caches; ORT 1.27+ for TensorRT 11), "cpu".
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from sdrt.backends.base import Backend
from sdrt.backends.onnx_binding import BatchSplitter, CudaBinding, run_cpu
from sdrt.backends.onnx_providers import ROUTES, check_route_available, ort_install_problem, route_for
from sdrt.backends.onnx_sessions import SPECIALIZED_PER_NETWORK, Sessions
from sdrt.errors import BackendError, InputError
from sdrt.model.manifest import Manifest


class OnnxBackend(Backend):
    name = "onnx"

    def __init__(
        self,
        path,
        manifest: Manifest,
        providers=None,
        threads: int | None = None,
        optimized_cache: bool = True,
        fusions: bool = True,
        device_id: int = 0,
        static_shapes: bool | None = None,
        batch_parallel: bool | None = None,
        route: str | None = None,
        shape_sessions: int = SPECIALIZED_PER_NETWORK,
        step_split: bool = True,
    ):
        """route: "auto", "cuda", "tensorrt" or "cpu" (sdrt.backends.onnx_providers); a GPU route whose provider is
        missing is a BackendError. providers: ORT provider names, the older way to say a route.
        threads: intra-op threads (default: ORT's, one per physical core). fusions: apply ORT's SD fusions
        when a session runs on CUDA. static_shapes: a session per input shape with the shapes fixed (None: on
        CPU, for networks whose weights are under SMALL_NETWORK_BYTES). batch_parallel: run a small network's
        batch in `threads` parts at once, one single-threaded run each (None: on, on CPU). shape_sessions: input
        shapes kept per static network (a server whose batches vary in size keeps one per batch size it runs).
        step_split: on CPU, run a UNet exported with its step split as its step-invariant prepass (once per
        generation) and its step graph (sdrt.backends.onnx_split); False runs model.onnx whole."""
        super().__init__(manifest.contracts)
        if route is not None and providers:
            raise InputError("pass route or providers, not both")
        route = route or (route_for(providers) if providers else "auto")
        if route not in ROUTES:
            raise InputError(f"ONNX Runtime route {route!r} is not one of {', '.join(ROUTES)}")
        check_route_available(route)
        self.path, self.manifest, self.route = Path(path), manifest, route
        self.threads, self.device_id = threads, device_id
        self.sessions_set = Sessions(self.path, manifest, route, device_id, threads, optimized_cache, fusions, static_shapes,
                                     shape_sessions, step_split)
        self.sessions = self.sessions_set.sessions
        self.notes = self.sessions_set.notes
        problem = ort_install_problem() if route == "auto" else None
        if problem and not self.sessions_set.on_cuda:
            self.notes.append(problem)
        self.on_cuda = self.sessions_set.on_cuda
        self.small_networks = self.sessions_set.small_networks
        self.splits = self.sessions_set.splits
        self.static_networks = self.sessions_set.static_networks
        self.providers = self.sessions_set.provider_names()
        self.parallel = max(1, self.threads or os.cpu_count() or 1)
        self._cuda = CudaBinding(device_id)
        batch_symbol: dict[str, str] = {}  # batch-parallel networks -> their batch axis' symbol
        if batch_parallel is not False and self.parallel > 1:
            for n in self.static_networks & self.small_networks:  # single-threaded runs, so parts can run side by side
                specs = self.contracts[n].inputs + self.contracts[n].outputs
                if len({spec.shape[0] for spec in specs}) == 1 and isinstance(specs[0].shape[0], str):
                    batch_symbol[n] = specs[0].shape[0]
        self._splitter = BatchSplitter(self.parallel, batch_symbol)
        # Run-time LoRA inputs per network with slots: rank 0 (empty) until the pipeline sets factors.
        self.lora_feeds = {n: c.empty_lora_feeds() for n, c in self.contracts.items() if c.lora_slots}

    def set_lora_factors(self, network: str, factors: dict) -> None:
        if network not in self.lora_feeds:
            return super().set_lora_factors(network, factors)
        self.lora_feeds[network] = self._lora_feeds(network, factors)

    def forget_fixed_inputs(self) -> None:
        """Drop the step splits' kept prepass outputs: the next call runs the prepass whatever its inputs."""
        for split in self.splits.values():
            split.forget()

    # --- what a caller may ask (the pipeline, tests, sdrt info) -------------------------------------------------

    @property
    def uses_host_memory(self) -> bool:
        return not self.on_cuda

    def precision(self, network: str) -> str | None:
        return self.manifest.networks.get(network, {}).get("precision")

    def cached_shapes(self, network: str) -> list[dict[str, int]]:
        """The input shapes that have a session of their own for `network`, least recently used first."""
        return [dict(key) for key in self.sessions_set.specialized.get(network, {})]

    def batch_parts(self, network: str, feeds: dict[str, np.ndarray]) -> int:
        """In how many single-threaded parts, run side by side, a call with these feeds runs (1: whole)."""
        contract = self.contracts[network]
        return len(self._batch_parts(network, self._dims(contract, {s.name: feeds[s.name] for s in contract.inputs})))

    def _session_for(self, network: str, dims: dict[str, int]) -> ort.InferenceSession:
        return self.sessions_set.for_shapes(network, dims)

    def _batch_parts(self, network: str, dims: dict[str, int]) -> list[slice]:
        return self._splitter.parts(network, dims)

    # --- running --------------------------------------------------------------------------------------------

    def run(self, network: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        contract = self.contracts[network]
        if network in self.lora_feeds:
            feeds = {**self.lora_feeds[network], **feeds}
        contract.check_feeds(feeds)
        if network not in self.sessions:
            raise BackendError(f"this export has no {network} network (it has {', '.join(self.sessions)})")
        arrays = {s.name: np.ascontiguousarray(feeds[s.name], dtype=np.float32) for s in contract.inputs}
        dims = self._dims(contract, arrays)
        if self.on_cuda:
            return self._cuda.run(network, self._session_for(network, dims), contract, arrays, dims)
        if network in self.splits:
            return self.splits[network].run(contract, arrays, dims)
        parts = self._batch_parts(network, dims)
        if len(parts) > 1:
            return self._splitter.run(network, contract, arrays, dims, parts, self._session_for)
        return run_cpu(self._session_for(network, dims), contract, arrays, dims)

    def _dims(self, contract, arrays) -> dict[str, int]:
        """Symbol values from the input shapes, plus the image/latent sizes the VAE converts between."""
        dims = {}
        for spec in contract.inputs:
            for symbol, value in zip(spec.shape, arrays[spec.name].shape):
                if isinstance(symbol, str):
                    dims[symbol] = value
        scale = self.manifest.facts.vae_scale_factor
        for axis in ("height", "width"):
            if f"latent_{axis}" in dims:
                dims.setdefault(f"image_{axis}", dims[f"latent_{axis}"] * scale)
            elif f"image_{axis}" in dims:
                dims.setdefault(f"latent_{axis}", dims[f"image_{axis}"] // scale)
        return dims

    def describe(self) -> str:
        providers = list(dict.fromkeys(p for s in self.sessions.values() for p in s.get_providers()))
        precisions = sorted({n.get("precision", "fp32") for n in self.manifest.networks.values()})
        threads = self.threads or "default"
        text = f"onnxruntime {ort.__version__} on {', '.join(providers)} ({'/'.join(precisions)}, {threads} threads)"
        if self.route != "auto":
            text += f"; route {self.route}"
        counts = self.manifest.rewrite_counts()
        names = {"subpixel_upsamplers": "sub-pixel upsamplers", "winograd_convs": "Winograd convs"}
        rewrites = [f"{n} {names[key]}" for key, n in counts.items() if n]
        if rewrites:
            text += f"; export: {', '.join(rewrites)}"
        if self.splits:
            text += f"; step-invariant prepass for {', '.join(sorted(self.splits))}"
        if self.small_networks:
            text += f"; 1 thread for the small {', '.join(sorted(self.small_networks))}"
        if self.static_networks:
            text += f"; static shapes for {', '.join(sorted(self.static_networks))}"
        if self._splitter.symbols:
            text += f"; batch split {self.parallel} ways for {', '.join(sorted(self._splitter.symbols))}"
        return text + (f"; {'; '.join(self.notes)}" if self.notes else "")
