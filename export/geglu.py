"""Export-time rewrite of diffusers' GEGLU as two MatMuls, for ONNX Runtime on CPUs (the int8 export's UNet).

GEGLU is one Linear to twice the feed-forward width, then chunk(2) and h * gelu(gate): in ONNX a MatMul + Add and two
Slices that copy the halves out of the big activation (2 x 1024 tokens x 2560 floats per block at SD 1.5's 256 px:
~22 ms of a 0.68 s int8 UNet call in ORT's profile, benchmarks/results/int8-unet-profile.md). Two Linears on the
weight's halves give the same numbers with no copy (the halves are constant-folded into two stored weights at export;
per-output-channel int8 scales are the same per half, so the quantised form is the same too). Node scopes stay under
the GEGLU module (.../ff/net.0/), so the int8 keep rules (sdrt.export.int8.KEEP_RULES) read them as before.
"""

from __future__ import annotations

import types
from contextlib import contextmanager


def splittable(m) -> bool:
    """A diffusers GEGLU whose projection is a plain nn.Linear (a LoRA-slotted one keeps the stock forward)."""
    import torch

    try:
        from diffusers.models.activations import GEGLU
    except ImportError:  # pragma: no cover - export always has diffusers
        return False
    return type(m) is GEGLU and type(m.proj) is torch.nn.Linear


def split_forward(self, hidden_states, *args, **kwargs):
    """GEGLU.forward as two Linears on the halves of proj's weight (and bias)."""
    import torch.nn.functional as F

    w, b = self.proj.weight, self.proj.bias
    half = w.shape[0] // 2
    h = F.linear(hidden_states, w[:half], None if b is None else b[:half])
    gate = F.linear(hidden_states, w[half:], None if b is None else b[half:])
    return h * self.gelu(gate)


@contextmanager
def split_geglu(module, enabled: bool = True):
    """Within the block, every splittable GEGLU of `module` runs (and exports) as two MatMuls; yields how many."""
    found = [m for m in module.modules() if enabled and splittable(m)]
    for m in found:
        m.forward = types.MethodType(split_forward, m)
    try:
        yield len(found)
    finally:
        for m in found:
            del m.forward
