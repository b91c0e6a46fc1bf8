"""Export-time rewrite of GroupNorm's per-channel affine into one BatchNormalization node, for ONNX Runtime on CPUs.

torch exports nn.GroupNorm as Reshape -> InstanceNormalization (per group) -> Reshape -> Mul (gamma) -> Add (beta):
the affine step is two passes over the activation, each as large as the tensor (at SDXL's VAE's 256x256, 128-256
channels: 33-67 MB). BatchNormalization in inference mode with mean 0, variance 1 and epsilon 0 is exactly
x * gamma + beta (sqrt(1 + 0) = 1), one pass. Applied with `--winograd` only (the CPU-only export): ORT's CUDA
GroupNorm fusion (sdrt.backends.onnx_sessions.fuse_for_cuda) matches the stock pattern.
"""

from __future__ import annotations


def rewritable_group_norm(module) -> bool:
    """A plain affine nn.GroupNorm (not a subclass, whose forward may do more)."""
    import torch

    return type(module) is torch.nn.GroupNorm and module.affine


def group_norm_forward(self, x):
    """nn.GroupNorm.forward with the affine step as one batch_norm (mean 0, variance 1, epsilon 0)."""
    import torch
    import torch.nn.functional as F

    y = F.group_norm(x, self.num_groups, None, None, self.eps)
    c = self.num_channels
    zeros, ones = torch.zeros(c, dtype=x.dtype), torch.ones(c, dtype=x.dtype)
    return F.batch_norm(y, zeros, ones, self.weight, self.bias, False, 0.0, 0.0)
