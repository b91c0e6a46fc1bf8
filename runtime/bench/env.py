"""Machine facts and memory counters for `sdrt bench`: what it ran on and how much it held.

The benchmark's record has to say what the figures were measured on (CPU, cores, memory, GPU, library versions)
and what else was using the machine before and after (load average, busy processes), and each run's peak
resident memory (GPU memory on CUDA). These helpers are apart from the runners and the orchestration because
they only observe the process and the machine: they run nothing, and torch and psutil are touched only when
already imported or installed.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from sdrt import __version__


def reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM
    except OSError:
        pass


def peak_rss_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # lifetime peak where VmHWM is missing
        return peak if sys.platform == "darwin" else peak * 1024
    except (ImportError, OSError):
        return None


def _torch_cuda():
    torch = sys.modules.get("torch")
    return torch if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized() else None


def _cuda_sync() -> None:
    torch = _torch_cuda()
    if torch is not None:
        torch.cuda.synchronize()


def measure_memory(call):
    """Run `call()` with the peak counters reset; returns (result, {"peak_rss_bytes", "gpu_peak_bytes"})."""
    reset_peak_rss()
    torch = _torch_cuda()
    if torch is not None:
        torch.cuda.reset_peak_memory_stats()
    out = call()
    torch = _torch_cuda()
    return out, {"peak_rss_bytes": peak_rss_bytes(), "gpu_peak_bytes": int(torch.cuda.max_memory_allocated()) if torch else None}


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version(), "sdrt": __version__}
    for name in ("numpy", "onnxruntime", "onnxruntime-gpu", "onnx", "torch", "diffusers", "transformers", "tokenizers", "tensorrt"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def physical_cores() -> int:
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


def machine_info() -> dict:
    from sdrt.cpu import cpu_name as _cpu_name

    info = {"platform": platform.platform(), "machine": platform.machine(), "cpu": _cpu_name(),
            "logical_cpus": os.cpu_count(), "physical_cores": physical_cores(), "gpu": gpu_name()}  # fmt: skip
    try:
        import psutil

        info["memory_bytes"] = psutil.virtual_memory().total
    except ImportError:
        pass
    return info


def gpu_name() -> str | None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)  # fmt: skip
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def busy_snapshot(seconds: float = 1.0) -> dict:
    """What else uses the machine: load average and the processes (not this one's) using > 5% of a CPU."""
    snap = {"loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None, "processes": []}
    try:
        import psutil
    except ImportError:
        snap["processes"] = "psutil not installed"
        return snap
    me = psutil.Process()
    mine = {me.pid} | {p.pid for p in me.children(recursive=True)}
    procs = [p for p in psutil.process_iter(["pid", "name", "cmdline"]) if p.pid not in mine]
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(seconds)
    for p in procs:
        try:
            cpu = p.cpu_percent(None)
            if cpu > 5:
                snap["processes"].append({"pid": p.pid, "cpu_percent": cpu, "cmd": " ".join(" ".join(p.info["cmdline"] or [p.info["name"]]).split())[:200]})
        except psutil.Error:
            pass
    snap["processes"].sort(key=lambda x: -x["cpu_percent"])
    return snap
