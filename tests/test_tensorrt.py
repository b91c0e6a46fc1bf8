"""TensorRT engines and backend: profiles from the contracts, engine cache keys, the build folder, the CLI.

Everything except the tests marked `tensorrt` runs on a CPU machine without TensorRT: the build logic is driven
with a fake engine builder and fake machine info (GPU, TensorRT version) on a fake ONNX export (a manifest and
placeholder files: building and key checks never parse the ONNX). The `tensorrt` tests build real engines from
the tiny model's ONNX export and compare them with ONNX Runtime; they skip, saying why, where TensorRT cannot run.
"""

import dataclasses
import json

import numpy as np
import pytest

from sdrt.backends.onnx_providers import session_providers, shape_string
from sdrt.backends.tensorrt_machine import (
    MachineInfo,
    check_engine,
    describe_mismatch,
    engine_key,
    engine_key_fields,
    tensorrt_status,
)
from sdrt.cli import main
from sdrt.contracts import NETWORKS, TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER, ShapeLimits, build_contracts
from sdrt.errors import BackendError, InputError, ModelError
from sdrt.export.tensorrt_build import build_engines
from sdrt.export.tensorrt_shapes import network_profile, parse_sizes, resolve_shapes
from sdrt.model.manifest import Manifest, read_manifest
from sdrt.model.facts import ModelFacts
from sdrt.model.source import open_model

SD15 = ModelFacts("sd1", 4, 8, 0.18215, "epsilon", 3, 77, 768, 768, 512, 49408)
TINY = ModelFacts("sd1", 4, 8, 0.18215, "epsilon", 2, 77, 32, 32, 64, 49408)  # export/tiny.py's sd1: size step 32
TINY_LIMITS = ShapeLimits(min_size=32, opt_size=64, max_size=128, max_batch=2)  # conftest's TEST_LIMITS
H100 = MachineInfo("NVIDIA H100 80GB HBM3", "9.0", "10.7.0")
A100 = MachineInfo("NVIDIA A100-SXM4-80GB", "8.0", "10.7.0")

TRT_OK, TRT_WHY = tensorrt_status()
needs_tensorrt = pytest.mark.skipif(not TRT_OK, reason=f"needs TensorRT and an NVIDIA GPU: {TRT_WHY}")


# --- a fake ONNX export and a fake builder --------------------------------------------------------------------


def make_fake_export(folder, facts=SD15, limits=ShapeLimits(), precision="fp32", salt=""):
    """An sdrt export folder whose 'ONNX files' are placeholders: enough for manifests, keys and builds."""
    folder.mkdir(parents=True)
    files = {f"{n}/model.onnx": f"onnx {n} {salt}".encode() for n in NETWORKS}
    files["unet/model.onnx.data"] = f"unet weights {salt}".encode()
    files["tokenizer/vocab.json"] = b"{}"
    files["scheduler/scheduler_config.json"] = b'{"_class_name": "PNDMScheduler"}'
    files["token_embeddings.safetensors"] = b"table"
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    manifest = Manifest(
        facts=facts,
        contracts=build_contracts(facts),
        networks={n: {"file": f"{n}/model.onnx", "precision": precision} for n in NETWORKS},
        files={},
        limits=limits.to_dict(),
        versions={"sdrt": "test"},
        extras={"source": "fake"},
    )
    manifest.record_files(folder, sorted(files))
    manifest.write(folder)
    return folder


class FakeBuilder:
    """Stands in for build_with_tensorrt: records each call and returns bytes naming what it was asked to build."""

    def __init__(self, fail_on=None):
        self.calls, self.fail_on = [], fail_on

    def __call__(self, onnx_path, profile, flags, timing_cache):
        network = onnx_path.parent.name
        if network == self.fail_on:
            raise RuntimeError(f"out of memory building {network}\nsecond line of the log")
        self.calls.append(network)
        timing_cache.write_bytes(timing_cache.read_bytes() + b"t" if timing_cache.exists() else b"t")
        return f"engine {network} {json.dumps(profile)} {json.dumps(flags)}".encode()


@pytest.fixture
def fake_export(tmp_path):
    return make_fake_export(tmp_path / "sd15-onnx")


class FakeConverter:
    """Stands in for sdrt.export.fp16.convert_file on the placeholder ONNX files: copies, and records the call."""

    def __init__(self):
        self.calls = []

    def __call__(self, src, dst, upcast_attention):
        self.calls.append((src.parent.name, upcast_attention))
        dst.write_bytes(b"fp16 " + src.read_bytes())


def build(onnx, out, tmp_path, machine=H100, builder=None, converter=None, **options):
    options.setdefault("timing_cache", tmp_path / "timing.cache")
    return build_engines(onnx, out, machine=machine, engine_builder=builder or FakeBuilder(), progress=False,
                         fp16_converter=converter or FakeConverter(), **options)  # fmt: skip


# --- profiles -----------------------------------------------------------------------------------------------------


