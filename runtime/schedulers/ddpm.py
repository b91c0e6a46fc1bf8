"""DDPM (Ho et al. 2020) ancestral sampling, equal to diffusers' DDPMScheduler given the same noise.

Per call, with a = alphas_cumprod[t] and a' = alphas_cumprod[t_next] (1 after the last timestep; like diffusers,
t_next is the next timestep of the list, not t - T/n):
    x0   = (x - sqrt(1-a) e) / sqrt(a)            (v: sqrt(a) x - sqrt(1-a) v), clamped if clip_sample
    prev = x0 sqrt(a') beta_t / (1-a) + x sqrt(a/a') (1-a') / (1-a) + noise std,   beta_t = 1 - a/a'
std = sqrt(max((1-a')/(1-a) beta_t, 1e-20)) ('fixed_small', also 'fixed_small_log'), or sqrt(beta_t)
('fixed_large'); diffusers adds noise only where t > 0 (it then draws none: sdrt's draw is unused, coefficient 0).
Traced (see traced.py).
"""

from __future__ import annotations

import numpy as np

from sdrt.errors import ModelError
from sdrt.schedulers.base import F32, Scheduler, Tables, spaced_timesteps
from sdrt.schedulers.traced import TracedStep

VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large")


class DDPM(TracedStep, Scheduler):
    name = "ddpm"
    DEFAULTS = dict(  # DDPMScheduler.__init__, diffusers 0.42.1
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        variance_type="fixed_small", clip_sample=True, prediction_type="epsilon", thresholding=False,
        dynamic_thresholding_ratio=0.995, clip_sample_range=1.0, sample_max_value=1.0, timestep_spacing="leading",
        steps_offset=0, rescale_betas_zero_snr=False,
    )  # fmt: skip
    needs_noise = True

    def __init__(self, config: dict, **overrides):
        super().__init__(config, **overrides)
        if self.config["thresholding"]:
            raise ModelError("DDPM's dynamic thresholding (for pixel-space models) is unsupported; turn it off")
        if self.config["variance_type"] not in VARIANCES:
            raise ModelError(
                f"variance_type {self.config['variance_type']!r} is not supported (learned variances need a model that "
                f"predicts them; fixed_large_log gives NaN in diffusers); use one of {', '.join(VARIANCES)}"
            )

    def _tables(self, n: int, start: int) -> Tables:
        cfg = self.config
        ts = spaced_timesteps(cfg["timestep_spacing"], n, self.num_train_timesteps, cfg["steps_offset"]).astype(int)
        rows, noise = [], []
        for k in range(start, n):
            t = int(ts[k])
            prev_t = int(ts[k + 1]) if k + 1 < n else -1
            a = self._alpha(t)
            a_prev = self._alpha(prev_t) if prev_t >= 0 else 1.0
            cur_alpha = a / a_prev
            cur_beta = 1 - cur_alpha
            tr = self._tracer()
            x, out = tr.sample, tr.output
            if cfg["prediction_type"] == "epsilon":
                if a == 0:
                    raise ModelError("epsilon prediction at a zero-SNR timestep divides by zero; use v_prediction")
                x0 = (x - out * (1 - a) ** 0.5) / a**0.5
            else:
                x0 = x * a**0.5 - out * (1 - a) ** 0.5
            prev = tr.pred_x0(x0) * (a_prev**0.5 * cur_beta / (1 - a)) + x * (cur_alpha**0.5 * (1 - a_prev) / (1 - a))
            if t > 0:
                if cfg["variance_type"] == "fixed_large":
                    std = cur_beta**0.5
                else:
                    std = max((1 - a_prev) / (1 - a) * cur_beta, 1e-20) ** 0.5
                prev = prev + tr.noise * std
            rows.append(tr.row(prev, []))
            a32 = self.alphas_cumprod[t]
            noise.append((np.sqrt(a32), np.sqrt(F32(1) - a32)))
        return Tables(ts[start:].astype(F32), np.array(rows), np.ones(n - start), np.array(noise, np.float64), 1.0)
