"""Writes what the C++ tests compare against, computed by the Python runtime (the reference).

    .venv/bin/python cpp/tests/fixtures.py OUT [EXPORT ...]

OUT/tokenizer_<name>.json  ids of the Python ClipTokenizer on a corpus of tricky prompts, per tokenizer folder
OUT/noise.json             TorchCPUGenerator streams (both kernels) and, when torch imports, torch.randn itself
OUT/schedulers.json        each scheduler's tables and a step-by-step trajectory, for many configs and step counts;
                           the tables (or errors) of SDXL's denoising_start/denoising_end windows
OUT/pipeline.tsv + *.rgb   whole images of the Python pipeline on ONNX Runtime, per export (only with EXPORTs); on an
                           export with LoRA slots also with run-time LoRAs (OUT/lora_*.safetensors, written from the
                           manifest's slot table: kohya fp16 with LoCon convs, diffusers/PEFT with metadata alphas)
OUT/lora_errors.tsv        LoRA requests the C++ host must refuse, and a word its message must hold
OUT/handover.tsv + *.f32   SDXL base -> refiner (with an SDXL base and refiner export): the base's latents at
                           denoising_end and the refiner's image from them (a refiner export runs only these)

ctest runs this first (fixture "py"); the C++ tests skip when their file is missing. Light imports only: the
runtime (numpy, tokenizers, onnxruntime), the CLIP vocabulary from the openai-clip package, torch if present.
"""

from __future__ import annotations

import functools
import json
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from sdrt.noise import TorchCPUGenerator, torch_cpu_capability
from sdrt.schedulers import DEFAULT_SCHEDULER, make_scheduler, scheduler_defaults
from sdrt.tokenizer import ClipTokenizer

CORPUS = [
    "a photo of a cat", "A PHOTO OF A CAT", "", " ", "   ", "hello   world\t\n again", "tab\there\r\nnewline",
    "  leading and trailing spaces  ", "Café crème brûlée", "Cafe\u0301 nai\u0308ve (decomposed accents)",
    "über straße, Grüße aus München", "niño jalapeño señor", "東京の夜景、ネオンライト", "一只可爱的猫 and 上海",
    "한국어 문장입니다", "Привет, мир! Москва", "مرحبا بالعالم", "שלום עולם", "हिन्दी भाषा", "ไทย ภาษา",
    "Ελληνικά ΣΟΦΊΑ σοφία ΟΔΟΣ", "emoji 😀🎉🔥 🐱🐶🦊", "family 👨‍👩‍👧‍👦 couple 👩‍❤️‍👨 thumbs 👍🏽",
    "flags 🇯🇵 🇫🇷 ❤️", "numbers 1234567 and 3.14 and -42 and 1,000,000 1e10", "fractions ½ ² ٣ Ⅻ ① ¾",
    "version v1.5 vs 2.1", "wow!!! really??? what?!", "hello! world", "!!!", "a!b!!c", "wow!",
    "...ellipsis… and — dashes – here", "don't it's you're we've I'm they'll he'd", "DON'T IT'S",
    "rock 'n' roll '90s ''s ''t 'sa", "fish &amp; chips &lt;tag&gt;", "<b>html tags</b>",
    "quotes \"double\" and 'single' and “curly” ‘single’", "under_score hyphen-ated slash/separated",
    "email@example.com https://example.com/path?q=1", "#hashtag @mention $100 50% a+b=c",
    "(masterpiece:1.2), [bad hands], {best quality}, 8k, trending on artstation", "ＦＵＬＬＷＩＤＴＨ １２３",
    "ﬁne ligature ﬀ ﬃ", "zero\u200bwidth nbsp\u00a0space ideographic\u3000space thin\u2009space",
    "nel\u0085line ogham\u1680space mongol\u180evowel bom\ufeffhere line\u2028sep", "<|endoftext|> inside <|startoftext|> text",
    "<|ENDOFTEXT|> uppercase special", "x<|endoftext|>y", "İstanbul ǅ ǈ Ω ß ẞ Ⅷ", "𝐁𝐨𝐥𝐝 math 𝟏𝟐𝟑",
    "Zalgo t̸̢̛e̵x̷t̶", "mixed中文English混合text", "control \x07 bell \x1b esc", "supercalifragilisticexpialidocious",
    "antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis", "🐱" * 30,
    "a highly detailed matte painting of a sprawling cyberpunk city at night, neon signs reflecting in puddles, "
    "flying cars, towering skyscrapers, dense fog, volumetric lighting, cinematic composition, trending on "
    "artstation, by greg rutkowski and alphonse mucha, octane render, unreal engine 5, 8k resolution, sharp focus, "
    "intricate details, vibrant colors, dramatic shadows, award winning photograph, masterpiece", "x " * 100,
]
TI_CORPUS = ["a <cat-toy> in <fancy style>", "A <CAT-TOY>!", "x<cat-toy>y <cat-toy><cat-toy>", "<fancy"]

