"""int8 convolutions on the CPU (issue 22): ONNX Runtime's QLinearConv against im2col + one int8 GEMM
(sdrt.export.int8_conv_gemm), one conv at a time, at the SD 1.5 UNet's conv shapes (256 px, batch 2).

    flock /work/heavy.lock python benchmarks/int8_conv_gemm_ab.py --threads 2 --reps 20 --out OUT.json

Each shape: a float Conv (random weights, bias) quantised as sdrt's static schemes do (sdrt.export.int8_conv_gemm.
form_models: QDQ, per-channel int8 weights, uint8 activations calibrated on 3 random inputs), in two forms:
- "qlinearconv": the QDQ conv with its int8 output, which ONNX Runtime fuses into QLinearConv;
- "gemm": the conv rewritten by convs_as_int8_gemm (im2col + MatMulIntegerToFloat, float output).
Both sessions are loaded side by side and timed in alternating turns (median of --reps calls each, after 3 warm-up
calls); the error column is each form's largest difference from the float conv, over that output's largest value.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

# (batch, in channels, out channels, size, kernel, stride): the SD 1.5 UNet's conv shapes at 256 px (32x32 latents,
# batch 2: one guided image), then its VAE decoder's (batch 1, 32x32 latents to 256x256 pixels).
SHAPES = {"unet": [(2, 320, 320, 32, 3, 1), (2, 320, 320, 32, 3, 2), (2, 640, 640, 16, 3, 1), (2, 1920, 640, 16, 3, 1),
                   (2, 1280, 1280, 8, 3, 1), (2, 2560, 1280, 8, 3, 1), (2, 1280, 1280, 4, 3, 1), (2, 960, 320, 32, 1, 1),
                   (2, 1920, 640, 16, 1, 1)],
          "vae": [(1, 512, 512, 32, 3, 1), (1, 512, 512, 64, 3, 1), (1, 512, 512, 128, 3, 1), (1, 512, 256, 128, 3, 1),
                  (1, 256, 256, 128, 3, 1), (1, 256, 256, 256, 3, 1), (1, 256, 128, 256, 3, 1), (1, 128, 128, 256, 3, 1),
                  (1, 256, 128, 256, 1, 1)]}


def main(argv=None) -> int:
    import onnxruntime as ort

    from sdrt.export.int8_conv_gemm import ConvShape, form_models

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--networks", default="unet,vae", help="which shape lists (unet, vae)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.log_severity_level = 3
    rng = np.random.default_rng(0)
    rows = []
    for shape in [s for n in args.networks.split(",") for s in SHAPES[n]]:
        n, c, k, size, kernel, stride = shape
        conv = ConvShape.padded(n, c, k, size, size, kernel, stride)
        with tempfile.TemporaryDirectory() as work:
            models = form_models(conv, work)
        sessions = {f: ort.InferenceSession(m, options, providers=["CPUExecutionProvider"]) for f, m in models.items()}
        x = rng.standard_normal(shape[:2] + (shape[3], shape[3])).astype(np.float32)
        outputs = {f: s.run(None, {"x": x})[0] for f, s in sessions.items()}
        times = {f: [] for f in ("qlinearconv", "gemm")}
        for f in times:
            for _ in range(3):
                sessions[f].run(None, {"x": x})
        for _ in range(args.reps):
            for f in times:
                start = time.perf_counter()
                sessions[f].run(None, {"x": x})
                times[f].append(time.perf_counter() - start)
        gmac = conv.rows * k * c * kernel * kernel / 1e9
        peak = float(np.abs(outputs["float"]).max())
        row = {"shape": f"{n}x{c}->{k} {kernel}x{kernel}/{stride} at {size}x{size}", "gmac": gmac}
        for f, t in times.items():
            row[f + "_ms"] = float(np.median(t)) * 1e3
            row[f + "_gmac_s"] = gmac / float(np.median(t))
            row[f + "_error"] = float(np.abs(outputs[f] - outputs["float"]).max()) / peak
        row["speedup"] = row["qlinearconv_ms"] / row["gemm_ms"]
        rows.append(row)
        print(f"{row['shape']:28s} QLinearConv {row['qlinearconv_ms']:6.2f} ms ({row['qlinearconv_gmac_s']:5.0f} GMAC/s, "
              f"err {row['qlinearconv_error']:.4f})  GEMM {row['gemm_ms']:6.2f} ms ({row['gemm_gmac_s']:5.0f} GMAC/s, "
              f"err {row['gemm_error']:.4f})  {row['speedup']:.2f}x", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"threads": args.threads, "reps": args.reps, "onnxruntime": ort.__version__,
                                        "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
