"""`sdrt generate`: argparse, then Pipeline calls; images are written by sdrt.images."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EPILOG_GENERATE = """examples:
  sdrt generate "a red 7 on a white background"                 built-in digits model
  sdrt generate "a 3" --negative-prompt "blue" --seed 1         steer away from a colour
  sdrt generate "a green 7" --image seven.png --strength 0.5    img2img
  sdrt generate "a fox" -m ~/models/sd15 --steps 30 --scheduler euler_a -o fox.png
Each PNG carries its prompt and every parameter in its text metadata (A1111's `parameters` layout).
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="make images from a prompt",
        description="Make images from a prompt (txt2img), or from a prompt and an image (img2img).",
        epilog=EPILOG_GENERATE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("prompt", help="what the image should show")
    p.add_argument("-m", "--model", help="diffusers-format folder or sdrt export (default: the built-in digits model)")
    p.add_argument("-o", "--output", default="sdrt.png", help="PNG to write; with several images, -1, -2... is added (default: %(default)s)")
    p.add_argument("-n", "--negative-prompt", default=None, help="what to steer away from (replaces the empty prompt)")
    p.add_argument("--steps", type=int, default=30, help="denoising steps (default: %(default)s)")
    p.add_argument("-g", "--guidance", type=float, default=7.5, help="classifier-free guidance scale; <= 1 turns it off (default: %(default)s)")
    p.add_argument("-s", "--seed", type=int, default=None, help="random seed; the same seed gives diffusers' image (default: random)")
    p.add_argument("-W", "--width", type=int, default=None, help="image width, a multiple of the model's size step (default: the model's)")
    p.add_argument("-H", "--height", type=int, default=None, help="image height (default: the model's)")
    p.add_argument("--scheduler", default=None, help="one of sdrt.schedulers.SCHEDULER_NAMES: ddim, pndm, euler(_karras), euler_a, dpmpp_2m(_karras), lms, heun, unipc, dpmpp_2m_sde(_karras), dpmpp_2s_a, ddpm, lcm, tcd, ... (default: the model's own)")
    p.add_argument("--image", default=None, help="init image for img2img")
    p.add_argument("--strength", type=float, default=0.8, help="img2img: how much to change the image, (0, 1] (default: %(default)s)")
    p.add_argument("--backend", default="auto", choices=("auto", "onnx", "torch", "tensorrt"), help="which runtime runs the networks (default: the fastest the model folder allows)")
    p.add_argument("--num-images", type=int, default=1, help="images to make; image k uses seed+k (default: %(default)s)")
    p.add_argument("--embedding", action="append", default=[], metavar="FILE[:TOKEN]", help="textual-inversion embedding to load (repeatable)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]", help="LoRA to fuse at load, PyTorch backend only (repeatable; exports take `sdrt export --lora`)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the networks (default: all cores)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_generate)


def output_paths(output: str, count: int) -> list[Path]:
    path = Path(output)
    if path.suffix.lower() != ".png":
        path = path.with_suffix(path.suffix + ".png") if path.suffix else path.with_suffix(".png")
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{k + 1}{path.suffix}") for k in range(count)]


def cmd_generate(args) -> int:
    import time

    from sdrt.images import save_png
    from sdrt.pipeline import Pipeline

    t0 = time.perf_counter()
    options = {"threads": args.threads} if args.threads else {}
    if args.model and Path(args.model).expanduser().is_file():  # an original-layout checkpoint: converted once, cached
        pipe = Pipeline.from_single_file(args.model, backend="torch" if args.backend == "auto" else args.backend, **options)
    else:
        pipe = Pipeline.from_pretrained(args.model, backend=args.backend, **options)
    for spec in args.embedding:
        path, _, token = spec.partition(":")
        pipe.load_textual_inversion(path, token=token or None)
    for spec in args.lora:
        from sdrt.adapters.lora import parse_lora_spec

        pipe.load_lora(*parse_lora_spec(spec))
    load_s = time.perf_counter() - t0
    out = pipe(
        args.prompt,
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        height=args.height,
        width=args.width,
        seed=args.seed,
        scheduler=args.scheduler,
        image=args.image,
        strength=args.strength,
        num_images_per_prompt=args.num_images,
        progress=not args.quiet,
    )
    for image, params, path in zip(out.images, out.parameters, output_paths(args.output, len(out.images))):
        save_png(image, path, params)
        print(f"{path}  (seed {params['seed']})")
    if not args.quiet:
        t = out.timings
        print(
            f"{pipe.backend.describe()}: load {load_s:.2f} s, text {t['text']:.2f} s, loop {t['loop']:.2f} s, "
            f"decode {t['decode']:.2f} s, total {t['total']:.2f} s",
            file=sys.stderr,
        )
    return 0