SD15 = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
        "trained_betas": None, "clip_sample": False}
SD21V = {"_class_name": "DDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
         "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False,
         "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
CONFIGS = {
    "sd15": SD15,
    "sd21v": SD21V,
    "linear_trailing_zsnr_v": {**SD21V, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
                               "timestep_spacing": "trailing", "rescale_betas_zero_snr": True},
    "cosine_linspace": {**SD15, "beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "linspace"},
    "ddim_clip_one": {**SD15, "_class_name": "DDIMScheduler", "clip_sample": True, "set_alpha_to_one": True},
    "euler_karras": {**SD15, "_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True,
                     "timestep_spacing": "leading", "final_sigmas_type": "sigma_min"},
    "dpm_heun_sigma_min": {**SD15, "_class_name": "DPMSolverMultistepScheduler", "solver_type": "heun",
                           "final_sigmas_type": "sigma_min", "lower_order_final": False, "timestep_spacing": "trailing"},
    "dpm_leading_defaults": {**SD15, "_class_name": "DPMSolverMultistepScheduler", "timestep_spacing": "leading",
                             "_use_default_values": ["steps_offset"]},
    "kdpm2_fallback": {**SD15, "_class_name": "KDPM2DiscreteScheduler"},
    "unsupported": {**SD15, "_class_name": "EulerDiscreteScheduler", "use_beta_sigmas": True},
    # The samplers of issue #20 from their own classes' configs, and PNDM's Runge-Kutta warm-up.
    "pndm_prk": {k: v for k, v in SD15.items() if k != "skip_prk_steps"},
    "lms_karras_v": {**SD21V, "_class_name": "LMSDiscreteScheduler", "use_karras_sigmas": True},
    "heun_clip_exponential": {**SD15, "_class_name": "HeunDiscreteScheduler", "clip_sample": True,
                              "use_exponential_sigmas": True, "timestep_spacing": "trailing"},
    "unipc_order3_bh1": {**SD15, "_class_name": "UniPCMultistepScheduler", "solver_order": 3, "solver_type": "bh1",
                         "disable_corrector": [1], "timestep_spacing": "leading"},
    "unipc_noise_karras_v": {**SD21V, "_class_name": "UniPCMultistepScheduler", "predict_x0": False,
                             "use_karras_sigmas": True, "final_sigmas_type": "sigma_min"},
    "dpm_sde": {**SD15, "_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"},
    "dpm_singlestep_heun": {**SD21V, "_class_name": "DPMSolverSinglestepScheduler", "solver_type": "heun",
                            "algorithm_type": "sde-dpmsolver++", "final_sigmas_type": "sigma_min"},
    "ddpm_clip_large": {**SD15, "_class_name": "DDPMScheduler", "clip_sample": True, "variance_type": "fixed_large"},
    "lcm_clip_v": {**SD21V, "_class_name": "LCMScheduler", "clip_sample": True, "original_inference_steps": 40},
    "tcd": {**SD15, "_class_name": "TCDScheduler"},
}
NAMES = [None, "ddim", "pndm", "euler", "euler_karras", "euler_exponential", "euler_a", "dpmpp_2m", "dpmpp_2m_karras",
         "dpmpp_2m_exponential", "lms", "lms_karras", "lms_exponential", "heun", "heun_karras", "heun_exponential",
         "unipc", "unipc_karras", "unipc_exponential", "dpmpp_2m_sde", "dpmpp_2m_sde_karras", "dpmpp_2m_sde_exponential",
         "dpmpp_2s_a", "dpmpp_2s_a_karras", "dpmpp_2s_a_exponential", "ddpm", "lcm", "tcd"]
STEPS = [1, 2, 4, 7, 20, 50]
# SDXL's hand-over windows (denoising_start, denoising_end; None = not given), per config x name x steps: the tables
# of the calls kept, or the error (with its message: the C++ must say the same).
WINDOW_CONFIGS = {"sd15": NAMES, "linear_trailing_zsnr_v": [None, "euler", "heun_karras", "unipc", "dpmpp_2m_karras", "lcm"],
                  "heun_clip_exponential": [None], "pndm_prk": [None]}
WINDOW_STEPS = [1, 4, 7, 12]
WINDOWS = [(0.8, None), (None, 0.8), (0.5, None), (None, 0.25), (0.3, 0.7), (0.7, 0.3), (0.97, None), (None, 0.02),
           (0.999, None), (0.05, 0.999), (1.0, None), (None, -0.2), (float("nan"), None)]
TRAJECTORIES = [(4, 1.0), (20, 1.0), (20, 0.6), (7, 0.5)]
N = 64  # trajectory sample size


def tokenizer_fixtures(out: Path, exports: list[Path]) -> None:
    folders = {}
    try:
        from sdrt.export.clip_vocab import write_clip_tokenizer

        folders["sd1"] = write_clip_tokenizer(out / "tok_sd1")
        folders["sd2"] = write_clip_tokenizer(out / "tok_sd2", pad_token="!")
        ti = write_clip_tokenizer(out / "tok_ti")
        (ti / "added_tokens.json").write_text(json.dumps({"<cat-toy>": 49408, "<Fancy Style>": 49409}))
        folders["ti"] = ti
    except Exception as err:  # openai-clip missing: the exports' own folders still get tested
        print(f"fixtures: no standalone tokenizer folders ({err})")
    for e in exports:  # (an SDXL refiner has the second tokenizer only)
        folders[f"export_{e.name}"] = e / "tokenizer" if (e / "tokenizer").is_dir() else e / "tokenizer_2"
    for name, folder in folders.items():
        tok = ClipTokenizer.from_folder(folder)
        texts = CORPUS + (TI_CORPUS if name == "ti" else [])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cases = [{"text": t, "ids": tok.encode(t), "padded": tok([t])[0].tolist()} for t in texts]
        (out / f"tokenizer_{name}.json").write_text(json.dumps({"folder": str(folder), "cases": cases}))


def noise_fixtures(out: Path) -> None:
    plans = [(0, [16, 1, 3, 17, 100, 5, 256]), (1, [1, 1, 1, 15, 16]), (42, [16384]), (2**32 + 5, [33, 7, 64]),
             (-1, [256, 2]), (123456789, [31, 4 * 8 * 12, 1])]
    torch = None
    try:
        import torch  # noqa: F811
    except ImportError:
        pass
    cases = []
    for kernel in ("avx2", "default"):
        for seed, sizes in plans:
            g = TorchCPUGenerator(seed, cpu_capability=kernel)
            case = {"kernel": kernel, "seed": seed % 2**64, "sizes": sizes, "values": [g.randn(n).tolist() for n in sizes]}
            ours = "default" if torch_cpu_capability() == "default" else "avx2"
            if torch is not None and kernel == ours:
                tg = torch.Generator("cpu").manual_seed(seed)
                case["torch"] = [torch.randn(n, generator=tg).tolist() for n in sizes]
            cases.append(case)
    (out / "noise.json").write_text(json.dumps({"python_kernel": torch_cpu_capability(), "cases": cases}))


def error_kind(err: Exception) -> str:
    return type(err).__name__  # InputError or ModelError


@functools.lru_cache(maxsize=None)
def _draws(seed: int) -> np.ndarray:
    kernel = "default" if torch_cpu_capability() == "default" else "avx2"
    return TorchCPUGenerator(seed, cpu_capability=kernel).randn(N)


def draws(seed: int) -> np.ndarray:
    return _draws(seed).copy()


def trajectory(s, n_steps: int, strength: float) -> dict:
    s.set_timesteps(n_steps, strength)
    gen = draws
    if strength < 1:
        x = s.add_noise(gen(8), gen(9), 0).astype(np.float32)
    else:
        x = gen(7) * np.float32(s.init_noise_sigma)
    steps, scaled = [], []
    for i in range(s.num_calls):
        scaled.append(s.scale_model_input(x, i).tolist())
        noise = gen(200 + i) if s.needs_noise else None
        x = s.step(gen(100 + i), i, x, noise)
        steps.append(x.tolist())
    return {"steps": n_steps, "strength": strength, "scaled": scaled, "samples": steps}


def scheduler_fixtures(out: Path) -> None:
    cases = []
    for cname, config in CONFIGS.items():
        for name in NAMES:
            base = {"config": cname, "name": name or ""}
            try:
                s = make_scheduler(name, config)
            except Exception as err:
                cases.append({**base, "error": error_kind(err)})
                continue
            base["resolved_name"] = s.name
            for n_steps in STEPS:
                for strength in (1.0, 0.6) if n_steps in (7, 20) else (1.0,):
                    case = {**base, "steps": n_steps, "strength": strength}
                    try:
                        s.set_timesteps(n_steps, strength)
                    except Exception as err:
                        cases.append({**case, "error": error_kind(err)})
                        continue
                    case.update(timesteps=s.timesteps.tolist(), coefficients=s.coefficients.tolist(),
                                input_scale=s.input_scale.tolist(), noise_coefficients=s.noise_coefficients.tolist(),
                                init_noise_sigma=s.init_noise_sigma)
                    cases.append(case)
            for n_steps, strength in TRAJECTORIES:
                try:
                    t = trajectory(make_scheduler(name, config), n_steps, strength)
                except Exception as err:
                    t = {"steps": n_steps, "strength": strength, "error": error_kind(err)}
                cases.append({**base, "trajectory": t})
    for cname, names in WINDOW_CONFIGS.items():
        for name in names:
            for n_steps in WINDOW_STEPS:
                for start, end in WINDOWS:
                    s = make_scheduler(name, CONFIGS[cname])
                    case = {"config": cname, "name": name or "", "resolved_name": s.name, "steps": n_steps, "strength": 1.0,
                            "denoising_start": start, "denoising_end": end}
                    try:
                        s.set_timesteps(n_steps, 1.0, start, end)
                    except Exception as err:
                        cases.append({**case, "error": error_kind(err), "message": str(err)})
                        continue
                    cases.append({**case, "timesteps": s.timesteps.tolist(), "coefficients": s.coefficients.tolist(),
                                  "input_scale": s.input_scale.tolist(), "noise_coefficients": s.noise_coefficients.tolist(),
                                  "init_noise_sigma": s.init_noise_sigma})
    # The family section as an export's manifest carries it: C++ takes every scheduler default from there.
    family = {"schedulers": scheduler_defaults(), "default_scheduler": DEFAULT_SCHEDULER}
    (out / "schedulers.json").write_text(json.dumps({"configs": CONFIGS, "cases": cases, "family": family}))


def test_image(width: int, height: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x * y) % 256], -1).astype(np.uint8)


