"""The runners `sdrt bench` measures: sdrt's own backends, and the baselines users would pick instead.

Every runner has the same five calls (prepare, load, run, vae_encode, close) and returns the same figures, so
the orchestration in sdrt.bench can interleave them. SdrtRunner drives sdrt's Pipeline in this process, timing
each network call; WorkerRunner drives a baseline (benchmarks/baselines/*_worker.py) in a process and venv of its
own over JSON lines; InProcessRunner loads a worker's class into this process instead. The baselines' pins and
the venvs made for them (baseline_python) live here too, since they only matter to starting a runner.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sdrt.bench.env import _cuda_sync, library_versions, measure_memory, peak_rss_bytes
from sdrt.errors import SdrtError

if TYPE_CHECKING:
    from sdrt.bench import BenchConfig

PROMPT = "a photo of an astronaut riding a horse on mars"  # the same in benchmarks/baselines/common.py
TORCH_PIN = "torch==2.13.0"  # installed first, by exact pin: a bare `torch` pulls a multi-GB CUDA build


@dataclasses.dataclass(frozen=True)
class Baseline:
    name: str
    script: str
    packages: tuple[str, ...]  # pip-installed after TORCH_PIN in the baseline's own venv; () runs in this venv
    label: str
    remove: tuple[str, ...] = ()  # uninstalled afterwards: pulled in by a pin but breaking imports here
    env: str = ""  # the venv it shares with another baseline (default: its own, by name)


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
# issue 22: OpenVINO's int8 pipelines, in the same venv as the fp32 one (same pins).
for _name, _script, _label in (("openvino-int8", "openvino_int8_worker.py", "8-bit weight compression"),
                               ("openvino-hybrid", "openvino_hybrid_worker.py", "hybrid int8 quantisation")):
    BASELINES[_name] = dataclasses.replace(BASELINES["openvino"], name=_name, script=_script, env="openvino",
                                           label=f"optimum-intel OVStableDiffusionPipeline (OpenVINO, {_label})")



# --- the sdrt runner (in this process) ------------------------------------------------------------------------


class SdrtRunner:
    """One sdrt backend through sdrt's own Pipeline; a NetworkTimer observer times each network call (and a device
    loop as a whole, spread over its UNet calls)."""

    kind = "in-process"

    def __init__(self, backend: str, folder: Path, name: str | None = None):
        self.backend, self.folder, self.name = backend, Path(folder), name or f"sdrt-{backend}"
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
        return {"load_s": load_s, "peak_rss_bytes": peak_rss_bytes(), "versions": library_versions(),
                "describe": self.pipe.backend.describe(), "folder": str(self.folder)}  # fmt: skip

    def run(self, batch: int, seed: int) -> dict:
        from sdrt.observers import NetworkTimer

        c = self.config
        timer = NetworkTimer()
        # The bench repeats one prompt: each run pays for the UNet's step-invariant prepass as a new prompt would,
        # rather than reusing the last run's (sdrt.backends.onnx_split).
        self.pipe.backend.forget_fixed_inputs()

        def call():
            t0 = time.perf_counter()
            out = self.pipe(PROMPT, num_inference_steps=c["steps"], guidance_scale=c["guidance"], height=c["size"],
                            width=c["size"], seed=seed, num_images_per_prompt=batch, progress=False,
                            observers=[timer])  # fmt: skip
            _cuda_sync()
            return time.perf_counter() - t0, out

        (e2e_s, out), memory = measure_memory(call)
        by = {n: timer.seconds(n) for n in ("text_encoder", "text_encoder_2", "unet", "vae_decoder")}
        text = by["text_encoder"] + by["text_encoder_2"]  # SDXL: both encoders, as the baselines time them
        return {"e2e_s": e2e_s, "text_s": sum(text), "text_calls": len(text),
                "unet_s": by["unet"], "unet_calls": len(by["unet"]), "loop_s": out.timings["loop"],
                "decode_s": sum(by["vae_decoder"]), **memory}  # fmt: skip

    def vae_encode(self, batch: int, seed: int) -> float | None:
        from sdrt.contracts import VAE_ENCODER

        if not self.pipe.backend.has(VAE_ENCODER):
            return None
        size = self.config["size"]
        image = np.random.default_rng(seed).uniform(-1, 1, (batch, 3, size, size)).astype(np.float32)
        self.pipe.backend.synchronize()
        t0 = time.perf_counter()
        self.pipe.backend.run(VAE_ENCODER, {"image": image})
        self.pipe.backend.synchronize()
        return time.perf_counter() - t0

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


# --- the baselines' interpreters: a venv given, this one, or one made once in the cache ---------------------


def baseline_python(baseline: Baseline, config: BenchConfig, log) -> str:
    """The interpreter that runs `baseline`: a venv given to us, this one, or a venv made once in the cache."""
    given = config.baseline_envs.get(baseline.name) or config.baseline_envs.get(baseline.env)
    if given:
        python = Path(given).expanduser() / "bin" / "python"
        if not python.exists():
            raise SdrtError(f"--baseline-env {baseline.name}={given}: {python} does not exist; pass a venv folder")
        return str(python)
    if not baseline.packages:
        return sys.executable
    env = config.cache_dir / "envs" / (baseline.env or baseline.name)
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
