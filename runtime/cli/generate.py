"""`sdrt generate`: argparse, then Pipeline calls; output paths are checked and images written by sdrt.outputs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sdrt.outputs import output_paths  # noqa: F401  (re-exported: tests and scripts import it from here)

EPILOG_GENERATE = """examples:
  sdrt generate "a red 7 on a white background"                 built-in digits model
  sdrt generate "a 3" --negative-prompt "blue" --seed 1         steer away from a colour
  sdrt generate "a green 7" --image seven.png --strength 0.5    img2img
  sdrt generate "a red 3" --image in.png --mask mask.png --keep-unmasked --mask-blur 4
                                                                inpaint the white of mask.png, paste back
  sdrt generate "a fox" -m ~/models/sd15 --steps 30 --scheduler euler_a -o fox.png
Each PNG carries its prompt and every parameter in its text metadata (A1111's `parameters` layout).
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="make images from a prompt",
        description="Make images from a prompt (txt2img), from a prompt and an image (img2img), or repaint the masked "
        "part of an image (inpainting: --image and --mask; any model, or a dedicated inpainting model).",
        epilog=EPILOG_GENERATE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("prompt", help="what the image should show")
    p.add_argument("-m", "--model", help="diffusers-format folder or sdrt export (default: the built-in digits model)")
    p.add_argument("-o", "--output", default="sdrt.png", help="image to write: .png, .jpg or .webp (parameters embedded), or a folder "
                   "to number images in; with several images, -1, -2... is added (default: %(default)s)")
    p.add_argument("-n", "--negative-prompt", default=None, help="what to steer away from (replaces the empty prompt)")
    p.add_argument("--steps", type=int, default=30, help="denoising steps (default: %(default)s)")
    p.add_argument("-g", "--guidance", type=float, default=7.5, help="classifier-free guidance scale; <= 1 turns it off (default: %(default)s)")
    p.add_argument("-s", "--seed", type=int, default=None, help="random seed; the same seed gives diffusers' image (default: random)")
    p.add_argument("-W", "--width", type=int, default=None, help="image width, a multiple of the model's size step (default: the model's)")
    p.add_argument("-H", "--height", type=int, default=None, help="image height (default: the model's)")
    p.add_argument("--scheduler", default=None, help="one of sdrt.schedulers.SCHEDULER_NAMES: ddim, pndm, euler(_karras), euler_a, dpmpp_2m(_karras), lms, heun, unipc, dpmpp_2m_sde(_karras), dpmpp_2s_a, ddpm, lcm, tcd, ... (default: the model's own)")
    p.add_argument("--timestep-spacing", default=None, choices=("leading", "linspace", "trailing"),
                   help="how the steps are spread over the training timesteps (default: the model's scheduler config); "
                   "'trailing' for few-step models (SD-Turbo, LCM-LoRA) at 1-4 steps")
    p.add_argument("--image", default=None, help="init image for img2img")
    p.add_argument("--strength", type=float, default=0.8, help="img2img: how much to change the image, (0, 1] (default: %(default)s)")
    p.add_argument("--mask", default=None, help="inpainting: mask image for --image; white is repainted, black kept (an alpha "
                   "channel holding strokes is the mask; colour is greyscaled; thresholded at 50%% grey)")
    p.add_argument("--mask-blur", type=int, default=0, metavar="PX", help="inpainting: Gaussian blur of the mask in pixels, for a soft "
                   "paste-back edge (A1111's mask blur; default: %(default)s)")
    p.add_argument("--keep-unmasked", action="store_true", help="inpainting: paste the result back into --image through the "
                   "(blurred) mask, so pixels outside it are kept exactly (A1111 always does; diffusers does not)")
    p.add_argument("--invert-mask", action="store_true", help="inpainting: repaint the black part of --mask instead")
    p.add_argument("--masked-content", default="original", choices=("original", "latent_noise", "latent_nothing"),
                   help="inpainting at --strength < 1: what the repainted region starts from: the image, the seed's noise or "
                   "nothing (A1111's masked content; default: %(default)s)")
    p.add_argument("--backend", default="auto", choices=("auto", "onnx", "torch", "tensorrt"), help="which runtime runs the networks (default: the fastest the model folder allows)")
    p.add_argument("--num-images", type=int, default=1, help="images to make; image k uses seed+k (default: %(default)s)")
    p.add_argument("--embedding", action="append", default=[], metavar="FILE[:TOKEN]", help="textual-inversion embedding to load (repeatable)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]", help="LoRA applied at run time (repeatable; scale default 1): any backend on the PyTorch backend or an export made with `--lora-slots`; kohya/LoCon, diffusers/PEFT, LoHa, LoKr")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the networks (default: all cores)")
    p.add_argument("--ort-provider", default=None, choices=("auto", "cuda", "tensorrt", "cpu"),
                   help="ONNX Runtime's execution providers, with --backend onnx: cuda or tensorrt need onnxruntime-gpu and are an "
                   "error where missing (default: auto, CUDA when there, else CPU)")  # fmt: skip
    p.add_argument("--max-memory", default=None, metavar="SIZE", help="memory budget the request must fit, e.g. 8G (default: what is available)")
    p.add_argument("--no-memory-check", action="store_true", help="skip the memory estimate (an oversized request may then be killed)")
    p.add_argument("--refiner", default=None, metavar="PATH", help="SDXL: a refiner (diffusers folder or sdrt export) that "
                   "finishes the base's latents, diffusers' ensemble of experts")
    p.add_argument("--refiner-start", type=float, default=0.8, help="SDXL with --refiner: the fraction of the schedule "
                   "the base runs before handing over (default: %(default)s)")
    for flag, kind, what in MICRO_FLAGS:
        p.add_argument(flag, type=_size if kind == "size" else _corner if kind == "corner" else float, default=None,
                       metavar={"size": "WxH", "corner": "TOP,LEFT", "score": "S"}[kind], help=what)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_generate)


