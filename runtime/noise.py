"""torch's CPU normal stream in numpy: the same latents and step noise as diffusers for the same seed, without torch.

`TorchCPUGenerator(seed).randn(shape)` returns what
`torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))` returns, and successive calls
continue the stream as successive torch.randn calls on one generator do. What torch does (ATen's
CPUGeneratorImpl, DistributionTemplates.h and DistributionsHelper.h, read for torch 2.13):

- The engine is mt19937 seeded with init_genrand(seed & 0xffffffff); manual_seed also drops the cached
  normal value.
- numel >= 16: a float uniform per element, `(word & 0xffffff) * 2**-24` (the low 24 bits of one 32-bit
  word), then Box-Muller in blocks of 16 (u1 = 1 - data[j], u2 = data[j + 8], j < 8; cos into j, sin into
  j + 8). If numel % 16 != 0 the last 16 outputs are recomputed from 16 fresh uniforms.
- numel < 16: one double normal at a time from two 53-bit uniforms (two words each, the first one high);
  each Box-Muller pair returns the cos value and caches the sin value in the generator for the next call.

The Box-Muller arithmetic depends on the CPU kernel torch dispatches to. x86 CPUs with AVX2 (and AVX512
ones: normal_stub is registered without an AVX512 kernel, so they fall back to AVX2) use avx_mathfun's
Cephes log/sincos in float32 with fused multiply-adds, which `_box_muller_avx2` replays operation by
operation: bit-exact against torch 2.13 on an AVX2 CPU and torch 2.11 on an AVX512 one. The DEFAULT kernel
(x86 without AVX2; presumably ARM too, not checked) calls libm's float logf/cosf/sinf, which
`_box_muller_libm` computes in float64 and rounds: within 1 ulp of torch, <= 2.4e-7 abs.
The two kernels differ from each other by up to ~2e-6, so the kernel is picked the way torch picks it.
"""

from __future__ import annotations

import math
import os
import platform

import numpy as np

from sdrt.errors import InputError

_F32 = np.float32
_N = 624  # mt19937 state words


def torch_cpu_capability() -> str:
    """The ATen CPU kernel torch would use on this machine: "avx512", "avx2" or "default".

    Mirrors ATen's compute_cpu_capability: the ATEN_CPU_CAPABILITY variable wins, then AVX512 (VL, BW, DQ)
    with FMA, then AVX2 with FMA. For randn "avx512" runs the AVX2 kernel.
    """
    env = os.environ.get("ATEN_CPU_CAPABILITY", "").lower()
    if env in ("default", "avx2", "avx512"):
        return env
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return "default"
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # numpy < 2
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as features
        except ImportError:
            return "avx2"
    if features.get("AVX512_SKX") and features.get("FMA3"):
        return "avx512"
    if features.get("AVX2") and features.get("FMA3"):
        return "avx2"
    return "default"


def _init_genrand(seed32: int) -> np.ndarray:
    key = np.empty(_N, np.uint32)
    x = seed32
    key[0] = x
    for i in range(1, _N):
        x = (1812433253 * (x ^ (x >> 30)) + i) & 0xFFFFFFFF
        key[i] = x
    return key


def _fma(a, b, c) -> np.ndarray:
    # a*b is exact in float64 for float32 inputs; the sum rounds twice (float64, then float32), which differs
    # from a true fused multiply-add only when the float64 sum lands exactly on a float32 midpoint.
    return (np.asarray(a, np.float64) * np.asarray(b, np.float64) + np.asarray(c, np.float64)).astype(_F32)


_LOG_P = [7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
          -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1]


def _log256_ps(x: np.ndarray) -> np.ndarray:
    """avx_mathfun's log256_ps for x in (0, 1], as GCC compiles it (mul+add contracted into FMA)."""
    bits = x.view(np.uint32)
    e = ((bits >> 23).astype(np.int32) - 127).astype(_F32) + _F32(1)
    x = ((bits & np.uint32(0x807FFFFF)) | np.uint32(0x3F000000)).view(_F32)  # mantissa in [0.5, 1)
    small = x < _F32(0.707106781186547524)
    e = e - small.astype(_F32)
    x = (x - _F32(1)) + np.where(small, x, _F32(0))
    z = x * x
    y = np.full_like(x, _F32(_LOG_P[0]))
    for p in _LOG_P[1:]:
        y = _fma(y, x, _F32(p))
    y = _fma(y * x, z, e * _F32(-2.12194440e-4))
    y = _fma(-z, _F32(0.5), y)
    return _fma(e, _F32(0.693359375), x + y)


