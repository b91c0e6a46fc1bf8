"""Benchmark sdrt's backends side by side with the pipelines users would pick instead.

    result = run_bench(BenchConfig(model="path/sd", backends=("onnx",), baselines=("diffusers", "optimum")))
    print(format_table(result))

Per runner (an sdrt backend, or a baseline: diffusers, optimum's ONNX Runtime pipeline, OpenVINO) and batch size
it records, per run: end-to-end latency, text encoding, each UNet call (guidance batched, so a call is one step's
network work; PNDM makes n+1 calls for n steps), the loop's own time, VAE decode, a separate VAE encode, and the
process's peak RSS (GPU memory on CUDA). From those: the UNet call's median, the loop overhead per step (loop time
minus the UNet calls, over the calls: scheduler, guidance combine, copies), images per second. Load time is
apart from run time. Warm-up rounds first; then rounds interleave the runners in one fixed order, so drift on the
machine hits all of them alike and every measured run comes right after one run of another runner (rotating the
order each round, as the bench did before, made pairs run A B | B A | A B: with an odd number of runs the reference
had one run more that followed two of the other's, whose memory traffic had just evicted its pages, and the other
one run more straight after its own); median, quartiles and min/max over the runs. Each run starts `settle_s` after
the last one ended: thread pools spin-wait for work a while after a call (ONNX Runtime's, PyTorch's OpenMP), and a
neighbour's spinning cores slowed an int8 UNet call ~10% (benchmarks/results/int8-unet-profile.md).

sdrt runs in this process (as users run it); each baseline runs in a worker process from
benchmarks/baselines/, in a venv of its own that sdrt.bench.runners creates once in the cache (their pins conflict
with each other and with sdrt's), speaking JSON lines (see benchmarks/baselines/common.py). When the runners do
not fit in memory together, they are measured in groups: the first runner (the reference) with each other one
in turn, and each ratio comes from one group.

This module keeps the configuration, the statistics and the orchestration (run_bench); the runners are in
sdrt.bench.runners, model resolution and the cache in sdrt.bench.models, machine facts and memory in
sdrt.bench.env, and the table, report and chart in sdrt.bench.report. The names they define are importable from
here as before. Light imports: numpy and the standard library; torch, matplotlib and psutil only where used.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys
import time
from pathlib import Path

import numpy as np

from sdrt.bench.env import (  # noqa: F401  (re-exported: sdrt.bench's names before the split)
    _cuda_sync, _torch_cuda, busy_snapshot, gpu_name, library_versions, machine_info, measure_memory, peak_rss_bytes,
    physical_cores, reset_peak_rss,
)  # fmt: skip
from sdrt.bench.models import (  # noqa: F401
    _scheduler_name, build_sd15_random, cached_export, folder_digest, model_weight_bytes, resolve_model, sd15_random_dir,
    warm_ort_cache,
)  # fmt: skip
from sdrt.bench.report import _fmt, format_report, format_table, write_chart  # noqa: F401
from sdrt.bench.runners import (  # noqa: F401
    BASELINES, PROMPT, TORCH_PIN, Baseline, InProcessRunner, SdrtRunner, WorkerRunner, baseline_python,
)  # fmt: skip
from sdrt.errors import InputError, ModelError, SdrtError

SCHEMA = "sdrt-bench/1"
BASELINES_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "baselines"  # a source checkout's
# Per-run figures, in table order; the derived ones are computed from each run's raw sample.
STAGES = ("e2e_s", "text_s", "unet_call_s", "unet_total_s", "overhead_step_s", "overhead_pct", "decode_s", "encode_s",
          "images_per_s", "peak_rss_bytes", "gpu_peak_bytes")  # fmt: skip
# Peak resident memory while running, as a multiple of the fp32 weights: measured on the SD 1.5-shape model at
# 256x256 (benchmarks/results/sd15-random-256px-4steps.json); sdrt-torch and TensorRT (GPU) are estimates.
MEMORY_FACTOR = {"sdrt-onnx-int8": 1.0, "openvino-int8": 1.5, "openvino-hybrid": 1.5, "sdrt-onnx": 1.6, "sdrt-torch": 1.2, "sdrt-tensorrt": 1.0, "diffusers": 1.2, "optimum": 1.4, "openvino": 2.3}


def default_cache_dir() -> Path:
    return Path(os.environ.get("SDRT_BENCH_CACHE", Path.home() / ".cache" / "sdrt" / "bench"))


@dataclasses.dataclass
class BenchConfig:
    model: Path | None = None  # diffusers folder or sdrt export (None: the built-in model)
    sd15_random: bool = False  # instead of `model`: SD 1.5's configs with random weights, built once in the cache
    export: Path | None = None  # an sdrt export of `model` for the onnx backend (default: made once in the cache)
    backends: tuple[str, ...] = ("onnx", "torch")
    baselines: tuple[str, ...] = ("diffusers",)
    size: int | None = None  # image side (default: the model's own)
    steps: int = 20
    batches: tuple[int, ...] = (1,)
    runs: int = 5
    warmup: int = 1
    threads: int | None = None  # default: one per physical core, for every runner alike
    guidance: float = 7.5
    device: str = "cpu"
    order: str = "auto"  # "interleaved", "pairs" (the reference with each other runner), "sequential", "auto"
    in_process: tuple[str, ...] = ()  # baselines to run in this process instead of a worker
    baseline_envs: dict = dataclasses.field(default_factory=dict)  # baseline -> venv folder to use as it is
    create_envs: bool = True  # create missing baseline venvs (pip, PyPI)
    cache_dir: Path = dataclasses.field(default_factory=default_cache_dir)
    baselines_dir: Path = BASELINES_DIR
    note: str = ""  # what else ran on the machine, in the user's words (recorded; a snapshot is taken too)
    settle_s: float = 0.5  # idle time before each run: the last runner's thread pools stop spinning (module docstring)


# --- statistics ----------------------------------------------------------------------------------------------


def summarize(values) -> dict | None:
    values = [float(v) for v in values if v is not None]
    if not values:
        return None
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return {"median": float(median), "q1": float(q1), "q3": float(q3), "min": min(values), "max": max(values), "n": len(values)}


def derive(sample: dict, batch: int) -> dict:
    """A run's raw figures -> the per-stage figures of the table."""
    unet = sample.get("unet_s") or []
    calls = len(unet)
    out = {k: sample.get(k) for k in ("e2e_s", "text_s", "decode_s", "encode_s", "peak_rss_bytes", "gpu_peak_bytes")}
    out["unet_calls"] = calls
    out["unet_call_s"] = float(np.median(unet)) if calls else None
    out["unet_total_s"] = float(sum(unet)) if calls else None
    loop = sample.get("loop_s")
    if calls and loop is not None:
        out["overhead_step_s"] = (loop - sum(unet)) / calls
        out["overhead_pct"] = 100.0 * out["overhead_step_s"] / (loop / calls)
    else:
        out["overhead_step_s"] = out["overhead_pct"] = None
    out["images_per_s"] = batch / sample["e2e_s"] if sample.get("e2e_s") else None
    return out


