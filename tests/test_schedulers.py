"""Schedulers: parity with diffusers 0.42.1 (timesteps, sigmas, scale_model_input, add_noise, every step), config
reading and swapping, img2img starts, and loud errors on bad input.

Tolerance: the parity contract's 1e-6 relative per step output over whole trajectories (DESIGN.md). Both sides do
the same float32 arithmetic in the same order, so most errors are exactly 0; LMS differs by float32 rounding
because diffusers integrates its coefficients with scipy.quad on a float32 integrand and we integrate the
polynomial exactly (measured <= ~1e-7).
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import diffusers
import pytest
import torch
from scipy import integrate

from ldm import schedulers as S
from ldm.schedulers.lms import lms_coefficient
from tests.helpers import diffusers_config, rel_err

TOL = 1e-6
NAMES = ["ddim", "lms", "pndm", "euler", "euler-a", "dpm++2m", "dpm++2m-karras"]
CLASSES = [S.DDIMScheduler, S.LMSDiscreteScheduler, S.PNDMScheduler, S.EulerDiscreteScheduler,
           S.EulerAncestralDiscreteScheduler, S.DPMSolverMultistepScheduler]
STEP_SPREAD = [1, 2, 3, 7, 10, 25, 33, 50, 100]
SD15 = diffusers_config("sd15", "scheduler")  # the official PNDM config (skip_prk_steps, steps_offset 1 ...)
SD21 = diffusers_config("sd21", "scheduler")  # the official DDIM v-prediction config (carries skip_prk_steps)


def build(name: str, config: dict, **overrides: Any) -> tuple[S.Scheduler, Any]:
    """Ours and diffusers' scheduler of that name from the same config dict."""
    ours = S.from_name(name, {**config, **overrides})
    ref_cls = getattr(diffusers, type(ours).__name__)
    ref = ref_cls.from_config({**config, **overrides, **S.OVERRIDES.get(name, {})})
    return ours, ref


def fake_model(x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """A smooth deterministic stand-in for the UNet: depends on x and t, output of order 1."""
    tf = float(t)
    return 0.8 * torch.tanh(x) * math.cos(tf / 300.0) + 0.1 * torch.sin(3.0 * x) + 0.05 * tf / 1000.0


def ref_step(ref: Any, model_output: torch.Tensor, t: torch.Tensor, x: torch.Tensor,
             generator: torch.Generator, eta: float) -> torch.Tensor:
    kwargs = {}
    if isinstance(ref, diffusers.DDIMScheduler):
        kwargs = {"eta": eta, "generator": generator}
    elif isinstance(ref, (diffusers.EulerDiscreteScheduler, diffusers.EulerAncestralDiscreteScheduler,
                          diffusers.DPMSolverMultistepScheduler)):
        kwargs = {"generator": generator}
    return ref.step(model_output, t, x, **kwargs).prev_sample


def run_trajectory(ours: S.Scheduler, ref: Any, timesteps_ours: torch.Tensor, timesteps_ref: torch.Tensor,
                   x: torch.Tensor, eta: float = 0.0, seed: int = 0) -> float:
    """Drive both along their own trajectories with the fake model; assert every step; return the worst error."""
    assert torch.equal(timesteps_ours, timesteps_ref) and timesteps_ours.dtype == timesteps_ref.dtype
    g_ours, g_ref = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    x_ours, x_ref, worst = x.clone(), x.clone(), 0.0
    for i, (t_ours, t_ref) in enumerate(zip(timesteps_ours, timesteps_ref)):
        in_ours, in_ref = ours.scale_model_input(x_ours, t_ours), ref.scale_model_input(x_ref, t_ref)
        err_in = rel_err(in_ours, in_ref)
        kwargs = {"eta": eta} if isinstance(ours, S.DDIMScheduler) else {}
        x_ours = ours.step(fake_model(in_ours, t_ours), t_ours, x_ours, generator=g_ours, **kwargs)
        x_ref = ref_step(ref, fake_model(in_ref, t_ref), t_ref, x_ref, g_ref, eta)
        err = rel_err(x_ours, x_ref)
        assert err_in <= TOL and err <= TOL, f"step {i} (t={float(t_ref)}): input err {err_in:.2e}, step err {err:.2e}"
        worst = max(worst, err, err_in)
    assert torch.isfinite(x_ours).all()
    return worst


# ----------------------------------------------------------------------------------------------------------------
# Timesteps and sigmas: identical for every step count 1..100


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("name", NAMES)
def test_timesteps_and_sigmas_identical_for_1_to_100_steps(name: str, spacing: str) -> None:
    ours, ref = build(name, SD15, timestep_spacing=spacing)
    for n in range(1, 101):
        ours.set_timesteps(n)
        ref.set_timesteps(n)
        assert ours.timesteps.dtype == ref.timesteps.dtype, f"{name} n={n}: dtype"
        assert torch.equal(ours.timesteps, ref.timesteps), f"{name} {spacing} n={n}: timesteps differ"
        if hasattr(ref, "sigmas") and not isinstance(ref, (diffusers.DDIMScheduler, diffusers.PNDMScheduler)):
            assert torch.equal(ours.sigmas, ref.sigmas), f"{name} {spacing} n={n}: sigmas differ"
        assert float(ours.init_noise_sigma) == float(ref.init_noise_sigma), f"{name} {spacing} n={n}"


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_alphas_cumprod_identical_for_every_beta_schedule(cls: type) -> None:
    for schedule in ["linear", "scaled_linear", "squaredcos_cap_v2"]:
        cfg = {**SD15, "beta_schedule": schedule}
        ours, ref = cls.from_config(cfg), getattr(diffusers, cls.__name__).from_config(cfg)
        assert torch.equal(ours.betas, ref.betas) and torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    betas = torch.linspace(1e-4, 0.03, 1000).tolist()
    ours = cls.from_config({**SD15, "trained_betas": betas})
    assert torch.equal(ours.alphas_cumprod, getattr(diffusers, cls.__name__)(trained_betas=betas).alphas_cumprod)
    assert len(ours) == 1000 and ours.order == getattr(diffusers, cls.__name__).order == 1
    with pytest.raises(ValueError, match="trained_betas"):
        cls.from_config({**SD15, "trained_betas": betas[:10]})


# ----------------------------------------------------------------------------------------------------------------
# Whole trajectories: scale_model_input and every step within 1e-6


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", NAMES)
def test_trajectory_parity_official_config(name: str, prediction_type: str) -> None:
    worst = 0.0
    for n in STEP_SPREAD:
        ours, ref = build(name, SD15, prediction_type=prediction_type)
        ours.set_timesteps(n)
        ref.set_timesteps(n)
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(n)) * ref.init_noise_sigma
        worst = max(worst, run_trajectory(ours, ref, ours.timesteps, ref.timesteps, x, seed=n))
    assert worst <= TOL


