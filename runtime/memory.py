"""How much memory a request needs, and how much there is: refuse what cannot fit before anything is allocated.

A request's peak is the networks' weights as the runtime holds them, plus activations at that size and batch,
plus the host arrays (latents, pixels). Activations have two terms per network, read from the model's UNet and VAE
configs (an export keeps them in its manifest, extras["architecture"]; diffusers' defaults otherwise):
  - self-attention scores, quadratic in tokens: batch x heads x tokens^2 x 4 bytes, at the finest level with
    attention (UNet: levels whose down block is CrossAttn*, heads = attention_head_dim as diffusers reads it;
    VAE: one head in the mid block, at the latent resolution);
  - convolution activations, linear in pixels: batch x pixels x channels x 4 bytes at the finest level.
Each term is scaled by a factor measured on the runtime (below), so the estimate is an upper bound. ONNX Runtime
keeps each session's arena at its largest size, so its networks' activations add up; torch frees between
networks, so there the hungriest one counts. Weights as ONNX Runtime holds them are its optimised graphs (an
export's `.ort_cache`): Winograd exports keep their convolution weights in the Winograd domain (16/9 or 36/9 of
the 3x3 weights) in the blocked layout, which the export's own files understate (SDXL, Segmind Vega shape: UNet
2.84 -> 4.41 GB, VAE decoder 0.19 -> 0.98 GB).

Calibration: peak RSS (`resource.getrusage` of a fresh process) on a 2-core x86 CPU, onnxruntime 1.32, torch 2.13;
the factors below are round values a little above every measured point (table below). The check runs for CPU
backends; GPU memory is not estimated (a CUDA session's own out-of-memory error still applies there).
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from sdrt.errors import InputError

# Measured peak RSS -> this estimate (MB), 1-2 steps, guidance on:
#   SDXL, Segmind Vega shape (benchmarks/sdxl_random.py), `--winograd` export at opt 256, onnx, AMD EPYC,
#   2-4 images per process: 256px 9420 -> 9980 | 512px 12120 -> 12720
#   built-in digits, onnx:  64px 151 -> 219 | 256px 283 -> 325 | 384px 663 -> 750 | 512px 1533 -> 1882 |
#                           640px 3304 -> 4260 | batch 4: 128px 224 -> 270, 384px 2161 -> 2353
#   tests' tiny sd1, torch: 64px 498 -> 614 | 256px 529 -> 663 | 384px 601 -> 732 | 512px 647 -> 894
# ONNX Runtime materialises the attention scores (peak - base ~ 1.2-1.5x batch x heads x tokens^2 x 4 bytes);
# torch's CPU scaled_dot_product_attention does not (flash kernel: ~0.15x), but its libraries take ~500 MB.
RUNTIMES = {  # backend -> (base bytes of the process and its libraries, attention-score copies)
    "onnx": (200 << 20, 1.6),
    "torch": (600 << 20, 0.25),
}
CONV_COPIES = 12  # live activations at the finest level: the block's input, norm, conv outputs, skip connections
WINOGRAD_CONV_COPIES = 24  # the same with Winograd-domain tiles (2.25x an activation for F(4x4)): 17-19 measured
# Where no optimised graph is cached yet, a Winograd network's weights as ORT holds them, per byte of its files
# (measured on the Vega-shape SDXL export: UNet 1.55, VAE decoder 5.1, encoder 3.5; rounded up).
WINOGRAD_WEIGHT_GROWTH = {"unet": 1.6, "vae_decoder": 5.5, "vae_encoder": 4.0}
HOST_BYTES_PER_PIXEL = 64  # latents, decoded float image, uint8 pixels, PIL copies, per image pixel
FLOAT = 4


@dataclasses.dataclass(frozen=True)
class Architecture:
    """What the activation estimate needs from the UNet's and VAE's configs."""

    unet_channels: int  # block_out_channels[0]: channels at the latent resolution
    unet_attention: tuple[tuple[int, int], ...]  # (downsample factor from the latent size, heads) per attention level
    vae_channels: int  # block_out_channels[0]: channels at the image resolution (decoder's last level)
    vae_attention: bool  # self-attention in the VAE's mid block, at the latent resolution

    def to_dict(self) -> dict:
        return {"unet_channels": self.unet_channels, "unet_attention": [list(a) for a in self.unet_attention],
                "vae_channels": self.vae_channels, "vae_attention": self.vae_attention}

    @classmethod
    def from_dict(cls, data: dict) -> "Architecture":
        return cls(int(data["unet_channels"]), tuple(tuple(a) for a in data["unet_attention"]),
                   int(data["vae_channels"]), bool(data["vae_attention"]))


def architecture_from_configs(unet: dict, vae: dict) -> Architecture:
    """From diffusers configs; a missing key takes UNet2DConditionModel's / AutoencoderKL's own default."""
    channels = list(unet.get("block_out_channels", [320, 640, 1280, 1280]))
    blocks = list(unet.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))
    heads = unet.get("num_attention_heads") or unet.get("attention_head_dim", 8)  # diffusers' (legacy) reading
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(blocks)
    attention = [(2**k, int(heads[k])) for k, b in enumerate(blocks) if "CrossAttn" in b]
    attention.append((2 ** (len(blocks) - 1), int(heads[-1])))  # the mid block's attention
    return Architecture(int(channels[0]), tuple(attention), int(list(vae.get("block_out_channels", [64]))[0]),
                        bool(vae.get("mid_block_add_attention", True)))


def model_architecture(folder: Path, manifest) -> Architecture:
    """The manifest's record, else the folder's configs, else diffusers' defaults (an upper bound for SD 1.x/2.x)."""
    if manifest is not None and "architecture" in manifest.extras:
        return Architecture.from_dict(manifest.extras["architecture"])
    import json

    configs = []
    for name in ("unet", "vae"):
        try:
            configs.append(json.loads((Path(folder) / name / "config.json").read_text()))
        except (OSError, ValueError):
            configs.append({})
    return architecture_from_configs(*configs)


