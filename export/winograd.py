"""Export-time rewrite of wide 3x3 convolutions into Winograd's minimal filtering, for ONNX Runtime on CPUs.

ONNX Runtime's CPU convolution (MLAS) is a direct/im2col GEMM: 9 multiply-adds per output pixel and channel
pair. Winograd F(m x m, 3x3) (Lavin & Gray 2015, what cuDNN and oneDNN use) computes an m x m output tile
from an (m+2) x (m+2) input tile with (m+2)^2 products instead of 9 m^2: each input tile is transformed
(B^T d B), multiplied by the transformed kernel (G g G^T, computed in the graph from the checkpoint's own
weights and folded into a constant at load) and transformed back (A^T M A). The (m+2)^2 products per tile
are that many GEMMs, where MLAS is at its best; the batch is folded into their columns, so each transformed
kernel is read from memory once per call (the low-resolution layers are bound by weight traffic: SD 1.5's
1280-channel kernels are 59 MB).

Which tile, per convolution, from its channels and its input's size at the export's opt size (a probe
forward pass measures them; sizes scale linearly with the image). Measured one conv at a time here (2-core
AVX2, 2 threads, ORT 1.32, medians of 9; direct = 1.00x):
- F(4x4, 3x3) (36 products for 16 outputs, 4x fewer): from 16x16 up: 1.2x (320 ch, 32x32, batch 2), 1.5x
  (640 ch, 16x16; 256 ch, 128x128), 1.6-1.9x (512 ch, 32-128 px), 1.2x for 256->128 at 256x256, 1.0x for
  128->128 there (hence MIN_CHANNEL_PRODUCT). Below 16x16 its tiles are too few: 1.2-1.4x at 8x8, 0.6x at 4x4.
- F(2x2, 3x3) (16 for 4, 2.25x fewer): 1.5-1.6x at 8x8 and 1.25x at 4x4 for 1280 channels, batch 2.
Sub-pixel upsamplers (sdrt.export.subpixel) run the same way at F(4x4) only: their four 2x2 phase kernels as
one 3x3 conv with 4x the outputs (36 products per pixel against the 2x2 convs' 16; F(4x4) makes it 9), the
output transform interleaving the phases: 1.2-1.3x over the sub-pixel form for 256-512 channels at 32-128 px,
1.13x for 640 at 16x16, 0.74x for 1280 at 8x8 (F(2x2): 0.76-0.9x everywhere).
Error: F(2x2)'s transforms use 0, +-1 and 1/2 (~5e-7 of the output's range in fp32); F(4x4)'s reach 8 and
1/24 (~6e-6, twice a direct conv's own float error here). fp32 only.

The rule (choose_tile) is that EPYC's. On an AVX-512 Xeon (2 cores, ORT 1.32, 2 threads) direct NCHWc convolution
is relatively faster: 256->128 channels at 256x256 ran 1.3-1.5x faster direct than by F(4x4), and the sub-pixel
upsamplers at 32x32 and 128x128 1.1-1.3x faster without F(4x4); `--conv-tactics measure` (sdrt.export.tactics) times
every form per shape on the machine instead (benchmarks/results/conv-tactics-xeon-sdxl-256px.md).

Costs: the transformed kernels are (m+2)^2/9 times the 3x3 weights they replace (memory), and TensorRT and
cuDNN pick Winograd themselves, so `sdrt build` refuses an export made with it.
"""

from __future__ import annotations

MIN_CHANNEL_PRODUCT = 256 * 128  # input x output channels; below it the transforms cost more than they save
MIN_AREA_F4 = 16 * 16  # input pixels at the opt size from which F(4x4, 3x3) wins
MIN_AREA_F2 = 4 * 4  # ... and F(2x2, 3x3)

# tile m -> (B^T, G, A^T) of F(m x m, 3x3) (Lavin & Gray 2015; interpolation points 0, +-1, +-2, inf for m = 4)
TRANSFORMS = {
    2: (
        [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]],
    ),
    4: (
        [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0],
         [0, 4, 0, -5, 0, 1]],
        [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6],
         [0, 0, 1]],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
    ),
}  # fmt: skip