def _sincos256_ps(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """avx_mathfun's sincos256_ps for x >= 0, as GCC compiles it."""
    j = (x * _F32(1.27323954473516)).astype(np.int32)  # 4/pi, truncated
    j = (j + 1) & ~1
    y = j.astype(_F32)
    for dp in (-0.78515625, -2.4187564849853515625e-4, -3.77489497744594108e-8):
        x = _fma(y, _F32(dp), x)
    z = x * x
    c = _fma(_fma(np.full_like(x, _F32(2.443315711809948e-5)), z, _F32(-1.388731625493765e-3)), z,
             _F32(4.166664568298827e-2))
    c = _fma(c * z, z, -(z * _F32(0.5))) + _F32(1)
    s = _fma(np.full_like(x, _F32(-1.9515295891e-4)), z, _F32(8.3321608736e-3))
    s = _fma(s, z, _F32(-1.6666654611e-1))
    s = _fma(s * z, x, x)
    first = (j & 2) == 0
    sin, cos = np.where(first, s, c), np.where(first, c, s)
    return np.where((j & 4) != 0, -sin, sin), np.where((~(j - 2) & 4) != 0, -cos, cos)


def _box_muller_avx2(u1: np.ndarray, u2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    radius = np.sqrt(_F32(-2) * _log256_ps(u1))
    sin, cos = _sincos256_ps(_F32(2 * math.pi) * u2)
    return radius * cos, radius * sin


def _box_muller_libm(u1: np.ndarray, u2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    radius = np.sqrt(_F32(-2) * np.log(u1.astype(np.float64)).astype(_F32))
    theta = (2 * math.pi * u2.astype(np.float64)).astype(_F32).astype(np.float64)  # float theta, double 2*pi
    return radius * np.cos(theta).astype(_F32), radius * np.sin(theta).astype(_F32)


class TorchCPUGenerator:
    """A numpy twin of `torch.Generator("cpu").manual_seed(seed)` for `torch.randn`.

    cpu_capability: the ATen kernel whose arithmetic to follow ("avx2", "avx512" or "default"); None picks
    what torch would pick on this machine (see `torch_cpu_capability`).
    """

    def __init__(self, seed: int, cpu_capability: str | None = None):
        capability = cpu_capability or torch_cpu_capability()
        if capability not in ("avx2", "avx512", "default"):
            raise InputError(f"cpu_capability {capability!r} is not one of 'avx2', 'avx512', 'default'")
        self.cpu_capability = capability
        self._box_muller = _box_muller_libm if capability == "default" else _box_muller_avx2
        self._mt = np.random.MT19937()
        self.manual_seed(seed)

    def manual_seed(self, seed: int) -> "TorchCPUGenerator":
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
            raise InputError(f"seed {seed!r} is not an integer")
        seed = int(seed)
        if not -(2**63) <= seed < 2**64:
            raise InputError(f"seed {seed} is outside torch's range [-2**63, 2**64)")
        self.seed = seed % 2**64
        self._mt.state = {"bit_generator": "MT19937", "state": {"key": _init_genrand(seed & 0xFFFFFFFF), "pos": _N}}
        self._next_normal: float | None = None
        return self

    def get_state(self) -> dict:
        """A copy of the whole state: mt19937 words and position, and the cached normal of the small path."""
        mt = self._mt.state["state"]
        return {"key": mt["key"].copy(), "pos": int(mt["pos"]), "next_normal": self._next_normal, "seed": self.seed}

    def set_state(self, state: dict) -> None:
        key = np.array(state["key"], np.uint32)
        self._mt.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": int(state["pos"])}}
        self._next_normal = state["next_normal"]
        self.seed = state["seed"]

    def _words(self, n: int) -> np.ndarray:
        return self._mt.random_raw(n).astype(np.uint32)

    def _uniform24(self, n: int) -> np.ndarray:
        return (self._words(n) & np.uint32(0xFFFFFF)).astype(_F32) * _F32(2.0**-24)

    def _fill16(self, u: np.ndarray) -> np.ndarray:
        blocks = u.reshape(-1, 16)
        cos, sin = self._box_muller(_F32(1) - blocks[:, :8], blocks[:, 8:])
        return np.concatenate([cos, sin], axis=1).reshape(-1)

    def _normal_double(self) -> float:
        if self._next_normal is not None:
            value, self._next_normal = self._next_normal, None
            return value
        w = [int(x) for x in self._words(4)]
        # random64 = first word << 32 | second word; a double uniform keeps its low 53 bits.
        u1, u2 = ((((hi & 0x1FFFFF) << 32) | lo) * 2.0**-53 for hi, lo in ((w[0], w[1]), (w[2], w[3])))
        radius = math.sqrt(-2.0 * math.log1p(-u2))
        theta = 2.0 * math.pi * u1
        self._next_normal = radius * math.sin(theta)
        return radius * math.cos(theta)

    def randn(self, shape) -> np.ndarray:
        """float32 standard normals of `shape`, the next ones in the stream."""
        shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
        n = math.prod(shape)
        if n < 16:
            return np.array([self._normal_double() for _ in range(n)], np.float32).reshape(shape)
        # Every uniform is drawn into the output first; when n is not a multiple of 16, the last 16 outputs
        # are then redone from 16 fresh uniforms (the n % 16 drawn before are wasted, as in torch).
        out = self._uniform24(n)
        full = n - n % 16
        out[:full] = self._fill16(out[:full])
        if n % 16:
            out[n - 16:] = self._fill16(self._uniform24(16))
        return out.reshape(shape)
