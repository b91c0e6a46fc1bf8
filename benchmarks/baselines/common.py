"""What every baseline worker shares: the JSON protocol, stage timers, peak memory and library versions.

A worker measures one pipeline that users would pick instead of sdrt (diffusers, optimum's ONNX Runtime
pipeline, OpenVINO via optimum-intel), in its own venv, and reports the same stages as `sdrt.bench`:

    python diffusers_worker.py '{"model": "/path/sd", "size": 64, "steps": 20, "batch": [1, 2], "runs": 3}'
        -> one JSON object on stdout: {"ok": true, "load": {...}, "samples": {"1": [...], "2": [...]}}
    python diffusers_worker.py --serve
        -> JSON lines both ways, one request per line, so `sdrt bench` can interleave runs across pipelines:
           {"op": "prepare", "config": {...}}  convert/export the model into its cache, then nothing held
           {"op": "load", "config": {...}}     {"ok": true, "load_s": ..., "versions": {...}, ...}
           {"op": "run", "batch": 2, "seed": 0} {"ok": true, "e2e_s": ..., "unet_s": [...], ...}
           {"op": "exit"}
Protocol lines go to the original stdout; everything else (library prints, progress bars, C++ logs) to stderr.

Stdlib only: it runs in every baseline venv, whatever else is installed there.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
import traceback
from importlib.metadata import PackageNotFoundError, version

PROMPT = "a photo of an astronaut riding a horse on mars"  # the same prompt for every pipeline


# --- timing ----------------------------------------------------------------------------------------------------


def cuda_sync() -> None:
    """Wait for queued CUDA work (only when torch is loaded and has initialised CUDA) so a timer sees it."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class Calls:
    """Start/end times of every call of the wrapped functions, by stage name."""

    def __init__(self):
        self.spans: dict[str, list[tuple[float, float]]] = {}

    def clear(self) -> None:
        self.spans = {}

    def wrap(self, stage: str, fn):
        def timed(*args, **kwargs):
            cuda_sync()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            cuda_sync()
            self.spans.setdefault(stage, []).append((t0, time.perf_counter()))
            return out

        return timed

    def seconds(self, stage: str) -> list[float]:
        return [b - a for a, b in self.spans.get(stage, [])]

    def first_start(self, stage: str) -> float | None:
        spans = self.spans.get(stage)
        return spans[0][0] if spans else None


def sample(calls: Calls, e2e_s: float, loop_s: float | None, **extra) -> dict:
    """One run's figures in the form `sdrt.bench` reads (the same keys as its own runner's)."""
    unet = calls.seconds("unet")
    return {
        "e2e_s": e2e_s,
        "text_s": sum(calls.seconds("text")),
        "text_calls": len(calls.seconds("text")),
        "unet_s": unet,
        "unet_calls": len(unet),
        "loop_s": loop_s,
        "decode_s": sum(calls.seconds("decode")),
        **extra,
    }


# --- memory ------------------------------------------------------------------------------------------------------


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux: VmHWM, via clear_refs) so the next read is this run's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    """Peak resident memory since start or since reset_peak_rss (Linux VmHWM; elsewhere getrusage, lifetime)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024
    except (ImportError, OSError):
        return None


def gpu_peak_bytes(reset: bool = False) -> int | None:
    torch = sys.modules.get("torch")
    if torch is None or not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    if reset:
        torch.cuda.reset_peak_memory_stats()
        return None
    return int(torch.cuda.max_memory_allocated())


def memory_sample(run):
    """Run `run()` with the peak counters reset; returns (its result, {"peak_rss_bytes": , "gpu_peak_bytes": })."""
    reset_peak_rss()
    gpu_peak_bytes(reset=True)
    out = run()
    return out, {"peak_rss_bytes": peak_rss_bytes(), "gpu_peak_bytes": gpu_peak_bytes()}


# --- facts for the record ----------------------------------------------------------------------------------------


