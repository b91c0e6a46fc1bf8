"""Quality per step: every sdrt sampler on the built-in digits model, judged by the digit oracle.

For each sampler and step count, one batched pipeline call makes 50 images (10 digits x 5 colours, the prompts
of tests/test_digits.py, seed 0, guidance 7.5); the oracle reads each image's digit and colour. Reported: the
share of images whose digit (colour) is the prompt's, UNet calls, and wall time per image (the whole batched
call - text, loop, decode - divided by 50) with ONNX Runtime and numpy on ONE thread, as CPU time of this
process (on a shared machine the CPU time of a one-thread process is far steadier than wall time; both are
recorded in the JSON).

    OMP_NUM_THREADS=1 python benchmarks/sampler_quality.py                      # all samplers, 2..30 steps
    python benchmarks/sampler_quality.py --samplers ddim,euler_a --steps 4,20 --out /tmp/q

Writes OUT.json (every figure), OUT.md (the tables) and OUT.png (accuracy against time per image).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
PROMPTS = [(d, COLOURS[(d * 3 + k) % 8]) for k in range(5) for d in range(10)]  # as tests/test_digits.py
TEXTS = [f"a {c} {d}" for d, c in PROMPTS]
STEPS = (2, 4, 8, 12, 20, 30)


def measure(pipe, oracle, sampler: str, steps: int, guidance: float, seed: int) -> dict:
    from sdrt.schedulers import make_scheduler

    sched = make_scheduler(sampler, pipe.source.scheduler_config)
    sched.set_timesteps(steps)
    t0, c0 = time.perf_counter(), time.process_time()
    out = pipe(TEXTS, num_inference_steps=steps, guidance_scale=guidance, seed=seed, scheduler=sampler,
               output_type="np", progress=False)  # fmt: skip
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    read = oracle.classify(out.images)
    digit = float(np.mean([r[0] == d for r, (d, _) in zip(read, PROMPTS)]))
    colour = float(np.mean([r[1] == c for r, (_, c) in zip(read, PROMPTS)]))
    both = float(np.mean([r == (d, c) for r, (d, c) in zip(read, PROMPTS)]))
    return {"digit": digit, "colour": colour, "both": both, "unet_calls": sched.num_calls, "seconds": seconds,
            "cpu_seconds": cpu, "seconds_per_image": cpu / len(TEXTS), "wall_seconds_per_image": seconds / len(TEXTS)}  # fmt: skip


def fewest_steps(record: dict, digit: float = 0.95, colour: float = 0.85) -> list[tuple]:
    """Per sampler, the fewest steps whose images reach both bars: (sampler, steps, r) or (sampler, None, None);
    sorted by CPU time per image."""
    out = []
    for name, per_steps in record["results"].items():
        ok = [(int(s), r) for s, r in per_steps.items() if "error" not in r and r["digit"] >= digit and r["colour"] >= colour]
        out.append((name, *min(ok, key=lambda x: x[0])) if ok else (name, None, None))
    return sorted(out, key=lambda x: (x[2] is None, x[2]["seconds_per_image"] if x[2] else 0))


def pick_table(record: dict, digit: float = 0.95, colour: float = 0.85) -> str:
    lines = [f"| sampler | A1111 name | fewest steps with digit >= {digit:.0%} and colour >= {colour:.0%} | "
             "UNet calls | CPU ms per image |", "|---|---|---|---|---|"]  # fmt: skip
    for name, steps, r in fewest_steps(record, digit, colour):
        a1111 = record["a1111"].get(name, "")
        if steps is None:
            lines.append(f"| {name} | {a1111} | not within {max(record['steps'])} steps | | |")
        else:
            lines.append(f"| {name} | {a1111} | {steps} | {r['unet_calls']} | {1000 * r['seconds_per_image']:.0f} |")
    return "\n".join(lines)


def markdown(record: dict) -> str:
    steps, rows = record["steps"], record["results"]
    lines = [
        f"# Sampler quality per step: built-in digits model, {len(TEXTS)} prompts",
        "",
        f"- created {record['created']}, {record['minutes']:.1f} minutes; {record['machine']}",
        f"- guidance {record['guidance']}, seed {record['seed']}, 64x64, ONNX Runtime fp32 on **one thread** "
        f"(OMP_NUM_THREADS=1, threads=1): times are this process's CPU time per image on a single thread (the machine "
        f"was shared with other jobs; wall time, in the JSON, was up to 2x higher under that load)",
        "- digit / colour: the share of the 50 images whose digit / colour the oracle reads as the prompt's",
        f"- command: `{record['command']}`",
        *[f"- {note}" for note in record.get("notes", [])],
        "",
        "## What to pick: the fewest steps that draw the prompt, by latency",
        "",
        pick_table(record),
        "",
        "## Digit / colour accuracy (%)",
        "",
        "| sampler | A1111 name | " + " | ".join(f"{s} steps" for s in steps) + " |",
        "|---|---|" + "---|" * len(steps),
    ]
    for name, per_steps in rows.items():
        cells = []
        for s in steps:
            r = per_steps.get(str(s))
            cells.append(r["error"] if r and "error" in r else f"{100 * r['digit']:.0f} / {100 * r['colour']:.0f}" if r else "")
        lines.append(f"| {name} | {record['a1111'].get(name, '')} | " + " | ".join(cells) + " |")
    lines += ["", "## Single-thread CPU time per image, ms (UNet calls)", "", "| sampler | " + " | ".join(f"{s} steps" for s in steps) + " |",
              "|---|" + "---|" * len(steps)]  # fmt: skip
    for name, per_steps in rows.items():
        cells = []
        for s in steps:
            r = per_steps.get(str(s))
            cells.append("-" if not r or "error" in r else f"{1000 * r['seconds_per_image']:.0f} ({r['unet_calls']})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def chart(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    fig, axes = plt.subplots(1, 2, figsize=(15, 6.5), sharex=True)
    cmap = plt.get_cmap("tab20")
    styles = ["-", "--", ":", "-."]
    for k, (name, per_steps) in enumerate(record["results"].items()):
        points = [(r["seconds_per_image"] * 1000, r["digit"], r["colour"]) for s, r in per_steps.items() if "error" not in r]
        if not points:
            continue
        ms, digit, colour = zip(*points)
        style = dict(color=cmap(k % 20), linestyle=styles[(k // 20 + k) % 4], marker="o", markersize=3, label=name)
        axes[0].plot(ms, [100 * d for d in digit], **style)
        axes[1].plot(ms, [100 * c for c in colour], **style)
    for ax, what in zip(axes, ("digit", "colour")):
        ax.set_xscale("log")
        ax.set_xticks([15, 20, 30, 50, 100, 200])
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("CPU time per image, ms, one thread (points: 2, 4, 8, 12, 20, 30 steps)")
        ax.set_ylabel(f"{what} accuracy, %")
        ax.set_title(f"{what} read back by the oracle")
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2, loc="lower right")
    fig.suptitle("sdrt samplers on the built-in digits model (50 prompts, guidance 7.5)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    import sdrt
    from sdrt.oracle import DigitOracle
    from sdrt.schedulers import A1111_NAMES, SCHEDULER_NAMES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samplers", default=",".join(SCHEDULER_NAMES), help="comma-separated (default: all)")
    p.add_argument("--steps", default=",".join(map(str, STEPS)), help="comma-separated (default: %(default)s)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/sampler-quality", help="path stem for .json, .md, .png")
    p.add_argument("--report-only", action="store_true", help="rewrite OUT.md and OUT.png from OUT.json; run nothing")
    args = p.parse_args(argv)
    if args.report_only:
        out = Path(args.out)
        record = json.loads(out.with_suffix(".json").read_text())
        out.with_suffix(".md").write_text(markdown(record))
        chart(record, out.with_suffix(".png"))
        print(markdown(record))
        return 0
    samplers = [s for s in args.samplers.split(",") if s]
    steps = [int(s) for s in args.steps.split(",") if s]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    t_start = time.perf_counter()
    pipe = sdrt.Pipeline.from_pretrained(None, threads=args.threads)
    oracle = DigitOracle.load()
    pipe(TEXTS, num_inference_steps=2, guidance_scale=args.guidance, seed=args.seed, output_type="np", progress=False)  # warm-up
    record = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, {platform.platform()}",
        "command": " ".join(["python", *sys.argv]),
        "guidance": args.guidance, "seed": args.seed, "threads": args.threads, "steps": steps,
        "a1111": {s: A1111_NAMES.get(s, "") for s in samplers}, "results": {},
    }  # fmt: skip
    for name in samplers:
        record["results"][name] = {}
        for n in steps:
            try:
                r = measure(pipe, oracle, name, n, args.guidance, args.seed)
            except Exception as err:  # e.g. LCM beyond its 50 original steps: recorded, the rest goes on
                r = {"error": f"{type(err).__name__}: {err}"[:80]}
            record["results"][name][str(n)] = r
            shown = r.get("error") or f"digit {r['digit']:.0%} colour {r['colour']:.0%} {r['seconds_per_image'] * 1000:.0f} ms/image"
            print(f"{name:26s} {n:3d} steps: {shown}", flush=True)
        record["minutes"] = (time.perf_counter() - t_start) / 60
        out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(record))
    chart(record, out.with_suffix(".png"))
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
