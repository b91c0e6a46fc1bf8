"""`sdrt bench [MODEL]`: sdrt's backends side by side with diffusers, optimum (ONNX Runtime) and OpenVINO.

    sdrt bench                                               # the built-in model, onnx + torch backends, diffusers
    sdrt bench --sd15-random --size 256 --steps 4 --baselines diffusers,optimum,openvino --json r.json --chart r.png
argparse only; the work is sdrt.bench.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EPILOG = """what it measures, per runner and batch size (median, and [min-max] over --runs runs after warm-up):
  text encoding, one UNet call (guidance batched; PNDM makes steps+1 calls), the loop's own overhead per step
  (loop time minus UNet calls: scheduler, guidance combine, copies), VAE decode, VAE encode (a separate call),
  end-to-end latency, images/s, load time (apart), peak RSS (GPU memory on CUDA).
Runs interleave the runners so drift hits all alike. Each baseline runs in a worker process with a venv of its
own, created once under the cache (pip: torch pinned first, then its packages); point at an existing one with
--baseline-env NAME=VENV. A baseline that cannot be installed or run is recorded with the reason, and the rest go on.

examples:
  sdrt bench
  sdrt bench ~/models/sd15 --size 512 --steps 20 --batch 1,2,4 --json sd15.json --chart sd15.png
  sdrt bench --sd15-random --size 256 --steps 4 --baselines diffusers,optimum,openvino --runs 3
"""


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip()) if text else ()


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in _names(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 1,2,4") from None


def _env(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=VENV, e.g. optimum=/opt/venvs/optimum")
    return name, path


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark sdrt's backends against diffusers, optimum and OpenVINO",
        description="Benchmark sdrt's backends side by side with the pipelines users would pick instead.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", nargs="?", default=None, help="diffusers folder or sdrt export (default: the built-in model)")
    p.add_argument("--sd15-random", action="store_true", help="instead of MODEL: SD 1.5's real configs with random weights (built once in the cache, 4.3 GB)")
    p.add_argument("--export", default=None, help="an sdrt export of MODEL for the onnx backend (default: exported once into the cache)")
    p.add_argument("--backends", type=_names, default=("onnx", "torch"), help="sdrt backends, comma-separated (default: onnx,torch)")
    p.add_argument("--baselines", type=_names, default=("diffusers",), help="diffusers, optimum, openvino; '' for none (default: diffusers)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's own)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps (default: %(default)s)")
    p.add_argument("--batch", type=_ints, default=(1,), help="batch sizes, comma-separated (default: 1)")
    p.add_argument("--runs", type=int, default=5, help="measured runs per runner and batch size (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up runs first, not counted (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for every runner (default: one per physical core)")
    p.add_argument("--guidance", type=float, default=7.5, help="guidance scale (default: %(default)s)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where every runner runs (default: %(default)s; cuda means fp16)")
    p.add_argument("--order", default="auto", choices=("auto", "interleaved", "pairs", "sequential"),
                   help="runners loaded together (interleaved), the first with each other in turn (pairs), or one at a time; auto: what memory allows")
    p.add_argument("--in-process", type=_names, default=(), help="baselines to run in this process instead of a worker (e.g. diffusers)")
    p.add_argument("--baseline-env", type=_env, action="append", default=[], metavar="NAME=VENV", help="use this venv for a baseline (repeatable)")
    p.add_argument("--no-create-envs", dest="create_envs", action="store_false", help="never pip-install baseline venvs; skip baselines without one")
    p.add_argument("--cache-dir", default=None, help="exports, venvs, models and worker logs (default: ~/.cache/sdrt/bench or $SDRT_BENCH_CACHE)")
    p.add_argument("--note", default="", help="what else ran on the machine (recorded with a process snapshot)")
    p.add_argument("--settle", type=float, default=0.5, metavar="S",
                   help="idle seconds before each run, so the last runner's thread pools stop spinning (default 0.5)")
    p.add_argument("--json", default=None, help="write the full record here")
    p.add_argument("--markdown", default=None, help="write the table, with the machine and what else ran, here")
    p.add_argument("--chart", default=None, help="write a PNG chart of per-stage times here (needs matplotlib)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    from sdrt.bench import BenchConfig, default_cache_dir, format_report, format_table, run_bench, write_chart

    config = BenchConfig(
        model=Path(args.model) if args.model else None, sd15_random=args.sd15_random, export=args.export,
        backends=args.backends, baselines=args.baselines, size=args.size, steps=args.steps, batches=args.batch,
        runs=args.runs, warmup=args.warmup, threads=args.threads, guidance=args.guidance, device=args.device,
        order=args.order, in_process=args.in_process, baseline_envs=dict(args.baseline_env), create_envs=args.create_envs,
        cache_dir=Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir(), note=args.note,
        settle_s=args.settle,
    )  # fmt: skip
    if args.sd15_random and args.model:
        print("sdrt: error: pass MODEL or --sd15-random, not both", file=sys.stderr)
        return 2
    log = (lambda *a: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    record = run_bench(config, log=log)
    record["command"] = {"argv": sys.argv, "args": {k: v for k, v in vars(args).items() if k != "func"}}
    table = format_table(record)
    print(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(format_report(record) + "\n")
    if args.chart:
        write_chart(record, args.chart)
    measured = any(e.get("stats") for e in record["runners"].values())
    return 0 if measured else 1
