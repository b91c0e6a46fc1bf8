"""The `sdrt` command line. argparse lives here only; every subcommand calls library functions.

    sdrt generate "a red 7 on a white background"            # the built-in model, no download
    sdrt generate "a fox" -m path/to/sd15 -o fox.png --steps 30 --seed 42
    sdrt info path/to/sd15                                   # what a model folder holds, what can run it here
    sdrt export path/to/sd15 out/sd15-onnx [--fp16]          # ONNX export (needs torch)
    sdrt serve [MODEL ...] [--port 7860]                     # HTTP: A1111 + OpenAI images APIs, async jobs
"""

from __future__ import annotations

import argparse
import sys

from sdrt.cli import bench, build, export, generate, info, serve
from sdrt.errors import SdrtError


def build_parser() -> argparse.ArgumentParser:
    from sdrt import __version__

    parser = argparse.ArgumentParser(
        prog="sdrt",
        description="sdrt: a fast Stable Diffusion runtime (ONNX Runtime, TensorRT, PyTorch).",
        epilog='start with: sdrt generate "a red 7 on a white background"',
    )
    parser.add_argument("--version", action="version", version=f"sdrt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (generate, info, export, build, bench, serve):
        command.add_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except SdrtError as err:
        print(f"sdrt: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sdrt: interrupted", file=sys.stderr)
        return 130

