"""The digits LCM-LoRA (issue #20) against the base model's samplers at few steps, side by side, judged by the oracle.

One process, one ONNX Runtime thread, the 50 prompts and protocol of benchmarks/sampler_quality.py (seed 0,
one batched call per row). The LCM-LoRA runs fused into an ONNX export of the built-in model (made here with
`sdrt export runtime/models/digits OUT --lora digits-lcm`, cached under --cache) with the `lcm` scheduler at
guidance 1 (no CFG batch: one UNet pass per step); the base model runs every sdrt sampler at guidance 7.5 and 3.

    OMP_NUM_THREADS=1 python benchmarks/lcm_digits.py      # writes benchmarks/results/lcm-digits.{json,md} and adds
                                                           # the LCM-LoRA row to benchmarks/results/sampler-quality.*
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))

from sampler_quality import STEPS, chart, markdown, measure  # noqa: E402

LCM_ROW = "lcm + digits-lcm LoRA (guidance 1)"


def lcm_export(cache: Path) -> Path:
    """The built-in model with the digits LCM-LoRA fused, exported to ONNX (cached; needs torch once)."""
    from sdrt.builtin import BUILTIN_LORAS, MODELS_DIR, builtin_model_dir
    from sdrt.model.manifest import sha256_of

    out = cache / f"digits-lcm-{sha256_of(MODELS_DIR / BUILTIN_LORAS['digits-lcm'])[:12]}"
    if not (out / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "sdrt.cli", "export", str(builtin_model_dir()), str(out), "--lora", "digits-lcm:1",
                        "--opt-size", "64", "--max-size", "256", "--max-batch", "64"], check=True)  # fmt: skip
    return out


def main(argv=None) -> int:
    import sdrt
    from sdrt.oracle import DigitOracle
    from sdrt.schedulers import A1111_NAMES, SCHEDULER_NAMES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-steps", default="4", help="base model step counts, comma-separated (default: %(default)s)")
    p.add_argument("--base-guidance", default="7.5,3", help="base model guidance scales (default: %(default)s)")
    p.add_argument("--lcm-steps", default=",".join(map(str, (1, *STEPS))), help="LCM-LoRA step counts (default: %(default)s)")
    p.add_argument("--cache", type=Path, default=Path("build/bench-cache"))
    p.add_argument("--out", default="benchmarks/results/lcm-digits")
    p.add_argument("--table", default="benchmarks/results/sampler-quality", help="the quality table to add the LCM row to ('' : none)")
    args = p.parse_args(argv)
    lcm_model = lcm_export(args.cache)
    oracle = DigitOracle.load()
    base = sdrt.Pipeline.from_pretrained(None, threads=1)
    lcm = sdrt.Pipeline.from_pretrained(lcm_model, threads=1)
    for pipe in (base, lcm):  # warm-up
        pipe(["a 1"] * 50, num_inference_steps=2, seed=0, output_type="np", progress=False)
    record = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, {platform.platform()}",
              "command": " ".join(["python", *sys.argv]), "lcm_model": str(lcm_model), "base": {}, "lcm": {}}  # fmt: skip
    t0 = time.perf_counter()
    for g in [float(x) for x in args.base_guidance.split(",")]:
        for name in SCHEDULER_NAMES:
            for n in [int(x) for x in args.base_steps.split(",")]:
                try:
                    r = measure(base, oracle, name, n, g, 0)
                except Exception as err:  # noqa: BLE001 (recorded, the rest goes on)
                    r = {"error": f"{type(err).__name__}: {err}"[:80]}
                record["base"].setdefault(f"{g:g}", {}).setdefault(name, {})[str(n)] = r
                shown = r.get("error") or f"{r['digit']:.0%} / {r['colour']:.0%}"
                print(f"base g {g:g} {name:26s} {n} steps: {shown}", flush=True)
    for n in [int(x) for x in args.lcm_steps.split(",")]:
        r = measure(lcm, oracle, "lcm", n, 1.0, 0)
        record["lcm"][str(n)] = r
        print(f"LCM-LoRA {n} steps: {r['digit']:.0%} / {r['colour']:.0%} {1000 * r['seconds_per_image']:.0f} ms/image", flush=True)
    # Seed 0 alone is 50 images (one image = 2 points): the LCM-LoRA and the base model's best 4-step settings again
    # at five more seeds (the LoRA's checkpoint was picked on seeds 1000-5000 at 4 steps, never on seed 0).
    best = sorted(((g, name, r["4"]) for g, per in record["base"].items() for name, r in per.items() if "error" not in r.get("4", {"error": 1})),
                  key=lambda x: -min(x[2]["digit"], x[2]["colour"]))[:3]
    record["seeds"] = {}
    for label, pipe, sched, g in [(LCM_ROW, lcm, "lcm", 1.0)] + [(f"{name} (base, guidance {gs})", base, name, float(gs)) for gs, name, _ in best]:
        rs = [measure(pipe, oracle, sched, 4, g, seed) for seed in (0, 1000, 2000, 3000, 4000, 5000)]
        record["seeds"][label] = {"digit": [r["digit"] for r in rs], "colour": [r["colour"] for r in rs]}
        print(f"{label} 4 steps, 6 seeds: digit {sum(r['digit'] for r in rs) / 6:.1%} colour {sum(r['colour'] for r in rs) / 6:.1%}", flush=True)
    record["minutes"] = (time.perf_counter() - t0) / 60
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    out.with_suffix(".md").write_text(report(record))
    print(report(record))
    if args.table:
        table = Path(args.table)
        quality = json.loads(table.with_suffix(".json").read_text())
        quality["results"][LCM_ROW] = {s: r for s, r in record["lcm"].items() if int(s) in quality["steps"]}
        quality["a1111"][LCM_ROW] = "LCM"
        quality.setdefault("notes", [])
        note = (f"`{LCM_ROW}`: the built-in model with its LCM-LoRA fused (`--lora digits-lcm`), guidance 1, measured "
                f"{record['created']} by `benchmarks/lcm_digits.py` (same protocol; the other rows at guidance {quality['guidance']})")
        quality["notes"] = [n for n in quality["notes"] if not n.startswith(f"`{LCM_ROW}`")] + [note]
        table.with_suffix(".json").write_text(json.dumps(quality, indent=1) + "\n")
        table.with_suffix(".md").write_text(markdown(quality))
        chart(quality, table.with_suffix(".png"))
    return 0


def report(record: dict) -> str:
    steps = sorted({s for g in record["base"].values() for rows in g.values() for s in rows}, key=int)
    lines = ["# The digits LCM-LoRA against the base model at few steps (50 prompts, the oracle's reading)", "",
             f"- created {record['created']}, {record['minutes']:.1f} minutes; {record['machine']}; ONNX Runtime fp32, "
             "one thread, CPU time per image (the machine was shared with other jobs)",
             f"- command: `{record['command']}`", "", "## LCM-LoRA (`lcm` scheduler, guidance 1)", "",
             "| steps | digit | colour | UNet calls | CPU ms per image |", "|---|---|---|---|---|"]  # fmt: skip
    for n, r in record["lcm"].items():
        lines.append(f"| {n} | {r['digit']:.0%} | {r['colour']:.0%} | {r['unet_calls']} | {1000 * r['seconds_per_image']:.0f} |")
    lines += ["", "## 4 steps at six seeds (0, 1000, ..., 5000: 300 images each)", "",
              "| setting | digit, mean | colour, mean | digit per seed | colour per seed |", "|---|---|---|---|---|"]
    for label, r in record.get("seeds", {}).items():
        lines.append(f"| {label} | {sum(r['digit']) / len(r['digit']):.1%} | {sum(r['colour']) / len(r['colour']):.1%} | "
                     + " ".join(f"{100 * x:.0f}" for x in r["digit"]) + " | " + " ".join(f"{100 * x:.0f}" for x in r["colour"]) + " |")
    for s in steps:
        lines += ["", f"## Base model at {s} steps, every sampler, best first (by min(digit, colour))", "",
                  "| sampler | guidance | digit | colour | UNet calls | CPU ms per image |", "|---|---|---|---|---|---|"]
        rows = [(name, g, r[s]) for g, per in record["base"].items() for name, r in per.items() if s in r and "error" not in r[s]]
        for name, g, r in sorted(rows, key=lambda x: -min(x[2]["digit"], x[2]["colour"])):
            lines.append(f"| {name} | {g} | {r['digit']:.0%} | {r['colour']:.0%} | {r['unet_calls']} | {1000 * r['seconds_per_image']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
