"""DPM-Solver++ 2S (singlestep, Lu et al. 2022), ancestral by default ("DPM++ 2S a"), equal to diffusers'
DPMSolverSinglestepScheduler (solver_order=2; algorithm_type "sde-dpmsolver++" for 2S a, "dpmsolver++" for 2S).

n steps take n UNet calls, as in diffusers: the calls alternate by the order list [1, 2, 1, 2, ..., 1]. An
order-1 call saves its sample and steps from sigma_i to sigma_i+1 with this call's data prediction x0; the
order-2 call that follows restarts from the saved sample (at sigma_i-1) and steps to sigma_i+1 with both x0s:
    first order:   prev = (s_t/s_s e^-h) x + alpha_t (1 - e^-2h) x0 + s_t sqrt(1 - e^-2h) noise       (SDE)
    second order:  D0 = x0_prev, D1 = (x0 - x0_prev) / r0, from x_saved, + 0.5 alpha_t (1 - e^-2h) D1 (midpoint)
The ancestral version draws fresh noise at every call (diffusers: randn with the pipeline's generator), also
where the final sigma is zero. history = (x0_prev, x_saved). Traced (see traced.py).
"""

from __future__ import annotations

import numpy as np

from sdrt.errors import ModelError
from sdrt.schedulers.base import (
    F32, Scheduler, Tables, alpha_sigma_lambda, exponential_sigmas, karras_sigmas, sigma_to_t, train_sigmas,
)
from sdrt.schedulers.traced import TracedStep

REQUIRED = dict(solver_order=2, thresholding=None, use_beta_sigmas=None, use_flow_sigmas=None, variance_type=None,
                use_dynamic_shifting=None)  # fmt: skip


