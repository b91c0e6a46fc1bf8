"""Is TensorRT here, on which machine, and does an engine fit it? (sdrt.backends.tensorrt_backend loads engines.)

`tensorrt_status` names the TensorRT, its CUDA build and the NVIDIA driver, and refuses a driver too old for the
build (11.x is CUDA 13: r580+). Before an engine loads, its cache key (GPU model and compute capability, TensorRT
version, the ONNX files' sha256, the profile, the flags) is checked against this machine and the export: a stale
or foreign engine is refused with the reason and the fix, never loaded blind. The key helpers live in the runtime
because both the loader and the builder (sdrt.export.tensorrt_build) use them; importing this module imports
neither tensorrt nor torch.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path

from sdrt.backends.base import module_available
from sdrt.errors import BackendError, ModelError
from sdrt.model.manifest import Manifest

ENGINE_FORMAT = "sdrt-tensorrt-engine/1"
MIN_TENSORRT_MAJOR = 10
INSTALL_HINT = "pip install tensorrt on a machine with an NVIDIA GPU and driver, or run the ONNX export with --backend onnx"


# --- is TensorRT really here? ---------------------------------------------------------------------------------


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:200]


# TensorRT's CUDA builds and the oldest NVIDIA driver each needs (CUDA's minimum driver for its major version).
# PyPI: `tensorrt` 11.x is the CUDA 13 build; 10.x comes as tensorrt-cu12 and (10.13 on) tensorrt-cu13.
MIN_DRIVER_FOR_CUDA = {12: (525, 60), 13: (580, 65)}
SUPPORTED_TENSORRT = "TensorRT 10.x (CUDA 12 or 13 builds) and 11.x (CUDA 13)"


def nvidia_driver_version() -> str | None:
    """The loaded NVIDIA kernel driver's version ("580.65.06"), or None when no driver is loaded."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        text = ""
    import re

    match = re.search(r"Kernel Module(?: for [^ ]+)?\s+(\d+\.\d+(?:\.\d+)?)", text) or re.search(r"\b(\d{3}\.\d+(?:\.\d+)?)\b", text)
    if match:
        return match.group(1)
    try:  # nvidia-ml-py, where it is installed (a driver without /proc, e.g. WSL)
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:
        return None


def tensorrt_cuda_major(version: str) -> int:
    """The CUDA major version the installed TensorRT was built for: from its distribution's name
    (tensorrt-cu12 / tensorrt-cu13 / tensorrt_cu13_libs), else TensorRT 11's only build (13), else 12."""
    import importlib.metadata as md
    import re

    found = set()
    try:
        for dist in md.distributions():
            match = re.fullmatch(r"tensorrt[-_]cu(\d+)(?:[-_].*)?", (dist.metadata.get("Name") or "").lower())
            if match:
                found.add(int(match.group(1)))
    except Exception:
        pass
    if len(found) == 1:
        return found.pop()
    return 13 if int(version.split(".")[0]) >= 11 else 12


def driver_refusal(version: str, driver: str | None) -> str | None:
    """Why this driver cannot run this TensorRT (None when it can, or when no driver version is known)."""
    if driver is None:
        return None
    cuda = tensorrt_cuda_major(version)
    need = MIN_DRIVER_FOR_CUDA.get(cuda)
    try:
        have = tuple(int(x) for x in driver.split(".")[:2])
    except ValueError:
        return None
    if need is None or have >= need:
        return None
    fix = "update the NVIDIA driver"
    if cuda >= 13:
        fix += " (r580 or newer), or install the CUDA 12 build: pip install 'tensorrt-cu12>=10.12,<11'"
    return f"TensorRT {version} is the CUDA {cuda} build and needs NVIDIA driver {need[0]}.{need[1]} or newer; this machine has {driver}: {fix}"


