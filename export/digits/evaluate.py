"""Measure a digits model with the oracle: prompted digit/colour accuracy, guidance, negative prompts, img2img.

    python -m sdrt.export.digits.evaluate runtime/models/digits [--json out.json] [--n 50]
    python -m sdrt.export.digits.evaluate runtime/models/digits --negative-colours [--seeds 10]   # issue #14, via sdrt

Runs diffusers' StableDiffusionPipeline (the reference) on the saved folder with its own scheduler (or
--scheduler), 64x64, 20 steps, and judges every image with sdrt.oracle.DigitOracle.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import (DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler, StableDiffusionImg2ImgPipeline,
                       StableDiffusionPipeline)
from PIL import Image

from sdrt.export.digits import data
from sdrt.oracle import DigitOracle

COLOURS = data.COLOUR_NAMES
SCHEDULERS = {"ddim": DDIMScheduler, "pndm": PNDMScheduler, "euler": EulerDiscreteScheduler}


def prompt_set(n: int) -> list[tuple[int, int]]:
    """n (digit, colour) pairs spread over all digits and colours."""
    return [(i % 10, (i + i // 10) % len(COLOURS)) for i in range(n)]


def generate(pipe, prompts, seed0, guidance, steps=20, negative=None, batch=25):
    images = []
    for s in range(0, len(prompts), batch):
        chunk = prompts[s:s + batch]
        gens = [torch.Generator().manual_seed(seed0 + s + k) for k in range(len(chunk))]
        neg = None if negative is None else [negative] * len(chunk)
        out = pipe(chunk, height=64, width=64, num_inference_steps=steps, guidance_scale=guidance,
                   negative_prompt=neg, generator=gens, output_type="np").images
        images.append((out * 255).round().astype(np.uint8))
    return np.concatenate(images)


def evaluate(model: Path, n: int = 50, scheduler: str = "model", save_grid: Path | None = None) -> dict:
    oracle = DigitOracle.load()
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    if scheduler != "model":  # default: the model's own (DDIM for the built-in model)
        pipe.scheduler = SCHEDULERS[scheduler].from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pairs = prompt_set(n)
    prompts = [f"a {COLOURS[c]} {d}" for d, c in pairs]
    r: dict = {"model": str(model), "scheduler": type(pipe.scheduler).__name__, "steps": 20, "prompts": n}
    for g in (7.5, 1.0):
        t0 = time.time()
        imgs = generate(pipe, prompts, 0, g)
        got = oracle.classify(imgs)
        r[f"guidance_{g}"] = {
            "digit_accuracy": float(np.mean([gd == d for (gd, _), (d, _) in zip(got, pairs)])),
            "colour_accuracy": float(np.mean([gc == COLOURS[c] for (_, gc), (_, c) in zip(got, pairs)])),
            "seconds": round(time.time() - t0, 1),
        }
        if save_grid is not None:
            k = int(np.sqrt(n))
            grid = imgs[:k * k].reshape(k, k, 64, 64, 3).transpose(0, 2, 1, 3, 4).reshape(k * 64, k * 64, 3)
            Image.fromarray(grid).save(save_grid.with_name(f"{save_grid.stem}_g{g}.png"))

    # A negative prompt naming a colour: its share among digit-only prompts, with and without.
    neg_prompts = [f"a {d}" for d in range(10)] * 4
    base = [c for _, c in oracle.classify(generate(pipe, neg_prompts, 100, 7.5))]
    r["negative_prompt"] = {}
    for colour in ("red", "white"):
        negd = [c for _, c in oracle.classify(generate(pipe, neg_prompts, 100, 7.5, negative=colour))]
        r["negative_prompt"][colour] = {"share_without": base.count(colour) / len(base),
                                        "share_with_negative": negd.count(colour) / len(negd)}
    r["negative_prompt"]["colour_shares_without"] = {c: base.count(c) / len(base) for c in COLOURS}

    # img2img on real (held-out) digits: strength 0.3 keeps the digit; 0.8 with another colour recolours.
    i2i = StableDiffusionImg2ImgPipeline(**pipe.components)
    i2i.set_progress_bar_config(disable=True)
    src, lab = data.make_dataset(40, seed=7, split="test")
    init = [Image.fromarray(x) for x in src]
    res = {}
    for strength in (0.3, 0.8):
        new_c = [(c + 1 + k % (len(COLOURS) - 1)) % len(COLOURS) for k, c in enumerate(lab[:, 1])]
        prompts_i = [f"a {COLOURS[nc]} {d}" if strength > 0.5 else f"a {COLOURS[c]} {d}"
                     for (d, c, _), nc in zip(lab, new_c)]
        gens = [torch.Generator().manual_seed(200 + k) for k in range(len(init))]
        out = i2i(prompts_i, image=init, strength=strength, num_inference_steps=20, guidance_scale=7.5,
                  generator=gens, output_type="np").images
        got = oracle.classify((out * 255).round().astype(np.uint8))
        res[f"strength_{strength}"] = {
            "digit_kept": float(np.mean([gd == d for (gd, _), d in zip(got, lab[:, 0])])),
            "colour_changed": float(np.mean([gc != COLOURS[c] for (_, gc), c in zip(got, lab[:, 1])])),
            "colour_is_prompted": float(np.mean([gc == COLOURS[nc if strength > 0.5 else c]
                                                 for (_, gc), c, nc in zip(got, lab[:, 1], new_c)])),
        }
    res["source_oracle_digit_accuracy"] = float(np.mean([gd == d for (gd, _), d in zip(oracle.classify(src), lab[:, 0])]))
    r["img2img"] = res
    return r


def negative_colours(model=None, seeds: int = 10, seed0: int = 100, guidance: float = 7.5, steps: int = 20,
                     colours=None, threads: int = 1, backend: str = "auto", **call_kwargs) -> dict:
    """Issue #14's measure, through sdrt (the model's scheduler): prompts "a {digit}" for every digit x `seeds`
    seeds (seed0 + k, as tests/test_digits.py draws them), without a negative prompt and with each colour as the
    negative. Per colour: digit accuracy and the colour's share with and without it, and per digit."""
    import sdrt

    pipe = sdrt.Pipeline.from_pretrained(model, backend=backend, threads=threads)
    oracle = DigitOracle.load()
    prompts = [f"a {d}" for d in range(10)] * seeds
    digits = np.array([d for d in range(10)] * seeds)

    def run(negative):
        out = pipe(prompts, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance, seed=seed0,
                   output_type="np", progress=False, **call_kwargs).images
        read = oracle.classify(out)
        return np.array([d for d, _ in read]), [c for _, c in read]

    base_d, base_c = run(None)
    r: dict = {"seeds": seeds, "guidance": guidance, "steps": steps, **{k: v for k, v in call_kwargs.items()},
               "without": {"digit_accuracy": float(np.mean(base_d == digits)),
                           "colour_shares": {c: base_c.count(c) / len(base_c) for c in COLOURS},
                           "per_digit": [float(np.mean(base_d[digits == d] == d)) for d in range(10)]},
               "negative": {}}
    for colour in colours or COLOURS:
        got_d, got_c = run(colour)
        r["negative"][colour] = {
            "digit_accuracy": float(np.mean(got_d == digits)),
            "share_without": base_c.count(colour) / len(base_c),
            "share_with": got_c.count(colour) / len(got_c),
            "per_digit": [float(np.mean(got_d[digits == d] == d)) for d in range(10)],
            "colours_with": {c: got_c.count(c) / len(got_c) for c in COLOURS if got_c.count(c)},
        }
    base = r["without"]["digit_accuracy"]
    r["passes"] = all(v["digit_accuracy"] >= base - 0.10 and v["share_with"] <= v["share_without"] / 2
                      for v in r["negative"].values())
    r["worst_digit_drop"] = max(base - v["digit_accuracy"] for v in r["negative"].values())
    return r


