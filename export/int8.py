"""int8 quantisation of exported ONNX networks for ONNX Runtime on CPUs (`sdrt export --int8`).

    stats = quantize_network(src, dst, scheme="dynamic", calibration=None)

Schemes (ONNX Runtime's quantisation tools; see benchmarks/results/int8-schemes.md for what each cost in quality
and time on the built-in model):
- "dynamic": weights int8 per output channel, activations quantised per call from their own range
  (MatMulInteger / DynamicQuantizeMatMul, ConvInteger). No calibration; ranges always fit the input.
- "dynamic-matmul": the same for MatMuls only (attention projections and feed-forwards); convs stay fp32.
- "static-all": QDQ with activation ranges calibrated on UNet inputs recorded from the model's own sampling loop
  (sdrt.export.int8_quality), weights per channel; ORT fuses the Q/DQ pairs into QLinearConv for convs and, as
  quantised MatMuls keep a float output (FLOAT_OUTPUT_OPS), into MatMulIntegerToFloat for MatMuls.
- "static" (default): static-all with the layers int8 hurts most per multiply-add kept fp32 (KEEP_RULES: roles at
  full resolution, a few at the next level; ~29% of SD 1.5's multiply-adds). With `sdrt export --int8 --winograd`
  the kept 3x3 convs (and only those: kept_modules) are exported as Winograd convolutions.
- "static-wide": the first default: the raw-input roles everywhere and the whole last up block fp32 (44%).
- "static-s8": static-all with int8 (not uint8) activations, asymmetric; the same accuracy as static-all, and slower
  than uint8 on an SD 1.5-shape UNet call here (MLAS's u8s8 kernels are its fast ones on AVX-512 VNNI / AMX).

Measured and not used (benchmarks/results/int8-sensitivity.md, third pass): SmoothQuant-style per-channel input
scaling (write_smoothed, sdrt.export.int8_smooth) left the guided-call error where it was (static-all 0.277 -> 0.252,
`static` 0.039 -> 0.049 at alpha 0.5, worse at 0.8); ranking the keep list by time measured on SD 1.5 instead of by
multiply-adds gives the same frontier (the default sits on it); dynamic (per-call) ranges for the kept MatMuls
doubled their error.
- "weight-only": MatMul weights stored as 8-bit blocks (MatMulNBits, bits=8), dequantised in the kernel; convs fp32.

What stays fp32 whatever the scheme (`fp32_nodes`): the first and last conv (the latent <-> feature maps, where an
error lands directly in the output), every Gemm (the time embedding and the per-resnet time projections: 2-D, tiny,
and they set each block's scale), every norm, softmax and elementwise op (only Conv/MatMul are quantised), the
attention score MatMuls whose two inputs are both activations (Q.K^T and P.V: their ranges swing per step; inside ORT's
fused MultiHeadAttention where the export fused them, sdrt.export.attention), and convs
whose weight is computed in the graph rather than stored.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

import numpy as np

SCHEMES = ("mixed", "dynamic", "dynamic-matmul", "static", "static-wide", "static-all", "static-s8", "weight-only")
DEFAULT_SCHEME = "static"
STATIC_SCHEMES = ("static", "static-wide", "static-all", "static-s8", "mixed")  # the ones that need calibration

# Quantised MatMuls keep a float output: ONNX Runtime then fuses DequantizeLinear -> MatMul into MatMulIntegerToFloat
# (int8 GEMM, float result) instead of QLinearMatMul + an output QuantizeLinear/DequantizeLinear pair, which saves
# the output's rounding (guided-call error 0.039 -> 0.036 for `static` on the built-in model) and ~4% of an SD
# 1.5-shape UNet call (int8-sensitivity.md). Convs are quantised with their int8 output, which ORT needs to fuse
# QLinearConv; sdrt.export.int8_conv_gemm then rewrites the convs where an int8 GEMM is faster, with a float output.
FLOAT_OUTPUT_OPS = ["MatMul"]

# Layer roles, as the exporter names them (diffusers module paths): the layers whose input is an un-normalised stream,
# where one per-tensor int8 range must span channels of very different scales (ONNX Runtime's QLinearConv and
# QLinearMatMul take one activation scale): resnet shortcut convs (in up blocks their input is the concatenated skip
# connection), the transformers' proj_out (residual stream), attention to_out (attention output), the feed-forward's
# second Linear (GEGLU output), down/upsampler convs (the residual stream between blocks) and cross-attention
# to_k/to_v (the text encoder's states with their outlier channels).
RAW_INPUT_LAYERS = ("/conv_shortcut/", "/proj_out/", "samplers.", "/ff/net.2/", "/to_out.0/", "/attn2/to_k/", "/attn2/to_v/")


@dataclasses.dataclass(frozen=True)
class KeepRule:
    """Which quantisable layers a static scheme keeps fp32, by role and resolution level, so that a rule found on one
    UNet applies to another of the same family (never by the node names of one model).

    Level: 0 for the first down block and the last up block (full latent resolution), 1 for the next pair, ...; the
    mid block has none. `groups` maps (side, level), side "down" or "up", to the roles (substrings of the node's
    scope) kept there; `everywhere`: roles kept wherever they are."""

    groups: dict = dataclasses.field(default_factory=dict)
    everywhere: tuple = ()


# "static" (default): the greedy mixed-precision search of benchmarks/int8_keep_search.py over the per-layer sweep on
# the built-in model (benchmarks/results/int8-sensitivity.md). The guided-call error of int8 adds up in quadrature
# layer by layer and concentrates at full resolution, in the raw-input roles plus proj_in (after a GroupNorm with
# per-channel gamma), ff.net.0 and the last up block's resnet convs; (side, level, role) groups, ranked by error^2
# saved per multiply-add of SD 1.5 at 256 px, taken until the error left is ~0.04: on the built-in model 0.28 -> 0.038
# guided-call error with 29% of SD 1.5's multiply-adds left fp32 (static-wide: 0.042 with 44%). At 0.06 (23%) the
# oracle's PSNR read 29.3-34.3 dB by calibration: too close to the 30 dB target. In the last up block only the
# attention q/k/v projections are int8.
_TOP = ("/conv_shortcut/", "/proj_in/", "/proj_out/", "/ff/net.2/", "/to_out.0/", "samplers.")
KEEP_RULES = {
    "static": KeepRule(groups={("down", 0): _TOP + ("/ff/net.0/",), ("up", 0): _TOP + ("/conv1/", "/conv2/", "/ff/net.0/"),
                               ("down", 1): ("/conv_shortcut/",),
                               ("up", 1): ("/conv_shortcut/", "/proj_in/", "/proj_out/", "/ff/net.2/", "samplers.")}),
    # The first default: the raw-input roles everywhere and the whole last up block (44% of SD 1.5's multiply-adds).
    "static-wide": KeepRule(groups={("up", 0): ("/",)}, everywhere=RAW_INPUT_LAYERS),
}


@dataclasses.dataclass
class QuantStats:
    scheme: str
    quantized: dict  # op type -> nodes quantised
    kept_fp32: list  # Conv/MatMul nodes left in fp32, by name
    bytes_before: int
    bytes_after: int
    conv_forms: dict = dataclasses.field(default_factory=dict)  # {"gemm": n, "qlinearconv": n, "by": how picked}
    weight_bits: int = 8  # 7: the weights' range halved for CPUs whose int8 kernels saturate (sdrt.cpu.int8_weight_bits)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def fp32_nodes(model) -> tuple[list[str], list[str]]:
    """(Conv/MatMul nodes to quantise, Conv/MatMul nodes kept fp32) by the rules in the module docstring."""
    graph = model.graph
    stored = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    inputs = {i.name for i in graph.input}
    outputs = {o.name for o in graph.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    first_last = set()
    if convs:
        first_last = {convs[0].name, convs[-1].name}
        first_last |= {n.name for n in convs if n.input[0] in inputs or set(n.output) & outputs}
    quantize, keep = [], []
    for n in graph.node:
        if n.op_type not in ("Conv", "MatMul"):
            continue
        weight_stored = len(n.input) > 1 and n.input[1] in stored
        (keep if n.name in first_last or not weight_stored else quantize).append(n.name)
    return quantize, keep


def resolution_levels(names: list[str]) -> dict:
    """{node name: (side, level)} for the nodes in a down or up block (level 0: first down / last up block)."""
    import re

    ups = [int(m.group(1)) for n in names for m in [re.search(r"/up_blocks\.(\d+)/", n)] if m]
    last = max(ups) if ups else 0
    levels = {}
    for n in names:
        down, up = re.search(r"/down_blocks\.(\d+)/", n), re.search(r"/up_blocks\.(\d+)/", n)
        if down:
            levels[n] = ("down", int(down.group(1)))
        elif up:
            levels[n] = ("up", last - int(up.group(1)))
    return levels


def sensitive_nodes(names: list[str], rule: KeepRule = KEEP_RULES[DEFAULT_SCHEME]) -> list[str]:
    """Of the node `names`, those `rule` keeps fp32."""
    levels = resolution_levels(names)
    return [n for n in names if any(r in n for r in rule.everywhere + rule.groups.get(levels.get(n), ()))]


def kept_modules(module, scheme: str, prefix: str = "/unet/") -> set:
    """The submodules of the torch `module` whose layers `scheme`'s keep rule leaves fp32, found by the node scopes
    the exporter gives them (`prefix` + the module path, e.g. /unet/up_blocks.3/resnets.0/conv1/): an int8 export
    gives those (and only those) Winograd convolutions (sdrt.export.rewrites), which int8 cannot follow."""
    import re

    rule = KEEP_RULES.get(scheme)
    if rule is None:
        return set()
    scopes = {prefix + re.sub(r"\.(?!\d)", "/", name) + "/": m for name, m in module.named_modules() if name}
    return {scopes[n] for n in sensitive_nodes(list(scopes), rule)}


def quantize_network(src: Path, dst: Path, scheme: str = DEFAULT_SCHEME, calibration=None, keep=(), options=None,
                     conv_forms: dict | None = None, weight_bits: int | None = None) -> QuantStats:
    """Quantise the ONNX graph at `src` into `dst` (one file, or file + `.data` when over 2 GB).

    calibration: for "static", a list of feed dicts (the network's inputs, recorded from real sampling).
    conv_forms: how the static schemes pick each quantised conv's form (sdrt.export.int8_conv_gemm):
    {"dims": {dim_param: value} at the export's opt size, "picker": a sdrt.export.tactics.TacticPicker to time the
    forms on this machine, or None for the rule}; None: every conv as an int8 GEMM.
    weight_bits: 8, or 7 for a CPU whose u8s8 kernels saturate; None: this CPU's (sdrt.cpu.int8_weight_bits).
    """
    import onnx

    from sdrt.cpu import int8_weight_bits

    if scheme not in SCHEMES:
        from sdrt.errors import InputError

        raise InputError(f"int8 scheme {scheme!r} is not one of {', '.join(SCHEMES)}")
    src, dst = Path(src), Path(dst)
    weight_bits = weight_bits or int8_weight_bits()
    reduce = weight_bits == 7
    bytes_before = _bytes(src)
    big = bytes_before > 1_800_000_000
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".q-") as work:
        named = Path(work) / "named.onnx"
        _write_named(src, named, big)
        model = onnx.load(str(named), load_external_data=False)
        quantize, kept = fp32_nodes(model)
        extra = [n for n in quantize if any(k in n for k in keep)]
        if scheme in KEEP_RULES:
            extra += [n for n in sensitive_nodes(quantize, KEEP_RULES[scheme]) if n not in extra]
        keep = kept + extra
        quantize = [n for n in quantize if n not in extra]
        if scheme in ("dynamic-matmul", "weight-only"):
            conv = {n.name for n in model.graph.node if n.op_type == "Conv"}
            keep += [n for n in quantize if n in conv]
            quantize = [n for n in quantize if n not in conv]
        del model
        out = Path(work) / "quant.onnx"
        if scheme.startswith("dynamic"):
            _dynamic(named, out, quantize, big, reduce)
        elif scheme == "mixed":
            conv = {n.name for n in onnx.load(str(named), load_external_data=False).graph.node if n.op_type == "Conv"}
            mid = Path(work) / "convs.onnx"
            _static(named, mid, [n for n in quantize if n in conv], calibration, big, reduce=reduce, **(options or {}))
            _dynamic(mid, out, [n for n in quantize if n not in conv], big, reduce)
        elif scheme.startswith("static"):
            _static(named, out, quantize, calibration, big, activation="s8" if scheme == "static-s8" else "u8",
                    reduce=reduce, **(options or {}))
        else:
            _weight_only(named, out, quantize, big)
        result = onnx.load(str(out))
        if scheme in STATIC_SCHEMES:
            from sdrt.export.int8_conv_gemm import rewrite_convs

            forms = rewrite_convs(result, conv_forms)
        else:
            forms = {}
        for leftover in [dst, dst.with_name(dst.name + ".data")]:
            leftover.unlink(missing_ok=True)
        big_after = sum(len(t.raw_data) for t in result.graph.initializer) > 1_800_000_000
        if big_after:
            onnx.save_model(result, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=dst.name + ".data", size_threshold=1024)
        else:
            onnx.save_model(result, str(dst))
    counts: dict[str, int] = {}
    for n in result.graph.node:
        if n.op_type in QUANT_OPS:
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    integer = scheme != "weight-only"  # weight-only dequantises to float: no integer kernels to saturate
    return QuantStats(scheme, counts, keep, bytes_before, _bytes(dst), forms, weight_bits if integer else 8)


QUANT_OPS = ("MatMulInteger", "DynamicQuantizeMatMul", "ConvInteger", "QLinearConv", "QLinearMatMul",
             "MatMulIntegerToFloat", "QuantizeLinear", "DequantizeLinear", "MatMulNBits", "DynamicQuantizeLinear")


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).parent.iterdir() if p.name.startswith(Path(path).name))


def _name_unnamed(model) -> None:
    for i, n in enumerate(model.graph.node):
        if not n.name:
            n.name = f"{n.op_type}_{i}"


def _write_named(src: Path, dst: Path, big: bool) -> None:
    """A copy of `src`, constant-folded by ONNX Runtime's basic (standard-op) level so that weights computed in the
    graph (sdrt's sub-pixel upsamplers) become stored weights the quantisers see, with every node named (they select
    nodes by name) and its weights beside it (big: in ORT's folded.data, which `dst` then reads in place)."""
    import onnx
    import onnxruntime as ort

    folded = dst.with_name("folded.onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(folded)
    options.log_severity_level = 3
    if big:
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "folded.data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    model = onnx.load(str(folded), load_external_data=False)
    external = [t for t in model.graph.initializer if uses_external_data(t)]
    if big and all(any(e.key == "location" and e.value == "folded.data" for e in t.external_data) for t in external):
        # Every stored weight is in folded.data beside it: the named graph reads that file in place (a second copy
        # would be 3.5 GB more disk on SD 1.5).
        _name_unnamed(model)
        onnx.save_model(model, str(dst))
        folded.unlink()
        return
    # ORT writes the weights it left alone as they were: those read from a file beside `src` (a shared-weights
    # export's safetensors) still name it, relative to src's folder; the rest are in folded.data or inline.
    for t in model.graph.initializer:
        if uses_external_data(t):
            ours = any(e.key == "location" and e.value == "folded.data" for e in t.external_data)
            load_external_data_for_tensor(t, str(folded.parent if ours else src.parent))
            t.data_location = onnx.TensorProto.DEFAULT
            del t.external_data[:]
    _name_unnamed(model)
    if big:
        onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True, location="named.data")
    else:
        onnx.save_model(model, str(dst))
    for leftover in (folded, folded.with_name("folded.data")):  # read into `model` above
        leftover.unlink(missing_ok=True)


def write_smoothed(src: Path, dst: Path, nodes: list[str], calibration, alpha: float, big: bool) -> int:
    """`src` with the inputs of `nodes` smoothed (sdrt.export.int8_smooth; per-channel ranges from the calibration
    feeds) written to `dst`; returns the number of layers smoothed."""
    import onnx

    from sdrt.export.int8_smooth import channel_amax, smoothable, smooth_model

    if not calibration:
        from sdrt.errors import InputError

        raise InputError("smoothing needs calibration feeds (recorded UNet inputs); none were given")
    model = onnx.load(str(src), load_external_data=False)
    groups = smoothable(model, nodes)
    axes = {t: 1 if g[0].op_type == "Conv" else -1 for t, g in groups.items()}
    del model
    amax = channel_amax(src, axes, calibration)
    model = onnx.load(str(src))
    groups = smoothable(model, nodes)
    done = smooth_model(model, groups, amax, alpha)
    if big:
        onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=dst.stem + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(dst))
    return done


def _dynamic(src: Path, dst: Path, nodes: list[str], big: bool, reduce: bool = False) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), op_types_to_quantize=["Conv", "MatMul"], per_channel=True,
                     weight_type=QuantType.QInt8, nodes_to_quantize=nodes, use_external_data_format=big,
                     reduce_range=reduce, extra_options={"MatMulConstBOnly": True})


