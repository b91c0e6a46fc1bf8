"""Benchmark sdrt's backends side by side with the pipelines users would pick instead.

    result = run_bench(BenchConfig(model="path/sd", backends=("onnx",), baselines=("diffusers", "optimum")))
    print(format_table(result))

Per runner (an sdrt backend, or a baseline: diffusers, optimum's ONNX Runtime pipeline, OpenVINO) and batch size
it records, per run: end-to-end latency, text encoding, each UNet call (guidance batched, so a call is one step's
network work; PNDM makes n+1 calls for n steps), the loop's own time, VAE decode, a separate VAE encode, and the
process's peak RSS (GPU memory on CUDA). From those: the UNet call's median, the loop overhead per step (loop time
minus the UNet calls, over the calls: scheduler, guidance combine, copies), images per second. Load time is
apart from run time. Warm-up rounds first; then rounds interleave the runners (rotating their order each round),
so drift on the machine hits all of them alike; median, quartiles and min/max over the runs.

sdrt runs in this process (as users run it); each baseline runs in a worker process from
benchmarks/baselines/, in a venv of its own that this module creates once in the cache (their pins conflict
with each other and with sdrt's), speaking JSON lines (see benchmarks/baselines/common.py). When the runners do
not fit in memory together, they are measured in groups: the first runner (the reference) with each other one
in turn, and each ratio comes from one group.

Light imports: numpy and the standard library; torch, matplotlib and psutil only where used.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from sdrt import __version__
from sdrt.errors import InputError, ModelError, SdrtError

SCHEMA = "sdrt-bench/1"
PROMPT = "a photo of an astronaut riding a horse on mars"  # the same in benchmarks/baselines/common.py
TORCH_PIN = "torch==2.13.0"  # installed first, by exact pin: a bare `torch` pulls a multi-GB CUDA build
BASELINES_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "baselines"  # a source checkout's
# Per-run figures, in table order; the derived ones are computed from each run's raw sample.
STAGES = ("e2e_s", "text_s", "unet_call_s", "unet_total_s", "overhead_step_s", "overhead_pct", "decode_s", "encode_s",
          "images_per_s", "peak_rss_bytes", "gpu_peak_bytes")  # fmt: skip
# Peak resident memory while running, as a multiple of the fp32 weights: measured on the SD 1.5-shape model at
# 256x256 (benchmarks/results/sd15-random-256px-4steps.json); sdrt-torch and TensorRT (GPU) are estimates.
MEMORY_FACTOR = {"sdrt-onnx": 1.6, "sdrt-torch": 1.2, "sdrt-tensorrt": 1.0, "diffusers": 1.2, "optimum": 1.4, "openvino": 2.3}


@dataclasses.dataclass(frozen=True)
class Baseline:
    name: str
    script: str
    packages: tuple[str, ...]  # pip-installed after TORCH_PIN in the baseline's own venv; () runs in this venv
    label: str
    remove: tuple[str, ...] = ()  # uninstalled afterwards: pulled in by a pin but breaking imports here


# Their pins conflict with each other and with sdrt's (diffusers 0.42 needs huggingface-hub>=1.32; optimum-onnx
# 0.1.0 needs transformers<4.58, so hub<1.0; optimum-intel 2.2.0 needs hub<1.22, and transformers 5 needs
# diffusers >= 0.39 (0.36 imports MT5Tokenizer)): exact pins spare pip minutes of backtracking.
BASELINES = {
    "diffusers": Baseline("diffusers", "diffusers_worker.py", (), "diffusers StableDiffusionPipeline (PyTorch)"),
    "optimum": Baseline("optimum", "optimum_worker.py",
                        ("optimum-onnx[onnxruntime]==0.1.0", "optimum==2.1.0", "transformers==4.57.3",
                         "huggingface-hub<1.0", "diffusers==0.36.0"),
                        "optimum ORTStableDiffusionPipeline (ONNX Runtime)"),
    "openvino": Baseline("openvino", "openvino_worker.py",
                         ("optimum-intel[openvino]==2.2.0", "optimum==2.3.0", "transformers==5.5.4",
                          "huggingface-hub>=1.5,<1.22", "diffusers==0.39.0"),
                         "optimum-intel OVStableDiffusionPipeline (OpenVINO)",
                         # PyPI's torchvision fails against the CPU torch wheel ("operator torchvision::nms does not
                         # exist") and transformers then refuses AutoProcessor; nothing here needs torchvision.
                         remove=("torchvision",)),
}  # fmt: skip


def default_cache_dir() -> Path:
    return Path(os.environ.get("SDRT_BENCH_CACHE", Path.home() / ".cache" / "sdrt" / "bench"))


@dataclasses.dataclass
class BenchConfig:
    model: Path | None = None  # diffusers folder or sdrt export (None: the built-in model)
    sd15_random: bool = False  # instead of `model`: SD 1.5's configs with random weights, built once in the cache
    export: Path | None = None  # an sdrt export of `model` for the onnx backend (default: made once in the cache)
    backends: tuple[str, ...] = ("onnx", "torch")
    baselines: tuple[str, ...] = ("diffusers",)
    size: int | None = None  # image side (default: the model's own)
    steps: int = 20
    batches: tuple[int, ...] = (1,)
    runs: int = 5
    warmup: int = 1
    threads: int | None = None  # default: one per physical core, for every runner alike
    guidance: float = 7.5
    device: str = "cpu"
    order: str = "auto"  # "interleaved", "pairs" (the reference with each other runner), "sequential", "auto"
    in_process: tuple[str, ...] = ()  # baselines to run in this process instead of a worker
    baseline_envs: dict = dataclasses.field(default_factory=dict)  # baseline -> venv folder to use as it is
    create_envs: bool = True  # create missing baseline venvs (pip, PyPI)
    cache_dir: Path = dataclasses.field(default_factory=default_cache_dir)
    baselines_dir: Path = BASELINES_DIR
    note: str = ""  # what else ran on the machine, in the user's words (recorded; a snapshot is taken too)


# --- statistics ----------------------------------------------------------------------------------------------


def summarize(values) -> dict | None:
    values = [float(v) for v in values if v is not None]
    if not values:
        return None
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return {"median": float(median), "q1": float(q1), "q3": float(q3), "min": min(values), "max": max(values), "n": len(values)}


def derive(sample: dict, batch: int) -> dict:
    """A run's raw figures -> the per-stage figures of the table."""
    unet = sample.get("unet_s") or []
    calls = len(unet)
    out = {k: sample.get(k) for k in ("e2e_s", "text_s", "decode_s", "encode_s", "peak_rss_bytes", "gpu_peak_bytes")}
    out["unet_calls"] = calls
    out["unet_call_s"] = float(np.median(unet)) if calls else None
    out["unet_total_s"] = float(sum(unet)) if calls else None
    loop = sample.get("loop_s")
    if calls and loop is not None:
        out["overhead_step_s"] = (loop - sum(unet)) / calls
        out["overhead_pct"] = 100.0 * out["overhead_step_s"] / (loop / calls)
    else:
        out["overhead_step_s"] = out["overhead_pct"] = None
    out["images_per_s"] = batch / sample["e2e_s"] if sample.get("e2e_s") else None
    return out


