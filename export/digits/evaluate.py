"""Measure a digits model with the oracle: prompted digit/colour accuracy, guidance, negative prompts, img2img.

    python -m sdrt.export.digits.evaluate runtime/models/digits [--json out.json] [--n 50]

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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path)
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--scheduler", choices=["model", *SCHEDULERS], default="model", help="default: the model's own")
    p.add_argument("--json", type=Path)
    p.add_argument("--grid", type=Path, help="save sample grids next to this path (name_g7.5.png, name_g1.0.png)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    r = evaluate(a.model, a.n, a.scheduler, a.grid)
    print(json.dumps(r, indent=2))
    if a.json:
        a.json.write_text(json.dumps(r, indent=2) + "\n")


if __name__ == "__main__":
    main()
