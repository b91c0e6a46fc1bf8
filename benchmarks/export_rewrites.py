"""Side-by-side timing of two sdrt exports of the same model on ONNX Runtime: what the export rewrites buy.

    python benchmarks/export_rewrites.py OLD_EXPORT NEW_EXPORT [--size 256] [--runs 3] [--threads 2]

Times one guided UNet call (batch 2) and one VAE decode (batch 1) per export, interleaved run by run so that
machine drift hits both alike, after one warm-up each; prints medians, the ratio old/new and the largest
difference between the two exports' outputs (relative to the old output's range). Made to measure
`sdrt export` (stock graph) against `sdrt export --winograd` (sub-pixel upsampling + Winograd convolutions).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("exports", nargs=2, type=Path, metavar="EXPORT")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default: %(default)s)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)

    from sdrt.model.source import open_model

    sources = [open_model(e) for e in a.exports]
    backends = [s.create_backend("onnx", threads=a.threads, providers=["CPUExecutionProvider"]) for s in sources]
    facts = sources[0].facts
    lat = a.size // facts.vae_scale_factor
    dims = {"batch": 1, "unet_batch": 2, "latent_height": lat, "latent_width": lat,
            "image_height": a.size, "image_width": a.size}
    work = {"unet": sources[0].contracts["unet"].sample_inputs(dims),
            "vae_decoder": sources[0].contracts["vae_decoder"].sample_inputs(dims)}
    result = {"exports": [str(e) for e in a.exports], "size": a.size, "threads": a.threads,
              "describe": [b.describe() for b in backends], "networks": {}}
    for network, feeds in work.items():
        outs = [b.run(network, feeds) for b in backends]  # warm-up, and the outputs to compare
        key = next(iter(outs[0]))
        diff = float(np.abs(outs[1][key] - outs[0][key]).max() / max(1e-12, np.abs(outs[0][key]).max()))
        times = [[], []]
        for _ in range(a.runs):
            for i, b in enumerate(backends):
                t0 = time.perf_counter()
                b.run(network, feeds)
                times[i].append(time.perf_counter() - t0)
        old, new = statistics.median(times[0]), statistics.median(times[1])
        result["networks"][network] = {"old_s": old, "new_s": new, "ratio": old / new, "rel_diff": diff,
                                       "old_runs": times[0], "new_runs": times[1]}
        print(f"{network:12s} old {old:7.3f} s  new {new:7.3f} s  old/new {old / new:5.2f}x  max diff {diff:.1e}", flush=True)
    if a.json:
        a.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