# --- the sdrt runner (in this process) ------------------------------------------------------------------------


class SdrtRunner:
    """One sdrt backend through sdrt's own Pipeline; backend.run is wrapped to time each network call."""

    kind = "in-process"

    def __init__(self, backend: str, folder: Path):
        self.backend, self.folder, self.name = backend, Path(folder), f"sdrt-{backend}"
        self.pipe = None

    def prepare(self, config: dict) -> dict:
        return {}

    def load(self, config: dict) -> dict:
        from sdrt.pipeline import Pipeline

        self.config = config
        options = {"threads": config["threads"]} if self.backend in ("onnx", "torch") else {}
        if self.backend == "onnx" and config.get("device") == "cpu":
            options["providers"] = ["CPUExecutionProvider"]
        if self.backend == "torch":
            options["device"] = config.get("device") or "cpu"
        t0 = time.perf_counter()
        self.pipe = Pipeline.from_pretrained(self.folder, backend=self.backend, **options)
        _cuda_sync()
        load_s = time.perf_counter() - t0
        self.calls: list[tuple[str, float]] = []
        run = self.pipe.backend.run

        def timed_run(network, feeds):
            _cuda_sync()
            t = time.perf_counter()
            out = run(network, feeds)
            _cuda_sync()
            self.calls.append((network, time.perf_counter() - t))
            return out

        self.pipe.backend.run = timed_run
        return {"load_s": load_s, "peak_rss_bytes": peak_rss_bytes(), "versions": library_versions(),
                "describe": self.pipe.backend.describe(), "folder": str(self.folder)}  # fmt: skip

    def run(self, batch: int, seed: int) -> dict:
        c = self.config
        self.calls.clear()

        def call():
            t0 = time.perf_counter()
            out = self.pipe(PROMPT, num_inference_steps=c["steps"], guidance_scale=c["guidance"], height=c["size"],
                            width=c["size"], seed=seed, num_images_per_prompt=batch, progress=False)  # fmt: skip
            _cuda_sync()
            return time.perf_counter() - t0, out

        (e2e_s, out), memory = measure_memory(call)
        by = {n: [s for name, s in self.calls if name == n] for n in ("text_encoder", "unet", "vae_decoder")}
        return {"e2e_s": e2e_s, "text_s": sum(by["text_encoder"]), "text_calls": len(by["text_encoder"]),
                "unet_s": by["unet"], "unet_calls": len(by["unet"]), "loop_s": out.timings["loop"],
                "decode_s": sum(by["vae_decoder"]), **memory}  # fmt: skip

    def vae_encode(self, batch: int, seed: int) -> float | None:
        from sdrt.contracts import VAE_ENCODER

        if not self.pipe.backend.has(VAE_ENCODER):
            return None
        size = self.config["size"]
        image = np.random.default_rng(seed).uniform(-1, 1, (batch, 3, size, size)).astype(np.float32)
        self.calls.clear()
        self.pipe.backend.run(VAE_ENCODER, {"image": image})
        return self.calls[-1][1]

    def close(self) -> None:
        self.pipe = None


# --- baseline runners: a worker process, or the worker's class in this process ------------------------------


