"""LMS (Karras et al. 2022's linear multistep on the sigma ODE), equal to diffusers' LMSDiscreteScheduler (order 4).

The sample lives at noise level sigma, as in Euler (same timesteps, sigmas, input scale, init sigma, add_noise).
Each call turns the output into the ODE derivative d = (x - x0) / sigma and steps with the last (up to) four
derivatives: prev = x + sum_k c_k d_{-k}, where c_k integrates the Lagrange basis polynomial of the last sigmas
over [sigma, sigma_next]. diffusers integrates it numerically with scipy.integrate.quad; the integrand is a
polynomial of degree <= 3, so sdrt integrates it exactly (numpy.poly1d). Like diffusers, the order is
min(step index + 1, 4) with the step index counted from the start of the *untruncated* schedule, and only the
derivatives stored so far are summed (img2img's first call uses c_0 of a higher-order rule alone).
history = (d_-1, d_-2, d_-3), newest first. Traced (see traced.py).
"""

from __future__ import annotations

import numpy as np

from sdrt.schedulers.euler import Euler
from sdrt.schedulers.traced import TracedStep

ORDER = 4


def lms_coefficient(s: np.ndarray, order: int, t: int, current: int) -> float:
    """Exact integral over [s[t], s[t+1]] of prod_{k != current} (tau - s[t-k]) / (s[t-current] - s[t-k])."""
    poly = np.poly1d([1.0])
    for k in range(order):
        if k != current:
            poly = poly * np.poly1d([1.0, -s[t - k]]) / (s[t - current] - s[t - k])
    integral = poly.integ()
    return float(integral(s[t + 1]) - integral(s[t]))


class LMS(TracedStep, Euler):
    name = "lms"
    DEFAULTS = dict(  # LMSDiscreteScheduler.__init__, diffusers 0.42.1
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False, prediction_type="epsilon",
        timestep_spacing="linspace", steps_offset=0,
    )  # fmt: skip
    history_size = ORDER - 1

    def _tables(self, n: int, start: int):
        tables = Euler._tables(self, n, start)  # timesteps, input scale, add_noise, init sigma as Euler's
        _, sigmas = self._sigmas(n)
        s = sigmas.astype(np.float64)
        rows, stored = [], 0
        for k in range(start, n):
            tr = self._tracer()
            x, out, sigma = tr.sample, tr.output, s[k]
            if self.config["prediction_type"] == "epsilon":
                x0 = x - out * sigma
            else:
                x0 = out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
            d = (x - tr.pred_x0(x0)) / sigma
            derivatives = [d, *tr.history[:stored]]  # newest first, as reversed(self.derivatives)
            order = min(k + 1, ORDER)
            coeffs = [lms_coefficient(s, order, k, j) for j in range(order)]
            prev = x + sum(c * dd for c, dd in zip(coeffs, derivatives))
            rows.append(tr.row(prev, [d, *tr.history[: ORDER - 2]]))
            stored = min(stored + 1, ORDER - 1)
        return tables._replace(coefficients=np.array(rows))
