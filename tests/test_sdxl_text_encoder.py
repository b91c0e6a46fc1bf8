"""SDXL's second text encoder computes its final layer for the pooled (end-of-text) token only
(sdrt.backends.torch_modules.PenultimateTextEncoder): the same penultimate states and pooled projection as
transformers' CLIPTextModelWithProjection, for end-of-text tokens at any position, in PyTorch and in ONNX Runtime."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


def test_pooled_last_layer_equals_transformers(tiny_sdxl, tmp_path):
    import onnxruntime as ort
    from transformers import CLIPTextModelWithProjection

    from sdrt.backends.torch_modules import PenultimateTextEncoder
    from sdrt.sdxl import pool_weights

    ref = CLIPTextModelWithProjection.from_pretrained(tiny_sdxl / "text_encoder_2").eval()
    ours = PenultimateTextEncoder(ref, ref.text_projection).eval()
    assert len(ours.encoder.layers) >= 2  # a last layer to cut, and one before it
    eos = ref.config.eos_token_id
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 1000, (3, 77), generator=g)
    for row, end in enumerate((5, 40, 76)):  # the pooled token early, mid and last: the causal row differs
        ids[row, end:] = 49407
    with torch.no_grad():
        embeds = ours.embeddings.token_embedding(ids)
    weights = torch.from_numpy(pool_weights(ids.numpy(), eos, ref.config.eos_token_id == 2))
    with torch.no_grad():
        want = ref(input_ids=ids, output_hidden_states=True)
        hidden, pooled = ours(embeds, weights)
    scale = want.text_embeds.abs().max()
    assert (pooled - want.text_embeds).abs().max() <= 1e-5 * scale  # float rounding: the same ops on the same rows
    assert torch.equal(hidden, want.hidden_states[-2]) or (hidden - want.hidden_states[-2]).abs().max() <= 1e-5 * hidden.abs().max()

    path = tmp_path / "te2.onnx"
    torch.onnx.export(ours, (embeds[:2], weights[:2]), str(path), dynamo=False, opset_version=17,
                      input_names=["inputs_embeds", "pool_weights"], output_names=["hidden_states", "text_embeds"],
                      dynamic_axes={"inputs_embeds": {0: "b"}, "pool_weights": {0: "b"}})  # fmt: skip
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"inputs_embeds": embeds.numpy(), "pool_weights": weights.numpy()})[1]
    assert np.abs(got - want.text_embeds.numpy()).max() <= 1e-5 * float(scale)