def plan_groups(names: list[str], order: str, weight_bytes: int) -> tuple[list[list[str]], str]:
    """Which runners are loaded together: all at once if they fit in memory, else the reference with each other."""
    if order == "auto":
        need = sum(MEMORY_FACTOR.get(n, 2.0) * weight_bytes + 0.6e9 for n in names)
        try:
            import psutil

            avail = psutil.virtual_memory().available
        except ImportError:
            avail = float("inf")
        order = "interleaved" if need < 0.8 * avail else "pairs"
        reason = f"auto: an estimated {need / 1e9:.1f} GB for all runners at once, {avail / 1e9:.1f} GB available"
    else:
        reason = f"asked for {order}"
    if order == "interleaved" or (len(names) <= 2 and order != "sequential"):
        return [names], f"interleaved ({reason})"
    if order == "pairs":
        return [[names[0], n] for n in names[1:]], f"pairs with {names[0]} as the reference ({reason})"
    if order == "sequential":
        return [[n] for n in names], f"sequential, one runner at a time ({reason})"
    raise InputError(f"order {order!r} is not one of auto, interleaved, pairs, sequential")


# --- the benchmark ---------------------------------------------------------------------------------------------


def run_bench(config: BenchConfig, log=print) -> dict:
    """Measure every configured runner; returns the full record (see SCHEMA, written as JSON by the CLI)."""
    _check(config)
    started = datetime.datetime.now(datetime.timezone.utc)
    busy_before = busy_snapshot()
    threads = config.threads or physical_cores()
    cfg = dataclasses.replace(config, model=sd15_random_dir(config, log)) if config.sd15_random else config
    model, diffusers_dir, export = resolve_model(cfg)
    from sdrt.model.facts import read_model_facts

    facts = read_model_facts(diffusers_dir) if diffusers_dir else None
    if facts is None:
        from sdrt.model.manifest import read_manifest

        facts = read_manifest(export).facts
    size = cfg.size or facts.default_size
    if size % facts.size_step:
        raise InputError(f"size {size} is not a multiple of {facts.size_step} for this model; use {max(facts.size_step, size // facts.size_step * facts.size_step)}")
    request = {"model": str(diffusers_dir) if diffusers_dir else None, "size": size, "steps": cfg.steps, "guidance": cfg.guidance,
               "threads": threads, "device": cfg.device, "precision": "fp32" if cfg.device == "cpu" else "fp16",
               "cache_dir": str(cfg.cache_dir)}  # fmt: skip

    record = {"schema": SCHEMA, "created": started.isoformat(timespec="seconds"), "command": None,
              "machine": machine_info(), "busy_before": busy_before, "note": cfg.note,
              "libraries": library_versions(),
              "config": {**request, "model_arg": "sd15-random" if config.sd15_random else str(config.model or "built-in"), "export": str(export) if export else None,
                         "batches": list(cfg.batches), "runs": cfg.runs, "warmup": cfg.warmup, "settle_s": cfg.settle_s, "prompt": PROMPT,
                         "scheduler": _scheduler_name(diffusers_dir or export), "facts": facts.to_dict()},
              "runners": {}, "groups": [], "notes": []}  # fmt: skip

    runners = {}
    for backend in cfg.backends:
        name = f"sdrt-{backend}"
        entry = record["runners"][name] = {"label": f"sdrt, {backend} backend", "kind": "in-process", "samples": {}}
        try:
            if backend == "torch":
                if diffusers_dir is None:
                    raise ModelError("the torch backend needs the diffusers folder; pass it as MODEL")
                runners[name] = SdrtRunner(backend, diffusers_dir)
            else:
                if export is None and backend != "onnx-int8":  # onnx-int8 makes its own export from the diffusers folder
                    if diffusers_dir is None:
                        raise ModelError(f"{model} is neither a diffusers folder nor an sdrt export")
                    t0 = time.perf_counter()
                    export = cached_export(diffusers_dir, size, max(cfg.batches), cfg, log)
                    entry["export_s"] = time.perf_counter() - t0
                folder = export
                if backend == "onnx-int8":  # issue 22: `sdrt export --int8` of the same model, made once
                    if diffusers_dir is None:
                        raise ModelError("the onnx-int8 backend needs the diffusers folder to export; pass it as MODEL")
                    t0 = time.perf_counter()
                    folder = cached_export(diffusers_dir, size, max(cfg.batches), cfg, log, int8=True)
                    entry["export_s"] = time.perf_counter() - t0
                    from sdrt.model.manifest import read_manifest

                    entry["int8"] = {k: v for k, v in read_manifest(folder).extras.get("int8", {}).items() if k != "networks"}
                entry["export"] = str(folder)
                if backend in ("onnx", "onnx-int8"):
                    entry["first_load_s"] = warm_ort_cache(folder, threads, cfg.device)
                runners[name] = SdrtRunner(backend.split("-")[0], folder, name)
        except Exception as err:  # recorded; the other runners go on
            entry["error"] = _why(err)
            log(f"{name}: skipped ({entry['error']})")
    for b in cfg.baselines:
        baseline = BASELINES[b]
        entry = record["runners"][b] = {"label": baseline.label, "samples": {}}
        try:
            if diffusers_dir is None:
                raise ModelError(f"{model} is an export; the {b} baseline needs the diffusers folder it came from")
            script = Path(cfg.baselines_dir) / baseline.script
            if not script.exists():
                raise SdrtError(f"{script} is missing: baselines run from a source checkout of sdrt (benchmarks/baselines/)")
            if b in cfg.in_process:
                entry["kind"], entry["python"] = "in-process", sys.executable
                runners[b] = InProcessRunner(baseline, script)
            else:
                python = baseline_python(baseline, cfg, log)
                entry["kind"], entry["python"] = "worker", python
                runners[b] = WorkerRunner(baseline, python, script, cfg.cache_dir / "logs", threads)
            t0 = time.perf_counter()
            entry["prepare"] = runners[b].prepare(request)
            entry["prepare_s"] = time.perf_counter() - t0
        except Exception as err:
            entry["error"] = _why(err)
            log(f"{b}: skipped ({entry['error']})")
            runners.pop(b, None)

    groups, why = plan_groups(list(runners), cfg.order, model_weight_bytes(diffusers_dir))
    record["order"] = why
    for index, group in enumerate(groups):
        record["groups"].append(_measure_group(index, [runners[n] for n in group], cfg, request, record, log))
    for name, entry in record["runners"].items():
        entry["stats"] = {b: {k: summarize(d.get(k) for d in derived) for k in STAGES}
                          for b, derived in ((b, [derive(s, int(b)) for s in samples]) for b, samples in entry["samples"].items())}  # fmt: skip
        entry["stats_load_s"] = summarize(entry.get("load_s", []))
        if not entry["samples"] and "error" not in entry:
            entry["error"] = "no run completed"
    record["speedups"] = speedups(record)
    record["busy_after"] = busy_snapshot()
    record["seconds"] = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
    return record


