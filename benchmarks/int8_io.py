"""Paired A/B of the int8 text encoder and VAE decoder against fp32 on the SD 1.5 shape (issue 22).

    flock /work/heavy.lock python benchmarks/int8_io.py --work /tmp/int8io/sd15 --out benchmarks/results/int8-io-sd15

Builds SD 1.5's text encoder and VAE from SD 1.5's configs with random weights beside a tiny UNet (the UNet is not
measured here: building and exporting SD 1.5's would take ~10 min and 8 GB for nothing), exports them fp32 with and
without Winograd (`--winograd --conv-tactics measure`, as `sdrt bench` exports for a CPU), quantises the export
without Winograd as `sdrt export --int8` does (sdrt.export.int8.network_scheme; calibration recorded from the
pipeline's own sampling at 256 px; the encoder's on the decoded images), and times one text-encoder call (batch 2:
the guided pair), one VAE decode and one VAE encode (batch 1, 256 px) of each export in turn, `--rounds` times, in one process per export at a time so that nothing else
holds memory. Random weights: speed only (quality is measured on the built-in model: int8-schemes.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np


NETWORKS = ("text_encoder", "vae_decoder", "vae_encoder")


TINY_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)  # fmt: skip


def build(folder: Path) -> Path:
    """SD 1.5's text encoder and VAE (random weights, SD 1.5's configs) with a tiny UNet of the same interface."""
    from sdrt.bench.models import build_sd15_random

    if (folder / "model_index.json").exists():
        return folder
    return build_sd15_random(folder, seed=0, unet=TINY_UNET)


def time_networks(folder: Path, threads: int, repeats: int) -> dict:
    """Median seconds of one text-encoder call (batch 2), one VAE decode and one encode (batch 1) at 256 px, ORT,
    `threads`."""
    from int8_schemes import network_seconds  # benchmarks/, beside this script

    return {name: network_seconds(folder, name, threads, 256, batch, repeats)
            for name, batch in (("text_encoder", 2), ("vae_decoder", 1), ("vae_encoder", 1))}


def main(argv=None) -> int:
    from sdrt.export.int8 import quantize_export
    from sdrt.export.int8_export import in_child
    from sdrt.export.int8_quality import default_prompts, record_feeds
    from sdrt.export.onnx_export import export_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="folder for the model and the exports (~1 GB; reused)")
    p.add_argument("--out", required=True, help="results path without suffix (.json is written)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    work = Path(args.work)
    model = in_child(build, work / "model")
    exports = {}
    common = dict(min_size=64, opt_size=256, max_size=512, max_batch=4, check=False, progress=False, force=True)
    for label, extra in (("fp32", {}), ("fp32-winograd", dict(winograd=True, conv_tactics="measure", tactic_threads=args.threads,
                                                              tactic_cache_dir=work / "tactics"))):
        exports[label] = work / label
        if not (exports[label] / "manifest.json").exists():
            in_child(export_model, model, exports[label], **common, **extra)
    exports["int8"] = work / "int8"
    if not (exports["int8"] / "manifest.json").exists():
        feeds = in_child(record_feeds, exports["fp32"], default_prompts(False), 256, 8, 7.5,
                         NETWORKS, {}, threads=args.threads)
        partial = work / "int8.partial"
        shutil.rmtree(partial, ignore_errors=True)
        in_child(quantize_export, exports["fp32"], partial, "static", NETWORKS, feeds)
        partial.rename(exports["int8"])
    if args.rounds == 0:  # preparation only (run it niced; then the timed rounds under the heavy lock)
        return 0
    rows = {label: [] for label in exports}
    for r in range(args.rounds):  # interleaved: each round times every export once
        for label, folder in exports.items():
            rows[label].append(in_child(time_networks, folder, args.threads, args.repeats))
            print(r, label, rows[label][-1], flush=True)
    result = {"threads": args.threads, "rounds": rows,
              "median": {label: {n: float(np.median([x[n] for x in xs])) for n in xs[0]} for label, xs in rows.items()}}
    Path(args.out).with_suffix(".json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result["median"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