def test_sd15_profiles_from_the_contracts():
    contracts = build_contracts(SD15)
    profiles = {n: network_profile(contracts[n], SD15, ShapeLimits()) for n in NETWORKS}  # 64..1024 px, batch 4
    assert profiles[UNET] == {
        "sample": ((1, 4, 8, 8), (2, 4, 64, 64), (8, 4, 128, 128)),
        "timestep": ((1,), (2,), (8,)),
        "encoder_hidden_states": ((1, 77, 768), (2, 77, 768), (8, 77, 768)),
    }
    assert profiles[TEXT_ENCODER] == {"inputs_embeds": ((1, 77, 768), (1, 77, 768), (4, 77, 768))}
    assert profiles[VAE_DECODER] == {"latent": ((1, 4, 8, 8), (1, 4, 64, 64), (4, 4, 128, 128))}
    assert profiles[VAE_ENCODER] == {"image": ((1, 3, 64, 64), (1, 3, 512, 512), (4, 3, 1024, 1024))}
    for n in NETWORKS:  # the builder's profile is the contract's
        assert profiles[n] == ShapeLimits().profile(contracts[n], SD15)


def test_tiny_profiles_and_batch_one():
    contracts = build_contracts(TINY)
    unet = network_profile(contracts[UNET], TINY, TINY_LIMITS)
    assert unet["sample"] == ((1, 4, 4, 4), (2, 4, 8, 8), (4, 4, 16, 16))
    assert unet["encoder_hidden_states"] == ((1, 77, 32), (2, 77, 32), (4, 77, 32))
    one = network_profile(contracts[UNET], TINY, dataclasses.replace(TINY_LIMITS, max_batch=1))
    assert one["timestep"] == ((1,), (2,), (2,))  # guidance <= 1 runs batch 1, guidance 2
    assert network_profile(contracts[TEXT_ENCODER], TINY, TINY_LIMITS)["inputs_embeds"] == ((1, 77, 32), (1, 77, 32), (2, 77, 32))


def test_static_and_sizes_profiles():
    contracts = build_contracts(SD15)
    unet = network_profile(contracts[UNET], SD15, ShapeLimits(512, 512, 768, 2), static=(512, 768))  # W x H
    assert unet["sample"] == ((1, 4, 96, 64), (2, 4, 96, 64), (4, 4, 96, 64))
    image = network_profile(contracts[VAE_ENCODER], SD15, ShapeLimits(512, 512, 768, 2), static=(512, 768))["image"]
    assert image == ((1, 3, 768, 512), (1, 3, 768, 512), (2, 3, 768, 512))
    source = Manifest(SD15, contracts, {}, {}, ShapeLimits().to_dict(), {})
    limits, static = resolve_shapes(source, None, "768x768,512x512,1024x640", None, 2)
    assert (limits, static) == (ShapeLimits(512, 768, 1024, 2), None)
    limits, static = resolve_shapes(source, None, None, None, None)  # the export's own limits
    assert (limits, static) == (ShapeLimits(), None)


@pytest.mark.parametrize(
    "sizes, static, limits, batch, message",
    [
        ("512", None, None, None, "not WIDTHxHEIGHT"),
        ("512x,768x768", None, None, None, "'512x' is not WIDTHxHEIGHT"),
        ("axb", None, None, None, "not WIDTHxHEIGHT"),
        ("500x512", None, None, None, "500 is not a multiple of 64 for this model; use 448 or 512"),
        ("0x512", None, None, None, "use 64"),
        (None, "512x520", None, None, "520 is not a multiple of 64"),
        (None, "512x512,768x768", None, None, "must be one WIDTHxHEIGHT"),
        (None, None, ShapeLimits(64, 1024, 512, 1), None, "min 64 <= opt 1024 <= max 512"),
        (None, None, ShapeLimits(64, 500, 1024, 1), None, "opt size 500 is not a multiple of 64"),
        (None, None, None, 0, "max batch 0 must be an integer of at least 1"),
        ("512x512", "512x512", None, None, "not sizes and static"),
    ],
)
def test_bad_shapes_are_refused(sizes, static, limits, batch, message):
    source = Manifest(SD15, build_contracts(SD15), {}, {}, ShapeLimits().to_dict(), {})
    with pytest.raises(InputError, match=message):
        resolve_shapes(source, limits, sizes, static, batch)


def test_parse_sizes():
    assert parse_sizes("512x512, 768X640") == [(512, 512), (768, 640)]


# --- cache keys ---------------------------------------------------------------------------------------------------


def test_cache_key_changes_with_everything_it_depends_on():
    profile = network_profile(build_contracts(SD15)[UNET], SD15, ShapeLimits())
    flags = {"precision": "fp16", "strongly_typed": True, "converted": "sdrt.export.fp16/1", "tf32": False}
    onnx = {"unet/model.onnx": "a" * 64, "unet/model.onnx.data": "b" * 64}
    base = engine_key_fields(UNET, onnx, profile, flags, H100)
    assert engine_key(base) == engine_key(engine_key_fields(UNET, dict(reversed(onnx.items())), profile, flags, H100))
    variants = {
        "onnx": engine_key_fields(UNET, {**onnx, "unet/model.onnx.data": "c" * 64}, profile, flags, H100),
        "gpu": engine_key_fields(UNET, onnx, profile, flags, A100),
        "gpu name": engine_key_fields(UNET, onnx, profile, flags, dataclasses.replace(H100, gpu="NVIDIA H100 PCIe")),
        "tensorrt": engine_key_fields(UNET, onnx, profile, flags, dataclasses.replace(H100, tensorrt="10.8.0")),
        "flags": engine_key_fields(UNET, onnx, profile, {**flags, "converted": None}, H100),
        "profile": engine_key_fields(UNET, onnx, network_profile(build_contracts(SD15)[UNET], SD15, ShapeLimits(max_batch=2)), flags, H100),
        "network": engine_key_fields(VAE_DECODER, onnx, profile, flags, H100),
    }
    keys = {engine_key(base)} | {engine_key(v) for v in variants.values()}
    assert len(keys) == len(variants) + 1
    assert "built with TensorRT 10.7.0, this machine has 10.8.0" in describe_mismatch(base, variants["tensorrt"])
    assert "built for NVIDIA H100 80GB HBM3 (compute 9.0), this GPU is NVIDIA A100" in describe_mismatch(base, variants["gpu"])
    assert "ONNX file changed" in describe_mismatch(base, variants["onnx"])
    assert describe_mismatch(base, base) == ""


