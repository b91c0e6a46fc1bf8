"""The built-in digits model, judged by what its images show (the oracle), through the light ONNX Runtime path.

The issue's targets are >= 80% prompted digit and >= 85% prompted colour at guidance 7.5; this model reaches
42% and 36% (chance: 10% and 12.5%), so these tests pin what it does reach, with margin, and that guidance
works — they are not the issue's bar (see the model card and the issue note).
"""

import numpy as np
import pytest

import sdrt
from sdrt.oracle import DigitOracle

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
PROMPTS = [(d, COLOURS[(d * 3 + k) % 8]) for k in range(5) for d in range(10)]  # 50 prompts over digits and colours


@pytest.fixture(scope="module")
def pipe():
    return sdrt.Pipeline.from_pretrained(None, threads=1)


@pytest.fixture(scope="module")
def oracle():
    return DigitOracle.load()


def accuracy(pipe, oracle, guidance):
    out = pipe([f"a {c} {d}" for d, c in PROMPTS], num_inference_steps=20, guidance_scale=guidance, seed=0,
               output_type="np", progress=False)
    read = oracle.classify(out.images)
    digit = np.mean([r[0] == d for r, (d, _) in zip(read, PROMPTS)])
    colour = np.mean([r[1] == c for r, (_, c) in zip(read, PROMPTS)])
    return digit, colour


def test_builtin_model_runs_on_onnx_runtime(pipe):
    assert pipe.backend.name == "onnx" and pipe.source.manifest.extras.get("shared_weights")


def test_prompts_steer_digit_and_colour_and_guidance_helps(pipe, oracle):
    digit, colour = accuracy(pipe, oracle, 7.5)
    digit_unguided, _ = accuracy(pipe, oracle, 1.0)
    assert digit >= 0.25 and colour >= 0.30, (digit, colour)  # measured 0.42 / 0.36; chance 0.10 / 0.125
    assert digit > digit_unguided, (digit, digit_unguided)  # measured 0.42 vs 0.16


def test_pytorch_backend_runs_the_same_weights(pipe):
    torch_pipe = sdrt.Pipeline.from_pretrained(None, backend="torch")
    kwargs = dict(num_inference_steps=10, guidance_scale=3.0, seed=4, output_type="latent", progress=False)
    a = pipe(["a red 7", "a blue 3"], **kwargs).images
    b = torch_pipe(["a red 7", "a blue 3"], **kwargs).images
    assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()


def test_oracle_reads_real_digits(oracle):
    # Recorded when the oracle was trained on real coloured digits (never on generated images). The issue asks
    # >= 97% on held-out handwriting; this oracle reached 96% (colour 100%): short of it, said in the issue note.
    held_out = oracle.meta["accuracy"]["held_out_handwritten"]
    assert held_out["digit_accuracy"] >= 0.95 and held_out["colour_accuracy"] >= 0.99, held_out
    pixels = np.zeros((2, 64, 64, 3), np.uint8)
    pixels[:, 16:48, 28:36] = (255, 0, 0)  # a red bar on black: a "1", in red
    assert [c for _, c in oracle.classify(pixels)] == ["red", "red"]
