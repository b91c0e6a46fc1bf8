"""The pipeline's own cost per denoising step, with the networks replaced by a zero-cost stand-in.

Each network's outputs are computed once per input shape and then returned from a cache, so what is timed is the
loop itself: scheduler arithmetic, guidance combine, noise draws, observers and batch bookkeeping. Run it under two
revisions (e.g. a worktree of each, one after the other, twice) to see what a change to the loop costs:

    OMP_NUM_THREADS=1 python benchmarks/loop_overhead.py --steps 30 --reps 20
"""

from __future__ import annotations

import argparse
import json
import statistics

import sdrt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--schedulers", default="ddim,dpmpp_2m,euler_a")
    args = parser.parse_args()

    pipe = sdrt.Pipeline.from_pretrained(None, backend="onnx")
    real_run, cache = pipe.backend.run, {}

    def cached_run(network, feeds):
        key = (network,) + tuple((name, value.shape) for name, value in sorted(feeds.items()))
        if key not in cache:
            cache[key] = real_run(network, feeds)
        return cache[key]

    pipe.backend.run = cached_run  # a benchmark's stand-in, never done in the library
    for scheduler in args.schedulers.split(","):
        kw = dict(num_inference_steps=args.steps, num_images_per_prompt=args.batch, height=args.size, width=args.size,
                  scheduler=scheduler, progress=False, output_type="latent")  # fmt: skip
        pipe("a red 7", seed=0, **kw)  # fills the cache
        per_step = [pipe("a red 7", seed=k, **kw).timings["loop"] / args.steps for k in range(args.reps)]
        print(json.dumps({"sdrt": sdrt.__file__, "scheduler": scheduler, "batch": args.batch, "size": args.size,
                          "us_per_step_median": round(statistics.median(per_step) * 1e6, 1)}))  # fmt: skip


if __name__ == "__main__":
    main()
