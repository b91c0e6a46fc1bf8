"""Time (and optionally profile) one network of two sdrt exports side by side in ONNX Runtime (CPU).

    python benchmarks/sdxl_network_ab.py NETWORK EXPORT_A [EXPORT_B] [--runs 5] [--threads 2] [--profile OUT.json]
        [--size 256] [--batch N] [--static]

Loads NETWORK's model.onnx from each export as sdrt's runtime does (ENABLE_ALL, sequential, `--threads` intra-op
threads), feeds the contract's sample inputs at --size, and runs A and B in turns (paired, so load from elsewhere
falls on both alike); prints min / median seconds per call and B's speed-up. --profile writes ORT's per-op
profile of A (one call after warm-up), summed by op type. --static fixes the inputs' named dims (free dimension
overrides) as sdrt's small-network sessions do. Used for the SDXL data-movement work (issue 19).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import onnxruntime as ort

from sdrt.contracts import ShapeLimits
from sdrt.model.manifest import read_manifest


def session(export: Path, network: str, threads: int, profile: str | None, dims: dict | None, flags=()):
    manifest = read_manifest(export)
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED if "extended" in flags
                                        else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    contract = manifest.contracts[network]
    if dims is not None:
        for spec in contract.inputs:
            for d in spec.shape:
                if isinstance(d, str):
                    options.add_free_dimension_override_by_name(d, dims[d])
    for flag in flags:
        if "=" in flag:  # a session config entry, e.g. session.intra_op.allow_spinning=0
            options.add_session_config_entry(*flag.split("=", 1))
    file = export / manifest.networks[network]["file"]
    if "attn" in flags:  # ORT's attention fusion only (CPU kernels): Attention / MultiHeadAttention
        file = fused_attention(file, network)
    return ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"]), manifest


def fused_attention(file: Path, network: str) -> Path:
    out = file.with_name("model.attn.onnx")
    if out.exists():
        return out
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    o = FusionOptions("unet")
    for name in list(vars(o)):
        if name.startswith("enable_") and isinstance(getattr(o, name), bool):
            setattr(o, name, False)
    o.enable_attention = True
    model = optimize_model(str(file), model_type="unet", opt_level=0, use_gpu=False, optimization_options=o)
    print("fused:", model.get_fused_operator_statistics())
    model.save_model_to_file(str(out), use_external_data_format=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("network")
    p.add_argument("exports", nargs="+", help="EXPORT[:flag,...]; flags: static, extended, attn, key=value")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--profile")
    p.add_argument("--static", action="store_true")
    a = p.parse_args()
    manifest = read_manifest(str(a.exports[0]).partition(":")[0])
    facts = manifest.facts
    dims = ShapeLimits(min_size=a.size, opt_size=a.size, max_size=a.size).dims(facts, "opt")
    contract = manifest.contracts[a.network]
    feeds = contract.sample_inputs(dims)
    named = {d: feeds[s.name].shape[i] for s in contract.inputs for i, d in enumerate(s.shape) if isinstance(d, str)}
    sessions = []
    for i, spec in enumerate(a.exports):
        export, _, flags = str(spec).partition(":")
        flags = tuple(f for f in flags.split(",") if f)
        s, _ = session(Path(export), a.network, a.threads, a.profile if (a.profile and i == 0) else None,
                       named if (a.static or "static" in flags) else None, flags)
        s.run(None, feeds)
        sessions.append(s)
    if a.profile:
        prof = sessions[0].end_profiling()
        by_type = defaultdict(float)
        for e in json.loads(Path(prof).read_text()):
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                by_type[e["args"]["op_name"]] += e["dur"] / 1e6
        total = sum(by_type.values())
        for op, t in sorted(by_type.items(), key=lambda kv: -kv[1]):
            print(f"  {op:28s} {t:7.3f} s ({t / total:5.1%})")
        print(f"  {'total (2 calls profiled: warm-up + 0)':28s} {total:7.3f}")
        return
    times = [[] for _ in sessions]
    outs = [None] * len(sessions)
    for _ in range(a.runs):
        for i, s in enumerate(sessions):
            t0 = time.perf_counter()
            outs[i] = s.run(None, feeds)
            times[i].append(time.perf_counter() - t0)
    for export, t in zip(a.exports, times):
        print(f"{export}: min {min(t):.3f} median {statistics.median(t):.3f} s per {a.network} call ({a.runs} runs)")
    for i in range(1, len(sessions)):
        import numpy as np

        x, y = outs[0][0], outs[i][0]
        paired = statistics.median(t0 / ti for t0, ti in zip(times[0], times[i]))  # each round's runs are back to back
        print(f"{a.exports[i]} / A speed-up: median of paired ratios {paired:.3f}x, of medians "
              f"{statistics.median(times[0]) / statistics.median(times[i]):.3f}x, of minima {min(times[0]) / min(times[i]):.3f}x; "
              f"max |A-B| {np.abs(x - y).max():.2e} of range {np.ptp(x):.2e}")


if __name__ == "__main__":
    main()
