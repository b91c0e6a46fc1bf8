"""The digits model's training command runs end to end (a few steps of every phase), so it cannot rot.

The real run (`python -m sdrt.export.digits.train --phase all --seed 0`, ~75 minutes) made runtime/models/digits;
this checks that the same code still builds, trains, saves a diffusers folder that loads like a checkpoint,
and that `sdrt export` accepts it.
"""

import json

import numpy as np
import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def smoke_model(tmp_path_factory):
    from sdrt.export.digits.train import main

    out = tmp_path_factory.mktemp("digits") / "smoke"
    main(["--smoke", "--seed", "0", "--threads", "1", "--out", str(out)])
    return out


def test_smoke_training_logs_every_phase_and_finite_losses(smoke_model):
    log = (smoke_model / "train_log.txt").read_text()
    for phase in ("vae  step", "text step", "unet step", "dec  step", "neg  step", "vae scaling_factor", "done in"):
        assert phase in log, f"{phase!r} missing from the training log"
    losses = [float(tok) for line in log.splitlines() if " loss " in line
              for tok in [line.split(" loss ")[1].split()[0]]]
    assert losses and all(np.isfinite(losses))


def test_smoke_model_is_a_diffusers_folder_that_sdrt_runs(smoke_model, tmp_path):
    import sdrt
    from sdrt.contracts import ShapeLimits
    from sdrt.export.onnx_export import export_model

    index = json.loads((smoke_model / "model_index.json").read_text())
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(index)
    vae_config = json.loads((smoke_model / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] != 0.18215  # measured from the latents, not SD 1.5's constant
    out = tmp_path / "onnx"
    export_model(smoke_model, out, limits=ShapeLimits(min_size=64, opt_size=64, max_size=64, max_batch=2), progress=False)
    pipe = sdrt.Pipeline.from_pretrained(out, threads=1)
    image = pipe("a red 7", num_inference_steps=2, guidance_scale=2.0, seed=0, output_type="np", progress=False).images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
