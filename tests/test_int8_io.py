"""int8 text encoder and VAE (issue 22): each network's own scheme (sdrt.export.int8.network_scheme), calibrated on
the inputs the model's own sampling gives it, loaded by the runtime with its I/O unchanged, close to fp32.

Tolerances: the built-in model's decoder measured 41 dB alone against fp32 (benchmarks/results/int8-schemes.md);
the encoder's round trip 40 dB; the bar of 30 dB catches a broken calibration (ranges from inputs scaled by 0.1 clip the feature maps: 10 dB) without
catching noise. The text encoder's states measured ~2% relative error; the bar of 10% is far below a wrong graph's.
"""

import numpy as np
import pytest

import sdrt
from sdrt.errors import InputError

PROMPTS = ["a red 3", "a green 7", "a blue 0"]


@pytest.fixture(scope="module")
def feeds():
    from sdrt.builtin import builtin_model_dir
    from sdrt.export.int8_quality import record_feeds

    return record_feeds(builtin_model_dir(), PROMPTS, 64, 6, 7.5, ("unet", "vae_decoder", "vae_encoder"), {"unet": 4},
                        threads=1)


@pytest.fixture(scope="module")
def io_int8(feeds, tmp_path_factory):
    """The built-in export with its text encoder and VAE quantised (the UNet left fp32)."""
    from sdrt.builtin import builtin_model_dir
    from sdrt.export.int8 import quantize_export

    out = tmp_path_factory.mktemp("int8io") / "digits"
    stats = quantize_export(builtin_model_dir(), out, "static", ("text_encoder", "vae_decoder", "vae_encoder"), feeds)
    return out, stats


def test_record_feeds_keeps_each_network_and_the_decoded_images(feeds):
    assert len(feeds["unet"]) == 4  # limited, spread over the 3 x 7 calls
    assert len(feeds["vae_decoder"]) == len(feeds["vae_encoder"]) == 3  # one decode per prompt
    assert set(feeds["vae_decoder"][0]) == {"latent"} and feeds["vae_decoder"][0]["latent"].shape[1] == 4
    image = feeds["vae_encoder"][0]["image"]
    assert image.shape == (1, 3, 64, 64) and image.min() >= -1 and image.max() <= 1 and image.std() > 0.05


def test_network_scheme_per_network():
    from sdrt.export.int8 import network_scheme

    assert network_scheme("unet", "static-wide") == ("static-wide", ())
    assert network_scheme("text_encoder", "static")[0] == "dynamic-matmul"
    scheme, keep = network_scheme("vae_decoder", "dynamic")
    assert scheme == "static-all" and any("mid_block/attentions" in k for k in keep)


def test_int8_text_encoder_and_decoder_load_unchanged_and_stay_close(io_int8, feeds):
    import onnx

    from sdrt.builtin import builtin_model_dir
    from sdrt.export.int8_quality import decode_psnr, encode_psnr
    from sdrt.model.manifest import read_manifest
    from sdrt.oracle import DigitOracle

    folder, stats = io_int8
    manifest, ref = read_manifest(folder), read_manifest(builtin_model_dir())
    assert {n: manifest.networks[n]["precision"] for n in manifest.networks} == {
        "text_encoder": "int8", "unet": "fp32", "vae_encoder": "int8", "vae_decoder": "int8"}
    assert stats["text_encoder"]["quantized"].get("MatMulInteger", 0) > 0
    assert stats["vae_decoder"]["quantized"].get("QuantizeLinear", 0) > 10
    for name in ("text_encoder", "vae_decoder", "vae_encoder"):  # the contract the runtime and the C host read: names, dtypes, ranks
        def io(m):
            return [(v.name, v.type.tensor_type.elem_type, len(v.type.tensor_type.shape.dim)) for v in (*m.graph.input, *m.graph.output)]

        got = onnx.load(str(folder / manifest.networks[name]["file"]), load_external_data=False)
        want = onnx.load(str(builtin_model_dir() / ref.networks[name]["file"]), load_external_data=False)
        assert io(got) == io(want)
    kept = stats["vae_decoder"]["kept_fp32"]
    assert any("mid_block/attentions" in n for n in kept) and any("conv_in" in n for n in kept) and any("conv_out" in n for n in kept)
    assert decode_psnr(builtin_model_dir(), folder, feeds["vae_decoder"], threads=1) > 30.0
    assert encode_psnr(builtin_model_dir(), folder, feeds["vae_encoder"], threads=1) > 30.0  # measured 40 dB

    pipe, fp32 = (sdrt.Pipeline.from_pretrained(f, backend="onnx", threads=1) for f in (folder, builtin_model_dir()))
    assert pipe.backend.precision("vae_decoder") == "int8" and pipe.backend.precision("text_encoder") == "int8"
    a, b = (np.asarray(p.encode_prompts(PROMPTS)) for p in (pipe, fp32))
    assert a.shape == b.shape and 0 < np.abs(a - b).max() / np.abs(b).max() < 0.1, np.abs(a - b).max() / np.abs(b).max()
    images = pipe([f"a red {d}" for d in range(10)], num_inference_steps=20, guidance_scale=7.5, seed=0,
                  output_type="np", progress=False).images
    read = DigitOracle.load().classify(images)
    assert np.mean([r[0] == d for d, r in enumerate(read)]) >= 0.8, read


def test_int8_networks_are_checked_before_work(tiny_sd1, tmp_path):
    from sdrt.export.int8_export import DEFAULT_NETWORKS, check_networks, export_int8

    assert check_networks(None) == DEFAULT_NETWORKS == ("unet", "vae_decoder", "vae_encoder")
    assert check_networks("unet, text_encoder,unet") == ("unet", "text_encoder")
    with pytest.raises(InputError, match="--int8-networks vae: pick one or more of"):
        check_networks("unet,vae")
    with pytest.raises(InputError, match="text_encoder_2: this model has no such network"):
        export_int8(tiny_sd1, tmp_path / "a", networks="unet,text_encoder_2")
    assert not (tmp_path / "a").exists() and not list(tmp_path.glob(".a.*"))
