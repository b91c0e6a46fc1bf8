"""Latent consistency distillation of the built-in digits model into an LCM-LoRA (issue #20: 4-step images).

    python -m sdrt.export.digits.lcm --out build/digits/lcm      # <= 30 CPU-minutes, 1 thread; writes
                                                                 # build/digits/lcm/digits_lcm_lora.safetensors
    python -m sdrt.export.digits.lcm --smoke --out build/digits/lcm-smoke

The method of Luo et al. 2023 (LCM, LCM-LoRA), as diffusers' examples/consistency_distillation scripts run it,
written compactly: a frozen teacher (the shipped UNet) with classifier-free guidance w takes one DDIM step of
`skip` (= 1000 / 50) timesteps along the probability-flow ODE from a noised training latent; the student (the
same UNet plus a LoRA on every attention, feed-forward and conv layer) must map both ends of that step to the
same clean latent through the consistency parametrisation c_skip(t) x_t + c_out(t) x0_pred(x_t, t) (the end
point's target computed by the student itself without gradients, as diffusers' LCM-LoRA script does). The
guidance w is drawn per sample and not fed to the UNet (an LCM-LoRA has no w embedding; it needs no CFG batch
at inference: guidance_scale 1). The UNet of the base model stays untouched; only the LoRA (rank --rank) ships.

The time cap counts this process's CPU time (on a shared machine its wall time is longer), and the learning
rate's cosine ends at whichever of --steps or --cpu-minutes runs out first; LoRA checkpoints (EMA weights) are
saved every --ckpt-every steps with the oracle's 4-step reading of the 50 benchmark prompts in the log.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, LCMScheduler, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTokenizer

from sdrt.export.digits import data
from sdrt.export.digits.train import Captioner, encode_dataset, training_log

# Every attention, feed-forward, resnet conv, sampler conv and time projection: diffusers' LCM-LoRA targets.
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
           "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
EVAL_PROMPTS = [(d, COLOURS[(d * 3 + k) % 8]) for k in range(5) for d in range(10)]  # benchmarks/sampler_quality.py


class LoraWrap(torch.nn.Module):
    """base(x) + up(down(x)) for a Linear or Conv2d; up starts at zero; `on` False gives the base layer (the teacher)."""

    def __init__(self, base: torch.nn.Module, rank: int):
        super().__init__()
        self.base, self.on = base, True
        if isinstance(base, torch.nn.Linear):
            r = min(rank, base.in_features, base.out_features)
            self.down = torch.nn.Linear(base.in_features, r, bias=False)
            self.up = torch.nn.Linear(r, base.out_features, bias=False)
        else:
            r = min(rank, base.in_channels * base.kernel_size[0] * base.kernel_size[1], base.out_channels)
            self.down = torch.nn.Conv2d(base.in_channels, r, base.kernel_size, base.stride, base.padding, bias=False)
            self.up = torch.nn.Conv2d(r, base.out_channels, 1, bias=False)
        torch.nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        torch.nn.init.zeros_(self.up.weight)

    def forward(self, x, *args, **kwargs):
        y = self.base(x)
        return y + self.up(self.down(x)) if self.on else y


def add_lora(unet, rank: int) -> dict[str, LoraWrap]:
    unet.requires_grad_(False)
    wraps = {}
    for name, module in list(unet.named_modules()):
        if name.endswith(TARGETS) and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            parent, _, child = name.rpartition(".")
            wrap = LoraWrap(module, rank)
            setattr(unet.get_submodule(parent), child, wrap)
            wraps[name] = wrap
    return wraps


def lora_state(wraps: dict[str, LoraWrap], dtype=torch.float16) -> dict[str, torch.Tensor]:
    """diffusers/PEFT layout (unet.<module>.lora_A/.lora_B, alpha = rank): what sdrt's LoRA reader and diffusers load."""
    out = {}
    for name, w in wraps.items():
        out[f"unet.{name}.lora_A.weight"] = w.down.weight.detach().to(dtype).contiguous()
        out[f"unet.{name}.lora_B.weight"] = w.up.weight.detach().to(dtype).contiguous()
    return out


def set_lora(wraps, on: bool) -> None:
    for w in wraps.values():
        w.on = on


def boundary(t: torch.Tensor, sigma_data=0.5, timestep_scaling=10.0):
    """LCM's c_skip, c_out (diffusers' LCMScheduler.get_scalings_for_boundary_condition_discrete)."""
    t = t.float() * timestep_scaling
    return sigma_data**2 / (t**2 + sigma_data**2), t / (t**2 + sigma_data**2) ** 0.5


