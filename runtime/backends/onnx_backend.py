"""The ONNX Runtime backend: runs an sdrt export's networks (CPU, or CUDA with onnxruntime-gpu).

One InferenceSession per network, created at load with the export's manifest as the reference:
- the best execution provider present (CUDA when onnxruntime-gpu sees a GPU, else CPU), checked on the
  session itself: onnxruntime-gpu lists CUDA as available even on machines without a GPU;
- full graph optimisation, and the optimised graph cached in `<export>/.ort_cache/` keyed by the ONNX file's
  size, mtime and manifest hash, the ORT version, provider and CPU, so a changed file or machine rebuilds it
  (the manifest lists only the export's own files, so the cache never trips its checks). ORT maps the
  cache's weights file and reads its pages on first use: a fast load, and a first run that pays for it
  (measured: copying the weights into memory at load instead took the SD 1.5-shape load from 4 s to 25 s,
  peak RSS from 9.5 to 11.5 GB, and did not make the runs faster);
- ORT's Stable Diffusion fusions (onnxruntime.transformers) on CUDA only: they emit ops ORT has no CPU kernels for;
- small networks (weights under SMALL_NETWORK_BYTES, like the built-in model's) run on one intra-op thread
  (their ops are too small to split: the built-in model's 20-step image took 135 ms on 1 thread and 190-250 ms
  on 2 here) and get a session per input shape on CPU, built with ORT's free-dimension overrides, so that the
  shape arithmetic a dynamic-shape export carries (hundreds of Shape/Gather/Concat nodes) is folded away;
- batch parallelism for those small networks: a batch of 2 or more (the UNet's is 2 with guidance) runs in
  `threads` parts at once, one single-threaded run each (ORT sessions take concurrent runs), every part writing
  its rows of the output arrays: both cores busy where splitting each op across them did not pay;
- IO binding. On CPU each input is bound where it lies and each output is written straight into a fresh
  numpy array the caller owns (no copy in or out). On CUDA, device buffers are allocated once per shape and
  reused; a call copies each input to the device and each output back, which the numpy interface requires.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort

from sdrt.backends.base import Backend, module_available
from sdrt.errors import BackendError, ModelError
from sdrt.model.manifest import Manifest

CACHE_DIR = ".ort_cache"
PROVIDER_ORDER = ("CUDAExecutionProvider", "CPUExecutionProvider")
FUSION_MODEL_TYPES = {"text_encoder": "clip", "unet": "unet", "vae_encoder": "vae", "vae_decoder": "vae"}
SMALL_NETWORK_BYTES = 64 * 2**20  # a second session per shape costs its weights again: small networks only
SPECIALIZED_PER_NETWORK = 4  # shapes kept per network (least recently used goes first)


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
        shape_sessions: int = SPECIALIZED_PER_NETWORK,
    ):
        """providers: ORT provider names in order of preference (default: CUDA if present, then CPU).
        threads: intra-op threads (default: ORT's, one per physical core). fusions: apply ORT's SD fusions
        when a session runs on CUDA. static_shapes: a session per input shape with the shapes fixed (None: on
        CPU, for networks whose weights are under SMALL_NETWORK_BYTES). batch_parallel: run a small network's
        batch in `threads` parts at once, one single-threaded run each (None: on, on CPU). shape_sessions: input
        shapes kept per static network (a server whose batches vary in size keeps one per batch size it runs)."""
        super().__init__(manifest.contracts)
        self.path, self.manifest = Path(path), manifest
        self.threads, self.device_id = threads, device_id
        self.providers = list(providers) if providers else [p for p in PROVIDER_ORDER if p in ort.get_available_providers()]
        self.notes: list[str] = []
        self.sessions: dict[str, ort.InferenceSession] = {}
        self._device_buffers: dict[tuple, ort.OrtValue] = {}
        self.small_networks = {n for n in manifest.networks if self._weight_bytes(n) <= SMALL_NETWORK_BYTES}
        for network in manifest.networks:
            self.sessions[network] = self._load(network, optimized_cache, fusions)
        self.on_cuda = bool(self.sessions) and all("CUDAExecutionProvider" in s.get_providers() for s in self.sessions.values())
        self.static_networks = {
            n for n in self.sessions if not self.on_cuda and (static_shapes if static_shapes is not None else n in self.small_networks)
        }  # fmt: skip
        self._specialized: dict[str, dict[tuple, ort.InferenceSession]] = {n: {} for n in self.static_networks}
        self.shape_sessions = max(1, shape_sessions)
        self._symbols = {  # the named (dynamic) input dims of each static network
            n: sorted({d for spec in self.contracts[n].inputs for d in spec.shape if isinstance(d, str)}) for n in self.static_networks
        }  # fmt: skip
        self.parallel = max(1, self.threads or os.cpu_count() or 1)
        self._pool: ThreadPoolExecutor | None = None
        self._batch_symbol: dict[str, str] = {}  # batch-parallel networks -> their batch axis' symbol
        if batch_parallel is not False and self.parallel > 1:
            for n in self.static_networks & self.small_networks:  # single-threaded runs, so parts can run side by side
                specs = self.contracts[n].inputs + self.contracts[n].outputs
                if len({spec.shape[0] for spec in specs}) == 1 and isinstance(specs[0].shape[0], str):
                    self._batch_symbol[n] = specs[0].shape[0]

    # --- loading --------------------------------------------------------------------------------------------

    def _options(self, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL, network: str | None = None) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3  # errors only; ORT warns about every node it places on the CPU
        if network in self.small_networks:
            options.intra_op_num_threads = 1
        elif self.threads:
            options.intra_op_num_threads = self.threads
        return options

    def _provider_list(self):
        return [(p, {"device_id": self.device_id}) if p == "CUDAExecutionProvider" else p for p in self.providers]

    def _session(self, file: Path, options: ort.SessionOptions) -> ort.InferenceSession:
        return ort.InferenceSession(str(file), options, providers=self._provider_list())

    def _load(self, network: str, optimized_cache: bool, fusions: bool) -> ort.InferenceSession:
        file = self.path / self.manifest.networks[network]["file"]
        try:
            source = file
            if fusions and "CUDAExecutionProvider" in self.providers:
                source = self._fused(network, file)
            cache = self._cache_path(network, source) if optimized_cache else None
            if cache is not None and cache.exists():
                try:  # already optimised: loading skips the optimisers' work
                    session = self._session(cache, self._options(ort.GraphOptimizationLevel.ORT_DISABLE_ALL, network))
                    self._check_session(session, network, file)
                    return session
                except Exception:  # a stale or damaged cache costs a rebuild, never the run
                    self.notes.append(f"rebuilt the {network} cache")
            session = self._create_and_cache(source, cache, network)
        except ModelError:
            raise
        except Exception as err:  # ORT raises its own exception types (InvalidProtobuf, Fail, NoSuchFile, ...)
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ModelError(
                f"ONNX Runtime could not load {file} ({first[:300]}); the file is damaged or from an incompatible "
                "export: re-export the model with `sdrt export`"
            ) from None
        self._check_session(session, network, file)
        return session

    def _create_and_cache(self, source: Path, cache: Path | None, network: str) -> ort.InferenceSession:
        """Create the session; with a cache path, ORT also saves the optimised graph there (atomically)."""
        if cache is None or not os.access(cache.parent.parent, os.W_OK):
            return self._session(source, self._options(network=network))
        cache.parent.mkdir(exist_ok=True)
        stem = f"{cache.stem}-{os.getpid()}"
        tmp = cache.with_name(stem + ".onnx.tmp")
        options = self._options(network=network)
        options.optimized_model_filepath = str(tmp)
        # Weights go to one side file, whatever the size (a 3.4 GB UNet cannot be one protobuf).
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", stem + ".data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        try:
            session = self._session(source, options)
            tmp.replace(cache)
        except Exception:  # a full disk, or a graph ORT cannot save, costs the cache, not the run
            tmp.unlink(missing_ok=True)
            (cache.parent / (stem + ".data")).unlink(missing_ok=True)
            return self._session(source, self._options(network=network))  # a real load error surfaces here
        self._prune_cache(cache, keep=(cache.name, stem + ".data"))
        return session

    def _cache_path(self, network: str, source: Path) -> Path:
        """One cache file per (network, ONNX file state, ORT version, providers, machine)."""
        stat = source.stat()
        entry = self.manifest.files.get(self.manifest.networks[network]["file"], {})
        key = {
            "file": [source.name, stat.st_size, stat.st_mtime_ns, entry.get("sha256")],
            "ort": ort.__version__,
            "providers": self.providers,  # not the thread count: it does not change the optimised graph
            "machine": [platform.machine(), _cpu_name()],
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return self.path / CACHE_DIR / f"{network}-{digest}.onnx"

    @staticmethod
    def _prune_cache(cache: Path, keep) -> None:
        """Remove this network's older caches (`unet-<key>.onnx`, `unet-<key>-<pid>.data`)."""
        network = cache.name.rsplit("-", 1)[0]
        for old in cache.parent.glob(f"{network}-*"):
            if old.name not in keep and not old.name.endswith(".tmp"):
                old.unlink(missing_ok=True)

    def _fused(self, network: str, file: Path) -> Path:
        """ORT's SD fusions (attention, GroupNorm, NhwcConv, ...) for CUDA, saved once beside the cache."""
        if not module_available("onnx"):
            self.notes.append("no CUDA fusions (pip install onnx)")
            return file
        fused = self.path / CACHE_DIR / f"{network}.fused-{self._cache_path(network, file).stem.rsplit('-', 1)[1]}.onnx"
        if fused.exists():
            return fused
        from onnxruntime.transformers.optimizer import optimize_model

        probe = self._session(file, self._options(ort.GraphOptimizationLevel.ORT_DISABLE_ALL))
        if "CUDAExecutionProvider" not in probe.get_providers():
            return file  # onnxruntime-gpu without a usable GPU: the CPU must not see the CUDA-only ops
        del probe
        model = optimize_model(str(file), model_type=FUSION_MODEL_TYPES[network], opt_level=0, use_gpu=True)
        fused.parent.mkdir(exist_ok=True)
        model.save_model_to_file(str(fused), use_external_data_format=True, all_tensors_to_one_file=True)
        return fused

    def _weight_bytes(self, network: str) -> int:
        """The network's folder on disk: its graph and weights (a shared-weight export's safetensors too)."""
        folder = (self.path / self.manifest.networks[network]["file"]).parent
        return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())

    def _session_for(self, network: str, dims: dict[str, int]) -> ort.InferenceSession:
        """The dynamic-shape session, or for a small network one built for exactly these input shapes."""
        if network not in self.static_networks:
            return self.sessions[network]
        key = tuple((d, dims[d]) for d in self._symbols[network])
        cache = self._specialized[network]
        session = cache.pop(key, None)
        if session is None:
            options = self._options(network=network)
            for symbol, value in key:
                options.add_free_dimension_override_by_name(symbol, value)
            session = self._session(self.path / self.manifest.networks[network]["file"], options)
            if len(cache) >= self.shape_sessions:
                cache.pop(next(iter(cache)))
        cache[key] = session  # most recently used last
        return session

    def _check_session(self, session: ort.InferenceSession, network: str, file: Path) -> None:
        contract = self.contracts[network]
        got = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
        want = (contract.input_names, contract.output_names)
        types = {t.type for t in session.get_inputs() + session.get_outputs()}
        if got != want or types != {"tensor(float)"}:
            raise ModelError(
                f"{file} takes {got[0]} and gives {got[1]} ({', '.join(sorted(types))}) but the manifest's {network} "
                f"contract says {want[0]} -> {want[1]} (float32): the export is mismatched; re-export it with `sdrt export`"
            )

    # --- running --------------------------------------------------------------------------------------------

    def run(self, network: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        contract = self.contracts[network]
        contract.check_feeds(feeds)
        if network not in self.sessions:
            raise BackendError(f"this export has no {network} network (it has {', '.join(self.sessions)})")
        arrays = {s.name: np.ascontiguousarray(feeds[s.name], dtype=np.float32) for s in contract.inputs}
        dims = self._dims(contract, arrays)
        if self.on_cuda:
            session = self._session_for(network, dims)
            return self._run_cuda(network, session, session.io_binding(), contract, arrays, dims)
        parts = self._batch_parts(network, dims)
        if len(parts) > 1:
            return self._run_parts(network, contract, arrays, dims, parts)
        return self._run_cpu(self._session_for(network, dims), contract, arrays, dims)

    def _run_cpu(self, session, contract, arrays, dims, outputs=None) -> dict[str, np.ndarray]:
        """One CPU run; outputs: arrays to write into (else new ones, or ORT's where a shape is unpredictable)."""
        binding = session.io_binding()
        outputs = dict(outputs or {})
        for name, array in arrays.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))
        for spec in contract.outputs:
            if spec.name not in outputs and all(isinstance(d, int) or d in dims for d in spec.shape):
                outputs[spec.name] = np.empty(contract.resolve(spec, dims), dtype=np.float32)
            if spec.name in outputs:
                binding.bind_ortvalue_output(spec.name, ort.OrtValue.ortvalue_from_numpy(outputs[spec.name]))
            else:
                binding.bind_output(spec.name, "cpu")
        session.run_with_iobinding(binding)
        if len(outputs) < len(contract.outputs):  # shapes we could not predict: ORT allocated them
            for spec, value in zip(contract.outputs, binding.get_outputs()):
                outputs.setdefault(spec.name, value.numpy())
        return outputs

    def _batch_parts(self, network: str, dims: dict[str, int]) -> list[slice]:
        """How a batch-parallel network's batch splits across the worker threads (one part: not split)."""
        symbol = self._batch_symbol.get(network)
        if symbol is None:
            return [slice(None)]
        size = dims[symbol]
        bounds = np.linspace(0, size, min(self.parallel, size) + 1).round().astype(int)
        return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]

    def _run_parts(self, network, contract, arrays, dims, parts) -> dict[str, np.ndarray]:
        """Run the batch in parts at once, one single-threaded run per worker, each writing its rows of the outputs."""
        symbol = self._batch_symbol[network]
        outputs = {spec.name: np.empty(contract.resolve(spec, dims), dtype=np.float32) for spec in contract.outputs}
        jobs = []
        for part in parts:
            part_dims = {**dims, symbol: part.stop - part.start}
            session = self._session_for(network, part_dims)  # here, not in the workers: it updates the LRU cache
            jobs.append((session, contract, {n: a[part] for n, a in arrays.items()}, part_dims, {n: o[part] for n, o in outputs.items()}))
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.parallel - 1, thread_name_prefix="sdrt-onnx")
        pending = [self._pool.submit(self._run_cpu, *job) for job in jobs[1:]]
        self._run_cpu(*jobs[0])
        for future in pending:
            future.result()
        return outputs

    def _run_cuda(self, network, session, binding, contract, arrays, dims) -> dict[str, np.ndarray]:
        for name, array in arrays.items():
            value = self._device_buffer(network, name, array.shape)
            value.update_inplace(array)
            binding.bind_ortvalue_input(name, value)
        for spec in contract.outputs:
            if all(isinstance(d, int) or d in dims for d in spec.shape):
                binding.bind_ortvalue_output(spec.name, self._device_buffer(network, spec.name, contract.resolve(spec, dims)))
            else:
                binding.bind_output(spec.name, "cuda", self.device_id)
        session.run_with_iobinding(binding)
        return {spec.name: value.numpy() for spec, value in zip(contract.outputs, binding.get_outputs())}

    def _device_buffer(self, network: str, name: str, shape) -> ort.OrtValue:
        key = (network, name, tuple(shape))
        if key not in self._device_buffers:
            self._device_buffers[key] = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.float32, "cuda", self.device_id)
        return self._device_buffers[key]

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
        counts = self.manifest.rewrite_counts()
        names = {"subpixel_upsamplers": "sub-pixel upsamplers", "winograd_convs": "Winograd convs"}
        rewrites = [f"{n} {names[key]}" for key, n in counts.items() if n]
        if rewrites:
            text += f"; export: {', '.join(rewrites)}"
        if self.small_networks:
            text += f"; 1 thread for the small {', '.join(sorted(self.small_networks))}"
        if self.static_networks:
            text += f"; static shapes for {', '.join(sorted(self.static_networks))}"
        if self._batch_symbol:
            text += f"; batch split {self.parallel} ways for {', '.join(sorted(self._batch_symbol))}"
        return text + (f"; {'; '.join(self.notes)}" if self.notes else "")


def _cpu_name() -> str:
    """The CPU model: graphs optimised at ORT_ENABLE_ALL may use layouts for this CPU's vector width."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
