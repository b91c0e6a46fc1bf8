"""Issue 14: resource limits, damaged files, misleading messages, and property tests over the API and CLI flags.

Every failure is sdrt's own one-line error naming the argument or file, raised before work; nothing is written.
"""

import inspect
import os
import shutil
import stat
import struct
import subprocess
import sys
import warnings
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import sdrt
from sdrt.cli import main
from sdrt.errors import BackendError, InputError, ModelError, SdrtError, torch_install_hint


@pytest.fixture(scope="module")
def digits():
    return sdrt.Pipeline.from_pretrained()  # the built-in model, ONNX backend


def _png_header_only(path, width, height):
    """A ~100-byte PNG that claims width x height: a decompression bomb's header."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


# --- resource limits ---------------------------------------------------------------------------------------------


def test_memory_estimate_grows_and_refuses(digits):
    from sdrt.memory import available_bytes, check_request, parse_memory

    src = digits.source
    small = check_request(src.facts, src.manifest, src.path, 1, 64, 64, True, False, False)
    big = check_request(src.facts, src.manifest, src.path, 1, 512, 512, True, False, False)
    assert 0 < small < big
    assert available_bytes() > 0
    assert parse_memory("1.5G") == 3 << 29 and parse_memory("512MiB") == 512 << 20 and parse_memory(0) is False
    with pytest.raises(InputError, match=r"1024x1024 needs about .* 1 GB is set by max_memory: at most \d+x\d+ fits"):
        digits("a 7", height=1024, width=1024, max_memory="1G", progress=False)
    with pytest.raises(InputError, match=r"100000x100000 needs about .* at most \d+x\d+ fits"):
        digits("a 7", height=100000, width=100000, progress=False)


def test_memory_estimate_counts_weights_as_onnx_runtime_holds_them(tmp_path):
    """A Winograd export's optimised graphs outweigh its files (SDXL's VAE decoder 5x): the cache counts where it is
    larger (the whole graph's or its step split's, not both), a measured growth where it is not there yet; ONNX
    Runtime's arenas keep every network's activations, torch's only the largest."""
    from types import SimpleNamespace

    from sdrt import memory

    files = {"unet/model.onnx.data": {"size": 1000}, "unet/step.onnx": {"size": 10}, "vae_decoder/model.onnx": {"size": 100},
             "text_encoder/model.onnx": {"size": 50}, "scheduler/scheduler_config.json": {"size": 5}}  # fmt: skip
    manifest = SimpleNamespace(files=files, extras={"winograd_convs": {"unet": 3, "vae_decoder": 2, "text_encoder": 0}})
    growth = memory.WINOGRAD_WEIGHT_GROWTH
    assert memory.weight_bytes(tmp_path, manifest) == int(1010 * growth["unet"]) + int(100 * growth["vae_decoder"]) + 50
    cache = tmp_path / ".ort_cache"
    cache.mkdir()
    for name, size in {"unet.step-k.data": 1500, "unet.prepass-k.data": 200, "unet-k.data": 1600, "vae_decoder-k.data": 900,
                       "text_encoder-k.data": 40}.items():  # fmt: skip
        (cache / name).write_bytes(b"x" * size)
    assert memory.weight_bytes(tmp_path, manifest) == 1700 + 900 + 50  # split > whole; the encoder's files > its cache
    assert memory.winograd_export(manifest) and not memory.winograd_export(SimpleNamespace(extras={}))
    facts = SimpleNamespace(vae_scale_factor=8)
    arch = memory.Architecture(320, (), 128, False)  # convolutions only: the attention factors differ by runtime
    onnx, torch = (memory.estimate_bytes(facts, arch, 0, 1, 512, 512, True, False, b) - memory.RUNTIMES[b][0] for b in ("onnx", "torch"))
    unet = memory.CONV_COPIES * 4 * 2 * 64 * 64 * 320  # guided batch 2 at 64x64 latents
    assert onnx == torch + unet  # ORT: UNet + decoder; torch: the decoder alone (the larger)
    plain, winograd = (memory.estimate_bytes(facts, arch, 0, 1, 512, 512, True, False, "onnx", w) for w in (False, True))
    assert winograd > plain
    assert memory.own_anonymous_bytes() > 0 and memory.available_bytes() >= memory.own_anonymous_bytes()


