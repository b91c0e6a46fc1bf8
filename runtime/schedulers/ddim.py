"""DDIM (Song et al. 2020), deterministic (eta = 0), equal to diffusers' DDIMScheduler.

Per call, with a = alphas_cumprod[t] and a' = alphas_cumprod[t - T//n] (or the final alpha):
    x0   = sample * x0_from_sample + output * x0_from_output     (then clamped if clip_sample)
    prev = x0 * prev_from_x0 + sample * prev_from_sample + output * prev_from_output
epsilon: x0 = (x - sqrt(1-a) e) / sqrt(a),  prev = sqrt(a') x0 + sqrt(1-a') e
v:       x0 = sqrt(a) x - sqrt(1-a) v,      prev = sqrt(a') x0 + sqrt(1-a') (sqrt(a) v + sqrt(1-a) x)
Like diffusers, the step always goes to t - T//n, whatever the spacing (so 'trailing' and 'linspace' schedules
step to a timestep that is not the next one in the list).
"""

from __future__ import annotations

import numpy as np

from sdrt.errors import ModelError
from sdrt.schedulers.base import F32, Scheduler, Tables, clamp, spaced_timesteps


class DDIM(Scheduler):
    name = "ddim"
    DEFAULTS = dict(  # DDIMScheduler.__init__, diffusers 0.42.1
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        clip_sample=True, set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon", thresholding=False,
        dynamic_thresholding_ratio=0.995, clip_sample_range=1.0, sample_max_value=1.0, timestep_spacing="leading",
        rescale_betas_zero_snr=False,
    )  # fmt: skip
    coefficient_names = ("x0_from_sample", "x0_from_output", "prev_from_x0", "prev_from_sample", "prev_from_output")

    def __init__(self, config: dict, **overrides):
        super().__init__(config, **overrides)
        if self.config["thresholding"]:
            raise ModelError("DDIM's dynamic thresholding (for pixel-space models) is unsupported; turn it off")
        self.final_alpha = 1.0 if self.config["set_alpha_to_one"] else float(self.alphas_cumprod[0])

    def _tables(self, n: int, start: int) -> Tables:
        cfg = self.config
        ts = spaced_timesteps(cfg["timestep_spacing"], n, self.num_train_timesteps, cfg["steps_offset"])[start:]
        rows, noise = [], []
        for t in ts.astype(int):
            a = self._alpha(t)
            prev_t = t - self.num_train_timesteps // n
            a_prev = self._alpha(prev_t) if prev_t >= 0 else self.final_alpha
            sa, sb, sa_prev, sb_prev = a**0.5, (1 - a) ** 0.5, a_prev**0.5, (1 - a_prev) ** 0.5
            if cfg["prediction_type"] == "epsilon":
                if a == 0:
                    raise ModelError("epsilon prediction at a zero-SNR timestep divides by zero; use v_prediction")
                rows.append((1 / sa, -sb / sa, sa_prev, 0.0, sb_prev))
            else:
                rows.append((sa, -sb, sa_prev, sb_prev * sb, sb_prev * sa))
            # add_noise in float32, as diffusers casts alphas_cumprod to the sample's dtype first.
            a32 = self.alphas_cumprod[t]
            noise.append((np.sqrt(a32), np.sqrt(F32(1) - a32)))
        return Tables(ts.astype(F32), np.array(rows), np.ones(len(ts)), np.array(noise, np.float64), 1.0)

    def update(self, coefs, sample, model_output, history, noise=None, clip=None):
        """(prev_sample, ()) from one row of `coefficients`; arithmetic only, plus the clip_sample clamp.

        coefs: indexable by column (Python floats, a 1-D torch tensor row, ...). DDIM keeps no history.
        clip: optional callable clip(x, lo, hi) for clip_sample; default: x.clamp (torch) or x.clip (numpy).
        """
        x0 = sample * coefs[0] + model_output * coefs[1]
        if self.config["clip_sample"]:
            r = float(self.config["clip_sample_range"])
            x0 = clamp(x0, -r, r, clip)
        return x0 * coefs[2] + sample * coefs[3] + model_output * coefs[4], ()
