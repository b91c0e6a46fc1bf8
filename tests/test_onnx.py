"""ONNX export and the ONNX Runtime backend, against PyTorch, on the tiny random-weight models.

Bounds (max|ONNX - PyTorch| <= bound * max|PyTorch|, per output): fp32 1e-4 (measured <= 3e-6), fp16 1e-2
(measured <= 3e-3). The exports are made at 64 px and batch 2; every comparison runs at other sizes and batches.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from conftest import TEST_LIMITS
from PIL import Image

import sdrt
from sdrt.backends.onnx_backend import OnnxBackend
from sdrt.backends.onnx_sessions import CACHE_DIR
from sdrt.cli import main
from sdrt.contracts import NETWORKS
from sdrt.errors import InputError, ModelError
from sdrt.model.manifest import MANIFEST_NAME, read_manifest
from sdrt.model.source import open_model

FP32_BOUND = 1e-4
FP16_BOUND = 1e-2
LATENT_BOUND = 1e-4  # whole pipeline, final latents
# Sizes and batches other than the export's 64 px, batch 2.
DIMS = [
    {"batch": 3, "unet_batch": 3, "image_height": 96, "image_width": 128, "latent_height": 12, "latent_width": 16},
    {"batch": 1, "unet_batch": 1, "image_height": 32, "image_width": 32, "latent_height": 4, "latent_width": 4},
]


def torch_modules(model_dir):
    from sdrt.backends.torch_modules import load_contract_modules

    return load_contract_modules(model_dir, open_model(model_dir).facts)


def worst_errors(backend, modules, contracts):
    """{(network, output, dims index): max|diff| / max|ref|} over every network and DIMS."""
    import torch

    errors = {}
    for name in NETWORKS:
        for k, dims in enumerate(DIMS):
            feeds = contracts[name].sample_inputs(dims, seed=k)
            got = backend.run(name, feeds)
            with torch.no_grad():
                ref = modules[name](*[torch.from_numpy(feeds[s.name]) for s in contracts[name].inputs])
            ref = ref if isinstance(ref, tuple) else (ref,)
            for spec, r in zip(contracts[name].outputs, ref):
                r = r.numpy()
                assert got[spec.name].shape == r.shape, (name, spec.name)
                errors[name, spec.name, k] = float(np.abs(got[spec.name] - r).max() / np.abs(r).max())
    return errors


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_each_network_matches_pytorch(variant, request):
    tiny, export = request.getfixturevalue(f"tiny_{variant}"), request.getfixturevalue(f"onnx_{variant}")
    source = open_model(export)
    backend = source.create_backend("onnx")
    assert isinstance(backend, OnnxBackend) and "CPUExecutionProvider" in backend.describe() and "fp32" in backend.describe()
    errors = worst_errors(backend, torch_modules(tiny), source.contracts)
    bad = {k: v for k, v in errors.items() if not v <= FP32_BOUND}
    assert not bad, f"ONNX vs PyTorch beyond {FP32_BOUND}: {bad}"


def test_export_folder_is_self_contained(onnx_sd1, tiny_sd1):
    manifest = read_manifest(onnx_sd1)
    assert set(manifest.networks) == set(NETWORKS)
    assert {n["precision"] for n in manifest.networks.values()} == {"fp32"}
    files = {str(p.relative_to(onnx_sd1)) for p in onnx_sd1.rglob("*") if p.is_file() and CACHE_DIR not in p.parts}
    assert files - set(manifest.files) == {MANIFEST_NAME}
    assert {"text_encoder/model.onnx", "unet/model.onnx", "scheduler/scheduler_config.json", "token_embeddings.safetensors"} <= files
    assert manifest.verify(onnx_sd1) == []
    for key in ("sdrt", "opset", "torch", "onnx", "onnxruntime", "diffusers", "transformers"):
        assert manifest.versions[key], key
    assert manifest.limits == TEST_LIMITS.to_dict()
    table = open_model(onnx_sd1).load_token_embeddings()
    assert table.dtype == np.float32 and np.array_equal(table, open_model(tiny_sd1).load_token_embeddings())
    unet = onnx.load(str(onnx_sd1 / "unet/model.onnx"), load_external_data=False)
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in unet.graph.input]
    assert dims[0] == ["unet_batch", 4, "latent_height", "latent_width"] and dims[1] == ["unet_batch"]


def test_fp16_export_through_the_cli(tiny_sd1, tmp_path, capsys):
    out = tmp_path / "fp16"
    sizes = ["--min-size", "32", "--opt-size", "64", "--max-size", "128", "--max-batch", "2"]
    assert main(["export", str(tiny_sd1), str(out), "--fp16", "--keep-fp32-op", "Softmax", "-q", *sizes]) == 0
    summary = capsys.readouterr().out
    assert "vs PyTorch" in summary and "fp16" in summary, summary
    source = open_model(out)
    assert {n["precision"] for n in source.manifest.networks.values()} == {"fp16"}
    assert source.manifest.extras["keep_fp32_ops"] == ["Softmax"]
    backend = source.create_backend("onnx")
    errors = worst_errors(backend, torch_modules(tiny_sd1), source.contracts)
    bad = {k: v for k, v in errors.items() if not v <= FP16_BOUND}
    assert not bad, f"fp16 ONNX vs PyTorch beyond {FP16_BOUND}: {bad}"
    # I/O stays float32; the timestep reaches Sin/Cos without passing through fp16; Softmax stayed fp32.
    unet = onnx.load(str(out / "unet/model.onnx"))
    io_types = {v.type.tensor_type.elem_type for v in list(unet.graph.input) + list(unet.graph.output)}
    assert io_types == {onnx.TensorProto.FLOAT}
    producers = {o: n for n in unet.graph.node for o in n.output}
    casts_to_fp16 = {n.output[0] for n in unet.graph.node if n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.FLOAT16}
    for node in (n for n in unet.graph.node if n.op_type in ("Sin", "Cos")):
        assert not upstream_of(node.input[0], producers) & casts_to_fp16, f"{node.name} sees an fp16 timestep"
    softmax_inputs = {n.input[0] for n in unet.graph.node if n.op_type == "Softmax"}
    assert softmax_inputs and not softmax_inputs & casts_to_fp16
    assert main(["export", str(tiny_sd1), str(tmp_path / "x"), "--keep-fp32-op", "Softmax"]) == 2
    assert "fp16 exports only" in capsys.readouterr().err


def test_upcast_attention_keeps_scores_fp32(onnx_sd2):
    """SD 2.1's UNet config sets upcast_attention; the fp16 export then computes QK^T and Softmax in fp32."""
    from sdrt.export.fp16 import attention_score_nodes, convert_to_fp16

    model = onnx.load(str(onnx_sd2 / "unet" / "model.onnx"))
    kept = attention_score_nodes(model.graph)
    softmaxes = [n.name for n in model.graph.node if n.op_type == "Softmax"]
    assert softmaxes and {n.op_type for n in model.graph.node if n.name in kept} >= {"MatMul", "Softmax"}
    fp16 = convert_to_fp16(model, upcast_attention=True)
    producers = {o: n for n in fp16.graph.node for o in n.output}
    for node in fp16.graph.node:
        if node.name in kept and node.op_type == "MatMul":  # reads fp32 casts of the fp16 q and k
            assert all(producers[i].op_type == "Cast" and producers[i].attribute[0].i == onnx.TensorProto.FLOAT for i in node.input)
        if node.op_type == "Softmax":
            assert producers[node.input[0]].name in kept, f"{node.name} reads an fp16 tensor"
    import onnxruntime as ort

    session = ort.InferenceSession(fp16.SerializeToString(), providers=["CPUExecutionProvider"])
    out = session.run(None, open_model(onnx_sd2).contracts["unet"].sample_inputs(DIMS[1]))[0]
    assert np.all(np.isfinite(out))


