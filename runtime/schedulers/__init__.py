"""numpy schedulers equal to diffusers' (0.42.1), built from a model's scheduler_config.json.

    s = make_scheduler("euler", config)      # or None: the config's own _class_name
    s.set_timesteps(30, strength=1.0)
    x = noise * s.init_noise_sigma
    for i in range(s.num_calls):
        out = unet(s.scale_model_input(x, i), s.timesteps[i])
        x = s.step(out, i, x, noise=None)     # euler_a needs fresh noise here

Each step is `update(coefficients[i], sample, output, history, noise)`: arithmetic on the arrays with scalars
precomputed on the host, so the same step runs on numpy, torch, CUDA graphs and C++ (see base.py).
"""

from __future__ import annotations

from sdrt.errors import InputError
from sdrt.schedulers.base import Scheduler
from sdrt.schedulers.ddim import DDIM
from sdrt.schedulers.dpmpp_2m import DPMPP2M
from sdrt.schedulers.euler import Euler
from sdrt.schedulers.euler_ancestral import EulerAncestral
from sdrt.schedulers.pndm import PNDM

DEFAULT_SCHEDULER = "pndm"

# sdrt name -> (class, config overrides). The two DPM names say whether Karras sigmas are used.
_REGISTRY = {
    "ddim": (DDIM, {}),
    "pndm": (PNDM, {}),
    "euler": (Euler, {}),
    "euler_a": (EulerAncestral, {}),
    "dpmpp_2m": (DPMPP2M, {"use_karras_sigmas": False, "solver_order": 2, "algorithm_type": "dpmsolver++"}),
    "dpmpp_2m_karras": (DPMPP2M, {"use_karras_sigmas": True, "solver_order": 2, "algorithm_type": "dpmsolver++"}),
}
SCHEDULER_NAMES = tuple(_REGISTRY)

# diffusers class name -> (class, overrides): a config's own class keeps all of its settings (Karras included).
_DIFFUSERS_CLASSES = {
    "DDIMScheduler": (DDIM, {}),
    "PNDMScheduler": (PNDM, {}),
    "EulerDiscreteScheduler": (Euler, {}),
    "EulerAncestralDiscreteScheduler": (EulerAncestral, {}),
    "DPMSolverMultistepScheduler": (DPMPP2M, {}),
}


def scheduler_defaults() -> dict[str, dict]:
    """{sdrt name: its diffusers class's default config} for each class (dpmpp_2m_karras is dpmpp_2m's class); an
    export's manifest carries this so the C/C++ host resolves configs exactly as `make_scheduler` does."""
    return {name: dict(cls.DEFAULTS) for name, (cls, _) in _REGISTRY.items() if name != "dpmpp_2m_karras"}


def make_scheduler(name: str | None, config: dict) -> Scheduler:
    """A scheduler from a scheduler_config.json dict, with diffusers' `from_config` semantics.

    name: one of SCHEDULER_NAMES, a diffusers class name (DDIMScheduler, PNDMScheduler, EulerDiscreteScheduler,
    EulerAncestralDiscreteScheduler, DPMSolverMultistepScheduler), or None for the config's own `_class_name`.
    Keys the config lacks take the chosen class's diffusers defaults (Euler from SD 1.5's PNDM config spaces its
    timesteps 'linspace'). With name None and a class sdrt does not implement (LMS, UniPC, ...), or no
    `_class_name`, the config's betas and settings run with sdrt's default scheduler, PNDM.
    """
    if name is None:
        cls, overrides = _DIFFUSERS_CLASSES.get(config.get("_class_name"), _REGISTRY[DEFAULT_SCHEDULER])
    elif name in _REGISTRY:
        cls, overrides = _REGISTRY[name]
    elif name in _DIFFUSERS_CLASSES:
        cls, overrides = _DIFFUSERS_CLASSES[name]
    else:
        raise InputError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULER_NAMES)}")
    return cls(config, **overrides)


__all__ = ["make_scheduler", "scheduler_defaults", "SCHEDULER_NAMES", "DEFAULT_SCHEDULER", "Scheduler"]
