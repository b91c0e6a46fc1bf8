"""The export's graph rewrites, applied together: module forwards swapped for the duration of an export.

- sub-pixel upsampling (sdrt.export.subpixel): every rewritable Upsample2D;
- Winograd convolutions (sdrt.export.winograd): each 3x3 conv, and each sub-pixel upsampler, whose channels
  and input size at the export's opt size make it pay. A probe forward pass at the example inputs measures
  those sizes (they scale linearly with the image); an upsampler takes Winograd only at F(4x4), the tile that
  needs fewer multiply-adds than its four 2x2 convs.
With a TacticPicker (sdrt.export.tactics, `--conv-tactics measure`) the form of each conv and upsampler is the
one timed fastest on this machine at the opt size instead: direct or F(2x2)/F(4x4); stock, sub-pixel or
sub-pixel by F(4x4).
- GroupNorm's affine step as one BatchNormalization (sdrt.export.groupnorm), with the Winograd rewrite (CPU only).
"""

from __future__ import annotations

import types
from contextlib import contextmanager

from sdrt.export.groupnorm import group_norm_forward, rewritable_group_norm
from sdrt.export.subpixel import subpixel_forward, upsampler_conv
from sdrt.export.tactics import CONV_TACTICS, UPSAMPLER_TACTICS
from sdrt.export.winograd import choose_tile, rewritable_conv, winograd_forward


@contextmanager
def graph_rewrites(module, example_args, opt_scale: float = 1.0, subpixel: bool = True, winograd: bool = False,
                   picker=None, batch: int = 1, only=None):
    """Within the block `module` runs with the rewrites; yields {"subpixel_upsamplers": n, "winograd_convs": n}.

    example_args: inputs for the probe pass (winograd only); opt_scale: the opt size over the example's;
    picker: a sdrt.export.tactics.TacticPicker (with winograd) to time each shape at `batch` instead of the rule;
    only: with winograd, the modules (convs, upsamplers) that may take it, None for all (an int8 export: the layers
    its scheme keeps fp32, sdrt.export.int8.kept_modules)."""
    sizes = input_sizes(module, example_args, lambda m: rewritable_conv(m) or upsampler_conv(m) is not None) if winograd else {}
    plan = {}  # module -> forward(self, *args, **kwargs)

    def allowed(m) -> bool:  # may take Winograd (`only`)
        return only is None or m in only

    counts = {"subpixel_upsamplers": 0, "winograd_convs": 0}
    upsampler_convs = set()
    for m in module.modules():
        conv = upsampler_conv(m) if subpixel else None
        if conv is None:
            continue
        upsampler_convs.add(conv)
        tile = _tile(conv, sizes.get(m), opt_scale)
        tile = tile if tile == 4 and allowed(m) else 0
        if picker is not None and sizes.get(m) is not None and allowed(m):
            rule = {4: "subpixel_f4", 0: "subpixel"}[tile]
            tile = UPSAMPLER_TACTICS[picker.pick("upsampler", *_shape(conv, sizes[m], opt_scale, batch), rule)]
            if tile is None:
                continue  # stock upsample + conv measured fastest; its conv stays direct
        plan[m] = lambda self, *a, tile=tile, **k: subpixel_forward(self, *a, tile=tile, **k)
        counts["subpixel_upsamplers"] += 1
        counts["winograd_convs"] += bool(tile)
    for m in module.modules():
        if m in upsampler_convs or not (winograd and rewritable_conv(m) and allowed(m)):
            continue  # an upsampler's conv: rewritten with it, or left direct
        tile = _tile(m, sizes.get(m), opt_scale)
        if picker is not None and sizes.get(m) is not None:
            rule = {0: "direct", 2: "f2", 4: "f4"}[tile]
            tile = CONV_TACTICS[picker.pick("conv", *_shape(m, sizes[m], opt_scale, batch), rule)]
        if tile:
            plan[m] = lambda self, x, tile=tile: winograd_forward(self, x, tile)
            counts["winograd_convs"] += 1
    for m in module.modules() if winograd and only is None else ():  # an int8 network's GroupNorms stay as benchmarked
        if rewritable_group_norm(m):
            plan[m] = group_norm_forward
    for m, forward in plan.items():  # the instance attribute shadows the class's forward
        m.forward = types.MethodType(forward, m)
    try:
        yield counts
    finally:
        for m in plan:
            del m.forward


def _tile(conv, size, opt_scale: float) -> int:
    if size is None:  # not run by the probe (or no probe): leave it be
        return 0
    h, w = size
    return choose_tile(conv.in_channels, conv.out_channels, round(h * opt_scale), round(w * opt_scale))


def _shape(conv, size, opt_scale: float, batch: int) -> tuple[int, int, int, int, int]:
    h, w = size
    return conv.in_channels, conv.out_channels, batch, round(h * opt_scale), round(w * opt_scale)


def input_sizes(module, example_args, select) -> dict:
    """{submodule: (height, width) of its first input} for each selected submodule `module(*example_args)` runs."""
    import torch

    sizes, handles = {}, []

    def record(sub, args):  # returns None: a pre-hook's return value would replace the inputs
        sizes.setdefault(sub, tuple(args[0].shape[-2:]))

    for m in module.modules():
        if select(m):
            handles.append(m.register_forward_pre_hook(record))
    try:
        with torch.no_grad():
            module(*example_args)
    finally:
        for handle in handles:
            handle.remove()
    return sizes