def print_negative_table(r: dict) -> None:
    w = r["without"]
    print(f"without a negative: digit {w['digit_accuracy']:.0%}  per digit "
          + " ".join(f"{a:.0%}" for a in w["per_digit"]))
    print("negative  digit   share without -> with   per-digit accuracy 0..9            colours read")
    for c, v in r["negative"].items():
        print(f"{c:8s}  {v['digit_accuracy']:5.0%}   {v['share_without']:5.0%} -> {v['share_with']:4.0%}      "
              + " ".join(f"{a:4.0%}" for a in v["per_digit"]) + "   "
              + ", ".join(f"{k} {x:.0%}" for k, x in sorted(v["colours_with"].items(), key=lambda kv: -kv[1])))
    print(f"passes issue #14's bar (digit within 10 points, share at least halved): {r['passes']} "
          f"(worst digit drop {r['worst_digit_drop']:.0%})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path)
    p.add_argument("--negative-colours", action="store_true",
                   help="issue #14's measure only, through sdrt: every colour as the negative prompt of 'a {digit}'")
    p.add_argument("--seeds", type=int, default=10, help="--negative-colours: seeds per digit (10 = 100 images)")
    p.add_argument("--seed0", type=int, default=100)
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--scheduler", choices=["model", *SCHEDULERS], default="model", help="default: the model's own")
    p.add_argument("--json", type=Path)
    p.add_argument("--grid", type=Path, help="save sample grids next to this path (name_g7.5.png, name_g1.0.png)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.negative_colours:
        r = negative_colours(a.model, a.seeds, a.seed0, threads=a.threads)
        print_negative_table(r)
        if a.json:
            a.json.write_text(json.dumps(r, indent=2) + "\n")
        return
    r = evaluate(a.model, a.n, a.scheduler, a.grid)
    print(json.dumps(r, indent=2))
    if a.json:
        a.json.write_text(json.dumps(r, indent=2) + "\n")


if __name__ == "__main__":
    main()
