"""Models and exports for `sdrt bench`: which folders a benchmark runs on, made once into the cache.

Resolves the configured model (a diffusers folder, an sdrt export, or the built-in model) to the diffusers folder
the baselines and the torch backend need and the export the onnx backend needs; exports and the SD 1.5-shape
random-weight model are built once into the cache, in subprocesses so their memory goes back before measuring;
the onnx backend's ORT cache is warmed the same way. Apart from the runners because this is preparation with
side effects on disk, not measurement.
"""

from __future__ import annotations

from sdrt.model.weights import prefix_text_encoder_keys

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from sdrt import __version__
from sdrt.errors import ModelError, SdrtError

if TYPE_CHECKING:
    from sdrt.bench import BenchConfig


def resolve_model(config: BenchConfig) -> tuple[Path, Path | None, Path | None]:
    """(model, diffusers folder or None, sdrt export or None) for the configured model."""
    from sdrt.model.manifest import MANIFEST_NAME, read_manifest

    if config.model is None:
        from sdrt.builtin import builtin_model_dir

        model = builtin_model_dir()
    else:
        model = Path(config.model).expanduser().resolve()
        if not model.is_dir():
            raise ModelError(f"model folder {model} does not exist; pass a diffusers-format folder or an sdrt export")
    diffusers_dir = model if (model / "unet" / "config.json").exists() else None
    export = Path(config.export).expanduser().resolve() if config.export else None
    if export is None and (model / MANIFEST_NAME).exists():
        export = model
    if diffusers_dir is None and export is not None:  # an export remembers the folder it came from
        source = read_manifest(export).extras.get("source")
        if source and (Path(source) / "unet" / "config.json").exists():
            diffusers_dir = Path(source)
    if export is not None and not (export / MANIFEST_NAME).exists():
        raise ModelError(f"--export {export} has no {MANIFEST_NAME}; pass an sdrt export folder (made by `sdrt export`)")
    return model, diffusers_dir, export


def folder_digest(folder: Path, *extra) -> str:
    """A key over a model folder's files (names, sizes, mtimes) and `extra`."""
    items = [[str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns]
             for p in sorted(folder.rglob("*")) if p.is_file() and ".ort_cache" not in p.parts]  # fmt: skip
    return hashlib.sha256(json.dumps([str(folder), items, __version__, *extra]).encode()).hexdigest()[:16]


def cached_export(diffusers_dir: Path, size: int, max_batch: int, config: BenchConfig, log, int8: bool = False) -> Path:
    """Export `diffusers_dir` to the cache once (`sdrt export` in a subprocess, so its memory goes back); int8: with
    `--int8` (the default networks quantised: the UNet and the VAE, calibrated on sdrt's default prompts; the
    other networks as the fp32 export)."""
    from sdrt.bench.env import physical_cores
    from sdrt.model.facts import read_model_facts
    from sdrt.model.manifest import GRAPH_REVISION

    facts = read_model_facts(diffusers_dir)
    # One export serves every size and batch ORT runs. The opt size is the benchmarked one: TensorRT tunes its
    # kernels for it, and so does --winograd its tiles (sdrt.export.winograd), as a user who wants speed would.
    step = facts.size_step
    limits = {"min": step, "opt": size, "max": max(size, facts.default_size), "batch": max(max_batch, 4)}
    # On a CPU, the export sdrt recommends there: Winograd convolutions.
    # Each conv's form timed on this CPU at that size and the runners' threads (sdrt.export.tactics), as TensorRT
    # times its tactics; the timings are cached beside the exports.
    threads = config.threads or physical_cores()
    flags = ["--winograd", "--conv-tactics", "measure", "--tactic-threads", str(threads)] if config.device == "cpu" else []
    if int8:  # the networks named, so that the cache key changes with the default (sdrt.export.int8_export)
        from sdrt.export.int8_export import DEFAULT_NETWORKS

        flags += ["--int8", "--int8-networks", ",".join(DEFAULT_NETWORKS)]
    key = folder_digest(diffusers_dir, limits, GRAPH_REVISION, flags)
    if config.device == "cpu":  # not in the key: the same timings give the same export
        flags += ["--tactic-cache-dir", str(config.cache_dir / "conv-tactics")]
    out = config.cache_dir / "exports" / f"{diffusers_dir.name}-{key}"
    if (out / "manifest.json").exists():
        return out
    log(f"exporting {diffusers_dir} to {out} for the onnx backend (once{', int8' if int8 else ''})")
    cmd = [sys.executable, "-m", "sdrt.cli", "export", str(diffusers_dir), str(out), "--quiet", "--force",
           "--min-size", str(limits["min"]), "--opt-size", str(limits["opt"]), "--max-size", str(limits["max"]),
           "--max-batch", str(limits["batch"]), *flags]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SdrtError(f"`sdrt export` of {diffusers_dir} failed: {(proc.stderr or proc.stdout).strip()[-1500:]}")
    return out


