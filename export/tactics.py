"""Convolution tactics measured on this machine, the way TensorRT times its kernels before it picks one.

sdrt.export.winograd's rule (choose_tile) was tuned on one CPU (2-core AMD EPYC, AVX2). Where ONNX Runtime's
direct convolution is relatively faster (AVX-512 Xeons: MLAS's NCHWc kernels), its Winograd and sub-pixel
choices can lose. `--conv-tactics measure` instead times, for each distinct shape at the export's opt size,
every form sdrt can export, in a tiny ONNX Runtime session (the same exporter, threads and graph optimisation
the runtime uses), and exports the fastest:
- a 3x3 conv: direct, Winograd F(2x2, 3x3) or F(4x4, 3x3);
- an upsampler (nearest 2x + 3x3 conv): stock, sub-pixel (four 2x2 convs), or sub-pixel by F(4x4);
- an int8 export's quantised conv (kinds "int8conv{k}x{k}/{stride}"): ONNX Runtime's QLinearConv, or im2col + one
  int8 GEMM (sdrt.export.int8_conv_gemm, whose rule_form is the rule).
Every form is exact to float rounding (each has its own test against PyTorch's conv); only speed differs.
Timings are cached per CPU model, ONNX Runtime version and thread count (a JSON file under ~/.cache/sdrt), so an
export measured once is re-made the same way; the rule stays the default because it is deterministic.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from pathlib import Path

from sdrt.cpu import cpu_isa, cpu_name

CONV_TACTIC_MODES = ("rule", "measure")
CONV_TACTICS = {"direct": 0, "f2": 2, "f4": 4}  # tactic -> Winograd tile (0: ONNX Runtime's own conv)
UPSAMPLER_TACTICS = {"plain": None, "subpixel": 0, "subpixel_f4": 4}  # None: stock upsample + conv, no rewrite
MARGIN = 0.05  # a measured tactic replaces the rule's only when this much faster: timing noise must not flip picks
# ... and only after a second timing of the two (each form's best of both counts). Load from elsewhere only adds time, and
# on a shared 2-core machine one burst slowed a whole measurement 2x and flipped picks that cost the SDXL UNet 3.6%.
REPEATS = 5  # timed runs per tactic after one warm-up (the minimum counts: others' load only adds time)
BUDGET_S = 2.0  # per tactic: fewer repeats when one run is slow


def conv_key(kind: str, in_channels: int, out_channels: int, batch: int, height: int, width: int) -> str:
    return f"{kind} {in_channels}->{out_channels} n{batch} {height}x{width}"


def cache_file(threads: int, folder=None) -> Path:
    """One file per CPU model and vector extensions, ONNX Runtime version and thread count (timings from elsewhere
    do not apply), in `folder` (default ~/.cache/sdrt/conv-tactics)."""
    import onnxruntime as ort

    base = Path(folder) if folder else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sdrt" / "conv-tactics"
    isa = hashlib.sha256(cpu_isa().encode()).hexdigest()[:8]  # "AMD EPYC" names Zen 2 (AVX2) and Zen 4 (AVX-512)
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"{cpu_name()}-{isa}-ort{ort.__version__}-{threads}t").strip("-")
    return base / f"{slug}.json"


class TacticPicker:
    """pick(kind, ci, co, batch, h, w, rule) -> tactic name, timed once per shape and cached in `cache_folder`'s
    file for this CPU; `records` keeps what was picked and why, for the manifest."""

    def __init__(self, threads: int, cache_folder=None, measure=None):
        self.threads = threads
        self.cache_file = cache_file(threads, cache_folder)
        self.measure = measure or time_tactics  # tests pass a fake
        self.records: dict[str, dict] = {}
        self.cache = _read_cache(self.cache_file)

    def pick(self, kind: str, ci: int, co: int, batch: int, h: int, w: int, rule: str) -> str:
        key = conv_key(kind, ci, co, batch, h, w)
        times = self.cache.get(key)
        if times is None:
            tactics = _tactics_of(kind)
            times = self.measure(kind, ci, co, batch, h, w, list(tactics), self.threads)
            best = min(times, key=times.get)
            if rule in times and times[best] < (1 - MARGIN) * times[rule]:  # a departure from the rule: time the two again
                again = self.measure(kind, ci, co, batch, h, w, [best, rule], self.threads)
                times = {t: min(s, again.get(t, s)) for t, s in times.items()}
            self.cache[key] = times
            _write_cache(self.cache_file, self.cache)
        best = min(times, key=times.get)
        choice = best if rule not in times or times[best] < (1 - MARGIN) * times[rule] else rule
        self.records[key] = {"times_ms": {t: round(s * 1e3, 3) for t, s in times.items()}, "rule": rule, "pick": choice}
        return choice


def _tactics_of(kind: str):
    if kind.startswith("int8conv"):
        from sdrt.export.int8_conv_gemm import FORMS

        return FORMS
    return CONV_TACTICS if kind == "conv" else UPSAMPLER_TACTICS


def _read_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # a missing or broken cache only costs a re-measurement


def _write_cache(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def tactic_module(kind: str, tactic: str, ci: int, co: int):
    """A one-layer torch module computing `tactic` with random weights (the forms the export writes); its
    `.conv` is the plain convolution, for references."""
    import torch
    import torch.nn.functional as F

    from sdrt.export.subpixel import phase_kernels_3x3, upsample_conv_subpixel
    from sdrt.export.winograd import winograd_conv3x3

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(ci, co, 3, padding=1)

        def forward(self, x):
            w, b = self.conv.weight, self.conv.bias
            if kind == "conv":
                tile = CONV_TACTICS[tactic]
                return winograd_conv3x3(x, w, b, tile) if tile else self.conv(x)
            if tactic == "plain":
                return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
            if tactic == "subpixel":
                return upsample_conv_subpixel(x, w, b)
            return winograd_conv3x3(x, phase_kernels_3x3(w), b, UPSAMPLER_TACTICS[tactic], upsample=2)

    return One().eval()


def export_tactic(module, x, path: Path) -> None:
    """`module` to ONNX as the export traces networks (torchscript exporter, dynamic batch and size)."""
    import warnings

    import torch

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}})  # fmt: skip


def time_tactics(kind: str, ci: int, co: int, batch: int, h: int, w: int, tactics: list[str], threads: int,
                 repeats: int = REPEATS, budget_s: float = BUDGET_S) -> dict[str, float]:
    """{tactic: best seconds per call} in ONNX Runtime (CPU, `threads` intra-op threads, ENABLE_ALL). The tactics'
    runs take turns, so that a burst of load from elsewhere falls on all of them alike (on a busy 2-core machine
    it slowed the forms unevenly: Winograd's data movement more than direct convolution)."""
    if kind.startswith("int8conv"):
        from sdrt.export.int8_conv_gemm import ConvShape, time_forms

        return time_forms(ConvShape.of_kind(kind, batch, ci, co, h, w), tactics, threads, repeats, budget_s)
    import onnxruntime as ort
    import torch

    x = torch.randn(batch, ci, h, w)
    feed = {"x": x.numpy()}
    sessions = {}
    with tempfile.TemporaryDirectory(prefix="sdrt-tactic-") as tmp:
        for tactic in tactics:
            path = Path(tmp) / f"{tactic}.onnx"
            export_tactic(tactic_module(kind, tactic, ci, co), x, path)
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            sessions[tactic] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return time_in_turns(sessions, feed, repeats, budget_s)


def time_in_turns(sessions: dict, feed: dict, repeats: int = REPEATS, budget_s: float = BUDGET_S) -> dict[str, float]:
    """{name: best seconds per call} of ONNX Runtime `sessions` on `feed`: one warm-up call each (allocations, packed
    weights), then `repeats` rounds in which each runs once, stopping early past `budget_s` per session."""
    for session in sessions.values():
        session.run(None, feed)
    best, start = dict.fromkeys(sessions, float("inf")), time.perf_counter()
    for _ in range(repeats):
        for name, session in sessions.items():
            t0 = time.perf_counter()
            session.run(None, feed)
            best[name] = min(best[name], time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s * len(sessions):
            break
    return best
