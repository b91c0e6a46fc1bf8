"""The built-in digits model, judged by what its images show (the oracle), through the light ONNX Runtime path.

Each figure is measured batched (all 50 prompts or 100 seeds in one pipeline call) and compared with the
issue's bars; runtime/models/digits/README.md gives what the shipped model measured.
"""

import numpy as np
import pytest

import sdrt
from sdrt.oracle import DigitOracle

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
PROMPTS = [(d, COLOURS[(d * 3 + k) % 8]) for k in range(5) for d in range(10)]  # 50 prompts over digits and colours
STEPS = 20

# The bars. Measured (ONNX fp32, seed 0): digit 100% / colour 90%, img2img 100% / 87.5%, fp16 55 dB.
DIGIT_AT_7_5, COLOUR_AT_7_5 = 0.80, 0.85
IMG2IMG_DIGIT_KEPT_AT_0_3, IMG2IMG_COLOUR_CHANGED_AT_0_8 = 0.90, 0.80
BACKEND_AGREEMENT = 0.05  # accuracies within 5 points across backends and precisions
FP16_MIN_PSNR_DB = 35.0


def generate(pipe, prompts, guidance, seed, **kwargs):
    return pipe(prompts, num_inference_steps=STEPS, guidance_scale=guidance, seed=seed, output_type="np",
                progress=False, **kwargs).images


def accuracy(oracle, images, pairs=PROMPTS):
    read = oracle.classify(images)
    digit = float(np.mean([r[0] == d for r, (d, _) in zip(read, pairs)]))
    colour = float(np.mean([r[1] == c for r, (_, c) in zip(read, pairs)]))
    return digit, colour


PROMPT_TEXTS = [f"a {c} {d}" for d, c in PROMPTS]


@pytest.fixture(scope="module")
def pipe():
    return sdrt.Pipeline.from_pretrained(None, threads=1)


@pytest.fixture(scope="module")
def oracle():
    return DigitOracle.load()


@pytest.fixture(scope="module")
def fp32_images(pipe):
    return generate(pipe, PROMPT_TEXTS, 7.5, seed=0)


def test_builtin_model_runs_on_onnx_runtime(pipe):
    assert pipe.backend.name == "onnx" and pipe.source.manifest.extras.get("shared_weights")


def test_prompts_steer_digit_and_colour(fp32_images, oracle):
    digit, colour = accuracy(oracle, fp32_images)
    assert digit >= DIGIT_AT_7_5 and colour >= COLOUR_AT_7_5, (digit, colour)


def test_guidance_helps(pipe, oracle, fp32_images):
    digit, _ = accuracy(oracle, fp32_images)
    digit_unguided, _ = accuracy(oracle, generate(pipe, PROMPT_TEXTS, 1.0, seed=0))
    assert digit > digit_unguided, (digit, digit_unguided)


DIGIT_PROMPTS = [f"a {d}" for d in range(10)] * 10  # 100 seeds (100..199), digits only: the model picks the colour
NEGATIVE_DIGIT_DROP = 0.10  # issue #14: a negative colour keeps digit accuracy within 10 points of none


@pytest.fixture(scope="module")
def unprompted(pipe, oracle):
    """The oracle's reading of "a {digit}" x 10 seeds each (100 images), no negative prompt."""
    return oracle.classify(generate(pipe, DIGIT_PROMPTS, 7.5, seed=100))


@pytest.fixture(scope="module")
def negative_colour(pipe, oracle):
    """The oracle's reading of the same 100 images with each colour as the negative prompt (800 images)."""
    return {colour: oracle.classify(generate(pipe, DIGIT_PROMPTS, 7.5, seed=100, negative_prompt=colour))
            for colour in COLOURS}


def test_negative_prompt_halves_a_colours_share(unprompted, negative_colour):
    base = [c for _, c in unprompted]
    colour = max(COLOURS, key=base.count)
    share = base.count(colour) / len(base)
    assert share >= 0.15, f"no colour reaches 15% unprompted (most common: {colour} {share:.0%})"
    steered = [c for _, c in negative_colour[colour]]
    assert steered.count(colour) / len(steered) <= share / 2, (colour, share, steered.count(colour) / len(steered))


def test_negative_colour_keeps_the_digit(unprompted, negative_colour):
    """Issue #14's bar, in full: for every colour as the negative prompt of "a {digit}" (the same 100 seeds),
    digit accuracy within 10 points of no negative, and that colour's share at least halved (README: "Figures";
    before the `negative` training phase: digit 100% -> 83-98%, and white blobs)."""
    digits = [int(p[-1]) for p in DIGIT_PROMPTS]
    base_digit = np.mean([d == want for (d, _), want in zip(unprompted, digits)])
    failures = []
    for colour, read in negative_colour.items():
        digit = np.mean([d == want for (d, _), want in zip(read, digits)])
        share_without = sum(c == colour for _, c in unprompted) / len(unprompted)
        share_with = sum(c == colour for _, c in read) / len(read)
        if digit < base_digit - NEGATIVE_DIGIT_DROP or share_with > share_without / 2:
            failures.append(f"{colour}: digit {base_digit:.0%} -> {digit:.0%}, share {share_without:.0%} -> {share_with:.0%}")
    assert not failures, failures


