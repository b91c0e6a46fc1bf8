"""sdrt's numpy schedulers against diffusers 0.42.1's, call by call, from the same scheduler_config dicts.

Both sides get the same float32 noise, model outputs (random: there is no model) and, for euler_a, the same
per-step noise. Every call's output must equal diffusers' to 1e-6 * max(1, max|x|) given the same input, and a
free-running sdrt chain must stay within 1e-6 * sqrt(calls) of diffusers' chain (see `run_chain`). Timesteps
must be equal (Euler with Karras sigmas: within 1e-4, see test_euler_karras_from_config).
"""

import subprocess
import sys
import textwrap
from contextlib import contextmanager

import numpy as np
import pytest

from sdrt.errors import InputError, ModelError
from sdrt.schedulers import SCHEDULER_NAMES, make_scheduler

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
import diffusers.schedulers.scheduling_ddpm as ddpm_module  # noqa: E402
import diffusers.schedulers.scheduling_dpmsolver_multistep as dpm_multistep_module  # noqa: E402
import diffusers.schedulers.scheduling_dpmsolver_singlestep as dpm_singlestep_module  # noqa: E402
import diffusers.schedulers.scheduling_euler_ancestral_discrete as euler_a_module  # noqa: E402
import diffusers.schedulers.scheduling_lcm as lcm_module  # noqa: E402
import diffusers.schedulers.scheduling_tcd as tcd_module  # noqa: E402

NOISE_MODULES = (euler_a_module, dpm_multistep_module, dpm_singlestep_module, ddpm_module, lcm_module, tcd_module)

