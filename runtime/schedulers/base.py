"""What every sdrt scheduler shares: config resolution, the noise schedule, timestep spacing, the step contract.

A scheduler step is a linear combination of a few arrays with per-step scalars. `set_timesteps` computes
those scalars on the host (float64) into `coefficients[num_calls, K]`, so one `update` function runs the step
on numpy arrays, on torch device tensors, inside a CUDA graph (the row then lives in a device buffer) and in
C++. `update` uses only `+ - *` on the arrays (plus one optional clamp), never a numpy call. Schedulers whose
step is more involved build their rows by tracing diffusers' step on symbolic arrays (traced.py).

The schedule tables (betas, alphas_cumprod, sigmas) are built in float32 exactly as diffusers 0.42.1 builds
them with torch, so timesteps match bit for bit and the coefficients differ from diffusers' float32 scalars
only by float32 rounding.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from sdrt.errors import InputError, ModelError

F32 = np.float32
SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def resolve_config(defaults: dict, config: dict, overrides: dict) -> dict:
    """diffusers' `from_config`: the target class takes its own keys from `config`, its defaults for the rest.

    Keys listed in `_use_default_values` count as absent, as in diffusers; keys of other classes are ignored.
    """
    ignored = set(config.get("_use_default_values", ()))
    out = {k: (config[k] if k in config and k not in ignored else v) for k, v in defaults.items()}
    out.update(overrides)
    return out


def torch_linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(start, end, n, dtype=float32) on the CPU, bit for bit.

    torch's kernel computes `start + step*k` for the first half and `end - step*(n-1-k)` for the second, each as
    one fused multiply-add in float32; float64 emulates the single rounding (the product is exact in float64).
    np.linspace differs from it in ~30% of the 1000 betas, and those ulps reach alphas_cumprod.
    """
    lo, hi = F32(start), F32(end)
    if n == 1:
        return np.array([lo], F32)
    step = np.float64((hi - lo) / F32(n - 1))
    k = np.arange(n, dtype=np.float64)
    first = np.float64(lo) + step * k
    second = np.float64(hi) - step * (n - 1 - k)
    return np.where(k < n // 2, first, second).astype(F32)


def cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    """diffusers' betas_for_alpha_bar (squaredcos_cap_v2), computed in Python floats and stored as float32."""

    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)], F32)


def cumprod_f32(alphas: np.ndarray) -> np.ndarray:
    """torch.cumprod on float32 CPU tensors: a float64 running product, each entry rounded to float32."""
    return np.cumprod(alphas.astype(np.float64)).astype(F32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """diffusers' rescale_zero_terminal_snr (arXiv 2305.08891, Algorithm 1), in float32 like theirs."""
    root = np.sqrt(cumprod_f32(F32(1) - betas))
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))
    bar = root * root
    return F32(1) - np.concatenate([bar[:1], bar[1:] / bar[:-1]])


def make_alphas_cumprod(cfg: dict) -> np.ndarray:
    """float32 alphas_cumprod[num_train_timesteps] from the config's beta settings."""
    n = int(cfg["num_train_timesteps"])
    if cfg.get("trained_betas") is not None:
        betas = np.asarray(cfg["trained_betas"], dtype=np.float64).astype(F32)
    elif cfg["beta_schedule"] == "linear":
        betas = torch_linspace_f32(cfg["beta_start"], cfg["beta_end"], n)
    elif cfg["beta_schedule"] == "scaled_linear":
        betas = torch_linspace_f32(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n) ** 2
    elif cfg["beta_schedule"] == "squaredcos_cap_v2":
        betas = cosine_betas(n)
    else:
        raise ModelError(
            f"beta_schedule {cfg['beta_schedule']!r} is not supported; use one of {', '.join(BETA_SCHEDULES)}"
        )
    if cfg.get("rescale_betas_zero_snr"):
        betas = rescale_zero_terminal_snr(betas)
    return cumprod_f32(F32(1) - betas)


def train_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """float32 sqrt((1 - a) / a) per training timestep, the Euler/DPM noise levels, as diffusers computes them."""
    return np.sqrt((F32(1) - alphas_cumprod) / alphas_cumprod)


