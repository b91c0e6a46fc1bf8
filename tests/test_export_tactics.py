"""Convolution tactics measured on the machine (sdrt.export.tactics): every form exports the same function as
PyTorch's convolution, the picker takes the fastest past a margin and caches it, and a measured export records
its picks and passes the export's own parity check."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
import torch.nn.functional as F  # noqa: E402

from sdrt.export import tactics  # noqa: E402

FORMS = [("conv", t) for t in tactics.CONV_TACTICS] + [("upsampler", t) for t in tactics.UPSAMPLER_TACTICS]


@pytest.mark.parametrize("kind, tactic", FORMS)
def test_each_form_in_onnx_runtime_equals_pytorch(kind, tactic, tmp_path):
    import onnxruntime as ort

    torch.manual_seed(0)
    module = tactics.tactic_module(kind, tactic, 6, 5)
    x = torch.randn(2, 6, 9, 7)  # odd sizes: partial Winograd tiles
    tactics.export_tactic(module, x, tmp_path / "t.onnx")
    session = ort.InferenceSession(str(tmp_path / "t.onnx"), providers=["CPUExecutionProvider"])
    for shape in [(1, 6, 9, 7), (3, 6, 12, 16)]:  # other batches and sizes than the trace's
        x = torch.randn(shape)
        with torch.no_grad():
            ref = module.conv(F.interpolate(x, scale_factor=2.0, mode="nearest") if kind == "upsampler" else x).numpy()
        out = session.run(None, {"x": x.numpy()})[0]
        # F(4x4)'s transforms reach 8 and 1/24: ~6e-6 of the range in fp32; the others ~1e-6
        assert out.shape == ref.shape and np.abs(out - ref).max() <= 2e-5 * np.abs(ref).max()


def test_time_tactics_times_every_form():
    times = tactics.time_tactics("upsampler", 4, 4, 1, 6, 6, list(tactics.UPSAMPLER_TACTICS), threads=1, repeats=2)
    assert set(times) == set(tactics.UPSAMPLER_TACTICS) and all(0 < t < 10 for t in times.values())


def test_picker_takes_the_fastest_past_the_margin_and_caches_it(tmp_path, monkeypatch):
    calls = []

    def fake(kind, ci, co, batch, h, w, forms, threads):
        calls.append((kind, ci, co, batch, h, w, threads))
        return {"direct": 1.0, "f2": 0.97, "f4": 0.5 if h >= 32 else 2.0}

    picker = tactics.TacticPicker(2, tmp_path, measure=fake)
    assert picker.pick("conv", 8, 8, 1, 32, 32, rule="f2") == "f4"  # 2x faster than the rule's
    assert picker.pick("conv", 8, 8, 1, 16, 16, rule="direct") == "direct"  # f2 only 3% faster: noise, keep the rule
    # timed once per shape, and the departure from the rule (f4 for f2) timed a second time: 3 measurements
    assert picker.pick("conv", 8, 8, 1, 32, 32, rule="f2") == "f4" and len(calls) == 3
    assert calls[0][-1] == 2  # the export's threads
    rec = picker.records[tactics.conv_key("conv", 8, 8, 1, 16, 16)]
    assert rec["rule"] == "direct" and rec["pick"] == "direct" and rec["times_ms"]["f2"] == 970.0
    again = tactics.TacticPicker(2, tmp_path, measure=lambda *a: pytest.fail("re-measured a cached shape"))
    assert again.pick("conv", 8, 8, 1, 32, 32, rule="f2") == "f4"  # read from the cache file
    assert picker.cache_file.parent == tmp_path and "-2t" in picker.cache_file.name
    assert tactics.TacticPicker(1, tmp_path, measure=fake).cache_file != picker.cache_file  # per thread count
    monkeypatch.setattr(tactics, "cpu_isa", lambda: "avx avx2 fma f16c avx512f")  # same model name, other vectors
    assert tactics.TacticPicker(2, tmp_path, measure=fake).cache_file != picker.cache_file
    monkeypatch.undo()
    picker.cache_file.write_text("{broken")
    assert tactics.TacticPicker(2, tmp_path, measure=fake).pick("conv", 8, 8, 1, 32, 32, rule="f2") == "f4"


def test_a_departure_from_the_rule_that_a_second_timing_does_not_confirm_keeps_the_rule(tmp_path):
    """A burst of load during the first timing made the rule's form look slow; the second timing of the two says not."""
    timings = iter([{"direct": 2.0, "f2": 1.0, "f4": 3.0}, {"f2": 1.0, "direct": 0.98}])
    picker = tactics.TacticPicker(2, tmp_path, measure=lambda *args: next(timings))
    assert picker.pick("conv", 8, 8, 1, 16, 16, rule="direct") == "direct"
    assert picker.records[tactics.conv_key("conv", 8, 8, 1, 16, 16)]["times_ms"] == {"direct": 980.0, "f2": 1000.0, "f4": 3000.0}