def versions(*packages: str) -> dict:
    found = {"python": platform.python_version()}
    for name in packages:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def converted_dir(config: dict, tool: str, *packages: str) -> "Path":
    """Where a baseline keeps its conversion of config["model"]: keyed by the folder's files and the tool versions."""
    import hashlib
    from pathlib import Path

    model = Path(config["model"])
    files = [[str(p.relative_to(model)), p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(model.rglob("*")) if p.is_file()]
    key = json.dumps([str(model), files, versions(*packages)])
    return Path(config["cache_dir"]) / tool / f"{model.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def save_conversion(pipe, out, t0: float) -> dict:
    """Save a baseline's converted pipeline under `out` (written beside it, then renamed: a half-written conversion is
    never mistaken for a cached one); the prepare step's answer."""
    tmp = out.with_name(out.name + ".partial")
    pipe.save_pretrained(tmp)
    tmp.rename(out)
    return {"cached": False, "folder": str(out), "export_s": time.perf_counter() - t0}


def openvino_config(config: dict) -> dict:
    """The OpenVINO baselines' runtime settings: fp32 inference, latency mode, the benchmark's thread count."""
    return {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": str(threads_of(config))}


def is_sdxl(config: dict) -> bool:
    """Whether config["model"] is an SDXL folder (its model_index.json names an SDXL pipeline): the baselines then
    load their SDXL pipeline classes, which take two text encoders and the text_time conditioning."""
    from pathlib import Path

    index = Path(config["model"]) / "model_index.json"
    return index.exists() and "XL" in json.loads(index.read_text()).get("_class_name", "")


def threads_of(config: dict) -> int:
    return int(config.get("threads") or os.cpu_count() or 1)


# --- the protocol ------------------------------------------------------------------------------------------------


def serve(runner, argv=None) -> int:
    """Run a worker: `runner` has prepare(config), load(config) -> dict, run(batch, seed) -> dict,
    vae_encode(batch, seed) -> float and close()."""
    argv = sys.argv[1:] if argv is None else argv
    out = os.fdopen(os.dup(1), "w", buffering=1)  # the protocol's own channel
    os.dup2(2, 1)  # anything else printed, by Python or C++, goes to stderr
    sys.stdout = sys.stderr

    def reply(obj) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    if argv and argv[0] != "--serve":
        request = json.loads(open(argv[0][1:]).read() if argv[0].startswith("@") else argv[0])
        reply(_guarded(lambda: one_shot(runner, request)))
        return 0
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        if request.get("op") == "exit":
            reply({"ok": True})
            break
        reply(_guarded(lambda: handle(runner, request)))
    runner.close()
    return 0


def handle(runner, request: dict) -> dict:
    op = request.get("op")
    if op == "prepare":
        return runner.prepare(request["config"]) or {}
    if op == "load":
        return runner.load(request["config"])
    if op == "run":
        return runner.run(int(request["batch"]), int(request.get("seed", 0)))
    if op == "encode":
        return {"encode_s": runner.vae_encode(int(request["batch"]), int(request.get("seed", 0)))}
    raise ValueError(f"unknown op {op!r}; expected prepare, load, run, encode or exit")


def one_shot(runner, config: dict) -> dict:
    """Load, warm up, then `runs` runs per batch size (interleaved across batch sizes)."""
    batches = config.get("batch", [1])
    batches = [batches] if isinstance(batches, int) else list(batches)
    runner.prepare(config)
    result = {"load": runner.load(config), "samples": {str(b): [] for b in batches}}
    for r in range(int(config.get("warmup", 1)) + int(config.get("runs", 3))):
        for b in batches:
            s = runner.run(b, seed=r)
            s["encode_s"] = runner.vae_encode(b, seed=r)
            if r >= int(config.get("warmup", 1)):
                result["samples"][str(b)].append(s)
    return result


def _guarded(fn) -> dict:
    try:
        return {"ok": True, **fn()}
    except Exception as err:  # the orchestrator records why and goes on with the other pipelines
        traceback.print_exc(file=sys.stderr)
        return {"ok": False, "error": f"{type(err).__name__}: {err}"[:2000]}