def test_mask(width: int, height: int) -> np.ndarray:
    """Grey levels on both sides of 128 (the C API's 50% threshold) in a box, 0 around it."""
    mask = np.zeros((height, width), np.uint8)
    y, x = np.mgrid[0 : height // 2, 0 : width // 2]
    mask[height // 4 : height // 4 + height // 2, width // 8 : width // 8 + width // 2] = 120 + (x + y) % 20
    return mask


# Inpainting cases (issue #20), the only ones an inpainting export runs: name, prompt, steps, guidance, seed,
# scheduler, batch, strength, keep_unmasked.
INPAINT_CASES = [("inpaint", "a red hat", 6, 1.5, 16, "", 1, 1.0, False),
                 ("inpaint_euler_a_keep_batch", "a blue door", 5, 1.5, 17, "euler_a", 2, 0.75, True)]
# SDXL's micro-conditioning (sdrt_gen_params' ABI 5 fields): name, prompt, negative, steps, guidance, seed, img2img, micro
MICRO_CASES = [
    ("micro", "a photo of a cat", "blurry", 5, 2.0, 21, False,
     dict(original_size=(96, 80), crops_coords_top_left=(4, 2), target_size=(64, 48))),
    ("micro_negative_twins", "a red fox", "", 5, 2.0, 22, False,
     dict(negative_original_size=(32, 40), negative_target_size=(16, 24), negative_crops_coords_top_left=(3, 5))),
    ("micro_img2img", "a watercolour painting", "fog", 6, 1.5, 23, True,
     dict(crops_coords_top_left=(8, 0), negative_target_size=(128, 128))),
]
MICRO_ORDER = ("original_size", "crops_coords_top_left", "target_size", "negative_original_size",
               "negative_crops_coords_top_left", "negative_target_size")


def micro_column(micro: dict | None) -> str:
    """The 14 numbers of the C fields (original h, w, crop top, left, target h, w, their negative twins, the aesthetic
    scores; 0 = not given), or "" for none."""
    if not micro:
        return ""
    values = [v for key in MICRO_ORDER for v in micro.get(key, (0, 0))]
    values += [micro.get("aesthetic_score", 0), micro.get("negative_aesthetic_score", 0)]
    return ",".join(f"{v:g}" for v in values)


def lora_slots(export: Path) -> dict:
    contracts = json.loads((export / "manifest.json").read_text())["contracts"]
    return {network: c.get("lora_slots", []) for network, c in contracts.items()}


def lora_fixtures(out: Path, export: Path) -> dict[str, Path]:
    """Random LoRAs for an export's slots (none without slots): kohya fp16 on every other slot (LoCon convs, an alpha
    on some layers, alpha = rank on the rest), diffusers/PEFT fp32 on the others (alphas from the adapter metadata,
    one by pattern, rsLoRA on the text encoder), a LoRA of another model (a wrong shape) and a LoHa."""
    from safetensors.numpy import save_file

    slots = lora_slots(export)
    if not any(slots.values()):
        return {}
    rng = np.random.default_rng(18)
    rnd = lambda *shape: (rng.standard_normal(shape) * 0.3).astype(np.float32)  # noqa: E731
    kohya, peft, meta = {}, {}, {"unet.r": 2, "unet.lora_alpha": 4.0, "text_encoder.r": 2, "text_encoder.lora_alpha": 2.0,
                                 "text_encoder.use_rslora": True}
    for network, prefix, dotted in (("unet", "lora_unet_", "unet."), ("text_encoder", "lora_te_text_model_", "text_encoder.text_model.")):
        for k, slot in enumerate(slots.get(network, [])):
            out_ch, in_ch, kernel = slot["weight"][0], slot["weight"][1], slot["weight"][2:]
            ones = [1, 1] if kernel else []
            if k % 2 == 0:
                key = prefix + slot["layer"].replace(".", "_")
                kohya[key + ".lora_down.weight"] = rnd(3, in_ch, *kernel).astype(np.float16)
                kohya[key + ".lora_up.weight"] = rnd(out_ch, 3, *ones).astype(np.float16)
                if k % 4 == 0:
                    kohya[key + ".alpha"] = np.array(1.5, np.float16)
            else:
                peft[dotted + slot["layer"] + ".lora_A.weight"] = rnd(2, in_ch, *kernel)
                peft[dotted + slot["layer"] + ".lora_B.weight"] = rnd(out_ch, 2, *ones)
                if network == "unet" and "unet.alpha_pattern" not in meta:
                    meta["unet.alpha_pattern"] = {slot["layer"].split(".", 1)[1]: 1.0}  # matched by its suffix
    files = {"kohya": out / "lora_kohya.safetensors", "peft": out / "lora_peft.safetensors",
             "wrong": out / "lora_wrong.safetensors", "loha": out / "lora_loha.safetensors"}
    save_file(kohya, str(files["kohya"]))
    save_file(peft, str(files["peft"]), metadata={"lora_adapter_metadata": json.dumps(meta), "format": "pt"})
    slot = slots["unet"][0]
    key = "lora_unet_" + slot["layer"].replace(".", "_")
    save_file({key + ".lora_down.weight": rnd(2, slot["weight"][1] * 2, *slot["weight"][2:]),
               key + ".lora_up.weight": rnd(slot["weight"][0], 2, *([1, 1] if slot["weight"][2:] else []))}, str(files["wrong"]))
    save_file({key + ".hada_w1_a": rnd(4, 2), key + ".hada_w1_b": rnd(2, 4), key + ".hada_w2_a": rnd(4, 2),
               key + ".hada_w2_b": rnd(2, 4)}, str(files["loha"]))
    return files


def facts(export: Path) -> dict:
    return json.loads((export / "manifest.json").read_text())["facts"]


def is_refiner(export: Path) -> bool:
    return bool(facts(export).get("requires_aesthetics_score"))


def is_sdxl_base(export: Path) -> bool:
    return facts(export).get("family") == "sdxl"


# SDXL's base -> refiner hand-over (diffusers' ensemble of experts): name, prompt, negative, steps, guidance, seed,
# scheduler, batch, fraction (the base's denoising_end = the refiner's denoising_start), micro-conditioning. Heun
# keeps a step's two calls together across the cut; "end_pixels" decodes the base's partial latents (no refiner);
# "base_continues" hands the base's latents to the base itself, whose negative time ids then follow img2img's rule.
HANDOVER_CASES = [
    ("handover", "a photo of a cat", "", 6, 2.0, 30, "", 1, 0.8, None),
    ("handover_heun_batch", "a red fox", "blurry", 5, 2.0, 31, "heun", 2, 0.7, None),
    ("handover_dpmpp_2m_sde", "a lighthouse", "", 6, 1.5, 32, "dpmpp_2m_sde", 1, 0.75, None),
    ("end_pixels", "a bowl of fruit", "", 6, 2.0, 33, "", 1, 0.8, None),
    ("base_continues", "a green hill", "fog", 6, 3.0, 34, "", 1, 0.3, dict(negative_original_size=(1024, 16))),
]


def handover_fixtures(out: Path, bases: list[Path], refiners: list[Path]) -> None:
    """OUT/handover.tsv: per case the base's latents after denoising_end (float32 .f32) and the refiner's image
    (denoising_start from those latents, fresh generators seed + k), as Pipeline(..., refiner=) makes them."""
    from sdrt.pipeline import Pipeline

    rows = []
    if not bases or not refiners:
        (out / "handover.tsv").write_text("")
        return
    base = Pipeline.from_pretrained(bases[0], backend="onnx")
    refiner = Pipeline.from_pretrained(refiners[0], backend="onnx")
    size = max(base.facts.size_step, 64 // base.facts.size_step * base.facts.size_step)
    for name, prompt, negative, steps, guidance, seed, sched, batch, fraction, micro in HANDOVER_CASES:
        kwargs = dict(negative_prompt=negative or None, num_inference_steps=steps, guidance_scale=guidance, height=size,
                      width=size, seed=seed, scheduler=sched or None, num_images_per_prompt=batch, progress=False, **(micro or {}))
        stem = f"handover_{name}"
        second, second_path = (base, bases[0]) if name == "base_continues" else (refiner, refiners[0])
        if name == "end_pixels":
            image = base(prompt, denoising_end=fraction, output_type="np", **kwargs).images
            whole = base(prompt, output_type="np", **kwargs).images
            assert np.abs(image.astype(int) - whole.astype(int)).max() > 2, f"{name}: denoising_end changes nothing"
            (out / f"{stem}.rgb").write_bytes(np.ascontiguousarray(image).tobytes())
            rows.append([name, bases[0], "", prompt, negative, steps, guidance, seed, sched, size, size, batch, fraction, "",
                         f"{stem}.rgb", micro_column(micro)])
            continue
        latents = base(prompt, denoising_end=fraction, output_type="latent", **kwargs).images
        image = second(prompt, image=latents, denoising_start=fraction, output_type="np", **kwargs).images
        both = base(prompt, refiner=second, refiner_start=fraction, output_type="np", **kwargs).images
        assert np.array_equal(both, image), f"{name}: Pipeline(refiner=) differs from the two calls"
        if micro:  # the time ids must change the image, or the C++ comparison could pass with them ignored
            plain = second(prompt, image=latents, denoising_start=fraction, output_type="np",
                           **{k: v for k, v in kwargs.items() if k not in micro}).images
            change = int(np.abs(plain.astype(int) - image.astype(int)).max())
            assert change > 2, f"{name}: the micro-conditioning changes the image by {change}/255 only"
        (out / f"{stem}.f32").write_bytes(np.ascontiguousarray(latents, np.float32).tobytes())
        (out / f"{stem}.rgb").write_bytes(np.ascontiguousarray(image).tobytes())
        rows.append([name, bases[0], second_path, prompt, negative, steps, guidance, seed, sched, size, size, batch, fraction,
                     f"{stem}.f32", f"{stem}.rgb", micro_column(micro)])
    (out / "handover.tsv").write_text("".join("\t".join(map(str, r)) + "\n" for r in rows))


def pipeline_fixtures(out: Path, exports: list[Path]) -> None:
    from sdrt.pipeline import Pipeline

    rows, errors = [], []
    refiners = [e for e in exports if is_refiner(e)]
    for e in exports:
        if e in refiners:
            continue
        pipe = Pipeline.from_pretrained(e, backend="onnx")
        step = pipe.facts.size_step
        size = max(step, 64 // step * step)
        loras = lora_fixtures(out, e)
        if loras:
            errors += [(e, loras["wrong"].name, "does not match this model"), (e, loras["loha"].name, "LoHa"),
                       (e, "lora_missing.safetensors", "does not exist")]
        elif not pipe.facts.inpainting_unet:  # (the error test then makes a plain txt2img image on the same context)
            errors.append((e, "lora_kohya.safetensors", "--lora-slots"))
        cases = [  # name, prompt, negative, steps, guidance, seed, scheduler, width, height, batch, strength, img2img
            ("txt2img", "a photo of a cat", "", 8, 1.5, 0, "", size, size, 1, 0.0, False),
            ("negative", "a red fox in the snow!", "blurry, low quality", 6, 2.0, 1, "euler", size, size, 1, 0.0, False),
            ("img2img", "a watercolour painting", "", 10, 1.5, 2, "", size, size, 1, 0.6, True),
            ("euler_a_batch", "two dogs", "cats", 5, 1.5, 3, "euler_a", size + step, size, 2, 0.0, False),
            ("dpm_karras_noguide", "a lighthouse", "", 6, 1.0, 4, "dpmpp_2m_karras", size, size, 1, 0.0, False),
            ("ddim", "mountains at dawn", "", 5, 3.0, 5, "ddim", size, size + step, 1, 0.0, False),
            ("img2img_euler_a_batch", "a city at night", "fog", 6, 1.5, 6, "euler_a", size, size, 2, 0.5, True),
            ("dpmpp_2m", "a bowl of fruit", "", 7, 1.5, 7, "dpmpp_2m", size, size, 1, 0.0, False),
            ("big_seed", "a red barn", "", 4, 1.5, 2**32 + 5, "euler_a", size, size, 2, 0.0, False),  # past 32 bits
            # issue #20's samplers: Heun's 2n - 1 UNet calls, per-step noise (SDE, ancestral, DDPM, LCM, TCD), UniPC
            ("heun", "a cat on a sofa", "", 4, 1.5, 8, "heun", size, size, 1, 0.0, False),
            ("dpmpp_2m_sde_batch", "a forest", "dark", 5, 1.5, 9, "dpmpp_2m_sde_karras", size, size, 2, 0.0, False),
            ("img2img_dpmpp_2s_a", "a harbour", "", 6, 1.5, 10, "dpmpp_2s_a", size, size, 1, 0.6, True),
            ("unipc", "a desert road", "", 5, 2.0, 11, "unipc", size, size, 1, 0.0, False),
            ("lms", "a red apple", "", 4, 1.5, 12, "lms", size, size, 1, 0.0, False),
            ("ddpm_batch", "a blue car", "", 5, 1.5, 13, "ddpm", size, size, 2, 0.0, False),
            ("lcm", "a green bird", "", 4, 1.0, 14, "lcm", size, size, 1, 0.0, False),
            ("tcd_batch", "a yellow flower", "", 4, 1.5, 15, "tcd", size, size, 2, 0.0, False),
        ]
        inpaint = [(name, prompt, "", steps, guidance, seed, sched, size, size, batch, strength, True, keep)
                   for name, prompt, steps, guidance, seed, sched, batch, strength, keep in INPAINT_CASES]
        cases = inpaint if pipe.facts.inpainting_unet else [c + (None,) for c in cases] + inpaint
        cases = [c + ("",) for c in cases]
        if pipe.facts.time_ids_dim and not pipe.facts.inpainting_unet:  # SDXL: micro-conditioning (last column)
            cases = [c + (None,) for c in cases] + [
                (name, prompt, negative, steps, guidance, seed, "", size, size, 1, 0.6 if img2img else 0.0, img2img, None, "", micro)
                for name, prompt, negative, steps, guidance, seed, img2img, micro in MICRO_CASES]
        if loras:  # run-time LoRAs: one, two stacked (a batch), a negative scale on img2img, then none again
            k, p = loras["kohya"].name, loras["peft"].name
            cases = [  # ..., keep, loras: "FILE:SCALE;..." in OUT
                ("lora_plain", "a photo of a cat", "", 6, 2.0, 0, "", size, size, 1, 0.0, False, None, ""),
                ("lora_kohya", "a photo of a cat", "", 6, 2.0, 0, "euler", size, size, 1, 0.0, False, None, f"{k}:0.8"),
                ("lora_stacked_batch", "two dogs", "cats", 5, 2.0, 3, "", size, size, 2, 0.0, False, None, f"{p}:0.5;{k}:1.5"),
                ("lora_img2img", "a watercolour painting", "", 8, 1.5, 2, "", size, size, 1, 0.6, True, None, f"{p}:-0.7"),
                ("lora_none_after", "a photo of a cat", "", 6, 2.0, 0, "", size, size, 1, 0.0, False, None, ""),
            ]
        cases = [c if len(c) == 15 else c + (None,) for c in cases]
        for name, prompt, negative, steps, guidance, seed, sched, w, h, batch, strength, img2img, keep, lora_spec, micro in cases:
            init = test_image(w, h) if img2img else None
            mask = test_mask(w, h) if keep is not None else None
            kwargs = dict(strength=strength, image=init) if img2img else {}
            if mask is not None:
                kwargs.update(mask_image=mask, keep_unmasked=keep)
            kwargs.update(micro or {})
            if lora_spec:
                kwargs["loras"] = [(str(out / f), float(scale)) for f, scale in (x.rsplit(":", 1) for x in lora_spec.split(";"))]
            warm = dict(image=init, mask_image=mask, strength=1.0) if pipe.facts.inpainting_unet else {}
            pipe(prompt, num_inference_steps=1, height=h, width=w, seed=0, output_type="np", progress=False, **warm)
            t0 = time.perf_counter()
            result = pipe(prompt, negative_prompt=negative or None, num_inference_steps=steps, guidance_scale=guidance,
                          height=h, width=w, seed=seed, scheduler=sched or None, num_images_per_prompt=batch,
                          output_type="np", progress=False, **kwargs)
            seconds = time.perf_counter() - t0
            if lora_spec:  # the LoRA must change the image, or the C++ comparison could pass with LoRAs ignored
                plain = pipe(prompt, negative_prompt=negative or None, num_inference_steps=steps, guidance_scale=guidance,
                             height=h, width=w, seed=seed, scheduler=sched or None, num_images_per_prompt=batch,
                             output_type="np", progress=False, **{k: v for k, v in kwargs.items() if k != "loras"})
                change = int(np.abs(plain.images.astype(int) - result.images.astype(int)).max())
                assert change > 8, f"{name}: the LoRA changes the image by {change}/255 only"
            if micro:  # the time ids must change the image, or the C++ comparison could pass with them ignored
                plain = pipe(prompt, negative_prompt=negative or None, num_inference_steps=steps, guidance_scale=guidance,
                             height=h, width=w, seed=seed, output_type="np", progress=False,
                             **{k: v for k, v in kwargs.items() if k not in micro})
                change = int(np.abs(plain.images.astype(int) - result.images.astype(int)).max())
                assert change > 2, f"{name}: the micro-conditioning changes the image by {change}/255 only"
            stem = f"pipe_{e.name}_{name}"
            (out / f"{stem}.rgb").write_bytes(np.ascontiguousarray(result.images).tobytes())
            init_file = ""
            if init is not None:
                init_file = f"{stem}.init.rgb"
                (out / init_file).write_bytes(init.tobytes())
            mask_file = ""
            if mask is not None:
                mask_file = f"{stem}.mask.grey"
                (out / mask_file).write_bytes(mask.tobytes())
            rows.append([name, str(e), prompt, negative, steps, guidance, seed, sched, w, h, batch, strength, init_file,
                         f"{stem}.rgb", f"{seconds:.4f}", mask_file, int(bool(keep)), lora_spec, micro_column(micro)])
    handover_fixtures(out, [e for e in exports if e not in refiners and is_sdxl_base(e)], refiners)
    (out / "pipeline.tsv").write_text("".join("\t".join(map(str, r)) + "\n" for r in rows))
    (out / "lora_errors.tsv").write_text("".join(f"{e}\t{f}\t{words}\n" for e, f, words in errors))


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    out = Path(argv[0])
    exports = [Path(p) for p in argv[1:] if p]
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    missing = [str(e) for e in exports if not (e / "manifest.json").exists()]
    if missing:
        print(f"fixtures: not sdrt exports, skipped: {', '.join(missing)}")
        exports = [e for e in exports if str(e) not in missing]
    t0 = time.perf_counter()
    tokenizer_fixtures(out, exports)
    noise_fixtures(out)
    scheduler_fixtures(out)
    if exports:
        pipeline_fixtures(out, exports)
    else:
        print("fixtures: no export given: the C++ vs Python image tests will skip (pass sdrt export folders)")
    print(f"fixtures written to {out} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