def build_sd15_random(folder, seed: int = 0, unet: dict | None = None) -> Path:
    """An SD 1.5-shape diffusers folder from SD 1.5's real configs with random weights (needs torch + diffusers).
    ~4.3 GB of fp32 weights: benchmarks only, never committed. `unet`: UNet2DConditionModel arguments in place of
    SD 1.5's (a benchmark of the other networks takes a tiny UNet of the same interface)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sdrt.export.clip_vocab import write_clip_tokenizer
    from sdrt.export.tiny import SD15_SCHEDULER

    folder = Path(folder)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**(unet or dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
    )))  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
        sample_size=512, act_fn="silu",
    )  # fmt: skip
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, max_position_embeddings=77,
        vocab_size=49408, hidden_act="quick_gelu", projection_dim=768, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))  # fmt: skip
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder / "tokenizer"))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=PNDMScheduler.from_config(SD15_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    pipe.save_pretrained(folder)
    prefix_text_encoder_keys(folder)  # loadable by transformers 4.x too
    return folder


def sd15_random_dir(config: BenchConfig, log) -> Path:
    """The SD 1.5-shape random model in the cache, built once (in a subprocess: 4.3 GB it gives back)."""
    folder = config.cache_dir / "models" / "sd15-random-seed0"
    if (folder / "model_index.json").exists():
        return folder
    log(f"building the SD 1.5-shape random-weight model in {folder} (once, ~4.3 GB)")
    tmp = folder.with_name(folder.name + ".partial")
    code = f"from sdrt.bench.models import build_sd15_random; build_sd15_random({str(tmp)!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SdrtError(f"building the SD 1.5-shape model failed: {proc.stderr.strip()[-1500:]}")
    tmp.rename(folder)
    return folder


def warm_ort_cache(export: Path, threads: int, device: str) -> float:
    """Create the onnx backend once in a subprocess, so the load measured later finds ORT's optimised graphs."""
    providers = "['CPUExecutionProvider']" if device == "cpu" else "None"
    code = (f"from sdrt.pipeline import Pipeline; Pipeline.from_pretrained({str(export)!r}, backend='onnx', "
            f"threads={threads}, providers={providers})")  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SdrtError(f"the onnx backend could not load {export}: {proc.stderr.strip()[-1500:]}")
    return time.perf_counter() - t0


def model_weight_bytes(folder: Path | None) -> int:
    if folder is None:
        return 0
    return sum(p.stat().st_size for sub in ("unet", "vae", "text_encoder", "text_encoder_2") for p in (folder / sub).glob("*")
               if p.suffix in (".safetensors", ".bin"))  # fmt: skip


def _scheduler_name(folder: Path | None) -> str | None:
    try:
        rel = "scheduler/scheduler_config.json"
        return json.loads((Path(folder) / rel).read_text()).get("_class_name")
    except (OSError, TypeError, ValueError):
        return None
