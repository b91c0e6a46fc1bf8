"""UniPC (Zhao et al. 2023), multistep predictor-corrector, equal to diffusers' UniPCMultistepScheduler
(default: solver_order 2, bh2, predict_x0, lower_order_final).

One UNet call per step. Each call first *corrects* the sample it was given (UniC: the previous predictor step
is redone from the saved last_sample with this call's model output folded in), then *predicts* the next sample
(UniP) from the corrected one with the stored model outputs. Both are linear in the arrays; the rho
coefficients (diffusers solves a small linear system in float32) are solved in float64 on the host. The
corrector is skipped at the first call (and after img2img truncation, where no last_sample exists) and at the
steps listed in disable_corrector; orders warm up as diffusers' lower_order_nums does.
history = (m_-1, ..., m_-order, last_sample): the stored converted model outputs, newest first, and the sample
the previous prediction started from. Traced (see traced.py).
"""

from __future__ import annotations

import math

import numpy as np

from sdrt.errors import ModelError
from sdrt.schedulers.base import (
    F32, Scheduler, Tables, alpha_sigma_lambda, exponential_sigmas, karras_sigmas, sigma_to_t, spaced_timesteps, train_sigmas,
)  # fmt: skip
from sdrt.schedulers.traced import TracedStep

REQUIRED = dict(thresholding=None, use_beta_sigmas=None, use_flow_sigmas=None, use_dynamic_shifting=None,
                solver_p=None, shift_terminal=None)  # fmt: skip