# --- the build folder ---------------------------------------------------------------------------------------------


def test_build_writes_a_self_contained_folder(fake_export, tmp_path, monkeypatch):
    out = tmp_path / "sd15-trt"
    builder = FakeBuilder()
    report = build(fake_export, out, tmp_path, builder=builder, sizes="512x512,768x768", max_batch=2)
    assert builder.calls == list(NETWORKS)
    assert [p.action for p in report.plans.values()] == ["built"] * 4
    manifest = read_manifest(out)  # sizes of every file, engines included, match
    assert manifest.verify(out) == []
    engines = manifest.extras["engines"]
    assert set(engines) == set(NETWORKS)
    unet = engines[UNET]
    assert unet["file"] == f"engines/unet-{unet['key']}.plan" and (out / unet["file"]).exists()
    assert unet["profile"]["sample"] == [[1, 4, 64, 64], [2, 4, 64, 64], [4, 4, 96, 96]]
    assert unet["flags"] == {"precision": "fp16", "strongly_typed": True, "converted": "sdrt.export.fp16/1", "tf32": False}
    sidecar = json.loads((out / unet["sidecar"]).read_text())
    assert sidecar["key"] == unet["key"] == engine_key(sidecar["key_fields"])
    assert sidecar["key_fields"]["gpu"] == H100.gpu and set(sidecar["key_fields"]["onnx_sha256"]) == {"unet/model.onnx", "unet/model.onnx.data"}
    for rel in ("tokenizer/vocab.json", "scheduler/scheduler_config.json", "token_embeddings.safetensors", "unet/model.onnx.data"):
        assert (out / rel).read_bytes() == (fake_export / rel).read_bytes()
    assert manifest.limits["max_size"] == 768 and manifest.versions["tensorrt"] == "10.7.0"
    assert manifest.extras["onnx_export"] == str(fake_export.resolve())
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no work files
    assert not [p.name for p in tmp_path.iterdir() if ".partial" in p.name]
    assert (tmp_path / "timing.cache").exists()  # saved for the next build
    # The folder picks TensorRT where TensorRT can be imported (and ONNX Runtime elsewhere).
    monkeypatch.setattr("sdrt.backends.tensorrt_machine.tensorrt_status", lambda check_gpu=True: (True, "TensorRT 10.7.0"))
    assert open_model(out).default_backend() == "tensorrt"
    monkeypatch.setattr("sdrt.backends.tensorrt_machine.tensorrt_status", lambda check_gpu=True: (False, "a stub"))
    assert open_model(out).default_backend() == "onnx"  # a stub or a GPU-less machine never picks TensorRT


def test_rebuild_reuses_matching_engines_and_rebuilds_stale_ones(fake_export, tmp_path):
    out = tmp_path / "trt"
    build(fake_export, out, tmp_path)
    again = FakeBuilder()
    report = build(fake_export, out, tmp_path, builder=again)
    assert again.calls == [] and {p.action for p in report.plans.values()} == {"reused"}
    assert read_manifest(out).verify(out) == []

    newer = FakeBuilder()
    report = build(fake_export, out, tmp_path, builder=newer, machine=dataclasses.replace(H100, tensorrt="10.8.0"))
    assert newer.calls == list(NETWORKS)
    assert "built with TensorRT 10.7.0, this machine has 10.8.0" in report.plans[UNET].reason
    assert len(list((out / "engines").glob("*.plan"))) == 4  # the old engines are gone

    flags = FakeBuilder()
    report = build(fake_export, out, tmp_path, builder=flags, machine=dataclasses.replace(H100, tensorrt="10.8.0"), fp16=False)
    assert flags.calls == list(NETWORKS) and "build flags differ" in report.plans[UNET].reason

    changed = make_fake_export(tmp_path / "sd15-onnx-v2", salt="v2")  # re-exported ONNX
    rebuilt = FakeBuilder()
    report = build(changed, out, tmp_path, builder=rebuilt, machine=dataclasses.replace(H100, tensorrt="10.8.0"), fp16=False)
    assert rebuilt.calls == list(NETWORKS) and "ONNX file changed" in report.plans[UNET].reason


def test_failed_build_leaves_nothing(fake_export, tmp_path):
    out = tmp_path / "trt"
    with pytest.raises(BackendError, match=r"could not build the unet engine .*\(out of memory building unet\); nothing was written"):
        build(fake_export, out, tmp_path, builder=FakeBuilder(fail_on=UNET))
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["sd15-onnx"]  # no timing cache either

    build(fake_export, out, tmp_path)  # a good build, then a failed rebuild: the good one stays
    before = {p.name: p.read_bytes() for p in (out / "engines").iterdir()}
    with pytest.raises(BackendError):
        build(fake_export, out, tmp_path, builder=FakeBuilder(fail_on=VAE_DECODER), machine=A100)
    assert {p.name: p.read_bytes() for p in (out / "engines").iterdir()} == before
    assert read_manifest(out).verify(out) == []


