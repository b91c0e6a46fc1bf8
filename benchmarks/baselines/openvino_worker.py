"""Baseline: OpenVINO through optimum-intel's OVStableDiffusionPipeline (OVStableDiffusionXLPipeline for SDXL).

prepare: `OVStableDiffusionPipeline.from_pretrained(model, export=True, load_in_8bit=False)` and save_pretrained
into the cache, once (no weight quantisation: the comparison is fp32 compute; OpenVINO's IR may store weights as
fp16, which the CPU plugin widens at compile time). load: from_pretrained(that folder) with f32 inference precision,
the LATENCY hint and the thread count, dynamic shapes (as loaded by default; `pipe.reshape(...)` to static shapes is
an extra step its docs suggest, not taken here). The pipeline is diffusers' StableDiffusionPipeline over OpenVINO
compiled models, so the stages are timed at the same component calls as the diffusers baseline.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from diffusers_worker import DiffusersRunner  # noqa: E402

PACKAGES = ("optimum-intel", "openvino", "optimum", "diffusers", "transformers", "torch", "numpy")


def pipeline_class(config: dict):
    import optimum.intel as ov_pipelines

    return ov_pipelines.OVStableDiffusionXLPipeline if common.is_sdxl(config) else ov_pipelines.OVStableDiffusionPipeline


def extra_kwargs(config: dict) -> dict:
    return {"add_watermarker": False} if common.is_sdxl(config) else {}


class OpenVINORunner(DiffusersRunner):
    name = "openvino"
    packages = PACKAGES

    def prepare(self, config: dict) -> dict:
        out = common.converted_dir(config, "openvino", *PACKAGES)
        if (out / "model_index.json").exists():
            return {"cached": True, "folder": str(out)}
        t0 = time.perf_counter()
        pipe = pipeline_class(config).from_pretrained(config["model"], export=True, load_in_8bit=False, compile=False,
                                                      **extra_kwargs(config))
        return common.save_conversion(pipe, out, t0)

    def create(self, config: dict):
        import openvino as ov

        threads = common.threads_of(config)
        ov_config = common.openvino_config(config)
        folder = common.converted_dir(config, "openvino", *PACKAGES)
        cls = pipeline_class(config)
        pipe = cls.from_pretrained(folder, export=False, ov_config=ov_config, compile=True, **extra_kwargs(config))
        weights = sorted({op.get_element_type().get_type_name() for op in pipe.unet.model.get_ops() if op.get_type_name() == "Constant"
                          and op.get_element_type().is_real()})  # fmt: skip
        return pipe, (f"optimum-intel {cls.__name__}, openvino {ov.__version__} on CPU (f32 inference, "
                      f"{threads} threads, LATENCY hint, dynamic shapes; UNet IR constants {'/'.join(weights)})")


if __name__ == "__main__":
    sys.exit(common.serve(OpenVINORunner()))
