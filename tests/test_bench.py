"""`sdrt bench`: one short run on the tiny model (torch + onnx backends, diffusers in-process) writes a complete
record, a table and a chart. No timing thresholds: the figures themselves are in benchmarks/results/."""

import json

import pytest

from sdrt.bench import STAGES, derive, plan_groups, summarize
from sdrt.cli import main


def test_bench_tiny_model_writes_a_complete_record(tiny_sd1, onnx_sd1, tmp_path, capsys):
    out, chart, table = tmp_path / "bench.json", tmp_path / "bench.png", tmp_path / "bench.md"
    code = main(["bench", str(tiny_sd1), "--export", str(onnx_sd1), "--backends", "torch,onnx",
                 "--baselines", "diffusers,optimum", "--in-process", "diffusers", "--no-create-envs",
                 "--steps", "2", "--runs", "1", "--warmup", "1", "--threads", "1", "--cache-dir", str(tmp_path / "cache"),
                 "--json", str(out), "--chart", str(chart), "--markdown", str(table), "-q"])  # fmt: skip
    assert code == 0
    record = json.loads(out.read_text())
    assert record["schema"] == "sdrt-bench/1"
    assert record["machine"]["cpu"] and record["machine"]["physical_cores"] >= 1 and record["machine"]["platform"]
    for package in ("sdrt", "numpy", "onnxruntime", "torch", "diffusers", "transformers"):
        assert record["libraries"].get(package), package
    assert record["config"]["size"] == 64 and record["config"]["scheduler"] == "PNDMScheduler"
    assert "busy_before" in record and "order" in record

    for name in ("sdrt-onnx", "sdrt-torch", "diffusers"):
        entry = record["runners"][name]
        assert "error" not in entry, entry.get("error")
        assert entry["load_s"][0] > 0 and entry["versions"] and entry["describe"]
        [sample] = entry["samples"]["1"]
        assert sample["unet_calls"] == 3  # PNDM: steps + 1 UNet calls
        stats = entry["stats"]["1"]
        for stage in STAGES:
            if stage != "gpu_peak_bytes":  # CUDA only
                assert stats[stage] is not None and stats[stage]["n"] == 1, (name, stage)
        assert stats["e2e_s"]["median"] > stats["unet_total_s"]["median"] > 0
    # A baseline that cannot run here is recorded with the reason; the others go on.
    assert "venv" in record["runners"]["optimum"]["error"]
    ratios = record["speedups"]["sdrt-onnx"]["diffusers"]["1"]
    assert ratios["e2e_s"] > 0 and ratios["unet_call_s"] > 0 and ratios["decode_s"] > 0

    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = table.read_text()
    assert "| sdrt-onnx | 1 |" in text and "| diffusers | 1 |" in text and "optimum | - | not measured" in text
    assert "| sdrt-onnx | 1 |" in capsys.readouterr().out


def test_derived_stages():
    s = derive({"e2e_s": 2.0, "text_s": 0.1, "unet_s": [0.4, 0.5, 0.6], "loop_s": 1.53, "decode_s": 0.3}, batch=2)
    assert s["unet_calls"] == 3 and s["unet_call_s"] == 0.5 and s["unet_total_s"] == pytest.approx(1.5)
    assert s["overhead_step_s"] == pytest.approx(0.01) and s["overhead_pct"] == pytest.approx(100 * 0.01 / 0.51)
    assert s["images_per_s"] == 1.0
    stats = summarize([3.0, 1.0, 2.0, None])
    assert stats["median"] == 2.0 and stats["min"] == 1.0 and stats["max"] == 3.0 and stats["n"] == 3


def test_groups_when_memory_is_short():
    names = ["sdrt-onnx", "diffusers", "optimum"]
    assert plan_groups(names, "interleaved", 0)[0] == [names]
    assert plan_groups(names, "pairs", 0)[0] == [["sdrt-onnx", "diffusers"], ["sdrt-onnx", "optimum"]]
    assert plan_groups(names, "auto", 10**15)[0] == [["sdrt-onnx", "diffusers"], ["sdrt-onnx", "optimum"]]


def test_bench_tiny_sdxl_times_both_text_encoders(tiny_sdxl, onnx_sdxl, tmp_path):
    """SDXL folders load the baselines' SDXL pipeline classes (benchmarks/baselines, common.is_sdxl); both text
    encoders are timed, in sdrt and in diffusers alike (guidance with force_zeros: one call each)."""
    out = tmp_path / "bench.json"
    code = main(["bench", str(tiny_sdxl), "--export", str(onnx_sdxl), "--backends", "onnx", "--baselines", "diffusers",
                 "--in-process", "diffusers", "--no-create-envs", "--steps", "2", "--runs", "1", "--warmup", "0",
                 "--threads", "1", "--cache-dir", str(tmp_path / "cache"), "--json", str(out), "-q"])  # fmt: skip
    assert code == 0
    record = json.loads(out.read_text())
    assert record["config"]["facts"]["family"] == "sdxl"
    assert "StableDiffusionXLPipeline" in record["runners"]["diffusers"]["describe"]
    for name in ("sdrt-onnx", "diffusers"):
        [sample] = record["runners"][name]["samples"]["1"]
        assert sample["text_calls"] == 2 and sample["unet_calls"] == 2, (name, sample)


def test_sequential_order_compares_runs_apart():
    assert plan_groups(["sdrt-onnx", "openvino"], "sequential", 0)[0] == [["sdrt-onnx"], ["openvino"]]
    from sdrt.bench import speedups

    run = lambda e2e, group: {"e2e_s": e2e, "unet_s": [1.0], "loop_s": 1.0, "decode_s": 1.0, "group": group}  # noqa: E731
    record = {"order": "sequential, one runner at a time", "groups": [{"runners": ["sdrt-onnx"]}, {"runners": ["openvino"]}],
              "runners": {"sdrt-onnx": {"samples": {"1": [run(2.0, 0)]}}, "openvino": {"samples": {"1": [run(3.0, 1)]}}}}
    ratios = speedups(record)["sdrt-onnx"]["openvino"]["1"]
    assert ratios["e2e_s"] == pytest.approx(1.5) and ratios["side_by_side"] is False
    record["order"] = "pairs"  # runners in different groups of a paired run are never compared
    assert speedups(record) == {}


def test_rounds_keep_one_order_so_every_run_follows_the_other_runner():
    """Each measured run comes right after one run of the other runner (a rotating order ran A B | B A | A B, which
    gave the reference more runs after two of the other's)."""
    from sdrt.bench import BenchConfig, _measure_group

    calls = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def load(self, request):
            return {"load_s": 0.0}

        def run(self, batch, seed):
            calls.append(self.name)
            return {"e2e_s": 1.0}

        def vae_encode(self, batch, seed):
            return 0.1

        def close(self):
            pass

    record = {"runners": {"sdrt-onnx": {"samples": {}}, "diffusers": {"samples": {}}}}
    cfg = BenchConfig(runs=3, warmup=1, settle_s=0)
    _measure_group(0, [Fake("sdrt-onnx"), Fake("diffusers")], cfg, {}, record, log=lambda *a: None)
    assert calls == ["sdrt-onnx", "diffusers"] * 4
    assert len(record["runners"]["sdrt-onnx"]["samples"]["1"]) == 3
