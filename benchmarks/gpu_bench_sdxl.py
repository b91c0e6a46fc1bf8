"""GPU benchmark for SDXL: sdrt's CUDA path (device loop, whole-step CUDA graph) against diffusers (issue 19).

One prepared command for a lent H100/H200 (no network, no weights): builds SDXL base 1.0's UNet, VAE and both text
encoders from their real configs (benchmarks/sdxl_random.py, which names their sources) with random fp16 weights on
the GPU, saves them as a diffusers folder, then measures 1024x1024, 30 steps, guidance 5 (Euler, SDXL's scheduler),
batch 1:
  diffusers   StableDiffusionXLPipeline fp16 (SDPA; its VAE upcast to fp32 as force_upcast says): end to end, and
              one bare guided UNet call
  sdrt_host   sdrt's host loop (a host round trip per step)
  sdrt_eager  sdrt's device loop without graphs (SDXL's text_embeds/time_ids are static step buffers)
  sdrt_graph  the device loop with each whole step replayed from one CUDA graph
  ..._tuned   the graph loop with cuDNN autotuning, channels-last and fused QKV projections
then parity (graph vs eager vs host vs diffusers latents, same seed and start latents) and the published anchor:
TensorRT's SDXL 1.0 engine, 1471 ms end to end on an H100 (30 steps, 1024 px). Results in OUT/gpu_bench.json and
OUT/gpu_bench.txt after every section.

    python3 benchmarks/gpu_bench_sdxl.py --out $OUT                                # the GPU run (~3-5 min)
    python benchmarks/gpu_bench_sdxl.py --device cpu --tiny --steps 2 --out out    # the CPU smoke test of every path

Timing, sections and budget as benchmarks/gpu_bench.py (both use benchmarks/gpu_harness.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_harness import Bench, Clock, import_sdrt, median_ms, rel  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse on mars, highly detailed"
SEED = 1234
GUIDANCE = 5.0  # diffusers' SDXL default
TENSORRT_SDXL_H100_MS = 1471.0  # NVIDIA's published SDXL 1.0 TensorRT engine: 30 steps, 1024x1024, H100


class SDXLBench(Bench):
    def target_lines(self) -> list[str]:
        rows = [r for r in self.results["runs"] if r["impl"].startswith("sdrt_graph") and r["e2e_ms"]]
        if not rows:
            return []
        best = min(r["e2e_ms"] for r in rows)
        return ["", f"anchor: TensorRT SDXL 1.0 engine on an H100, 30 steps 1024 px: {TENSORRT_SDXL_H100_MS:.0f} ms; "
                    f"sdrt's best graph loop end to end here: {best:.0f} ms ({TENSORRT_SDXL_H100_MS / best:.2f}x)"]  # fmt: skip


def build_model(folder: Path, tiny: bool, device, dtype):
    """SDXL base built on `device` (random weights; fp16 on CUDA), saved as a diffusers folder; the diffusers pipeline."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if tiny:
        from sdrt.export.tiny import build_tiny_sdxl

        build_tiny_sdxl(folder)
        pipe = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=dtype).to(device)
    else:
        from sdrt.export.clip_vocab import write_clip_tokenizer
        from sdrt.export.tiny import SDXL_SCHEDULER
        from sdxl_random import SDXL_UNET, TEXT_ENCODER, TEXT_ENCODER_2, VAE

        torch.manual_seed(0)
        with torch.device(device):  # initialise on the GPU: seconds instead of minutes of CPU init
            unet = UNet2DConditionModel(**SDXL_UNET)
            text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER))
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_ENCODER_2))
            vae = AutoencoderKL(**VAE)
        pipe = StableDiffusionXLPipeline(
            vae=vae.to(dtype).eval(), text_encoder=text_encoder.to(dtype).eval(), text_encoder_2=text_encoder_2.to(dtype).eval(),
            tokenizer=CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder / "tokenizer")),
            tokenizer_2=CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder / "tokenizer_2", pad_token="!")),
            unet=unet.to(dtype).eval(), scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
            force_zeros_for_empty_prompt=True, add_watermarker=False,
        )  # fmt: skip
        pipe.save_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "out/gpu_bench_sdxl"))
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="tiny random SDXL (the CPU smoke test)")
    parser.add_argument("--size", type=int, default=None, help="image size (default: the UNet's sample_size x 8)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per end-to-end measurement (median)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no section after this many seconds")
    parser.add_argument("--workdir", default="/tmp/sdrt_gpu_bench_sdxl")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 on --device cpu)")
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    import_sdrt()

    import numpy as np
    import torch

    bench = SDXLBench(args)
    res = bench.results
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("no CUDA device; use --device cpu --tiny for the smoke test")
        return 2
    if not cuda:
        torch.set_num_threads(args.threads or 1)
    dtype = torch.float16 if cuda else torch.float32
    clock = Clock(cuda)
    folder = Path(args.workdir) / ("tiny" if args.tiny else "sdxl-base")
    state = {}

    def env():
        import diffusers
        import transformers

        res["env"].update(torch=torch.__version__, diffusers=diffusers.__version__, transformers=transformers.__version__,
                          python=sys.version.split()[0], device=torch.cuda.get_device_name() if cuda else "cpu",
                          dtype=str(dtype), tiny=args.tiny, cuda=torch.version.cuda if cuda else None)  # fmt: skip
        print(json.dumps(res["env"]))

    def build():
        import sdrt

        t0 = time.perf_counter()
        state["ref"] = build_model(folder, args.tiny, args.device, dtype)
        res["env"]["build_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        state["pipe"] = sdrt.Pipeline.from_pretrained(folder, backend="torch", device=args.device, device_loop=True)
        res["env"]["sdrt_load_s"] = round(time.perf_counter() - t0, 1)
        res["env"]["sdrt_backend"] = state["pipe"].backend.describe()
        unet = state["ref"].unet
        state["size"] = args.size or unet.config.sample_size * state["pipe"].facts.vae_scale_factor
        res["env"]["size"] = state["size"]
        res["env"]["unet_params_m"] = round(sum(p.numel() for p in unet.parameters()) / 1e6, 1)
        print(f"  built in {res['env']['build_s']} s, sdrt loaded in {res['env']['sdrt_load_s']} s; "
              f"{res['env']['unet_params_m']} M UNet params; {state['size']} px")

    def kwargs(steps, **extra):
        size = state["size"]
        return dict(num_inference_steps=steps, guidance_scale=GUIDANCE, height=size, width=size, **extra)

    def bare_unet_call():
        """One guided UNet forward (batch 2) of diffusers' module, with SDXL's added conditioning."""
        unet, size = state["ref"].unet, state["size"]
        g = torch.Generator("cpu").manual_seed(0)
        lat = size // state["pipe"].facts.vae_scale_factor
        sample = torch.randn(2, unet.config.in_channels, lat, lat, generator=g).to(args.device, dtype)
        text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g).to(args.device, dtype)
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(2, pooled, generator=g).to(args.device, dtype),
                 "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=dtype, device=args.device)}
        timestep = torch.full((2,), 801.0, device=args.device)
        with torch.inference_mode():
            ms, _ = median_ms(lambda: unet(sample, timestep, text, added_cond_kwargs=added, return_dict=False),
                              clock, 10 if cuda else 2, warmup=3 if cuda else 1)  # fmt: skip
        res["unet_call_ms"]["diffusers_b2"] = ms
        print(f"  diffusers UNet call (batch 2): {ms:.2f} ms")

    def diffusers_run(steps, output_type="np", latents=None):
        marks = []

        def on_step(pipe, i, t, kw):
            marks.append(clock.mark())
            return kw

        with torch.inference_mode():
            out = state["ref"](PROMPT, generator=torch.Generator("cpu").manual_seed(SEED), latents=latents,
                               output_type=output_type, callback_on_step_end=on_step, **kwargs(steps))  # fmt: skip
        clock.sync()
        state["marks"] = marks
        return out.images

    def measure_diffusers(steps):
        e2e, all_ms = median_ms(lambda: diffusers_run(steps), clock, args.runs)
        marks = state["marks"]
        loop_ms = clock.ms(marks[0], marks[-1]) * len(marks) / (len(marks) - 1) if len(marks) > 1 else None
        bench.add_run("diffusers", 1, steps, len(marks), loop_ms, e2e, all_ms, "loop from step-end events")

    def sdrt_generate(steps, output_type="np", **extra):
        return state["pipe"](PROMPT, seed=SEED, output_type=output_type, progress=False, **kwargs(steps, **extra)).images

    def sdrt_loop_ms(steps):
        """The device loop alone between two device marks (median of runs), with SDXL's added inputs."""
        from sdrt.device_loop import draw_step_noise

        pipe = state["pipe"]
        plan = pipe.plan(PROMPT, seed=SEED, **kwargs(steps))
        run = pipe.prepare_latents([plan], pipe.encode_text([plan]))  # the pipeline's own steps 0-2
        noise = draw_step_noise(run.generators, run.sched, run.latent_shape)
        graph = pipe.backend.cuda_graphs
        call = lambda: pipe.backend.loop.run(run.sched, run.x, run.text_states, GUIDANCE, noise, graph=graph,  # noqa: E731
                                             extra=run.added)  # fmt: skip
        call()  # warm-up (captures the graph)
        times = []
        for _ in range(args.runs):
            t0 = clock.mark()
            call()
            times.append(clock.ms(t0, clock.mark()))
        return statistics.median(times), run.sched.num_calls

    def measure_sdrt(impl, steps, graphs: bool):
        backend = state["pipe"].backend
        if graphs and not cuda:
            print(f"  {impl}: skipped on the CPU (graph capture needs CUDA)")
            return
        backend.cuda_graphs = graphs
        loop_ms, calls = sdrt_loop_ms(steps)
        e2e_ms, all_ms = median_ms(lambda: sdrt_generate(steps), clock, args.runs)
        bench.add_run(impl, 1, steps, calls, loop_ms, e2e_ms, all_ms)

    def measure_host_loop(steps):
        pipe = state["pipe"]
        pipe.backend.use_device_loop = False
        try:
            e2e_ms, all_ms = median_ms(lambda: sdrt_generate(steps), clock, args.runs)
            out = state["pipe"](PROMPT, seed=SEED, output_type="np", progress=False, **kwargs(steps))
            bench.add_run("sdrt_host", 1, steps, steps, out.timings["loop"] * 1e3, e2e_ms, all_ms)
        finally:
            pipe.backend.use_device_loop = True

    def tuned(steps):
        """cuDNN autotuning, channels-last and fused QKV projections on the graph loop; its latents vs untuned."""
        backend = state["pipe"].backend
        before = sdrt_generate(steps, "latent")
        torch.backends.cudnn.benchmark = True
        backend.set_channels_last(True)
        backend.modules["unet"].unet.fuse_qkv_projections()
        backend.loop.clear()
        measure_sdrt("sdrt_graph_tuned", steps, True)
        res["parity"]["tuned_vs_untuned"] = rel(sdrt_generate(steps, "latent"), before)

    def parity(steps):
        backend, p = state["pipe"].backend, res["parity"]
        lat = {}
        backend.cuda_graphs = False
        lat["eager"] = sdrt_generate(steps, "latent")
        if cuda:
            backend.cuda_graphs = True
            lat["graph"] = sdrt_generate(steps, "latent")
            p["graph_vs_eager"] = rel(lat["graph"], lat["eager"])
        backend.use_device_loop = False
        lat["host"] = sdrt_generate(steps, "latent")
        backend.use_device_loop = True
        p["eager_vs_host"] = rel(lat["eager"], lat["host"])
        from sdrt.noise import TorchCPUGenerator

        start = TorchCPUGenerator(SEED).randn(tuple(lat["host"].shape))  # diffusers scales it by init_noise_sigma
        ref = diffusers_run(steps, "latent", latents=torch.from_numpy(start).to(args.device, dtype))
        lat["diffusers"] = ref.float().cpu().numpy()
        best = lat.get("graph", lat["eager"])
        p["sdrt_vs_diffusers"] = rel(best, lat["diffusers"])
        p["latents_finite"] = all(bool(np.all(np.isfinite(v))) for v in lat.values())
        image = sdrt_generate(steps, "np")
        p["image_mean_uint8"] = float(np.asarray(image).mean())
        backend.cuda_graphs = cuda
        print("  " + json.dumps(p))

    bench.section("env", env)
    if bench.section("build", build) is None and "pipe" not in state:
        bench.save()
        print(bench.table())
        return 1
    bench.section("bare_unet_call", bare_unet_call, need_s=10)
    bench.section("diffusers", measure_diffusers, args.steps, need_s=20)
    bench.section("sdrt_host", measure_host_loop, args.steps, need_s=20)
    bench.section("sdrt_eager", measure_sdrt, "sdrt_eager", args.steps, False, need_s=20)
    bench.section("sdrt_graph", measure_sdrt, "sdrt_graph", args.steps, True, need_s=20)
    bench.section("parity", parity, args.steps, need_s=30)
    if cuda:
        bench.section("tuned", tuned, args.steps, need_s=40)
    bench.save()
    print(bench.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
