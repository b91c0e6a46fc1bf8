"""ONNX graphs that read their weights from the diffusers safetensors beside them (the built-in model's layout)."""

import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch

from sdrt.backends.torch_modules import TextEncoderOnEmbeddings
from sdrt.contracts import TEXT_ENCODER, build_contracts
from sdrt.export.share_weights import link_to_safetensors
from sdrt.model.facts import read_model_facts


def test_text_encoder_graph_reads_checkpoint_bytes(tiny_sd1, tmp_path):
    from transformers import CLIPTextModel

    folder = tmp_path / "text_encoder"
    shutil.copytree(tiny_sd1 / "text_encoder", folder)
    contract = build_contracts(read_model_facts(tiny_sd1))[TEXT_ENCODER]
    module = TextEncoderOnEmbeddings(CLIPTextModel.from_pretrained(folder)).eval()
    feeds = contract.sample_inputs({"batch": 2})
    path = folder / "model.onnx"
    with torch.no_grad():
        torch.onnx.export(module, (torch.from_numpy(feeds["inputs_embeds"]),), str(path), dynamo=False,
                          input_names=contract.input_names, output_names=contract.output_names,
                          dynamic_axes=contract.dynamic_axes(), opset_version=17, do_constant_folding=False)
        expected = module(torch.from_numpy(feeds["inputs_embeds"])).numpy()
    before = path.stat().st_size
    shared, inline = link_to_safetensors(path, folder / "model.safetensors")
    assert shared > 0 and inline == 0
    assert path.stat().st_size < before - shared * 0.9  # the bytes really left the graph
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_link_refuses_another_folder(tiny_sd1, tmp_path):
    with pytest.raises(ValueError, match="own folder"):
        link_to_safetensors(tmp_path / "model.onnx", tiny_sd1 / "text_encoder" / "model.safetensors")