def test_changed_onnx_bytes_are_caught_before_building(fake_export, tmp_path):
    (fake_export / "unet/model.onnx.data").write_bytes(b"unet weightz ")  # same size, other bytes
    with pytest.raises(ModelError, match="model.onnx.data changed since the export was written"):
        build(fake_export, tmp_path / "trt", tmp_path)
    assert not (tmp_path / "trt").exists()


def test_out_dir_checks(fake_export, tmp_path):
    with pytest.raises(InputError, match="overlaps the ONNX export"):
        build(fake_export, fake_export / "trt", tmp_path)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="is not an sdrt export"):
        build(fake_export, tmp_path / "busy", tmp_path)
    other = make_fake_export(tmp_path / "other-onnx")
    with pytest.raises(InputError, match="is an ONNX export without engines"):
        build(fake_export, other, tmp_path)
    fp16 = make_fake_export(tmp_path / "fp16-onnx", precision="fp16")
    with pytest.raises(InputError, match="ONNX file is fp16, so its engine is fp16 too"):
        build(fp16, tmp_path / "fp16-trt", tmp_path, fp16=False)
    report = build(fp16, tmp_path / "fp16-trt", tmp_path)
    assert report.plans[UNET].flags == {"precision": "fp16", "strongly_typed": True, "converted": None, "tf32": False}


# --- loading: keys checked against this machine and the export -------------------------------------------------


def test_foreign_or_stale_engines_are_refused(fake_export, tmp_path):
    out = tmp_path / "trt"
    build(fake_export, out, tmp_path)
    manifest = read_manifest(out)
    assert check_engine(out, manifest, UNET, H100) == out / manifest.extras["engines"][UNET]["file"]
    with pytest.raises(ModelError, match=r"does not fit here: built for NVIDIA H100 .* this GPU is NVIDIA A100.*rebuild it on this machine with `sdrt build "):
        check_engine(out, manifest, UNET, A100)
    with pytest.raises(ModelError, match="built with TensorRT 10.7.0, this machine has 10.8.0"):
        check_engine(out, manifest, UNET, dataclasses.replace(H100, tensorrt="10.8.0"))

    stale = dataclasses.replace(manifest, files={**manifest.files, "unet/model.onnx": {"size": 1, "sha256": "0" * 64}})
    with pytest.raises(ModelError, match="the ONNX file changed since"):
        check_engine(out, stale, UNET, H100)

    sidecar = out / manifest.extras["engines"][UNET]["sidecar"]
    data = json.loads(sidecar.read_text())
    data["key_fields"]["gpu"] = A100.gpu  # an edited sidecar no longer hashes to its key
    sidecar.write_text(json.dumps(data))
    with pytest.raises(ModelError, match="does not match its engine"):
        check_engine(out, manifest, UNET, A100)
    sidecar.unlink()
    with pytest.raises(ModelError, match="is missing: the engine's key cannot be checked"):
        check_engine(out, manifest, UNET, H100)
    with pytest.raises(ModelError, match="no TensorRT engine for unet"):
        check_engine(fake_export, read_manifest(fake_export), UNET, H100)


