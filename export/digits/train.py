"""Train the built-in digits model: VAE, text encoder (contrastive + caption labels), UNet, then the VAE
decoder again, then a short UNet fine-tune for negative prompts; saves a diffusers-format StableDiffusionPipeline.

    python -m sdrt.export.digits.train --phase all --seed 0 --out build/digits/model   # ~75 min on 2 idle CPU cores
    python -m sdrt.export.digits.train --smoke --out build/digits/smoke                # a few steps of every phase
    git archive b667f4b runtime/models/digits | tar -x -C build/base    # the shipped model before the last phase
    python -m sdrt.export.digits.train --phase negative --init build/base/runtime/models/digits --out build/digits/neg
        # the last phase alone (4 min): what made the shipped UNet from the one shipped before it

Phases: vae (reconstruction + KL, colour weighted from the first step, 32x32 crops for the first 75%),
text (CLIP-style contrastive loss against a small image encoder, plus heads reading the named digit/colour/
background off the pooled state), unet (epsilon prediction on VAE latents x scaling_factor, Min-SNR-5 weighted,
12% of captions dropped to ""), decoder (decoder-only fine-tune with the encoder frozen, so the UNet's latents stay valid),
negative (issue #14: 400 UNet steps on captions where 20% are a colour alone, naming the image's colour 75% of the
time and another colour otherwise: `data.negative_caption`; without it a lone colour word as the negative prompt
destroyed the digit).
Each phase has a step count and a time cap (--minutes); the learning-rate schedule ends at whichever runs
out first, so a busy machine gets a finished schedule rather than a cut one. Each phase saves the whole
pipeline to --out (a later phase loads the earlier ones from there); the UNet phase also saves EMA
checkpoints every --ckpt-every steps, so a run that is cut still leaves a usable model.
"""

from __future__ import annotations

from sdrt.model.weights import prefix_text_encoder_keys

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sdrt.export.clip_vocab import write_clip_tokenizer
from sdrt.export.digits import data
from sdrt.export.tiny import SD15_SCHEDULER

TEXT_HIDDEN = 32


def build_models():
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 32, 64, 64),
                        layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=64)
    with torch.no_grad():  # start the posterior narrow (std ~0.05): unit-variance noise hid the latents from the decoder
        vae.quant_conv.bias[4:] -= 6.0
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=TEXT_HIDDEN, intermediate_size=4 * TEXT_HIDDEN, num_hidden_layers=3,
        num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN, attention_head_dim=8, norm_num_groups=8)
    return vae, text_encoder, unet


def save_pipeline(out: Path, vae, text_encoder, tokenizer, unet) -> None:
    # DDIM with SD 1.5's noise schedule: PNDM's 4-step linear multistep (SD 1.5's default) is unstable on this
    # small model at high guidance (measured at 7.5, 20 steps: PNDM digit 56% / colour 28%, DDIM 100% / 96%).
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler.from_config(SD15_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    prefix_text_encoder_keys(out)  # loadable by transformers 4.x too


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


class Timer:
    """A phase's clock and its time cap: progress is the larger of steps done and time used."""

    def __init__(self, minutes: float, steps: int):
        self.t0, self.limit, self.steps = time.time(), minutes * 60, steps

    def over(self) -> bool:
        return time.time() - self.t0 > self.limit

    def progress(self, step: int) -> float:
        return min(1.0, max(step / self.steps, (time.time() - self.t0) / self.limit))

    def lr(self, step: int, base: float, warmup: int) -> float:
        """Linear warm-up, then a cosine to 5% that ends when the steps or the time cap run out."""
        if step < warmup:
            return base * (step + 1) / warmup
        return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * self.progress(step))))

    def __str__(self) -> str:
        return f"{time.time() - self.t0:7.1f}s"


# ---------------------------------------------------------------------------------------------------- VAE
def reconstruction_terms(rec, x):
    """MSE, L1, pooled-colour MSE (4x4 means) and chroma MSE (each pixel minus its grey level) of a reconstruction:
    the VAE phase and the decoder phase weight the same terms differently."""
    mse = F.mse_loss(rec, x)
    l1 = F.l1_loss(rec, x)
    colour = F.mse_loss(F.avg_pool2d(rec, 4), F.avg_pool2d(x, 4))
    chroma = F.mse_loss(rec - rec.mean(1, keepdim=True), x - x.mean(1, keepdim=True))
    return mse, l1, colour, chroma