def _measure_group(index: int, group: list, cfg: BenchConfig, request: dict, record: dict, log) -> dict:
    """Load the group's runners, then warm-up and measured rounds interleaved across them and the batch sizes."""
    out = {"runners": [r.name for r in group], "samples": {r.name: {} for r in group}}
    live = []
    for r in group:
        entry = record["runners"][r.name]
        try:
            log(f"loading {r.name}")
            info = r.load(request)
            entry.setdefault("load_s", []).append(info.pop("load_s"))
            entry.setdefault("load_peak_rss_bytes", []).append(info.pop("peak_rss_bytes", None))
            entry.update(info)
            live.append(r)
        except Exception as err:
            entry["error"] = _why(err)
            log(f"{r.name}: load failed ({entry['error']})")
            r.close()
    rounds = cfg.warmup + cfg.runs
    for k in range(rounds):
        order = list(live)  # the same order every round (module docstring)
        for batch in cfg.batches:
            for r in order:
                if r not in live:
                    continue
                time.sleep(cfg.settle_s)
                try:
                    s = r.run(batch, seed=k)
                    s["encode_s"] = r.vae_encode(batch, seed=k)
                except Exception as err:
                    record["runners"][r.name]["error"] = _why(err)
                    log(f"{r.name}: run failed ({_why(err)})")
                    live.remove(r)
                    r.close()
                    continue
                s.update(round=k, warmup=k < cfg.warmup, group=index)
                log(f"  {'warm-up' if k < cfg.warmup else f'run {k - cfg.warmup + 1}/{cfg.runs}'} {r.name} batch {batch}: {s['e2e_s']:.3f} s")
                if k >= cfg.warmup:
                    out["samples"][r.name].setdefault(str(batch), []).append(s)
                    record["runners"][r.name]["samples"].setdefault(str(batch), []).append(s)
    for r in group:
        r.close()
    # The group keeps its own medians (ratios come from runners measured side by side); samples live in "runners".
    out["e2e_median_s"] = {n: {b: summarize(x["e2e_s"] for x in v)["median"] for b, v in d.items()} for n, d in out.pop("samples").items()}
    return out