# --- without TensorRT ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(TRT_OK, reason="TensorRT works here")
def test_build_without_tensorrt_is_one_line_and_no_files(fake_export, tmp_path, capsys):
    out = tmp_path / "trt"
    assert main(["build", str(fake_export), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("sdrt: error: TensorRT is not installed here") and "pip install tensorrt" in err and "--backend onnx" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sd15-onnx"]
    with pytest.raises(BackendError, match="TensorRT is not installed here"):
        build_engines(fake_export, out)
    with pytest.raises(BackendError, match="TensorRT is not installed here"):
        open_model(fake_export).create_backend("tensorrt")
    assert not out.exists()


def test_stub_tensorrt_counts_as_not_installed(monkeypatch):
    import sys
    import types

    def status_with(module):
        monkeypatch.setitem(sys.modules, "tensorrt", module)
        tensorrt_status.cache_clear()
        try:
            return tensorrt_status()
        finally:
            tensorrt_status.cache_clear()

    assert status_with(None)[0] is False  # import fails
    stub = types.ModuleType("tensorrt")  # PyPI's stub: imports, no version, no libraries
    ok, why = status_with(stub)
    assert not ok and "stub" in why
    old = types.ModuleType("tensorrt")
    old.__version__ = "8.6.1"
    assert status_with(old) == (False, "TensorRT 8.6.1 is older than 10")
    broken = types.ModuleType("tensorrt")
    broken.__version__ = "10.7.0"
    broken.Logger = type("Logger", (), {"ERROR": 0, "__init__": lambda self, level: None})

    def no_gpu(logger):
        raise TypeError("pybind11::init(): factory function returned nullptr")

    broken.Builder = no_gpu
    ok, why = status_with(broken)
    assert not ok and "factory function returned nullptr" in why


# --- the command line ---------------------------------------------------------------------------------------------


def test_dry_run_prints_profiles_flags_and_keys(fake_export, tmp_path, capsys):
    out = tmp_path / "trt"
    cache = tmp_path / "t.cache"
    code = main(["build", str(fake_export), str(out), "--dry-run", "--sizes", "512x512,768x768", "--max-batch", "2", "--timing-cache", str(cache)])
    assert code == 0
    text = capsys.readouterr().out
    assert "dry run, nothing built" in text and "would build (no engine yet)" in text
    assert "sample                 min (1, 4, 64, 64)  opt (2, 4, 64, 64)  max (4, 4, 96, 96)" in text
    assert "inputs_embeds          min (1, 77, 768)  opt (1, 77, 768)  max (2, 77, 768)" in text
    assert "flags       precision=fp16, strongly_typed=True, converted=sdrt.export.fp16/1, tf32=False" in text
    assert text.count(" key ") == 4 and f"timing cache  {cache} (new)" in text
    assert not out.exists() and not cache.exists()
    report = build_engines(fake_export, out, sizes="512x512,768x768", max_batch=2, dry_run=True, machine=H100)
    assert all(f"key {p.key}" in report.summary() for p in report.plans.values())

    assert main(["build", str(fake_export), str(out), "--dry-run", "--static", "512x768", "--no-fp16"]) == 0
    text = capsys.readouterr().out
    assert "512x768 (static)" in text and "sample                 min (1, 4, 96, 64)" in text and "precision=fp32" in text
    assert main(["build", str(fake_export), str(out), "--dry-run", "--max-size", "768"]) == 0
    assert "64..768 px (opt 512), batch 1..4 (UNet 1..8)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sizes", "512by512"], "'512by512' is not WIDTHxHEIGHT"),
        (["--sizes", "512x500"], "500 is not a multiple of 64 for this model; use 448 or 512"),
        (["--static", "100x64"], "100 is not a multiple of 64 for this model; use 64 or 128"),
        (["--max-batch", "0"], "max batch 0 must be an integer of at least 1"),
        (["--min-size", "96"], "min size 96 is not a multiple of 64"),
        (["--sizes", "512x512", "--max-size", "768"], "--sizes and --min/opt/max-size are alternatives"),
    ],
)
def test_cli_argument_errors(fake_export, tmp_path, capsys, args, message):
    assert main(["build", str(fake_export), str(tmp_path / "trt"), "--dry-run", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "trt").exists()


def test_build_help_lists_the_options(capsys):
    with pytest.raises(SystemExit):
        main(["build", "--help"])
    text = capsys.readouterr().out
    for option in ("--fp16", "--no-fp16", "--sizes", "--min-size", "--static", "--max-batch", "--dry-run", "--timing-cache"):
        assert option in text


# --- ONNX Runtime's TensorRT execution provider ---------------------------------------------------------------


def test_ort_tensorrt_provider_options(fake_export, monkeypatch):
    monkeypatch.setattr("sdrt.backends.tensorrt_machine.machine_info", lambda device_id=0: H100)
    manifest = read_manifest(fake_export)
    providers = session_providers("tensorrt", UNET, manifest, export_dir=fake_export)
    (name, options), (cuda, cuda_options), cpu = providers
    assert (name, cuda, cpu) == ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    assert options["trt_profile_min_shapes"] == "sample:1x4x8x8,timestep:1,encoder_hidden_states:1x77x768"
    assert options["trt_profile_opt_shapes"] == "sample:2x4x64x64,timestep:2,encoder_hidden_states:2x77x768"
    assert options["trt_profile_max_shapes"] == "sample:8x4x128x128,timestep:8,encoder_hidden_states:8x77x768"
    assert options["trt_fp16_enable"] is True and options["trt_engine_cache_enable"] is True
    assert ".ort_trt_cache" in options["trt_engine_cache_path"]
    assert session_providers("cuda", UNET, manifest) == [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    assert session_providers("cpu", UNET, manifest) == ["CPUExecutionProvider"]
    assert shape_string({"latent": (1, 4, 8, 8)}) == "latent:1x4x8x8"


# --- the Engine class against a stand-in for TensorRT's runtime API (CPU tensors) ----------------------------


def fake_tensorrt():
    """A `tensorrt` module with the runtime calls Engine makes: its engine reads and writes the bound addresses,
    computing out_sample = 2 * sample + timestep. It checks the calling sequence, not TensorRT itself."""
    import ctypes
    import types

    def view(ptr, shape):
        return np.ctypeslib.as_array((ctypes.c_float * int(np.prod(shape))).from_address(ptr)).reshape(shape)

    class Context:
        def __init__(self, engine):
            self.engine, self.shapes, self.addresses = engine, {}, {}

        def set_input_shape(self, name, shape):
            lo, _, hi = self.engine.profile[name]
            self.shapes[name] = tuple(shape)
            return all(a <= s <= b for s, a, b in zip(shape, lo, hi))

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = ptr
            return True

        def get_tensor_shape(self, name):
            return self.shapes["sample"]

        def execute_async_v3(self, stream):
            sample = view(self.addresses["sample"], self.shapes["sample"])
            t = view(self.addresses["timestep"], self.shapes["timestep"])
            view(self.addresses["out_sample"], self.shapes["sample"])[:] = 2 * sample + t[:, None, None, None]
            return True

    class Engine:
        def __init__(self, spec):
            self.profile = {k: [tuple(s) for s in v] for k, v in spec["profile"].items()}
            self.names = [*self.profile, *spec["outputs"]]
            self.num_io_tensors = len(self.names)

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if name in self.profile else trt.TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return trt.DataType.FLOAT

        def get_tensor_profile_shape(self, name, index):
            return self.profile[name]

        def create_execution_context(self):
            return Context(self)

    class Runtime:
        def deserialize_cuda_engine(self, data):
            try:
                return Engine(json.loads(bytes(data)))
            except ValueError:
                return None

    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.7.0"
    trt.TensorIOMode = types.SimpleNamespace(INPUT="input", OUTPUT="output")
    trt.DataType = types.SimpleNamespace(FLOAT="float32")
    trt.Runtime = Runtime
    return trt


def test_engine_binds_runs_and_reuses_buffers(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    import sys

    from sdrt.backends.tensorrt_backend import Engine

    trt = fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    contract = build_contracts(TINY)[UNET]
    profile = network_profile(contract, TINY, TINY_LIMITS)
    plan = tmp_path / "unet.plan"
    plan.write_text(json.dumps({"profile": profile, "outputs": ["out_sample"]}))
    engine = Engine(trt.Runtime(), plan, contract, torch.device("cpu"))
    assert engine.limits["sample"] == ((1, 4, 4, 4), (2, 4, 8, 8), (4, 4, 16, 16))

    feeds = {k: torch.from_numpy(v) for k, v in contract.sample_inputs({"unet_batch": 2, "latent_height": 8, "latent_width": 8}).items()}
    out = engine.infer(feeds, stream_handle=0)["out_sample"]
    want = 2 * feeds["sample"] + feeds["timestep"][:, None, None, None]
    torch.testing.assert_close(out, want)
    again = engine.infer(feeds, stream_handle=0)["out_sample"]
    assert again.data_ptr() == out.data_ptr()  # one buffer per shape, reused
    small = {k: v[:1] for k, v in feeds.items()}
    assert engine.infer(small, stream_handle=0)["out_sample"].shape == (1, 4, 8, 8) and len(engine.buffers) == 2
    big = contract.sample_inputs({"unet_batch": 2, "latent_height": 32, "latent_width": 32})
    with pytest.raises(InputError, match=r"'sample' has shape \(2, 4, 32, 32\); this engine serves \(1, 4, 4, 4\) to \(4, 4, 16, 16\)"):
        engine.infer({k: torch.from_numpy(v) for k, v in big.items()}, stream_handle=0)

    plan.write_text(json.dumps({"profile": {"sample": profile["sample"]}, "outputs": ["out_sample"]}))
    with pytest.raises(ModelError, match="but the unet contract says"):
        Engine(trt.Runtime(), plan, contract, torch.device("cpu"))
    plan.write_bytes(b"not an engine")
    with pytest.raises(ModelError, match="TensorRT could not deserialise"):
        Engine(trt.Runtime(), plan, contract, torch.device("cpu"))


# --- with TensorRT and a GPU: engines against ONNX Runtime ------------------------------------------------------


@pytest.fixture(scope="module")
def trt_builds(onnx_sd1, tmp_path_factory):
    base = tmp_path_factory.mktemp("trt")
    builds = {}
    for precision, fp16 in (("fp32", False), ("fp16", True)):
        out = base / precision
        build_engines(onnx_sd1, out, fp16=fp16, sizes="32x32,128x128", max_batch=2, timing_cache=base / "timing.cache", progress=False)
        builds[precision] = out
    return builds


@pytest.mark.tensorrt
@needs_tensorrt
@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-3), ("fp16", 5e-2)])
def test_engines_match_onnx_runtime(trt_builds, onnx_sd1, precision, tolerance):
    from sdrt.backends.onnx_backend import OnnxBackend
    from sdrt.backends.tensorrt_backend import TensorRTBackend

    folder = trt_builds[precision]
    manifest = read_manifest(folder)
    trt_backend = TensorRTBackend(folder, manifest)
    reference = OnnxBackend(onnx_sd1, read_manifest(onnx_sd1), providers=["CPUExecutionProvider"])
    dims = {"batch": 2, "unet_batch": 3, "image_height": 96, "image_width": 64, "latent_height": 12, "latent_width": 8}
    for network in NETWORKS:
        feeds = manifest.contracts[network].sample_inputs(dims, seed=3)
        got, want = trt_backend.run(network, feeds), reference.run(network, feeds)
        for name in want:
            rel = np.abs(got[name] - want[name]).max() / np.abs(want[name]).max()
            assert rel <= tolerance, f"{network}.{name}: {rel:.2e} ({precision})"


