"""numpy schedulers equal to diffusers' (0.42.1), built from a model's scheduler_config.json.

    s = make_scheduler("euler", config)      # or None: the config's own _class_name
    s.set_timesteps(30, strength=1.0)
    x = noise * s.init_noise_sigma
    for i in range(s.num_calls):
        out = unet(s.scale_model_input(x, i), s.timesteps[i])
        x = s.step(out, i, x, noise=None)     # euler_a needs fresh noise here

Each step is `update(coefficients[i], sample, output, history, noise)`: arithmetic on the arrays with scalars
precomputed on the host, so the same step runs on numpy, torch, CUDA graphs and C++ (see base.py). DDIM, PNDM,
Euler (a) and DPM++ 2M (SDE) write their update by hand; LMS, Heun, UniPC, DPM++ 2S a, DDPM, LCM, TCD and PNDM's
Runge-Kutta warm-up trace their rows from diffusers' step logic and share one generic update (see traced.py).
Heun, like PNDM, makes more UNet calls than steps (2n - 1): `num_calls` rows, one UNet call each.
"""

from __future__ import annotations

from sdrt.errors import InputError
from sdrt.schedulers.base import Scheduler
from sdrt.schedulers.ddim import DDIM
from sdrt.schedulers.ddpm import DDPM
from sdrt.schedulers.dpmpp_2m import DPMPP2M, DPMPP2MSDE
from sdrt.schedulers.dpmpp_2s import DPMPP2SA
from sdrt.schedulers.euler import Euler
from sdrt.schedulers.euler_ancestral import EulerAncestral
from sdrt.schedulers.heun import Heun
from sdrt.schedulers.lcm import LCM, TCD
from sdrt.schedulers.lms import LMS
from sdrt.schedulers.pndm import PNDM
from sdrt.schedulers.unipc import UniPC

DEFAULT_SCHEDULER = "pndm"

# sdrt name -> (class, config overrides). A `_karras` / `_exponential` name forces that sigma spacing (and the plain
# name forces neither): the name decides, whatever the model's config says, as A1111's sampler names do.
_PLAIN = {"use_karras_sigmas": False, "use_exponential_sigmas": False}
_KARRAS = {"use_karras_sigmas": True, "use_exponential_sigmas": False}
_EXPONENTIAL = {"use_karras_sigmas": False, "use_exponential_sigmas": True}
_DPM = {"solver_order": 2, "algorithm_type": "dpmsolver++"}
_DPM_SDE = {"solver_order": 2, "algorithm_type": "sde-dpmsolver++"}
_REGISTRY = {
    "ddim": (DDIM, {}),
    "pndm": (PNDM, {}),
    "euler": (Euler, _PLAIN),
    "euler_karras": (Euler, _KARRAS),
    "euler_exponential": (Euler, _EXPONENTIAL),
    "euler_a": (EulerAncestral, {}),
    "dpmpp_2m": (DPMPP2M, {**_PLAIN, **_DPM}),
    "dpmpp_2m_karras": (DPMPP2M, {**_KARRAS, **_DPM}),
    "dpmpp_2m_exponential": (DPMPP2M, {**_EXPONENTIAL, **_DPM}),
    "lms": (LMS, _PLAIN),
    "lms_karras": (LMS, _KARRAS),
    "lms_exponential": (LMS, _EXPONENTIAL),
    "heun": (Heun, _PLAIN),
    "heun_karras": (Heun, _KARRAS),
    "heun_exponential": (Heun, _EXPONENTIAL),
    "unipc": (UniPC, {**_PLAIN, "solver_type": "bh2", "predict_x0": True}),
    "unipc_karras": (UniPC, {**_KARRAS, "solver_type": "bh2", "predict_x0": True}),
    "unipc_exponential": (UniPC, {**_EXPONENTIAL, "solver_type": "bh2", "predict_x0": True}),
    "dpmpp_2m_sde": (DPMPP2MSDE, {**_PLAIN, **_DPM_SDE}),
    "dpmpp_2m_sde_karras": (DPMPP2MSDE, {**_KARRAS, **_DPM_SDE}),
    "dpmpp_2m_sde_exponential": (DPMPP2MSDE, {**_EXPONENTIAL, **_DPM_SDE}),
    "dpmpp_2s_a": (DPMPP2SA, {**_PLAIN, **_DPM_SDE}),
    "dpmpp_2s_a_karras": (DPMPP2SA, {**_KARRAS, **_DPM_SDE}),
    "dpmpp_2s_a_exponential": (DPMPP2SA, {**_EXPONENTIAL, **_DPM_SDE}),
    "ddpm": (DDPM, {}),
    "lcm": (LCM, {}),
    "tcd": (TCD, {}),
}
SCHEDULER_NAMES = tuple(_REGISTRY)

