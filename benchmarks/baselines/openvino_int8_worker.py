"""Baselines: OpenVINO int8 through optimum-intel, the pipelines a CPU user picks for 8 bits.

- "openvino-int8": `OVStableDiffusionPipeline.from_pretrained(model, export=True, load_in_8bit=True)`, optimum-intel's
  8-bit weight compression (NNCF int8 weights, every component), saved once into the cache.
- "openvino-hybrid": the same export with `quantization_config=OVWeightQuantizationConfig(bits=8, dataset=PROMPTS)`:
  optimum-intel's hybrid quantisation for diffusion models (int8 weights everywhere plus activations of the UNet's
  convs/matmuls quantised from a calibration run over the prompts given here, offline: no dataset download; at the
  benchmark's size and steps).
Both run with the same load options as the fp32 OpenVINO baseline (f32 inference precision hint, LATENCY hint,
threads), so the int8 work is OpenVINO's choice of kernels for those weights and Q/DQ ops.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from openvino_worker import PACKAGES, OpenVINORunner  # noqa: E402

CALIBRATION_PROMPTS = [
    "a photo of a cat sitting on a windowsill", "a watercolor landscape with mountains and a lake",
    "a portrait of an old man, studio lighting", "a red sports car on a city street at night",
    "a bowl of fruit on a wooden table", "an astronaut riding a horse, digital art",
    "a cozy living room with a fireplace", "a lighthouse on a cliff during a storm",
]  # the same spread sdrt calibrates on by default (sdrt.export.int8_quality.DEFAULT_PROMPTS)


class OpenVINOInt8Runner(OpenVINORunner):
    name = "openvino-int8"
    hybrid = False

    def _tool(self) -> str:
        return "openvino-hybrid" if self.hybrid else "openvino-int8"

    def prepare(self, config: dict) -> dict:
        out = common.converted_dir(config, self._tool(), *PACKAGES)
        if (out / "model_index.json").exists():
            return {"cached": True, "folder": str(out)}
        from optimum.intel import OVStableDiffusionPipeline

        t0 = time.perf_counter()
        if self.hybrid:
            from optimum.intel import OVWeightQuantizationConfig

            # optimum-intel calibrates by running the whole pipeline on each prompt at the UNet's sample size (512 px
            # for SD 1.5) with its default 50 steps: ~1 h of fp32 sampling on 2 cores. Here its calls get the
            # benchmark's size and steps instead (what sdrt calibrates at too), so every UNet call of every prompt
            # is a calibration sample: (steps + 1) x prompts of them (PNDM calls the UNet once more).
            steps, size = config["steps"], config["size"]
            samples = (steps + 1) * len(CALIBRATION_PROMPTS)
            qc = OVWeightQuantizationConfig(bits=8, dataset=CALIBRATION_PROMPTS, num_samples=samples)
            call = OVStableDiffusionPipeline.__call__

            def at_bench_size(pipe, *args, **kwargs):
                kwargs.update(height=size, width=size, num_inference_steps=kwargs.get("num_inference_steps") or steps)
                return call(pipe, *args, **kwargs)

            OVStableDiffusionPipeline.__call__ = at_bench_size
            try:
                pipe = OVStableDiffusionPipeline.from_pretrained(config["model"], export=True, quantization_config=qc,
                                                                 compile=False)
            finally:
                OVStableDiffusionPipeline.__call__ = call
        else:
            pipe = OVStableDiffusionPipeline.from_pretrained(config["model"], export=True, load_in_8bit=True, compile=False)
        return common.save_conversion(pipe, out, t0)

    def create(self, config: dict):
        import openvino as ov
        from optimum.intel import OVStableDiffusionPipeline

        threads = common.threads_of(config)
        ov_config = common.openvino_config(config)
        folder = common.converted_dir(config, self._tool(), *PACKAGES)
        pipe = OVStableDiffusionPipeline.from_pretrained(folder, export=False, ov_config=ov_config, compile=True)
        ops = pipe.unet.model.get_ops()
        weights = sorted({op.get_element_type().get_type_name() for op in ops if op.get_type_name() == "Constant"})
        fq = sum(op.get_type_name() == "FakeQuantize" for op in ops)
        return pipe, (f"optimum-intel OVStableDiffusionPipeline, openvino {ov.__version__} on CPU "
                      f"({'hybrid int8' if self.hybrid else '8-bit weight compression'}, {threads} threads, LATENCY hint; "
                      f"UNet IR constants {'/'.join(weights)}, {fq} FakeQuantize)")


class OpenVINOHybridRunner(OpenVINOInt8Runner):
    name = "openvino-hybrid"
    hybrid = True


if __name__ == "__main__":
    sys.exit(common.serve(OpenVINOInt8Runner()))
