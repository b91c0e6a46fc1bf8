"""`sdrt export MODEL OUT`: a diffusers-format folder -> a self-contained ONNX export (needs torch).

    sdrt export ~/models/sd15 exports/sd15-onnx
    sdrt export ~/models/sd15 exports/sd15-fp16 --fp16 --max-size 768
argparse only; the work is sdrt.export.onnx_export.export_model, imported when the command runs.
"""

from __future__ import annotations

import argparse

from sdrt.backends.base import module_available
from sdrt.errors import BackendError, InputError, torch_install_hint

EPILOG = """The export folder holds one ONNX file per network, the tokenizer, the scheduler config, the token
embeddings and manifest.json; it runs with only onnxruntime installed: sdrt generate "a fox" -m OUT.
Sizes are image pixels: min/opt/max say which sizes the export (and later TensorRT engines) must serve;
ONNX Runtime itself runs any multiple of the model's size step.
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export a diffusers-format model to ONNX (needs torch)",
        description="Export a Stable Diffusion 1.x/2.x diffusers-format folder to an sdrt ONNX export.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="diffusers-format model folder, or an original-layout SD 1.x/2.x .safetensors file")
    p.add_argument("out", help="export folder to create")
    p.add_argument("--fp16", action="store_true", help="fp16 weights and compute (the float32 I/O and the timestep path stay fp32)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: 17 for torchscript, 18 for dynamo)")
    p.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript", help="torch.onnx exporter (default: %(default)s, 10x faster here)")
    p.add_argument("--min-size", type=int, default=None, help="smallest image side to serve (default: 64, or the size step)")
    p.add_argument("--opt-size", type=int, default=None, help="the usual image side (default: the model's own)")
    p.add_argument("--max-size", type=int, default=None, help="largest image side to serve (default: 1024)")
    p.add_argument("--max-batch", type=int, default=4, help="most images per call (default: %(default)s)")
    p.add_argument("--no-check", dest="check", action="store_false", help="skip comparing each network with PyTorch")
    p.add_argument("--keep-fp32-op", action="append", default=[], metavar="OP", help="with --fp16: an ONNX op type to keep in fp32 (repeatable)")
    p.add_argument("--force", action="store_true", help="replace an existing export at OUT")
    p.add_argument("--no-subpixel-upsample", dest="subpixel_upsample", action="store_false",
                   help="export upsampling as stock 'nearest 2x + 3x3 conv' instead of four 2x2 convs of the "
                        "low-resolution input (same result, 2.25x fewer multiply-adds in those convs)")
    p.add_argument("--winograd", action="store_true",
                   help="for ONNX Runtime on a CPU: wide 3x3 convolutions as Winograd F(4x4,3x3) or F(2x2,3x3), chosen "
                        "per conv for --opt-size (1.3-2x faster per conv there; fp32 only, more memory; not for TensorRT)")
    p.add_argument("--conv-tactics", choices=("rule", "measure"), default="rule",
                   help="with --winograd: 'rule' (default, deterministic) picks each conv's form by a rule tuned on one CPU; "
                        "'measure' times direct, Winograd and sub-pixel forms of each shape at --opt-size on this CPU and "
                        "exports the fastest (seconds per shape, cached per CPU and ONNX Runtime version)")
    p.add_argument("--tactic-threads", type=int, default=None, metavar="N", help="with --conv-tactics measure: the threads the "
                   "export will run with (default: one per physical core)")
    p.add_argument("--tactic-cache-dir", default=None, metavar="DIR", help="with --conv-tactics measure: where the timings are "
                   "cached, one file per CPU, ONNX Runtime version and threads (default: ~/.cache/sdrt/conv-tactics)")
    p.add_argument("--share-weights", action="store_true", help="OUT also holds the diffusers weights and the ONNX graphs read theirs from them (fp32; both backends, one copy of the weights)")
    # issue 4: LoRAs fused at export; single-file checkpoints (sdrt.export.lora, sdrt.export.single_file)
    p.add_argument("--lora-slots", choices=("none", "attention", "all"), default="none",
                   help="export the UNet and text encoder with run-time LoRA inputs (`sdrt generate --lora`, "
                   "pipe(loras=...)): 'attention' for LoRAs of the attention/MLP layers, 'all' adds the conv layers "
                   "LoCon/LyCORIS adapt (default none: plain graphs)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]", help="fuse a LoRA (kohya or diffusers layout) into the UNet and text encoder; repeatable (scale default 1)")
    p.add_argument("--allow-pickle", action="store_true", help="let MODEL be a pickle .ckpt: unpickling can run code from the file, use only for files you trust")
    # issue 22: int8 for ONNX Runtime on CPUs (sdrt.export.int8_export)
    p.add_argument("--int8", action="store_true", help="quantise the UNet and VAE to int8 for ONNX Runtime on a CPU, calibrated on "
                   "prompts run through the model; reports PSNR against fp32 (and the oracle's accuracy on the built-in model)")
    p.add_argument("--int8-scheme", default=None, metavar="SCHEME", help="with --int8: static (default), static-wide, static-all, static-s8, mixed, "
                   "dynamic, dynamic-matmul or weight-only (see benchmarks/results/int8-schemes.md)")
    p.add_argument("--int8-networks", default=None, metavar="LIST", help="with --int8: the networks to quantise, comma-separated, "
                   "of unet, text_encoder, text_encoder_2, vae_decoder, vae_encoder (default unet,vae_decoder,vae_encoder: those that keep "
                   "the quality bar; the UNet takes --int8-scheme, the others their own: sdrt.export.int8.network_scheme)")
    p.add_argument("--calibration-prompts", default=None, metavar="FILE", help="with --int8: calibration prompts, one a line (default: a built-in spread)")
    p.add_argument("--no-quality", dest="quality", action="store_false", help="with --int8: skip the quality report against fp32")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    missing = [m for m in ("torch", "diffusers", "transformers", "onnx") if not module_available(m)]
    if missing:
        raise BackendError(f"sdrt export needs {', '.join(missing)}: {torch_install_hint('export')}")
    from sdrt.adapters.lora import parse_lora_spec
    from sdrt.export.onnx_export import export_model

    if not args.int8 and (args.int8_scheme or args.int8_networks or args.calibration_prompts or not args.quality):
        raise InputError("--int8-scheme, --int8-networks, --calibration-prompts and --no-quality go with --int8; add --int8")
    if args.int8:
        from sdrt.export.int8_export import check_networks

        check_networks(args.int8_networks)  # before any work
    options = dict(
        fp16=args.fp16,
        opset=args.opset,
        min_size=args.min_size,
        opt_size=args.opt_size,
        max_size=args.max_size,
        max_batch=args.max_batch,
        check=args.check,
        keep_fp32_ops=tuple(args.keep_fp32_op),
        progress=not args.quiet,
        exporter=args.exporter,
        force=args.force,
        share_weights=args.share_weights,
        subpixel_upsample=args.subpixel_upsample,
        winograd=args.winograd,
        conv_tactics=args.conv_tactics,
        tactic_threads=args.tactic_threads,
        tactic_cache_dir=args.tactic_cache_dir,
        loras=[parse_lora_spec(spec) for spec in args.lora],
        lora_slots=args.lora_slots,
        allow_pickle=args.allow_pickle,
    )
    if args.int8:
        from sdrt.export.int8_export import export_int8, summary
        from sdrt.export.int8_quality import read_prompts

        prompts = read_prompts(args.calibration_prompts) if args.calibration_prompts else None
        for key in ("check", "force", "progress", "winograd"):
            options.pop(key)
        report, record = export_int8(args.model, args.out, scheme=args.int8_scheme, calibration_prompts=prompts,
                                     quality=args.quality, force=args.force, progress=not args.quiet, check=args.check,
                                     winograd=args.winograd, networks=args.int8_networks, **options)
        print(report.summary().replace("exported to", "fp32 reference exported to", 1))
        print(summary(args.out, record))
        return 0
    report = export_model(args.model, args.out, **options)
    print(report.summary())
    return 0
