"""Baseline: optimum's ORTStableDiffusionPipeline (ONNX Runtime), from optimum-onnx; ORTStableDiffusionXLPipeline
for an SDXL folder.

prepare: `ORTStableDiffusionPipeline.from_pretrained(model, export=True)` and save_pretrained into the cache, once
(optimum's own export of the same diffusers folder). load: from_pretrained(that folder) on the CPU provider with
intra-op threads set, as its docs show. The pipeline is diffusers' StableDiffusionPipeline over ORT sessions, so
the stages are timed at the same component calls as the diffusers baseline (diffusers_worker.py).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from diffusers_worker import DiffusersRunner  # noqa: E402

PACKAGES = ("optimum-onnx", "optimum", "onnxruntime", "diffusers", "transformers", "torch", "numpy")


def pipeline_class(config: dict):
    import optimum.onnxruntime as ort_pipelines

    return ort_pipelines.ORTStableDiffusionXLPipeline if common.is_sdxl(config) else ort_pipelines.ORTStableDiffusionPipeline


def extra_kwargs(config: dict) -> dict:
    return {"add_watermarker": False} if common.is_sdxl(config) else {}


class OptimumRunner(DiffusersRunner):
    name = "optimum"
    packages = PACKAGES

    def prepare(self, config: dict) -> dict:
        out = common.converted_dir(config, "optimum", *PACKAGES)
        if (out / "model_index.json").exists():
            return {"cached": True, "folder": str(out)}
        t0 = time.perf_counter()
        pipe = pipeline_class(config).from_pretrained(config["model"], export=True, **extra_kwargs(config))
        return common.save_conversion(pipe, out, t0)

    def create(self, config: dict):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = common.threads_of(config)
        provider = "CUDAExecutionProvider" if config.get("device") == "cuda" else "CPUExecutionProvider"
        folder = common.converted_dir(config, "optimum", *PACKAGES)
        cls = pipeline_class(config)
        pipe = cls.from_pretrained(folder, export=False, provider=provider, session_options=options, **extra_kwargs(config))
        return pipe, (f"optimum-onnx {cls.__name__}, onnxruntime {ort.__version__} on {provider} "
                      f"({options.intra_op_num_threads} intra-op threads, graph optimisation {options.graph_optimization_level.name})")


if __name__ == "__main__":
    sys.exit(common.serve(OptimumRunner()))