# sdrt name -> AUTOMATIC1111's sampler name. A1111 (1.9+) takes "<sampler> <schedule>" names such as "DPM++ 2M Karras"
# or "DPM++ 2M SDE Exponential" and splits off the schedule; the older names are the same strings. PNDM's PLMS was
# A1111's "PLMS"; TCD has no A1111 sampler ("TCD" is Forge's name).
A1111_NAMES = {
    "ddim": "DDIM",
    "pndm": "PLMS",
    "euler": "Euler",
    "euler_karras": "Euler Karras",
    "euler_exponential": "Euler Exponential",
    "euler_a": "Euler a",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "dpmpp_2m_exponential": "DPM++ 2M Exponential",
    "lms": "LMS",
    "lms_karras": "LMS Karras",
    "lms_exponential": "LMS Exponential",
    "heun": "Heun",
    "heun_karras": "Heun Karras",
    "heun_exponential": "Heun Exponential",
    "unipc": "UniPC",
    "unipc_karras": "UniPC Karras",
    "unipc_exponential": "UniPC Exponential",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_2m_sde_karras": "DPM++ 2M SDE Karras",
    "dpmpp_2m_sde_exponential": "DPM++ 2M SDE Exponential",
    "dpmpp_2s_a": "DPM++ 2S a",
    "dpmpp_2s_a_karras": "DPM++ 2S a Karras",
    "dpmpp_2s_a_exponential": "DPM++ 2S a Exponential",
    "ddpm": "DDPM",
    "lcm": "LCM",
    "tcd": "TCD",
}

# diffusers class name -> (class, overrides): a config's own class keeps all of its settings (Karras included).
_DIFFUSERS_CLASSES = {
    "DDIMScheduler": (DDIM, {}),
    "PNDMScheduler": (PNDM, {}),
    "EulerDiscreteScheduler": (Euler, {}),
    "EulerAncestralDiscreteScheduler": (EulerAncestral, {}),
    "DPMSolverMultistepScheduler": (DPMPP2M, {}),  # DPMPP2MSDE where algorithm_type is sde-dpmsolver++
    "DPMSolverSinglestepScheduler": (DPMPP2SA, {}),
    "LMSDiscreteScheduler": (LMS, {}),
    "HeunDiscreteScheduler": (Heun, {}),
    "UniPCMultistepScheduler": (UniPC, {}),
    "DDPMScheduler": (DDPM, {}),
    "LCMScheduler": (LCM, {}),
    "TCDScheduler": (TCD, {}),
}


def scheduler_defaults() -> dict[str, dict]:
    """{sdrt name: its diffusers class's default config} for each class, under the first sdrt name that uses it
    (dpmpp_2m_karras is dpmpp_2m's class); an export's manifest carries this so the C/C++ host resolves configs
    exactly as `make_scheduler` does."""
    out, seen = {}, set()
    for name, (cls, _) in _REGISTRY.items():
        if id(cls.DEFAULTS) not in seen:
            seen.add(id(cls.DEFAULTS))
            out[name] = dict(cls.DEFAULTS)
    return out


def make_scheduler(name: str | None, config: dict, timestep_spacing: str | None = None) -> Scheduler:
    """A scheduler from a scheduler_config.json dict, with diffusers' `from_config` semantics.

    name: one of SCHEDULER_NAMES, a diffusers class name (those in _DIFFUSERS_CLASSES: DDIM, PNDM, Euler, Euler
    ancestral, DPM-Solver multistep and singlestep, LMS, Heun, UniPC, DDPM, LCM, TCD), or None for the config's
    own `_class_name`. Keys the config lacks take the chosen class's diffusers defaults (Euler from SD 1.5's PNDM
    config spaces its timesteps 'linspace'). With name None and a class sdrt does not implement (KDPM2, DEIS,
    ...), or no `_class_name`, the config's betas and settings run with sdrt's default scheduler, PNDM.
    timestep_spacing: "leading", "linspace" or "trailing" in place of the config's (None: the config's, else the
    class's default), as diffusers' `from_config(config, timestep_spacing=...)`: few-step models (SD-Turbo, LCM-LoRA
    at 1-4 steps) want "trailing", which starts at the last training timestep.
    """
    if name is None:
        cls, overrides = _DIFFUSERS_CLASSES.get(config.get("_class_name"), _REGISTRY[DEFAULT_SCHEDULER])
    elif name in _REGISTRY:
        cls, overrides = _REGISTRY[name]
    elif name in _DIFFUSERS_CLASSES:
        cls, overrides = _DIFFUSERS_CLASSES[name]
    else:
        raise InputError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULER_NAMES)}")
    if cls is DPMPP2M and not overrides and config.get("algorithm_type") == "sde-dpmsolver++":
        cls = DPMPP2MSDE
    if timestep_spacing is not None:
        check_spacing_override(cls, timestep_spacing)
        config = {**config, "timestep_spacing": timestep_spacing}
    return cls(config, **overrides)


def check_spacing_override(cls, timestep_spacing) -> None:
    from sdrt.schedulers.base import SPACINGS

    if timestep_spacing not in SPACINGS:
        raise InputError(f"timestep_spacing {timestep_spacing!r} is not one of {', '.join(SPACINGS)}")
    if "timestep_spacing" not in cls.DEFAULTS:
        raise InputError(f"the {cls.name} scheduler has no timestep spacing to set (it always spaces its own); "
                         "leave timestep_spacing unset")


__all__ = ["make_scheduler", "scheduler_defaults", "SCHEDULER_NAMES", "A1111_NAMES", "DEFAULT_SCHEDULER", "Scheduler"]
