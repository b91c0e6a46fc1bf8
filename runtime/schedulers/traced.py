"""Schedulers whose step is a general linear map, its coefficients traced from diffusers' own step logic.

Every sdrt scheduler step is linear in the arrays it touches (the sample, the model output, the scheduler's
history, this call's noise), except for one optional clamp of the predicted x0 (clip_sample). So a step can be
written once, as diffusers writes it, on symbolic arrays (`Sym`: a float64 coefficient vector over those
inputs), and run at set_timesteps for every call. What comes out is one row per call:

    base = [sample, output, history[0], ..., history[H-1], (noise)]          (m arrays)
    x0   = sum_k base[k] * row[k]                 then clamped to +-clip_sample_range if clip_sample
    out_j = sum_k [*base, x0][k] * row[m + j (m+1) + k]     for out = (prev, new_history[0..H-1])

`update` is the same few lines for every traced scheduler (numpy, torch, a CUDA graph, the C++ host), and the
emulation that fills the table reads like diffusers' step, which keeps parity reviewable: LMS, Heun, UniPC,
DPM++ 2S a and PNDM's Runge-Kutta warm-up use it. Host-side state that decides *which* formula runs (a step
counter, how many model outputs are stored, whether a saved sample exists) is ordinary Python state of the
emulation; only array values are symbolic.
"""

from __future__ import annotations

import numpy as np

from sdrt.schedulers.base import clamp


class Sym:
    """A linear combination of the step's input arrays, as a float64 coefficient vector."""

    __slots__ = ("v",)
    __array_ufunc__ = None  # numpy scalars defer to Sym's reflected operators

    def __init__(self, v):
        self.v = v

    def __add__(self, other):
        if isinstance(other, Sym):
            return Sym(self.v + other.v)
        if other == 0:
            return self
        raise TypeError("only Sym + Sym (or + 0) keeps a step linear")

    __radd__ = __add__

    def __sub__(self, other):
        return self + (-1.0) * other

    def __rsub__(self, other):
        return (-1.0) * self + other

    def __neg__(self):
        return Sym(-self.v)

    def __mul__(self, scalar):
        if isinstance(scalar, Sym):
            raise TypeError("Sym * Sym is not linear")
        return Sym(self.v * float(scalar))

    __rmul__ = __mul__

    def __truediv__(self, scalar):
        return Sym(self.v / float(scalar))


class Tracer:
    """The symbolic inputs of one call, and what the emulation makes of them."""

    def __init__(self, m: int, history_size: int, noise: bool, clip: bool = False):
        self.m = m
        self.clip = clip
        eye = np.eye(m + 1)
        self.sample = Sym(eye[0])
        self.output = Sym(eye[1])
        self.history = [Sym(eye[2 + k]) for k in range(history_size)]
        self.noise = Sym(eye[2 + history_size]) if noise else None
        self._x0_basis = Sym(eye[m])
        self.x0_expr = None

    def pred_x0(self, expr: Sym) -> Sym:
        """The predicted original sample: its own clamped array when the config clips it, else the expression
        itself (folded into the outputs' coefficients, which avoids a float32 round trip through x0)."""
        return self.x0(expr) if self.clip else expr

    def x0(self, expr: Sym) -> Sym:
        """Declare the predicted original sample as an array of its own (the one clip_sample clamps)."""
        if self.x0_expr is not None:
            raise RuntimeError("one x0 per call")
        if expr.v[self.m] != 0:
            raise RuntimeError("x0 must be a combination of the base inputs")
        self.x0_expr = expr
        return self._x0_basis

    def zero(self) -> Sym:
        return Sym(np.zeros(self.m + 1))

    def row(self, prev: Sym, new_history) -> np.ndarray:
        """Flatten one call: the x0 stage over the base inputs, then each output over base + x0."""
        x0 = self.x0_expr.v[: self.m] if self.x0_expr is not None else np.zeros(self.m)
        outs = [prev, *(h if h is not None else self.zero() for h in new_history)]
        return np.concatenate([x0, *(o.v for o in outs)])


def _combine(coefs, offset: int, arrays):
    """sum_k arrays[k] * coefs[offset + k]; exact-zero Python-float coefficients are skipped (same result)."""
    acc = None
    for k, a in enumerate(arrays):
        c = coefs[offset + k]
        if type(c) is float and c == 0.0:
            continue
        term = a * c
        acc = term if acc is None else acc + term
    return arrays[0] * 0.0 if acc is None else acc


class TracedStep:
    """Mixin: set_timesteps' rows come from `_trace` (see the module docstring); `update` is the generic map.

    Subclasses set `history_size` and `needs_noise`, and build each call's row in `_tables` with a fresh
    `self._tracer()`. `_clip_range` is the clamp bound when the config clips x0, else None.
    """

    history_size = 0
    needs_noise = False

    @property
    def _clip_range(self):
        cfg = self.config
        return float(cfg.get("clip_sample_range", 1.0)) if cfg.get("clip_sample") else None

    def _tracer(self) -> Tracer:
        m = 2 + self.history_size + (1 if self.needs_noise else 0)
        return Tracer(m, self.history_size, self.needs_noise, self._clip_range is not None)

    @property
    def coefficient_names(self):
        base = ["sample", "output", *(f"h{k}" for k in range(self.history_size))] + (["noise"] if self.needs_noise else [])
        names = [f"x0_from_{b}" for b in base]
        for out in ["prev", *(f"h{k}" for k in range(self.history_size))]:
            names += [f"{out}_from_{b}" for b in [*base, "x0"]]
        return tuple(names)

    def update(self, coefs, sample, model_output, history, noise=None, clip=None):
        """(prev_sample, new_history) from one row of `coefficients`: the generic traced map, `+` and `*` only."""
        base = [sample, model_output, *history]
        if self.needs_noise:
            if noise is None:
                from sdrt.errors import InputError

                raise InputError(f"{self.name} adds fresh noise each step; pass noise shaped like the sample")
            base.append(noise)
        m = len(base)
        x0 = _combine(coefs, 0, base)
        r = self._clip_range
        if r is not None:
            x0 = clamp(x0, -r, r, clip)
        arrays = base + [x0]
        outs = [_combine(coefs, m + j * (m + 1), arrays) for j in range(self.history_size + 1)]
        return outs[0], tuple(outs[1:])
