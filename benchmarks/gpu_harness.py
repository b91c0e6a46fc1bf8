"""The harness both GPU benchmarks share (benchmarks/gpu_bench.py, benchmarks/gpu_bench_sdxl.py): sdrt imported from
this checkout, device-side timing marks, sections that record ok / error / skipped under a time budget and save the
results after each one, and the results table."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
H100_PEAK_FP16 = 989.4e12  # dense fp16/bf16 tensor-core FLOP/s, H100 SXM datasheet (H200: the same)


def import_sdrt():
    """Import sdrt from this checkout: runtime/ is `sdrt`, export/ is `sdrt.export` (an editable install does the same)."""
    try:
        import sdrt

        if Path(sdrt.__file__).resolve().parent == REPO / "runtime":
            import sdrt.export  # noqa: F401

            return sdrt
    except ImportError:
        pass
    for name in [m for m in sys.modules if m == "sdrt" or m.startswith("sdrt.")]:
        del sys.modules[name]
    for name, folder in (("sdrt", REPO / "runtime"), ("sdrt.export", REPO / "export")):
        spec = importlib.util.spec_from_file_location(name, folder / "__init__.py", submodule_search_locations=[str(folder)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    sys.modules["sdrt"].export = sys.modules["sdrt.export"]
    return sys.modules["sdrt"]


class Clock:
    """Device-side marks: CUDA events on a GPU (no sync while marking), perf_counter on the CPU."""

    def __init__(self, cuda: bool):
        import torch

        self.torch, self.cuda = torch, cuda

    def mark(self):
        if self.cuda:
            event = self.torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, a, b) -> float:
        if self.cuda:
            b.synchronize()
            return a.elapsed_time(b)
        return (b - a) * 1e3

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()


def median_ms(fn, clock: Clock, runs: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall time of fn() (synchronised before and after) over `runs`, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        clock.sync()
        t0 = time.perf_counter()
        fn()
        clock.sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), times


def rel(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return float("nan")
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))




class Bench:
    def __init__(self, args):
        self.args, self.t_start = args, time.perf_counter()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.results = {"args": vars(args), "sections": {}, "env": {}, "flops": {}, "unet_call_ms": {}, "runs": [], "parity": {}}

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t_start)

    def section(self, name: str, fn, *fn_args, need_s: float = 0.0):
        """Run one section; record ok / error (with traceback) / skipped; save after each."""
        if self.left() < need_s:
            print(f"[{name}] skipped: {self.left():.0f} s of the budget left, it needs ~{need_s:.0f}")
            self.results["sections"][name] = {"status": "skipped", "why": f"budget: {self.left():.0f} s left"}
            return None
        print(f"[{name}] start at {time.perf_counter() - self.t_start:.1f} s")
        t0 = time.perf_counter()
        try:
            value = fn(*fn_args)
            self.results["sections"][name] = {"status": "ok", "seconds": round(time.perf_counter() - t0, 2)}
            return value
        except Exception as exc:  # one failure must not lose the other sections
            tb = traceback.format_exc()
            print(f"[{name}] ERROR {exc!r}\n{tb}")
            self.results["sections"][name] = {"status": "error", "error": repr(exc), "traceback": tb[-4000:]}
            return None
        finally:
            self.save()

    def add_run(self, impl, batch, steps, calls, loop_ms=None, e2e_ms=None, e2e_all=None, note=""):
        flops = self.results["flops"].get(f"unet_call_b{2 * batch}")
        per_call = None if loop_ms is None else loop_ms / calls
        row = dict(impl=impl, batch=batch, steps=steps, unet_calls=calls, loop_ms=loop_ms, per_call_ms=per_call,
                   e2e_ms=e2e_ms, e2e_all_ms=e2e_all, note=note)  # fmt: skip
        if flops and per_call:
            row["tflops"] = flops / (per_call * 1e-3) / 1e12
            row["frac_of_989"] = flops / (per_call * 1e-3) / H100_PEAK_FP16
            if self.results["env"].get("matmul_tflops"):
                row["frac_of_matmul"] = row["tflops"] / self.results["env"]["matmul_tflops"]
        self.results["runs"].append(row)
        e2e = "-" if e2e_ms is None else f"{e2e_ms:.1f}"
        pc = "-" if per_call is None else f"{per_call:.3f}"
        print(f"  {impl:<14} batch {batch} steps {steps}: per UNet call {pc} ms, end to end {e2e} ms {note}")

    def save(self):
        self.results["elapsed_s"] = round(time.perf_counter() - self.t_start, 1)
        (self.out / "gpu_bench.json").write_text(json.dumps(self.results, indent=1, default=str))
        (self.out / "gpu_bench.txt").write_text(self.table())

    def target_lines(self) -> list[str]:
        """The targets a run is judged against (each benchmark states its own)."""
        return []

    def table(self) -> str:
        lines = [f"sdrt gpu_bench on {self.results['env'].get('device', '?')} "
                 f"({self.results['env'].get('torch', '?')}), {self.results.get('elapsed_s', 0)} s", ""]  # fmt: skip
        lines.append(f"{'impl':<16}{'batch':>6}{'steps':>6}{'calls':>6}{'ms/call':>10}{'e2e ms':>10}{'TFLOP/s':>9}{'%peak':>7}")
        for r in self.results["runs"]:
            f = lambda v, p: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
            lines.append(f"{r['impl']:<16}{r['batch']:>6}{r['steps']:>6}{r['unet_calls']:>6}{f(r['per_call_ms'], 3):>10}"
                         f"{f(r['e2e_ms'], 1):>10}{f(r.get('tflops'), 0):>9}{f(100 * r['frac_of_989'] if 'frac_of_989' in r else None, 1):>7}")  # fmt: skip
        if self.results["unet_call_ms"]:
            lines += ["", "bare UNet call (ms, median): " + ", ".join(f"{k} {v:.3f}" for k, v in self.results["unet_call_ms"].items())]
        if self.results["flops"]:
            lines += ["FLOPs per UNet call: " + ", ".join(f"{k} {v / 1e9:.1f} G" for k, v in self.results["flops"].items())]
        if "matmul_tflops" in self.results["env"]:
            lines += [f"measured fp16 8192^3 matmul: {self.results['env']['matmul_tflops']:.0f} TFLOP/s"]
        if self.results["parity"]:
            lines += ["", "parity (max|a-b| / max|b| on final latents unless named):"]
            lines += [f"  {k}: {v:.3g}" if isinstance(v, float) else f"  {k}: {v}" for k, v in self.results["parity"].items()]
        lines += self.target_lines()
        if "gpu_tests" in self.results:
            lines += [f"gpu tests (pytest -m gpu): {'passed' if self.results['gpu_tests']['passed'] else 'FAILED'}"]
        if "compile" in self.results:
            lines += [f"torch.compile: {json.dumps(self.results['compile'])[:300]}"]
        bad = {k: v["status"] for k, v in self.results["sections"].items() if v["status"] != "ok"}
        lines += ["", "sections not ok: " + (", ".join(f"{k} ({v})" for k, v in bad.items()) if bad else "none")]
        return "\n".join(lines) + "\n"
