"""Bad input gets an sdrt error naming the value and the fix, before any network runs."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import sdrt
from sdrt.errors import InputError, ModelError, SdrtError


@pytest.fixture(scope="module")
def pipe(tiny_sd1):
    return sdrt.Pipeline.from_pretrained(tiny_sd1, backend="torch")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(scheduler="heun2"), "unknown scheduler 'heun2'"),
        (dict(num_inference_steps=60, scheduler="lcm"), "more than the lcm scheduler supports here; use at most 50"),
        (dict(num_inference_steps=0), "num_inference_steps 0"),
        (dict(height=500), "height 500 is not a multiple of 32 for this model; use 480 or 512"),
        (dict(width=16), "width 16 is not a multiple of 32"),
        (dict(guidance_scale=-1.0), "guidance_scale -1.0 is negative"),
        (dict(image=np.zeros((64, 64, 3), np.uint8), strength=0.0), r"strength 0.0 is outside \(0, 1\]"),
        (dict(image=np.zeros((64, 64, 3), np.uint8), strength=1.5), r"strength 1.5 is outside"),
        (dict(image=np.zeros((64, 64, 3), np.uint8), strength=0.05, num_inference_steps=10), "raise strength or steps"),
        (dict(image="/nonexistent/x.png"), "does not exist"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt 0"),
        (dict(output_type="tensor"), "output_type 'tensor'"),
        # issue 14: wrong types are refused at the door, naming the argument
        (dict(prompt=None), "prompt None is not a string"),
        (dict(prompt=7), "prompt 7 is not a string"),
        (dict(prompt=[]), r"prompt \[\] is not a string"),
        (dict(prompt="a red 7 \udcff\udcfe"), "not valid UTF-8"),
        (dict(negative_prompt=3), "negative_prompt 3"),
        (dict(seed="5"), "seed '5' is not an integer"),
        (dict(seed=True), "seed True is not an integer"),
        (dict(seed=2.0), "seed 2.0 is not an integer"),
        (dict(seed=-1), "seed -1 is outside"),
        (dict(guidance_scale="7.5"), "guidance_scale '7.5' is not a number"),
        (dict(guidance_scale=None), "guidance_scale None is not a number"),
        (dict(guidance_scale=float("nan")), "guidance_scale nan is not finite"),
        (dict(guidance_scale=float("inf")), "guidance_scale inf is not finite"),
        (dict(strength=None), "strength None is not a number"),
        (dict(strength="0.5"), "strength '0.5' is not a number"),
        (dict(latents=[[0.0]]), "latents of type list are not a numpy array"),
        (dict(latents=np.zeros((1, 4, 2, 2), np.float32)), r"latents have shape \(1, 4, 2, 2\); expected \(1, 4, 8, 8\)"),
        (dict(latents=np.full((1, 4, 8, 8), np.nan, np.float32)), "latents hold NaN"),
        (dict(image=np.zeros((0, 0, 3), np.uint8)), "it has no pixels"),
        (dict(width=-64), "width -64 is not positive"),
        (dict(height="64"), "height '64' is not an integer"),
        (dict(num_inference_steps=1000, scheduler="ddim"), "more than the ddim scheduler supports here; use at most 999"),
        (dict(num_inference_steps=999, scheduler="dpmpp_2m"), "use at most 998"),
        (dict(max_memory="lots"), "max_memory 'lots' is not a size"),
        (dict(height=6400, width=6400), r"needs about .* at most \d+x\d+ fits"),
    ],
)
def test_bad_arguments(pipe, kwargs, match):
    with pytest.raises(InputError, match=match):
        pipe(**{"prompt": "a cat", "progress": False, **kwargs})


@pytest.mark.parametrize("options,match", [
    (dict(threads="many"), "onnx backend option threads='many' is invalid; pass an integer >= 1"),
    (dict(threads=-1), "threads=-1 is invalid"),
    (dict(fp16=True), "fp16=True is not an option of the onnx backend; precision is chosen at export"),
    (dict(dtype="fp16"), "dtype='fp16' is not an option of the onnx backend; it takes providers, threads"),
    (dict(max_memory="x"), "max_memory 'x' is not a size"),
])
def test_bad_backend_options(options, match):
    with pytest.raises(InputError, match=match):
        sdrt.Pipeline.from_pretrained(**options)


def test_torch_backend_options(tiny_sd1):
    with pytest.raises(InputError, match="torch backend option dtype='bf16' is invalid; pass 'fp32' or 'fp16'"):
        sdrt.Pipeline.from_pretrained(tiny_sd1, backend="torch", dtype="bf16")
    with pytest.raises(InputError, match="providers=.* is not an option of the torch backend"):
        sdrt.Pipeline.from_pretrained(tiny_sd1, backend="torch", providers=["CPUExecutionProvider"])


def test_numpy_seed_generates_and_saves(pipe, tmp_path):
    from sdrt.outputs import save_image

    out = pipe("a cat", seed=np.int64(3), num_inference_steps=1, progress=False)
    assert out.seeds == [3] and type(out.parameters[0]["seed"]) is int
    save_image(out.images[0], tmp_path / "x.png", out.parameters[0])


def test_unreadable_and_odd_images(pipe, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(InputError, match="cannot be read as an image"):
        pipe("a cat", image=str(bad), progress=False)
    for mode in ("RGBA", "L"):  # converted, not refused
        out = pipe("a cat", image=Image.new(mode, (64, 64)), num_inference_steps=2, strength=0.5, progress=False)
        assert out.images[0].size == (64, 64)


def test_errors_are_value_errors():
    assert issubclass(SdrtError, ValueError)


def test_bad_model_folders(tiny_sd1, tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        sdrt.Pipeline.from_pretrained(tmp_path / "nope")
    partial = tmp_path / "partial"
    shutil.copytree(tiny_sd1, partial, ignore=shutil.ignore_patterns("unet"))
    with pytest.raises(ModelError, match="lacks unet"):
        sdrt.Pipeline.from_pretrained(partial)
    for cls, family in [("StableDiffusionXLPipeline", "SDXL"), ("StableDiffusion3Pipeline", "SD3"), ("StableDiffusionDepth2ImgPipeline", "depth")]:
        other = tmp_path / cls
        shutil.copytree(tiny_sd1, other)
        index = json.loads((other / "model_index.json").read_text())
        index["_class_name"] = cls
        (other / "model_index.json").write_text(json.dumps(index))
        with pytest.raises(ModelError, match=family):
            sdrt.Pipeline.from_pretrained(other)
    depth = tmp_path / "depth-unet"  # 9 input channels is an inpainting UNet (tests/test_inpaint.py); 5 is not
    shutil.copytree(tiny_sd1, depth)
    config = json.loads((depth / "unet" / "config.json").read_text())
    config["in_channels"] = 5
    (depth / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="takes 5 input channels.*depth"):
        sdrt.Pipeline.from_pretrained(depth)


def test_cli_error_is_one_line_and_leaves_no_png(tiny_sd1, tmp_path):
    out = tmp_path / "x.png"
    proc = subprocess.run(
        [sys.executable, "-m", "sdrt.cli", "generate", "a cat", "-m", str(tiny_sd1), "--backend", "torch", "-H", "500", "-o", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["sdrt: error: height 500 is not a multiple of 32 for this model; use 480 or 512"]
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))
