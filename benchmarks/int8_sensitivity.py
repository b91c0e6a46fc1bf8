"""Which layers int8 hurts: the static scheme on the built-in digits model, one variant at a time.

    python benchmarks/int8_sensitivity.py --out benchmarks/results/int8-sensitivity   # ~12 min on 2 cores

Calibrates once (MinMax ranges of every Conv/MatMul tensor, cached as ONNX Runtime's calibration cache, from 64 UNet
calls recorded over 10 digit prompts x 20 steps), then quantises the UNet with each variant: only one block or one
kind of layer int8 (the rest fp32: what that part costs alone), or everything but one part (what keeping it fp32
buys), or a candidate default. For each: PSNR of the oracle's 50 images (guidance 7.5, 20 steps, seed 0) against
fp32's and the oracle's digit / colour accuracy. Speed is not measured here (the digits UNet is too small to say
anything about SD 1.5): see benchmarks/results/int8-schemes.md and the sd15 bench.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

BLOCKS = ("down_blocks.0", "down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.0", "up_blocks.1", "up_blocks.2")
KINDS = {
    "resnet conv1": "/conv1/",
    "resnet conv2": "/conv2/",
    "conv_shortcut": "/conv_shortcut/",
    "proj_in": "/proj_in/",
    "proj_out": "/proj_out/",
    "down/upsamplers": "samplers.",
    "attn1 (self)": "/attn1/",
    "attn2 to_q/to_out": ("/attn2/to_q", "/attn2/to_out"),
    "attn2 to_k/to_v (text)": ("/attn2/to_k", "/attn2/to_v"),
    "ff": "/ff/",
}


RAW = ["/conv_shortcut/", "/proj_out/", "samplers.", "/ff/net.2/", "/to_out.0/", "/attn2/to_k/", "/attn2/to_v/"]
CANDIDATES = {  # fp32 keep lists (substrings of node names) tried as the default static scheme
    "fp32: every MatMul (convs int8 only)": {"keep": ["MatMul"]},
    "fp32: attn2": {"keep": ["/attn2/"]},
    "fp32: raw-input layers (conv_shortcut, proj_out, samplers, ff.net.2, to_out, attn2 to_k/to_v)": {"keep": RAW},
    "fp32: last up block": {"keep": ["up_blocks.2/"]},
    "fp32: conv_shortcut, proj_out, ff.net.2, last up block": {"keep": ["/conv_shortcut/", "/proj_out/", "/ff/net.2/", "up_blocks.2/"]},
    "fp32: raw-input layers but samplers, last up block": {"keep": [r for r in RAW if r != "samplers."] + ["up_blocks.2/"]},
    "fp32: raw-input layers, last up block (the new default)": {"keep": RAW + ["up_blocks.2/"]},
    "fp32: raw-input layers, first down + last up block": {"keep": RAW + ["up_blocks.2/", "down_blocks.0/"]},
}


def _matches(name: str, pattern) -> bool:
    return any(p in name for p in ((pattern,) if isinstance(pattern, str) else pattern))


def quantize(src: Path, dst: Path, nodes: list, calibration, conv_form: str = "gemm", **kw) -> None:
    """sdrt's static QDQ quantisation of `nodes`, with the quantised convs in `conv_form`: "gemm" (im2col + int8
    GEMM, float output: every conv of the SD 1.5 UNet and the built-in model's since graph revision 11) or
    "qlinearconv" (int8 output, as before it)."""
    import onnx

    from sdrt.export.int8 import _static
    from sdrt.export.int8_conv_gemm import convs_as_int8_gemm

    _static(src, dst, nodes, calibration, False, **kw)
    if conv_form == "gemm":
        model = onnx.load(str(dst))
        if convs_as_int8_gemm(model):
            onnx.save(model, str(dst))


class Sweep:
    def __init__(self, work: Path, threads: int, smooth: float | None = None, conv_form: str = "gemm"):
        from sdrt.builtin import builtin_model_dir
        from sdrt.export.int8 import _write_named, fp32_nodes
        from sdrt.export.int8_quality import default_prompts, record_unet_feeds

        import onnx

        self.work, self.threads, self.conv_form = work, threads, conv_form
        self.fp32 = builtin_model_dir()
        self.named = work / "named.onnx"
        _write_named(self.fp32 / "unet" / "model.onnx", self.named, False)
        self.nodes, _ = fp32_nodes(onnx.load(str(self.named)))
        t0 = time.perf_counter()
        self.calibration = record_unet_feeds(self.fp32, default_prompts(True), 64, 20, 7.5, limit=64, threads=threads)
        self.cache = work / "calibration.json"
        # Held-out UNet inputs (other prompts and seeds than calibration's) for the per-call error.
        held = [f"a {c} {d}" for d, c in zip(range(10), ["white", "black", "orange", "purple", "green"] * 2)]
        self.heldout = record_unet_feeds(self.fp32, held, 64, 20, 7.5, seed=100, limit=40, threads=threads)
        self.heldout_ref = self._guided(self.fp32 / "unet" / "model.onnx")
        self.ref, self.ref_read = self._images(self.fp32)
        if smooth is not None:  # every layer's input smoothed (sdrt.export.int8_smooth); its own calibration cache
            from sdrt.export.int8 import write_smoothed

            smoothed = work / "smoothed.onnx"
            print(f"smoothed {write_smoothed(self.named, smoothed, self.nodes, self.calibration, smooth, False)} layers", flush=True)
            self.named, self.cache = smoothed, work / "calibration-smoothed.json"
        print(f"calibration feeds and fp32 images in {time.perf_counter() - t0:.1f} s; {len(self.nodes)} nodes", flush=True)

    def _images(self, folder):
        from sdrt.export.int8_quality import ORACLE_GUIDANCE, ORACLE_PAIRS, ORACLE_STEPS, generate, to_uint8
        from sdrt.oracle import DigitOracle

        texts = [f"a {c} {d}" for d, c in ORACLE_PAIRS]
        images = to_uint8(generate(folder, texts, 64, ORACLE_STEPS, ORACLE_GUIDANCE, 0, self.threads)[0])
        read = DigitOracle.load().classify(images)
        digit = float(np.mean([r[0] == d for r, (d, _) in zip(read, ORACLE_PAIRS)]))
        colour = float(np.mean([r[1] == c for r, (_, c) in zip(read, ORACLE_PAIRS)]))
        return images, {"digit": digit, "colour": colour}

    def _guided(self, path) -> list:
        """The guided noise prediction (uncond + 7.5 (cond - uncond)) of each held-out call: what the sampler steps by."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        out = []
        for feeds in self.heldout:
            eps = session.run(None, feeds)[0]
            out.append(eps[0] + 7.5 * (eps[1] - eps[0]))
        return out

    def call_error(self, path) -> float:
        """Relative RMS error of the guided noise prediction against fp32's over the held-out calls."""
        got = self._guided(path)
        num = sum(float(np.sum((a - b) ** 2)) for a, b in zip(got, self.heldout_ref))
        return float(np.sqrt(num / sum(float(np.sum(b ** 2)) for b in self.heldout_ref)))

    def layer_errors(self, out: Path) -> dict:
        """The guided-call error with one layer int8 and the rest fp32, for every layer (errors add in quadrature,
        int8-sensitivity.md): {node: error}, written to `out` as it goes (JSON)."""
        errors = {}
        dst = self.work / "one.onnx"
        for i, node in enumerate(self.nodes):
            quantize(self.named, dst, [node], self.calibration, self.conv_form, cache=self.cache)
            errors[node] = self.call_error(dst)
            print(f"{i + 1}/{len(self.nodes)} {node} {errors[node]:.3e}", flush=True)
            out.write_text(json.dumps(errors, indent=1))
        return errors

    def run(self, label: str, nodes: list[str], scheme: str = "static", **options) -> dict:
        from sdrt.export.int8 import _weight_only, psnr

        folder = self.work / "variant"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(self.fp32, folder, ignore=shutil.ignore_patterns(".ort_cache"))
        dst = folder / "unet" / "model.onnx"
        t0 = time.perf_counter()
        method = options.pop("method", "MinMax")
        cache = self.cache if method == "MinMax" else self.work / f"calibration-{method}.json"
        if scheme == "weight-only":
            _weight_only(self.named, dst, nodes, False)
        else:
            quantize(self.named, dst, nodes, self.calibration, self.conv_form, cache=cache, extra=options, method=method,
                     activation="s8" if scheme == "static-s8" else "u8")
        seconds = time.perf_counter() - t0
        from sdrt.model.manifest import read_manifest

        manifest = read_manifest(self.fp32)
        manifest.files = {}
        manifest.record_files(folder, [str(f.relative_to(folder)) for f in sorted(folder.rglob("*"))
                                       if f.is_file() and f.name != "manifest.json"])
        manifest.write(folder)
        call_error = self.call_error(dst)
        images, read = self._images(folder)
        per_image = [psnr(a, b) for a, b in zip(images, self.ref)]
        row = {"variant": label, "scheme": scheme, "options": {k: v for k, v in options.items()}, "method": method,
               "quantized_nodes": len(nodes), "conv_form": self.conv_form, "call_rel_error": call_error, "psnr_db": psnr(images, self.ref), "psnr_min_db": min(per_image),
               "oracle": read, "quantize_s": seconds}
        print(json.dumps(row), flush=True)
        return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="results path without suffix (.json and .md are written)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--smooth", type=float, default=None, help="smooth every layer's input first with this alpha")
    p.add_argument("--custom", default=None, help="JSON {label: {keep: [substrings], options: {...}}} for the part 'custom'")
    p.add_argument("--parts", default="all,options,only-block,without-block,only-kind,without-kind,candidates",
                   help="also: one-layer (each layer alone int8: the errors int8_keep_search.py ranks), custom")
    p.add_argument("--conv-form", default="gemm", choices=("gemm", "qlinearconv"),
                   help="quantised convs as the int8 GEMM (float output; the export's form since graph revision 11) or QLinearConv")
    args = p.parse_args(argv)
    from sdrt.export.int8 import KEEP_RULES, sensitive_nodes

    parts = set(args.parts.split(","))
    work = Path(tempfile.mkdtemp(prefix="int8-sensitivity-"))
    rows = []
    try:
        s = Sweep(work, args.threads, args.smooth, args.conv_form)
        rows.append({"variant": "fp32", "oracle": s.ref_read, "quantized_nodes": 0})
        nodes = s.nodes
        if "one-layer" in parts:
            s.layer_errors(Path(args.out).with_name(Path(args.out).name + "-layers.json"))
        if "all" in parts:
            rows.append(s.run("static, all", nodes))
        if "only-block" in parts:
            for b in BLOCKS:
                rows.append(s.run(f"only {b} int8", [n for n in nodes if b in n]))
        if "without-block" in parts:
            for b in BLOCKS:
                rows.append(s.run(f"all but {b} int8", [n for n in nodes if b not in n]))
        if "only-kind" in parts:
            for k, pat in KINDS.items():
                rows.append(s.run(f"only {k} int8", [n for n in nodes if _matches(n, pat)]))
        if "without-kind" in parts:
            for k, pat in KINDS.items():
                rows.append(s.run(f"all but {k} int8", [n for n in nodes if not _matches(n, pat)]))
        if "options" in parts:
            rows.append(s.run("all, conv/matmul outputs not quantised", nodes,
                              OpTypesToExcludeOutputQuantization=["Conv", "MatMul"]))
            rows.append(s.run("all, Entropy calibration", nodes, method="Entropy"))
            rows.append(s.run("all, Percentile calibration (99.999)", nodes, method="Percentile"))
        if "candidates" in parts or "custom" in parts:
            specs = CANDIDATES if "candidates" in parts else json.loads(Path(args.custom).read_text())
            for label, spec in specs.items():
                drop = spec.get("keep", [])
                kept = set(sensitive_nodes(nodes, KEEP_RULES[spec["rule"]])) if spec.get("rule") else set()
                rows.append(s.run(label, [n for n in nodes if not any(d in n for d in drop) and n not in kept],
                                  scheme=spec.get("scheme", "static"), **spec.get("options", {})))
    finally:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
        out.with_suffix(".md").write_text(markdown(rows))
        shutil.rmtree(work, ignore_errors=True)
    print(markdown(rows))
    return 0


def markdown(rows) -> str:
    lines = ["| variant | nodes int8 | guided UNet call rel. error | digit % | colour % | PSNR vs fp32 (dB) | worst image (dB) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        o = r["oracle"]
        if r["variant"] == "fp32":
            lines.append(f"| fp32 | 0 | | {o['digit'] * 100:.0f} | {o['colour'] * 100:.0f} | | |")
            continue
        lines.append(f"| {r['variant']} | {r['quantized_nodes']} | {r['call_rel_error']:.2e} | {o['digit'] * 100:.0f} | {o['colour'] * 100:.0f} | "
                     f"{r['psnr_db']:.1f} | {r['psnr_min_db']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