@pytest.fixture(scope="module")
def sources():
    """Four held-out real handwritten digits (never trained on), one colour each, that the oracle reads right."""
    pytest.importorskip("sklearn")
    from sdrt.export.digits import data

    images, labels = data.make_dataset(12, seed=7, split="test", font_fraction=0.0)
    oracle = DigitOracle.load()
    good = [(img, int(d), data.COLOUR_NAMES[c]) for img, (d, c, _), (rd, rc) in zip(images, labels, oracle.classify(images))
            if rd == d and rc == data.COLOUR_NAMES[c]]
    assert len(good) >= 4
    return good[:4]


def test_img2img_low_strength_keeps_the_digit(pipe, oracle, sources):
    kept = []
    for k, (image, digit, colour) in enumerate(sources):  # 4 images x 10 seeds
        out = generate(pipe, [f"a {colour} {digit}"] * 10, 7.5, seed=200 + 10 * k, image=image, strength=0.3)
        kept += [d == digit for d, _ in oracle.classify(out)]
    assert np.mean(kept) >= IMG2IMG_DIGIT_KEPT_AT_0_3, np.mean(kept)


def test_img2img_high_strength_recolours(pipe, oracle, sources):
    changed = []
    for k, (image, digit, colour) in enumerate(sources):
        other = COLOURS[(COLOURS.index(colour) + 1 + k) % len(COLOURS)]
        out = generate(pipe, [f"a {other} {digit}"] * 10, 7.5, seed=300 + 10 * k, image=image, strength=0.8)
        changed += [c != colour for _, c in oracle.classify(out)]
    assert np.mean(changed) >= IMG2IMG_COLOUR_CHANGED_AT_0_8, np.mean(changed)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_pytorch_backend_gives_the_same_accuracy(fp32_images, oracle):
    pytest.importorskip("torch")
    torch_pipe = sdrt.Pipeline.from_pretrained(None, backend="torch")
    images = generate(torch_pipe, PROMPT_TEXTS, 7.5, seed=0)
    (d32, c32), (d, c) = accuracy(oracle, fp32_images), accuracy(oracle, images)
    assert abs(d - d32) <= BACKEND_AGREEMENT and abs(c - c32) <= BACKEND_AGREEMENT, ((d, c), (d32, c32))
    assert psnr(images, fp32_images) >= 40.0  # the same fp32 arithmetic, two engines


def test_onnx_fp16_gives_the_same_accuracy_and_35db(fp32_images, oracle, tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from sdrt.builtin import builtin_model_dir
    from sdrt.contracts import ShapeLimits
    from sdrt.export.onnx_export import export_model

    out = tmp_path_factory.mktemp("digits") / "fp16"
    export_model(builtin_model_dir(), out, fp16=True, limits=ShapeLimits(min_size=64, opt_size=64, max_size=64, max_batch=100),
                 progress=False)
    images = generate(sdrt.Pipeline.from_pretrained(out, threads=1), PROMPT_TEXTS, 7.5, seed=0)
    (d32, c32), (d, c) = accuracy(oracle, fp32_images), accuracy(oracle, images)
    assert abs(d - d32) <= BACKEND_AGREEMENT and abs(c - c32) <= BACKEND_AGREEMENT, ((d, c), (d32, c32))
    assert psnr(images, fp32_images) >= FP16_MIN_PSNR_DB


def test_oracle_reads_real_digits(oracle):
    """Measured, not read back from digits_oracle.json: 1,000 images of held-out real handwriting (the last 20% of
    scikit-learn's load_digits, writers no training run saw), coloured and jittered as in training, with the seed
    the oracle's own held-out figure used (the first half of its 2,000 images; 98.15% / 100% on all 2,000)."""
    pytest.importorskip("sklearn")
    from sdrt.export.digits import data

    images, labels = data.make_dataset(1000, seed=101, split="test", font_fraction=0.0)
    read = oracle.classify(images)
    digit = np.mean([d == want for (d, _), want in zip(read, labels[:, 0])])
    colour = np.mean([c == data.COLOUR_NAMES[want] for (_, c), want in zip(read, labels[:, 1])])
    assert digit >= 0.97 and colour >= 0.99, (digit, colour)
    pixels = np.zeros((2, 64, 64, 3), np.uint8)
    pixels[:, 16:48, 28:36] = (255, 0, 0)  # a red bar on black: a "1", in red
    assert [c for _, c in oracle.classify(pixels)] == ["red", "red"]
