"""Saying what is known when a network's output is bad (NaN, inf, all black), instead of guessing fp16.

The inputs (guidance, latents, image) are checked finite before work (sdrt.inputs), so a NaN later comes from
a network or the scheduler; fp16 is named only when the network really runs in fp16.
"""

from __future__ import annotations

from sdrt.errors import BackendError


def network_precision(pipe, network: str) -> str | None:
    """'fp16'/'fp32' of `network` as the export records it, or the torch backend's dtype; None when unknown."""
    return pipe.backend.precision(network)


def precision_hint(pipe, network: str) -> str:
    """The fix to suggest: an fp16 network's overflow is the usual cause; otherwise say the weights or export."""
    precision = network_precision(pipe, network)
    if precision == "fp16" and network.startswith("vae") and getattr(pipe.facts, "force_upcast", False):
        return (f"; the {network} runs in fp16, but this model's VAE overflows in fp16 (its config sets force_upcast): "
                "re-export with this sdrt, which keeps it in fp32, or use an fp16-safe VAE")
    if precision == "fp16":
        return (f"; the {network} runs in fp16, which overflows in some models: re-export with --keep-fp32-op or "
                "without --fp16 (torch backend: dtype='fp32')")
    what = f"the {network} runs in {precision}" if precision else f"the {network}'s precision is unknown"
    return f"; {what}, so check the model's weights (a damaged or untrained checkpoint) or re-export it"


def nonfinite_error(pipe, network: str, what: str) -> BackendError:
    return BackendError(f"{what} hold NaN/inf: the {network} on the {pipe.backend.name} backend produced them"
                        + precision_hint(pipe, network))
