"""What this CPU is, where it changes what sdrt may reuse or must do: its model name, its vector extensions (the
keys of the optimised-graph and conv-tactic caches), and the int8 weight range its integer kernels can take."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

# The vector extensions that change what ORT's optimiser and MLAS pick (NCHWc block size, GEMM kernels).
ISA_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "asimd", "sve", "sve2", "i8mm", "bf16")  # fmt: skip
# x86 extensions whose int8 dot products accumulate in 32 bits (VPDPBUSD, AMX TMUL).
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@functools.lru_cache(maxsize=None)
def _cpuinfo_value(prefixes: tuple[str, ...]) -> str | None:
    """The value of the first /proc/cpuinfo line starting with one of `prefixes` (None where there is none): read
    once per process, since every session load keys its cache on it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(prefixes):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """The CPU model: graphs optimised at ORT_ENABLE_ALL may use layouts for this CPU's vector width."""
    return _cpuinfo_value(("model name",)) or platform.processor()


def cpu_isa() -> str:
    """The CPU's vector extensions among ISA_FLAGS, from /proc/cpuinfo ("" where it cannot be read)."""
    present = set((_cpuinfo_value(("flags", "Features")) or "").split())
    return " ".join(f for f in ISA_FLAGS if f in present)


def int8_weight_bits() -> int:
    """8, or 7 on an x86 CPU without VNNI or AMX. There ONNX Runtime's u8s8 kernels (MatMulIntegerToFloat,
    QLinearConv) multiply with VPMADDUBSW, which adds two u8 x s8 products into a saturating int16: 2 x 255 x 127
    overflows it and silently clips the sum (measured on an AMD EPYC, AVX2: 27% of the output range on a 3-layer
    test graph), 2 x 255 x 63 does not. ORT's quantisation guide says the same (reduce_range). ARM's dot products
    and VNNI accumulate in 32 bits."""
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return 8
    return 8 if set(cpu_isa().split()) & set(INT8_DOT_FLAGS) else 7
