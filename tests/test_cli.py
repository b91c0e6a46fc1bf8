"""The command line: images with their parameters, `sdrt info`, a --help that teaches, the light import."""

import json
import subprocess
import sys

from PIL import Image

from sdrt.cli import main
from sdrt.cli.generate import output_paths
from sdrt.images import a1111_parameters


def test_generate_writes_pngs_with_parameters(tiny_sd1, tmp_path, capsys):
    out = tmp_path / "cat.png"
    code = main(["generate", "a red cat", "-m", str(tiny_sd1), "--backend", "torch", "-o", str(out), "--steps", "3",
                 "--seed", "5", "--num-images", "2", "--negative-prompt", "blurry", "--scheduler", "euler_a", "-q"])
    assert code == 0
    paths = [tmp_path / "cat-1.png", tmp_path / "cat-2.png"]
    for k, path in enumerate(paths):
        image = Image.open(path)
        text = image.text["parameters"]
        assert text.splitlines()[0] == "a red cat"
        assert text.splitlines()[1] == "Negative prompt: blurry"
        assert f"Seed: {5 + k}" in text and "Steps: 3" in text and "Sampler: Euler a" in text and "Size: 64x64" in text
        params = json.loads(image.text["sdrt"])
        assert params["seed"] == 5 + k and params["scheduler"] == "euler_a" and params["backend"] == "torch"
    assert "seed 5" in capsys.readouterr().out


def test_output_paths():
    assert output_paths("x", 1)[0].name == "x.png"
    assert [p.name for p in output_paths("dir/img.png", 3)] == ["img-1.png", "img-2.png", "img-3.png"]


def test_a1111_layout():
    text = a1111_parameters({"prompt": "a fox", "negative_prompt": "", "steps": 20, "scheduler": "dpmpp_2m_karras",
                             "guidance_scale": 7.5, "seed": 1, "width": 512, "height": 512, "sdrt_version": "0"})
    assert text == "a fox\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 1, Size: 512x512, Version: sdrt 0"


def test_info_describes_a_diffusers_folder(tiny_sd2, capsys):
    assert main(["info", str(tiny_sd2)]) == 0
    text = capsys.readouterr().out
    assert "v_prediction" in text and "multiples of 32" in text and "diffusers folder" in text and "backends here" in text


def test_help_teaches():
    proc = subprocess.run([sys.executable, "-m", "sdrt.cli", "generate", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for needle in ("--negative-prompt", "--strength", "--scheduler", "examples:", "img2img"):
        assert needle in proc.stdout


def test_import_without_torch():
    code = (
        "import sys\n"
        "for name in ('torch', 'diffusers', 'transformers'): sys.modules[name] = None\n"
        "import sdrt, sdrt.pipeline, sdrt.cli, sdrt.schedulers, sdrt.noise, sdrt.tokenizer\n"
        "from sdrt.schedulers import make_scheduler\n"
        "import numpy as np\n"
        "s = make_scheduler('euler', {'beta_schedule': 'scaled_linear', 'beta_start': 0.00085, 'beta_end': 0.012})\n"
        "s.set_timesteps(4)\n"
        "x = np.ones((1, 4, 8, 8), np.float32)\n"
        "for i in range(s.num_calls): x = s.step(np.zeros_like(x), i, x)\n"
        "print('ok', sdrt.Pipeline.__name__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok Pipeline")
