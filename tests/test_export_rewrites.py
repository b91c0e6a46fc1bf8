"""Export-time rewrites that compute the same function with fewer multiply-adds (sdrt.export.subpixel, winograd,
applied together by sdrt.export.rewrites)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
import torch.nn.functional as F  # noqa: E402

from sdrt.export.rewrites import graph_rewrites  # noqa: E402
from sdrt.export.subpixel import phase_kernels_3x3, upsample_conv_subpixel  # noqa: E402


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
        with graph_rewrites(unet, None) as unet_counts, graph_rewrites(vae, None) as vae_counts:
            out_unet, out_vae = unet(sample, 500, states).sample, vae.decode(latent).sample
            patched = [m for m in [*unet.modules(), *vae.modules()] if "forward" in vars(m)]
        n = unet_counts["subpixel_upsamplers"] + vae_counts["subpixel_upsamplers"]
        assert unet_counts["winograd_convs"] == vae_counts["winograd_convs"] == 0
        assert n == len(patched) == len(unet.up_blocks) - 1 + len(vae.decoder.up_blocks) - 1
        assert not [m for m in [*unet.modules(), *vae.modules()] if "forward" in vars(m)]  # restored
    for out, ref in ((out_unet, ref_unet), (out_vae, ref_vae)):
        assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_export_records_the_rewrite_and_has_no_resize(onnx_sd1):
    import onnx

    from sdrt.model.manifest import read_manifest

    manifest = read_manifest(onnx_sd1)
    counts = manifest.extras["subpixel_upsamplers"]
    assert counts["unet"] > 0 and counts["vae_decoder"] > 0 and counts["text_encoder"] == 0
    ops = {n.op_type for n in onnx.load(str(onnx_sd1 / manifest.networks["vae_decoder"]["file"]), load_external_data=False).graph.node}
    assert "DepthToSpace" in ops and "Resize" not in ops


# --- Winograd F(2x2, 3x3) and F(4x4, 3x3) (sdrt.export.winograd) ---------------------------------------------


@pytest.mark.parametrize("tile, tolerance", [(2, 2e-6), (4, 2e-5)])  # F(4x4)'s transforms reach 8 and 1/24
@pytest.mark.parametrize("shape", [(1, 3, 4, 4), (2, 5, 7, 9), (1, 2, 1, 1), (2, 8, 16, 6), (3, 4, 13, 10)])
def test_winograd_equals_conv3x3(shape, tile, tolerance):
    from sdrt.export.winograd import winograd_conv3x3

    g = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=g)
    w, b = torch.randn(6, shape[1], 3, 3, generator=g), torch.randn(6, generator=g)
    ref = F.conv2d(x.double(), w.double(), b.double(), padding=1)
    out = winograd_conv3x3(x, w, b, tile)
    assert out.shape == ref.shape and (out.double() - ref).abs().max() <= tolerance * ref.abs().max()


@pytest.mark.parametrize("tile, tolerance", [(2, 2e-6), (4, 2e-5)])
@pytest.mark.parametrize("shape", [(1, 3, 4, 4), (2, 5, 7, 9), (1, 2, 1, 1)])
def test_winograd_upsampler_equals_upsample_then_conv(shape, tile, tolerance):
    from sdrt.export.winograd import winograd_conv3x3

    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g)
    w, b = torch.randn(6, shape[1], 3, 3, generator=g), torch.randn(6, generator=g)
    ref = F.conv2d(F.interpolate(x.double(), scale_factor=2.0, mode="nearest"), w.double(), b.double(), padding=1)
    out = winograd_conv3x3(x, phase_kernels_3x3(w), b, tile, upsample=2)
    assert out.shape == ref.shape and (out.double() - ref).abs().max() <= tolerance * ref.abs().max()


def test_winograd_tile_follows_channels_and_size_at_opt():
    from sdrt.export.winograd import choose_tile

    assert choose_tile(128, 128, 256, 256) == 0  # narrow: the transforms cost more than they save
    assert choose_tile(256, 128, 256, 256) == 4 and choose_tile(320, 320, 32, 32) == 4 and choose_tile(640, 640, 16, 16) == 4
    assert choose_tile(1280, 1280, 8, 8) == 2 and choose_tile(1280, 1280, 4, 4) == 2  # too few F(4x4) tiles
    assert choose_tile(1280, 1280, 2, 2) == 0


def test_winograd_export_runs_other_sizes_in_onnx_runtime(tmp_path, monkeypatch):
    import onnxruntime as ort

    from sdrt.export import winograd

    monkeypatch.setattr(winograd, "MIN_CHANNEL_PRODUCT", 64)  # the rule, on a model small enough for a test
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 4, 3, padding=1),
                                torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.AvgPool2d(2), torch.nn.Conv2d(8, 8, 3, padding=1)).eval()
    tiles, stock = [], winograd.winograd_conv3x3

    def recording(x, weight, bias, tile):
        tiles.append(tile)
        return stock(x, weight, bias, tile)

    monkeypatch.setattr(winograd, "winograd_conv3x3", recording)
    path, example = tmp_path / "w.onnx", torch.randn(2, 8, 8, 8)
    with torch.no_grad(), graph_rewrites(model, (example,), opt_scale=2, winograd=True) as counts:  # opt: 2x the example
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}})
    assert counts["winograd_convs"] == 2  # the 8->8 convs: 8 x 4 channels is under MIN_CHANNEL_PRODUCT, stock convolution
    assert tiles == [4, 2]  # 16x16 at the opt size: F(4x4); after the pool, 8x8: F(2x2)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(1, 8, 7, 9), (3, 8, 16, 16)]:  # odd sizes and another batch than the trace's
        x = torch.randn(shape)
        with torch.no_grad():
            ref = model(x).numpy()
        out = session.run(None, {"x": x.numpy()})[0]
        assert out.shape == ref.shape and np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()


def test_winograd_export_is_fp32_only_and_refused_by_tensorrt(tiny_sd1, tmp_path, monkeypatch):
    import onnx

    from sdrt.contracts import ShapeLimits
    from sdrt.errors import InputError
    from sdrt.export import rewrites, winograd
    from sdrt.export.onnx_export import export_model
    from sdrt.export.tensorrt_build import build_engines
    from sdrt.model.manifest import read_manifest

    limits = ShapeLimits(min_size=32, opt_size=64, max_size=64, max_batch=1)
    with pytest.raises(InputError, match="fp32"):
        export_model(tiny_sd1, tmp_path / "x", fp16=True, winograd=True, limits=limits, progress=False)
    monkeypatch.setattr(winograd, "MIN_CHANNEL_PRODUCT", 256)  # the tiny model's convolutions are 16-64 wide
    monkeypatch.setattr(winograd, "MIN_AREA_F4", 8 * 8)  # and its images small: F(4x4) (upsamplers too) and F(2x2)
    tiles = []
    monkeypatch.setattr(rewrites, "choose_tile", lambda *a, f=winograd.choose_tile: tiles.append(f(*a)) or tiles[-1])
    export_model(tiny_sd1, tmp_path / "w", winograd=True, limits=limits, progress=False)  # parity-checked against PyTorch
    assert {0, 2, 4} <= set(tiles)
    manifest = read_manifest(tmp_path / "w")
    counts, upsamplers = manifest.extras["winograd_convs"], manifest.extras["subpixel_upsamplers"]
    assert counts["unet"] > 0 and counts["vae_decoder"] > 0
    assert manifest.extras["cpu_transformers"]["unet"] == {"fused_attentions": 0, "split_geglus": 7}  # a CPU export's GEGLUs
    graph = onnx.load(str(tmp_path / "w" / manifest.networks["vae_decoder"]["file"]), load_external_data=False).graph
    # pixel_shuffle (CRD) is the plain sub-pixel upsampler's interleave; Winograd's output transform uses DCR
    modes = [next((a.s.decode() for a in n.attribute if a.name == "mode"), "DCR") for n in graph.node if n.op_type == "DepthToSpace"]
    assert modes.count("CRD") < upsamplers["vae_decoder"]  # some upsample by Winograd
    assert modes.count("DCR") >= counts["vae_decoder"]  # every Winograd conv lays its tiles out by depth-to-space
    assert not any(n.op_type == "ConvTranspose" for n in graph.node)
    with pytest.raises(InputError, match="without --winograd"):
        build_engines(tmp_path / "w", tmp_path / "trt", dry_run=True)


def test_depth_to_space_dcr_is_onnx_depth_to_space_in_eager_and_in_onnx_runtime(tmp_path):
    """The Winograd output transform's layout step: eager (and dynamo) reshape-transpose, torchscript one ONNX
    DepthToSpace node in DCR mode; both must agree with ONNX's definition of DCR."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from sdrt.export.winograd import depth_to_space_dcr

    x = torch.randn(2, 3 * 4 * 4, 3, 5)
    graph = helper.make_graph([helper.make_node("DepthToSpace", ["x"], ["y"], blocksize=4, mode="DCR")], "d2s",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    assert np.array_equal(depth_to_space_dcr(x, 4).numpy(), want)  # pixel (4h + b1, 4w + b2) of c <- channel (b1, b2, c)

    class Module(torch.nn.Module):
        def forward(self, x):
            return depth_to_space_dcr(x, 4)

    path = tmp_path / "d.onnx"
    torch.onnx.export(Module(), (x,), str(path), dynamo=False, opset_version=17, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}})
    import onnx

    assert [n.op_type for n in onnx.load(str(path)).graph.node] == ["DepthToSpace"]
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    assert np.array_equal(got, want)