VARIANTS = [  # (name, config overrides, DDIM eta): the options diffusers implements and we mirror
    ("ddim", {}, 0.7),  # eta > 0: variance noise from the same CPU generator
    ("ddim", {"timestep_spacing": "linspace"}, 1.0),
    ("ddim", {"set_alpha_to_one": True, "clip_sample": True, "timestep_spacing": "trailing"}, 0.0),
    ("ddim", {"timestep_spacing": "linspace", "beta_schedule": "squaredcos_cap_v2"}, 0.0),
    ("ddim", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, 0.0),  # v only (zero SNR)
    ("pndm", {"skip_prk_steps": False}, 0.0),  # the pseudo Runge-Kutta warm-up
    ("pndm", {"set_alpha_to_one": True, "timestep_spacing": "trailing", "beta_schedule": "linear"}, 0.0),
    ("lms", {"use_karras_sigmas": True}, 0.0),
    ("lms", {"timestep_spacing": "leading"}, 0.0),
    ("euler", {"timestep_spacing": "leading"}, 0.0),  # init_noise_sigma = sqrt(sigma_max^2 + 1)
    ("euler", {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}, 0.0),
    ("euler", {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0}, 0.0),
    ("euler", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, 0.0),  # v only (zero SNR)
    ("euler-a", {"timestep_spacing": "trailing"}, 0.0),
    ("dpm++2m", {"solver_order": 3}, 0.0),
    ("dpm++2m", {"solver_type": "heun", "lower_order_final": False}, 0.0),
    ("dpm++2m", {"final_sigmas_type": "sigma_min", "euler_at_final": True, "timestep_spacing": "leading"}, 0.0),
    ("dpm++2m", {"solver_order": 1, "timestep_spacing": "trailing"}, 0.0),
    ("dpm++2m", {"lambda_min_clipped": -5.1}, 0.0),
    ("dpm++2m-karras", {"timestep_spacing": "trailing", "solver_order": 3}, 0.0),
    ("dpm++2m-karras", {"beta_schedule": "linear", "final_sigmas_type": "sigma_min"}, 0.0),
]