def karras_sigmas(in_sigmas: np.ndarray, n: int, sigma_min=None, sigma_max=None) -> np.ndarray:
    """Karras et al. (2022) rho=7 sigmas between the schedule's ends, as diffusers' _convert_to_karras."""
    lo = sigma_min if sigma_min is not None else in_sigmas[-1].item()
    hi = sigma_max if sigma_max is not None else in_sigmas[0].item()
    ramp = np.linspace(0, 1, n)
    return (hi ** (1 / 7.0) + ramp * (lo ** (1 / 7.0) - hi ** (1 / 7.0))) ** 7.0


def exponential_sigmas(in_sigmas: np.ndarray, n: int, sigma_min=None, sigma_max=None) -> np.ndarray:
    """Sigmas evenly spaced in log between the schedule's ends, as diffusers' _convert_to_exponential."""
    lo = sigma_min if sigma_min is not None else in_sigmas[-1].item()
    hi = sigma_max if sigma_max is not None else in_sigmas[0].item()
    return np.exp(np.linspace(math.log(hi), math.log(lo), n))


def alpha_sigma_lambda(sigmas: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The DPM-Solver family's alpha_t, sigma_t and lambda_t = log(alpha_t / sigma_t) from k-diffusion sigmas (float64);
    a final sigma of 0 gives lambda = inf (and e^-h = 0 in the solvers), as intended."""
    s = np.asarray(sigmas, np.float64)
    alpha = 1 / np.sqrt(s * s + 1)
    sig = s * alpha
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sig)
    return alpha, sig, lam


def sigma_to_t(sigma, log_sigmas: np.ndarray) -> np.ndarray:
    """The fractional training timestep of a sigma, interpolated in log-sigma (diffusers' _sigma_to_t)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(np.shape(sigma))


def spaced_timesteps(spacing: str, n: int, num_train: int, steps_offset: int, round_linspace: bool = True):
    """Descending inference timesteps as DDIM, PNDM and the Euler schedulers space them (float64 values).

    Euler keeps linspace's fractions (`round_linspace=False`, computed in float32 like diffusers); the others
    round them. 'leading' adds steps_offset; 'trailing' ends at num_train - 1.
    """
    if spacing == "linspace":
        if round_linspace:
            return np.linspace(0, num_train - 1, n).round()[::-1].astype(np.float64)
        return np.linspace(0, num_train - 1, n, dtype=F32)[::-1].astype(np.float64)
    if spacing == "leading":
        return (np.arange(0, n) * (num_train // n)).round()[::-1].astype(np.float64) + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(num_train, 0, -num_train / n)) - 1.0
    raise ModelError(f"timestep_spacing {spacing!r} is not supported; use one of {', '.join(SPACINGS)}")


def clamp(x, lo: float, hi: float, clip=None):
    """The one non-linear op (clip_sample): `clip(x, lo, hi)` if given, else torch's `.clamp`, else numpy's `.clip`."""
    if clip is not None:
        return clip(x, lo, hi)
    if hasattr(x, "clamp"):
        return x.clamp(lo, hi)
    return x.clip(lo, hi)


class Tables(NamedTuple):
    """What a scheduler computes in set_timesteps, one row per UNet call of the (truncated) schedule."""

    timesteps: np.ndarray  # float32 [calls]: the UNet's timestep input
    coefficients: np.ndarray  # float64 [calls, K]: the scalars `update` combines the arrays with
    input_scale: np.ndarray  # float64 [calls]: scale_model_input's factor
    noise_coefficients: np.ndarray  # float64 [calls, 2]: add_noise = original * [0] + noise * [1]
    init_noise_sigma: float


class Scheduler:
    """A scheduler configured from a diffusers scheduler_config.json dict; see the module docstring.

    Subclasses set `name`, `DEFAULTS` (their diffusers class's __init__ defaults), `coefficient_names`,
    `history_size`, and implement `_tables(n, start)` and `update(...)`.
    """

    name = ""
    DEFAULTS: dict = {}
    coefficient_names: tuple = ()
    history_size = 0
    needs_noise = False
    # UNet calls per step: diffusers' class attribute `order` (Heun's 2); not a solver's order (UniPC's solver_order 2
    # is one call per step, and diffusers' UniPC has order 1).
    calls_per_step = 1

    def __init__(self, config: dict, **overrides):
        self.config = resolve_config(self.DEFAULTS, dict(config), overrides)
        cfg = self.config
        if cfg.get("prediction_type") not in PREDICTION_TYPES:
            raise ModelError(
                f"prediction_type {cfg.get('prediction_type')!r} is not supported; sdrt's schedulers take "
                f"{' or '.join(PREDICTION_TYPES)}"
            )
        if "timestep_spacing" in cfg and cfg["timestep_spacing"] not in SPACINGS:  # (DPM singlestep has none)
            raise ModelError(
                f"timestep_spacing {cfg.get('timestep_spacing')!r} is not supported; use one of {', '.join(SPACINGS)}"
            )
        self.num_train_timesteps = int(cfg["num_train_timesteps"])
        self.alphas_cumprod = make_alphas_cumprod(cfg)
        self.timesteps = None
        self._history = None
        self._next = 0

    def __repr__(self):
        calls = "no timesteps yet" if self.timesteps is None else f"{self.num_calls} calls"
        return f"<sdrt scheduler {self.name}: {calls}>"

    def set_timesteps(self, num_inference_steps: int, strength: float = 1.0, denoising_start: float | None = None,
                      denoising_end: float | None = None) -> None:
        """Build the per-call tables; strength < 1 keeps the schedule's tail as diffusers' img2img does.

        denoising_start / denoising_end (fractions of the training schedule, SDXL's ensemble of experts): run only
        the calls whose timesteps lie below / at or above the cut-off, as diffusers' SDXL pipelines do. The end cuts
        the full schedule's tables (its calls are those of the whole run); the start begins a schedule of its own
        there (strength is then ignored), as diffusers' img2img with set_begin_index."""
        if denoising_start is not None:
            self.set_timesteps(num_inference_steps)
            start = self._start_for(num_inference_steps, self._cutoff(denoising_start), strict=True)
            self._set(num_inference_steps, start)
        else:
            self._set_strength(num_inference_steps, strength)
        if denoising_end is not None:
            keep = int(np.sum(self.timesteps >= self._cutoff(denoising_end)))
            if keep == 0:
                raise InputError(f"denoising_end {denoising_end} runs no step; raise it")
            self._truncate(keep)

    def _cutoff(self, fraction: float) -> int:
        if not (isinstance(fraction, float) and 0 < fraction < 1):
            raise InputError(f"denoising_start/denoising_end {fraction!r} must be a float in (0, 1), e.g. 0.8")
        return int(round(self.num_train_timesteps - fraction * self.num_train_timesteps))

    def _start_for(self, n: int, cutoff: int, strict: bool) -> int:
        """The first step whose schedule holds exactly the calls diffusers keeps below `cutoff` (a 2nd-order
        scheduler's count is made odd, so that a hand-over never splits a step's two calls)."""
        count = int(np.sum(self.timesteps < cutoff))
        if self.calls_per_step == 2 and count % 2 == 0:
            count += 1
        if count == 0:
            raise InputError("denoising_start leaves no step to run; lower it")
        for start in range(n):
            if len(self._tables(n, start).timesteps) == count:
                return start
        raise InputError(f"the {self.name} scheduler cannot start {count} calls before the end of its schedule; "
                         "use another denoising_start or scheduler")

    def _truncate(self, calls: int) -> None:
        self.timesteps = self.timesteps[:calls]
        self.coefficients = self.coefficients[:calls]
        self.input_scale = self.input_scale[:calls]
        self.noise_coefficients = self.noise_coefficients[:calls]

    def _set_strength(self, num_inference_steps: int, strength: float) -> None:
        n = num_inference_steps
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise InputError(f"num_inference_steps {n!r} must be an integer >= 1")
        if n > self.num_train_timesteps:
            raise InputError(
                f"num_inference_steps {n} exceeds the model's {self.num_train_timesteps} training timesteps"
            )
        if not 0 < strength <= 1:
            raise InputError(f"strength {strength} must be in (0, 1]; 1 ignores the init image entirely")
        init_timestep = min(int(n * strength), n)
        if init_timestep == 0:
            raise InputError(f"strength {strength} with {n} steps runs no step; raise strength or steps")
        self._set(int(n), max(n - init_timestep, 0))

    def _set(self, n: int, start: int) -> None:
        tables = self._tables(n, start)
        self.timesteps = tables.timesteps.astype(F32)
        self.coefficients = np.asarray(tables.coefficients, np.float64).reshape(len(self.timesteps), -1)
        self.input_scale = np.asarray(tables.input_scale, np.float64)
        self.noise_coefficients = np.asarray(tables.noise_coefficients, np.float64)
        self.init_noise_sigma = float(tables.init_noise_sigma)
        self.reset()

    @property
    def num_calls(self) -> int:
        return len(self.timesteps)

    def reset(self) -> None:
        """Forget the step history; the next `step` must be call 0."""
        self._history = None
        self._next = 0

    def select_rows(self, rows) -> None:
        """Keep only these rows of the step history (a batch lost some rows between steps)."""
        if self._history is not None:
            self._history = tuple(h[rows] for h in self._history)

    def init_history(self, like) -> tuple:
        """The zero history `update` starts from: `history_size` arrays shaped and typed like `like`."""
        if hasattr(like, "new_zeros"):  # torch
            return tuple(like.new_zeros(like.shape) for _ in range(self.history_size))
        return tuple(np.zeros_like(like) for _ in range(self.history_size))

    def scale_model_input(self, sample, i: int):
        """The UNet input for call i (Euler divides by sqrt(sigma^2 + 1); the others pass the sample through)."""
        scale = float(self.input_scale[i])
        return sample if scale == 1.0 else sample * scale

    def add_noise(self, original, noise, i: int):
        """Noise clean latents to the level of call i (img2img: i = 0), as diffusers' add_noise does."""
        a, b = self.noise_coefficients[i].tolist()
        return original * a + noise * b

    def step(self, model_output, i: int, sample, noise=None, clip=None):
        """One step with the history kept on self: row lookup + `update`. Calls must come in order 0, 1, ..."""
        if self.timesteps is None:
            raise InputError("call set_timesteps before step")
        if i != self._next:
            raise InputError(f"step {i} called where step {self._next} is due; steps run in order (reset() restarts)")
        if self.needs_noise:
            if noise is None:
                raise InputError(f"{self.name} adds fresh noise each step; pass noise shaped like the sample")
            if isinstance(noise, np.ndarray) and isinstance(sample, np.ndarray) and noise.dtype != sample.dtype:
                noise = noise.astype(sample.dtype)
        if self._history is None:
            self._history = self.init_history(sample)
        # A list of Python floats: a float64 numpy row would promote float32 arrays to float64 (NEP 50).
        row = self.coefficients[i].tolist()
        prev, self._history = self.update(row, sample, model_output, self._history, noise, clip)
        self._next += 1
        return prev

    def update(self, coefs, sample, model_output, history, noise=None, clip=None):
        """(prev_sample, new_history): one step from row `coefs` of `coefficients`, by `+` and `*` only.

        coefs is read as coefs[k]: Python floats (what `step` passes), a 1-D torch tensor row on the arrays'
        device (its 0-d elements keep float32 tensors float32), or a numpy row of the arrays' dtype. A float64
        numpy row works but turns float32 numpy results into float64 (NumPy 2 promotion). history is the fixed-
        length tuple from `init_history`; the arrays pass through untouched, so torch tensors stay on device.
        noise: this step's fresh noise (ancestral schedulers only). clip: see `clamp` (DDIM's clip_sample).
        """
        raise NotImplementedError

    def _tables(self, n: int, start: int) -> Tables:
        raise NotImplementedError

    def _alpha(self, t: int) -> float:
        """alphas_cumprod at an integer training timestep, refusing one outside the training range."""
        if not 0 <= t < self.num_train_timesteps:
            raise InputError(
                f"timestep {t} is outside the model's 0..{self.num_train_timesteps - 1}; "
                "use fewer steps or another timestep_spacing"
            )
        return float(self.alphas_cumprod[t])