@pytest.mark.tensorrt
@needs_tensorrt
def test_device_path_and_shape_limits(trt_builds):
    import torch

    from sdrt.backends.tensorrt_backend import TensorRTBackend

    folder = trt_builds["fp32"]
    backend = TensorRTBackend(folder, read_manifest(folder))
    feeds = backend.contracts[UNET].sample_inputs({"unet_batch": 2, "latent_height": 8, "latent_width": 8}, seed=4)
    host = backend.run(UNET, feeds)["out_sample"]
    dev = {k: torch.from_numpy(v).cuda() for k, v in feeds.items()}
    out = backend.device_unet()(dev["sample"], dev["timestep"][:1], dev["encoder_hidden_states"])  # scalar timestep
    np.testing.assert_allclose(out.cpu().numpy(), backend.run(UNET, {**feeds, "timestep": np.repeat(feeds["timestep"][:1], 2)})["out_sample"], rtol=1e-5, atol=1e-5)
    assert np.isfinite(host).all()
    too_big = backend.contracts[UNET].sample_inputs({"unet_batch": 2, "latent_height": 32, "latent_width": 32})
    with pytest.raises(InputError, match="this engine serves"):
        backend.run(UNET, too_big)
    with pytest.raises(ModelError, match="does not fit here"):
        TensorRTBackend(folder, read_manifest(folder), machine=MachineInfo("Other GPU", "1.0", "10.0.0"))


