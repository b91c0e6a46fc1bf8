"""LCM and TCD: the consistency-model samplers, equal to diffusers' LCMScheduler and TCDScheduler.

Both pick n timesteps from the 'original' distillation schedule (original_inference_steps, 50 by default:
T/50 * [1..50] - 1, then n of them evenly, from the top), and both run on any model (images are poor without
an LCM/TCD-distilled UNet; the arithmetic is what sdrt matches).

LCM, per call at timestep t (next t' in the list; t itself at the last call):
    x0 = (x - sqrt(1-a) e) / sqrt(a)  (clamped if clip_sample),  denoised = c_out x0 + c_skip x,
    c_skip = 0.25 / ((10 t)^2 + 0.25), c_out = 10 t / sqrt((10 t)^2 + 0.25)   (sigma_data 0.5, timestep_scaling 10)
    prev = sqrt(a') denoised + sqrt(1-a') noise,  except at the last call: prev = denoised (no noise).
TCD, with gamma = eta (sdrt: 0.3, TCDScheduler.step's default; diffusers' StableDiffusionPipeline passes its own
eta argument, 0.0 unless given) and s = floor((1 - gamma) t'):
    noised = sqrt(a_s) x0 + sqrt(1-a_s) eps;  prev = sqrt(a'/a_s) noised + sqrt(1 - a'/a_s) noise  (not at the last call)
Traced (see traced.py).
"""

from __future__ import annotations

import numpy as np

from sdrt.errors import InputError, ModelError
from sdrt.schedulers.base import F32, Scheduler, Tables
from sdrt.schedulers.traced import TracedStep

TCD_ETA = 0.3


class LCM(TracedStep, Scheduler):
    name = "lcm"
    DEFAULTS = dict(  # LCMScheduler.__init__, diffusers 0.42.1
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        trained_betas=None, original_inference_steps=50, clip_sample=False, clip_sample_range=1.0,
        set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon", thresholding=False,
        dynamic_thresholding_ratio=0.995, sample_max_value=1.0, timestep_spacing="leading", timestep_scaling=10.0,
        rescale_betas_zero_snr=False,
    )  # fmt: skip
    needs_noise = True

    def __init__(self, config: dict, **overrides):
        super().__init__(config, **overrides)
        if self.config["thresholding"]:
            raise ModelError(f"{self.name}'s dynamic thresholding (for pixel-space models) is unsupported; turn it off")
        self.final_alpha = 1.0 if self.config["set_alpha_to_one"] else float(self.alphas_cumprod[0])

    def _timesteps(self, n: int) -> np.ndarray:
        T = self.num_train_timesteps
        original = int(self.config["original_inference_steps"])
        if original > T:
            raise ModelError(f"original_inference_steps {original} exceeds the {T} training timesteps")
        origin = np.asarray(list(range(1, original + 1))) * (T // original) - 1
        if n > original or len(origin) // n < 1:
            raise InputError(
                f"{self.name} takes at most original_inference_steps={original} steps; {n} were asked for"
            )
        origin = origin[::-1].copy()
        return origin[np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)]

    def _tables(self, n: int, start: int) -> Tables:
        ts = self._timesteps(n)
        rows, noise = [], []
        for k in range(start, n):
            tr = self._tracer()
            rows.append(tr.row(self._prev(tr, ts, k, n), []))
            a32 = self.alphas_cumprod[int(ts[k])]
            noise.append((np.sqrt(a32), np.sqrt(F32(1) - a32)))
        return Tables(ts[start:].astype(F32), np.array(rows), np.ones(n - start), np.array(noise, np.float64), 1.0)

    def _x0_eps(self, tr, a):
        x, out = tr.sample, tr.output
        if self.config["prediction_type"] == "epsilon":
            if a == 0:
                raise ModelError("epsilon prediction at a zero-SNR timestep divides by zero; use v_prediction")
            return (x - out * (1 - a) ** 0.5) / a**0.5, out
        return x * a**0.5 - out * (1 - a) ** 0.5, out * a**0.5 + x * (1 - a) ** 0.5

    def _prev(self, tr, ts, k, n):
        t = int(ts[k])
        prev_t = int(ts[k + 1]) if k + 1 < n else t
        a = self._alpha(t)
        a_prev = self._alpha(prev_t) if prev_t >= 0 else self.final_alpha
        scaled = t * float(self.config["timestep_scaling"])
        c_skip = 0.25 / (scaled**2 + 0.25)
        c_out = scaled / (scaled**2 + 0.25) ** 0.5
        x0, _ = self._x0_eps(tr, a)
        denoised = tr.pred_x0(x0) * c_out + tr.sample * c_skip
        if k == n - 1:
            return denoised
        return denoised * a_prev**0.5 + tr.noise * (1 - a_prev) ** 0.5


class TCD(LCM):
    name = "tcd"
    DEFAULTS = dict(LCM.DEFAULTS)  # TCDScheduler.__init__, diffusers 0.42.1: the same keys and values as LCM's

    def __init__(self, config: dict, eta: float = TCD_ETA, **overrides):
        super().__init__(config, **overrides)
        if not 0 <= eta <= 1:
            raise InputError(f"TCD's eta (gamma) {eta} must be in [0, 1]")
        self.eta = float(eta)
        self.config["eta"] = self.eta  # not a diffusers config key (step's argument): kept so caches key on it
        self.needs_noise = self.eta > 0

    @property
    def _clip_range(self):
        return None  # TCDScheduler.step never clamps x0, whatever clip_sample says

    def _prev(self, tr, ts, k, n):
        t = int(ts[k])
        prev_t = int(ts[k + 1]) if k + 1 < n else 0
        # torch: floor((1 - eta) * int64 tensor) in float32
        s_t = int(np.floor(np.float32(1 - self.eta) * np.float32(prev_t)))
        a = self._alpha(t)
        a_prev = self._alpha(prev_t) if prev_t >= 0 else self.final_alpha
        a_s = self._alpha(s_t)
        x0, eps = self._x0_eps(tr, a)
        noised = x0 * a_s**0.5 + eps * (1 - a_s) ** 0.5
        if self.eta > 0 and k != n - 1:
            return noised * (a_prev / a_s) ** 0.5 + tr.noise * (1 - a_prev / a_s) ** 0.5
        return noised