def upstream_of(tensor, producers) -> set:
    """Tensors `tensor` is computed from, not counting integer shapes (the walk stops at Shape nodes)."""
    seen, stack = set(), [tensor]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in producers and producers[name].op_type not in ("Shape", "Size"):
            stack.extend(producers[name].input)
    return seen


def init_image():
    y, x = np.mgrid[0:64, 0:64]
    return Image.fromarray(np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).astype(np.uint8))


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_pipeline_matches_pytorch_backend(variant, request):
    tiny, export = request.getfixturevalue(f"tiny_{variant}"), request.getfixturevalue(f"onnx_{variant}")
    ours = sdrt.Pipeline.from_pretrained(export)
    ref = sdrt.Pipeline.from_pretrained(tiny, backend="torch")
    assert ours.backend.name == "onnx" and ref.backend.name == "torch"
    cases = [
        dict(prompt="a red cat", negative_prompt="blue", num_inference_steps=4, seed=3),
        dict(prompt=["a red cat", "a dog"], num_inference_steps=3, seed=5, height=96, width=64),
    ]
    if variant == "sd1":
        cases.append(dict(prompt="a green cat", negative_prompt="red", num_inference_steps=5, image=init_image(), strength=0.6, seed=7))
    for case in cases:
        a = ours(guidance_scale=2.0, output_type="latent", progress=False, **case).images
        b = ref(guidance_scale=2.0, output_type="latent", progress=False, **case).images
        err = np.abs(a - b).max() / np.abs(b).max()
        assert err <= LATENT_BOUND, f"{case}: latents differ by {err:.2e}"
    image = ours("a red cat", num_inference_steps=2, guidance_scale=2.0, seed=1, progress=False).images[0]
    assert image.size == (64, 64)