# --- TensorRT 10.x and 11.x API surfaces (fake modules: tests/fake_tensorrt.py) -----------------------------------

import sys  # noqa: E402

import fake_tensorrt as fake_trt_api  # noqa: E402


@pytest.fixture
def fake_trt(monkeypatch):
    """install(version, **faults) puts a fake `tensorrt` of that version into sys.modules."""

    def install(version, **faults):
        module = fake_trt_api.make(version, **faults)
        monkeypatch.setitem(sys.modules, "tensorrt", module)
        tensorrt_status.cache_clear()
        return module

    yield install
    tensorrt_status.cache_clear()


@pytest.mark.parametrize("version", ["10.13.0", "11.4.0"])
def test_engine_build_uses_only_the_api_both_versions_have(fake_trt, tmp_path, version):
    from sdrt.export.tensorrt_build import build_with_tensorrt

    trt = fake_trt(version)
    profile = {"sample": ((1, 4, 8, 8), (2, 4, 8, 8), (2, 4, 16, 16))}
    cache = tmp_path / "timing.cache"
    for flags in ({"precision": "fp16", "strongly_typed": True, "converted": "sdrt.export.fp16/1", "tf32": False},
                  {"precision": "fp32", "strongly_typed": True, "converted": None, "tf32": False}):  # fmt: skip
        engine = json.loads(bytes(build_with_tensorrt(tmp_path / "model.onnx", profile, flags, cache)))
        assert engine["inputs"]["sample"] == [[1, 4, 8, 8], [2, 4, 8, 8], [2, 4, 16, 16]]
    assert cache.read_bytes() == b"tt"  # loaded, updated, saved, twice
    set_flags = [c for c in trt.calls if c[0] == "set_flag"]
    assert set_flags == []  # no precision flags: TensorRT 11 has none, 10.12+ deprecates them
    networks = [c[1] for c in trt.calls if c[0] == "create_network"]
    strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    assert networks == ([1 << strongly] * 2 if strongly is not None else [0, 0])  # 11: always strongly typed
    assert ("clear_flag", trt.BuilderFlag.TF32) in trt.calls


def test_fp16_engines_from_an_fp32_export_are_converted_first(fake_export, tmp_path):
    converter, builder = FakeConverter(), FakeBuilder()
    out = tmp_path / "trt"
    report = build(fake_export, out, tmp_path, builder=builder, converter=converter)
    assert [c[0] for c in converter.calls] == list(NETWORKS) and builder.calls == list(NETWORKS)
    engines = read_manifest(out).extras["engines"]
    assert {e["flags"]["converted"] for e in engines.values()} == {"sdrt.export.fp16/1"}  # recorded in the manifest
    assert not (out / ".fp16").exists()  # the converted graphs do not stay
    fp32 = build(fake_export, tmp_path / "trt32", tmp_path, fp16=False, converter=(c32 := FakeConverter()))
    assert c32.calls == [] and report.plans[UNET].key != fp32.plans[UNET].key  # the conversion is in the key