# --- GroupNorm's affine step as BatchNormalization (sdrt.export.groupnorm) ------------------------------------


def test_group_norm_rewrite_equals_group_norm_and_exports_one_batch_normalization(tmp_path):
    import onnx
    import onnxruntime as ort

    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.GroupNorm(2, 8, eps=1e-6), torch.nn.SiLU()).eval()
    torch.nn.init.normal_(model[1].weight)  # gamma and beta away from 1 and 0, so that a dropped affine step fails
    torch.nn.init.normal_(model[1].bias)
    x = torch.randn(2, 4, 5, 7)
    with torch.no_grad():
        ref = model(x).numpy()
        with graph_rewrites(model, (x,), winograd=True) as _:
            assert "forward" in vars(model[1])
            out = model(x).numpy()
            path = tmp_path / "g.onnx"
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}})
    assert "forward" not in vars(model[1])  # restored
    assert np.abs(out - ref).max() <= 1e-6 * np.abs(ref).max()
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("BatchNormalization") == 1 and ops.count("InstanceNormalization") == 1
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(1, 4, 3, 3), (3, 4, 8, 6)]:  # other batches and sizes than the trace's
        x = torch.randn(shape)
        with torch.no_grad():
            ref = model(x).numpy()
        got = session.run(None, {"x": x.numpy()})[0]
        assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    with graph_rewrites(model, (x,), winograd=False):  # stock export without --winograd (ORT's CUDA fusions match it)
        assert "forward" not in vars(model[1])