# zero terminal SNR needs v-prediction: eps at alpha_bar = 0 gives x0 = 0/0 (NaN in diffusers too)
VARIANT_CASES = [(*v, p) for v in VARIANTS for p in ("epsilon", "v_prediction")
                 if not (v[1].get("rescale_betas_zero_snr") and p == "epsilon")]


@pytest.mark.parametrize(("name", "overrides", "eta", "prediction_type"), VARIANT_CASES, ids=lambda v: str(v))
def test_trajectory_parity_variants(name: str, overrides: dict, eta: float, prediction_type: str) -> None:
    for n in [1, 4, 7, 20, 33]:
        if overrides.get("skip_prk_steps") is False and n < 4:
            continue
        ours, ref = build(name, SD15, prediction_type=prediction_type, **overrides)
        ours.set_timesteps(n)
        ref.set_timesteps(n)
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(100 + n)) * ref.init_noise_sigma
        run_trajectory(ours, ref, ours.timesteps, ref.timesteps, x, eta=eta, seed=n)


def test_ddim_eta_draws_noise_like_diffusers_and_changes_the_result() -> None:
    """eta > 0 is reproducible from the generator and differs from eta = 0 (so the noise is really used)."""
    ours, _ = build("ddim", SD21)
    ours.set_timesteps(10)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = ours.timesteps[3]
    a = ours.step(fake_model(x, t), t, x, generator=torch.Generator().manual_seed(5), eta=1.0)
    b = ours.step(fake_model(x, t), t, x, generator=torch.Generator().manual_seed(5), eta=1.0)
    c = ours.step(fake_model(x, t), t, x, eta=0.0)
    assert torch.equal(a, b) and rel_err(a, c) > 1e-3


def test_per_sample_generator_list_matches_diffusers() -> None:
    """A list of generators (one per batch item, the pipeline's seed S+i) draws as diffusers' randn_tensor."""
    ours, ref = build("euler-a", SD15)
    ours.set_timesteps(5)
    ref.set_timesteps(5)
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * ref.init_noise_sigma
    t = ours.timesteps[0]
    mo = fake_model(ours.scale_model_input(x, t), t)
    ref.scale_model_input(x, t)
    got = ours.step(mo, t, x, generator=[torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    want = ref.step(mo, t, x, generator=[torch.Generator().manual_seed(s) for s in (1, 2, 3)]).prev_sample
    assert rel_err(got, want) <= TOL


def test_euler_churn_matches_diffusers() -> None:
    ours, ref = build("euler", SD15)
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * ref.init_noise_sigma
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for t in ours.timesteps:
        mo = fake_model(ours.scale_model_input(x, t), t)
        ref.scale_model_input(x, t)
        a = ours.step(mo, t, x, generator=g1, s_churn=1.0)
        b = ref.step(mo, t, x, generator=g2, s_churn=1.0).prev_sample
        assert rel_err(a, b) <= TOL
        x = a


@pytest.mark.parametrize("name", NAMES)
def test_fp16_trajectory_keeps_dtype_and_matches(name: str) -> None:
    """fp16 latents (the CUDA fp16 pipeline's dtype): same dtype and same numbers as diffusers (1e-3: fp16 eps)."""
    ours, ref = build(name, SD15)
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    x = (torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * ref.init_noise_sigma).half()
    x_ours, x_ref = x.clone(), x.clone()
    g_ours, g_ref = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for t in ours.timesteps:
        mo = fake_model(ours.scale_model_input(x_ours, t).float(), t).half()
        mr = fake_model(ref.scale_model_input(x_ref, t).float(), t).half()
        x_ours = ours.step(mo, t, x_ours, generator=g_ours)
        x_ref = ref_step(ref, mr, t, x_ref, g_ref, 0.0)
        assert x_ours.dtype == x_ref.dtype == torch.float16
        assert rel_err(x_ours, x_ref) <= 1e-3


# ----------------------------------------------------------------------------------------------------------------
# add_noise and img2img starts


@pytest.mark.parametrize("name", NAMES)
def test_add_noise_matches_diffusers(name: str) -> None:
    ours, ref = build(name, SD15)
    ours.set_timesteps(25)
    ref.set_timesteps(25)
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    for k in [0, 5, 17, 24]:
        ts_ours, ts_ref = ours.timesteps[[k, k, 24 - k]], ref.timesteps[[k, k, 24 - k]]
        got, want = ours.add_noise(x0, noise, ts_ours), ref.add_noise(x0, noise, ts_ref)
        assert rel_err(got, want) <= TOL, f"{name} k={k}"


def diffusers_img2img_timesteps(ref: Any, n: int, strength: float) -> torch.Tensor:
    """StableDiffusionImg2ImgPipeline.get_timesteps, verbatim in effect."""
    ref.set_timesteps(n)
    init_timestep = min(int(n * strength), n)
    t_start = max(n - init_timestep, 0)
    timesteps = ref.timesteps[t_start * ref.order:]
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(t_start * ref.order)
    return timesteps


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", NAMES)
def test_img2img_start_parity(name: str, prediction_type: str) -> None:
    for n, strength in [(10, 0.75), (33, 0.5), (7, 1.0), (25, 0.3), (4, 0.6)]:
        ours, ref = build(name, SD15, prediction_type=prediction_type)
        ts_ours = ours.timesteps_for_strength(n, strength)
        ts_ref = diffusers_img2img_timesteps(ref, n, strength)
        x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(n))
        noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(n + 1))
        start_ours = ours.add_noise(x0, noise, ts_ours[:1].repeat(2))
        start_ref = ref.add_noise(x0, noise, ts_ref[:1].repeat(2))
        assert rel_err(start_ours, start_ref) <= TOL, f"{name} n={n} strength={strength}: add_noise"
        run_trajectory(ours, ref, ts_ours, ts_ref, start_ref, seed=n)