# SDXL's micro-conditioning (sdrt.sdxl.MICRO_ARGS; sdrt-host takes the same flags): (flag, kind, help).
MICRO_FLAGS = (
    ("--original-size", "size", "SDXL: the original image size the model is told, WIDTHxHEIGHT (default: the image's)"),
    ("--crop-top-left", "corner", "SDXL: the crop corner the model is told, TOP,LEFT (default: 0,0)"),
    ("--target-size", "size", "SDXL: the target size the model is told, WIDTHxHEIGHT (default: the image's)"),
    ("--negative-original-size", "size", "SDXL: --original-size for the unconditional pass"),
    ("--negative-crop-top-left", "corner", "SDXL: --crop-top-left for the unconditional pass"),
    ("--negative-target-size", "size", "SDXL: --target-size for the unconditional pass"),
    ("--aesthetic-score", "score", "SDXL refiner: the aesthetic score (default: 6.0)"),
    ("--negative-aesthetic-score", "score", "SDXL refiner: the unconditional pass's aesthetic score (default: 2.5)"),
)


def _ints(text: str, sep: str, form: str) -> tuple[int, int]:
    parts = text.split(sep)
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not {form}")
    return int(parts[0]), int(parts[1])


def _size(text: str) -> tuple[int, int]:
    """WIDTHxHEIGHT -> (height, width), the order of diffusers' original_size/target_size."""
    width, height = _ints(text, "x", "WIDTHxHEIGHT, e.g. 1024x1024")
    return height, width


def _corner(text: str) -> tuple[int, int]:
    return _ints(text, ",", "TOP,LEFT, e.g. 0,0")


