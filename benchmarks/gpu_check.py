"""One prepared GPU check for issue #17's fixes; run it on a machine with an NVIDIA GPU (it cannot run without one).

    python3 benchmarks/gpu_check.py [--out FILE.json] [--shapes 24] [--skip onnx,loop,graphs]

What it runs, each part reporting ok / failed / skipped-with-why, and memory where it matters:
1. onnx:   the built-in model on ONNX Runtime's CUDA provider (route "cuda": an error, not a CPU run, when
           onnxruntime-gpu or its CUDA libraries are missing), every network compared with the CPU provider; the
           UNet's fp32 CUDA fusions (no packed attention) included. Needs onnxruntime-gpu.
2. loop:   sdrt.device_loop with CUDA graphs on the last GPU (cuda:1 when there are two: capture used to assume
           device 0), graph replay compared with the eager loop. The UNet is a small pure-torch conv net (no
           diffusers needed), or the tiny diffusers UNet where diffusers is installed.
3. graphs: the captured-step cache under many shapes/batches/schedulers (more than MAX_CACHED_STEPS): prints
           torch.cuda memory after each and checks it stops growing (one shared pool, LRU-bounded cache).
The machine lent to this project has torch + CUDA, onnx and onnxruntime (CPU) but no diffusers or onnxruntime-gpu;
carry an onnxruntime-gpu wheel to check part 1. Imports nothing heavy until it runs; `--help` works anywhere.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _mib(n: int) -> float:
    return round(n / 2**20, 1)


def check_onnx(report: dict) -> None:
    import numpy as np
    import onnxruntime as ort

    from sdrt.backends.onnx_backend import OnnxBackend
    from sdrt.backends.onnx_providers import ort_distributions, ort_install_problem
    from sdrt.builtin import builtin_model_dir
    from sdrt.model.manifest import read_manifest

    report["ort"] = {"version": ort.__version__, "available": ort.get_available_providers(), "distributions": ort_distributions(),
                     "problem": ort_install_problem()}  # fmt: skip
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        report["status"] = "skipped: onnxruntime here has no CUDAExecutionProvider (install onnxruntime-gpu)"
        return
    folder = builtin_model_dir()
    manifest = read_manifest(folder)
    t0 = time.perf_counter()
    gpu = OnnxBackend(folder, manifest, route="cuda")
    report["load_s"] = round(time.perf_counter() - t0, 2)
    cpu = OnnxBackend(folder, manifest, route="cpu")
    report["describe"] = gpu.describe()
    errors = {}
    for network in manifest.networks:
        dims = {"batch": 2, "unet_batch": 2, "image_height": 64, "image_width": 64, "latent_height": 8, "latent_width": 8}
        feeds = manifest.contracts[network].sample_inputs(dims, seed=1)
        got, want = gpu.run(network, feeds), cpu.run(network, feeds)
        errors[network] = {k: float(np.abs(got[k] - want[k]).max() / max(np.abs(want[k]).max(), 1e-12)) for k in want}
    report["rel_error_vs_cpu"] = errors
    worst = max(v for e in errors.values() for v in e.values())
    report["status"] = "ok" if worst < 1e-2 else f"failed: max relative error {worst:.2e}"


def _unet(device, dtype):
    import torch

    try:
        sys.path.insert(0, str(ROOT / "tests"))
        from test_device_loop import tiny_unet  # needs diffusers

        return tiny_unet(device, dtype), "tiny diffusers UNet"
    except BaseException:  # no diffusers (pytest.importorskip raises a BaseException), or no pytest
        pass

    class ConvNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(4, 32, 3, padding=1)
            self.b = torch.nn.Conv2d(32, 4, 3, padding=1)
            self.t = torch.nn.Linear(32, 32)

        def forward(self, x, t, text):
            h = torch.nn.functional.silu(self.a(x)) + self.t(text.mean(1))[:, :, None, None] + t[:, None, None, None] * 1e-3
            return self.b(h)

    torch.manual_seed(0)
    return ConvNet().to(device, dtype).eval(), "pure-torch conv net"


def check_loop(report: dict) -> None:
    import numpy as np
    import torch

    from sdrt.device_loop import DeviceLoop, draw_step_noise
    from sdrt.export.tiny import SD15_SCHEDULER
    from sdrt.noise import TorchCPUGenerator
    from sdrt.schedulers import make_scheduler

    count = torch.cuda.device_count()
    device = torch.device("cuda", count - 1)
    report["devices"] = [torch.cuda.get_device_name(i) for i in range(count)]
    report["device"] = str(device)
    unet, kind = _unet(device, torch.float16)
    report["unet"] = kind
    loop = DeviceLoop(unet, device, torch.float16)
    results = {}
    for name in ("ddim", "euler_a", "dpmpp_2m"):
        sched = make_scheduler(name, SD15_SCHEDULER)
        sched.set_timesteps(6)
        shape = (1, 4, 16, 16)
        gens = [TorchCPUGenerator(3)]
        x = np.concatenate([g.randn(shape) for g in gens]) * np.float32(sched.init_noise_sigma)
        noise = draw_step_noise(gens, sched, shape)
        text = np.random.default_rng(0).standard_normal((2, 77, 32), dtype=np.float32)
        eager, graph, again = (loop.run(sched, x, text, 3.0, noise, graph=g).float().cpu().numpy() for g in (False, True, True))
        results[name] = {"graph_vs_eager": float(np.abs(graph - eager).max() / max(np.abs(eager).max(), 1e-12)), "replay_equal": bool(np.array_equal(graph, again))}
    report["schedulers"] = results
    bad = [n for n, r in results.items() if r["graph_vs_eager"] > 2e-3 or not r["replay_equal"]]
    report["status"] = "ok" if not bad else f"failed: {bad}"


def check_graphs(report: dict, shapes: int) -> None:
    import numpy as np
    import torch

    from sdrt.device_loop import MAX_CACHED_STEPS, DeviceLoop, draw_step_noise
    from sdrt.export.tiny import SD15_SCHEDULER
    from sdrt.noise import TorchCPUGenerator
    from sdrt.schedulers import make_scheduler

    device = torch.device("cuda", torch.cuda.device_count() - 1)
    unet, _ = _unet(device, torch.float16)
    loop = DeviceLoop(unet, device, torch.float16)
    sides, batches, names = (8, 12, 16, 24, 32, 48), (1, 2), ("ddim", "euler_a")
    combos = [(s, b, n) for n in names for b in batches for s in sides][:shapes]
    rows = []
    for side, batch, name in combos:
        sched = make_scheduler(name, SD15_SCHEDULER)
        sched.set_timesteps(3)
        shape = (1, 4, side, side)
        gens = [TorchCPUGenerator(k) for k in range(batch)]
        x = np.concatenate([g.randn(shape) for g in gens]) * np.float32(sched.init_noise_sigma)
        noise = draw_step_noise(gens, sched, shape)
        text = np.zeros((2 * batch, 77, 32), np.float32)
        loop.run(sched, x, text, 3.0, noise, graph=True)
        torch.cuda.synchronize(device)
        rows.append({"side": side, "batch": batch, "scheduler": name, "cached_steps": len(loop._steps),
                     "allocated_mib": _mib(torch.cuda.memory_allocated(device)), "reserved_mib": _mib(torch.cuda.memory_reserved(device))})  # fmt: skip
        print(f"  graphs: {side:>3}px b{batch} {name:<8} steps {len(loop._steps):>2}  allocated {rows[-1]['allocated_mib']:>8} MiB  "
              f"reserved {rows[-1]['reserved_mib']:>8} MiB", flush=True)  # fmt: skip
    report["rows"] = rows
    report["max_cached_steps"] = MAX_CACHED_STEPS
    bounded = all(r["cached_steps"] <= MAX_CACHED_STEPS for r in rows)
    report["status"] = "ok" if bounded else "failed: the step cache grew past MAX_CACHED_STEPS"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", default=None, help="write the report as JSON here too")
    parser.add_argument("--shapes", type=int, default=24, help="shape/batch/scheduler combinations for the graph-cache check (default: %(default)s)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: onnx, loop, graphs")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch

    report = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu_available": torch.cuda.is_available()}
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); nothing to check", file=sys.stderr)
        return 2
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    parts = {"onnx": check_onnx, "loop": check_loop, "graphs": lambda r: check_graphs(r, args.shapes)}
    for name, fn in parts.items():
        part = report.setdefault(name, {})
        if name in skip:
            part["status"] = "skipped: --skip"
            continue
        t0 = time.perf_counter()
        try:
            fn(part)
        except Exception as err:
            part["status"] = f"failed: {type(err).__name__}: {str(err)[:300]}"
            part["traceback"] = traceback.format_exc()[-2000:]
        part["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"{name:<7} {part['status']} ({part['seconds']} s)", flush=True)
    if torch.cuda.is_available():
        report["peak_allocated_mib"] = {i: _mib(torch.cuda.max_memory_allocated(i)) for i in range(torch.cuda.device_count())}
    text = json.dumps(report, indent=2, default=str)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0 if all(str(report[p].get("status", "")).startswith(("ok", "skipped")) for p in parts) else 1


if __name__ == "__main__":
    sys.exit(main())