def test_runs_with_torch_unimportable(onnx_sd1):
    code = f"""
import sys
for name in ("torch", "diffusers", "transformers", "onnx"):
    sys.modules[name] = None  # import fails
import sdrt
pipe = sdrt.Pipeline.from_pretrained({str(onnx_sd1)!r})
out = pipe("a red cat", num_inference_steps=3, guidance_scale=2.0, seed=0, progress=False)
loaded = [m for m in sys.modules if m.split(".")[0] in ("torch", "diffusers", "transformers") and sys.modules[m] is not None]
print(out.images[0].size, loaded, pipe.backend.describe())
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("(64, 64) []"), result.stdout


def copy_export(export, folder):
    return shutil.copytree(export, folder, ignore=shutil.ignore_patterns(CACHE_DIR))


def test_damaged_exports_are_refused(onnx_sd1, tmp_path):
    # A corrupted ONNX file (same size, so only ONNX Runtime's parser or --verify notices).
    bad = copy_export(onnx_sd1, tmp_path / "corrupt")
    path = bad / "unet" / "model.onnx"
    data = bytearray(path.read_bytes())
    data[:64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    assert open_model(bad).manifest.verify(bad) == ["unet/model.onnx"]
    with pytest.raises(ModelError, match=r"unet/model\.onnx.*re-export"):
        sdrt.Pipeline.from_pretrained(bad)
    # A truncated ONNX file.
    short = copy_export(onnx_sd1, tmp_path / "short")
    path = short / "vae_decoder" / "model.onnx"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ModelError, match=r"vae_decoder/model\.onnx.*truncated"):
        open_model(short)
    # A truncated manifest.
    half = copy_export(onnx_sd1, tmp_path / "half")
    text = (half / MANIFEST_NAME).read_text()
    (half / MANIFEST_NAME).write_text(text[: len(text) // 2])
    with pytest.raises(ModelError, match="damaged or truncated"):
        open_model(half)
    # A network file that does not fit its contract (the manifest's sizes updated to match).
    swapped = copy_export(onnx_sd1, tmp_path / "swapped")
    shutil.copy(swapped / "text_encoder" / "model.onnx", swapped / "vae_decoder" / "model.onnx")
    data = json.loads((swapped / MANIFEST_NAME).read_text())
    data["files"]["vae_decoder/model.onnx"]["size"] = (swapped / "vae_decoder" / "model.onnx").stat().st_size
    (swapped / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ModelError, match="mismatched"):
        open_model(swapped).create_backend("onnx")


def test_interrupted_export_leaves_nothing_that_loads(tiny_sd1, onnx_sd1, tmp_path, monkeypatch):
    from sdrt.export import onnx_export

    real = onnx_export.finish_network

    def interrupted(path, contract, *args):
        if contract.name == "text_encoder":
            raise KeyboardInterrupt  # as if Ctrl-C arrived mid-export
        return real(path, contract, *args)

    monkeypatch.setattr(onnx_export, "finish_network", interrupted)
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    (tmp_path / f".out.partial-{dead}" / "unet").mkdir(parents=True)  # what a SIGKILLed export leaves: removed
    with pytest.raises(KeyboardInterrupt):
        onnx_export.export_model(tiny_sd1, out, limits=TEST_LIMITS, progress=False, check=False)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ModelError):
        open_model(out)
    # With --force over an existing export, a failed export leaves the old one in place, intact.
    old = copy_export(onnx_sd1, tmp_path / "old")
    with pytest.raises(KeyboardInterrupt):
        onnx_export.export_model(tiny_sd1, old, limits=TEST_LIMITS, progress=False, check=False, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    assert open_model(old).manifest.verify(old) == []


def test_export_refuses_bad_requests(tiny_sd1, onnx_sd1, tmp_path):
    from sdrt.export.onnx_export import export_model

    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="lacks"):
        export_model(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(ModelError, match="does not exist"):
        export_model(tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(InputError, match="already exists"):
        export_model(tiny_sd1, onnx_sd1)
    with pytest.raises(InputError, match="not an sdrt export"):
        export_model(tiny_sd1, tmp_path, force=True)
    with pytest.raises(InputError, match="not a multiple of 32"):
        export_model(tiny_sd1, tmp_path / "out", limits=type(TEST_LIMITS)(min_size=48, opt_size=64, max_size=128))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_optimized_graph_cache(onnx_sd1, tmp_path, monkeypatch):
    export = copy_export(onnx_sd1, tmp_path / "export")
    source = open_model(export)
    first = source.create_backend("onnx")  # optimises and writes the cache
    cached = sorted(p.name for p in (export / CACHE_DIR).glob("*.onnx"))
    assert len(cached) == 4
    second = source.create_backend("onnx")  # loads the optimised graphs
    plain = source.create_backend("onnx", optimized_cache=False)
    assert sorted(p.name for p in (export / CACHE_DIR).glob("*.onnx")) == cached and not second.notes
    for name in NETWORKS:
        feeds = source.contracts[name].sample_inputs(DIMS[0])
        a, b, c = (be.run(name, feeds) for be in (first, second, plain))
        for key in a:
            np.testing.assert_allclose(b[key], a[key], rtol=0, atol=1e-6 * np.abs(a[key]).max())
            np.testing.assert_allclose(c[key], a[key], rtol=0, atol=1e-6 * np.abs(a[key]).max())
    # The cache never trips the manifest's checks, and a changed ONNX file gets a fresh one.
    assert open_model(export).manifest.verify(export) == []
    unet = export / "unet" / "model.onnx"
    os.utime(unet, ns=(unet.stat().st_atime_ns, unet.stat().st_mtime_ns + 10**9))
    open_model(export).create_backend("onnx")
    now = sorted(p.name for p in (export / CACHE_DIR).glob("*.onnx"))
    assert len(now) == 4 and [n for n in now if n.startswith("unet-")] != [n for n in cached if n.startswith("unet-")]
    # Another CPU with the same model name but other vector extensions (a VM's "AMD EPYC": Zen 2 or Zen 4) gets its own.
    key = first.sessions_set.cache_path("unet", unet)
    monkeypatch.setattr("sdrt.backends.onnx_sessions.cpu_isa", lambda: "avx avx2 fma f16c avx512f")
    assert first.sessions_set.cache_path("unet", unet) != key
    monkeypatch.undo()
    # A damaged cache is rebuilt, not fatal.
    for p in (export / CACHE_DIR).glob("unet-*.onnx"):
        p.write_bytes(b"junk")
    again = open_model(export).create_backend("onnx")
    assert "rebuilt the unet cache" in again.describe()


def test_static_shape_sessions_equal_the_dynamic_ones(onnx_sd1):
    from sdrt.backends import onnx_sessions

    source = open_model(onnx_sd1)
    static = source.create_backend("onnx", static_shapes=True, batch_parallel=False)
    dynamic = source.create_backend("onnx", static_shapes=False)
    assert static.static_networks == set(NETWORKS) and not dynamic.static_networks
    assert source.create_backend("onnx").static_networks == set(NETWORKS)  # auto: the tiny model is small
    for dims in DIMS:
        for name in NETWORKS:
            feeds = source.contracts[name].sample_inputs(dims)
            a, b = static.run(name, feeds), dynamic.run(name, feeds)
            for key in a:
                np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-5 * np.abs(b[key]).max())
    assert all(len(static.cached_shapes(n)) == len(DIMS) for n in NETWORKS)
    # Only the most recently used shapes are kept.
    for batch in range(1, onnx_sessions.SPECIALIZED_PER_NETWORK + 3):
        static.run("text_encoder", source.contracts["text_encoder"].sample_inputs({**DIMS[0], "batch": batch}))
    kept = static.cached_shapes("text_encoder")
    assert len(kept) == onnx_sessions.SPECIALIZED_PER_NETWORK and kept[-1]["batch"] == onnx_sessions.SPECIALIZED_PER_NETWORK + 2


def test_batch_parallel_runs_equal_whole_batch_runs(onnx_sd1):
    source = open_model(onnx_sd1)
    split = source.create_backend("onnx", threads=2)  # the tiny model is small: single-threaded runs, split 2 ways
    whole = source.create_backend("onnx", threads=2, batch_parallel=False)
    assert "batch split 2 ways" in split.describe()
    for batch in (1, 2, 3):  # 3: parts of 2 and 1
        dims = {**DIMS[0], "batch": batch, "unet_batch": batch}
        for name in NETWORKS:
            feeds = source.contracts[name].sample_inputs(dims)
            assert split.batch_parts(name, feeds) == min(batch, 2) and whole.batch_parts(name, feeds) == 1
            a, b = split.run(name, feeds), whole.run(name, feeds)
            for key in b:
                assert a[key].shape == b[key].shape
                np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-5 * np.abs(b[key]).max())
    one = source.create_backend("onnx", threads=1)  # one thread: nothing to split across
    assert all(one.batch_parts(n, source.contracts[n].sample_inputs({**DIMS[0], "batch": 2, "unet_batch": 2})) == 1
               for n in NETWORKS)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SDRT_SLOW_TESTS") != "1", reason="dynamo export takes ~2 minutes here; set SDRT_SLOW_TESTS=1")
def test_dynamo_exporter(tiny_sd1, tmp_path):
    from sdrt.export.onnx_export import export_model

    report = export_model(tiny_sd1, tmp_path / "dynamo", limits=TEST_LIMITS, progress=False, exporter="dynamo")
    source = open_model(tmp_path / "dynamo")
    assert source.manifest.versions["exporter"] == "dynamo" and report.opset == 18
    errors = worst_errors(source.create_backend("onnx"), torch_modules(tiny_sd1), source.contracts)
    bad = {k: v for k, v in errors.items() if not v <= FP32_BOUND}
    assert not bad, f"dynamo ONNX vs PyTorch beyond {FP32_BOUND}: {bad}"


# --- GPU routes, checked on the CPU ------------------------------------------------------------------------------


def _packed_attention(model) -> list[str]:
    """MultiHeadAttention nodes fed packed QKV (one input) or packed KV (no separate value)."""
    return [n.name for n in model.graph.node if n.op_type == "MultiHeadAttention" and (len(n.input) < 3 or not n.input[1] or not n.input[2])]


def test_cuda_fusions_pack_attention_only_in_fp16(onnx_sd1):
    """ORT's CUDA MultiHeadAttention runs packed fp32 attention only for sequences >= 256 (SD's 512 px mid-block
    has 64 tokens): an fp32 export optimised for CUDA must have no packed attention. Graph-level: no GPU needed."""
    from sdrt.backends.onnx_sessions import fuse_for_cuda

    unet = onnx_sd1 / read_manifest(onnx_sd1).networks["unet"]["file"]
    fp32 = fuse_for_cuda(unet, "unet", "fp32").model
    assert _packed_attention(fp32) == []
    assert {n.op_type for n in fp32.graph.node} >= {"Attention", "MultiHeadAttention", "GroupNorm"}  # still fused
    assert _packed_attention(fuse_for_cuda(unet, "unet", "fp16").model)  # what ORT's own SD optimiser does for fp16


def test_a_requested_gpu_provider_that_is_missing_is_an_error(onnx_sd1, monkeypatch):
    import onnxruntime as ort

    from sdrt.backends import onnx_providers
    from sdrt.errors import BackendError

    manifest = read_manifest(onnx_sd1)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr(onnx_providers, "ort_distributions", lambda: {"onnxruntime": "1.32.0"})
    for route in ("cuda", "tensorrt"):
        with pytest.raises(BackendError, match=f"the {route} route needs .*ExecutionProvider.*pip install onnxruntime-gpu"):
            OnnxBackend(onnx_sd1, manifest, route=route)
    with pytest.raises(BackendError, match="the cuda route needs CUDAExecutionProvider"):
        OnnxBackend(onnx_sd1, manifest, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    # onnxruntime-gpu listing CUDA (it does, even without a GPU) but the session not getting it: an error too.
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(BackendError, match="did not put the text_encoder network on CUDAExecutionProvider"):
        OnnxBackend(onnx_sd1, manifest, route="cuda", fusions=False)
    assert OnnxBackend(onnx_sd1, manifest, fusions=False).route == "auto"  # auto may run on the CPU


class _RecordingSession:
    """Wraps a CPU InferenceSession; records the providers and options asked for and reports them as got."""

    made: list = []

    def __init__(self, path, options=None, providers=None):
        self.real = _REAL_SESSION(path, options, providers=["CPUExecutionProvider"])
        self.providers = providers
        _RecordingSession.made.append((str(path), providers, options.optimized_model_filepath if options else ""))

    def get_providers(self):
        return [p[0] if isinstance(p, tuple) else p for p in self.providers]

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_tensorrt_route_gives_each_network_its_profile_and_no_optimised_cache(onnx_sd1, tmp_path, monkeypatch):
    import onnxruntime as ort

    global _REAL_SESSION
    _REAL_SESSION = ort.InferenceSession
    export = shutil.copytree(onnx_sd1, tmp_path / "export", ignore=shutil.ignore_patterns(CACHE_DIR))
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", _RecordingSession)
    _RecordingSession.made = []
    backend = OnnxBackend(export, read_manifest(export), route="tensorrt")
    assert backend.route == "tensorrt" and "route tensorrt" in backend.describe()
    made = {p.split("/")[-2]: (providers, opt) for p, providers, opt in _RecordingSession.made}
    assert set(made) == set(NETWORKS)
    for network, (providers, optimized) in made.items():
        name, options = providers[0]
        assert name == "TensorrtExecutionProvider" and options["trt_fp16_enable"] and options["trt_engine_cache_enable"]
        first_input = backend.contracts[network].inputs[0].name
        assert options["trt_profile_max_shapes"].startswith(first_input + ":")
        assert optimized == ""  # ORT cannot save a graph with TensorRT-compiled nodes
    assert not (export / CACHE_DIR).exists()


def test_cuda_binding_binds_inputs_as_cpu_memory():
    """Inputs reach the device through ORT's own copy (ordered with its stream), not a memcpy beside it."""
    from sdrt.backends.onnx_binding import CudaBinding
    from sdrt.contracts import build_contracts
    from sdrt.model.facts import ModelFacts

    contract = build_contracts(ModelFacts("sd1", 4, 8, 0.18215, "epsilon", 2, 77, 32, 32, 64, 49408))["vae_decoder"]
    calls = []

    class Value:
        def numpy(self):
            return np.zeros((1, 3, 64, 64), np.float32)

    class Binding:
        def bind_cpu_input(self, name, array):
            calls.append(("cpu_input", name, array.shape))

        def bind_ortvalue_input(self, name, value):
            calls.append(("device_input", name))

        def bind_ortvalue_output(self, name, value):
            calls.append(("output", name))

        def bind_output(self, name, device, device_id):
            calls.append(("output", name))

        def get_outputs(self):
            return [Value()]

    class Session:
        def io_binding(self):
            return Binding()

        def run_with_iobinding(self, binding):
            calls.append(("run",))

    binding = CudaBinding()
    binding.buffer = lambda network, name, shape: object()  # no CUDA here
    latent = np.ones((1, 4, 8, 8), np.float32)
    out = binding.run("vae_decoder", Session(), contract, {"latent": latent}, {"batch": 1, "latent_height": 8, "latent_width": 8, "image_height": 64, "image_width": 64})
    assert calls == [("cpu_input", "latent", (1, 4, 8, 8)), ("output", "image"), ("run",)]
    assert out["image"].shape == (1, 3, 64, 64)