@functools.lru_cache(maxsize=None)
def tensorrt_status(check_gpu: bool = True) -> tuple[bool, str]:
    """(usable, why): TensorRT >= 10 imports and, with check_gpu, its CUDA build suits the driver and it can
    create a Builder (needs a GPU and driver). `why` names the TensorRT, its CUDA build and the driver found.

    PyPI's `tensorrt` stubs can be present without their libraries, and a CPU machine has no GPU, so a bare
    find_spec says nothing: every step runs in a try and any failure counts as "not installed"."""
    try:
        import tensorrt as trt

        version = getattr(trt, "__version__", None)
        if not isinstance(version, str) or not version.split(".")[0].isdigit():
            return False, "the tensorrt package here has no version: a stub without TensorRT's libraries"
        if int(version.split(".")[0]) < MIN_TENSORRT_MAJOR:
            return False, f"TensorRT {version} is older than {MIN_TENSORRT_MAJOR}"
        found = f"TensorRT {version} (CUDA {tensorrt_cuda_major(version)} build)"
        if check_gpu:
            driver = nvidia_driver_version()
            refused = driver_refusal(version, driver)
            if refused:
                return False, refused
            try:
                builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
                failed = "" if builder else "it returned None"
            except Exception as err:  # TypeError "factory function returned nullptr" from a null builder
                builder, failed = None, first_line(err)
            if not builder:
                if driver is None:
                    return False, f"{found} could not create a builder ({failed}): no NVIDIA driver is loaded (no GPU?)"
                return False, f"{found} could not create a builder ({failed}) with NVIDIA driver {driver}: is the GPU visible to this process?"
            del builder
            return True, found + (f", NVIDIA driver {driver}" if driver else "")
        return True, found
    except (Exception, SystemExit) as err:  # ImportError, OSError from missing libs, TypeError from a null builder
        return False, f"import tensorrt failed: {first_line(err)}"


def tensorrt_missing_message(why: str) -> str:
    """The one line every TensorRT entry point says when TensorRT cannot run here."""
    return f"TensorRT is not installed here ({why}); {INSTALL_HINT}"


def require_tensorrt() -> str:
    """The TensorRT version, or BackendError with the one-line install hint."""
    ok, why = tensorrt_status()
    if not ok:
        raise BackendError(tensorrt_missing_message(why))
    import tensorrt as trt

    return trt.__version__


# --- which machine, which key ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MachineInfo:
    """What an engine is tied to: TensorRT engines run only on the GPU model and TensorRT version that built them."""

    gpu: str
    compute_capability: str  # "9.0"
    tensorrt: str

    def describe(self) -> str:
        return f"{self.gpu} (compute {self.compute_capability}) with TensorRT {self.tensorrt}"


def machine_info(device_id: int = 0) -> MachineInfo:
    """This machine's GPU (via torch, else cuda-python) and TensorRT version; placeholders where absent."""
    ok, _ = tensorrt_status(check_gpu=False)
    version = "not installed"
    if ok:
        import tensorrt as trt

        version = trt.__version__
    gpu, capability = _gpu_from_torch(device_id) or _gpu_from_cuda_python(device_id) or ("no GPU found", "-")
    return MachineInfo(gpu, capability, version)


def _gpu_from_torch(device_id: int):
    if not module_available("torch"):
        return None
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        major, minor = torch.cuda.get_device_capability(device_id)
        return torch.cuda.get_device_name(device_id), f"{major}.{minor}"
    except Exception:
        return None


def _gpu_from_cuda_python(device_id: int):
    try:
        try:
            from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
        except ImportError:
            from cuda import cudart
        err, prop = cudart.cudaGetDeviceProperties(device_id)
        if err != cudart.cudaError_t.cudaSuccess:
            return None
        name = prop.name.split(b"\0")[0].decode() if isinstance(prop.name, bytes) else str(prop.name)
        return name, f"{prop.major}.{prop.minor}"
    except Exception:
        return None


def network_onnx_files(manifest: Manifest, network: str) -> dict[str, str]:
    """{relative path: sha256} of a network's ONNX file and its external data (the weights may live there)."""
    file = manifest.networks[network]["file"]
    folder = str(Path(file).parent)
    found = {}
    for rel, info in manifest.files.items():
        same_folder = folder not in ("", ".") and str(Path(rel).parent) == folder
        if rel == file or rel.startswith(file + ".") or same_folder:
            found[rel] = info["sha256"]
    return dict(sorted(found.items()))


