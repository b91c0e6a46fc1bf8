"""What each int8 scheme costs on the built-in digits model: oracle accuracy, PSNR against fp32, UNet time.

    python benchmarks/int8_schemes.py --out benchmarks/results/int8-schemes   # ~3 min on 2 cores

Exports the built-in model in fp32 once, quantises it with every scheme of sdrt.export.int8 (the UNet's scheme;
each set of `--network-sets`, the other networks by sdrt.export.int8.network_scheme), and for each reports the
oracle's digit and colour accuracy (the 50 prompts of tests/test_digits.py, guidance 7.5, 20 steps, seed 0) beside
fp32's, the PSNR of the same 50 images against fp32's, the VAE decoder's PSNR alone (latents of 10 held-out prompts
through the fp32 and the int8 decoder), and the median time of one guided UNet call (batch 2, 64x64 image) in one
thread.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def network_seconds(folder: Path, network: str, threads: int, size: int, batch: int | None = None, repeats: int = 30) -> float:
    """Median seconds of one call of the export's `network` in a plain ONNX Runtime CPU session (`threads` intra-op
    threads) on the contract's sample inputs at `size` px (`batch`: the batch dim; None: the opt shape's), after one
    warm-up call."""
    import onnxruntime as ort

    from sdrt.contracts import ShapeLimits
    from sdrt.model.manifest import read_manifest

    manifest = read_manifest(folder)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(str(folder / manifest.networks[network]["file"]), options, providers=["CPUExecutionProvider"])
    limits = ShapeLimits(min_size=size, opt_size=size, max_size=size, **({"max_batch": batch} if batch else {}))
    dims = limits.dims(manifest.facts, "opt")
    if batch:
        dims["batch"] = batch
    feeds = manifest.contracts[network].sample_inputs(dims)
    session.run(None, feeds)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def unet_ms(folder: Path, repeats: int = 30) -> float:
    from sdrt.model.manifest import read_manifest

    return network_seconds(folder, "unet", 1, read_manifest(folder).facts.default_size, None, repeats) * 1e3


def main(argv=None) -> int:
    from sdrt.builtin import builtin_model_dir
    from sdrt.export.int8 import SCHEMES, quantize_export
    from sdrt.export.int8_quality import ORACLE_PAIRS, decode_psnr, default_prompts, oracle_accuracy, record_feeds
    from sdrt.export.onnx_export import export_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="results path without suffix (.json and .md are written)")
    p.add_argument("--schemes", default=",".join(SCHEMES))
    p.add_argument("--network-sets", default="unet;unet,vae_decoder",
                   help="';'-separated sets of networks to quantise with each scheme (e.g. 'text_encoder;unet,text_encoder')")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="int8-schemes-"))
    try:
        fp32 = work / "fp32"
        export_model(builtin_model_dir(), fp32, progress=False, check=False)
        calib = record_feeds(fp32, default_prompts(True), 64, 20, 7.5, ("unet", "vae_decoder", "vae_encoder"), {"unet": 64},
                             threads=1)
        held = record_feeds(fp32, [f"a {c} {d}" for d, c in ORACLE_PAIRS[2::5]], 64, 20, 7.5, ("vae_decoder",), {},
                            seed=100, threads=1)["vae_decoder"]
        rows = [{"scheme": "fp32", "networks": [], "unet_ms": unet_ms(fp32)}]
        for scheme in args.schemes.split(","):
            for networks in [tuple(s.split(",")) for s in args.network_sets.split(";")]:
                folder = work / f"{scheme}-{'-'.join(networks)}"
                t0 = time.perf_counter()
                stats = quantize_export(fp32, folder, scheme, networks, calib)
                seconds = time.perf_counter() - t0
                acc = oracle_accuracy(fp32, folder, threads=1)
                rows.append({"scheme": scheme, "networks": list(networks), "quantize_s": seconds, "oracle": acc,
                             "unet_ms": unet_ms(folder), "stats": stats,
                             "decode_psnr_db": decode_psnr(fp32, folder, held, 1) if "vae_decoder" in networks else None})
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "stats"}), flush=True)
        rows[0]["oracle"] = rows[1]["oracle"]["fp32"] if len(rows) > 1 else None
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
        out.with_suffix(".md").write_text(markdown(rows))
        print(markdown(rows))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def markdown(rows) -> str:
    lines = ["| UNet scheme | networks quantised | digit % | colour % | PSNR vs fp32 (dB) | decode alone (dB) "
             "| UNet ms (batch 2, 1 thread) | UNet MB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["scheme"] == "fp32":
            o = r.get("oracle") or {}
            lines.append(f"| fp32 | | {o.get('digit', 0) * 100:.0f} | {o.get('colour', 0) * 100:.0f} | | | {r['unet_ms']:.2f} | |")
            continue
        o = r["oracle"]
        mb = f"{r['stats']['unet']['bytes_after'] / 1e6:.1f}" if "unet" in r["stats"] else ""
        dec = f"{r['decode_psnr_db']:.1f}" if r.get("decode_psnr_db") is not None else ""
        lines.append(f"| {r['scheme']} | {', '.join(r['networks'])} | {o['int8']['digit'] * 100:.0f} | "
                     f"{o['int8']['colour'] * 100:.0f} | {o['psnr_db']:.1f} | {dec} | {r['unet_ms']:.2f} | {mb} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