def speedups(record: dict) -> dict:
    """{sdrt runner: {baseline: {batch: {stage: baseline median / sdrt median}}}}, from the runs of a group that
    held both (runners measured side by side; a reference measured in several groups is compared within each).
    Sequential order (runners too big to be resident together): from all runs, with "side_by_side": False."""
    out = {}
    sdrt = [n for n in record["runners"] if n.startswith("sdrt-")]
    others = [n for n in record["runners"] if n not in sdrt]
    for s in sdrt:
        for o in others:
            shared = [i for i, g in enumerate(record["groups"]) if s in g["runners"] and o in g["runners"]]
            apart = not shared and str(record.get("order", "")).startswith("sequential")
            if not shared and not apart:
                continue

            def kept(x):
                return apart or x.get("group", shared[0]) == shared[0]

            for batch, mine in record["runners"][s]["samples"].items():
                theirs = record["runners"][o]["samples"].get(batch)
                mine = [derive(x, int(batch)) for x in mine if kept(x)]
                theirs = [derive(x, int(batch)) for x in theirs or [] if kept(x)]
                if not mine or not theirs:
                    continue
                ratios = {}
                for stage in ("e2e_s", "text_s", "unet_call_s", "decode_s", "encode_s"):
                    a, b = summarize(x[stage] for x in mine), summarize(x[stage] for x in theirs)
                    ratios[stage] = b["median"] / a["median"] if a and b and a["median"] else None
                if apart:
                    ratios["side_by_side"] = False
                out.setdefault(s, {}).setdefault(o, {})[batch] = ratios
    return out


def _why(err: Exception) -> str:
    return f"{type(err).__name__}: {err}" if not isinstance(err, SdrtError) else str(err)


def _check(config: BenchConfig) -> None:
    for b in config.baselines:
        if b not in BASELINES:
            raise InputError(f"baseline {b!r} is not one of {', '.join(BASELINES)}")
    for b in config.backends:
        if b not in ("onnx", "onnx-int8", "torch", "tensorrt"):
            raise InputError(f"backend {b!r} is not one of onnx, onnx-int8, torch, tensorrt")
    if not config.backends and not config.baselines:
        raise InputError("nothing to measure: name at least one backend or baseline")
    if config.runs < 1 or config.warmup < 0:
        raise InputError(f"runs {config.runs} must be >= 1 and warmup {config.warmup} >= 0")
    if not config.batches or min(config.batches) < 1:
        raise InputError(f"batch sizes {list(config.batches)} must be >= 1")
    if not 0 <= config.settle_s <= 60:
        raise InputError(f"settle {config.settle_s} s must be 0-60 (idle seconds before each run)")
    if config.steps < 1:
        raise InputError(f"steps {config.steps} must be >= 1")
