"""Euler ancestral, equal to diffusers' EulerAncestralDiscreteScheduler given the same noise.

Each step goes down to sigma_down with an Euler step, then adds fresh noise of std sigma_up, where
sigma_up = sqrt(s_to^2 (s^2 - s_to^2) / s^2) and sigma_down = sqrt(s_to^2 - sigma_up^2):
    prev = sample * prev_from_sample + output * prev_from_output + noise * prev_from_noise
with dt = sigma_down - sigma, the first two columns are Euler's, and prev_from_noise = sigma_up.
The caller draws the noise (diffusers draws it with randn_tensor after the step; seed parity is the caller's).
"""

from __future__ import annotations

import numpy as np

from sdrt.errors import InputError
from sdrt.schedulers.euler import Euler


class EulerAncestral(Euler):
    name = "euler_a"
    DEFAULTS = dict(  # EulerAncestralDiscreteScheduler.__init__, diffusers 0.42.1
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        prediction_type="epsilon", timestep_spacing="linspace", steps_offset=0, rescale_betas_zero_snr=False,
    )  # fmt: skip
    coefficient_names = ("prev_from_sample", "prev_from_output", "prev_from_noise")
    needs_noise = True

    def _rows(self, s, s_next):
        up = np.sqrt(s_next**2 * (s**2 - s_next**2) / s**2)
        down = np.sqrt(np.maximum(s_next**2 - up**2, 0.0))
        return *super()._rows(s, down), up

    def update(self, coefs, sample, model_output, history, noise=None, clip=None):
        """(prev_sample, ()) from one row of `coefficients` and this step's noise; arithmetic only."""
        if noise is None:
            raise InputError("euler_a adds fresh noise each step; pass noise shaped like the sample")
        return sample * coefs[0] + model_output * coefs[1] + noise * coefs[2], ()
