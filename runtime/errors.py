"""sdrt's errors: each names the bad value and how to fix it.

They subclass ValueError so callers that already catch ValueError keep working; the CLI prints
their message as one line instead of a traceback.
"""


class SdrtError(ValueError):
    """Base class of every error sdrt raises on purpose."""


class ModelError(SdrtError):
    """A model folder, export or checkpoint that sdrt cannot use as it is."""


class InputError(SdrtError):
    """A generation argument (size, steps, strength, image, ...) that is out of range."""


class BackendError(SdrtError):
    """A backend that is not installed here, or a network that produced bad output (NaN, all black)."""


class Cancelled(SdrtError):
    """A step callback asked to stop; no image was made."""


TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def torch_install_hint(extra: str = "torch") -> str:
    """How to install an extra that needs torch without pulling the multi-GB CUDA wheel by accident; every message
    that advises installing torch ends with this."""
    return (f"pip install torch --index-url {TORCH_CPU_INDEX} (the CPU build; pick a CUDA build at pytorch.org for a "
            f"GPU), then pip install 'sdrt[{extra}]'")
