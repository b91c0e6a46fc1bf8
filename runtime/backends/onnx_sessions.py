"""ONNX Runtime sessions for an sdrt export: one per network, the optimised-graph cache, CUDA fusions, and the
shape-specialised sessions of small networks.

- Each session gets its network's providers (sdrt.backends.onnx_providers); a GPU route whose session did not
  get the GPU provider is an error, not a CPU run.
- Full graph optimisation, and the optimised graph cached in `<export>/.ort_cache/` keyed by the ONNX file's
  size, mtime and manifest hash, the ORT version, providers, CPU model and vector extensions (a VM's model name,
  such as "AMD EPYC", covers CPUs with and without AVX-512, whose blocked layouts differ), so a changed file or
  machine rebuilds it
  (the manifest lists only the export's own files, so the cache never trips its checks). ORT maps the
  cache's weights file and reads its pages on first use: a fast load, and a first run that pays for it
  (measured: copying the weights into memory at load instead took the SD 1.5-shape load from 4 s to 25 s,
  peak RSS from 9.5 to 11.5 GB, and did not make the runs faster). Not with the TensorRT EP: ORT cannot save
  a graph with TensorRT-compiled nodes (its own engine cache does that job).
- ORT's Stable Diffusion fusions (onnxruntime.transformers) on the CUDA route only: they emit ops ORT has no CPU
  kernels for. Packed QKV/KV attention only for fp16 graphs, as ORT's own SD optimiser does: ORT's CUDA
  MultiHeadAttention runs packed fp32 attention only for sequences of 256 or more
  (kMinSeqLenForMemoryEfficientAttentionFp32), and SD's mid-block at 512 px has 64 tokens.
- Small networks (weights under SMALL_NETWORK_BYTES at fp32 width, like the built-in model's) run on one intra-op thread
  and get a session per input shape on CPU, built with ORT's free-dimension overrides, so that the shape
  arithmetic a dynamic-shape export carries (hundreds of Shape/Gather/Concat nodes) is folded away.
- On CPU, large networks run without ORT's memory pattern (see options()): their arenas stop at their peak.
- A UNet exported with its step split (sdrt.export.step_split) runs on CPU as two sessions, its step-invariant
  prepass and its step graph (sdrt.backends.onnx_split), unless it is a small network (static shapes fold more
  there than the prepass saves) or `step_split=False`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import onnxruntime as ort

from sdrt.backends.base import module_available
from sdrt.backends.onnx_providers import provider_names, require_session_providers, session_providers
from sdrt.backends.onnx_split import StepSplit
from sdrt.cpu import cpu_isa, cpu_name, int8_weight_bits
from sdrt.errors import ModelError
from sdrt.model.manifest import Manifest

CACHE_DIR = ".ort_cache"
FUSION_MODEL_TYPES = {"text_encoder": "clip", "text_encoder_2": "clip", "unet": "unet", "vae_encoder": "vae", "vae_decoder": "vae"}
FUSION_REVISION = 2  # 2: no packed QKV/KV attention in fp32 graphs (a fused file of revision 1 is rebuilt)
SMALL_NETWORK_BYTES = 64 * 2**20  # a second session per shape costs its weights again: small networks only
SPECIALIZED_PER_NETWORK = 4  # shapes kept per network (least recently used goes first)


def fusion_options(network: str, precision: str):
    """ORT's FusionOptions for `network`: its SD fusions, packed attention only in fp16 graphs."""
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions(FUSION_MODEL_TYPES[network])
    packed = precision == "fp16"
    options.enable_packed_qkv = packed and getattr(options, "enable_packed_qkv", False)
    options.enable_packed_kv = packed and getattr(options, "enable_packed_kv", False)
    return options


def fuse_for_cuda(file: Path, network: str, precision: str):
    """ORT's SD fusions of the ONNX file for its CUDA provider (graph-level: runs without a GPU); the OnnxModel."""
    import sys

    from onnxruntime.transformers import fusion_attention_unet
    from onnxruntime.transformers.optimizer import optimize_model

    # onnxruntime.transformers' modules also import each other as top-level modules: patch both copies.
    classes = {m.FusionAttentionUnet for m in (fusion_attention_unet, sys.modules.get("fusion_attention_unet")) if m is not None}
    originals = {cls: cls.get_num_heads for cls in classes}
    for cls, original in originals.items():
        cls.get_num_heads = _get_num_heads_numpy2(original)
    try:
        return optimize_model(
            str(file), model_type=FUSION_MODEL_TYPES[network], opt_level=0, use_gpu=True, optimization_options=fusion_options(network, precision)
        )
    finally:
        for cls, original in originals.items():
            cls.get_num_heads = original