def per_sample(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


@torch.no_grad()
def evaluate(unet, text_encoder, captioner, vae, oracle, sched_config, steps=4, seed=0) -> tuple[float, float]:
    """The oracle's digit and colour accuracy on the 50 benchmark prompts, LCMScheduler, `steps` steps, no CFG."""
    sched = LCMScheduler.from_config(sched_config)
    sched.set_timesteps(steps)
    texts = [f"a {c} {d}" for d, c in EVAL_PROMPTS]
    cond = text_encoder(captioner.ids(texts)).last_hidden_state
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((len(texts), 4, 8, 8), generator=gen)
    for t in sched.timesteps:
        eps = unet(x, t, cond).sample
        x = sched.step(eps, t, x, generator=gen).prev_sample
    img = vae.decode(x / vae.config.scaling_factor).sample
    img = ((img.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).to(torch.uint8).numpy()
    read = oracle.classify(img)
    digit = float(np.mean([r[0] == d for r, (d, _) in zip(read, EVAL_PROMPTS)]))
    colour = float(np.mean([r[1] == c for r, (_, c) in zip(read, EVAL_PROMPTS)]))
    return digit, colour




def distil(a, log) -> Path:
    from sdrt.oracle import DigitOracle

    src = a.init
    vae = AutoencoderKL.from_pretrained(src / "vae").eval()
    text_encoder = CLIPTextModel.from_pretrained(src / "text_encoder").eval()
    unet = UNet2DConditionModel.from_pretrained(src / "unet").eval()
    captioner = Captioner(CLIPTokenizer.from_pretrained(src / "tokenizer"))
    sched_config = {k: v for k, v in DDPMScheduler.load_config(src / "scheduler").items() if not k.startswith("_")}
    noise_sched = DDPMScheduler.from_config(sched_config)
    alphas = noise_sched.alphas_cumprod
    oracle = DigitOracle.load()
    scale = vae.config.scaling_factor
    for p in (*vae.parameters(), *text_encoder.parameters()):
        p.requires_grad_(False)

    images, labels = data.make_dataset(a.images, seed=a.seed + 20, split="train")
    lat_mean, lat_std = encode_dataset(vae, images)
    log(f"data: {len(images)} images encoded ({time.process_time():.0f} CPU s)")

    wraps = add_lora(unet, a.rank)
    params = [p for w in wraps.values() for p in (*w.down.parameters(), *w.up.parameters())]
    for p in params:
        p.requires_grad_(True)
    n_params = sum(p.numel() for p in params)
    log(f"LoRA rank {a.rank} on {len(wraps)} layers: {n_params / 1e6:.3f} M parameters ({2 * n_params / 1e6:.2f} MB fp16)")
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0, foreach=True)

    skip = noise_sched.config.num_train_timesteps // a.ddim_steps
    ddim_timesteps = torch.arange(1, a.ddim_steps + 1) * skip - 1  # 19, 39, ..., 999 as diffusers' DDIMSolver
    emb_cache: dict[str, torch.Tensor] = {}

    def embed(texts):
        new = [t for t in set(texts) if t not in emb_cache]
        if new:
            with torch.no_grad():
                emb_cache.update(zip(new, text_encoder(captioner.ids(new)).last_hidden_state))
        return torch.stack([emb_cache[t] for t in texts])

    def x0_of(eps, x, t):
        at = per_sample(alphas[t])
        return (x - (1 - at).sqrt() * eps) / at.sqrt()

    def save(tag: str) -> Path:
        for p, e in zip(params, ema):  # swap the EMA weights in, save, swap back
            tmp = p.detach().clone(); p.data.copy_(e); e.copy_(tmp)  # noqa: E702
        path = a.out / f"digits_lcm_lora{tag}.safetensors"
        tmp_path = path.with_suffix(".tmp")
        save_file(lora_state(wraps), str(tmp_path), metadata={"format": "pt", "sdrt": "digits LCM-LoRA", "rank": str(a.rank)})
        tmp_path.replace(path)
        unet.eval()
        digit, colour = evaluate(unet, text_encoder, captioner, vae, oracle, sched_config) if not a.smoke else (float("nan"),) * 2
        for p, e in zip(params, ema):
            tmp = p.detach().clone(); p.data.copy_(e); e.copy_(tmp)  # noqa: E702
        log(f"saved {path.name}: 4 LCM steps, guidance 1 -> oracle digit {digit:.0%} colour {colour:.0%}")
        return path

    cpu0, rng, avg = time.process_time(), np.random.default_rng(a.seed), None
    uncond = embed([""])
    for step in range(a.steps):
        progress = min(1.0, max(step / a.steps, (time.process_time() - cpu0) / (60 * a.cpu_minutes)))
        lr = a.lr * (step + 1) / a.warmup if step < a.warmup else a.lr * (0.05 + 0.475 * (1 + math.cos(math.pi * progress)))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.from_numpy(rng.integers(len(labels), size=a.batch))
        z0 = (lat_mean[idx] + lat_std[idx] * torch.randn_like(lat_mean[idx])) * scale
        cond = embed([data.caption(*labels[i], rng, p_drop=a.p_drop) for i in idx.tolist()])
        index = torch.randint(0, a.ddim_steps, (a.batch,))
        t_start = ddim_timesteps[index]
        t_end = (t_start - skip).clamp(min=0)
        noise = torch.randn_like(z0)
        x_t = noise_sched.add_noise(z0, noise, t_start)
        w = per_sample(a.w_min + (a.w_max - a.w_min) * torch.rand(a.batch))  # guidance = 1 + w
        with torch.no_grad():
            set_lora(wraps, False)  # the teacher: the base UNet, with CFG
            eps_u, eps_c = unet(torch.cat([x_t, x_t]), torch.cat([t_start, t_start]),
                                torch.cat([uncond.expand(a.batch, -1, -1), cond])).sample.chunk(2)
            set_lora(wraps, True)
            eps = eps_c + w * (eps_c - eps_u)
            x0 = x0_of(eps, x_t, t_start)
            a_end = per_sample(torch.where(t_end > 0, alphas[t_end], alphas[0]))
            x_end = a_end.sqrt() * x0 + (1 - a_end).sqrt() * eps  # one DDIM step of the guided teacher
            c_skip, c_out = boundary(t_end)
            target = per_sample(c_skip) * x_end + per_sample(c_out) * x0_of(unet(x_end, t_end, cond).sample, x_end, t_end)
        unet.train()
        c_skip, c_out = boundary(t_start)
        pred = per_sample(c_skip) * x_t + per_sample(c_out) * x0_of(unet(x_t, t_start, cond).sample, x_t, t_start)
        loss = (torch.sqrt((pred - target) ** 2 + a.huber_c**2) - a.huber_c).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        unet.eval()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - min(a.ema, (1 + step) / (10 + step)))
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        cpu = time.process_time() - cpu0
        last = step == a.steps - 1 or cpu > 60 * a.cpu_minutes
        if step % 25 == 0 or last:
            log(f"lcm step {step:5d} cpu {cpu:7.1f}s loss {loss.item():.5f} avg {avg:.5f} lr {lr:.2e}")
        if (step > 0 and step % a.ckpt_every == 0) or last:
            save(f"_step{step}")
        if last:
            log(f"stopped at step {step}: {cpu / 60:.1f} CPU-minutes of training")
            break
    return save("")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", type=Path, default=None, help="the teacher (a diffusers folder); default: the built-in model")
    p.add_argument("--out", type=Path, default=Path("build/digits/lcm"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="a few steps (CI)")
    p.add_argument("--images", type=int, default=8000)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--ema", type=float, default=0.99)
    p.add_argument("--w-min", type=float, default=2.5, help="teacher guidance scale - 1, drawn per sample in [w-min, w-max]")
    p.add_argument("--w-max", type=float, default=6.5)
    p.add_argument("--ddim-steps", type=int, default=50, help="the teacher's ODE solver grid (skip = 1000 / this)")
    p.add_argument("--huber-c", type=float, default=0.001)
    p.add_argument("--p-drop", type=float, default=0.05)
    p.add_argument("--cpu-minutes", type=float, default=28.0, help="cap on this process's CPU time for the training loop")
    p.add_argument("--ckpt-every", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    if a.init is None:
        from sdrt.builtin import builtin_model_dir

        a.init = builtin_model_dir()
    if a.smoke:
        a.images, a.steps, a.batch, a.ckpt_every, a.rank = 64, 3, 4, 2, 4
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    a.out.mkdir(parents=True, exist_ok=True)
    log = training_log(a.out / "lcm_log.txt")

    log(f"args {vars(a)}")
    t0, c0 = time.time(), time.process_time()
    path = distil(a, log)
    log(f"done: {path} in {(time.time() - t0) / 60:.1f} wall minutes, {(time.process_time() - c0) / 60:.1f} CPU-minutes")


if __name__ == "__main__":
    main()
