"""PNDM (Liu et al. 2022), equal to diffusers' PNDMScheduler: PLMS steps, with or without the Runge-Kutta warm-up.

With skip_prk_steps (every SD 1.x/2.x config sets it) the PLMS steps below run alone. Without it (diffusers'
default, so also a config that lacks the key) diffusers first runs 12 pseudo Runge-Kutta calls over the four
highest timesteps, n + 9 UNet calls in all: `PNDMRungeKutta` (traced, see traced.py) does exactly that.

PLMS alone: n steps take n+1 UNet calls. Call 0 is an Euler-like step; call 1 re-evaluates at the same timestep and redoes
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

from sdrt.errors import InputError
from sdrt.schedulers.base import F32, Scheduler, Tables, resolve_config, spaced_timesteps
from sdrt.schedulers.traced import TracedStep

# Adams-Bashforth weights on (output, e1, e2, e3) by call counter; call 1 averages with call 0's output.
MIXES = {0: (1, 0, 0, 0), 1: (0.5, 0.5, 0, 0), 2: (1.5, -0.5, 0, 0), 3: (23 / 12, -16 / 12, 5 / 12, 0)}
MIX_4TH = (55 / 24, -59 / 24, 37 / 24, -9 / 24)


class PNDM(Scheduler):
    name = "pndm"
    DEFAULTS = dict(  # PNDMScheduler.__init__, diffusers 0.42.1
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        skip_prk_steps=False, set_alpha_to_one=False, prediction_type="epsilon", timestep_spacing="leading",
        steps_offset=0,
    )  # fmt: skip
    coefficient_names = (
        "mix_output", "mix_e1", "mix_e2", "mix_e3", "use_sample", "use_cur_sample",
        "prev_from_sample", "prev_from_output", "push", "hold", "save_sample",
    )  # fmt: skip
    history_size = 4

    def __new__(cls, config: dict, **overrides):
        """PNDM(config) is a PNDMRungeKutta where the resolved config runs the Runge-Kutta warm-up."""
        if cls is PNDM and not resolve_config(cls.DEFAULTS, dict(config), overrides)["skip_prk_steps"]:
            cls = PNDMRungeKutta
        return super().__new__(cls)

    def __init__(self, config: dict, **overrides):
        super().__init__(config, **overrides)
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


class PNDMRungeKutta(TracedStep, PNDM):
    """PNDM with skip_prk_steps false: diffusers' step_prk for the first 12 calls, then step_plms, traced.

    The 12 warm-up calls run 3 pseudo-4th-order Runge-Kutta steps over the four highest timesteps d > c > b > a
    (each at t, t - T/n/2 twice, t - T/n): the sample each step starts from and the running weighted sum of
    its four outputs (1/6, 1/3, 1/3, 1/6) are carried; the first output of each is kept for PLMS, which then
    goes on 4th-order from a. As in diffusers, the call counter (not the timestep) decides the branch, also
    after img2img truncation. history = (e1, e2, e3, cur_sample, cur_model_output).
    """

    history_size = 5

    def _tables(self, n: int, start: int) -> Tables:
        cfg = self.config
        if n < 4:
            raise InputError(f"PNDM with Runge-Kutta warm-up (skip_prk_steps false) needs >= 4 steps, not {n}")
        T = self.num_train_timesteps
        asc = spaced_timesteps(cfg["timestep_spacing"], n, T, cfg["steps_offset"])[::-1].astype(np.int64)
        half = T // n // 2
        prk = np.array(asc[-4:]).repeat(2) + np.tile(np.array([0, half]), 4)
        prk = prk[:-1].repeat(2)[1:-1][::-1].copy()
        plms = asc[:-3][::-1].copy()
        full = np.concatenate([prk, plms]).astype(np.int64)
        ts = full[start:]
        ratio = T // n
        v = cfg["prediction_type"] == "v_prediction"

        def prev_sample(x, t, t_prev, mo):
            a = self._alpha(int(t))
            a_prev = self._alpha(int(t_prev)) if t_prev >= 0 else self.final_alpha
            if v:
                mo = mo * a**0.5 + x * (1 - a) ** 0.5
            denom = a * (1 - a_prev) ** 0.5 + (a * (1 - a) * a_prev) ** 0.5
            return x * (a_prev / a) ** 0.5 - mo * ((a_prev - a) / denom)

        rows, noise = [], []
        n_ets, has_cur = 0, False  # len(self.ets) and cur_sample is not None, host-side
        for counter, t in enumerate(ts.tolist()):
            tr = self._tracer()
            x, out = tr.sample, tr.output
            e1, e2, e3, cur, acc = tr.history
            ets = [e3, e2, e1][3 - min(n_ets, 3):]  # oldest -> newest, as self.ets
            if counter < len(prk):
                diff = 0 if counter % 2 else half
                t_prev = t - diff
                t_base = prk[counter // 4 * 4]
                mo = out
                if counter % 4 == 0:
                    acc = acc + out * (1 / 6)
                    ets.append(out)
                    cur, has_cur = x, True
                elif counter % 4 in (1, 2):
                    acc = acc + out * (1 / 3)
                else:
                    mo = acc + out * (1 / 6)
                    acc = tr.zero()
                prev = prev_sample(cur if has_cur else x, t_base, t_prev, mo)
            else:
                t_prev = t - ratio
                if counter != 1:
                    ets = ets[-3:] + [out]
                else:
                    t_prev, t = t, t + ratio
                if len(ets) == 1 and counter == 0:
                    mo, cur, has_cur = out, x, True
                elif len(ets) == 1 and counter == 1:
                    mo, x, has_cur = (out + ets[-1]) / 2, cur, False
                    cur = tr.zero()
                elif len(ets) == 2:
                    mo = (ets[-1] * 3 - ets[-2]) / 2
                elif len(ets) == 3:
                    mo = (ets[-1] * 23 - ets[-2] * 16 + ets[-3] * 5) / 12
                else:
                    mo = (ets[-1] * 55 - ets[-2] * 59 + ets[-3] * 37 - ets[-4] * 9) * (1 / 24)
                prev = prev_sample(x, t, t_prev, mo)
            n_ets = len(ets)
            newest = ets[::-1][:3]
            rows.append(tr.row(prev, [*newest, *[None] * (3 - len(newest)), cur if has_cur else None, acc]))
            a32 = self.alphas_cumprod[int(ts[counter])]
            noise.append((np.sqrt(a32), np.sqrt(F32(1) - a32)))
        return Tables(ts.astype(F32), np.array(rows), np.ones(len(ts)), np.array(noise, np.float64), 1.0)