def test_fp16_conversion_of_a_real_graph(tmp_path):
    """The converter sdrt build uses on fp32 exports: an fp16 graph with float32 I/O, close to fp32 on ORT CPU."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from sdrt.export.fp16 import convert_file

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["sample", "w"], ["h"]), helper.make_node("Tanh", ["h"], ["out_sample"])],
        "g",
        [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("out_sample", TensorProto.FLOAT, ["batch", 16])],
        [w],
    )
    src, dst = tmp_path / "fp32.onnx", tmp_path / "fp16" / "model.onnx"
    dst.parent.mkdir()
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    convert_file(src, dst)
    model = onnx.load(str(dst))
    assert model.graph.initializer[0].data_type == TensorProto.FLOAT16
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    x = rng.standard_normal((2, 16)).astype(np.float32)
    run = lambda path: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"sample": x})[0]  # noqa: E731
    assert np.abs(run(dst) - run(src)).max() < 5e-3


def test_driver_too_old_for_the_cuda_13_build_is_named(fake_trt, monkeypatch):
    from sdrt.backends import tensorrt_machine as tb

    fake_trt("11.4.0")
    monkeypatch.setattr(tb, "nvidia_driver_version", lambda: "550.54.15")
    ok, why = tb.tensorrt_status()
    assert not ok and "TensorRT 11.4.0 is the CUDA 13 build and needs NVIDIA driver 580.65 or newer; this machine has 550.54.15" in why
    assert "tensorrt-cu12" in why
    tb.tensorrt_status.cache_clear()
    monkeypatch.setattr(tb, "nvidia_driver_version", lambda: "580.95.05")
    assert tb.tensorrt_status() == (True, "TensorRT 11.4.0 (CUDA 13 build), NVIDIA driver 580.95.05")
    tb.tensorrt_status.cache_clear()
    fake_trt("10.13.0")
    monkeypatch.setattr(tb, "nvidia_driver_version", lambda: "550.54.15")
    assert tb.tensorrt_status() == (True, "TensorRT 10.13.0 (CUDA 12 build), NVIDIA driver 550.54.15")
    tb.tensorrt_status.cache_clear()
    monkeypatch.setattr(tb, "nvidia_driver_version", lambda: None)
    monkeypatch.setattr(sys.modules["tensorrt"], "Builder", lambda logger: None)
    ok, why = tb.tensorrt_status()
    assert not ok and "no NVIDIA driver is loaded" in why


def test_driver_version_is_read_from_proc(monkeypatch, tmp_path):
    from sdrt.backends import tensorrt_machine as tb

    text = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  (dvs-builder@U16)\nGCC version:  gcc 12"
    real = tb.Path

    class FakePath(type(real())):
        def read_text(self, *a, **k):
            if str(self) == "/proc/driver/nvidia/version":
                return text
            return super().read_text(*a, **k)

    monkeypatch.setattr(tb, "Path", FakePath)
    assert tb.nvidia_driver_version() == "580.65.06"


def _fake_engine_file(tmp_path, trt, batch=(1, 4)):
    profile = {"sample": [[batch[0], 4, 8, 8], [batch[0], 4, 8, 8], [batch[1], 4, 8, 8]],
               "timestep": [[batch[0]], [batch[0]], [batch[1]]],
               "encoder_hidden_states": [[batch[0], 77, 32], [batch[0], 77, 32], [batch[1], 77, 32]]}  # fmt: skip
    path = tmp_path / "unet.plan"
    path.write_text(json.dumps({"inputs": profile, "outputs": ["out_sample"], "memory": 4096}))
    return path


@pytest.mark.parametrize("version", ["10.13.0", "11.4.0"])
def test_graph_replay_after_another_shape_is_right(fake_trt, tmp_path, version):
    """Capture batch 1, run batch 2, replay batch 1: the replay must compute batch 1 (one context per shape set)."""
    import torch

    from sdrt.backends.tensorrt_backend import DeviceScratch, Engine

    trt = fake_trt(version)
    contract = build_contracts(TINY)[UNET]
    scratch = DeviceScratch("cpu")
    engine = Engine(trt.Runtime(trt.Logger()), _fake_engine_file(tmp_path, trt), contract, "cpu", scratch)

    def feeds(batch, value):
        return {"sample": torch.full((batch, 4, 8, 8), value), "timestep": torch.zeros(batch), "encoder_hidden_states": torch.zeros(batch, 77, 32)}

    one = feeds(1, 1.0)
    engine.infer(one, 0)  # warm-up at the capture's shapes, as torch.cuda.graph wants
    graph = fake_trt_api.capture()
    out_one = engine.infer(one, 0)["out_sample"]
    fake_trt_api.end_capture()
    out_two = engine.infer(feeds(2, 5.0), 0)["out_sample"]
    assert torch.equal(out_two, torch.full((2, 4, 8, 8), 12.0))  # 5 * 2 + batch 2
    one["sample"].fill_(3.0)
    out_one.zero_()
    fake_trt_api.replay(graph)
    assert torch.equal(out_one, torch.full((1, 4, 8, 8), 7.0))  # 3 * 2 + batch 1, not + 2
    assert len(engine.contexts) == 2
    strategies = {c[1] for c in trt.calls if c[0] == "create_execution_context"}
    assert strategies == {"USER_MANAGED"}  # the contexts share the backend's scratch, not a reservation each
    assert all(c.device_memory == (scratch.tensor.data_ptr(), 4096) for c in engine.engine.contexts)


def test_context_and_address_failures_are_backend_errors(fake_trt, tmp_path):
    import torch

    from sdrt.backends.tensorrt_backend import DeviceScratch, Engine

    contract = build_contracts(TINY)[UNET]
    feeds = {"sample": torch.ones(1, 4, 8, 8), "timestep": torch.zeros(1), "encoder_hidden_states": torch.zeros(1, 77, 32)}
    trt = fake_trt("11.4.0", fail_context=True)
    engine = Engine(trt.Runtime(trt.Logger()), _fake_engine_file(tmp_path, trt), contract, "cpu", DeviceScratch("cpu"))
    with pytest.raises(BackendError, match=r"could not create an execution context for the unet engine .*out of GPU memory.*sdrt build"):
        engine.infer(feeds, 0)
    trt = fake_trt("10.13.0", refuse_address=True)
    engine = Engine(trt.Runtime(trt.Logger()), _fake_engine_file(tmp_path, trt), contract, "cpu", None)
    with pytest.raises(BackendError, match="TensorRT refused the address of unet tensor 'sample'"):
        engine.infer(feeds, 0)
    assert [c[1] for c in trt.calls if c[0] == "create_execution_context"] == ["STATIC"]  # no scratch: its own memory


def test_device_unet_feeds_the_step_invariant_inputs():
    """The device loop's UNet callable passes SDXL's text_embeds/time_ids (and timestep_cond) to the engine with the
    sample, broadcasting a scalar timestep to the batch (no CUDA needed: run_device is replaced)."""
    import types

    torch = pytest.importorskip("torch")
    from sdrt.backends.tensorrt_backend import TensorRTBackend

    seen = {}
    fake = types.SimpleNamespace(run_device=lambda network, feeds: seen.update(network=network, feeds=feeds) or {"out_sample": 1})
    unet = TensorRTBackend.device_unet(fake)
    extra = {"text_embeds": torch.zeros(2, 8), "time_ids": torch.zeros(2, 6)}
    assert unet(torch.zeros(2, 4, 8, 8), torch.tensor(5.0), torch.zeros(2, 77, 32), **extra) == 1
    assert seen["network"] == UNET and set(seen["feeds"]) == {"sample", "timestep", "encoder_hidden_states", *extra}
    assert tuple(seen["feeds"]["timestep"].shape) == (2,)
