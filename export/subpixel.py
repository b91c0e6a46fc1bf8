"""Export-time rewrite of "nearest 2x upsample, then 3x3 convolution" into its sub-pixel form.

Stable Diffusion's UNet and VAE decoder upsample with `Upsample2D`: repeat every pixel 2x2, then a 3x3
convolution. On the repeated image most of that convolution's multiply-adds read the same input pixel twice,
so the same result is four 2x2 convolutions of the low-resolution input (one per output phase, with the 3x3
kernel's taps summed per phase) interleaved by a pixel shuffle: 16 instead of 36 multiply-adds per output
pixel and channel pair, and no upsampled copy of the input in memory. The weights are the checkpoint's own:
the 2x2 kernels are sums of its 3x3 taps, computed in the graph (ONNX Runtime and TensorRT fold them into
constants at load) so that shared-weight exports still read the diffusers safetensors. Exact up to float
summation order (measured 1e-6 of the output's range); export_model's parity check compares the rewritten
graph with stock PyTorch.

Phase (a, b) of output pixel (2i+a, 2j+b) reads low-resolution rows i-1+a..i+a and columns j-1+b..j+b; along
one axis, phase 0 takes taps (w0, w1+w2) and phase 1 takes (w0+w1, w2).

With `--winograd`, wide upsamplers compute the four phases as one Winograd conv instead (sdrt.export.winograd,
phase_kernels_3x3); sdrt.export.rewrites decides which.
"""

from __future__ import annotations

from sdrt.export.winograd import is_plain_conv3x3, winograd_conv3x3


def phase_taps(w, dim: int):
    """The two 2-tap kernels along `dim` of a 3-tap kernel: phase 0 (w0, w1+w2), phase 1 (w0+w1, w2)."""
    import torch

    w0, w1, w2 = w.unbind(dim)
    return torch.stack([w0, w1 + w2], dim), torch.stack([w0 + w1, w2], dim)


def upsample_conv_subpixel(x, weight, bias):
    """conv3x3(padding 1)(nearest_upsample_2x(x)) as four 2x2 convolutions of x, interleaved by pixel_shuffle."""
    import torch
    import torch.nn.functional as F

    phases = []
    for a, rows in enumerate(phase_taps(weight, 2)):
        for b, kernel in enumerate(phase_taps(rows, 3)):
            phases.append(F.conv2d(F.pad(x, (1 - b, b, 1 - a, a)), kernel, bias))
    y = torch.stack(phases, 2)  # [N, C, 4, H, W]: channel c*4 + 2a + b after the flatten, pixel_shuffle's order
    return F.pixel_shuffle(y.flatten(1, 2), 2)


def upsampler_conv(module):
    """The 3x3 convolution of a diffusers Upsample2D that this rewrite covers exactly, or None."""
    import torch

    if type(module).__name__ != "Upsample2D":
        return None
    if not getattr(module, "use_conv", False) or getattr(module, "use_conv_transpose", True):
        return None
    if not getattr(module, "interpolate", False) or getattr(module, "norm", None) is not None:
        return None
    conv = getattr(module, "conv", None) if module.name == "conv" else getattr(module, "Conv2d_0", None)
    return conv if isinstance(conv, torch.nn.Conv2d) and is_plain_conv3x3(conv) else None


def phase_kernels_3x3(weight):
    """The four phase kernels as 3x3 kernels of the low-resolution input, [4*co, ci, 3, 3], channel 4*o + 2a + b:
    phase (a, b)'s 2x2 kernel sits at rows a..a+1, columns b..b+1 (it reads rows i-1+a..i+a). One 3x3 conv with
    them is 36 multiply-adds per pixel against the four 2x2 convs' 16, which Winograd F(4x4, 3x3) makes 9."""
    import torch
    import torch.nn.functional as F

    kernels = [F.pad(kernel, (b, 1 - b, a, 1 - a)) for a, rows in enumerate(phase_taps(weight, 2))
               for b, kernel in enumerate(phase_taps(rows, 3))]  # fmt: skip
    return torch.stack(kernels, 1).flatten(0, 1)


def subpixel_forward(self, hidden_states, output_size=None, *args, tile: int = 0, **kwargs):
    """Upsample2D.forward in the sub-pixel form; tile 4 (or 2) computes it by Winograd (sdrt.export.winograd)."""
    if output_size is not None:  # an explicit target size (odd sizes): the stock path
        return type(self).forward(self, hidden_states, output_size, *args, **kwargs)
    conv = upsampler_conv(self)
    if tile:
        return winograd_conv3x3(hidden_states, phase_kernels_3x3(conv.weight), conv.bias, tile, upsample=2)
    return upsample_conv_subpixel(hidden_states, conv.weight, conv.bias)
