"""sdrt.planning: a pickled planning copy plans exactly as its pipeline does (same plans, same errors), without
networks; what it cannot know (memory, engine profiles) is left to the pipeline."""

import pickle

import pytest
from PIL import Image

import sdrt
from sdrt.errors import InputError
from sdrt.planning import planning_copy


@pytest.fixture(scope="module")
def pipes():
    pipe = sdrt.Pipeline.from_pretrained(None, backend="onnx", threads=1)
    return pipe, pickle.loads(pickle.dumps(planning_copy(pipe)))


GOOD = [
    dict(prompt="a red 7", seed=3),
    dict(prompt=["a 1", "a 2"], negative_prompt="blue", num_images_per_prompt=2, seed=9, scheduler="euler_a",
         num_inference_steps=12, guidance_scale=3.0, width=96, height=64),
    dict(prompt="a 5", image=Image.new("RGB", (64, 64), "red"), strength=0.5, num_inference_steps=10, seed=1),
]
BAD = [
    dict(prompt="x", width=65),
    dict(prompt="x", height=70, width=64),
    dict(prompt="x", scheduler="nope"),
    dict(prompt="x", guidance_scale=-1.0),
    dict(prompt="x", image=Image.new("RGB", (64, 64)), strength=0.01, num_inference_steps=2),
    dict(prompt="x", num_inference_steps=0),
    dict(prompt="x", seed=-5),
    dict(prompt="x", loras={"nope": 1.0}),
    dict(prompt="x", output_type="gif"),
]


@pytest.mark.parametrize("kw", GOOD, ids=range(len(GOOD)))
def test_same_plan(pipes, kw):
    pipe, copy = pipes
    want, got = pipe.plan(**kw), copy.plan(**kw)
    for field in ("prompts", "negatives", "seeds", "steps", "guidance_scale", "height", "width", "scheduler",
                  "strength", "output_type", "loras"):
        assert getattr(got, field) == getattr(want, field), field
    assert (got.init_image is None) == (want.init_image is None)


@pytest.mark.parametrize("kw", BAD, ids=range(len(BAD)))
def test_same_error(pipes, kw):
    pipe, copy = pipes
    with pytest.raises(InputError) as want:
        pipe.plan(**kw)
    with pytest.raises(InputError) as got:
        copy.plan(**kw)
    assert str(got.value) == str(want.value)


def test_copy_is_small_and_runs_nothing(pipes):
    _, copy = pipes
    assert len(pickle.dumps(copy)) < 20_000  # facts and a scheduler config, no weights
    assert copy.backend.uses_host_memory is False and copy.token_table is None


def test_inpainting_model_without_a_mask_refused_by_the_copy(tiny_sd1_inpaint):
    """The copy names the model in the refusal as the pipeline does (it once had no model folder to name: a 500)."""
    pipe = sdrt.Pipeline.from_pretrained(tiny_sd1_inpaint, backend="torch")
    copy = pickle.loads(pickle.dumps(planning_copy(pipe)))
    with pytest.raises(InputError) as want:
        pipe.plan(prompt="x", image=Image.new("RGB", (64, 64)))
    with pytest.raises(InputError) as got:
        copy.plan(prompt="x", image=Image.new("RGB", (64, 64)))
    assert "inpainting model" in str(got.value) and str(got.value) == str(want.value)
