"""Euler (Karras et al. 2022, Algorithm 2 without churn), equal to diffusers' EulerDiscreteScheduler.

The sample lives at noise level sigma (x = x0 + sigma * eps); the UNet sees x / sqrt(sigma^2 + 1). With
dt = sigma_next - sigma, one step is x + dt * (x - x0) / sigma, which is linear in x and the output:
    prev = sample * prev_from_sample + output * prev_from_output
epsilon: (1, dt)
v:       (1 + dt sigma / (sigma^2 + 1), dt / sqrt(sigma^2 + 1))
Timesteps are fractional with 'linspace' spacing (the class default, even for SD 1.5's PNDM config) and with
Karras sigmas; they go to the UNet as float32. diffusers' timesteps and sigmas are float32; the coefficients
here are float64 from those float32 sigmas.
"""

from __future__ import annotations

import numpy as np

from sdrt.errors import ModelError
from sdrt.schedulers.base import (
    F32, Scheduler, Tables, exponential_sigmas, karras_sigmas, sigma_to_t, spaced_timesteps, train_sigmas,
)  # fmt: skip


class Euler(Scheduler):
    name = "euler"
    DEFAULTS = dict(  # EulerDiscreteScheduler.__init__, diffusers 0.42.1
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        prediction_type="epsilon", interpolation_type="linear", use_karras_sigmas=False, use_exponential_sigmas=False,
        use_beta_sigmas=False, sigma_min=None, sigma_max=None, timestep_spacing="linspace", timestep_type="discrete",
        steps_offset=0, rescale_betas_zero_snr=False, final_sigmas_type="zero",
    )  # fmt: skip
    coefficient_names = ("prev_from_sample", "prev_from_output")

    def __init__(self, config: dict, **overrides):
        super().__init__(config, **overrides)
        cfg = self.config
        if cfg.get("use_beta_sigmas"):
            raise ModelError(f"use_beta_sigmas is not supported by sdrt's {self.name}; use Karras or exponential sigmas")
        if cfg.get("use_karras_sigmas") and cfg.get("use_exponential_sigmas"):
            raise ModelError("use_karras_sigmas and use_exponential_sigmas exclude each other; set one")
        if cfg.get("interpolation_type", "linear") != "linear":
            raise ModelError(f"interpolation_type {cfg['interpolation_type']!r} is not supported; use 'linear'")
        if cfg.get("timestep_type") == "continuous" and cfg["prediction_type"] == "v_prediction":
            raise ModelError("timestep_type 'continuous' (log-sigma timesteps) is not supported; use 'discrete'")
        if cfg.get("final_sigmas_type", "zero") not in ("zero", "sigma_min"):
            raise ModelError(f"final_sigmas_type {cfg['final_sigmas_type']!r} is unsupported; use zero or sigma_min")
        if cfg.get("use_karras_sigmas"):
            self.name = f"{self.name}_karras"
        elif cfg.get("use_exponential_sigmas"):
            self.name = f"{self.name}_exponential"
        if cfg.get("rescale_betas_zero_snr"):
            self.alphas_cumprod[-1] = 2**-24  # as diffusers: a tiny alpha instead of zero, so sigma stays finite

    def _sigmas(self, n: int):
        """float32 timesteps [n] and sigmas [n + 1] (the last one 0 or sigma_min), as diffusers' set_timesteps."""
        cfg = self.config
        timesteps = spaced_timesteps(
            cfg["timestep_spacing"], n, self.num_train_timesteps, cfg["steps_offset"], round_linspace=False
        ).astype(F32)
        train = train_sigmas(self.alphas_cumprod)
        sigmas = np.interp(timesteps, np.arange(len(train)), train)
        if cfg.get("use_karras_sigmas"):
            sigmas = karras_sigmas(sigmas, n, cfg.get("sigma_min"), cfg.get("sigma_max"))
            timesteps = np.array([sigma_to_t(s, np.log(train)) for s in sigmas])
        elif cfg.get("use_exponential_sigmas"):
            sigmas = exponential_sigmas(sigmas, n, cfg.get("sigma_min"), cfg.get("sigma_max"))
            timesteps = np.array([sigma_to_t(s, np.log(train)) for s in sigmas])
        last = train[0] if cfg.get("final_sigmas_type") == "sigma_min" else 0.0
        return timesteps.astype(F32), np.concatenate([sigmas, [last]]).astype(F32)

    def _tables(self, n: int, start: int) -> Tables:
        timesteps, sigmas = self._sigmas(n)
        top = sigmas.max()
        init_sigma = top if self.config["timestep_spacing"] in ("linspace", "trailing") else np.sqrt(top * top + F32(1))
        s, s_next = sigmas[start:-1].astype(np.float64), sigmas[start + 1 :].astype(np.float64)
        return Tables(
            timesteps[start:],
            np.stack(self._rows(s, s_next), axis=1),
            1 / np.sqrt(s * s + 1),
            np.stack([np.ones_like(s), s], axis=1),
            float(init_sigma),
        )

    def _rows(self, s, s_next):
        dt = s_next - s
        if self.config["prediction_type"] == "epsilon":
            return np.ones_like(s), dt
        return 1 + dt * s / (s * s + 1), dt / np.sqrt(s * s + 1)

    def update(self, coefs, sample, model_output, history, noise=None, clip=None):
        """(prev_sample, ()) from one row of `coefficients`; arithmetic only. Euler keeps no history."""
        return sample * coefs[0] + model_output * coefs[1], ()
