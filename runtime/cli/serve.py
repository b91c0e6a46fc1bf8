"""`sdrt serve`: argparse only; sdrt.serve (FastAPI, uvicorn) is imported when the command runs."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

EPILOG_SERVE = """examples:
  sdrt serve                                        the built-in digits model on 127.0.0.1:7860
  sdrt serve ~/models/sd15 --max-batch 4            one model (named after its folder)
  sdrt serve --model sd15=~/models/sd15 --model dreamshaper=~/models/ds8 --api-key $KEY
  sdrt serve out/sd15-slots --lora-dir ~/loras     <lora:NAME:SCALE> in prompts (an export with --lora-slots)
  sdrt serve --ray --replicas 2 --cpus-per-replica 1    on a local Ray cluster (pip install 'sdrt[ray]')
  sdrt serve --ray --direct-ingress --port 8000          the same without Serve's HTTP proxy hop (lower latency)
  sdrt serve --ray --address HEAD:6379 --autoscale 1:8 --gpus-per-replica 1 ~/models/sd15
APIs: AUTOMATIC1111 (/sdapi/v1/txt2img, ...), OpenAI images (/v1/images/generations, /edits), async jobs
(/v1/jobs, with Server-Sent Events); /healthz, /readyz, /metrics, /docs.
"""

HELP_DIRECT = ("the ingress replica serves HTTP on --port itself, without Serve's HTTP proxy: one hop fewer, ~half "
               "the latency Ray adds per request (Ray 2.60's experimental RAY_SERVE_ENABLE_DIRECT_INGRESS). Trade-offs: "
               "one ingress replica, one address (no proxy per node); Serve still starts an idle proxy on another "
               "free port; a stopping ingress is held RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S (Ray: 30 s, "
               "for a load balancer to deregister it; 0 on a local cluster started here, so Ctrl-C returns at once). "
               "With --address the cluster must have been started with RAY_SERVE_ENABLE_DIRECT_INGRESS=1 in the "
               "environment of `ray start` (refused otherwise); the ingress then takes a port of that cluster's range "
               "(RAY_SERVE_DIRECT_INGRESS_MIN/MAX_HTTP_PORT, 30000-31000), printed at start, and --port is the proxy's")


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve models over HTTP (A1111 and OpenAI APIs, async jobs)",
                       description="Serve Stable Diffusion over HTTP with requests batched across clients.",
                       epilog=EPILOG_SERVE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", metavar="MODEL", help="model folders or sdrt exports (default: the built-in digits model)")
    p.add_argument("--model", action="append", default=[], metavar="NAME=PATH", help="a model under a name of your choosing (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s; others warn without --api-key)")
    p.add_argument("--port", type=int, default=7860, help="(default: %(default)s)")
    p.add_argument("--backend", default="onnx", choices=("auto", "onnx", "torch", "tensorrt"), help="(default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the networks (default: all cores)")
    p.add_argument("--max-batch", type=int, default=8, help="most images in one batched UNet call; 1 turns batching off (default: %(default)s)")
    p.add_argument("--batch-wait-ms", type=float, default=10.0, help="longest wait for company when busy (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting per model before 429 (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request before 504 (default: %(default)s)")
    p.add_argument("--drain-timeout", type=float, default=60.0, help="seconds to finish work after SIGTERM (default: %(default)s)")
    p.add_argument("--api-key", default=os.environ.get("SDRT_API_KEY"), help="require `Authorization: Bearer KEY` (default: $SDRT_API_KEY)")
    p.add_argument("--cors", action="append", default=[], metavar="ORIGIN", help="allow browser calls from ORIGIN (repeatable; default: none)")
    p.add_argument("--max-pixels", type=int, default=None, help="pixels per image (default: 4x the model's default area)")
    p.add_argument("--max-steps", type=int, default=150, help="(default: %(default)s)")
    p.add_argument("--max-images", type=int, default=8, help="images per request (default: %(default)s)")
    p.add_argument("--max-prompt-chars", type=int, default=2000, help="(default: %(default)s)")
    p.add_argument("--max-body-mb", type=float, default=20.0, help="request body limit (default: %(default)s)")
    p.add_argument("--quick-start", action="store_true", help="warm batch size 1 only: ready sooner, the first batch of each other size pays its setup")
    p.add_argument("--lora-dir", default=None, metavar="DIR", help="LoRA .safetensors files requests may name "
                   "(<lora:NAME:SCALE> in A1111 prompts, `loras` on the other routes); models need LoRA slots (`sdrt export --lora-slots`)")
    p.add_argument("--max-loras", type=int, default=64, metavar="N", help="LoRAs kept read per model (default 64, at "
                   "least 16); beyond it the least recently requested is dropped and read again when asked for")
    p.add_argument("--preview-every", type=int, default=5, help="steps between previews in job events (default: %(default)s)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    r = p.add_argument_group("Ray Serve (pip install 'sdrt[ray]')")
    r.add_argument("--ray", action="store_true", help="serve through Ray Serve: one deployment per model, replicas batch as above")
    r.add_argument("--address", default=None, metavar="ADDR", help="join the Ray cluster at ADDR (HOST:PORT; default: start a local one)")
    r.add_argument("--replicas", type=int, default=1, metavar="N", help="replicas per model (default: %(default)s)")
    r.add_argument("--autoscale", default=None, metavar="MIN:MAX", help="autoscale replicas on ongoing requests, MIN..MAX")
    r.add_argument("--cpus-per-replica", type=float, default=1.0, metavar="C", help="(default: %(default)s)")
    r.add_argument("--gpus-per-replica", type=float, default=0.0, metavar="G", help="(default: %(default)s)")
    r.add_argument("--max-replicas-per-node", type=int, default=None, metavar="K", help="spread replicas (1: one per node)")
    r.add_argument("--ray-cpus", type=int, default=None, metavar="N", help="CPUs of a local cluster started here (default: all)")
    r.add_argument("--direct-ingress", action="store_true", help=HELP_DIRECT)
    p.set_defaults(func=cmd_serve)


def model_table(paths: list[str], named: list[str]) -> dict:
    """{name: path}; names from --model NAME=PATH, else from the folder; no models: the built-in one."""
    from sdrt.errors import InputError

    models: dict = {}
    for path in paths:
        models[Path(path).expanduser().resolve().name.removesuffix(".safetensors")] = str(Path(path).expanduser())
    for spec in named:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise InputError(f"--model {spec!r} is not NAME=PATH")
        models[name] = str(Path(path).expanduser())
    return models or {"digits": None}


def cmd_serve(args) -> int:
    try:
        from sdrt.serve.limits import Limits
        from sdrt.serve.server import ServeConfig, serve
    except ImportError as err:
        from sdrt.errors import SdrtError

        raise SdrtError(f"sdrt serve needs the serve extra ({err.name} is missing): pip install 'sdrt[serve]'") from None
    limits = Limits(max_pixels=args.max_pixels, max_steps=args.max_steps, max_images=args.max_images,
                    max_prompt_chars=args.max_prompt_chars, max_body_bytes=int(args.max_body_mb * 2**20))
    config = ServeConfig(models=model_table(args.models, args.model), backend=args.backend, threads=args.threads,
                         max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms, max_queue=args.max_queue,
                         timeout=args.timeout, drain_timeout=args.drain_timeout, preview_every=args.preview_every,
                         warm_all_batches=not args.quick_start, api_key=args.api_key or None, cors=args.cors, lora_dir=args.lora_dir, max_loras=args.max_loras,
                         limits=limits)
    if args.ray:
        return cmd_serve_ray(args, config)
    if args.direct_ingress:
        from sdrt.errors import InputError

        raise InputError("--direct-ingress is a Ray Serve option: add --ray")
    return serve(config, host=args.host, port=args.port, log_level=args.log_level)


def cmd_serve_ray(args, config) -> int:
    from sdrt.errors import InputError
    from sdrt.serve.ray_app import RayOptions, parse_autoscale, require_ray, run

    require_ray()  # one line naming the extra, before anything else
    if args.replicas < 1:
        raise InputError(f"--replicas {args.replicas} must be at least 1")
    options = RayOptions(address=args.address, replicas=args.replicas, autoscale=parse_autoscale(args.autoscale),
                         cpus_per_replica=args.cpus_per_replica, gpus_per_replica=args.gpus_per_replica,
                         max_replicas_per_node=args.max_replicas_per_node, num_cpus=args.ray_cpus,
                         host=args.host, port=args.port, direct_ingress=args.direct_ingress)
    return run(config, options)