class WorkerRunner:
    """A baseline in its own process and venv, driven over JSON lines (benchmarks/baselines/common.py)."""

    kind = "worker"

    def __init__(self, baseline: Baseline, python: str, script: Path, log_dir: Path, threads: int):
        self.baseline, self.name, self.python, self.script = baseline, baseline.name, python, script
        self.log_path = log_dir / f"{self.name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
        self.threads = threads
        self.proc = None

    def _start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "TOKENIZERS_PARALLELISM": "false",
               "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}  # fmt: skip
        self._log = open(self.log_path, "a")
        self.proc = subprocess.Popen([self.python, str(self.script), "--serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._log, text=True, env=env)  # fmt: skip

    def _ask(self, request: dict) -> dict:
        if self.proc is None:
            self._start()
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise RuntimeError(f"the {self.name} worker exited ({self.proc.returncode}): {self._log_tail()}")
        reply = json.loads(line)
        if not reply.pop("ok", False):
            raise RuntimeError(f"{reply.get('error')} (log: {self.log_path})")
        return reply

    def _log_tail(self, lines: int = 6) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-lines:])[-1500:]
        except OSError:
            return "(no log)"

    def prepare(self, config: dict) -> dict:
        """Convert/export into the cache; a worker that did work is restarted, so its memory goes back."""
        reply = self._ask({"op": "prepare", "config": config})
        if not reply.get("cached", True):
            self.close()
        return reply

    def load(self, config: dict) -> dict:
        return self._ask({"op": "load", "config": config})

    def run(self, batch: int, seed: int) -> dict:
        return self._ask({"op": "run", "batch": batch, "seed": seed})

    def vae_encode(self, batch: int, seed: int) -> float | None:
        return self._ask({"op": "encode", "batch": batch, "seed": seed})["encode_s"]

    def close(self) -> None:
        if self.proc is None:
            return
        try:
            if self.proc.poll() is None:
                self.proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired, ValueError):
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        self.proc = None


