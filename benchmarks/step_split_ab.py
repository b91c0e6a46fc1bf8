"""The UNet's step split, paired: model.onnx whole against its prepass + step graph, on one sdrt export.

    python benchmarks/step_split_ab.py EXPORT [--size 256] [--steps 4] [--rounds 5] [--threads 2] [--json OUT]

Each round runs one "generation" of `steps` guided UNet calls (batch 2, the same text, a new sample and timestep per
call) with each form, alternating which goes first; a generation's first call of the split form runs the prepass
(fresh text each round, so it is never a cache hit across rounds). Prints the medians and their ratio, and the largest
difference between the two forms' outputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=4, help="UNet calls per generation")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    from sdrt.backends.onnx_binding import run_cpu
    from sdrt.backends.onnx_sessions import Sessions
    from sdrt.model.manifest import read_manifest

    manifest = read_manifest(args.export)
    unet_only = dataclasses.replace(manifest, networks={"unet": manifest.networks["unet"]})
    contract = manifest.contracts["unet"]
    latent = args.size // manifest.facts.vae_scale_factor
    dims = {"unet_batch": 2, "latent_height": latent, "latent_width": latent, "lora_rank": 0}
    t0 = time.perf_counter()
    whole = Sessions(args.export, unet_only, "cpu", threads=args.threads, static_shapes=False, step_split=False)
    split = Sessions(args.export, unet_only, "cpu", threads=args.threads, static_shapes=False)
    assert "unet" in split.splits, "this export has no step split (re-export it with this sdrt)"
    print(f"loaded in {time.perf_counter() - t0:.1f} s")

    def generation(form, seed):
        feeds = contract.sample_inputs(dims, seed)
        outs, start = [], time.perf_counter()
        for step in range(args.steps):
            feeds = {**feeds, "sample": np.random.default_rng(1000 + step).standard_normal(feeds["sample"].shape).astype(np.float32),
                     "timestep": np.full_like(feeds["timestep"], 900 - 200 * step)}
            arrays = {n: np.ascontiguousarray(feeds[n], np.float32) for n in contract.input_names}
            if form == "split":
                outs.append(split.splits["unet"].run(contract, arrays, dims)["out_sample"])
            else:
                outs.append(run_cpu(whole.sessions["unet"], contract, arrays, dims)["out_sample"])
        return time.perf_counter() - start, outs

    generation("whole", 0), generation("split", 0)  # warm-up
    times = {"whole": [], "split": []}
    diff = 0.0
    for r in range(args.rounds):
        order = ("whole", "split") if r % 2 == 0 else ("split", "whole")
        results = {form: generation(form, 10 + r) for form in order}
        for form in order:
            times[form].append(results[form][0])
        diff = max(diff, max(float(np.abs(a - b).max()) for a, b in zip(results["whole"][1], results["split"][1])))
        print(f"round {r}: whole {results['whole'][0]:.3f} s, split {results['split'][0]:.3f} s")
    med = {form: float(np.median(v)) for form, v in times.items()}
    report = {"export": str(args.export), "size": args.size, "steps": args.steps, "threads": args.threads,
              "carried": manifest.networks["unet"]["step_split"]["carried"], "seconds": times,
              "median_generation_s": med, "ratio": med["whole"] / med["split"], "max_abs_diff": diff}  # fmt: skip
    print(f"median per generation of {args.steps} calls: whole {med['whole']:.3f} s, split {med['split']:.3f} s, "
          f"{report['ratio']:.3f}x; outputs differ by at most {diff:.2e}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