def engine_key_fields(network: str, onnx_files: dict, profile: dict, flags: dict, machine: MachineInfo) -> dict:
    """Everything an engine depends on. Two builds with equal fields make interchangeable engines."""
    return {
        "format": ENGINE_FORMAT,
        "network": network,
        "onnx_sha256": dict(sorted(onnx_files.items())),
        "profile": {name: [list(s) for s in shapes] for name, shapes in profile.items()},
        "flags": dict(sorted(flags.items())),
        "gpu": machine.gpu,
        "compute_capability": machine.compute_capability,
        "tensorrt": machine.tensorrt,
    }


def engine_key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def describe_mismatch(old: dict, new: dict) -> str:
    """What changed between two engines' key fields, in words ('' when nothing did)."""
    changes = []
    if (old.get("gpu"), old.get("compute_capability")) != (new.get("gpu"), new.get("compute_capability")):
        changes.append(
            f"built for {old.get('gpu')} (compute {old.get('compute_capability')}), this GPU is {new.get('gpu')} "
            f"(compute {new.get('compute_capability')})"
        )
    if old.get("tensorrt") != new.get("tensorrt"):
        changes.append(f"built with TensorRT {old.get('tensorrt')}, this machine has {new.get('tensorrt')}")
    if old.get("onnx_sha256") != new.get("onnx_sha256"):
        changes.append("the ONNX file changed since (its sha256 differs)")
    if old.get("profile") != new.get("profile"):
        changes.append("the shape profile differs")
    if old.get("flags") != new.get("flags"):
        changes.append(f"the build flags differ ({old.get('flags')} -> {new.get('flags')})")
    for name in ("format", "network"):
        if old.get(name) != new.get(name):
            changes.append(f"{name} {old.get(name)} -> {new.get(name)}")
    return "; ".join(changes)


def read_sidecar(folder: Path, entry: dict) -> dict:
    """The engine's sidecar JSON, checked against its own key and the manifest's; ModelError when they disagree."""
    path = Path(folder) / entry["sidecar"]
    try:
        sidecar = json.loads(path.read_text())
        fields, key = sidecar["key_fields"], sidecar["key"]
    except FileNotFoundError:
        raise ModelError(f"{path} is missing: the engine's key cannot be checked; rebuild the engines with `sdrt build`") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise ModelError(f"{path} is damaged: the engine's key cannot be checked; rebuild the engines with `sdrt build`") from None
    if engine_key(fields) != key or key != entry.get("key") or key not in Path(entry["file"]).name:
        raise ModelError(
            f"{path} does not match its engine (key {entry.get('key')} in the manifest, {key} in the sidecar, "
            f"{engine_key(fields)} recomputed): the folder was edited; rebuild the engines with `sdrt build`"
        )
    return fields


def check_engine(folder: Path, manifest: Manifest, network: str, machine: MachineInfo) -> Path:
    """The engine file for `network`, once its key matches this machine and the export; else ModelError saying why."""
    engines = manifest.extras.get("engines") or {}
    if network not in engines:
        raise ModelError(f"{folder} has no TensorRT engine for {network}; build the engines with `sdrt build`")
    entry = engines[network]
    fields = read_sidecar(folder, entry)
    current = {**fields, "onnx_sha256": network_onnx_files(manifest, network), "gpu": machine.gpu,
               "compute_capability": machine.compute_capability, "tensorrt": machine.tensorrt}  # fmt: skip
    why = describe_mismatch(fields, current)
    if why:
        source = manifest.extras.get("onnx_export", "ONNX_DIR")
        raise ModelError(
            f"the {network} engine in {folder} does not fit here: {why}; rebuild it on this machine with "
            f"`sdrt build {source} {folder}`, or run this folder with --backend onnx"
        )
    return Path(folder) / entry["file"]
