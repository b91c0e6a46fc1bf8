"""DPM-Solver++ 2M (Lu et al. 2022), equal to diffusers' DPMSolverMultistepScheduler (solver_order=2,
algorithm_type="dpmsolver++"), with Karras, exponential or the config's sigmas; `DPMPP2MSDE` below is the
"sde-dpmsolver++" variant (DPM++ 2M SDE).

Noise level sigma gives alpha = 1/sqrt(sigma^2 + 1), sigma_t = sigma * alpha, lambda = log(alpha / sigma_t),
h = lambda_next - lambda. history = (x0_prev,), the previous call's data prediction.
    x0   = sample * x0_from_sample + output * x0_from_output
    prev = sample * prev_from_sample + x0 * prev_from_x0 + x0_prev * prev_from_x0_prev
first order (call 0, and the final step):  prev = (sigma_next/sigma) x - alpha_next (e^-h - 1) x0
second order (midpoint):  with r = h_prev / h, D1 = (x0 - x0_prev) / r, adds -0.5 alpha_next (e^-h - 1) D1.
Like diffusers, the first call after img2img truncation is first order, and the last step is first order
when final_sigmas_type is 'zero' (the default) or lower_order_final holds with fewer than 15 steps.
"""

from __future__ import annotations

import numpy as np

from sdrt.errors import InputError, ModelError
from sdrt.schedulers.base import (
    F32, Scheduler, Tables, alpha_sigma_lambda, exponential_sigmas, karras_sigmas, sigma_to_t, train_sigmas,
)


# Settings that would make a different solver; sdrt refuses them rather than run something else.
REQUIRED = dict(solver_order=2, algorithm_type="dpmsolver++", thresholding=None, use_beta_sigmas=None,
                use_lu_lambdas=None, use_flow_sigmas=None, variance_type=None)  # fmt: skip