def test_img2img_strength_bounds() -> None:
    ours = S.EulerDiscreteScheduler.from_config(SD15)
    with pytest.raises(ValueError, match="strength"):
        ours.timesteps_for_strength(10, 1.5)
    with pytest.raises(ValueError, match="strength"):
        ours.timesteps_for_strength(10, 0.05)  # int(10 * 0.05) = 0 steps left
    assert len(ours.timesteps_for_strength(10, 0.5)) == 5 and ours.begin_index == 5


# ----------------------------------------------------------------------------------------------------------------
# LMS coefficients: exact integration equals a high-precision quadrature


def test_lms_coefficients_exact() -> None:
    sched = S.LMSDiscreteScheduler.from_config(SD15)
    sched.set_timesteps(12)
    sig = sched.sigmas.double().tolist()
    for i in [3, 6, 10]:
        for order in [1, 2, 3, 4]:
            for j in range(order):
                def basis(tau: float) -> float:
                    return math.prod((tau - sig[i - k]) / (sig[i - j] - sig[i - k]) for k in range(order) if k != j)
                want = integrate.quad(basis, sig[i], sig[i + 1], epsabs=0, epsrel=1e-13)[0]
                assert abs(lms_coefficient(sig, i, order, j) - want) <= 1e-11 * max(1.0, abs(want))


# ----------------------------------------------------------------------------------------------------------------
# Config: the keys diffusers accepts, swapping, loud errors


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_config_keys_and_defaults_equal_diffusers(cls: type) -> None:
    params = inspect.signature(getattr(diffusers, cls.__name__).__init__).parameters
    want = {k: p.default for k, p in params.items() if k != "self"}
    assert cls._DEFAULTS.keys() == want.keys()
    for key, value in want.items():
        ours = cls._DEFAULTS[key]
        assert ours == value or (isinstance(value, float) and math.isinf(value) and ours == value), key


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_config_round_trips_through_diffusers(cls: type) -> None:
    ref_cls = getattr(diffusers, cls.__name__)
    live = ref_cls.from_config(SD21).config  # a live diffusers FrozenDict, with _-prefixed keys
    ours = cls.from_config(live)
    back = ref_cls.from_config(ours.config)
    assert ours.config["_class_name"] == cls.__name__
    for key in cls._DEFAULTS:
        assert back.config[key] == ours.config[key] == live[key], key


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("family", ["sd15", "sd21", "sd21base", "sd15-inpaint", "sd2-inpaint"])
def test_official_configs_load_and_swap(name: str, family: str) -> None:
    """Keys of other classes (skip_prk_steps to Euler, clip_sample to PNDM ...) are ignored as diffusers does."""
    sched = S.from_name(name, diffusers_config(family, "scheduler"))
    assert isinstance(sched, S.SCHEDULERS[name])
    assert sched.config.get("use_karras_sigmas", False) == (name == "dpm++2m-karras")
    swapped = S.from_name("euler", sched.config)  # from_config of another class's .config
    assert swapped.config["beta_schedule"] == "scaled_linear"


