"""int8 exports (issue 22): the quantised UNet is what the runtime loads unchanged, its images stay close to fp32's,
and `sdrt export --int8` records what it did and measured.

Tolerances: int8 rounds every quantised Conv/MatMul input and weight to 1/255 of its range, and 20 guided steps
amplify that; benchmarks/results/int8-schemes.md measured 24-33 dB PSNR and unchanged oracle accuracy on the built-in
model across schemes. The bars below sit well under those figures (so they catch a broken graph, not noise) and
well above what an unrelated image gives (~10 dB).
"""

import json

import numpy as np
import pytest

import sdrt
from sdrt.cli import main
from sdrt.errors import InputError

DIGIT_PROMPTS = [f"a {c} {d}" for d, c in zip(range(10), ["red", "green", "blue", "yellow", "purple"] * 2)]


@pytest.fixture(scope="module")
def builtin_int8(tmp_path_factory):
    """The built-in export with its UNet quantised by the default (static) scheme, calibrated on 3 prompts."""
    from sdrt.builtin import builtin_model_dir
    from sdrt.export.int8 import quantize_export
    from sdrt.export.int8_quality import record_unet_feeds

    feeds = record_unet_feeds(builtin_model_dir(), DIGIT_PROMPTS[:3], 64, 6, 7.5, limit=16, threads=1)
    out = tmp_path_factory.mktemp("int8") / "digits"
    stats = quantize_export(builtin_model_dir(), out, "static", ("unet",), {"unet": feeds})
    return out, stats


def _images(folder, prompts):
    pipe = sdrt.Pipeline.from_pretrained(folder, backend="onnx", threads=1)
    return pipe(prompts, num_inference_steps=20, guidance_scale=7.5, seed=0, output_type="np", progress=False).images


def test_int8_unet_runs_unchanged_and_draws_the_prompt(builtin_int8):
    from sdrt.builtin import builtin_model_dir
    from sdrt.export.int8 import psnr
    from sdrt.oracle import DigitOracle

    folder, stats = builtin_int8
    pipe = sdrt.Pipeline.from_pretrained(folder, backend="onnx", threads=1)
    assert pipe.backend.precision("unet") == "int8"
    assert stats["unet"]["quantized"].get("QuantizeLinear", 0) > 50
    got, ref = _images(folder, DIGIT_PROMPTS), _images(builtin_model_dir(), DIGIT_PROMPTS)
    assert psnr(got, ref) > 20.0, psnr(got, ref)
    read = DigitOracle.load().classify(got)
    assert np.mean([r[0] == i for i, r in enumerate(read)]) >= 0.8, read


def test_fp32_nodes_keep_first_last_conv_and_attention_scores(builtin_int8):
    import onnx

    from sdrt.builtin import builtin_model_dir
    from sdrt.export.int8 import fp32_nodes

    model = onnx.load(str(builtin_model_dir() / "unet" / "model.onnx"), load_external_data=False)
    quantize, keep = fp32_nodes(model)
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    assert convs[0] in keep and convs[-1] in keep and convs[1] in quantize
    inits = {i.name for i in model.graph.initializer}
    scores = [n.name for n in model.graph.node if n.op_type == "MatMul" and not set(n.input) & inits]
    assert scores and set(scores) <= set(keep)
    assert not any(n.op_type == "Gemm" and n.name in quantize for n in model.graph.node)  # time embedding stays fp32