class DPMPP2M(Scheduler):
    name = "dpmpp_2m"
    DEFAULTS = dict(  # DPMSolverMultistepScheduler.__init__, diffusers 0.42.1
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        solver_order=2, prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995,
        sample_max_value=1.0, algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
        euler_at_final=False, use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
        use_lu_lambdas=False, use_flow_sigmas=False, flow_shift=1.0, final_sigmas_type="zero",
        lambda_min_clipped=-float("inf"), variance_type=None, timestep_spacing="linspace", steps_offset=0,
        rescale_betas_zero_snr=False, use_dynamic_shifting=False, time_shift_type="exponential",
    )  # fmt: skip
    coefficient_names = ("x0_from_sample", "x0_from_output", "prev_from_sample", "prev_from_x0", "prev_from_x0_prev")
    history_size = 1
    required = REQUIRED
    sde = False

    def __init__(self, config: dict, **overrides):
        super().__init__(config, **overrides)
        cfg = self.config
        if cfg["algorithm_type"] == "deis":  # diffusers maps it to dpmsolver++ too
            cfg["algorithm_type"] = "dpmsolver++"
        if cfg["solver_type"] in ("logrho", "bh1", "bh2"):  # and these to midpoint
            cfg["solver_type"] = "midpoint"
        if cfg["use_karras_sigmas"] and cfg["use_exponential_sigmas"]:
            raise ModelError("use_karras_sigmas and use_exponential_sigmas exclude each other; set one")
        for key, needed in self.required.items():
            if (cfg[key] or None) != needed:  # False and None both mean "off"
                fix = "turn it off" if needed is None else f"it needs {needed!r}"
                raise ModelError(f"{key}={cfg[key]!r} is not supported by sdrt's DPM-Solver++ 2M; {fix}")
        for key, allowed in (("solver_type", ("midpoint", "heun")), ("final_sigmas_type", ("zero", "sigma_min"))):
            if cfg[key] not in allowed:
                raise ModelError(f"{key} {cfg[key]!r} is not supported; use {' or '.join(map(repr, allowed))}")
        if cfg["rescale_betas_zero_snr"]:
            self.alphas_cumprod[-1] = 2**-24
        if cfg["use_karras_sigmas"]:
            self.name = f"{self.name}_karras"
        elif cfg["use_exponential_sigmas"]:
            self.name = f"{self.name}_exponential"

    def _sigmas(self, n: int):
        """Integer timesteps [n] and float32 sigmas [n + 1], as diffusers' set_timesteps."""
        cfg, T = self.config, self.num_train_timesteps
        ac = self.alphas_cumprod
        lambdas = np.log(np.sqrt(ac)) - np.log(np.sqrt(F32(1) - ac))
        last = T - int(np.searchsorted(lambdas[::-1], cfg["lambda_min_clipped"]))
        if cfg["timestep_spacing"] == "linspace":
            ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1]
        elif cfg["timestep_spacing"] == "leading":
            ts = (np.arange(0, n + 1) * (last // (n + 1))).round()[::-1][:-1] + cfg["steps_offset"]
        else:
            ts = np.arange(last, 0, -T / n).round() - 1
        ts = ts.astype(np.int64)
        train = train_sigmas(ac)
        if cfg["use_karras_sigmas"]:
            sigmas = karras_sigmas(np.flip(train).copy(), n)
            ts = np.array([sigma_to_t(s, np.log(train)) for s in sigmas])
            ts = (ts if cfg["beta_schedule"] == "squaredcos_cap_v2" else ts.round()).astype(np.int64)
        elif cfg["use_exponential_sigmas"]:  # timesteps truncated to int64, not rounded, as diffusers
            sigmas = exponential_sigmas(np.flip(train).copy(), n)
            ts = np.array([sigma_to_t(s, np.log(train)) for s in sigmas]).astype(np.int64)
        else:
            sigmas = np.interp(ts, np.arange(len(train)), train)
        final = train[0] if cfg["final_sigmas_type"] == "sigma_min" else 0.0
        return ts, np.concatenate([sigmas, [final]]).astype(F32)

    def _tables(self, n: int, start: int) -> Tables:
        cfg = self.config
        ts, sigmas = self._sigmas(n)
        s = sigmas.astype(np.float64)
        alpha, sig, lam = alpha_sigma_lambda(s)
        rows = []
        for k in range(start, len(ts)):
            if cfg["prediction_type"] == "epsilon":
                x0_coefs = (1 / alpha[k], -sig[k] / alpha[k])
            else:
                x0_coefs = (alpha[k], -sig[k])
            h = lam[k + 1] - lam[k]
            # ODE: alpha_next (e^-h - 1); SDE (sde-dpmsolver++): alpha_next (e^-2h - 1), the same formulas after
            a = alpha[k + 1] * np.expm1(-2 * h if self.sde else -h)
            final = k == len(ts) - 1 and (
                cfg["euler_at_final"]
                or (cfg["lower_order_final"] and len(ts) < 15)
                or cfg["final_sigmas_type"] == "zero"
            )
            if k == start or final:  # first order
                c0, c1 = -a, 0.0
            else:
                r = (lam[k] - lam[k - 1]) / h
                if cfg["solver_type"] == "midpoint":
                    c0, c1 = -a - 0.5 * a / r, 0.5 * a / r
                else:  # heun
                    b = alpha[k + 1] * (np.expm1(-2 * h) / (2 * h) + 1 if self.sde else np.expm1(-h) / h + 1)
                    c0, c1 = -a + b / r, -b / r
            if self.sde:  # sigma_next/sigma e^-h x + ... + sigma_next sqrt(1 - e^-2h) noise
                rows.append((*x0_coefs, sig[k + 1] / sig[k] * np.exp(-h), c0, c1, sig[k + 1] * np.sqrt(-np.expm1(-2 * h))))
            else:
                rows.append((*x0_coefs, sig[k + 1] / sig[k], c0, c1))
        # add_noise in float32, as diffusers: alpha * original + sigma_t * noise.
        s32 = sigmas[start:-1]
        a32 = F32(1) / np.sqrt(s32 * s32 + F32(1))
        noise = np.stack([a32, s32 * a32], axis=1).astype(np.float64)
        return Tables(ts[start:].astype(F32), np.array(rows, np.float64), np.ones(len(s32)), noise, 1.0)

    def update(self, coefs, sample, model_output, history, noise=None, clip=None):
        """(prev_sample, (x0,)) from one row of `coefficients` (and this step's noise for the SDE); arithmetic only."""
        (x0_prev,) = history
        x0 = sample * coefs[0] + model_output * coefs[1]
        prev = sample * coefs[2] + x0 * coefs[3] + x0_prev * coefs[4]
        if self.sde:
            if noise is None:
                raise InputError(f"{self.name} adds fresh noise each step; pass noise shaped like the sample")
            prev = prev + noise * coefs[5]
        return prev, (x0,)


class DPMPP2MSDE(DPMPP2M):
    """DPM-Solver++ 2M SDE: DPMSolverMultistepScheduler with algorithm_type "sde-dpmsolver++", given the same noise.

    diffusers draws plain randn noise each step with the pipeline's generator (k-diffusion's version uses a
    Brownian tree; sdrt matches diffusers). Rows gain prev_from_noise = sigma_next sqrt(1 - e^-2h); the sample
    coefficient is sigma_next/sigma e^-h and e^-h becomes e^-2h in the x0 terms.
    """

    name = "dpmpp_2m_sde"
    coefficient_names = DPMPP2M.coefficient_names + ("prev_from_noise",)
    required = {**REQUIRED, "algorithm_type": "sde-dpmsolver++"}
    sde = True
    needs_noise = True