SD15 = {
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None, "clip_sample": False,
}  # fmt: skip
SD21 = {
    "_class_name": "DDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
}  # fmt: skip
CONFIGS = {
    "sd15": SD15,
    "sd21": SD21,
    "sd15_trailing": {**SD15, "timestep_spacing": "trailing"},
    "sd15_linspace_v": {**SD15, "timestep_spacing": "linspace", "prediction_type": "v_prediction"},
    "sd21_leading": {**SD21, "timestep_spacing": "leading"},
    # Keys the file lacks take each class's defaults: linear betas, DDIM's clip_sample and set_alpha_to_one.
    "bare": {"_class_name": "DDIMScheduler", "beta_schedule": "linear"},
    "clip": {**SD15, "clip_sample": True, "clip_sample_range": 1.5, "set_alpha_to_one": True},
    "cosine": {**SD15, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"},
    "trained": {**SD15, "trained_betas": np.linspace(1e-4, 0.02, 1000).tolist()},
    "zero_snr": {**SD21, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
}

# sdrt name -> (diffusers class, from_config kwargs).
KARRAS = {"use_karras_sigmas": True}
EXPONENTIAL = {"use_exponential_sigmas": True}
SDE = {"algorithm_type": "sde-dpmsolver++"}
DIFFUSERS = {
    "ddim": (diffusers.DDIMScheduler, {}),
    "pndm": (diffusers.PNDMScheduler, {}),
    "euler": (diffusers.EulerDiscreteScheduler, {}),
    "euler_karras": (diffusers.EulerDiscreteScheduler, KARRAS),
    "euler_exponential": (diffusers.EulerDiscreteScheduler, EXPONENTIAL),
    "euler_a": (diffusers.EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (diffusers.DPMSolverMultistepScheduler, {"use_karras_sigmas": False}),
    "dpmpp_2m_karras": (diffusers.DPMSolverMultistepScheduler, KARRAS),
    "dpmpp_2m_exponential": (diffusers.DPMSolverMultistepScheduler, EXPONENTIAL),
    "lms": (diffusers.LMSDiscreteScheduler, {}),
    "lms_karras": (diffusers.LMSDiscreteScheduler, KARRAS),
    "lms_exponential": (diffusers.LMSDiscreteScheduler, EXPONENTIAL),
    "heun": (diffusers.HeunDiscreteScheduler, {}),
    "heun_karras": (diffusers.HeunDiscreteScheduler, KARRAS),
    "heun_exponential": (diffusers.HeunDiscreteScheduler, EXPONENTIAL),
    "unipc": (diffusers.UniPCMultistepScheduler, {}),
    "unipc_karras": (diffusers.UniPCMultistepScheduler, KARRAS),
    "unipc_exponential": (diffusers.UniPCMultistepScheduler, EXPONENTIAL),
    "dpmpp_2m_sde": (diffusers.DPMSolverMultistepScheduler, SDE),
    "dpmpp_2m_sde_karras": (diffusers.DPMSolverMultistepScheduler, {**SDE, **KARRAS}),
    "dpmpp_2m_sde_exponential": (diffusers.DPMSolverMultistepScheduler, {**SDE, **EXPONENTIAL}),
    "dpmpp_2s_a": (diffusers.DPMSolverSinglestepScheduler, SDE),
    "dpmpp_2s_a_karras": (diffusers.DPMSolverSinglestepScheduler, {**SDE, **KARRAS}),
    "dpmpp_2s_a_exponential": (diffusers.DPMSolverSinglestepScheduler, {**SDE, **EXPONENTIAL}),
    "ddpm": (diffusers.DDPMScheduler, {}),
    "lcm": (diffusers.LCMScheduler, {}),
    "tcd": (diffusers.TCDScheduler, {}),
}
# Where diffusers' own float32 arithmetic is the larger error, the tolerance against it is wider, and
# test_closer_to_float64_diffusers shows sdrt within 1e-6 of diffusers run in float64 instead:
# - LMS and Heun form the ODE derivative d = (x - x0) / sigma in float32: x0 = x - sigma e keeps only ulp(|x|), so d
#   carries ulp(|x|) / sigma (sdrt folds it exactly, d = e). At the last Karras sigmas (~0.03) with these tests'
#   random |x| ~ 50, and LMS's order-4 coefficients, that is up to ~6e-6 relative (measured: diffusers float32 vs
#   float64 5.8e-6 on exponential sigmas, trailing, 50 steps; sdrt vs float64 <= 1.6e-7 on every config).
# - UniPC computes phi_k(h) recursively in float32 (h_phi_k / h - 1/k! cancels for small h): ~3e-6 at 50 steps.
# - DDPM's beta_t = 1 - a/a' cancels in float32 for close timesteps: up to ~5e-6 on the cosine schedule.
TOLERANCE = {"lms": 1e-5, "heun": 5e-6, "unipc": 4e-6, "ddpm": 6e-6}
TOLERANCE.update({f"{name}_{sigmas}": TOLERANCE[name] for name in ("lms", "heun", "unipc") for sigmas in ("karras", "exponential")})
# Karras/exponential sigmas give fractional timesteps (Euler, LMS, Heun keep them): within torch's sqrt ulps.
FRACTIONAL = {f"{name}_{sigmas}" for name in ("euler", "lms", "heun") for sigmas in ("karras", "exponential")}
SHAPE = (2, 4, 8, 8)
# Steps -> img2img strengths run (1.0 = txt2img); fewer strengths at high step counts keep the file fast.
STRENGTHS = {1: (1.0,), 4: (1.0, 0.75, 0.6, 0.3), 10: (1.0, 0.75, 0.6, 0.3), 25: (1.0, 0.6), 50: (1.0, 0.3)}
MEASURED = {}  # name -> [max abs error, max relative error] over every call checked, for the report


def reference(name, config, exact_sqrt=False):
    """diffusers' scheduler for an sdrt name; exact_sqrt: build it with a correctly rounded Tensor.sqrt.

    torch's CPU float32 sqrt (MKL here) is 1 ulp off the correctly rounded one for ~16% of inputs. In
    rescale_zero_terminal_snr those ulps reach alphas_cumprod (3.8e-6 relative, measured); sdrt's float32 numpy
    rescale equals diffusers' bit for bit once diffusers' sqrt rounds correctly (test_zero_snr_betas).
    """
    cls, fixed = DIFFUSERS[name]
    if not exact_sqrt:
        return cls.from_config(config, **fixed)
    original = torch.Tensor.sqrt
    torch.Tensor.sqrt = lambda t: torch.from_numpy(np.sqrt(t.numpy().astype(np.float64)).astype(np.float32))
    try:
        return cls.from_config(config, **fixed)
    finally:
        torch.Tensor.sqrt = original


@contextmanager
def fixed_step_noise(noise):
    """diffusers' ancestral/SDE schedulers draw their step noise with randn_tensor: hand them ours instead."""
    originals = [m.randn_tensor for m in NOISE_MODULES]
    for m in NOISE_MODULES:
        m.randn_tensor = lambda *args, **kwargs: noise
    try:
        yield
    finally:
        for m, original in zip(NOISE_MODULES, originals):
            m.randn_tensor = original


def close(name, ours, ref, what, tol=1e-6, kind="step", inputs=0.0):
    """Assert |ours - ref| <= tol * max(1, max|ref|, inputs) and record the error.

    `inputs` (the largest input magnitude) counts in the scale because float32 rounding scales with it: the first
    Euler step of a cosine or zero-SNR schedule cancels inputs of ~500-4000 down to outputs of ~20.
    """
    ref = ref.numpy() if hasattr(ref, "numpy") else np.asarray(ref)
    assert ours.dtype == np.float32, f"{what}: dtype {ours.dtype}"
    err = float(np.abs(ours.astype(np.float64) - ref).max())
    scale = max(1.0, float(np.abs(ref).max()), inputs)
    record = MEASURED.setdefault((name, kind), [0.0, 0.0])
    record[0], record[1] = max(record[0], err), max(record[1], err / scale)
    assert err <= tol * scale, f"{what}: max error {err:.3g} at scale {scale:.3g}"


def run_chain(name, config, n, strength, exact_sqrt=False, tol=1e-6, label="", perturb=None, timestep_atol=0.0,
              chain_tol=None):  # fmt: skip
    """Run sdrt and diffusers side by side as the img2img/txt2img pipelines do; compare every call.

    `ours` takes diffusers' sample as its input at every call (its history then comes from the same inputs as
    diffusers'), so each call's error is that call's alone: it must be <= 1e-6 relative. `free` runs its own
    chain, so float32 rounding accumulates in both chains independently (a random walk of ~1e-7 per call);
    it must stay <= 1e-6 * sqrt(calls so far) relative. Returns how far the steps moved the sample.
    """
    ours, free = make_scheduler(name, config), make_scheduler(name, config)
    ours.set_timesteps(n, strength)
    free.set_timesteps(n, strength)
    if perturb is not None:  # (row, column, factor): a deliberate error, to show the comparison catches it
        ours.coefficients[perturb[:2]] *= perturb[2]
    ref = reference(name, config, exact_sqrt)
    ref.set_timesteps(n)
    t_start = max(n - min(int(n * strength), n), 0)  # StableDiffusionImg2ImgPipeline.get_timesteps
    ref_ts = ref.timesteps[t_start * ref.order :]
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(t_start * ref.order)
    assert ours.num_calls == len(ref_ts)
    np.testing.assert_allclose(ours.timesteps, ref_ts.numpy().astype(np.float32), rtol=0, atol=timestep_atol)

    rng = np.random.default_rng(0)
    noise = rng.standard_normal(SHAPE, dtype=np.float32)
    if strength == 1.0:
        # Within 1 ulp: diffusers' sigmas come from torch's float32 sqrt (see `reference`).
        ref_sigma = np.float32(float(ref.init_noise_sigma))
        assert abs(np.float32(ours.init_noise_sigma) - ref_sigma) <= np.spacing(ref_sigma)
        x, x_ref = noise * np.float32(ours.init_noise_sigma), torch.from_numpy(noise) * ref.init_noise_sigma
    else:
        image = rng.standard_normal(SHAPE, dtype=np.float32)
        x = ours.add_noise(image, noise, 0)
        x_ref = ref.add_noise(torch.from_numpy(image), torch.from_numpy(noise), ref_ts[:1])
        close(name, x, x_ref, f"add_noise n={n} strength={strength}", tol, label + "add_noise")
    x_ref = x_ref.to(torch.float32)
    x_free = x
    peak = float(np.abs(x).max())  # the free chain's largest sample so far: its rounding errors scale with it
    moved = 0.0
    for i, t in enumerate(ref_ts):
        x = x_ref.numpy().copy()
        scaled, scaled_ref = ours.scale_model_input(x, i), ref.scale_model_input(x_ref, t)
        close(name, scaled, scaled_ref, f"scale_model_input call {i}", tol, label + "scale")
        output = rng.standard_normal(SHAPE, dtype=np.float32)
        step_noise = rng.standard_normal(SHAPE, dtype=np.float32) if ours.needs_noise else None
        with fixed_step_noise(None if step_noise is None else torch.from_numpy(step_noise)):
            x_ref = ref.step(torch.from_numpy(output), t, x_ref).prev_sample
        what = f"call {i} of {len(ref_ts)} (n={n}, strength={strength})"
        x_new = ours.step(output, i, x, step_noise)
        close(name, x_new, x_ref, what, tol, label + "step", inputs=float(np.abs(x).max()))
        peak = max(peak, float(np.abs(x_free).max()))
        x_free = free.step(output, i, x_free, step_noise)
        chain = (chain_tol or tol) * (i + 1) ** 0.5
        close(name, x_free, x_ref, f"free-running {what}", chain, label + "chain", inputs=peak)
        moved = max(moved, float(np.abs(x_new - x).max()) / max(1.0, float(np.abs(x_new).max())))
    return moved


@pytest.mark.parametrize("n", STRENGTHS)
@pytest.mark.parametrize("config", ["sd15", "sd21", "sd15_trailing", "sd15_linspace_v", "sd21_leading"])
@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_matches_diffusers(name, config, n):
    atol = 1e-4 if name in FRACTIONAL else 0.0
    tol = TOLERANCE.get(name, 1e-6)
    moved = [run_chain(name, CONFIGS[config], n, s, tol=tol, timestep_atol=atol) for s in STRENGTHS[n] if int(n * s) >= 1]
    # Steps move the sample far beyond the tolerance, so an identity step would fail. (A single step to
    # timestep 0 may legitimately barely move: DDIM from t=0 to the final alpha, Euler from sigma 0.03.)
    assert max(moved) > 1e-3 or n == 1


@pytest.mark.parametrize("config", ["bare", "clip", "cosine", "trained", "zero_snr"])
@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_config_variants(name, config):
    if config == "zero_snr" and name == "pndm":
        pytest.skip("PNDMScheduler has no rescale_betas_zero_snr")
    atol = 1e-4 if name in FRACTIONAL else 0.0
    tol = TOLERANCE.get(name, 1e-6)
    # Heun on the cosine schedule: its second call redoes the first step from sigma_max ~7e4 with the derivative at
    # sigma_next, which multiplies the free chain's float32 rounding of the first call by dt / sigma_next ~ 10^3
    # (in diffusers' chain as in sdrt's). Each call given the same inputs still agrees to `tol`.
    chain_tol = 3e-4 if name.startswith("heun") and config == "cosine" else None
    for n, strength in ((10, 1.0), (25, 1.0), (20, 0.6)):
        moved = run_chain(name, CONFIGS[config], n, strength, tol=tol, exact_sqrt=config == "zero_snr",
                          timestep_atol=atol, chain_tol=chain_tol)  # fmt: skip
        assert moved > 1e-3


@pytest.mark.parametrize("name", ["ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras"])
def test_zero_snr_against_stock_torch(name):
    """Zero-SNR against diffusers on stock torch: alphas_cumprod differ by torch's sqrt ulps (see `reference`)."""
    for n, strength in ((10, 1.0), (25, 1.0), (20, 0.6)):
        run_chain(name, CONFIGS["zero_snr"], n, strength, tol=3e-6, label="stock-torch-zero-snr ")


def float64_reference(name, config, n, seed=0):
    """Max relative distance of sdrt's chain, and of diffusers' float32 chain, to diffusers run in float64 (its
    tables, sample, outputs and noise cast to float64), both given the float64 chain's sample at every call."""
    ours, ref, ref32 = make_scheduler(name, config), reference(name, config), reference(name, config)
    for s in (ours, ref, ref32):
        s.set_timesteps(n)
    for attr in ("sigmas", "alphas_cumprod", "alpha_t", "sigma_t", "lambda_t", "final_alpha_cumprod", "one"):
        if torch.is_tensor(getattr(ref, attr, None)):
            setattr(ref, attr, getattr(ref, attr).double())
    rng = np.random.default_rng(seed)
    x_ref = torch.from_numpy(rng.standard_normal(SHAPE, dtype=np.float32)).double() * float(ref.init_noise_sigma)
    worst = worst32 = 0.0
    for i, t in enumerate(ref.timesteps):
        x = x_ref.numpy().astype(np.float32)
        ref.scale_model_input(x_ref, t), ref32.scale_model_input(torch.from_numpy(x), t)
        out, step_noise = (rng.standard_normal(SHAPE, dtype=np.float32) for _ in range(2))
        with fixed_step_noise(torch.from_numpy(step_noise).double()):
            x_ref = ref.step(torch.from_numpy(out).double(), t, torch.from_numpy(x).double()).prev_sample
        with fixed_step_noise(torch.from_numpy(step_noise)):
            x32 = ref32.step(torch.from_numpy(out), t, torch.from_numpy(x)).prev_sample.numpy()
        mine = ours.step(out, i, x, step_noise if ours.needs_noise else None)
        scale = max(1.0, float(np.abs(x).max()), float(np.abs(x_ref.numpy()).max()))
        worst = max(worst, float(np.abs(mine - x_ref.numpy()).max()) / scale)
        worst32 = max(worst32, float(np.abs(x32 - x_ref.numpy()).max()) / scale)
    return worst, worst32


@pytest.mark.parametrize(
    "name,config",
    [("lms_karras", "sd15_trailing"), ("lms_exponential", "sd15_trailing"), ("unipc", "sd21"),
     ("ddpm", "sd15_linspace_v"), ("ddpm", "cosine"), ("heun", "sd21")],
)
def test_closer_to_float64_diffusers(name, config):
    """Where TOLERANCE is wider than 1e-6, the difference is diffusers' float32 rounding: sdrt stays within 1e-6
    of diffusers' own algorithm run in float64 (measured 1.2e-7..4.1e-7), closer than diffusers' float32 is."""
    worst, worst32 = float64_reference(name, CONFIGS[config], 50)
    assert worst <= 1e-6 and worst < worst32, (worst, worst32)


def test_zero_snr_betas():
    """sdrt's float32 rescale equals diffusers' once torch's sqrt rounds correctly, and differs without that."""
    ours = make_scheduler("euler", CONFIGS["zero_snr"]).alphas_cumprod
    exact = reference("euler", CONFIGS["zero_snr"], exact_sqrt=True).alphas_cumprod.numpy()
    stock = reference("euler", CONFIGS["zero_snr"]).alphas_cumprod.numpy()
    assert np.array_equal(ours, exact)
    assert ours[-1] == 2**-24
    np.testing.assert_allclose(ours[:-1], stock[:-1], rtol=1e-5)
    assert not np.array_equal(ours, stock)  # if this fails, torch's sqrt now rounds correctly: drop exact_sqrt


@pytest.mark.parametrize(
    "name,extra",
    [
        ("dpmpp_2m", {"solver_type": "heun"}),
        ("dpmpp_2m", {"final_sigmas_type": "sigma_min"}),
        ("dpmpp_2m", {"euler_at_final": True, "lower_order_final": False}),
        ("dpmpp_2m", {"lambda_min_clipped": -5.1}),
        ("dpmpp_2m_karras", {"timestep_spacing": "leading"}),
        ("euler", {"final_sigmas_type": "sigma_min"}),
    ],
)
def test_dpm_and_euler_options(name, extra):
    config = {**SD15, "_class_name": "DPMSolverMultistepScheduler", **extra}
    for n, strength in ((10, 1.0), (20, 1.0), (30, 0.75)):
        assert run_chain(name, config, n, strength) > 1e-3


def test_euler_karras_from_config():
    """An Euler config with use_karras_sigmas keeps it; its timesteps are fractional."""
    config = {**SD15, "_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True}
    s = make_scheduler(None, config)
    s.set_timesteps(25)
    assert s.name == "euler_karras" and s.timesteps[1] != np.round(s.timesteps[1])
    # diffusers' sigmas come from torch's float32 sqrt, 1 ulp off the correctly rounded numpy one for ~16% of
    # them (see `reference`), which moves a fractional Karras timestep by up to ~6e-5 (1 ulp near 999).
    for n, strength in ((4, 1.0), (25, 1.0), (50, 1.0), (30, 0.6)):
        assert run_chain("euler_karras", config, n, strength, timestep_atol=1e-4) > 1e-3
    assert make_scheduler("euler", config).name == "euler"  # an explicit name decides the sigmas, as for DPM


def test_from_config_defaults():
    """Keys a config lacks take the *target* class's defaults, as diffusers' from_config does."""
    euler = make_scheduler("euler", SD15)
    assert euler.config["timestep_spacing"] == "linspace" and euler.config["steps_offset"] == 1
    euler.set_timesteps(10)
    assert euler.timesteps[0] == 999.0 and euler.timesteps[-1] == 0.0  # linspace, not SD 1.5's leading
    ddim = make_scheduler("ddim", {"_class_name": "PNDMScheduler"})
    assert ddim.config["clip_sample"] is True and ddim.config["set_alpha_to_one"] is True
    dpm = make_scheduler(None, {**SD15, "_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True})
    assert dpm.name == "dpmpp_2m_karras"
    assert make_scheduler("dpmpp_2m", dpm.config).name == "dpmpp_2m"  # the name decides Karras
    # _use_default_values marks keys diffusers wrote but the user never set: they count as absent.
    marked = {**SD15, "timestep_spacing": "leading", "_use_default_values": ["timestep_spacing"]}
    marked = make_scheduler("euler", marked)
    assert marked.config["timestep_spacing"] == "linspace"


def test_class_names_and_fallback():
    assert type(make_scheduler(None, SD15)).__name__ == "PNDM"
    assert make_scheduler(None, SD21).name == "ddim"
    assert make_scheduler("EulerAncestralDiscreteScheduler", SD15).name == "euler_a"
    assert make_scheduler(None, {**SD15, "_class_name": "LMSDiscreteScheduler"}).name == "lms"
    kdpm2 = make_scheduler(None, {**SD15, "_class_name": "KDPM2DiscreteScheduler"})
    assert kdpm2.name == "pndm" and kdpm2.config["steps_offset"] == 1  # the config's betas, with PNDM
    sde = {**SD15, "_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"}
    assert make_scheduler(None, sde).name == "dpmpp_2m_sde" and make_scheduler("dpmpp_2m", sde).name == "dpmpp_2m"
    assert make_scheduler("DPMSolverSinglestepScheduler", SD15).name == "dpmpp_2s"  # the class default: not SDE
    assert make_scheduler(None, {}).name == "pndm"


def test_update_runs_on_torch():
    """`update` with torch tensors and a float64 torch coefficient row equals the numpy path."""
    rng = np.random.default_rng(3)
    for name in SCHEDULER_NAMES:
        for config in (SD15, SD21, CONFIGS["clip"]):
            s = make_scheduler(name, config)
            s.set_timesteps(12)
            x = rng.standard_normal(SHAPE, dtype=np.float32) * 3
            hist_np, hist_t = s.init_history(x), s.init_history(torch.from_numpy(x))
            coefs_t = torch.from_numpy(s.coefficients)
            for i in range(s.num_calls):
                out = rng.standard_normal(SHAPE, dtype=np.float32)
                nz = rng.standard_normal(SHAPE, dtype=np.float32) if s.needs_noise else None
                x_t = torch.from_numpy(x)
                prev_t, hist_t = s.update(
                    coefs_t[i], x_t, torch.from_numpy(out), hist_t, None if nz is None else torch.from_numpy(nz)
                )
                x, hist_np = s.update(s.coefficients[i].tolist(), x, out, hist_np, nz)
                assert prev_t.dtype == torch.float32 and x.dtype == np.float32
                np.testing.assert_allclose(prev_t.numpy(), x, rtol=1e-6, atol=1e-6 * max(1, np.abs(x).max()))
                x = prev_t.numpy()  # keep both paths on the same inputs


def test_clip_callable_is_used():
    s = make_scheduler("ddim", CONFIGS["clip"])
    s.set_timesteps(4)
    seen = []
    x = np.full(SHAPE, 5, np.float32)
    s.step(np.zeros(SHAPE, np.float32), 0, x, clip=lambda a, lo, hi: seen.append((lo, hi)) or a.clip(lo, hi))
    assert seen == [(-1.5, 1.5)]


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_comparison_catches_small_errors(name):
    """One coefficient off by 10x the tolerance (relative; 1e-5 for most) in one call must fail: the tolerance is
    tight enough to matter. Traced schedulers: the largest coefficient of the row's prev output (other columns
    fill the history, which shows only at a later call)."""
    s = make_scheduler(name, SD21)
    s.set_timesteps(10)
    row = s.num_calls // 2
    names = s.coefficient_names
    columns = [k for k, c in enumerate(names) if c.startswith("prev_from_")] if names[0] == "x0_from_sample" else range(len(names))
    column = max(columns, key=lambda k: abs(s.coefficients[row, k]))
    tol = TOLERANCE.get(name, 1e-6)
    with pytest.raises(AssertionError, match=f"call {row} "):
        # fractional timesteps (Karras sigmas mapped back) as test_matches_diffusers allows: 1 ulp apart on AVX2
        run_chain(name, SD21, 10, 1.0, tol=tol, label="perturbed ", perturb=(row, column, 1 + 10 * tol),
                  timestep_atol=1e-4 if name in FRACTIONAL else 0.0)


def test_defaults_are_diffusers_init_defaults():
    """Each class's DEFAULTS (written into every export's manifest) equals its diffusers class's __init__ defaults."""
    import inspect

    from sdrt.schedulers import scheduler_defaults

    defaults = scheduler_defaults()
    for name in defaults:
        cls = DIFFUSERS[name][0]
        params = inspect.signature(cls.__init__).parameters
        expected = {k: p.default for k, p in params.items() if k != "self"}
        assert defaults[name] == expected, name
    assert {"lms", "heun", "unipc", "dpmpp_2s_a", "ddpm", "lcm", "tcd"} <= set(defaults)


def test_a1111_names_complete():
    """Every sdrt name, and every name a scheduler reports from a config, has one distinct A1111 name."""
    from sdrt.schedulers import A1111_NAMES

    assert set(A1111_NAMES) == set(SCHEDULER_NAMES)
    assert len(set(A1111_NAMES.values())) == len(A1111_NAMES)
    for name in SCHEDULER_NAMES:
        s = make_scheduler(name, SD15)
        assert s.name == name, (name, s.name)  # what PNG metadata records, through A1111_NAMES
    expected = {"euler_a": "Euler a", "dpmpp_2m_karras": "DPM++ 2M Karras", "dpmpp_2m_sde": "DPM++ 2M SDE",
                "dpmpp_2s_a": "DPM++ 2S a", "lms": "LMS", "heun": "Heun", "unipc": "UniPC", "ddpm": "DDPM", "lcm": "LCM"}  # fmt: skip
    assert {k: A1111_NAMES[k] for k in expected} == expected


def test_pndm_calls_and_history():
    s = make_scheduler("pndm", SD15)
    s.set_timesteps(10)
    assert s.num_calls == 11 and s.timesteps[1] == s.timesteps[2] == 801
    assert len(s.init_history(np.zeros(SHAPE, np.float32))) == 4
    assert s.coefficients.shape == (11, len(s.coefficient_names))
    # Without skip_prk_steps (or without the key: diffusers' default) the Runge-Kutta warm-up runs: n + 9 calls.
    for config in ({**SD15, "skip_prk_steps": False}, {k: v for k, v in SD15.items() if k != "skip_prk_steps"}):
        prk = make_scheduler("pndm", config)
        prk.set_timesteps(10)
        assert type(prk).__name__ == "PNDMRungeKutta" and prk.name == "pndm" and prk.num_calls == 19
        assert prk.timesteps[:4].tolist() == [901, 851, 851, 801]


@pytest.mark.parametrize("config", ["sd15", "sd21", "sd15_trailing", "sd21_leading", "bare"])
def test_pndm_runge_kutta_matches_diffusers(config):
    """PNDM with skip_prk_steps false equals diffusers' step_prk + step_plms, txt2img and img2img (whose call
    counter restarts at 0 on the truncated list, as in diffusers). That img2img quirk steps the Runge-Kutta
    calls from the top timestep's alpha to a low one (sqrt(a'/a) ~ 10 on v-prediction), which scales diffusers'
    float32 rounding by as much: 3e-6 there."""
    cfg = {**CONFIGS[config], "skip_prk_steps": False}
    for n, strength in ((4, 1.0), (10, 1.0), (25, 1.0), (50, 1.0), (10, 0.75), (25, 0.6), (50, 0.3)):
        assert run_chain("pndm", cfg, n, strength, tol=1e-6 if strength == 1.0 else 3e-6) > 1e-3
    with pytest.raises(InputError, match=">= 4 steps"):  # diffusers fails (a shape error) below 4
        make_scheduler("pndm", cfg).set_timesteps(3)
    from sdrt.inputs import check_steps  # the pipeline's check names that minimum, not a broken config

    with pytest.raises(InputError, match=">= 4 steps"):
        check_steps(2, make_scheduler("pndm", cfg))
    assert check_steps(4, make_scheduler("pndm", cfg)) == 4


def test_step_order_and_noise_are_checked():
    s = make_scheduler("euler_a", SD15)
    s.set_timesteps(5)
    x = np.zeros(SHAPE, np.float32)
    with pytest.raises(InputError, match="fresh noise"):
        s.step(x, 0, x)
    with pytest.raises(InputError, match="in order"):
        s.step(x, 2, x, x)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: make_scheduler("foo", SD15), "unknown scheduler 'foo'; choose one of ddim, pndm, euler, euler_karras, euler_exponential, euler_a"),
        (lambda: make_scheduler("ddim", SD15).set_timesteps(0), "num_inference_steps 0"),
        (lambda: make_scheduler("ddim", SD15).set_timesteps(2000), "exceeds"),
        (lambda: make_scheduler("ddim", SD15).set_timesteps(10, 0.0), "strength 0.0"),
        (lambda: make_scheduler("ddim", SD15).set_timesteps(10, 1.5), "strength 1.5"),
        (
            lambda: make_scheduler("euler", SD15).set_timesteps(10, 0.05),
            "strength 0.05 with 10 steps runs no step; raise strength or steps",
        ),
    ],
)
def test_input_errors(call, message):
    with pytest.raises(InputError, match=message):
        call()


@pytest.mark.parametrize(
    "name,extra",
    [
        ("ddim", {"prediction_type": "sample"}),
        ("ddim", {"thresholding": True}),
        ("euler", {"timestep_spacing": "middle"}),
        ("dpmpp_2m", {"use_beta_sigmas": True}),
        (None, {"_class_name": "DPMSolverMultistepScheduler", "solver_order": 3}),
        (None, {"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver"}),
        (None, {"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True, "use_exponential_sigmas": True}),
        ("unipc", {"solver_order": 4}),
        ("ddpm", {"variance_type": "learned_range"}),
        ("ddpm", {"thresholding": True}),
        (None, {"_class_name": "DPMSolverSinglestepScheduler", "algorithm_type": "dpmsolver"}),
        ("pndm", {"beta_schedule": "cubic"}),
    ],
)
def test_unsupported_configs_are_refused(name, extra):
    with pytest.raises(ModelError):
        make_scheduler(name, {**SD15, **extra}).set_timesteps(10)


def test_runs_without_torch():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["torch"] = None  # any `import torch` now fails
        import numpy as np
        from sdrt.schedulers import SCHEDULER_NAMES, make_scheduler
        config = {"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                  "beta_end": 0.012, "steps_offset": 1, "skip_prk_steps": True}
        for name in SCHEDULER_NAMES:
            s = make_scheduler(name, config)
            s.set_timesteps(6, 0.5)
            x = s.add_noise(np.ones((1, 4, 8, 8), np.float32), np.zeros((1, 4, 8, 8), np.float32), 0)
            for i in range(s.num_calls):
                x = s.step(np.zeros_like(x), i, s.scale_model_input(x, i), np.zeros_like(x))
            assert x.dtype == np.float32 and np.isfinite(x).all(), name
        assert "diffusers" not in sys.modules
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def report_measured():  # a helper for reports, run by hand after the tests
    for (name, kind), (err, rel) in sorted(MEASURED.items()):
        print(f"{name:16s} {kind:10s} abs {err:.3g} rel {rel:.3g}")


@pytest.mark.parametrize("name", ["unipc", "heun", "euler", "dpmpp_2m"])
def test_denoising_start_keeps_the_calls_diffusers_keeps(name):
    """A refiner's window (denoising_start) starts where diffusers' SDXL img2img starts it: the calls below the
    cut-off, made odd only for a scheduler with two UNet calls per step (diffusers' order 2: Heun). UniPC's
    solver_order 2 is still one call per step (diffusers' UniPC has order 1)."""
    cls, kwargs = DIFFUSERS[name]
    for n, fraction in ((8, 0.7), (10, 0.8), (9, 0.5)):
        ref = cls.from_config(SD15, **kwargs)
        ref.set_timesteps(n)
        count = int((ref.timesteps < int(round(1000 - fraction * 1000))).sum())
        if ref.order == 2 and count % 2 == 0:
            count += 1
        ours = make_scheduler(name, SD15)
        ours.set_timesteps(n, denoising_start=fraction)
        np.testing.assert_array_equal(ours.timesteps, ref.timesteps[len(ref.timesteps) - count :].numpy().astype(np.float32))