def test_cli_int8_export_records_scheme_and_quality(tiny_sd1, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\n\na blue dog\n")
    out = tmp_path / "int8"
    code = main(["export", str(tiny_sd1), str(out), "--int8", "--int8-scheme", "dynamic-matmul", "--calibration-prompts",
                 str(prompts), "--int8-networks", "unet,text_encoder,vae_decoder",
                 "--min-size", "32", "--opt-size", "64", "--max-size", "64", "--max-batch", "2", "--no-check", "-q"])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    nets = manifest["networks"]
    assert {n: (nets[n]["precision"], nets[n].get("int8_scheme")) for n in nets} == {
        "unet": ("int8", "dynamic-matmul"), "text_encoder": ("int8", "dynamic-matmul"),
        "vae_decoder": ("int8", "static-all"), "vae_encoder": ("fp32", None)}
    record = manifest["extras"]["int8"]
    assert record["scheme"] == "dynamic-matmul" and record["calibration"]["prompts"] == 2
    assert record["calibration"]["calls"] == {"vae_decoder": 2}  # the only static network: one decode per prompt
    q = record["quality"]
    assert q["prompts"] == 2 and q["size"] == 32 and q["psnr_db"] > 20 and "oracle" not in q  # not the built-in model
    assert q["decode_psnr_db"] > 25
    assert json.loads((out / "int8_quality.json").read_text())["quality"]["psnr_db"] == q["psnr_db"]
    assert not list(tmp_path.glob(".int8.*"))  # the fp32 reference and partial folders are gone
    # the UNet's transformer blocks in ORT's CPU forms (sdrt.export.attention, sdrt.export.geglu): GEGLU split in
    # every block; at a 64 px opt size no self-attention reaches MIN_TOKENS, so none is fused
    assert manifest["extras"]["cpu_transformers"]["unet"]["split_geglus"] > 0
    assert manifest["extras"]["cpu_transformers"]["unet"]["fused_attentions"] == 0
    capsys.readouterr()
    assert main(["info", str(out), "--verify"]) == 0
    text = capsys.readouterr().out
    assert "(int8," in text and "unet (dynamic-matmul" in text and "vae_decoder (static-all; convs: " in text and "PSNR" in text
    from sdrt.cpu import int8_weight_bits

    assert ("unet (dynamic-matmul; 7-bit weights)" in text) == (int8_weight_bits() == 7)  # this CPU's range, said
    assert "vae decode PSNR" in text


def test_int8_bad_input_is_refused_before_work(tiny_sd1, tmp_path, capsys):
    from sdrt.export.int8_export import export_int8
    from sdrt.export.int8_quality import read_prompts

    assert main(["export", str(tiny_sd1), str(tmp_path / "a"), "--int8-scheme", "static"]) == 2
    assert "add --int8" in capsys.readouterr().err
    with pytest.raises(InputError, match="not one of"):
        export_int8(tiny_sd1, tmp_path / "b", scheme="int4")
    with pytest.raises(InputError, match="drop --fp16"):
        export_int8(tiny_sd1, tmp_path / "c", fp16=True)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(InputError, match="no prompts"):
        read_prompts(empty)
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_calibration_ranges_cover_every_call(tmp_path):
    """Every recorded call counts, in whichever chunk it falls (ONNX Runtime 1.32's own chunking kept only the calls
    after the last full chunk): the largest input sits in the first call, the smallest in the last."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.calibrate import load_tensors_data

    from sdrt.export.int8 import CALIBRATION_CHUNK, calibrate

    w = numpy_helper.from_array(np.ones((2, 1, 1, 1), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 2, 2])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "m.onnx"))
    n = 3 * CALIBRATION_CHUNK + 1
    feeds = [{"x": np.full((1, 1, 2, 2), 1.0, np.float32)} for _ in range(n)]
    feeds[0]["x"][:] = 50.0
    feeds[-1]["x"][:] = -7.0
    calibrate(tmp_path / "m.onnx", feeds, tmp_path / "cal.json")
    lo, hi = load_tensors_data(tmp_path / "cal.json").data["x"].range_value
    assert np.ravel(hi)[0] == 50.0 and np.ravel(lo)[0] == -7.0


def test_keep_rules_by_role_and_resolution_level():
    """static keeps the sensitive roles and ff.net.0 at full resolution (first down / last up block), a few at the next
    level, and the last up block's resnet convs; static-wide (the first default) the raw-input roles everywhere and the whole last up block. The
    level comes from the block index, so the rule reads a UNet with 4 up blocks as it reads the built-in one's 3."""
    from sdrt.export.int8 import KEEP_RULES, resolution_levels, sensitive_nodes

    names = ["/unet/down_blocks.0/resnets.0/conv1/Conv",  # 0: level 0, normalised input
             "/unet/down_blocks.1/resnets.0/conv_shortcut/Conv",  # 1: level 1 shortcut
             "/unet/up_blocks.1/attentions.0/transformer_blocks.0/ff/net.2/MatMul",  # 2: level 2
             "/unet/up_blocks.1/attentions.0/transformer_blocks.0/attn2/to_k/MatMul",  # 3: level 2, text input
             "/unet/up_blocks.1/attentions.0/transformer_blocks.0/attn2/to_q/MatMul",  # 4
             "/unet/up_blocks.1/upsamplers.0/Conv_1",  # 5: level 2 upsampler
             "/unet/up_blocks.3/resnets.2/conv2/Conv",  # 6: last up block's conv2
             "/unet/mid_block/attentions.0/proj_out/Conv",  # 7: mid block, no level
             "/unet/up_blocks.2/resnets.0/conv1/Conv",  # 8: level 1 conv1
             "/unet/up_blocks.3/attentions.0/proj_in/Conv",  # 9: level 0 proj_in
             "/unet/down_blocks.0/downsamplers.0/conv/Conv",  # 10: level 0 downsampler
             "/unet/up_blocks.2/attentions.1/proj_out/Conv",  # 11: level 1 proj_out
             "/unet/up_blocks.3/resnets.0/conv1/Conv",  # 12: last up block's conv1
             "/unet/up_blocks.2/attentions.0/transformer_blocks.0/attn1/to_out.0/MatMul",  # 13: level 1 to_out
             "/unet/down_blocks.0/attentions.0/transformer_blocks.0/attn1/to_out.0/MatMul",  # 14: level 0 to_out
             "/unet/down_blocks.1/attentions.0/proj_out/Conv",  # 15: down level 1 proj_out (kept only on the up side)
             "/unet/up_blocks.3/attentions.0/transformer_blocks.0/ff/net.0/proj/MatMul",  # 16: last up block's ff.net.0
             "/unet/down_blocks.0/attentions.0/transformer_blocks.0/ff/net.0/proj/MatMul",  # 17: first down's ff.net.0
             "/unet/up_blocks.2/upsamplers.0/Conv_3"]  # 18: level 1 upsampler
    levels = resolution_levels(names)
    assert levels[names[0]] == ("down", 0) and levels[names[6]] == ("up", 0) and levels[names[8]] == ("up", 1)
    assert levels[names[2]] == ("up", 2) and names[7] not in levels
    assert sensitive_nodes(names) == [names[i] for i in (1, 6, 9, 10, 11, 12, 14, 16, 17, 18)]
    assert sensitive_nodes(names, KEEP_RULES["static"]) == sensitive_nodes(names)
    wide = sensitive_nodes(names, KEEP_RULES["static-wide"])
    assert wide == [names[i] for i in (1, 2, 3, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 18)]
    # Three up blocks (the built-in model): up_blocks.2 is the last, at level 0.
    three = ["/unet/up_blocks.2/resnets.1/conv_shortcut/Conv", "/unet/up_blocks.2/resnets.1/conv1/Conv",
             "/unet/up_blocks.1/resnets.1/conv2/Conv", "/unet/up_blocks.0/resnets.0/conv_shortcut/Conv"]
    assert sensitive_nodes(three) == three[:2]


def test_static_schemes_keep_what_their_rule_says(builtin_int8, tmp_path):
    """The default export keeps exactly its rule's layers (plus fp32_nodes') fp32; static-all keeps only fp32_nodes'."""
    import onnx

    from sdrt.builtin import builtin_model_dir
    from sdrt.export.int8 import _write_named, fp32_nodes, sensitive_nodes

    _, stats = builtin_int8
    _write_named(builtin_model_dir() / "unet" / "model.onnx", tmp_path / "named.onnx", False)
    quantize, always = fp32_nodes(onnx.load(str(tmp_path / "named.onnx")))
    rule = sensitive_nodes(quantize)
    assert 10 < len(rule) < len(quantize) / 2
    assert sorted(stats["unet"]["kept_fp32"]) == sorted(always + rule)


def test_static_s8_is_asymmetric(tmp_path):
    """static-s8 quantises activations to int8 with a zero point (the range's own min and max), not a range centred
    on zero: a non-negative input keeps all 256 levels."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from sdrt.export.int8 import quantize_network

    w = numpy_helper.from_array(np.ones((2, 1, 1, 1), np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], name="conv0"), helper.make_node("Conv", ["h", "w2"], ["y"], name="conv1"),
             helper.make_node("Conv", ["y", "w3"], ["z"], name="conv2")]
    w2 = numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "w2")
    w3 = numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "w3")
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 2, 2, 2])], [w, w2, w3])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    feeds = [{"x": np.full((1, 1, 2, 2), v, np.float32)} for v in (0.0, 1.0, 2.0)]
    quantize_network(tmp_path / "m.onnx", tmp_path / "q.onnx", "static-s8", feeds)
    q = onnx.load(str(tmp_path / "q.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    ql = [n for n in q.graph.node if n.op_type == "QuantizeLinear"]
    assert ql and all(inits[n.input[2]].dtype == np.int8 for n in ql)
    h = [n for n in ql if n.input[0] == "h"][0]  # conv1's input: 0..2, non-negative
    assert inits[h.input[2]] == -128 and abs(float(inits[h.input[1]]) - 2.0 / 255) < 1e-6


def test_quantised_matmuls_keep_float_outputs(tmp_path):
    """Static schemes leave a quantised MatMul's or Conv's output float (no QuantizeLinear after it): ONNX Runtime
    runs MatMulIntegerToFloat rather than QLinearMatMul plus an output rounding, and the conv is rewritten as an int8
    GEMM with a float output (sdrt.export.int8_conv_gemm) rather than run as QLinearConv."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from sdrt.export.int8 import quantize_network

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("c0", (8, 3, 3, 3)), ("c1", (8, 8, 3, 3)), ("m0", (16, 16)), ("m1", (16, 16)), ("c2", (8, 8, 3, 3)))]
    nodes = [helper.make_node("Conv", ["x", "c0"], ["a"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["a", "c1"], ["b"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["b"], ["b2"], name="relu0"),
             helper.make_node("Reshape", ["b2", "shape"], ["r"], name="reshape"),
             helper.make_node("MatMul", ["r", "m0"], ["h"], name="mm0"),
             helper.make_node("Sigmoid", ["h"], ["h2"], name="sigmoid"),
             helper.make_node("MatMul", ["h2", "m1"], ["k"], name="mm1"),
             helper.make_node("Reshape", ["k", "back"], ["s"], name="back"),
             helper.make_node("Conv", ["s", "c2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    inits += [numpy_helper.from_array(np.array([1, 8, 16], np.int64), "shape"),
              numpy_helper.from_array(np.array([1, 8, 4, 4], np.int64), "back")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 4, 4])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    feeds = [{"x": rng.standard_normal((1, 3, 4, 4)).astype(np.float32)} for _ in range(3)]
    stats = quantize_network(tmp_path / "m.onnx", tmp_path / "q.onnx", "static-all", feeds)
    assert sorted(stats.kept_fp32) == ["conv0", "conv2"]  # first and last conv
    from sdrt.cpu import int8_weight_bits

    assert stats.weight_bits == int8_weight_bits()  # 7 on a CPU whose u8s8 kernels saturate: else 27% off on AVX2
    q = onnx.load(str(tmp_path / "q.onnx"))
    consumers = {}
    for n in q.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n.op_type)
    outputs = {n.name: n.output[0] for n in q.graph.node}
    assert consumers[outputs["mm0"]] == ["Sigmoid"] and consumers[outputs["mm1"]] == ["Reshape"]
    assert consumers["b"] == ["Relu"] and "conv1" not in outputs and outputs["conv1/to_nchw"] == "b"
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(tmp_path / "q.onnx"), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert ops.count("MatMulIntegerToFloat") == 3 and "QLinearMatMul" not in ops and "QLinearConv" not in ops
    ref = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds[0])[0]
    got = session.run(None, feeds[0])[0]
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()  # int8: a few % of the range, not a broken graph


def test_smoothing_is_exact_in_fp32(tmp_path):
    """write_smoothed (SmoothQuant-style per-channel input scaling, measured in int8-sensitivity.md) divides each
    smoothed layer's input by s and multiplies its weights by s: the fp32 UNet computes the same noise prediction
    (float rounding only), with a Mul in front of every group of layers that read one tensor."""
    import onnx
    import onnxruntime as ort

    from sdrt.builtin import builtin_model_dir
    from sdrt.contracts import ShapeLimits
    from sdrt.export.int8 import _write_named, fp32_nodes, write_smoothed
    from sdrt.model.manifest import read_manifest

    manifest = read_manifest(builtin_model_dir())
    dims = ShapeLimits(min_size=64, opt_size=64, max_size=64).dims(manifest.facts, "opt")
    feeds = [manifest.contracts["unet"].sample_inputs(dims, seed) for seed in (0, 1)]
    _write_named(builtin_model_dir() / "unet" / "model.onnx", tmp_path / "named.onnx", False)
    nodes, _ = fp32_nodes(onnx.load(str(tmp_path / "named.onnx")))
    done = write_smoothed(tmp_path / "named.onnx", tmp_path / "smooth.onnx", nodes, feeds, 0.5, False)
    assert done == len(nodes)
    muls = [n for n in onnx.load(str(tmp_path / "smooth.onnx")).graph.node if n.name.endswith("_smooth")]
    assert 0 < len(muls) < len(nodes)  # q/k/v (and to_k/to_v) share one
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds[0])[0]
    ref, got = run(tmp_path / "named.onnx"), run(tmp_path / "smooth.onnx")
    assert np.abs(got - ref).max() < 1e-4 * np.abs(ref).max(), np.abs(got - ref).max()