class UniPC(TracedStep, Scheduler):
    name = "unipc"
    DEFAULTS = dict(  # UniPCMultistepScheduler.__init__, diffusers 0.42.1
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        solver_order=2, prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995,
        sample_max_value=1.0, predict_x0=True, solver_type="bh2", lower_order_final=True, disable_corrector=[],
        solver_p=None, use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
        use_flow_sigmas=False, flow_shift=1.0, timestep_spacing="linspace", steps_offset=0, final_sigmas_type="zero",
        rescale_betas_zero_snr=False, use_dynamic_shifting=False, time_shift_type="exponential", sigma_min=None,
        sigma_max=None, shift_terminal=None,
    )  # fmt: skip

    def __init__(self, config: dict, **overrides):
        super().__init__(config, **overrides)
        cfg = self.config
        if cfg["solver_type"] in ("midpoint", "heun", "logrho"):  # diffusers maps these to bh2
            cfg["solver_type"] = "bh2"
        if cfg["solver_type"] not in ("bh1", "bh2"):
            raise ModelError(f"solver_type {cfg['solver_type']!r} is not supported; use 'bh1' or 'bh2'")
        for key, needed in REQUIRED.items():
            if (cfg[key] or None) != needed:
                raise ModelError(f"{key}={cfg[key]!r} is not supported by sdrt's UniPC; turn it off")
        if not 1 <= int(cfg["solver_order"]) <= 3:
            raise ModelError(f"solver_order {cfg['solver_order']} is not supported; use 1, 2 or 3")
        if cfg["final_sigmas_type"] not in ("zero", "sigma_min"):
            raise ModelError(f"final_sigmas_type {cfg['final_sigmas_type']!r} is not supported; use zero or sigma_min")
        if cfg["use_karras_sigmas"] and cfg["use_exponential_sigmas"]:
            raise ModelError("use_karras_sigmas and use_exponential_sigmas exclude each other; set one")
        if cfg["rescale_betas_zero_snr"]:
            self.alphas_cumprod[-1] = 2**-24
        self.order = int(cfg["solver_order"])
        self.history_size = self.order + 1
        if cfg["use_karras_sigmas"]:
            self.name = "unipc_karras"
        elif cfg["use_exponential_sigmas"]:
            self.name = "unipc_exponential"

    def _sigmas(self, n: int):
        cfg, T = self.config, self.num_train_timesteps
        spacing = cfg["timestep_spacing"]
        if spacing == "linspace":
            ts = np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
        elif spacing == "leading":
            ts = (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1] + cfg["steps_offset"]
        else:
            ts = spaced_timesteps("trailing", n, T, 0)
        ts = ts.astype(np.int64)
        train = train_sigmas(self.alphas_cumprod)
        if cfg["use_karras_sigmas"] or cfg["use_exponential_sigmas"]:
            convert = karras_sigmas if cfg["use_karras_sigmas"] else exponential_sigmas
            sigmas = convert(np.flip(train).copy(), n, cfg["sigma_min"], cfg["sigma_max"])
            ts = np.array([sigma_to_t(s, np.log(train)) for s in sigmas])
            ts = (ts.round() if cfg["use_karras_sigmas"] else ts).astype(np.int64)
            final = sigmas[-1] if cfg["final_sigmas_type"] == "sigma_min" else 0.0
        else:
            sigmas = np.interp(ts, np.arange(len(train)), train)
            final = train[0] if cfg["final_sigmas_type"] == "sigma_min" else 0.0
        return ts, np.concatenate([sigmas, [final]]).astype(F32)

    def _tables(self, n: int, start: int) -> Tables:
        cfg = self.config
        ts, sigmas = self._sigmas(n)
        s = sigmas.astype(np.float64)
        alpha, sig, lam = alpha_sigma_lambda(s)
        x0_mode = bool(cfg["predict_x0"])
        bh1 = cfg["solver_type"] == "bh1"
        order_cfg = self.order
        disabled = set(cfg["disable_corrector"] or ())

        def coefficients(step, hh):
            """(h_phi_1, B_h, b list) as diffusers builds them, in float64."""
            h_phi_1 = math.expm1(hh)
            h_phi_k = h_phi_1 / hh - 1
            factorial = 1
            B_h = hh if bh1 else h_phi_1
            b = []
            for i in range(1, step + 1):
                b.append(h_phi_k * factorial / B_h)
                factorial *= i + 1
                h_phi_k = h_phi_k / hh - 1 / factorial
            return h_phi_1, B_h, b

        def convert(tr, k):
            x, out = tr.sample, tr.output
            if x0_mode:
                if cfg["prediction_type"] == "epsilon":
                    return (x - out * sig[k]) / alpha[k]
                return x * alpha[k] - out * sig[k]
            if cfg["prediction_type"] == "epsilon":
                return out
            return out * alpha[k] + x * sig[k]

        def update(t_idx, s0_idx, x, m0, ms, order, corrector_model=None):
            """x at sigma[s0_idx] -> sigma[t_idx] (UniP), or with corrector_model the UniC update."""
            alpha_t, sigma_t = alpha[t_idx], sig[t_idx]
            sigma_s0 = sig[s0_idx]
            h = lam[t_idx] - lam[s0_idx]
            rks, d1s = [], []
            for i in range(1, order):
                si = s0_idx - i
                rk = (lam[si] - lam[s0_idx]) / h
                rks.append(rk)
                d1s.append((ms[i - 1] - m0) / rk)
            rks.append(1.0)
            hh = -h if x0_mode else h
            h_phi_1, B_h, b = coefficients(order, hh)
            R = np.array([np.power(rks, i - 1) for i in range(1, order + 1)])
            b = np.array(b)
            if x0_mode:
                base = x * (sigma_t / sigma_s0) - m0 * (alpha_t * h_phi_1)
                scale = alpha_t * B_h
            else:
                base = x * (alpha[t_idx] / alpha[s0_idx]) - m0 * (sigma_t * h_phi_1)
                scale = sigma_t * B_h
            if corrector_model is None:  # UniP
                if not d1s:
                    return base
                rhos = [0.5] if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1])
                return base - sum(r * d for r, d in zip(rhos, d1s)) * scale
            rhos = [0.5] if order == 1 else np.linalg.solve(R, b)
            corr = sum(r * d for r, d in zip(rhos[:-1], d1s))
            return base - (corr + (corrector_model - m0) * rhos[-1]) * scale

        rows, stored, this_order, have_last = [], 0, None, False
        for k in range(start, len(ts)):
            tr = self._tracer()
            hist = tr.history
            ms, last = hist[: self.order], hist[self.order]
            m_t = convert(tr, k)
            x = tr.sample
            if k > 0 and (k - 1) not in disabled and have_last:
                # UniC: corrects x with m_t; m0 = the newest stored output, ms = the older ones
                x = update(k, k - 1, last, ms[0], ms[1:], this_order, corrector_model=m_t)
            new_ms = [m_t, *ms[: self.order - 1]]
            this_order = min(order_cfg, len(ts) - k) if cfg["lower_order_final"] else order_cfg
            this_order = min(this_order, stored + 1)
            prev = update(k + 1, k, x, m_t, new_ms[1:], this_order)
            stored = min(stored + 1, order_cfg)
            have_last = True
            rows.append(tr.row(prev, [*new_ms, x]))
        s32 = sigmas[start:-1]
        a32 = F32(1) / np.sqrt(s32 * s32 + F32(1))
        noise = np.stack([a32, s32 * a32], axis=1).astype(np.float64)
        return Tables(ts[start:].astype(F32), np.array(rows), np.ones(len(s32)), noise, 1.0)
