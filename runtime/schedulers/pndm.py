"""PNDM's PLMS steps (Liu et al. 2022) with skip_prk_steps, SD's default, equal to diffusers' PNDMScheduler.

sdrt's PNDM always skips the Runge-Kutta warm-up (skip_prk_steps=True, which every SD 1.x/2.x config sets):
diffusers' own default is False, so from a config that lacks the key diffusers would run 12 Runge-Kutta calls
first (n + 9 calls in all, not n + 1).

n steps take n+1 UNet calls. Call 0 is an Euler-like step; call 1 re-evaluates at the same timestep and redoes
step 0 from the sample it started at (`cur_sample`) with the mean of both outputs; calls 2, 3, 4+ use 2nd, 3rd,
4th-order Adams-Bashforth mixes of the last outputs. diffusers keys this on a call counter that starts at 0
after img2img truncation too, but the truncated list no longer holds the doubled timestep: its call 1 redoes
call 0 towards the next listed timestep, and from call 2 on every call is told a timestep one interval below
the sample's noise level. sdrt reproduces that, as it reproduces diffusers.

history = (e1, e2, e3, cur_sample): the last three stored outputs, newest first, and call 0's sample.
    out    = output * mix_output + e1 * mix_e1 + e2 * mix_e2 + e3 * mix_e3
    x      = sample * use_sample + cur_sample * use_cur_sample
    prev   = x * prev_from_sample + out * prev_from_output        (v_prediction folded in)
    e1..e3 = (output, e1, e2) * push + (e1, e2, e3) * hold         (call 1 stores nothing)
    cur_sample = sample * save_sample                             (1 at call 0 only)
"""

from __future__ import annotations

import numpy as np

from sdrt.schedulers.base import F32, Scheduler, Tables, spaced_timesteps

# Adams-Bashforth weights on (output, e1, e2, e3) by call counter; call 1 averages with call 0's output.
MIXES = {0: (1, 0, 0, 0), 1: (0.5, 0.5, 0, 0), 2: (1.5, -0.5, 0, 0), 3: (23 / 12, -16 / 12, 5 / 12, 0)}
MIX_4TH = (55 / 24, -59 / 24, 37 / 24, -9 / 24)


class PNDM(Scheduler):
    name = "pndm"
    DEFAULTS = dict(  # PNDMScheduler.__init__, diffusers 0.42.1 (skip_prk_steps is forced True)
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        skip_prk_steps=False, set_alpha_to_one=False, prediction_type="epsilon", timestep_spacing="leading",
        steps_offset=0,
    )  # fmt: skip
    coefficient_names = (
        "mix_output", "mix_e1", "mix_e2", "mix_e3", "use_sample", "use_cur_sample",
        "prev_from_sample", "prev_from_output", "push", "hold", "save_sample",
    )  # fmt: skip
    history_size = 4

    def __init__(self, config: dict, **overrides):
        super().__init__(config, **{"skip_prk_steps": True, **overrides})
        self.final_alpha = 1.0 if self.config["set_alpha_to_one"] else float(self.alphas_cumprod[0])

    def _tables(self, n: int, start: int) -> Tables:
        cfg = self.config
        asc = spaced_timesteps(cfg["timestep_spacing"], n, self.num_train_timesteps, cfg["steps_offset"])[::-1]
        ts = np.concatenate([asc[:-1], asc[-2:-1], asc[-1:]])[::-1][start:]  # the middle timestep twice
        ratio = self.num_train_timesteps // n
        rows, noise = [], []
        for counter, t in enumerate(ts.astype(int)):
            # Call 1 redoes call 0's step: from t + ratio down to t.
            t_from, t_to = (t + ratio, t) if counter == 1 else (t, t - ratio)
            a = self._alpha(t_from)
            a_prev = self._alpha(t_to) if t_to >= 0 else self.final_alpha
            sample_coeff = (a_prev / a) ** 0.5
            out_coeff = -(a_prev - a) / (a * (1 - a_prev) ** 0.5 + (a * (1 - a) * a_prev) ** 0.5)
            if cfg["prediction_type"] == "v_prediction":  # eps = sqrt(a) v + sqrt(1-a) x
                sample_coeff, out_coeff = sample_coeff + out_coeff * (1 - a) ** 0.5, out_coeff * a**0.5
            push = 0.0 if counter == 1 else 1.0
            use_cur = 1.0 if counter == 1 else 0.0
            mix = MIXES.get(counter, MIX_4TH)
            rows.append((*mix, 1 - use_cur, use_cur, sample_coeff, out_coeff, push, 1 - push, float(counter == 0)))
            a32 = self.alphas_cumprod[t]
            noise.append((np.sqrt(a32), np.sqrt(F32(1) - a32)))
        return Tables(ts.astype(F32), np.array(rows, np.float64), np.ones(len(ts)), np.array(noise, np.float64), 1.0)

    def update(self, coefs, sample, model_output, history, noise=None, clip=None):
        """(prev_sample, new_history) from one row of `coefficients`; arithmetic only (see the module docstring)."""
        e1, e2, e3, cur = history
        out = model_output * coefs[0] + e1 * coefs[1] + e2 * coefs[2] + e3 * coefs[3]
        x = sample * coefs[4] + cur * coefs[5]
        prev = x * coefs[6] + out * coefs[7]
        push, hold = coefs[8], coefs[9]
        new = (model_output * push + e1 * hold, e1 * push + e2 * hold, e2 * push + e3 * hold, sample * coefs[10])
        return prev, new
