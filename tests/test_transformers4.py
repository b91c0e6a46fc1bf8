"""transformers 4.x: the built-in model's text encoder (and every folder sdrt saves) loads with its weights.

transformers 5 saves CLIPTextModel keys without `text_model.`, and 4.x then loads a freshly initialised encoder
with only a log warning; sdrt writes `text_model.` keys, which both load (sdrt.model.weights.add_clip_text_prefix),
and its own loader accepts either. This test runs transformers 4.57 in a side venv (main's packages must not
shadow it, so not --system-site-packages): made once at $SDRT_TF4_VENV (default /tmp/tf4venv) with torch pinned
to the CPU wheel; skipped when it cannot be made. ~20-40 s once the venv exists.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VENV = Path(os.environ.get("SDRT_TF4_VENV", "/tmp/tf4venv"))
RUNTIME = Path(__file__).resolve().parent.parent / "runtime"
IDS = [[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70, [49406, 1237, 49407] + [49407] * 74]

SIDE = r"""
import importlib.util, json, sys
import numpy as np, torch, transformers
from transformers import CLIPTextModel

folder, flat, modules, out, ids = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
spec = importlib.util.spec_from_file_location("torch_modules", modules)
tm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tm)
ids = torch.tensor(ids)
with torch.no_grad():
    text, info = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", output_loading_info=True)
    hidden = text(ids).last_hidden_state.numpy()
    wrapped = tm.TextEncoderOnEmbeddings(text.eval())(text.text_model.embeddings.token_embedding(ids)).numpy()  # batch 2
    flat_text = tm.load_clip_text_model(CLIPTextModel, flat, torch.float32)  # a transformers-5 folder (no prefix)
    flat_hidden = flat_text(ids).last_hidden_state.numpy()
np.savez(out, hidden=hidden, wrapped=wrapped, flat=flat_hidden)
print(json.dumps({"version": transformers.__version__, "missing": sorted(info["missing_keys"])}))
"""


def side_python() -> Path:
    python = VENV / "bin" / "python"
    ok = lambda: python.exists() and subprocess.run([str(python), "-c", "import torch, transformers, safetensors"], capture_output=True).returncode == 0  # noqa: E731
    if ok():
        return python
    try:
        shutil.rmtree(VENV, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, capture_output=True, timeout=120)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0", "transformers==4.57.*", "safetensors", "numpy"],
                       check=True, capture_output=True, timeout=900)  # fmt: skip
    except (subprocess.SubprocessError, OSError) as err:
        pytest.skip(f"could not make the transformers 4.x side venv at {VENV}: {str(err)[:200]}")
    if not ok():
        pytest.skip(f"the side venv at {VENV} cannot import torch and transformers")
    return python


@pytest.mark.slow
def test_builtin_text_encoder_on_transformers_4_equals_5(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTextModel

    from sdrt.backends.torch_modules import TextEncoderOnEmbeddings
    from sdrt.builtin import builtin_model_dir

    python = side_python()
    model = builtin_model_dir()
    flat = tmp_path / "flat"  # what transformers 5's save_pretrained writes: no text_model. prefix
    (flat / "text_encoder").mkdir(parents=True)
    shutil.copy(model / "text_encoder" / "config.json", flat / "text_encoder")
    state = load_file(model / "text_encoder" / "model.safetensors")
    save_file({k.removeprefix("text_model."): v for k, v in state.items()}, flat / "text_encoder" / "model.safetensors", {"format": "pt"})

    out = tmp_path / "tf4.npz"
    import json

    run = subprocess.run([str(python), "-c", SIDE, str(model), str(flat), str(RUNTIME / "backends" / "torch_modules.py"), str(out), json.dumps(IDS)],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""})  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    info = json.loads(run.stdout.strip().splitlines()[-1])
    assert info["version"].startswith("4.") and info["missing"] == []  # every weight found: not a random encoder
    got = np.load(out)
    ids = torch.tensor(IDS)
    with torch.no_grad():
        text = CLIPTextModel.from_pretrained(model, subfolder="text_encoder").eval()
        want = text(ids).last_hidden_state.numpy()
        core = getattr(text, "text_model", text)
        wrapped = TextEncoderOnEmbeddings(text)(core.embeddings.token_embedding(ids)).numpy()
    np.testing.assert_allclose(got["hidden"], want, atol=1e-5)
    np.testing.assert_allclose(got["wrapped"], wrapped, atol=1e-5)
    np.testing.assert_allclose(got["flat"], want, atol=1e-5)  # sdrt's loader reads a transformers-5 folder on 4.x