class DPMPP2SA(TracedStep, Scheduler):
    name = "dpmpp_2s_a"
    DEFAULTS = dict(  # DPMSolverSinglestepScheduler.__init__, diffusers 0.42.1
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        solver_order=2, prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995,
        sample_max_value=1.0, algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=False,
        use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False, use_flow_sigmas=False,
        flow_shift=1.0, final_sigmas_type="zero", lambda_min_clipped=-float("inf"), variance_type=None,
        use_dynamic_shifting=False, time_shift_type="exponential",
    )  # fmt: skip
    history_size = 2

    def __init__(self, config: dict, **overrides):
        # The class has no timestep_spacing (always linspace) and no steps_offset: keep the base checks happy.
        super().__init__(config, **overrides)
        cfg = self.config
        if cfg["algorithm_type"] == "deis":
            cfg["algorithm_type"] = "dpmsolver++"
        if cfg["solver_type"] in ("logrho", "bh1", "bh2"):
            cfg["solver_type"] = "midpoint"
        if cfg["algorithm_type"] not in ("dpmsolver++", "sde-dpmsolver++"):
            raise ModelError(f"algorithm_type {cfg['algorithm_type']!r} is not supported; use 'sde-dpmsolver++'")
        for key, needed in REQUIRED.items():
            if (cfg[key] or None) != needed:
                fix = "turn it off" if needed is None else f"it needs {needed!r}"
                raise ModelError(f"{key}={cfg[key]!r} is not supported by sdrt's DPM-Solver++ 2S; {fix}")
        for key, allowed in (("solver_type", ("midpoint", "heun")), ("final_sigmas_type", ("zero", "sigma_min"))):
            if cfg[key] not in allowed:
                raise ModelError(f"{key} {cfg[key]!r} is not supported; use {' or '.join(map(repr, allowed))}")
        if cfg["use_karras_sigmas"] and cfg["use_exponential_sigmas"]:
            raise ModelError("use_karras_sigmas and use_exponential_sigmas exclude each other; set one")
        self.sde = cfg["algorithm_type"] == "sde-dpmsolver++"
        self.needs_noise = self.sde
        self.name = "dpmpp_2s_a" if self.sde else "dpmpp_2s"
        if cfg["use_karras_sigmas"]:
            self.name += "_karras"
        elif cfg["use_exponential_sigmas"]:
            self.name += "_exponential"

    def _sigmas(self, n: int):
        cfg, T = self.config, self.num_train_timesteps
        ac = self.alphas_cumprod
        lambdas = np.log(np.sqrt(ac)) - np.log(np.sqrt(F32(1) - ac))
        clipped = int(np.searchsorted(lambdas[::-1], cfg["lambda_min_clipped"]))
        ts = np.linspace(0, T - 1 - clipped, n + 1).round()[::-1][:-1].astype(np.int64)
        train = train_sigmas(ac)
        if cfg["use_karras_sigmas"]:
            sigmas = karras_sigmas(np.flip(train).copy(), n)
            ts = np.array([sigma_to_t(s, np.log(train)) for s in sigmas]).round().astype(np.int64)
        elif cfg["use_exponential_sigmas"]:
            sigmas = exponential_sigmas(np.flip(train).copy(), n)
            ts = np.array([sigma_to_t(s, np.log(train)) for s in sigmas]).astype(np.int64)
        else:
            sigmas = np.interp(ts, np.arange(len(train)), train)
        final = train[0] if cfg["final_sigmas_type"] == "sigma_min" else 0.0
        return ts, np.concatenate([sigmas, [final]]).astype(F32)

    def order_list(self, n: int) -> list[int]:
        """diffusers' get_order_list for solver_order 2 (lower_order_final is forced on as set_timesteps does)."""
        cfg = self.config
        lower_final = cfg["lower_order_final"] or n % 2 != 0 or cfg["final_sigmas_type"] == "zero"
        if lower_final:
            orders = [1, 2] * (n // 2 - 1) + [1, 1] if n % 2 == 0 else [1, 2] * (n // 2) + [1]
        else:
            orders = [1, 2] * (n // 2)
        if cfg["final_sigmas_type"] == "zero":
            orders[-1] = 1
        return orders

    def _tables(self, n: int, start: int) -> Tables:
        cfg = self.config
        ts, sigmas = self._sigmas(n)
        s = sigmas.astype(np.float64)
        alpha, sig, lam = alpha_sigma_lambda(s)
        orders = self.order_list(n)
        rows, stored = [], 0
        for k in range(start, len(ts)):
            tr = self._tracer()
            x, out = tr.sample, tr.output
            if cfg["prediction_type"] == "epsilon":
                x0 = (x - out * sig[k]) / alpha[k]
            else:
                x0 = x * alpha[k] - out * sig[k]
            m_prev = tr.history[0]
            stored = min(stored + 1, 2)
            order = orders[k] if stored >= orders[k] else 1
            saved = x if order == 1 else tr.history[1]
            src = k if order == 1 else k - 1  # the step starts from sigma_src
            h = lam[k + 1] - lam[src]
            if self.sde:
                e = -np.expm1(-2 * h)  # 1 - e^-2h
                prev = saved * (sig[k + 1] / sig[src] * np.exp(-h)) + x0 * (alpha[k + 1] * e)
                prev = prev + tr.noise * (sig[k + 1] * np.sqrt(e))
                d1_coef = 0.5 * alpha[k + 1] * e if cfg["solver_type"] == "midpoint" else alpha[k + 1] * (e / (-2 * h) + 1)
            else:
                prev = saved * (sig[k + 1] / sig[src]) - x0 * (alpha[k + 1] * np.expm1(-h))
                em1 = np.expm1(-h)
                d1_coef = -0.5 * alpha[k + 1] * em1 if cfg["solver_type"] == "midpoint" else alpha[k + 1] * (em1 / h + 1)
            if order == 2:
                r0 = (lam[k] - lam[k - 1]) / h
                d0, d1 = m_prev, (x0 - m_prev) / r0
                # replace x0 by D0 in the first-order terms: x0's coefficient moves to m_prev, D1 is added
                c = alpha[k + 1] * (e if self.sde else -np.expm1(-h))
                prev = prev - x0 * c + d0 * c + d1 * d1_coef
            rows.append(tr.row(prev, [x0, saved]))
        s32 = sigmas[start:-1]
        a32 = F32(1) / np.sqrt(s32 * s32 + F32(1))
        noise = np.stack([a32, s32 * a32], axis=1).astype(np.float64)
        return Tables(ts[start:].astype(F32), np.array(rows), np.ones(len(s32)), noise, 1.0)