def train_vae(vae, images, steps, batch, minutes, rng, log):
    """Reconstruction + KL, with colour weighted from the first step (pooled colour and chroma terms)."""
    opt = torch.optim.AdamW(vae.parameters(), lr=3e-3, weight_decay=0.0, foreach=True)
    timer = Timer(minutes, steps)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = timer.lr(step, 3e-3, warmup=30)
        x = to_tensor(images[rng.integers(len(images), size=batch)])
        if timer.progress(step) < 0.75:  # the VAE is convolutional: 32x32 crops cost a quarter
            i, j = rng.integers(0, 33, size=2)
            x = x[:, :, i:i + 32, j:j + 32]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        mse, l1, colour, chroma = reconstruction_terms(rec, x)
        kl = post.kl().mean() / post.mean[0].numel()
        loss = mse + l1 + colour + 2 * chroma + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"vae  step {step:5d} {timer} loss {loss.item():.4f} mse {mse.item():.4f} colour {colour.item():.4f} "
                f"chroma {chroma.item():.4f} kl {kl.item():.2f}")
        if timer.over():
            log(f"vae  stopped by the time cap at step {step}")
            break
    return vae


def train_decoder(vae, images, steps, batch, minutes, rng, log):
    """Fine-tune the decoder alone, colour weighted up, on the frozen encoder's latents: the UNet's latent
    space stays as it was trained, and decoded colours get better (a short VAE phase had washed them out)."""
    for m in (vae.encoder, vae.quant_conv):
        m.requires_grad_(False)
    params = [*vae.post_quant_conv.parameters(), *vae.decoder.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, foreach=True)
    timer = Timer(minutes, steps)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = timer.lr(step, 1e-3, warmup=20)
        x = to_tensor(images[rng.integers(len(images), size=batch)])
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample()
        rec = vae.decode(z).sample
        mse, l1, colour, chroma = reconstruction_terms(rec, x)
        loss = mse + l1 + 4 * colour + 8 * chroma
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            log(f"dec  step {step:5d} {timer} loss {loss.item():.4f} mse {mse.item():.4f} colour {colour.item():.4f} "
                f"chroma {chroma.item():.4f}")
        if timer.over():
            log(f"dec  stopped by the time cap at step {step}")
            break
    vae.requires_grad_(True)
    return vae


@torch.no_grad()
def encode_dataset(vae, images, batch=256):
    means, stds = [], []
    for i in range(0, len(images), batch):
        d = vae.encode(to_tensor(images[i:i + batch])).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


# ---------------------------------------------------------------------------------------------- text encoder
class ImageEncoder(torch.nn.Module):
    """A small CNN that meets the text encoder in one embedding space (CLIP-style); thrown away after training."""

    def __init__(self, dim: int):
        super().__init__()
        c = [3, 32, 64, 64, 128]
        layers = []
        for a, b in zip(c, c[1:]):
            layers += [torch.nn.Conv2d(a, b, 3, stride=2, padding=1), torch.nn.GroupNorm(8, b), torch.nn.SiLU()]
        self.net = torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(128, dim))

    def forward(self, x):
        return self.net(x)