def weight_bytes(folder: Path, manifest) -> int:
    """Bytes of the networks' weights as the runtime holds them: per network, its files, or its optimised graphs in
    the export's `.ort_cache` where larger (a Winograd export's, estimated from its files until they exist)."""
    folder = Path(folder)
    if manifest is None:
        return sum(p.stat().st_size for p in folder.glob("*/*.safetensors"))
    weights = (".onnx", ".data", ".onnx_data", ".safetensors")
    by_network: dict[str, int] = {}
    for rel, info in manifest.files.items():
        if rel.endswith(weights):
            network = Path(rel).parts[0] if len(Path(rel).parts) > 1 else ""
            by_network[network] = by_network.get(network, 0) + info["size"]
    winograd = manifest.extras.get("winograd_convs", {})
    cache = folder / ".ort_cache"
    total = 0
    for network, size in by_network.items():
        cached = 0
        if network and cache.is_dir():  # the whole graph's cache, or its step split's two (whichever ran)
            whole, split = (sum(p.stat().st_size for g in globs for p in cache.glob(g) if p.is_file())
                            for globs in ([f"{network}-*"], [f"{network}.prepass-*", f"{network}.step-*"]))
            cached = max(whole, split)
        if not cached and winograd.get(network):
            cached = int(size * WINOGRAD_WEIGHT_GROWTH.get(network, 1.0))
        total += max(size, cached)
    return total


def winograd_export(manifest) -> bool:
    return manifest is not None and any(manifest.extras.get("winograd_convs", {}).values())


