"""What the int8 VAE encoder costs img2img on the built-in digits model (issue 22): PSNR against fp32, oracle digits.

    OMP_NUM_THREADS=1 python benchmarks/int8_img2img.py   # ~2 min on 2 cores

Calibrates as `sdrt export --int8` does (10 digit prompts x 8 steps through the fp32 export: the UNet's inputs, the
decoder's latents, the decoded images for the encoder), quantises the network sets below (sdrt.export.int8), then
runs img2img (20 init images drawn by fp32 from the oracle's first 20 prompts at seed 7; prompts of the same digit in
another colour; strength 0.6, 20 steps, guidance 7.5, seed i) with each and prints the oracle's digit accuracy and
the PSNR against fp32's images. Results: benchmarks/results/int8-schemes.md ("Other networks").
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

SETS = (("unet", "vae_decoder"), ("unet", "vae_decoder", "vae_encoder"), ("vae_encoder",))


def main() -> int:
    import sdrt
    from sdrt.builtin import builtin_model_dir
    from sdrt.export.int8 import psnr, quantize_export
    from sdrt.export.int8_quality import ORACLE_PAIRS, default_prompts, record_feeds, to_uint8
    from sdrt.oracle import DigitOracle

    fp32 = builtin_model_dir()
    calib = record_feeds(fp32, default_prompts(True), 64, 8, 7.5, ("unet", "vae_decoder", "vae_encoder"), {"unet": 32},
                         threads=1)
    work = Path(tempfile.mkdtemp(prefix="int8-img2img-"))
    try:
        folders = {"fp32": fp32}
        for nets in SETS:
            folders["+".join(nets)] = work / "-".join(nets)
            quantize_export(fp32, folders["+".join(nets)], "static", nets, calib)
        pairs = ORACLE_PAIRS[:20]
        base = sdrt.Pipeline.from_pretrained(fp32, backend="onnx", threads=1)
        init = base([f"a {c} {d}" for d, c in pairs], num_inference_steps=20, guidance_scale=7.5, seed=7,
                    output_type="pil", progress=False).images
        texts = [f"a {['red', 'green', 'blue', 'yellow'][i % 4]} {d}" for i, (d, _) in enumerate(pairs)]
        oracle, images = DigitOracle.load(), {}
        for name, folder in folders.items():
            pipe = sdrt.Pipeline.from_pretrained(folder, backend="onnx", threads=1)
            images[name] = np.concatenate([to_uint8(pipe(t, image=im, strength=0.6, num_inference_steps=20, guidance_scale=7.5,
                                                         seed=i, output_type="np", progress=False).images)
                                           for i, (t, im) in enumerate(zip(texts, init))])
            digit = np.mean([r[0] == d for r, (d, _) in zip(oracle.classify(images[name]), pairs)])
            vs = f", PSNR vs fp32 {psnr(images[name], images['fp32']):.1f} dB" if name != "fp32" else ""
            print(f"{name}: digit {digit:.0%}{vs}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