def _get_num_heads_numpy2(original):
    """ORT's FusionAttentionUnet.get_num_heads calls int() on a shape-[1] array, which NumPy 2.4 refuses
    (TypeError: only 0-dimensional arrays ...), so every UNet attention fusion failed; this reads the same value."""
    import numpy as np

    def get_num_heads(self, reshape_q, is_torch2=False):
        try:
            return original(self, reshape_q, is_torch2)
        except TypeError:
            parent = self.model.get_parent(reshape_q, 1) if is_torch2 else None
            if parent is not None and parent.op_type == "Concat" and len(parent.input) == 4:
                value = self.model.get_constant_value(parent.input[2])
                if isinstance(value, np.ndarray) and value.size == 1:
                    return int(value.reshape(-1)[0])
            return 0

    return get_num_heads


class Sessions:
    """The sessions of one export on one route: `sessions[network]`, and `for_shapes(network, dims)`."""

    def __init__(self, path: Path, manifest: Manifest, route: str, device_id: int = 0, threads: int | None = None,
                 optimized_cache: bool = True, fusions: bool = True, static_shapes: bool | None = None,
                 shape_sessions: int = SPECIALIZED_PER_NETWORK, step_split: bool = True):  # fmt: skip
        self.path, self.manifest, self.route = Path(path), manifest, route
        self.contracts = manifest.contracts
        self.device_id, self.threads = device_id, threads
        self.notes: list[str] = []
        self.providers = {n: session_providers(route, n, manifest, self.path, device_id) for n in manifest.networks}
        self.small_networks = {n for n in manifest.networks if self.fp32_weight_bytes(n) <= SMALL_NETWORK_BYTES}
        note = saturation_note(manifest) if route != "cuda" else None
        if note:
            self.notes.append(note)
        tensorrt = route == "tensorrt"  # ORT cannot save TensorRT-compiled graphs; TensorRT fuses by itself
        self.sessions: dict[str, ort.InferenceSession] = {}
        self.splits: dict[str, StepSplit] = {}  # networks run as prepass + step graph; sessions[] holds the step graph
        # Shape-specialised on CPU: the small networks, unless static_shapes says otherwise for all.
        by_shape = {n for n in manifest.networks if (static_shapes if static_shapes is not None else n in self.small_networks)}
        for network in manifest.networks:
            if step_split and network not in by_shape and self.split_record(network) and self.provider_names(network) == ["CPUExecutionProvider"]:
                self.splits[network] = self.load_split(network, optimized_cache)
                self.sessions[network] = self.splits[network].step
                continue
            self.sessions[network] = self.load(network, optimized_cache and not tensorrt, fusions and not tensorrt)
            require_session_providers(route, network, self.sessions[network].get_providers())
        self.on_cuda = bool(self.sessions) and all("CUDAExecutionProvider" in s.get_providers() for s in self.sessions.values())
        self.static_networks = {
            n for n in by_shape if not self.on_cuda and n not in self.splits
            and not self.contracts[n].lora_slots  # a session per LoRA rank would make every switch a session load
        }  # fmt: skip
        self.specialized: dict[str, dict[tuple, ort.InferenceSession]] = {n: {} for n in self.static_networks}
        self.shape_sessions = max(1, shape_sessions)  # shapes kept per static network
        self.symbols = {  # the named (dynamic) input dims of each static network
            n: sorted({d for spec in self.contracts[n].inputs for d in spec.shape if isinstance(d, str)}) for n in self.static_networks
        }  # fmt: skip

    # --- options and providers ---------------------------------------------------------------------------------

    def options(self, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL, network: str | None = None) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3  # errors only; ORT warns about every node it places on the CPU
        if network in self.small_networks:
            options.intra_op_num_threads = 1
        elif self.threads:
            options.intra_op_num_threads = self.threads
        if network is not None and network not in self.small_networks and self.provider_names(network) == ["CPUExecutionProvider"]:
            # ORT's memory pattern takes, from a shape's second run on, one block of the planned peak from the arena
            # beside the first run's freed chunks: the arena grows to ~2x the activations (SDXL's VAE decoder at
            # 512 px: +2.3 GB on the second image). Without it the chunks are reused: RSS flat from the first image
            # (SDXL, Vega shape: 13.9 -> 11.8 GB at 512 px, 9.8 -> 9.2 GB at 256 px), the same speed.
            options.enable_mem_pattern = False
        return options

    def provider_names(self, network: str | None = None) -> list[str]:
        return provider_names(self.providers[network] if network else next(iter(self.providers.values()), ["CPUExecutionProvider"]))

    def session(self, file: Path, options: ort.SessionOptions, network: str) -> ort.InferenceSession:
        return ort.InferenceSession(str(file), options, providers=self.providers[network])

    # --- loading --------------------------------------------------------------------------------------------

    def split_record(self, network: str) -> dict | None:
        """The manifest's record of the network's step split, when its files are there."""
        record = self.manifest.networks[network].get("step_split")
        folder = (self.path / self.manifest.networks[network]["file"]).parent
        return record if record and all((folder / record[k]).is_file() for k in ("prepass", "step")) else None

    def load_split(self, network: str, optimized_cache: bool) -> StepSplit:
        record = self.split_record(network)
        prepass, step = (self.load(network, optimized_cache, False, part=record[k]) for k in ("prepass", "step"))
        return StepSplit(prepass, step, self.contracts[network])

    def load(self, network: str, optimized_cache: bool, fusions: bool, part: str | None = None) -> ort.InferenceSession:
        """The network's session; `part`: one of its step split's graphs (a file beside model.onnx) instead."""
        file = self.path / self.manifest.networks[network]["file"]
        if part is not None:
            file = file.parent / part
        check = (lambda session: None) if part else (lambda session: self.check_session(session, network, file))
        try:
            source = file
            if fusions and "CUDAExecutionProvider" in self.provider_names(network):
                source = self.fused(network, file)
            cache = self.cache_path(network, source, part) if optimized_cache else None
            if cache is not None and cache.exists():
                try:  # already optimised: loading skips the optimisers' work
                    session = self.session(cache, self.options(ort.GraphOptimizationLevel.ORT_DISABLE_ALL, network), network)
                    check(session)
                    return session
                except Exception:  # a stale or damaged cache costs a rebuild, never the run
                    self.notes.append(f"rebuilt the {network} cache")
            session = self.create_and_cache(source, cache, network)
        except ModelError:
            raise
        except Exception as err:  # ORT raises its own exception types (InvalidProtobuf, Fail, NoSuchFile, ...)
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ModelError(
                f"ONNX Runtime could not load {file} ({first[:300]}); the file is damaged or from an incompatible "
                "export: re-export the model with `sdrt export`"
            ) from None
        check(session)
        return session

    def create_and_cache(self, source: Path, cache: Path | None, network: str) -> ort.InferenceSession:
        """Create the session; with a cache path, ORT also saves the optimised graph there (atomically)."""
        if cache is None or not os.access(cache.parent.parent, os.W_OK):
            return self.session(source, self.options(network=network), network)
        cache.parent.mkdir(exist_ok=True)
        stem = f"{cache.stem}-{os.getpid()}"
        tmp = cache.with_name(stem + ".onnx.tmp")
        options = self.options(network=network)
        options.optimized_model_filepath = str(tmp)
        # Weights go to one side file, whatever the size (a 3.4 GB UNet cannot be one protobuf).
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", stem + ".data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        try:
            session = self.session(source, options, network)
            tmp.replace(cache)
        except Exception:  # a full disk, or a graph ORT cannot save, costs the cache, not the run
            tmp.unlink(missing_ok=True)
            (cache.parent / (stem + ".data")).unlink(missing_ok=True)
            return self.session(source, self.options(network=network), network)  # a real load error surfaces here
        prune_cache(cache, keep=(cache.name, stem + ".data"))
        return session

    def cache_path(self, network: str, source: Path, part: str | None = None) -> Path:
        """One cache file per (network or split part, ONNX file state, ORT version, providers, fusions, machine)."""
        stat = source.stat()
        rel = self.manifest.networks[network]["file"]
        entry = self.manifest.files.get(str(Path(rel).parent / part) if part else rel, {})
        key = {
            "file": [source.name, stat.st_size, stat.st_mtime_ns, entry.get("sha256")],
            "ort": ort.__version__,
            "providers": self.provider_names(network),  # not the thread count: it does not change the optimised graph
            "fusions": FUSION_REVISION,
            "machine": [platform.machine(), cpu_name(), cpu_isa()],
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        name = f"{network}.{Path(part).stem}" if part else network  # unet.prepass-<key>: pruned apart from unet-<key>
        return self.path / CACHE_DIR / f"{name}-{digest}.onnx"

    def fused(self, network: str, file: Path) -> Path:
        """ORT's SD fusions (attention, GroupNorm, NhwcConv, ...) for CUDA, saved once beside the cache."""
        if not module_available("onnx"):
            self.notes.append("no CUDA fusions (pip install onnx)")
            return file
        fused = self.path / CACHE_DIR / f"{network}.fused-{self.cache_path(network, file).stem.rsplit('-', 1)[1]}.onnx"
        if fused.exists():
            return fused
        probe = self.session(file, self.options(ort.GraphOptimizationLevel.ORT_DISABLE_ALL), network)
        if "CUDAExecutionProvider" not in probe.get_providers():
            return file  # no usable GPU: the CPU must not see the CUDA-only ops (the route check then refuses)
        del probe
        try:
            model = fuse_for_cuda(file, network, self.manifest.networks[network].get("precision", "fp32"))
        except Exception as err:  # ORT's optimiser on a graph it does not expect: run unfused rather than not at all
            self.notes.append(f"no CUDA fusions for {network} (onnxruntime.transformers failed: {str(err)[:120]})")
            return file
        fused.parent.mkdir(exist_ok=True)
        model.save_model_to_file(str(fused), use_external_data_format=True, all_tensors_to_one_file=True)
        return fused

    def weight_bytes(self, network: str) -> int:
        """The network's folder on disk: its graph and weights (a shared-weight export's safetensors too), less its
        step split's graphs (which hold a second copy of weights a small model keeps inside its graph)."""
        folder = (self.path / self.manifest.networks[network]["file"]).parent
        split = self.manifest.networks[network].get("step_split") or {}
        skip = {split.get("prepass"), split.get("step")}
        return sum(f.stat().st_size for f in folder.iterdir() if f.is_file() and f.name not in skip)

    def fp32_weight_bytes(self, network: str) -> int:
        """weight_bytes at fp32 width: an int8 network's 1-byte weights count 4x, so that an int8 SD VAE (57 MB on
        disk, the compute of a 198 MB fp32 one) is not taken for a small network and run on one thread."""
        scale = 4 if self.manifest.networks[network].get("precision") == "int8" else 1
        return scale * self.weight_bytes(network)

    def check_session(self, session: ort.InferenceSession, network: str, file: Path) -> None:
        contract = self.contracts[network]
        got = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
        want = (contract.input_names, contract.output_names)
        types = {t.type for t in session.get_inputs() + session.get_outputs()}
        if got != want or types != {"tensor(float)"}:
            raise ModelError(
                f"{file} takes {got[0]} and gives {got[1]} ({', '.join(sorted(types))}) but the manifest's {network} "
                f"contract says {want[0]} -> {want[1]} (float32): the export is mismatched; re-export it with `sdrt export`"
            )

    # --- per shape ------------------------------------------------------------------------------------------

    def for_shapes(self, network: str, dims: dict[str, int]) -> ort.InferenceSession:
        """The dynamic-shape session, or for a small network one built for exactly these input shapes."""
        if network not in self.static_networks:
            return self.sessions[network]
        key = tuple((d, dims[d]) for d in self.symbols[network])
        cache = self.specialized[network]
        session = cache.pop(key, None)
        if session is None:
            options = self.options(network=network)
            for symbol, value in key:
                options.add_free_dimension_override_by_name(symbol, value)
            session = self.session(self.path / self.manifest.networks[network]["file"], options, network)
            if len(cache) >= self.shape_sessions:
                cache.pop(next(iter(cache)))
        cache[key] = session  # most recently used last
        return session


def prune_cache(cache: Path, keep) -> None:
    """Remove this network's older caches (`unet-<key>.onnx`, `unet-<key>-<pid>.data`)."""
    network = cache.name.rsplit("-", 1)[0]
    for old in cache.parent.glob(f"{network}-*"):
        if old.name not in keep and not old.name.endswith(".tmp"):
            old.unlink(missing_ok=True)


def saturation_note(manifest) -> str | None:
    """What to say when an int8 export quantised with 8-bit weights (made on a CPU with VNNI, AMX or ARM's dot
    products) runs on a CPU whose u8s8 kernels saturate (sdrt.cpu.int8_weight_bits); None when nothing is wrong."""
    networks = (manifest.extras.get("int8") or {}).get("networks", {})
    full = [n for n, stats in networks.items()
            if n in manifest.networks and stats.get("scheme") != "weight-only" and stats.get("weight_bits", 8) == 8]
    if not full or int8_weight_bits() == 8:
        return None
    return (f"int8 {', '.join(full)} quantised with 8-bit weights, which this CPU's int8 kernels (no VNNI) can saturate, "
            "losing quality: re-export with `sdrt export --int8` on this machine (7-bit weights)")
