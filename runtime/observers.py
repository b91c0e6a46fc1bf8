"""Per-call observers: timing, progress, previews and cancellation, attached to one call instead of patched in.

An observer sees each network call (`on_network`, with its time; the device loop reports the whole loop as one
UNet entry with its call count) and each finished step (`on_step`, with the batch, whose latents it may read
and whose plans it may drop between steps). Raising `sdrt.errors.Cancelled` from `on_step` stops the call.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from sdrt.errors import Cancelled


class Observer:
    """Base class: override what you need; the pipeline calls the rest as no-ops."""

    def on_network(self, network: str, seconds: float, calls: int = 1) -> None:
        """`network` ran `calls` times in `seconds` (the backend synchronised before and after)."""

    def on_step(self, batch, step: int) -> None:
        """Scheduler call `step` (0-based) of `batch.sched.num_calls` finished; `batch.x` holds its latents."""


def wants_timing(observers) -> bool:
    """Time network calls (and synchronise the device for it) only when an observer reads the times."""
    return any(type(o).on_network is not Observer.on_network for o in observers)


class StepCallback(Observer):
    """The Pipeline's `callback(step, timestep, latents)`: returning False cancels the call."""

    def __init__(self, callback: Callable[[int, float, np.ndarray], bool | None]):
        self.callback = callback

    def on_step(self, batch, step: int) -> None:
        if self.callback(step, float(batch.sched.timesteps[step]), batch.x) is False:
            raise Cancelled(f"cancelled by the step callback after step {step + 1} of {batch.sched.num_calls}")


class NetworkTimer(Observer):
    """Records (network, seconds, calls) for every network call: what `sdrt bench` reads."""

    def __init__(self):
        self.calls: list[tuple[str, float, int]] = []

    def on_network(self, network: str, seconds: float, calls: int = 1) -> None:
        self.calls.append((network, seconds, calls))

    def seconds(self, network: str) -> list[float]:
        """Per-call seconds of `network` (a device loop's total is spread evenly over its calls)."""
        return [s / n for name, s, n in self.calls if name == network for _ in range(n)]
