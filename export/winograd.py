"""Export-time rewrite of wide 3x3 convolutions into Winograd F(2x2, 3x3), for ONNX Runtime on CPUs.

ONNX Runtime's CPU convolution (MLAS) is a direct/im2col GEMM: 36 multiply-adds per 2x2 output tile and
channel pair. Winograd's F(2x2, 3x3) (Lavin & Gray 2015, what cuDNN and oneDNN use) gets the same tile from
16: each 4x4 input tile is transformed (B^T d B), multiplied by the transformed kernel (G g G^T, computed in
the graph from the checkpoint's own weights and folded into a constant at load), and transformed back
(A^T m A). The 16 products per tile are 16 batched GEMMs, where MLAS is at its best. The transforms are
memory passes over a 4x-expanded tensor, so the rewrite pays only where channels are wide relative to the
image: measured here (2-core AVX2, 1 thread, ORT 1.32) 1.5x for 512-1280 channels, 1.2x for 256-320, and
0.8x for 128 channels at 256x256 — hence MIN_CHANNELS. Error: ~5e-7 of the output's range in fp32 (the
transforms' constants are 0, +-1 and 1/2), so fp32 exports only.

Costs: the transformed kernels are 16/9 of the 3x3 weights they replace (more memory), and TensorRT and
cuDNN already pick Winograd themselves, so `sdrt build` refuses an export made with it.
"""

from __future__ import annotations

from sdrt.export.patching import patched_forwards

MIN_CHANNELS = 256  # both input and output channels; below it the transforms cost more than they save

# F(2x2, 3x3): B^T (4x4), G (4x3), A^T (2x4)
_BT = [[1.0, 0.0, -1.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.0, -1.0, 1.0, 0.0], [0.0, 1.0, 0.0, -1.0]]
_G = [[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]]
_AT = [[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, -1.0, -1.0]]


def winograd_conv3x3(x, weight, bias):
    """conv2d(x, weight, bias, padding=1) for a 3x3 kernel, by Winograd F(2x2, 3x3); any height and width."""
    import torch
    import torch.nn.functional as F

    bt, g, at = (torch.tensor(m, dtype=x.dtype) for m in (_BT, _G, _AT))
    n, c, h, w = x.shape
    co = weight.shape[0]
    # Transformed kernels U[xi, o, i], xi = 4*a + b over the 4x4 tile.
    u = torch.einsum("au,oiuv,bv->aboi", g, weight, g).reshape(16, co, c)
    # Input tiles: 4x4, stride 2, over x padded by 1 (and 1 more at the bottom/right, so odd sizes tile too).
    tile_kernels = torch.einsum("iu,jv->ijuv", bt, bt).reshape(16, 1, 4, 4)
    padded = F.pad(x, (1, 2, 1, 2)).reshape(n * c, 1, h + 3, w + 3)
    v = F.conv2d(padded, tile_kernels, stride=2)  # [n*c, 16, th, tw], th = ceil(h/2)
    th, tw = v.shape[-2], v.shape[-1]
    v = v.reshape(n, c, 16, th * tw).transpose(1, 2)  # [n, 16, c, tiles]
    m = torch.matmul(u, v)  # [n, 16, co, tiles]: the 16 batched GEMMs
    out_transform = torch.einsum("ia,jb->ijab", at, at).reshape(4, 16)
    y = torch.matmul(out_transform, m.flatten(2))  # [n, 4, co*tiles]: output pixel (2ti+p, 2tj+q) at p*2+q
    y = y.reshape(n, 2, 2, co, th, tw).permute(0, 3, 4, 1, 5, 2).reshape(n, co, 2 * th, 2 * tw)
    y = y[:, :, :h, :w]
    return y if bias is None else y + bias.reshape(1, co, 1, 1)


def _rewritable(module) -> bool:
    import torch

    return (type(module) is torch.nn.Conv2d and module.kernel_size == (3, 3) and module.stride == (1, 1)
            and module.padding == (1, 1) and module.dilation == (1, 1) and module.groups == 1
            and module.padding_mode == "zeros" and min(module.in_channels, module.out_channels) >= MIN_CHANNELS)


def _winograd_forward(self, x):
    return winograd_conv3x3(x, self.weight, self.bias)


def winograd_convs(*modules):
    """Within the block, every wide 3x3 convolution in `modules` runs as Winograd F(2x2, 3x3); yields how many."""
    return patched_forwards(modules, _rewritable, _winograd_forward)