def test_int8_export_gives_winograd_to_the_kept_fp32_layers_only():
    """An int8 export with --winograd rewrites only the 3x3 convs its scheme keeps fp32 (int8 cannot follow Winograd's
    transforms): kept_modules reads the keep rule on the module paths as the exporter names their scopes, and
    graph_rewrites(only=...) leaves every other conv direct."""
    import torch

    from sdrt.export.int8 import kept_modules
    from sdrt.export.rewrites import graph_rewrites

    def block(channels):
        b, r = torch.nn.Module(), torch.nn.Module()
        r.conv1, r.conv2 = torch.nn.Conv2d(channels, 128, 3, padding=1), torch.nn.Conv2d(128, 128, 3, padding=1)
        b.resnets = torch.nn.ModuleList([r])
        return b

    unet = torch.nn.Module()
    unet.down_blocks = torch.nn.ModuleList([block(256), block(128)])
    unet.up_blocks = torch.nn.ModuleList([block(256), block(256)])  # up_blocks.1: the last, level 0
    last = unet.up_blocks[1].resnets[0]
    assert kept_modules(unet, "static") == {last.conv1, last.conv2}  # the last up block's resnet convs
    assert kept_modules(unet, "static-all") == set()
    seq = torch.nn.Sequential(torch.nn.Conv2d(256, 128, 3, padding=1), torch.nn.Conv2d(128, 256, 3, padding=1))
    x = torch.randn(1, 256, 16, 16)
    with torch.no_grad():
        ref = seq(x)
        with graph_rewrites(seq, (x,), winograd=True, only={seq[1]}) as counts:
            assert counts["winograd_convs"] == 1 and "forward" in vars(seq[1]) and "forward" not in vars(seq[0])
            got = seq(x)
        with graph_rewrites(seq, (x,), winograd=True) as counts:
            assert counts["winograd_convs"] == 2
    assert (got - ref).abs().max() < 1e-4 * ref.abs().max()