def estimate_bytes(facts, arch: Architecture, weights: int, batch: int, height: int, width: int,
                   guidance: bool, img2img: bool, backend: str = "onnx", winograd: bool = False) -> int:
    """Estimated peak bytes of one request: base + weights + host arrays + activations (ONNX Runtime: every
    network's, its arenas keep them; torch: the hungriest network's). winograd: the export has Winograd convs."""
    base, attention_copies = RUNTIMES.get(backend, RUNTIMES["onnx"])
    copies = WINOGRAD_CONV_COPIES if winograd else CONV_COPIES
    lh, lw = height // facts.vae_scale_factor, width // facts.vae_scale_factor
    tokens = lh * lw
    unet_batch = batch * (2 if guidance else 1)
    unet_attn = max((unet_batch * h * (tokens // (f * f)) ** 2 for f, h in arch.unet_attention), default=0)
    unet = attention_copies * FLOAT * unet_attn + copies * FLOAT * unet_batch * tokens * arch.unet_channels
    vae_attn = attention_copies * FLOAT * tokens**2 if arch.vae_attention else 0
    decoder = batch * vae_attn + copies * FLOAT * batch * height * width * arch.vae_channels
    encoder = vae_attn + copies * FLOAT * height * width * arch.vae_channels if img2img else 0  # batch 1
    host = HOST_BYTES_PER_PIXEL * batch * height * width
    activations = unet + decoder + encoder if backend == "onnx" else max(unet, decoder, encoder)
    return int(base + weights + host + activations)


def own_anonymous_bytes() -> int:
    """This process's anonymous resident memory (loaded weights, arenas): part of a request's need, and not counted
    in MemAvailable, unlike its file-backed pages (mapped weights), which the page cache lends back."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def available_bytes() -> int | None:
    """Memory this process may use in all: what it holds (anonymous) plus MemAvailable, capped by a cgroup limit;
    None where neither is known."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            pass
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            text = Path(limit).read_text().strip()
            if text != "max" and int(text) < 1 << 60:
                found.append(int(text) - int(Path(usage).read_text()))
                break
        except (OSError, ValueError):
            continue
    return min(found) + own_anonymous_bytes() if found else None


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_memory(value) -> int | None | bool:
    """max_memory as given: None (what is available), False or 0 (no check), bytes, or '8G' / '512MiB' / '1.5GB'."""
    if value is None or value is False:
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return int(value) if value else False
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", value.lower())
        if m:
            return int(float(m.group(1)) * _UNITS[m.group(2)]) or False
    raise InputError(f"max_memory {value!r} is not a size; pass bytes, a size such as '8G' or '512M', or 0 for no check")


def _mb(n: int) -> str:
    for unit, shift in (("PB", 50), ("TB", 40), ("GB", 30)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.3g} {unit}" if n < 1 << 60 else f"{n / (1 << 50):.1e} PB"
    return f"{n / (1 << 20):.0f} MB"


def check_request(facts, manifest, folder, batch: int, height: int, width: int, guidance: bool, img2img: bool,
                  max_memory=None, backend: str = "onnx") -> int:
    """Refuse a request whose estimate exceeds the budget, naming the largest size (same aspect) that fits.
    Returns the estimate in bytes."""
    budget = parse_memory(max_memory)
    arch, weights, winograd = model_architecture(folder, manifest), weight_bytes(folder, manifest), winograd_export(manifest)
    need = estimate_bytes(facts, arch, weights, batch, height, width, guidance, img2img, backend, winograd)
    if budget is False:
        return need
    source = "set by max_memory"
    if budget is None:
        budget, source = available_bytes(), "available"
        if budget is None:
            return need  # nothing to compare with on this system
    if need <= budget:
        return need
    step, longer = facts.size_step, max(height, width)
    fits = None
    for side in range(longer // step * step, 0, -step):
        h = max(step, height * side // longer // step * step)
        w = max(step, width * side // longer // step * step)
        if estimate_bytes(facts, arch, weights, batch, h, w, guidance, img2img, backend, winograd) <= budget:
            fits = f"at most {w}x{h} fits" + (f" at {batch} images" if batch > 1 else "")
            break
    if fits is None:
        fits = "not even the smallest size fits" + ("; make fewer images per call" if batch > 1 else "")
    raise InputError(
        f"{width}x{height}" + (f" x {batch} images" if batch > 1 else "") + f" needs about {_mb(need)} of memory, "
        f"{_mb(budget)} is {source}: {fits} (override with --max-memory SIZE / --no-memory-check, or max_memory=)"
    )


DECODE_BYTES_PER_PIXEL = 32  # a decoded init image: RGBA/RGB copies, the float32 array, the resized copy


def image_pixel_limit(max_memory=None) -> int | None:
    """The most pixels an init image may decode to within the budget (None: no budget; PIL's own limit holds)."""
    budget = parse_memory(max_memory)
    if budget is False:
        return None
    if budget is None:
        budget = available_bytes()
    return None if budget is None else budget // DECODE_BYTES_PER_PIXEL
