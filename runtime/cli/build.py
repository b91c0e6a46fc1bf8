"""`sdrt build ONNX_DIR OUT_DIR`: TensorRT engines from an sdrt ONNX export (needs TensorRT and an NVIDIA GPU).

    sdrt build exports/sd15-onnx exports/sd15-trt --sizes 512x512,768x768 --max-batch 2
    sdrt build exports/sd15-onnx exports/sd15-trt --dry-run        # profiles, flags, cache keys; builds nothing
argparse only; the work is sdrt.export.tensorrt_build.build_engines, imported when the command runs.
"""

from __future__ import annotations

import argparse
import dataclasses

from sdrt.errors import InputError

EPILOG = """OUT_DIR becomes a self-contained export: the ONNX export's files (linked), one engine per network and a
manifest that makes `sdrt generate -m OUT_DIR` pick TensorRT. Engines are tied to this GPU model and TensorRT
version; running `sdrt build` again reuses the engines whose key still matches and rebuilds the rest.
Sizes are image pixels, WIDTHxHEIGHT, multiples of the model's size step (64 for SD 1.x/2.x). Default: the
sizes and batch the ONNX export was made for. --dry-run works without TensorRT.
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "build",
        help="build TensorRT engines from an ONNX export (needs TensorRT)",
        description="Build one TensorRT engine per network from an sdrt ONNX export.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("onnx_dir", metavar="ONNX_DIR", help="an sdrt ONNX export (made by `sdrt export`)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder to create (or update) with the engines")
    p.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=True, help="fp16 engines (default: on; an fp16 export is always fp16)")
    p.add_argument("--sizes", default=None, help="sizes to serve, e.g. 512x512,768x768: min and max over them, opt the first")
    p.add_argument("--min-size", type=int, default=None, help="smallest image side (default: the export's)")
    p.add_argument("--opt-size", type=int, default=None, help="the side TensorRT tunes for (default: the export's)")
    p.add_argument("--max-size", type=int, default=None, help="largest image side (default: the export's)")
    p.add_argument("--static", default=None, metavar="WxH", help="one fixed size, e.g. 512x768 (the batch stays dynamic)")
    p.add_argument("--max-batch", type=int, default=None, help="most images per call; the UNet serves twice this (default: the export's)")
    p.add_argument("--timing-cache", default=None, metavar="FILE", help="TensorRT timing cache to load and update (default: one per GPU and TensorRT version in ~/.cache/sdrt)")
    quant = p.add_mutually_exclusive_group()
    quant.add_argument("--int8", dest="quantize", action="store_const", const="int8", help="int8 UNet through NVIDIA Model Optimizer's Q/DQ (needs nvidia-modelopt); the rest fp16")
    quant.add_argument("--fp8", dest="quantize", action="store_const", const="fp8", help="fp8 UNet likewise (Hopper/Ada and newer GPUs)")
    p.add_argument("--calibration-prompts", default=None, metavar="FILE", help="with --int8/--fp8: prompts sampled on the CPU to calibrate the UNet (one a line)")
    p.add_argument("--dry-run", action="store_true", help="print the profiles, flags and cache keys; build nothing")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_build)


def cmd_build(args) -> int:
    from sdrt.backends.tensorrt_machine import require_tensorrt

    if args.calibration_prompts and not args.quantize:
        raise InputError("--calibration-prompts goes with --int8 or --fp8; add one")
    if not args.dry_run:
        require_tensorrt()  # one line and no files when TensorRT cannot run here
        if args.quantize:
            from sdrt.export.tensorrt_quant import require_modelopt

            require_modelopt()
    from sdrt.export.int8_quality import read_prompts
    from sdrt.export.tensorrt_build import build_engines

    explicit = {k: getattr(args, k) for k in ("min_size", "opt_size", "max_size") if getattr(args, k) is not None}
    chosen = [name for name, given in (("--sizes", args.sizes), ("--static", args.static), ("--min/opt/max-size", explicit)) if given]
    if len(chosen) > 1:
        raise InputError(f"{' and '.join(chosen)} are alternatives; pass one of them")
    limits = None
    if explicit:
        from sdrt.contracts import ShapeLimits
        from sdrt.model.manifest import read_manifest

        limits = dataclasses.replace(ShapeLimits.from_dict(read_manifest(args.onnx_dir).limits), **explicit)
    report = build_engines(
        args.onnx_dir,
        args.out_dir,
        fp16=args.fp16,
        limits=limits,
        sizes=args.sizes,
        static=args.static,
        max_batch=args.max_batch,
        timing_cache=args.timing_cache,
        dry_run=args.dry_run,
        progress=not args.quiet,
        quantize=args.quantize,
        calibration_prompts=read_prompts(args.calibration_prompts) if args.calibration_prompts else None,
    )
    print(report.summary())
    if not args.dry_run:
        print(f'run it: sdrt generate "a photo of a fox" -m {args.out_dir}')
    return 0