class InProcessRunner:
    """A baseline worker's class run in this process (no process start; peak RSS is then the shared process's)."""

    kind = "in-process"

    def __init__(self, baseline: Baseline, script: Path):
        import importlib.util

        self.name = baseline.name
        sys.path.insert(0, str(script.parent))
        spec = importlib.util.spec_from_file_location(f"sdrt_bench_{baseline.name}_worker", script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        cls = next(v for k, v in vars(module).items() if k.endswith("Runner") and isinstance(v, type))
        self.impl = cls()

    def prepare(self, config):
        return self.impl.prepare(config) or {}

    def load(self, config):
        return self.impl.load(config)

    def run(self, batch, seed):
        return self.impl.run(batch, seed)

    def vae_encode(self, batch, seed):
        return self.impl.vae_encode(batch, seed)

    def close(self):
        self.impl.close()


# --- environments, models and exports -------------------------------------------------------------------------


def baseline_python(baseline: Baseline, config: BenchConfig, log) -> str:
    """The interpreter that runs `baseline`: a venv given to us, this one, or a venv made once in the cache."""
    given = config.baseline_envs.get(baseline.name)
    if given:
        python = Path(given).expanduser() / "bin" / "python"
        if not python.exists():
            raise SdrtError(f"--baseline-env {baseline.name}={given}: {python} does not exist; pass a venv folder")
        return str(python)
    if not baseline.packages:
        return sys.executable
    env = config.cache_dir / "envs" / baseline.name
    ready = env / "sdrt-bench-ready.json"
    want = [TORCH_PIN, *baseline.packages, *(f"-{r}" for r in baseline.remove)]
    if ready.exists() and json.loads(ready.read_text()).get("requested") == want:
        return str(env / "bin" / "python")
    if not config.create_envs:
        raise SdrtError(f"no venv for the {baseline.name} baseline in {env}; pass --baseline-env {baseline.name}=VENV or allow creating it")
    log(f"creating the {baseline.name} venv in {env} (once): pip install {TORCH_PIN}, then {' '.join(baseline.packages)}")
    env.parent.mkdir(parents=True, exist_ok=True)
    pip_log = env.parent / f"{baseline.name}-install.log"
    with open(pip_log, "w") as out:
        steps = [[sys.executable, "-m", "venv", "--clear", str(env)],
                 [str(env / "bin" / "pip"), "install", "--disable-pip-version-check", TORCH_PIN],
                 [str(env / "bin" / "pip"), "install", "--disable-pip-version-check", TORCH_PIN, *baseline.packages]]
        if baseline.remove:
            steps.append([str(env / "bin" / "pip"), "uninstall", "-y", *baseline.remove])  # fmt: skip
        for cmd in steps:
            if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                tail = " | ".join(pip_log.read_text(errors="replace").strip().splitlines()[-4:])
                raise SdrtError(f"could not create the {baseline.name} venv ({' '.join(cmd[-3:])} failed: {tail[-800:]}); see {pip_log}")
    freeze = subprocess.run([str(env / "bin" / "pip"), "freeze"], capture_output=True, text=True).stdout.split()
    ready.write_text(json.dumps({"requested": want, "freeze": freeze}, indent=1))
    return str(env / "bin" / "python")


def resolve_model(config: BenchConfig) -> tuple[Path, Path | None, Path | None]:
    """(model, diffusers folder or None, sdrt export or None) for the configured model."""
    from sdrt.manifest import MANIFEST_NAME, read_manifest

    if config.model is None:
        from sdrt.builtin import builtin_model_dir

        model = builtin_model_dir()
    else:
        model = Path(config.model).expanduser().resolve()
        if not model.is_dir():
            raise ModelError(f"model folder {model} does not exist; pass a diffusers-format folder or an sdrt export")
    diffusers_dir = model if (model / "unet" / "config.json").exists() else None
    export = Path(config.export).expanduser().resolve() if config.export else None
    if export is None and (model / MANIFEST_NAME).exists():
        export = model
    if diffusers_dir is None and export is not None:  # an export remembers the folder it came from
        source = read_manifest(export).extras.get("source")
        if source and (Path(source) / "unet" / "config.json").exists():
            diffusers_dir = Path(source)
    if export is not None and not (export / MANIFEST_NAME).exists():
        raise ModelError(f"--export {export} has no {MANIFEST_NAME}; pass an sdrt export folder (made by `sdrt export`)")
    return model, diffusers_dir, export


def folder_digest(folder: Path, *extra) -> str:
    """A key over a model folder's files (names, sizes, mtimes) and `extra`."""
    items = [[str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns]
             for p in sorted(folder.rglob("*")) if p.is_file() and ".ort_cache" not in p.parts]  # fmt: skip
    return hashlib.sha256(json.dumps([str(folder), items, __version__, *extra]).encode()).hexdigest()[:16]


def cached_export(diffusers_dir: Path, size: int, max_batch: int, config: BenchConfig, log) -> Path:
    """Export `diffusers_dir` to the cache once (`sdrt export` in a subprocess, so its memory goes back)."""
    from sdrt.model_facts import read_model_facts

    facts = read_model_facts(diffusers_dir)
    step = facts.size_step  # one export serves every size and batch ORT runs; the limits matter to TensorRT only
    limits = {"min": step, "opt": facts.default_size, "max": max(size, facts.default_size), "batch": max(max_batch, 4)}
    out = config.cache_dir / "exports" / f"{diffusers_dir.name}-{folder_digest(diffusers_dir, limits)}"
    if (out / "manifest.json").exists():
        return out
    log(f"exporting {diffusers_dir} to {out} for the onnx backend (once)")
    cmd = [sys.executable, "-m", "sdrt.cli", "export", str(diffusers_dir), str(out), "--quiet", "--force",
           "--min-size", str(limits["min"]), "--opt-size", str(limits["opt"]), "--max-size", str(limits["max"]),
           "--max-batch", str(limits["batch"])]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SdrtError(f"`sdrt export` of {diffusers_dir} failed: {(proc.stderr or proc.stdout).strip()[-1500:]}")
    return out


def build_sd15_random(folder, seed: int = 0) -> Path:
    """An SD 1.5-shape diffusers folder from SD 1.5's real configs with random weights (needs torch + diffusers).
    ~4.3 GB of fp32 weights: benchmarks only, never committed."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sdrt.export.clip_vocab import write_clip_tokenizer
    from sdrt.export.tiny import SD15_SCHEDULER

    folder = Path(folder)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
    )  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
        sample_size=512, act_fn="silu",
    )  # fmt: skip
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, max_position_embeddings=77,
        vocab_size=49408, hidden_act="quick_gelu", projection_dim=768, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))  # fmt: skip
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder / "tokenizer"))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=PNDMScheduler.from_config(SD15_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    pipe.save_pretrained(folder)
    return folder


def sd15_random_dir(config: BenchConfig, log) -> Path:
    """The SD 1.5-shape random model in the cache, built once (in a subprocess: 4.3 GB it gives back)."""
    folder = config.cache_dir / "models" / "sd15-random-seed0"
    if (folder / "model_index.json").exists():
        return folder
    log(f"building the SD 1.5-shape random-weight model in {folder} (once, ~4.3 GB)")
    tmp = folder.with_name(folder.name + ".partial")
    code = f"from sdrt.bench import build_sd15_random; build_sd15_random({str(tmp)!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SdrtError(f"building the SD 1.5-shape model failed: {proc.stderr.strip()[-1500:]}")
    tmp.rename(folder)
    return folder


def warm_ort_cache(export: Path, threads: int, device: str) -> float:
    """Create the onnx backend once in a subprocess, so the load measured later finds ORT's optimised graphs."""
    providers = "['CPUExecutionProvider']" if device == "cpu" else "None"
    code = (f"from sdrt.pipeline import Pipeline; Pipeline.from_pretrained({str(export)!r}, backend='onnx', "
            f"threads={threads}, providers={providers})")  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SdrtError(f"the onnx backend could not load {export}: {proc.stderr.strip()[-1500:]}")
    return time.perf_counter() - t0


# --- memory and machine facts ----------------------------------------------------------------------------------


def reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM
    except OSError:
        pass


def peak_rss_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # lifetime peak where VmHWM is missing
        return peak if sys.platform == "darwin" else peak * 1024
    except (ImportError, OSError):
        return None


def _torch_cuda():
    torch = sys.modules.get("torch")
    return torch if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized() else None


def _cuda_sync() -> None:
    torch = _torch_cuda()
    if torch is not None:
        torch.cuda.synchronize()


def measure_memory(call):
    """Run `call()` with the peak counters reset; returns (result, {"peak_rss_bytes", "gpu_peak_bytes"})."""
    reset_peak_rss()
    torch = _torch_cuda()
    if torch is not None:
        torch.cuda.reset_peak_memory_stats()
    out = call()
    torch = _torch_cuda()
    return out, {"peak_rss_bytes": peak_rss_bytes(), "gpu_peak_bytes": int(torch.cuda.max_memory_allocated()) if torch else None}


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version(), "sdrt": __version__}
    for name in ("numpy", "onnxruntime", "onnxruntime-gpu", "onnx", "torch", "diffusers", "transformers", "tokenizers", "tensorrt"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def physical_cores() -> int:
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


def machine_info() -> dict:
    from sdrt.backends.onnx_backend import _cpu_name

    info = {"platform": platform.platform(), "machine": platform.machine(), "cpu": _cpu_name(),
            "logical_cpus": os.cpu_count(), "physical_cores": physical_cores(), "gpu": gpu_name()}  # fmt: skip
    try:
        import psutil

        info["memory_bytes"] = psutil.virtual_memory().total
    except ImportError:
        pass
    return info


def gpu_name() -> str | None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)  # fmt: skip
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def busy_snapshot(seconds: float = 1.0) -> dict:
    """What else uses the machine: load average and the processes (not this one's) using > 5% of a CPU."""
    snap = {"loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None, "processes": []}
    try:
        import psutil
    except ImportError:
        snap["processes"] = "psutil not installed"
        return snap
    me = psutil.Process()
    mine = {me.pid} | {p.pid for p in me.children(recursive=True)}
    procs = [p for p in psutil.process_iter(["pid", "name", "cmdline"]) if p.pid not in mine]
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(seconds)
    for p in procs:
        try:
            cpu = p.cpu_percent(None)
            if cpu > 5:
                snap["processes"].append({"pid": p.pid, "cpu_percent": cpu, "cmd": " ".join(" ".join(p.info["cmdline"] or [p.info["name"]]).split())[:200]})
        except psutil.Error:
            pass
    snap["processes"].sort(key=lambda x: -x["cpu_percent"])
    return snap


def model_weight_bytes(folder: Path | None) -> int:
    if folder is None:
        return 0
    return sum(p.stat().st_size for sub in ("unet", "vae", "text_encoder") for p in (folder / sub).glob("*")
               if p.suffix in (".safetensors", ".bin"))  # fmt: skip


def plan_groups(names: list[str], order: str, weight_bytes: int) -> tuple[list[list[str]], str]:
    """Which runners are loaded together: all at once if they fit in memory, else the reference with each other."""
    if order == "auto":
        need = sum(MEMORY_FACTOR.get(n, 2.0) * weight_bytes + 0.6e9 for n in names)
        try:
            import psutil

            avail = psutil.virtual_memory().available
        except ImportError:
            avail = float("inf")
        order = "interleaved" if need < 0.8 * avail else "pairs"
        reason = f"auto: an estimated {need / 1e9:.1f} GB for all runners at once, {avail / 1e9:.1f} GB available"
    else:
        reason = f"asked for {order}"
    if order == "interleaved" or len(names) <= 2:
        return [names], f"interleaved ({reason})"
    if order == "pairs":
        return [[names[0], n] for n in names[1:]], f"pairs with {names[0]} as the reference ({reason})"
    if order == "sequential":
        return [[n] for n in names], f"sequential, one runner at a time ({reason})"
    raise InputError(f"order {order!r} is not one of auto, interleaved, pairs, sequential")


# --- the benchmark ---------------------------------------------------------------------------------------------


def run_bench(config: BenchConfig, log=print) -> dict:
    """Measure every configured runner; returns the full record (see SCHEMA, written as JSON by the CLI)."""
    _check(config)
    started = datetime.datetime.now(datetime.timezone.utc)
    busy_before = busy_snapshot()
    threads = config.threads or physical_cores()
    cfg = dataclasses.replace(config, model=sd15_random_dir(config, log)) if config.sd15_random else config
    model, diffusers_dir, export = resolve_model(cfg)
    from sdrt.model_facts import read_model_facts

    facts = read_model_facts(diffusers_dir) if diffusers_dir else None
    if facts is None:
        from sdrt.manifest import read_manifest

        facts = read_manifest(export).facts
    size = cfg.size or facts.default_size
    if size % facts.size_step:
        raise InputError(f"size {size} is not a multiple of {facts.size_step} for this model; use {max(facts.size_step, size // facts.size_step * facts.size_step)}")
    request = {"model": str(diffusers_dir) if diffusers_dir else None, "size": size, "steps": cfg.steps, "guidance": cfg.guidance,
               "threads": threads, "device": cfg.device, "precision": "fp32" if cfg.device == "cpu" else "fp16",
               "cache_dir": str(cfg.cache_dir)}  # fmt: skip

    record = {"schema": SCHEMA, "created": started.isoformat(timespec="seconds"), "command": None,
              "machine": machine_info(), "busy_before": busy_before, "note": cfg.note,
              "libraries": library_versions(),
              "config": {**request, "model_arg": "sd15-random" if config.sd15_random else str(config.model or "built-in"), "export": str(export) if export else None,
                         "batches": list(cfg.batches), "runs": cfg.runs, "warmup": cfg.warmup, "prompt": PROMPT,
                         "scheduler": _scheduler_name(diffusers_dir or export), "facts": facts.to_dict()},
              "runners": {}, "groups": [], "notes": []}  # fmt: skip

    runners = {}
    for backend in cfg.backends:
        name = f"sdrt-{backend}"
        entry = record["runners"][name] = {"label": f"sdrt, {backend} backend", "kind": "in-process", "samples": {}}
        try:
            if backend == "torch":
                if diffusers_dir is None:
                    raise ModelError("the torch backend needs the diffusers folder; pass it as MODEL")
                runners[name] = SdrtRunner(backend, diffusers_dir)
            else:
                if export is None:
                    if diffusers_dir is None:
                        raise ModelError(f"{model} is neither a diffusers folder nor an sdrt export")
                    t0 = time.perf_counter()
                    export = cached_export(diffusers_dir, size, max(cfg.batches), cfg, log)
                    entry["export_s"] = time.perf_counter() - t0
                entry["export"] = str(export)
                if backend == "onnx":
                    entry["first_load_s"] = warm_ort_cache(export, threads, cfg.device)
                runners[name] = SdrtRunner(backend, export)
        except Exception as err:  # recorded; the other runners go on
            entry["error"] = _why(err)
            log(f"{name}: skipped ({entry['error']})")
    for b in cfg.baselines:
        baseline = BASELINES[b]
        entry = record["runners"][b] = {"label": baseline.label, "samples": {}}
        try:
            if diffusers_dir is None:
                raise ModelError(f"{model} is an export; the {b} baseline needs the diffusers folder it came from")
            script = Path(cfg.baselines_dir) / baseline.script
            if not script.exists():
                raise SdrtError(f"{script} is missing: baselines run from a source checkout of sdrt (benchmarks/baselines/)")
            if b in cfg.in_process:
                entry["kind"], entry["python"] = "in-process", sys.executable
                runners[b] = InProcessRunner(baseline, script)
            else:
                python = baseline_python(baseline, cfg, log)
                entry["kind"], entry["python"] = "worker", python
                runners[b] = WorkerRunner(baseline, python, script, cfg.cache_dir / "logs", threads)
            t0 = time.perf_counter()
            entry["prepare"] = runners[b].prepare(request)
            entry["prepare_s"] = time.perf_counter() - t0
        except Exception as err:
            entry["error"] = _why(err)
            log(f"{b}: skipped ({entry['error']})")
            runners.pop(b, None)

    groups, why = plan_groups(list(runners), cfg.order, model_weight_bytes(diffusers_dir))
    record["order"] = why
    for index, group in enumerate(groups):
        record["groups"].append(_measure_group(index, [runners[n] for n in group], cfg, request, record, log))
    for name, entry in record["runners"].items():
        entry["stats"] = {b: {k: summarize(d.get(k) for d in derived) for k in STAGES}
                          for b, derived in ((b, [derive(s, int(b)) for s in samples]) for b, samples in entry["samples"].items())}  # fmt: skip
        entry["stats_load_s"] = summarize(entry.get("load_s", []))
        if not entry["samples"] and "error" not in entry:
            entry["error"] = "no run completed"
    record["speedups"] = speedups(record)
    record["busy_after"] = busy_snapshot()
    record["seconds"] = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
    return record


def _measure_group(index: int, group: list, cfg: BenchConfig, request: dict, record: dict, log) -> dict:
    """Load the group's runners, then warm-up and measured rounds interleaved across them and the batch sizes."""
    out = {"runners": [r.name for r in group], "samples": {r.name: {} for r in group}}
    live = []
    for r in group:
        entry = record["runners"][r.name]
        try:
            log(f"loading {r.name}")
            info = r.load(request)
            entry.setdefault("load_s", []).append(info.pop("load_s"))
            entry.setdefault("load_peak_rss_bytes", []).append(info.pop("peak_rss_bytes", None))
            entry.update(info)
            live.append(r)
        except Exception as err:
            entry["error"] = _why(err)
            log(f"{r.name}: load failed ({entry['error']})")
            r.close()
    rounds = cfg.warmup + cfg.runs
    for k in range(rounds):
        order = live[k % len(live):] + live[: k % len(live)] if live else []
        for batch in cfg.batches:
            for r in order:
                if r not in live:
                    continue
                try:
                    s = r.run(batch, seed=k)
                    s["encode_s"] = r.vae_encode(batch, seed=k)
                except Exception as err:
                    record["runners"][r.name]["error"] = _why(err)
                    log(f"{r.name}: run failed ({_why(err)})")
                    live.remove(r)
                    r.close()
                    continue
                s.update(round=k, warmup=k < cfg.warmup, group=index)
                log(f"  {'warm-up' if k < cfg.warmup else f'run {k - cfg.warmup + 1}/{cfg.runs}'} {r.name} batch {batch}: {s['e2e_s']:.3f} s")
                if k >= cfg.warmup:
                    out["samples"][r.name].setdefault(str(batch), []).append(s)
                    record["runners"][r.name]["samples"].setdefault(str(batch), []).append(s)
    for r in group:
        r.close()
    # The group keeps its own medians (ratios come from runners measured side by side); samples live in "runners".
    out["e2e_median_s"] = {n: {b: summarize(x["e2e_s"] for x in v)["median"] for b, v in d.items()} for n, d in out.pop("samples").items()}
    return out


def speedups(record: dict) -> dict:
    """{sdrt runner: {baseline: {batch: {stage: baseline median / sdrt median}}}}, from the runs of a group that
    held both (runners measured side by side; a reference measured in several groups is compared within each)."""
    out = {}
    sdrt = [n for n in record["runners"] if n.startswith("sdrt-")]
    others = [n for n in record["runners"] if n not in sdrt]
    for s in sdrt:
        for o in others:
            shared = [i for i, g in enumerate(record["groups"]) if s in g["runners"] and o in g["runners"]]
            if not shared:
                continue
            for batch, mine in record["runners"][s]["samples"].items():
                theirs = record["runners"][o]["samples"].get(batch)
                mine = [derive(x, int(batch)) for x in mine if x.get("group", shared[0]) == shared[0]]
                theirs = [derive(x, int(batch)) for x in theirs or [] if x.get("group", shared[0]) == shared[0]]
                if not mine or not theirs:
                    continue
                ratios = {}
                for stage in ("e2e_s", "text_s", "unet_call_s", "decode_s", "encode_s"):
                    a, b = summarize(x[stage] for x in mine), summarize(x[stage] for x in theirs)
                    ratios[stage] = b["median"] / a["median"] if a and b and a["median"] else None
                out.setdefault(s, {}).setdefault(o, {})[batch] = ratios
    return out


def _scheduler_name(folder: Path | None) -> str | None:
    try:
        rel = "scheduler/scheduler_config.json"
        return json.loads((Path(folder) / rel).read_text()).get("_class_name")
    except (OSError, TypeError, ValueError):
        return None


def _why(err: Exception) -> str:
    return f"{type(err).__name__}: {err}" if not isinstance(err, SdrtError) else str(err)


def _check(config: BenchConfig) -> None:
    for b in config.baselines:
        if b not in BASELINES:
            raise InputError(f"baseline {b!r} is not one of {', '.join(BASELINES)}")
    for b in config.backends:
        if b not in ("onnx", "torch", "tensorrt"):
            raise InputError(f"backend {b!r} is not one of onnx, torch, tensorrt")
    if not config.backends and not config.baselines:
        raise InputError("nothing to measure: name at least one backend or baseline")
    if config.runs < 1 or config.warmup < 0:
        raise InputError(f"runs {config.runs} must be >= 1 and warmup {config.warmup} >= 0")
    if not config.batches or min(config.batches) < 1:
        raise InputError(f"batch sizes {list(config.batches)} must be >= 1")
    if config.steps < 1:
        raise InputError(f"steps {config.steps} must be >= 1")


# --- reporting -------------------------------------------------------------------------------------------------


def _fmt(stat: dict | None, scale: float = 1.0, digits: int = 3, spread: bool = False) -> str:
    if not stat:
        return "-"
    text = f"{stat['median'] * scale:.{digits}f}"
    if spread and stat["n"] > 1:
        text += f" [{stat['min'] * scale:.{digits}f}-{stat['max'] * scale:.{digits}f}]"
    return text


def format_table(record: dict) -> str:
    """Markdown: one row per runner and batch size (medians; end to end with [min-max]), then the ratios."""
    c = record["config"]
    lines = [f"{c['size']}x{c['size']}, {c['steps']} steps ({c['scheduler']}), guidance {c['guidance']}, {c['precision']}, "
             f"{c['threads']} threads, {c['runs']} runs after {c['warmup']} warm-up; {record['order']}", "",
             "| runner | batch | load s | text s | UNet call s (calls) | loop overhead ms/step (% of step) | VAE decode s | "
             "VAE encode s | end to end s [min-max] | images/s | peak RSS GB* |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, entry in record["runners"].items():
        if entry.get("error") and not entry.get("stats"):
            lines.append(f"| {name} | - | not measured: {entry['error'][:300]} |||||||||")
            continue
        for batch, st in entry.get("stats", {}).items():
            calls = st["unet_call_s"] and entry["samples"][batch][0].get("unet_calls")
            lines.append(
                f"| {name} | {batch} | {_fmt(entry.get('stats_load_s'), digits=2)} | {_fmt(st['text_s'])} | "
                f"{_fmt(st['unet_call_s'])} ({calls or '-'}) | {_fmt(st['overhead_step_s'], 1e3, 2)} ({_fmt(st['overhead_pct'], digits=2)}%) | "
                f"{_fmt(st['decode_s'])} | {_fmt(st['encode_s'])} | {_fmt(st['e2e_s'], spread=True)} | {_fmt(st['images_per_s'], digits=2)} | "
                f"{_fmt(st['peak_rss_bytes'], 1e-9, 2)} |"
            )
    if record.get("speedups"):
        lines += ["", "| sdrt runner | vs | batch | end to end | UNet call | VAE decode | VAE encode | text |", "|---|---|---|---|---|---|---|---|"]
        for s, per in record["speedups"].items():
            for o, batches in per.items():
                for batch, r in batches.items():
                    cells = [f"{r[k]:.2f}x" if r.get(k) else "-" for k in ("e2e_s", "unet_call_s", "decode_s", "encode_s", "text_s")]
                    lines.append(f"| {s} | {o} | {batch} | " + " | ".join(cells) + " |")
    lines += ["", "*peak resident memory of the process during a run; in-process runners share sdrt's process. "
              "Loop overhead: loop time minus UNet calls, per call. Ratios: baseline median / sdrt median (> 1: sdrt faster)."]
    errors = [f"- {n}: {e['error']}" for n, e in record["runners"].items() if e.get("error") and e.get("stats")]
    return "\n".join(lines + (["", "Errors:"] + errors if errors else []))


def format_report(record: dict) -> str:
    """The table with what it was measured on: machine, libraries, what else ran, the command."""
    m, c = record["machine"], record["config"]
    lines = [f"# sdrt bench: {c['model_arg']} at {c['size']}x{c['size']}, {c['steps']} steps", "",
             f"- machine: {m['cpu']}, {m['physical_cores']} physical cores / {m['logical_cpus']} logical, "
             f"{(m.get('memory_bytes') or 0) / 2**30:.0f} GiB, GPU: {m.get('gpu') or 'none'}; {m['platform']}",
             f"- created {record['created']}, {record['seconds'] / 60:.1f} minutes",
             "- sdrt's environment: " + ", ".join(f"{k} {v}" for k, v in record["libraries"].items())]  # fmt: skip
    for name, entry in record["runners"].items():
        if entry.get("describe"):
            extra = f" ({entry.get('kind')}, {', '.join(f'{k} {v}' for k, v in (entry.get('versions') or {}).items())})"
            lines.append(f"- {name}: {entry['describe']}" + (extra if not name.startswith("sdrt-") else f" ({entry.get('kind')})"))
    for when in ("busy_before", "busy_after"):
        busy = record.get(when) or {}
        procs = busy.get("processes")
        procs = ", ".join(f"{p['cmd'][:90]} ({p['cpu_percent']:.0f}% CPU)" for p in procs) if isinstance(procs, list) else procs
        load = ", ".join(f"{x:.2f}" for x in busy.get("loadavg") or [])
        lines.append(f"- else running, {when.replace('busy_', '')} the benchmark: load average {load}; {procs or 'no other process above 5% CPU'}")
    if record.get("note"):
        lines.append(f"- note: {record['note']}")
    command = record.get("command") or {}
    if isinstance(command, dict) and command.get("argv"):
        lines.append(f"- command: `{shlex.join(['sdrt'] + command['argv'][1:])}`")
    return "\n".join(lines + ["", format_table(record)])


def write_chart(record: dict, path) -> Path:
    """A PNG: per-stage time of one image generation per runner (smallest batch), and images/s per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, e in record["runners"].items() if e.get("stats")]
    batch = str(min(record["config"]["batches"]))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 0.6 * max(len(names), 3) + 2.2), gridspec_kw={"width_ratios": [2, 1]})
    parts = (("text encoding", "text_s", 1), ("UNet calls", "unet_total_s", 1), ("loop overhead", "overhead_step_s", "calls"),
             ("VAE decode", "decode_s", 1))  # fmt: skip
    colours = ("#8da0cb", "#fc8d62", "#e78ac3", "#66c2a5", "#bbbbbb")
    for i, name in enumerate(names):
        st = record["runners"][name]["stats"].get(batch)
        if not st:
            continue
        calls = record["runners"][name]["samples"][batch][0].get("unet_calls") or 0
        left = 0.0
        for (label, key, mult), colour in zip(parts, colours):
            value = (st[key] or {}).get("median") or 0.0
            value *= calls if mult == "calls" else 1
            ax.barh(i, value, left=left, color=colour, label=label if i == 0 else None)
            left += value
        rest = max(st["e2e_s"]["median"] - left, 0.0)
        ax.barh(i, rest, left=left, color=colours[-1], label="rest (setup, image conversion)" if i == 0 else None)
        ax.text(st["e2e_s"]["median"], i, f" {st['e2e_s']['median']:.2f} s", va="center", fontsize=8)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("seconds per generation (median)")
    c = record["config"]
    ax.set_title(f"batch {batch}, {c['size']}x{c['size']}, {c['steps']} steps, {c['threads']} threads", fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=5, frameon=False)
    for name in names:
        st = record["runners"][name]["stats"]
        bs = sorted(st, key=int)
        ax2.plot([int(b) for b in bs], [st[b]["images_per_s"]["median"] for b in bs], marker="o", label=name)
    ax2.set_xticks(sorted(int(b) for b in record["config"]["batches"]))
    ax2.set_xlabel("batch size")
    ax2.set_ylabel("images / s")
    ax2.set_title("throughput", fontsize=10)
    ax2.legend(fontsize=7)
    fig.suptitle(f"sdrt bench: {record['machine']['cpu']} ({record['machine']['physical_cores']} cores)"
                 + (f", GPU {record['machine']['gpu']}" if record["machine"].get("gpu") else ""), fontsize=11)  # fmt: skip
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