def test_named_copy_of_a_big_graph_reads_ort_weights_in_place(tmp_path):
    """For a big graph _write_named names the nodes of ORT's constant-folded copy and lets it read folded.data where it
    lies (no second copy of the weights: 3.5 GB of disk on SD 1.5), and the result computes what the source does."""
    import onnx
    import onnxruntime as ort

    from sdrt.builtin import builtin_model_dir
    from sdrt.contracts import ShapeLimits
    from sdrt.export.int8 import _write_named
    from sdrt.model.manifest import read_manifest

    src = builtin_model_dir() / "unet" / "model.onnx"
    _write_named(src, tmp_path / "named.onnx", True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folded.data", "named.onnx"]
    model = onnx.load(str(tmp_path / "named.onnx"), load_external_data=False)
    assert all(n.name for n in model.graph.node) and any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    manifest = read_manifest(builtin_model_dir())
    feeds = manifest.contracts["unet"].sample_inputs(ShapeLimits(min_size=64, opt_size=64, max_size=64).dims(manifest.facts, "opt"))
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    ref, got = run(src), run(tmp_path / "named.onnx")
    assert np.abs(got - ref).max() < 1e-4 * np.abs(ref).max()


def test_int8_networks_count_at_fp32_width_for_the_small_network_rule(builtin_int8, monkeypatch):
    """The one-thread rule for small networks goes by weights at fp32 width: an int8 network's bytes count 4x (the SD
    1.5 int8 VAE decoder, 57 MB on disk, ran single-threaded at 1.41 s instead of ~0.8 s by its raw size)."""
    import sdrt.backends.onnx_sessions as sessions

    folder, stats = builtin_int8
    unet_mb = stats["unet"]["bytes_after"] / 2**20
    monkeypatch.setattr(sessions, "SMALL_NETWORK_BYTES", int(2.5 * unet_mb * 2**20))  # over its raw size, under 4x
    pipe = sdrt.Pipeline.from_pretrained(folder, backend="onnx", threads=1)
    assert "unet" not in pipe.backend.small_networks and "vae_decoder" in pipe.backend.small_networks


def test_int8_unet_is_split_and_the_split_equals_the_whole(builtin_int8):
    """The int8 UNet gets its own step split (sdrt.export.step_split); its quantised K/V MatMuls go to the prepass."""
    import onnx

    from sdrt.backends.onnx_backend import OnnxBackend
    from sdrt.model.manifest import read_manifest

    folder, _ = builtin_int8
    manifest = read_manifest(folder)
    record = manifest.networks["unet"]["step_split"]
    prepass = onnx.load(str(folder / "unet" / record["prepass"]), load_external_data=False)
    assert {"MatMulInteger", "DynamicQuantizeLinear"} & {n.op_type for n in prepass.graph.node} or any(
        n.op_type == "QuantizeLinear" for n in prepass.graph.node)
    whole, split = (OnnxBackend(folder, manifest, threads=1, static_shapes=False, step_split=s) for s in (False, True))
    assert "unet" in split.splits
    feeds = manifest.contracts["unet"].sample_inputs({"unet_batch": 2, "latent_height": 8, "latent_width": 8})
    a, b = whole.run("unet", feeds)["out_sample"], split.run("unet", feeds)["out_sample"]
    assert np.abs(a - b).max() <= 1e-6 * max(1.0, np.abs(a).max())


def test_int8_weight_range_follows_the_cpu(tmp_path, monkeypatch):
    """x86 without VNNI/AMX: ONNX Runtime's u8s8 kernels add product pairs in a saturating int16, so the export
    halves the weights' range (7 bits); VNNI, AMX and ARM keep 8. Running an 8-bit export on such a CPU is said."""
    from types import SimpleNamespace

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    import sdrt.cpu
    from sdrt.backends.onnx_sessions import saturation_note
    from sdrt.export.int8 import quantize_network

    for machine, isa, bits in (("x86_64", "avx avx2 fma", 7), ("x86_64", "avx avx2 avx512f avx512_vnni", 8),
                               ("x86_64", "avx avx2 avx_vnni", 8), ("x86_64", "amx_tile amx_int8", 8), ("aarch64", "asimd", 8)):
        monkeypatch.setattr(sdrt.cpu.platform, "machine", lambda m=machine: m)
        monkeypatch.setattr(sdrt.cpu, "cpu_isa", lambda i=isa: i)
        assert sdrt.cpu.int8_weight_bits() == bits, (machine, isa)
    manifest = SimpleNamespace(networks={"unet": {}, "vae_decoder": {}}, extras={"int8": {"networks": {
        "unet": {"scheme": "static", "weight_bits": 8}, "vae_decoder": {"scheme": "static", "weight_bits": 7}}}})
    monkeypatch.setattr("sdrt.backends.onnx_sessions.int8_weight_bits", lambda: 8)
    assert saturation_note(manifest) is None
    monkeypatch.setattr("sdrt.backends.onnx_sessions.int8_weight_bits", lambda: 7)
    assert saturation_note(manifest).startswith("int8 unet quantised with 8-bit weights")  # not the 7-bit decoder
    manifest.extras["int8"]["networks"]["unet"]["weight_bits"] = 7
    assert saturation_note(manifest) is None
    # The weights themselves: 7 bits keep within [-64, 63], 8 bits use [-127, 127].
    rng = np.random.default_rng(0)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 32])],
                              [numpy_helper.from_array(rng.standard_normal((32, 32)).astype(np.float32), "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    feeds = [{"x": rng.standard_normal((4, 32)).astype(np.float32)} for _ in range(2)]
    for bits, top in ((7, 64), (8, 127)):
        stats = quantize_network(tmp_path / "m.onnx", tmp_path / f"q{bits}.onnx", "static-all", feeds, weight_bits=bits)
        q = onnx.load(str(tmp_path / f"q{bits}.onnx"))
        weights = [numpy_helper.to_array(t) for t in q.graph.initializer if t.data_type == TensorProto.INT8 and t.dims]
        assert stats.weight_bits == bits and weights and max(int(np.abs(w.astype(int)).max()) for w in weights) == top
