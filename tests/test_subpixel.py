"""The sub-pixel rewrite of "nearest 2x upsample + 3x3 conv" (sdrt.export.subpixel) equals the stock modules."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
import torch.nn.functional as F  # noqa: E402

from sdrt.export.subpixel import subpixel_upsamplers, upsample_conv_subpixel  # noqa: E402


@pytest.mark.parametrize("shape", [(1, 3, 4, 4), (2, 8, 5, 7), (1, 16, 1, 1)])
@pytest.mark.parametrize("bias", [True, False])
def test_equals_upsample_then_conv(shape, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    w = torch.randn(6, shape[1], 3, 3, generator=g)
    b = torch.randn(6, generator=g) if bias else None
    ref = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), w, b, padding=1)
    out = upsample_conv_subpixel(x, w, b)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_patches_the_upsamplers_of_unet_and_vae_and_restores_them(tiny_sd1):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd1 / "unet").eval()
    vae = AutoencoderKL.from_pretrained(tiny_sd1 / "vae").eval()
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(2, unet.config.in_channels, 8, 8, generator=g)
    states = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    latent = torch.randn(1, vae.config.latent_channels, 8, 8, generator=g)
    with torch.no_grad():
        ref_unet, ref_vae = unet(sample, 500, states).sample, vae.decode(latent).sample
        with subpixel_upsamplers(unet, vae) as n:
            out_unet, out_vae = unet(sample, 500, states).sample, vae.decode(latent).sample
            patched = [m for m in [*unet.modules(), *vae.modules()] if "forward" in vars(m)]
        assert n == len(patched) == len(unet.up_blocks) - 1 + len(vae.decoder.up_blocks) - 1
        assert not [m for m in [*unet.modules(), *vae.modules()] if "forward" in vars(m)]  # restored
    for out, ref in ((out_unet, ref_unet), (out_vae, ref_vae)):
        assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_export_records_the_rewrite_and_has_no_resize(onnx_sd1):
    import onnx

    from sdrt.manifest import read_manifest

    manifest = read_manifest(onnx_sd1)
    counts = manifest.extras["subpixel_upsamplers"]
    assert counts["unet"] > 0 and counts["vae_decoder"] > 0 and counts["text_encoder"] == 0
    ops = {n.op_type for n in onnx.load(str(onnx_sd1 / manifest.networks["vae_decoder"]["file"]), load_external_data=False).graph.node}
    assert "DepthToSpace" in ops and "Resize" not in ops
