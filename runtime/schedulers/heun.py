"""Heun's method (Karras et al. 2022, Algorithm 1 without churn), equal to diffusers' HeunDiscreteScheduler.

Each step but the last calls the UNet twice: an Euler step from sigma to sigma_next, then a second evaluation
at sigma_next whose derivative is averaged with the first; the last step (to sigma 0) is Euler alone. So n steps
take 2n - 1 UNet calls, one table row each, timesteps [t0, t1, t1, t2, t2, ...] (diffusers' order 2; img2img
starts at call 2 * t_start). Timesteps, sigmas, Karras and exponential sigmas are Euler's.
    first call  (even): d = (x - x0) / sigma;        prev = x + d (sigma_next - sigma);  history = (d, x)
    second call (odd):  d' = (x - x0') / sigma_next;  prev = x_saved + (d + d') / 2 * dt
Traced (see traced.py); clip_sample clamps x0 as diffusers does.
"""

from __future__ import annotations

import numpy as np

from sdrt.schedulers.base import F32, Tables
from sdrt.schedulers.euler import Euler
from sdrt.schedulers.traced import TracedStep


class Heun(TracedStep, Euler):
    name = "heun"
    order = calls_per_step = 2  # diffusers' order: two UNet calls per step (a denoising_start hand-over keeps them together)
    DEFAULTS = dict(  # HeunDiscreteScheduler.__init__, diffusers 0.42.1
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="linear", trained_betas=None,
        prediction_type="epsilon", use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
        clip_sample=False, clip_sample_range=1.0, timestep_spacing="linspace", steps_offset=0,
    )  # fmt: skip
    history_size = 2

    def _tables(self, n: int, start: int) -> Tables:
        timesteps, sigmas = self._sigmas(n)
        sig = np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]]).astype(np.float64)
        ts = np.concatenate([timesteps[:1], np.repeat(timesteps[1:], 2)]).astype(F32)
        top = sigmas.max()
        init_sigma = top if self.config["timestep_spacing"] in ("linspace", "trailing") else np.sqrt(top * top + F32(1))
        v = self.config["prediction_type"] == "v_prediction"

        def x0_at(tr, s):
            x, out = tr.sample, tr.output
            return out * (-s / (s**2 + 1) ** 0.5) + x / (s**2 + 1) if v else x - out * s

        rows, dt = [], None
        first_call = 2 * start
        for c in range(first_call, len(ts)):
            tr = self._tracer()
            x = tr.sample
            if (c - first_call) % 2 == 0:  # first order (state_in_first_order: no dt saved)
                sigma, nxt = sig[c], sig[c + 1]
                d = (x - tr.pred_x0(x0_at(tr, sigma))) / sigma
                dt = nxt - sigma
                rows.append(tr.row(x + d * dt, [d, x]))
            else:
                nxt = sig[c]
                d = (x - tr.pred_x0(x0_at(tr, nxt))) / nxt
                d = (tr.history[0] + d) / 2
                rows.append(tr.row(tr.history[1] + d * dt, [None, None]))
        s = sig[first_call:-1]
        noise = np.stack([np.ones_like(s), s], 1)  # add_noise: original + sigma * noise
        return Tables(ts[first_call:], np.array(rows), 1 / np.sqrt(s * s + 1), noise, float(init_sigma))