def _static(src: Path, dst: Path, nodes: list[str], calibration, big: bool, activation: str = "u8",
            method: str = "MinMax", cache: Path | None = None, extra: dict | None = None, reduce: bool = False) -> None:
    """Static QDQ quantisation of `nodes`; activation ranges from `calibration` (feed dicts), computed by
    calibrate() into `cache` (ONNX Runtime's calibration cache, reused when it exists). activation: "u8" or "s8"
    (int8 with a zero point: the same 256 levels over the same range; ActivationSymmetric, which the first static-s8
    used, centres the range on zero and so spends half the levels on values a post-SiLU input never takes)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    with tempfile.TemporaryDirectory(dir=Path(dst).parent, prefix=".calib-") as work:
        cache = Path(cache) if cache is not None else Path(work) / "calibration.json"
        if not cache.is_file():
            calibrate(src, calibration, cache, method, big)
        quantize_static(str(src), str(dst), None, quant_format=QuantFormat.QDQ, op_types_to_quantize=["Conv", "MatMul"],
                        per_channel=True, activation_type=QuantType.QInt8 if activation == "s8" else QuantType.QUInt8,
                        weight_type=QuantType.QInt8, nodes_to_quantize=nodes, use_external_data_format=big,
                        calibrate_method=_method(method), calibration_cache_path=str(cache), reduce_range=reduce,
                        extra_options={"MatMulConstBOnly": True, "ActivationSymmetric": False, "WeightSymmetric": True,
                                       "OpTypesToExcludeOutputQuantization": FLOAT_OUTPUT_OPS, **(extra or {})})


CALIBRATION_CHUNK = 2  # UNet calls run through the calibrator between range merges: bounded memory on SD 1.5


def calibrate(src: Path, calibration, cache: Path, method: str = "MinMax", big: bool = False) -> None:
    """Activation ranges of every Conv/MatMul tensor of `src` over the feed dicts in `calibration`, written to `cache`.

    The feeds go through in chunks of CALIBRATION_CHUNK, each merged into the running range (MinMax: min of mins, max
    of maxes). ONNX Runtime's own chunking (extra option CalibMaxIntermediateOutputs, 1.32) drops every full chunk
    without merging it, so only the calls after the last full chunk were ever calibrated: it is not used."""
    from onnxruntime.quantization.calibrate import (CalibrationDataReader, MinMaxCalibrater, create_calibrator,
                                                    save_tensors_data)

    if not calibration:
        from sdrt.errors import InputError

        raise InputError("the static int8 scheme needs calibration feeds (recorded UNet inputs); none were given")

    class Reader(CalibrationDataReader):
        def __init__(self, items):
            self.items = iter(items)

        def get_next(self):
            return next(self.items, None)

    with tempfile.TemporaryDirectory(dir=Path(cache).parent, prefix=".calibrator-") as work:
        augmented = str(Path(work) / "augmented.onnx")
        if method == "MinMax":
            # What create_calibrator does, less the fp32 model it keeps in memory beside the session (the calibrator
            # needs it only to write the augmented model): 3.4 GB on SD 1.5.
            calibrator = MinMaxCalibrater(Path(src), ["Conv", "MatMul"], augmented, use_external_data_format=big)
            calibrator.augment_graph()
            calibrator.model = None
            calibrator.create_inference_session()
        else:
            calibrator = create_calibrator(Path(src), ["Conv", "MatMul"], augmented_model_path=augmented,
                                           calibrate_method=_method(method), use_external_data_format=big)
        for start in range(0, len(calibration), CALIBRATION_CHUNK):
            calibrator.collect_data(Reader(calibration[start:start + CALIBRATION_CHUNK]))
        ranges = calibrator.compute_data()
        del calibrator
    save_tensors_data(ranges, cache)


def _method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    return getattr(CalibrationMethod, name)


def _weight_only(src: Path, dst: Path, nodes: list[str], big: bool) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src))
    q = MatMulNBitsQuantizer(model, bits=8, block_size=32, is_symmetric=True, accuracy_level=4,
                             nodes_to_include=nodes, op_types_to_quantize=("MatMul",))
    q.process()
    q.model.save_model_to_file(str(dst), use_external_data_format=big)


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """PSNR in dB of images `a` against `b` (same shape, values in [0, peak]); inf when identical."""
    err = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if err == 0 else float(10 * np.log10(peak * peak / err))


# The networks other than the UNet (issue 22, int8io): each with its own scheme, whatever the UNet's, and substrings
# of the node names it keeps fp32 (beside fp32_nodes' rules). Measured on the built-in model and timed on the SD 1.5
# shape in benchmarks/results/int8-schemes.md ("Other networks").
# - text_encoder: dynamic int8 MatMuls (DynamicQuantizeMatMul, weights per channel): no calibration, the ranges of the
#   text states (with their outlier channels) are taken per call; the attention scores stay fp32 (fp32_nodes).
# - vae_decoder / vae_encoder: static QDQ convs (QLinearConv: ConvInteger, the dynamic form, has no fast kernel),
#   calibrated on the decoder's own inputs (latents the sampling loop produced) or, for the encoder, on the images
#   decoded from them. fp32 stays: the first and last conv (fp32_nodes: post_quant_conv / quant_conv and the
#   decoder's conv_out), conv_in and conv_out (a few latent channels in or out: little to save, and the error lands in
#   the latents or the image) and the mid-block attention (one block at the lowest resolution) by `keep`.
_VAE_KEEP = ("/conv_in/", "/conv_out/", "/mid_block/attentions.")
OTHER_NETWORK_SCHEMES = {
    "text_encoder": ("dynamic-matmul", ()),
    "text_encoder_2": ("dynamic-matmul", ()),
    "vae_decoder": ("static-all", _VAE_KEEP),
    "vae_encoder": ("static-all", _VAE_KEEP),
}


def network_scheme(network: str, unet_scheme: str) -> tuple[str, tuple]:
    """(scheme, keep substrings) for `network` in an export whose UNet gets `unet_scheme`."""
    return OTHER_NETWORK_SCHEMES.get(network, (unet_scheme, ()))


def quantize_export(fp32_dir: Path, out_dir: Path, scheme: str, networks=("unet",), calibration=None,
                    conv_tactics: str = "rule", tactic_threads: int | None = None, tactic_cache_dir=None,
                    weight_bits: int | None = None) -> dict:
    """Copy the fp32 export at `fp32_dir` to `out_dir` with `networks` quantised (the UNet by `scheme`, the others by
    network_scheme); rewrites the manifest (each quantised network's precision "int8" and its scheme; extras["int8"]
    with the stats) and the file records. Returns {network: QuantStats dict}. `calibration`: {network: [feeds]} for
    the static schemes. conv_tactics "measure" times each quantised conv's two forms at the export's opt size
    (sdrt.export.int8_conv_gemm; cached as sdrt.export.tactics caches), "rule" takes int8_conv_gemm.rule_form."""
    from sdrt.contracts import ShapeLimits
    from sdrt.export.onnx_export import tactic_picker
    from sdrt.export.step_split import write_step_split
    from sdrt.model.manifest import read_manifest

    fp32_dir, out_dir = Path(fp32_dir), Path(out_dir)
    manifest = read_manifest(fp32_dir)
    replaced = {(fp32_dir / manifest.networks[n]["file"]).resolve() for n in networks}

    def ignore(folder, names):  # the ORT cache, and the fp32 graphs about to be replaced (3.4 GB on SD 1.5)
        return {".ort_cache"} | {name for name in names for f in replaced
                                 if Path(folder).resolve() == f.parent and name.startswith(f.name)}

    shutil.copytree(fp32_dir, out_dir, ignore=ignore)
    dims = ShapeLimits.from_dict(manifest.limits).dims(manifest.facts, "opt")
    conv_forms = {"dims": dims, "picker": tactic_picker(conv_tactics, tactic_threads, tactic_cache_dir)}
    stats = {}
    for name in networks:
        rel = manifest.networks[name]["file"]
        src = fp32_dir / rel
        dst = out_dir / rel
        for p in dst.parent.iterdir():
            if p.name.startswith(dst.name):
                p.unlink()
        net_scheme, keep = network_scheme(name, scheme)
        stats[name] = quantize_network(src, dst, net_scheme, (calibration or {}).get(name), keep,
                                       conv_forms=conv_forms, weight_bits=weight_bits).to_dict()
        manifest.networks[name] = {**manifest.networks[name], "precision": "int8", "int8_scheme": net_scheme}
        manifest.networks[name].pop("step_split", None)
        if name == "unet":  # the fp32 export's split graphs were copied: split the int8 UNet instead
            split = write_step_split(dst)
            if split:
                manifest.networks[name]["step_split"] = split
    manifest.extras["int8"] = {"scheme": scheme, "networks": stats, "onnxruntime": _ort_version()}
    manifest.files = {}
    files = sorted(p for p in out_dir.rglob("*") if p.is_file() and p.name != "manifest.json")
    manifest.record_files(out_dir, [str(p.relative_to(out_dir)) for p in files])
    manifest.write(out_dir)
    return stats


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