def test_measured_export_exports_and_records_the_picks(tiny_sd1, tmp_path, monkeypatch):
    from sdrt.contracts import ShapeLimits
    from sdrt.errors import InputError
    from sdrt.export.onnx_export import export_model
    from sdrt.model.manifest import read_manifest

    limits = ShapeLimits(min_size=32, opt_size=64, max_size=64, max_batch=1)
    with pytest.raises(InputError, match="add --winograd"):
        export_model(tiny_sd1, tmp_path / "x", conv_tactics="measure", limits=limits, progress=False)
    with pytest.raises(InputError, match="'fastest' is not one of rule, measure"):
        export_model(tiny_sd1, tmp_path / "x", winograd=True, conv_tactics="fastest", limits=limits, progress=False)
    with pytest.raises(InputError, match="go with conv_tactics 'measure'"):
        export_model(tiny_sd1, tmp_path / "x", winograd=True, tactic_threads=2, limits=limits, progress=False)
    with pytest.raises(InputError, match="tactic_threads 0 must be at least 1"):
        export_model(tiny_sd1, tmp_path / "x", winograd=True, conv_tactics="measure", tactic_threads=0, limits=limits, progress=False)
    seen = []

    def fake(kind, ci, co, batch, h, w, forms, threads):  # every form somewhere: F(2x2) wide, F(4x4) narrow, stock upsampling
        seen.append((kind, batch, h))
        best = {"conv": "f2" if ci * co >= 32 * 32 else "f4", "upsampler": "plain"}[kind]
        return {f: 0.1 if f == best else 1.0 for f in forms}

    monkeypatch.setattr(tactics, "time_tactics", fake)
    export_model(tiny_sd1, tmp_path / "m", winograd=True, conv_tactics="measure", tactic_threads=3,
                 tactic_cache_dir=tmp_path / "cache", limits=limits, progress=False)  # parity-checked against PyTorch
    manifest = read_manifest(tmp_path / "m")
    record = manifest.extras["conv_tactics"]
    assert record["mode"] == "measure" and record["threads"] == 3 and set(record["picks"]) >= {"unet", "vae_decoder"}
    picks = [p["pick"] for net in record["picks"].values() for p in net.values()]
    assert {"f2", "f4", "plain"} <= set(picks)
    assert manifest.extras["subpixel_upsamplers"]["vae_decoder"] == 0  # stock upsampling measured fastest
    assert manifest.extras["winograd_convs"]["vae_decoder"] > 0
    assert {b for _, b, _ in seen} == {1, 2}  # the UNet timed at its guided batch (2), the VAE at one image
    assert {h for _, _, h in seen} >= {8, 64}  # sizes at the opt size (64 px), not the trace's
    assert json.loads(next((tmp_path / "cache").glob("*-3t.json")).read_text())


def test_bench_exports_with_measured_tactics_at_its_threads(tiny_sd1, tmp_path, monkeypatch):
    import subprocess

    from sdrt.bench import BenchConfig
    from sdrt.bench.models import cached_export

    commands = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **k: commands.append(cmd) or subprocess.CompletedProcess(cmd, 0, "", ""))
    cached_export(tiny_sd1, 64, 1, BenchConfig(cache_dir=tmp_path, threads=3), log=lambda *a: None)
    cmd = commands[0]
    assert "--winograd" in cmd and cmd[cmd.index("--conv-tactics") + 1] == "measure"
    assert cmd[cmd.index("--tactic-threads") + 1] == "3" and cmd[cmd.index("--opt-size") + 1] == "64"
    assert cmd[cmd.index("--tactic-cache-dir") + 1] == str(tmp_path / "conv-tactics")  # cached beside the exports
    cached_export(tiny_sd1, 64, 1, BenchConfig(cache_dir=tmp_path, threads=3, device="cuda"), log=lambda *a: None)
    assert "--conv-tactics" not in commands[1] and "--winograd" not in commands[1]  # TensorRT picks its own kernels
