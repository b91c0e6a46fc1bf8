"""Swap the forward of selected submodules for the duration of an export (the rewrites in subpixel, winograd)."""

from __future__ import annotations

import types
from contextlib import contextmanager


@contextmanager
def patched_forwards(modules, select, forward):
    """Within the block, every submodule of `modules` for which select(m) is true runs `forward(m, ...)`;
    yields how many. The instance attribute shadows the class's forward and is removed on the way out."""
    patched = [m for module in modules for m in module.modules() if select(m)]
    for m in patched:
        m.forward = types.MethodType(forward, m)
    try:
        yield len(patched)
    finally:
        for m in patched:
            del m.forward