def test_large_cpu_networks_run_without_the_memory_pattern():
    from types import SimpleNamespace

    from sdrt.backends.onnx_sessions import Sessions

    sessions = SimpleNamespace(small_networks={"text_encoder"}, threads=2, provider_names=lambda n=None: ["CPUExecutionProvider"])
    big, small = (Sessions.options(sessions, network=n) for n in ("unet", "text_encoder"))
    assert not big.enable_mem_pattern and small.enable_mem_pattern  # the arena's chunks reused: RSS flat after image 1
    gpu = SimpleNamespace(small_networks=set(), threads=None, provider_names=lambda n=None: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert Sessions.options(gpu, network="unet").enable_mem_pattern


def test_cli_huge_size_is_one_line_and_override(tmp_path, capsys, monkeypatch):
    import sdrt.pipeline

    out = tmp_path / "x.png"
    with monkeypatch.context() as m:  # refused from the folder's files, before any network loads
        m.setattr(sdrt.pipeline.Pipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded the model"))
        assert main(["generate", "a 7", "-W", "100000", "-H", "100000", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fits" in err and "--max-memory" in err
    assert main(["generate", "a 7", "-W", "256", "-H", "256", "--max-memory", "100M", "-o", str(out)]) == 2
    assert "100 MB is set by max_memory" in capsys.readouterr().err
    assert main(["generate", "a 7", "-W", "128", "-H", "128", "--steps", "1", "-q", "--max-memory", "100M",
                 "--no-memory-check", "-o", str(out)]) == 0
    assert out.exists()


def test_image_limits(digits, tmp_path):
    bomb = _png_header_only(tmp_path / "bomb.png", 20000, 20000)
    assert bomb.stat().st_size < 200
    with pytest.raises(InputError, match=f"init image {bomb} is 400,000,000 pixels, more than"):
        digits("a 7", image=str(bomb), progress=False)
    big = _png_header_only(tmp_path / "big.png", 4000, 4000)
    with pytest.raises(InputError, match=f"init image {big} is 4000x4000, more than the 500,000 pixels"):
        digits("a 7", image=str(big), max_memory=500_000 * 32, progress=False)


# --- silent wrong results ------------------------------------------------------------------------------------


def test_16_bit_and_float_greyscale(tmp_path):
    from sdrt.images import load_image

    path = tmp_path / "g16.png"
    Image.fromarray(np.full((8, 8), 30000, np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    assert np.asarray(load_image(str(path))).mean() == pytest.approx(30000 / 257, abs=1)
    assert np.asarray(load_image(Image.fromarray(np.full((8, 8), 0.5, np.float32)))).mean() == pytest.approx(128, abs=1)
    assert np.asarray(load_image(Image.new("LA", (8, 8), (0, 0)))).min() == 255  # transparent: white


def test_nan_messages_say_what_is_known(digits, monkeypatch):
    real = digits.backend.run

    def nan_unet(network, feeds):
        out = real(network, feeds)
        return {k: np.full_like(v, np.nan) for k, v in out.items()} if network == "unet" else out

    monkeypatch.setattr(digits.backend, "run", nan_unet)
    with pytest.raises(BackendError) as err:
        digits("a 7", num_inference_steps=1, progress=False)
    message = str(err.value)
    assert "the unet on the onnx backend produced them" in message and "fp32" in message and "fp16" not in message


def test_truncation_warning_is_short(digits):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        digits.encode_prompts(["a red 7 " * 2000])
    assert caught and len(str(caught[0].message)) < 400 and "characters)" in str(caught[0].message)


# --- damaged files -------------------------------------------------------------------------------------------


def test_truncated_png_names_its_path(digits, tmp_path):
    full = tmp_path / "full.png"
    Image.new("RGB", (64, 64), "red").save(full)
    cut = tmp_path / "cut.png"
    cut.write_bytes(full.read_bytes()[:60])
    with pytest.raises(InputError, match=f"init image {cut} cannot be read") as err:
        digits("a 7", image=str(cut), progress=False)
    assert "PIL." not in str(err.value)


def test_truncated_safetensors_on_torch(tiny_sd1, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd1, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelError, match=f"{weights} is truncated"):
        sdrt.Pipeline.from_pretrained(broken, backend="torch")


def test_lora_of_wrong_rank(tmp_path):
    from safetensors.numpy import save_file

    from sdrt.adapters.lora import read_lora

    path = tmp_path / "bad.safetensors"
    base = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{base}.lora_down.weight": np.array(1.0, np.float32), f"{base}.lora_up.weight": np.zeros((32, 4), np.float32)}, str(path))
    with pytest.raises(ModelError, match=f"{path}: layer .* has lora_down \\(\\) and lora_up \\(32, 4\\)"):
        read_lora(path)


def test_files_identified_by_content(tmp_path):
    pytest.importorskip("torch")
    from sdrt.export.single_file import load_checkpoint
    from sdrt.model.weights import read_weights

    png = tmp_path / "evil.ckpt"
    Image.new("RGB", (4, 4)).save(png, format="PNG")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"garbage, not weights")
    for path, what in ((png, "a PNG image"), (garbage, "unrecognised")):
        with pytest.raises(ModelError, match=f"{path} is not a checkpoint: its content is {what}"):
            load_checkpoint(path, allow_pickle=True)  # never reaches the unpickler
        with pytest.raises(ModelError, match=f"{path} is not a LoRA file: its content is {what}"):
            read_weights(path, "LoRA")


def test_generate_pickle_advice_names_a_real_command(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    assert main(["generate", "a 7", "-m", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "`sdrt export FILE OUT --allow-pickle`" in err


def test_cli_export_png_with_allow_pickle(tmp_path, capsys):
    pytest.importorskip("onnx")
    png = tmp_path / "x.png"
    Image.new("RGB", (4, 4)).save(png)
    assert main(["export", str(png), str(tmp_path / "out"), "--allow-pickle"]) == 2
    assert "is not a checkpoint: its content is a PNG image" in capsys.readouterr().err


def test_torch_install_advice_is_cpu_wheel(tiny_sd1, monkeypatch):
    import sdrt.model.source as source

    assert "--index-url https://download.pytorch.org/whl/cpu" in torch_install_hint("export")
    monkeypatch.setattr(source, "module_available", lambda name: False)
    with pytest.raises(BackendError, match="download.pytorch.org/whl/cpu"):
        sdrt.Pipeline.from_pretrained(tiny_sd1, backend="torch")


def test_backend_option_table_matches_constructors():
    from sdrt.backends.onnx_backend import OnnxBackend
    from sdrt.inputs import BACKEND_OPTIONS

    def params(cls, skip):
        return set(inspect.signature(cls.__init__).parameters) - {"self", *skip}

    assert params(OnnxBackend, ("path", "manifest")) == set(BACKEND_OPTIONS["onnx"])
    if sdrt.backends.base.module_available("torch"):
        from sdrt.backends.torch_backend import TorchBackend

        assert params(TorchBackend, ("model_dir", "facts", "contracts")) == set(BACKEND_OPTIONS["torch"])


# --- exports -------------------------------------------------------------------------------------------------


def test_export_files_are_world_readable(onnx_sd1):
    mask = os.umask(0)
    os.umask(mask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in onnx_sd1.rglob("*") if p.is_file()}
    assert modes["token_embeddings.safetensors"] == 0o666 & ~mask
    assert set(modes.values()) == {0o666 & ~mask}


def test_stale_partials_of_any_name_are_removed(tmp_path):
    from sdrt.export.onnx_export import remove_stale_partials

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [tmp_path / f".other.partial-{dead.pid}", tmp_path / f".out.old-{dead.pid}"]
    live = tmp_path / f".other.partial-{os.getpid()}"
    for folder in stale + [live]:
        folder.mkdir()
    remove_stale_partials(tmp_path / "out")
    assert [f.exists() for f in stale] == [False, False] and live.exists()


# --- property tests: any arguments -> success, or one line naming the argument; nothing written ---------------

ARGUMENTS = ("prompt", "negative_prompt", "seed", "guidance_scale", "strength", "num_inference_steps", "height", "width",
             "scheduler", "output_type", "num_images_per_prompt", "image", "latents", "max_memory")
anything = st.one_of(st.none(), st.booleans(), st.text(max_size=4), st.floats(), st.integers(-3, 3))
API = dict(
    prompt=st.one_of(st.text(st.characters(blacklist_categories=()), max_size=20), st.lists(st.text(max_size=5), max_size=2), anything),
    negative_prompt=st.one_of(st.none(), st.text(max_size=5), st.lists(st.text(max_size=5), max_size=2), anything),
    seed=st.one_of(st.none(), st.integers(-2, 2**64 + 1), st.integers(0, 9).map(np.int64), anything),
    guidance_scale=st.one_of(st.floats(), st.integers(-1, 9), anything),
    strength=st.one_of(st.floats(-0.5, 1.5), anything),
    num_inference_steps=st.one_of(st.integers(-1, 2), st.sampled_from([999, 1000, 1001]), anything),
    height=st.one_of(st.none(), st.sampled_from([-64, 0, 31, 32, 64, 65]), anything),
    width=st.one_of(st.none(), st.sampled_from([-64, 0, 31, 32, 64, 65]), anything),
    scheduler=st.one_of(st.none(), st.sampled_from(["ddim", "pndm", "euler", "euler_a", "dpmpp_2m", "heun"]), anything),
    output_type=st.one_of(st.sampled_from(["pil", "np", "latent", "tensor"]), anything),
    num_images_per_prompt=st.one_of(st.integers(-1, 2), anything),
    image=st.one_of(st.none(), st.sampled_from([np.zeros((0, 0, 3), np.uint8), np.zeros((40, 40, 3), np.uint8),
                                                np.zeros((8, 8), np.float32), "/nonexistent.png"]), anything),
    latents=st.one_of(st.none(), st.sampled_from([[0.0], np.zeros((1, 4, 8, 8), np.float32)]), anything),
    max_memory=st.one_of(st.none(), st.sampled_from(["1K", "8G", 0, "x", -1])),
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.fixed_dictionaries({}, optional=API))
def test_api_property(digits, kwargs):
    kwargs.setdefault("prompt", "a red 7")
    try:
        out = digits(progress=False, **{"num_inference_steps": 1, **kwargs})
    except SdrtError as err:
        message = str(err)
        assert "\n" not in message and any(name in message for name in ARGUMENTS + ("init image", "needs about")), message
    else:
        assert len(out.seeds) == len(out.parameters) >= 1


FLAGS = st.fixed_dictionaries({}, optional={
    "-W": st.sampled_from(["-64", "0", "33", "64", "100000"]),
    "-H": st.sampled_from(["64", "96"]),
    "-g": st.sampled_from(["nan", "inf", "-1", "0", "7.5"]),
    "-s": st.sampled_from(["-1", "0", "5", str(2**64)]),
    "--steps": st.sampled_from(["0", "1", "2", "1000"]),
    "--scheduler": st.sampled_from(["ddim", "heun", "euler_a"]),
    "--threads": st.sampled_from(["-1", "0", "1"]),
    "--num-images": st.sampled_from(["0", "1", "2"]),
    "--max-memory": st.sampled_from(["1K", "lots", "8G"]),
    "-o": st.sampled_from(["", "x.gif", "FILE/x.png", "x.jpg", "DIR", "x"]),
})


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(FLAGS, st.sampled_from(["a red 7", "a 3 \udcff", ""]))
def test_cli_property(tmp_path_factory, capsys, flags, prompt):
    folder = tmp_path_factory.mktemp("cli")
    (folder / "FILE").write_bytes(b"x")
    (folder / "DIR").mkdir()
    before = sorted(folder.rglob("*"))
    argv = ["generate", prompt, "-q", "--steps", "1"]
    flags.setdefault("-o", "x")
    for flag, value in flags.items():
        if flag == "-o":
            value = value.replace("FILE", str(folder / "FILE")).replace("DIR", str(folder / "DIR")) if value else ""
            value = value if not value or value.startswith("/") else str(folder / value)
        argv += [flag, value]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own usage error, which names the flag
        code = exit_.code
    err = capsys.readouterr().err
    if code == 0:
        assert len(sorted(folder.rglob("*"))) > len(before)
    else:
        assert code == 2 and err.strip() and (err.startswith("usage:") or err.count("\n") == 1), err
        assert sorted(folder.rglob("*")) == before  # nothing written on failure