def test_from_name_unknown() -> None:
    with pytest.raises(ValueError, match="heun"):
        S.from_name("heun", SD15)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_bad_config_values_raise_naming_the_key(cls: type) -> None:
    with pytest.raises(ValueError, match="beta_schedule"):
        cls.from_config({**SD15, "beta_schedule": "cubic"})
    with pytest.raises(ValueError, match="prediction_type"):
        cls.from_config({**SD15, "prediction_type": "x0"})
    with pytest.raises(ValueError, match="timestep_spacing"):
        cls.from_config({**SD15, "timestep_spacing": "even"})
    with pytest.raises(ValueError, match="no_such_key"):
        cls.from_config({**SD15, "no_such_key": 1})
    with pytest.raises(ValueError, match="num_train_timesteps"):
        cls.from_config({**SD15, "num_train_timesteps": 0})
    with pytest.raises(TypeError, match="config"):
        cls.from_config(["not", "a", "dict"])
    assert cls.from_config({**SD15, "_anything": object(), "_class_name": "Foo"}).config["_class_name"] == cls.__name__


@pytest.mark.parametrize(("cls", "key", "value"), [
    (S.DDIMScheduler, "thresholding", True),
    (S.LMSDiscreteScheduler, "use_exponential_sigmas", True),
    (S.LMSDiscreteScheduler, "use_beta_sigmas", True),
    (S.EulerDiscreteScheduler, "interpolation_type", "log_linear"),
    (S.EulerDiscreteScheduler, "timestep_type", "continuous"),
    (S.EulerDiscreteScheduler, "final_sigmas_type", "middle"),
    (S.DPMSolverMultistepScheduler, "algorithm_type", "sde-dpmsolver++"),
    (S.DPMSolverMultistepScheduler, "use_lu_lambdas", True),
    (S.DPMSolverMultistepScheduler, "variance_type", "learned_range"),
    (S.DPMSolverMultistepScheduler, "solver_order", 4),
    (S.PNDMScheduler, "skip_prk_steps", "yes"),
], ids=lambda v: getattr(v, "__name__", str(v)))
def test_unimplemented_features_raise_naming_the_key(cls: type, key: str, value: object) -> None:
    with pytest.raises(ValueError, match=key):
        cls.from_config({**SD15, key: value})


# ----------------------------------------------------------------------------------------------------------------
# Bad input at run time


@pytest.mark.parametrize("name", NAMES)
def test_bad_step_counts(name: str) -> None:
    sched = S.from_name(name, SD15)
    for n in [0, -3]:
        with pytest.raises(ValueError, match="num_inference_steps"):
            sched.set_timesteps(n)
    with pytest.raises(ValueError, match="num_train_timesteps"):
        sched.set_timesteps(1001)
    with pytest.raises(TypeError, match="num_inference_steps"):
        sched.set_timesteps(7.0)
    sched.set_timesteps(1000)  # the maximum is allowed
    assert len(sched.timesteps) >= 999


def test_pndm_prk_needs_four_steps() -> None:
    with pytest.raises(ValueError, match="num_inference_steps"):
        S.PNDMScheduler.from_config({**SD15, "skip_prk_steps": False}).set_timesteps(3)


@pytest.mark.parametrize("name", NAMES)
def test_timestep_not_in_schedule(name: str) -> None:
    sched = S.from_name(name, SD15)
    sched.set_timesteps(10)
    x = torch.zeros(1, 4, 8, 8)
    bad = torch.tensor(123.5) if sched.timesteps.is_floating_point() else torch.tensor(123)
    with pytest.raises(ValueError, match="not in the schedule"):
        sched.step(x, bad, x)
    if isinstance(sched, (S.SigmaScheduler, S.DPMSolverMultistepScheduler)):  # they look t up in the schedule
        with pytest.raises(ValueError, match="not in the schedule"):
            sched.add_noise(x, x, bad.reshape(1))
    if isinstance(sched, S.SigmaScheduler):
        with pytest.raises(ValueError, match="not in the schedule"):
            sched.scale_model_input(x, bad)


@pytest.mark.parametrize("name", ["ddim", "pndm", "dpm++2m"])
def test_step_before_set_timesteps(name: str) -> None:
    sched = S.from_name(name, SD15)
    x = torch.zeros(1, 4, 8, 8)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        sched.step(x, torch.tensor(999), x)


@pytest.mark.parametrize("name", ["euler", "euler-a"])
def test_integer_step_index_rejected(name: str) -> None:
    sched = S.from_name(name, SD15)
    sched.set_timesteps(10)
    x = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="integer"):
        sched.step(x, 3, x)