def micro_arguments(args) -> dict:
    """The micro-conditioning flags given, as Pipeline's keyword arguments."""
    names = {flag: flag[2:].replace("-", "_").replace("crop_top_left", "crops_coords_top_left") for flag, _, _ in MICRO_FLAGS}
    return {name: getattr(args, flag[2:].replace("-", "_")) for flag, name in names.items()
            if getattr(args, flag[2:].replace("-", "_")) is not None}


def check_count_or_one(n) -> int:
    """--num-images for the early memory check; a bad count is refused by plan() with its own message."""
    return n if isinstance(n, int) and n >= 1 else 1


def seed_note(seeds: list[int], k: int) -> str:
    """How image k's seed came about: the user's seed for image 1, derived (seed + k) for the others."""
    return f"seed {seeds[k]}" if k == 0 else f"seed {seeds[k]}: image {k + 1} of the batch from seed {seeds[0]}"


def cmd_generate(args) -> int:
    import time

    from sdrt import inputs
    from sdrt.outputs import output_paths, save_image
    from sdrt.pipeline import Pipeline

    t0 = time.perf_counter()
    inputs.check_prompts(args.prompt)
    mask = args.mask
    if mask is not None and args.invert_mask:
        from sdrt.inpaint import invert_mask

        mask = invert_mask(mask)
    elif args.invert_mask:
        from sdrt.errors import InputError

        raise InputError("--invert-mask inverts --mask: pass --mask FILE too")  # before loading: a prompt the terminal mangled, an unwritable -o
    paths = output_paths(args.output, args.num_images)
    max_memory = False if args.no_memory_check else args.max_memory
    options = {"threads": args.threads} if args.threads is not None else {}
    if args.ort_provider:
        if args.backend != "onnx":
            from sdrt.errors import InputError

            raise InputError(f"--ort-provider chooses ONNX Runtime's providers: add --backend onnx (not {args.backend})")
        options["route"] = args.ort_provider
    if not (args.model and Path(args.model).expanduser().is_file()):
        inputs.check_before_load(args.model, args.backend, args.height, args.width, args.image,
                                 check_count_or_one(args.num_images), args.guidance, max_memory)
    if args.model and Path(args.model).expanduser().is_file():  # an original-layout checkpoint: converted once, cached
        pipe = Pipeline.from_single_file(args.model, backend="torch" if args.backend == "auto" else args.backend,
                                         max_memory=max_memory, **options)
    else:
        pipe = Pipeline.from_pretrained(args.model, backend=args.backend, max_memory=max_memory, **options)
    for spec in args.embedding:
        path, _, token = spec.partition(":")
        pipe.load_textual_inversion(path, token=token or None)
    loras = []
    for spec in args.lora:
        from sdrt.adapters.lora import parse_lora_spec

        path, scale = parse_lora_spec(spec)
        loras.append((pipe.register_lora(path, name=f"{len(loras)}-{Path(path).stem}"), scale))
    refiner = None
    if args.refiner:
        refiner = Pipeline.from_pretrained(args.refiner, backend=args.backend, max_memory=max_memory, **options)
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
        timestep_spacing=args.timestep_spacing,
        image=args.image,
        strength=args.strength,
        mask_image=mask,
        mask_blur=args.mask_blur,
        keep_unmasked=args.keep_unmasked,
        masked_content=args.masked_content,
        num_images_per_prompt=args.num_images,
        loras=loras or None,
        progress=not args.quiet,
        **micro_arguments(args),
        **({"refiner": refiner, "refiner_start": args.refiner_start} if refiner is not None else {}),
    )
    for k, (image, params, path) in enumerate(zip(out.images, out.parameters, paths)):
        save_image(image, path, params)
        print(f"{path}  ({seed_note(out.seeds, k)})")
    if not args.quiet:
        t = out.timings
        print(
            f"{pipe.backend.describe()}: load {load_s:.2f} s, text {t['text']:.2f} s, loop {t['loop']:.2f} s, "
            f"decode {t['decode']:.2f} s, total {t['total']:.2f} s",
            file=sys.stderr,
        )
    return 0
