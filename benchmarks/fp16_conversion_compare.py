"""fp32 -> fp16 for `sdrt build --fp16` on an fp32 export: sdrt.export.fp16 vs NVIDIA Model Optimizer's ONNX AutoCast
(modelopt.onnx.autocast.convert_to_f16, keep_io_types), on the tiny SD 1.x and 2.x exports, ORT CPU,
max|fp16 - fp32| / max|fp32| per network at two shapes (UNet at timestep 999.37).

Setup (modelopt 0.47 pulls torch and CUDA packages; the ONNX part needs only these):
    python3 -m venv /tmp/movenv && /tmp/movenv/bin/pip install --no-deps nvidia-modelopt==0.47.0
    pip install --no-deps --target /tmp/modeps onnx_graphsurgeon nvidia-ml-py   (and what its import asks for)
    PYTHONPATH=/tmp/movenv/lib/python3.11/site-packages:/tmp/modeps .venv/bin/python benchmarks/fp16_conversion_compare.py

Measured 2026-12-04 (onnxruntime 1.32.0 CPU): text encoder, VAE encoder and decoder identical (4.6e-4..1.5e-3 both);
UNet sdrt 6.8e-4..8.1e-4 vs AutoCast 4.4e-3..7.6e-3 (sdrt keeps the timestep path fp32; AutoCast's convert_to_f16
does not), so `sdrt build` uses sdrt's own conversion."""
import sys, time
from pathlib import Path
import numpy as np, onnx, onnxruntime as ort
from sdrt.export.tiny import build_tiny_sd
from sdrt.export.onnx_export import export_model
from sdrt.export.fp16 import convert_file
from sdrt.contracts import ShapeLimits
from sdrt.model.manifest import read_manifest
import modelopt.onnx.autocast as ac

root = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/fp16_compare"); root.mkdir(parents=True, exist_ok=True)
for variant in ("sd1", "sd2"):
    model = root / f"tiny-{variant}"
    if not model.exists():
        build_tiny_sd(model, variant)
    exp = root / f"onnx-{variant}"
    if not exp.exists():
        export_model(model, exp, limits=ShapeLimits(32, 64, 128, 2), progress=False, check=False)
    m = read_manifest(exp)
    for net, info in m.networks.items():
        src = exp / info["file"]
        a = root / f"{variant}-{net}-sdrt" / "model.onnx"; a.parent.mkdir(exist_ok=True)
        convert_file(src, a, upcast_attention=False)
        b = root / f"{variant}-{net}-autocast" / "model.onnx"; b.parent.mkdir(exist_ok=True)
        t = time.time()
        try:
            onnx.save_model(ac.convert_to_f16(onnx.load(str(src)), "fp16", keep_io_types=True), str(b))
            mode = "convert_to_f16"
        except Exception as e:
            print(net, "autocast convert_to_f16 failed:", str(e)[:200]); continue
        sess = {k: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for k, p in (("fp32", src), ("sdrt", a), ("autocast", b))}
        for dims in ({"batch": 1, "unet_batch": 2, "latent_height": 8, "latent_width": 8, "image_height": 64, "image_width": 64},
                     {"batch": 2, "unet_batch": 4, "latent_height": 16, "latent_width": 12, "image_height": 128, "image_width": 96}):
            feeds = m.contracts[net].sample_inputs(dims, seed=1)
            if net == "unet":
                feeds["timestep"] = np.full_like(feeds["timestep"], 999.37)
            ref = sess["fp32"].run(None, feeds)[0]
            errs = {k: float(np.abs(sess[k].run(None, feeds)[0] - ref).max() / np.abs(ref).max()) for k in ("sdrt", "autocast")}
            print(f"{variant} {net:<13} {dims['latent_height']}x{dims['latent_width']} b{dims.get('batch')}: sdrt {errs['sdrt']:.2e}  autocast({mode}) {errs['autocast']:.2e}", flush=True)
