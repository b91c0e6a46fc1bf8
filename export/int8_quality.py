"""Calibration data and the quality report for int8 exports (`sdrt export --int8`).

Calibration: the UNet's real inputs, recorded while the fp32 export samples the given prompts (latents at every
timestep of the schedule, with the prompts' text states), so activation ranges are those the model meets in use.
Quality: the int8 export against the fp32 export on the same prompts and seeds (PSNR of the final images), and, on
the built-in digits model, the oracle's digit and colour accuracy for both (the 50 prompts of tests/test_digits.py,
guidance 7.5, 20 steps).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from sdrt.contracts import UNET, VAE_DECODER, VAE_ENCODER

# A spread of everyday prompts for models other than the built-in one (no file given).
DEFAULT_PROMPTS = (
    "a photo of a cat sitting on a windowsill",
    "a watercolor landscape with mountains and a lake",
    "a portrait of an old man, studio lighting",
    "a red sports car on a city street at night",
    "a bowl of fruit on a wooden table",
    "an astronaut riding a horse, digital art",
    "a cozy living room with a fireplace",
    "a lighthouse on a cliff during a storm",
)
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
ORACLE_PAIRS = [(d, COLOURS[(d * 3 + k) % 8]) for k in range(5) for d in range(10)]  # as tests/test_digits.py
ORACLE_STEPS, ORACLE_GUIDANCE = 20, 7.5


def read_prompts(path) -> list[str]:
    """One prompt per non-empty line of `path` (UTF-8)."""
    from sdrt.errors import InputError

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"calibration prompts file {path} cannot be read ({err}); give a UTF-8 text file, one prompt a line") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InputError(f"calibration prompts file {path} has no prompts; write one prompt a line")
    return prompts


def default_prompts(is_digits: bool) -> list[str]:
    if is_digits:
        return [f"a {c} {d}" for d, c in ORACLE_PAIRS[::5]]  # 10 prompts, every digit, several colours
    return list(DEFAULT_PROMPTS)


def record_unet_feeds(export_dir: Path, prompts, size: int, steps: int, guidance: float, seed: int = 0,
                      limit: int = 64, threads: int | None = None) -> list[dict]:
    """Sample `prompts` with the fp32 export at `export_dir` and return up to `limit` UNet feed dicts, spread evenly
    over the recorded calls (so early, middle and late timesteps are all there)."""
    return record_feeds(export_dir, prompts, size, steps, guidance, (UNET,), {UNET: limit}, seed, threads)[UNET]


class NetworkRecorder:
    """Wraps a backend's run: keeps the feeds (copies) of each network in `networks`, and the decoder's output images
    as feeds for the VAE encoder (its input contract: images in [-1, 1]) when that is asked for."""

    def __init__(self, backend, networks):
        self.networks, self.feeds = tuple(networks), {n: [] for n in networks}
        self._run = backend.run

    def __call__(self, network, feeds):
        if network in self.feeds:
            self.feeds[network].append({k: np.array(v) for k, v in feeds.items()})
        out = self._run(network, feeds)
        if network == VAE_DECODER and VAE_ENCODER in self.feeds:
            self.feeds[VAE_ENCODER].append({"image": np.clip(np.array(out["image"]), -1, 1)})
        return out


def record_feeds(export_dir: Path, prompts, size: int, steps: int, guidance: float, networks, limits: dict,
                 seed: int = 0, threads: int | None = None) -> dict:
    """Sample `prompts` (one call each) with the fp32 export at `export_dir` and return {network: feed dicts} for
    each of `networks` (the UNet, the text encoder, the VAE decoder; the VAE encoder's feeds are the decoded images),
    at most limits[network] each (default 64), spread evenly over the recorded calls."""
    import sdrt

    pipe = sdrt.Pipeline.from_pretrained(export_dir, backend="onnx", threads=threads)
    recorder = NetworkRecorder(pipe.backend, networks)
    pipe.backend.run = recorder
    for i, prompt in enumerate(prompts):  # one prompt per call: batch-1 feeds, as calibration tools expect
        pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size, seed=seed + i,
             output_type="np", progress=False)
    out = {}
    for name, feeds in recorder.feeds.items():
        limit = limits.get(name, 64)
        out[name] = [feeds[int(j)] for j in np.linspace(0, len(feeds) - 1, limit).round()] if len(feeds) > limit else feeds
    return out


def decode_psnr(fp32_dir: Path, int8_dir: Path, latents, threads=None) -> float:
    """PSNR of the int8 export's VAE decoder against the fp32 one's on the same `latents` (feed dicts recorded from
    sampling): the decoder's own share of the error, apart from the UNet's."""
    from sdrt.export.int8 import psnr
    from sdrt.images import decoded_to_uint8
    from sdrt.model.manifest import read_manifest

    images = []
    for folder in (fp32_dir, int8_dir):
        session = _session(Path(folder) / read_manifest(folder).networks[VAE_DECODER]["file"], threads)
        images.append(np.concatenate([decoded_to_uint8(session.run(None, f)[0]) for f in latents]))
    return psnr(images[1], images[0])


def encode_psnr(fp32_dir: Path, int8_dir: Path, images, threads=None) -> float:
    """PSNR of images encoded by the int8 export's VAE encoder (posterior mean) and decoded by the fp32 decoder,
    against the same round trip through the fp32 encoder: the encoder's own share of an img2img error."""
    from sdrt.export.int8 import psnr
    from sdrt.images import decoded_to_uint8
    from sdrt.model.manifest import read_manifest

    manifest = read_manifest(fp32_dir)
    decoder = _session(Path(fp32_dir) / manifest.networks[VAE_DECODER]["file"], threads)
    scale = manifest.facts.scaling_factor  # the plain factor (no latents_mean/std): a metric, the same both sides
    out = []
    for folder in (fp32_dir, int8_dir):
        encoder = _session(Path(folder) / read_manifest(folder).networks[VAE_ENCODER]["file"], threads)
        latents = [encoder.run(["mean"], f)[0] * scale for f in images]
        out.append(np.concatenate([decoded_to_uint8(decoder.run(None, {"latent": z})[0]) for z in latents]))
    return psnr(out[1], out[0])


def _session(path: Path, threads=None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def generate(export_dir: Path, prompts, size: int, steps: int, guidance: float, seed: int, threads=None):
    import sdrt

    pipe = sdrt.Pipeline.from_pretrained(export_dir, backend="onnx", threads=threads)
    t0 = time.perf_counter()
    images = pipe(list(prompts), num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                  seed=seed, output_type="np", progress=False).images
    return images, time.perf_counter() - t0


def to_uint8(images) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8:
        images = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    return images


def quality_report(fp32_dir: Path, int8_dir: Path, prompts, size: int, steps: int, guidance: float,
                   is_digits: bool, threads=None) -> dict:
    """PSNR of the int8 export's images against the fp32 export's (same prompts, seeds), and for the built-in
    model the oracle's digit/colour accuracy for both."""
    from sdrt.export.int8 import psnr

    report: dict = {"prompts": len(prompts), "size": size, "steps": steps, "guidance": guidance, "seed": 0}
    ref, t_ref = generate(fp32_dir, prompts, size, steps, guidance, 0, threads)
    got, t_got = generate(int8_dir, prompts, size, steps, guidance, 0, threads)
    ref, got = to_uint8(ref), to_uint8(got)
    per_image = [psnr(a, b) for a, b in zip(got, ref)]
    report.update(psnr_db=psnr(got, ref), psnr_min_db=min(per_image), seconds_fp32=t_ref, seconds_int8=t_got)
    if is_digits:
        report["oracle"] = oracle_accuracy(fp32_dir, int8_dir, threads)
    return report


def oracle_accuracy(fp32_dir: Path, int8_dir: Path, threads=None) -> dict:
    """Digit and colour accuracy read by the oracle (50 prompts, guidance 7.5, 20 steps, seed 0), fp32 and int8,
    and the PSNR between the two sets."""
    from sdrt.export.int8 import psnr
    from sdrt.oracle import DigitOracle

    oracle = DigitOracle.load()
    texts = [f"a {c} {d}" for d, c in ORACLE_PAIRS]
    out = {}
    images = {}
    for name, folder in (("fp32", fp32_dir), ("int8", int8_dir)):
        images[name] = to_uint8(generate(folder, texts, 64, ORACLE_STEPS, ORACLE_GUIDANCE, 0, threads)[0])
        read = oracle.classify(images[name])
        out[name] = {
            "digit": float(np.mean([r[0] == d for r, (d, _) in zip(read, ORACLE_PAIRS)])),
            "colour": float(np.mean([r[1] == c for r, (_, c) in zip(read, ORACLE_PAIRS)])),
        }
    out["psnr_db"] = psnr(images["int8"], images["fp32"])
    out.update(prompts=len(texts), steps=ORACLE_STEPS, guidance=ORACLE_GUIDANCE, size=64, seed=0)
    return out