def test_info_names_onnxruntime_gpu_shadowed_by_onnxruntime(monkeypatch):
    import onnxruntime as ort

    from sdrt.backends import onnx_providers
    from sdrt.info import describe_model

    monkeypatch.setattr(onnx_providers, "ort_distributions", lambda: {"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.31.1"})
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    text, ok = describe_model(None)
    assert "onnxruntime-gpu 1.31.1 and onnxruntime 1.32.0 are both installed" in text
    assert "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu" in text
    monkeypatch.setattr(onnx_providers, "ort_distributions", lambda: {"onnxruntime": "1.32.0"})
    text, _ = describe_model(None)
    assert "both installed" not in text


def test_cli_ort_provider(tmp_path, capsys, monkeypatch):
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    out = str(tmp_path / "x.png")
    assert main(["generate", "a 7", "--backend", "onnx", "--ort-provider", "cuda", "-o", out, "-q"]) == 2
    assert "the cuda route needs CUDAExecutionProvider" in capsys.readouterr().err
    assert main(["generate", "a 7", "--ort-provider", "cpu", "-o", out, "-q"]) == 2
    assert "add --backend onnx" in capsys.readouterr().err
    assert main(["generate", "a 7", "--backend", "onnx", "--ort-provider", "cpu", "--steps", "2", "-o", out, "-q"]) == 0