class Captioner:
    """Captions -> token ids exactly as the runtime feeds them (77 tokens, padded with <|endoftext|>), cached."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def ids(self, texts: list[str]) -> torch.Tensor:
        new = [t for t in set(texts) if t not in self.cache]
        if new:
            enc = self.tokenizer(new, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            self.cache.update(zip(new, enc))
        return torch.stack([self.cache[t] for t in texts])


def soft_ce(logits, match):
    target = match / match.sum(1, keepdim=True)
    return -(target * logits.log_softmax(1)).sum(1).mean()


def train_text(text_encoder, captioner, images, labels, steps, batch, minutes, rng, log):
    """CLIP-style contrastive loss against a small image encoder, plus heads that read the named digit, colour
    and background off the pooled text state (a contrastive loss alone had not separated digits after 214
    steps on a busy CPU: the image encoder must first learn shapes; the heads make the text side learn at once)."""
    image_encoder = ImageEncoder(TEXT_HIDDEN)
    proj = torch.nn.Linear(TEXT_HIDDEN, TEXT_HIDDEN)
    heads = torch.nn.ModuleList([torch.nn.Linear(TEXT_HIDDEN, n + 1) for n in (10, len(data.COLOURS), len(data.BACKGROUNDS))])
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
    params = [*text_encoder.parameters(), *image_encoder.parameters(), *proj.parameters(), *heads.parameters(), logit_scale]
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0, foreach=True)
    timer = Timer(minutes, steps)
    text_encoder.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = timer.lr(step, 2e-3, warmup=50)
        idx = rng.integers(len(images), size=batch)
        caps = [data.caption_with_labels(*labels[i], rng) for i in idx]
        named = np.array([c[1] for c in caps])
        match = torch.from_numpy(data.caption_matches(named, labels[idx])).float()
        pooled = text_encoder(captioner.ids([c[0] for c in caps])).pooler_output
        t = F.normalize(proj(pooled), dim=-1)
        v = F.normalize(image_encoder(F.avg_pool2d(to_tensor(images[idx]), 2)), dim=-1)
        logits = logit_scale.clamp(max=math.log(100)).exp() * t @ v.T
        contrastive = 0.5 * (soft_ce(logits, match) + soft_ce(logits.T, match.T))
        target = torch.from_numpy(np.where(named < 0, np.array([10, len(data.COLOURS), len(data.BACKGROUNDS)]), named))
        label_loss = sum(F.cross_entropy(h(pooled), target[:, k]) for k, h in enumerate(heads))
        loss = contrastive + label_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"text step {step:5d} {timer} contrastive {contrastive.item():.4f} labels {label_loss.item():.4f} "
                f"scale {logit_scale.exp().item():.1f}")
        if timer.over():
            log(f"text stopped by the time cap at step {step}")
            break
    text_encoder.eval()
    return text_encoder, image_encoder, proj, heads


@torch.no_grad()
def retrieval_check(text_encoder, image_encoder, proj, heads, captioner, images, labels, log):
    """Each held-out image picks the best of the 80 captions 'a {colour} {digit}': digit and colour accuracy."""
    pairs = [(d, c) for d in range(10) for c in range(len(data.COLOUR_NAMES))]
    t = F.normalize(proj(text_encoder(captioner.ids([f"a {data.COLOUR_NAMES[c]} {d}" for d, c in pairs])).pooler_output), dim=-1)
    v = F.normalize(image_encoder(F.avg_pool2d(to_tensor(images), 2)), dim=-1)
    best = np.array(pairs)[(v @ t.T).argmax(1).numpy()]
    digit_acc, colour_acc = (best[:, 0] == labels[:, 0]).mean(), (best[:, 1] == labels[:, 1]).mean()
    # and with digit-only captions "the number {word}"
    td = F.normalize(proj(text_encoder(captioner.ids([f"the number {w}" for w in data.WORDS])).pooler_output), dim=-1)
    word_acc = ((v @ td.T).argmax(1).numpy() == labels[:, 0]).mean()
    log(f"text retrieval on held-out images: digit {digit_acc:.3f} colour {colour_acc:.3f} (digit by word {word_acc:.3f})")
    # the text side alone: does the pooled state of each caption name its digit and colour?
    pooled = text_encoder(captioner.ids([f"a {data.COLOUR_NAMES[c]} {d}" for d, c in pairs] + [f"the number {w}" for w in data.WORDS])).pooler_output
    d_ok = (heads[0](pooled).argmax(1).numpy() == np.array([d for d, _ in pairs] + list(range(10)))).mean()
    c_ok = (heads[1](pooled[:len(pairs)]).argmax(1).numpy() == np.array([c for _, c in pairs])).mean()
    log(f"text heads on 90 captions: digit {d_ok:.3f} colour {c_ok:.3f}")


# ---------------------------------------------------------------------------------------------------- UNet
def train_unet(unet, text_encoder, captioner, vae, lat_mean, lat_std, labels, steps, batch, minutes, rng, log,
               save, ckpt_every, lr=1.5e-3, p_drop=0.12, snr_gamma=5.0, caption=None, warmup=200, ema_decay=0.999,
               tag="unet"):
    noise_sched = DDPMScheduler.from_config({k: v for k, v in SD15_SCHEDULER.items() if k != "_class_name"})
    scale = vae.config.scaling_factor
    # Min-SNR-5 weighting (Hang et al. 2023, diffusers' --snr_gamma): for epsilon prediction the weight is
    # min(SNR, 5) / SNR, so the nearly-clean timesteps stop dominating and training converges several times faster.
    snr = noise_sched.alphas_cumprod / (1 - noise_sched.alphas_cumprod)
    min_snr_weight = torch.clamp(snr, max=snr_gamma) / snr
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2, foreach=True)
    ema = [p.detach().clone() for p in unet.parameters()]
    emb_cache: dict[str, torch.Tensor] = {}
    timer = Timer(minutes, steps)
    caption = caption or (lambda d, c, b, rng: data.caption(d, c, b, rng, p_drop=p_drop))

    def embed(texts):
        new = [t for t in set(texts) if t not in emb_cache]
        if new:
            with torch.no_grad():
                hs = text_encoder(captioner.ids(new)).last_hidden_state
            emb_cache.update(zip(new, hs))
        return torch.stack([emb_cache[t] for t in texts])

    def swap_ema():
        for p, e in zip(unet.parameters(), ema):
            tmp = p.detach().clone()
            p.data.copy_(e)
            e.copy_(tmp)

    unet.train()
    avg = None
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = timer.lr(step, lr, warmup=warmup)
        idx = torch.from_numpy(rng.integers(len(labels), size=batch))
        z0 = (lat_mean[idx] + lat_std[idx] * torch.randn_like(lat_mean[idx])) * scale
        noise = torch.randn_like(z0)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch,))
        zt = noise_sched.add_noise(z0, noise, t)
        cond = embed([caption(*labels[i], rng) for i in idx.tolist()])
        per_sample = F.mse_loss(unet(zt, t, cond).sample, noise, reduction="none").mean((1, 2, 3))
        loss = (per_sample * min_snr_weight[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in unet.parameters()], 1 - decay)
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        last = step == steps - 1 or timer.over()
        if step % 100 == 0 or last:
            log(f"{tag} step {step:5d} {timer} loss {loss.item():.4f} avg {avg:.4f} lr {opt.param_groups[0]['lr']:.2e}")
        if (step > 0 and step % ckpt_every == 0) or last:
            swap_ema()
            save(unet)
            swap_ema()
            log(f"{tag} checkpoint (EMA weights) saved at step {step}")
        if timer.over():
            log(f"{tag} stopped by the time cap at step {step}")
            break
    swap_ema()
    unet.eval()
    return unet


# ---------------------------------------------------------------------------------------------------- main
def training_log(path: Path):
    """A `log(msg)` that prints a timestamped line and appends it to `path` (kept for the model card)."""
    logfile = open(path, "a")

    def log(msg):
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        logfile.write(line + "\n")
        logfile.flush()

    return log


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", choices=["vae", "text", "unet", "decoder", "negative", "all"], default="all")
    p.add_argument("--init", type=Path, default=None,
                   help="--phase negative alone: fine-tune the model in this folder (a diffusers folder such as "
                        "runtime/models/digits) and save to --out; default: the model already in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("build/digits/model"))
    p.add_argument("--smoke", action="store_true", help="a few steps of every phase (CI)")
    p.add_argument("--images", type=int, default=12000)
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--text-steps", type=int, default=1000)
    p.add_argument("--text-batch", type=int, default=96)
    p.add_argument("--unet-steps", type=int, default=4000)
    p.add_argument("--unet-batch", type=int, default=128)
    p.add_argument("--decoder-steps", type=int, default=300)
    p.add_argument("--minutes", type=float, nargs=4, default=[12, 3.5, 48, 6], metavar=("VAE", "TEXT", "UNET", "DECODER"),
                   help="a time cap per phase; the learning-rate schedule ends at whichever of steps or time runs out")
    p.add_argument("--negative-steps", type=int, default=400)
    p.add_argument("--negative-batch", type=int, default=64)
    p.add_argument("--negative-minutes", type=float, default=12)
    p.add_argument("--negative-images", type=int, default=6000)
    p.add_argument("--negative-colour-only", type=float, default=0.2, help="negative phase: share of colour-only captions")
    p.add_argument("--negative-colour-true", type=float, default=0.75,
                   help="negative phase: how often a colour-only caption names the image's own colour")
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--resume", action="store_true", help="--phase unet: continue from the UNet saved in --out")
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads (an idle 2-core machine: 2; on a busy one, 1 ran 2-4x faster)")
    a = p.parse_args(argv)
    if a.smoke:
        a.images, a.vae_steps, a.text_steps, a.unet_steps, a.unet_batch, a.ckpt_every = 256, 4, 3, 3, 8, 2
        a.decoder_steps, a.negative_steps, a.negative_batch, a.negative_images = 3, 3, 8, 256
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    a.out.mkdir(parents=True, exist_ok=True)
    log = training_log(a.out / "train_log.txt")
    t_start = time.time()

    log(f"args {vars(a)}")
    images, labels = data.make_dataset(a.images, seed=a.seed, split="train")
    test_images, test_labels = data.make_dataset(1000 if not a.smoke else 64, seed=a.seed + 1, split="test")
    log(f"data: {len(images)} training images ({time.time() - t_start:.0f}s)")
    tokenizer_dir = write_clip_tokenizer(a.out / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    captioner = Captioner(tokenizer)
    vae, text_encoder, unet = build_models()
    src = a.init if (a.init is not None and a.phase == "negative") else a.out
    if a.phase != "vae" and a.phase != "all":
        vae = AutoencoderKL.from_pretrained(src / "vae")
        text_encoder = CLIPTextModel.from_pretrained(src / "text_encoder")
    if a.phase in ("decoder", "negative") or (a.phase == "unet" and a.resume):
        unet = UNet2DConditionModel.from_pretrained(src / "unet")
    for name, m in (("vae", vae), ("text_encoder", text_encoder), ("unet", unet)):
        log(f"{name}: {sum(q.numel() for q in m.parameters()) / 1e6:.3f} M parameters")

    def save(u=unet):
        save_pipeline(a.out, vae, text_encoder, tokenizer, u)

    if a.phase in ("vae", "all"):
        vae.train()
        train_vae(vae, images, a.vae_steps, 32, a.minutes[0], rng, log)
        vae.eval()
        with torch.no_grad():
            x = to_tensor(test_images[:256 if not a.smoke else 16])
            rec = vae.decode(vae.encode(x).latent_dist.mean).sample
            log(f"vae held-out mse {F.mse_loss(rec, x).item():.4f}")
        mean, std = encode_dataset(vae, images[:4096])
        sf = 1.0 / (mean + std * torch.randn_like(std)).std().item()
        vae.register_to_config(scaling_factor=sf)
        log(f"vae scaling_factor {sf:.4f}")
        save()
    if a.phase in ("text", "all"):
        text_encoder, image_encoder, proj, heads = train_text(text_encoder, captioner, images, labels, a.text_steps, a.text_batch,
                                                      a.minutes[1], rng, log)
        retrieval_check(text_encoder, image_encoder, proj, heads, captioner, test_images, test_labels, log)
        save()
    if a.phase in ("unet", "all"):
        t0 = time.time()
        lat_mean, lat_std = encode_dataset(vae, images)
        log(f"encoded {len(images)} images in {time.time() - t0:.0f}s; latent std x scale "
            f"{(lat_mean.std() * vae.config.scaling_factor).item():.3f}")
        train_unet(unet, text_encoder, captioner, vae, lat_mean, lat_std, labels, a.unet_steps, a.unet_batch,
                   a.minutes[2], rng, log, save, a.ckpt_every)
        save()
    if a.phase in ("decoder", "all"):
        vae.train()
        train_decoder(vae, images, a.decoder_steps, 32, a.minutes[3], rng, log)
        vae.eval()
        with torch.no_grad():
            x = to_tensor(test_images[:256 if not a.smoke else 16])
            rec = vae.decode(vae.encode(x).latent_dist.mean).sample
            log(f"vae held-out mse after the decoder phase {F.mse_loss(rec, x).item():.4f}")
        save()
    if a.phase in ("negative", "all"):
        # Issue #14: fine-tune the UNet (text encoder and VAE frozen; the decoder phase left the encoder, so the
        # latents, as they were) on captions where a lone colour word is not a certainty (data.negative_caption).
        nrng = np.random.default_rng(a.seed + 14)  # its own stream: the phase alone reproduces the one in --phase all
        torch.manual_seed(a.seed + 14)
        n_images, n_labels = data.make_dataset(a.negative_images, seed=a.seed + 14, split="train")
        lat_mean, lat_std = encode_dataset(vae, n_images)
        log(f"negative: encoded {len(n_images)} images; colour-only captions {a.negative_colour_only:.0%}, naming the "
            f"image's colour {a.negative_colour_true:.0%} of the time")
        train_unet(unet, text_encoder, captioner, vae, lat_mean, lat_std, n_labels, a.negative_steps, a.negative_batch,
                   a.negative_minutes, nrng, log, save, a.ckpt_every, lr=3e-4, warmup=20, ema_decay=0.99,
                   caption=lambda d, c, b, r: data.negative_caption(d, c, b, r, p_colour=a.negative_colour_only,
                                                                    colour_true=a.negative_colour_true), tag="neg ")
        save()
    log(f"done in {(time.time() - t_start) / 60:.1f} min; saved to {a.out}")


if __name__ == "__main__":
    main()