def winograd_conv3x3(x, weight, bias, tile: int = 2, upsample: int = 1):
    """conv2d(x, weight, bias, padding=1) for a 3x3 kernel, by Winograd F(tile x tile, 3x3); any height and width.

    upsample=2: `weight` holds four kernels per output channel ([4*co, ci, 3, 3], channel 4*o + 2a + b; see
    sdrt.export.subpixel.phase_kernels_3x3) and the result interleaves them: pixel (2i+a, 2j+b) of channel o
    is kernel (a, b)'s output at (i, j). The output transform does the interleaving for free."""
    import torch
    import torch.nn.functional as F

    bt, g, at = (torch.tensor(m, dtype=torch.float64).to(x.dtype) for m in TRANSFORMS[tile])
    a, s = tile + 2, upsample  # input tile side, output pixels per input pixel
    n, c, h, w = x.shape
    co = weight.shape[0] // (s * s)
    # Transformed kernels U[xi, (phase, o), i], xi = a*row + col over the input tile (the weights come (o, phase)).
    weight = weight.reshape(co, s * s, c, 3, 3).transpose(0, 1).reshape(s * s * co, c, 3, 3)
    u = torch.einsum("au,oiuv,bv->aboi", g, weight, g).reshape(a * a, s * s * co, c)
    # Input tiles: a x a, stride `tile`, over x padded by 1 (by `tile` at the bottom/right: ceil(h / tile) tiles
    # down for any h; constant pads and sizes read from the result keep every axis dynamic in the trace).
    padded = F.pad(x, (1, tile, 1, tile)).reshape(n * c, 1, h + tile + 1, w + tile + 1)
    tile_kernels = torch.einsum("iu,jv->ijuv", bt, bt).reshape(a * a, 1, a, a)
    v = F.conv2d(padded, tile_kernels, stride=tile)  # [n*c, a*a, th, tw]
    th, tw = v.shape[-2], v.shape[-1]
    v = v.reshape(n, c, a * a, th * tw).permute(2, 1, 0, 3).reshape(a * a, c, n * th * tw)  # batch folded into columns
    m = torch.matmul(u, v)  # [a*a, s*s*co, n*tiles]: the batched GEMMs, each kernel read once
    # A^T M A for every tile at once: one small GEMM over the a*a products (kron(A^T, A^T), [tile^2, a^2]) gives the
    # tile's pixels (p, q) outermost, [(p, q, phase, o), n, tiles]; depth-to-space (DCR) then lays each tile's pixels
    # (and each upsampler's phases, a second depth-to-space) side by side. The rows of U come in (phase, o) order for
    # that. It replaced a transpose and a transposed convolution (graph revision 7): 1.1-1.2x per F(4x4) conv of one
    # image (512 channels, 64-128 px), the same at batch 2; SDXL's VAE decode 1.06x (benchmarks/results/
    # sdxl-vega-256px-data-movement.md).
    k = torch.einsum("pu,qv->pquv", at, at).reshape(tile * tile, a * a)
    y = torch.matmul(k, m.reshape(a * a, -1)).reshape(tile * tile * s * s, co, n, th * tw)
    if bias is not None:
        y = y + bias.reshape(1, co, 1, 1)
    y = y.reshape(tile * tile * s * s * co, n, th * tw).transpose(0, 1)  # the batch first (a copy only when n > 1)
    y = depth_to_space_dcr(y.reshape(n, tile * tile * s * s * co, th, tw), tile)
    if s > 1:
        y = depth_to_space_dcr(y, s)
    return y[:, :, : s * h, : s * w]


def depth_to_space_dcr(x, block: int):
    """ONNX DepthToSpace in DCR mode (channel (b1, b2, c) to pixel (h*block + b1, w*block + b2) of channel c): the
    order a Winograd output transform produces. torch's pixel_shuffle exports the CRD mode only."""
    return _DepthToSpaceDCR.apply(x, block)


def _depth_to_space_dcr(x, block: int):
    n, c, h, w = x.shape
    c //= block * block
    return x.reshape(n, block, block, c, h, w).permute(0, 3, 4, 1, 5, 2).reshape(n, c, h * block, w * block)


def _make_depth_to_space_function():
    import torch

    class DepthToSpaceDCR(torch.autograd.Function):
        """Exports as one DepthToSpace node (torchscript exporter); elsewhere (dynamo, eager) reshape-transpose-reshape."""

        @staticmethod
        def forward(ctx, x, block):
            return _depth_to_space_dcr(x, block)

        @staticmethod
        def symbolic(g, x, block):
            return g.op("DepthToSpace", x, blocksize_i=block, mode_s="DCR")

    return DepthToSpaceDCR


class LazyFunction:
    """A torch.autograd.Function made on first use: torch is imported only when an export runs (the runtime never
    imports it). Also sdrt.export.attention's."""

    def __init__(self, make):
        self.make, self.fn = make, None

    def apply(self, *args):
        self.fn = self.fn or self.make()
        return self.fn.apply(*args)


_DepthToSpaceDCR = LazyFunction(_make_depth_to_space_function)

def choose_tile(in_channels: int, out_channels: int, height: int, width: int) -> int:
    """The Winograd tile for a 3x3 conv whose input is height x width at the opt size; 0 keeps it direct."""
    if in_channels * out_channels < MIN_CHANNEL_PRODUCT:
        return 0
    area = height * width
    return 4 if area >= MIN_AREA_F4 else 2 if area >= MIN_AREA_F2 else 0


def is_plain_conv3x3(conv) -> bool:
    """A 3x3, stride 1, zero-padding 1, ungrouped, undilated conv: what winograd_conv3x3 (and the sub-pixel
    upsampler) computes."""
    return (conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1) and conv.dilation == (1, 1)
            and conv.groups == 1 and conv.padding_mode == "zeros")  # fmt: skip


def rewritable_conv(module) -> bool:
    """A plain nn.Conv2d (not a subclass, whose forward may do more) that is_plain_conv3x3."""
    import torch

    return type(module) is torch.nn.Conv2d and is_plain_conv3x3(module)


def winograd_forward(self, x, tile: int):
    """Conv2d.forward by Winograd."""
    return winograd_conv3x3(x, self.weight, self.bias, tile)
