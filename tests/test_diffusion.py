"""The diffusion math against hand-computed values (../shared/SFDDM.md, 0-indexed)."""
import numpy as np
import pytest
import torch

from sfddm_core import diffusion


@pytest.mark.parametrize("T, steps, spacing, expected", [
    (1000, 4, "trailing", [249, 499, 749, 999]),
    (1000, 3, "trailing", [332, 665, 999]),                     # T' does not divide T
    (1000, 7, "trailing", [141, 284, 427, 570, 713, 856, 999]),
    (1024, 10, "trailing", [101, 203, 306, 408, 511, 613, 715, 818, 920, 1023]),
    (1024, 128, "trailing", list(range(7, 1024, 8))),
    (1000, 4, "leading", [0, 250, 500, 750]),
    (1024, 128, "leading", list(range(0, 1024, 8))),
    (1024, 2, "leading", [0, 512]),
    (1000, 3, [0, 10, 999], [0, 10, 999]),
    (1000, 1000, "trailing", list(range(1000))),
])
def test_student_timesteps_by_hand(T, steps, spacing, expected):
    phi = diffusion.student_timesteps(T, steps, spacing)
    assert phi.dtype == np.int64
    assert phi.tolist() == expected


@pytest.mark.parametrize("T, steps, spacing, message", [
    (1000, 0, "trailing", "out of range"),
    (1000, 1001, "trailing", "out of range"),
    (1000, 128, "leading", "T % steps == 0"),                   # 1000 // 128 = 7 would truncate
    (1000, 3, [0, 10, 10], "strictly increasing"),
    (1000, 3, [0, 500, 10], "strictly increasing"),
    (1000, 2, [0, 1000], r"\[0, 999\]"),
    (1000, 2, [-1, 5], r"\[0, 999\]"),
    (1000, 3, [0, 5], "has 2 timesteps"),
    (1000, 3, "middle", "unknown spacing"),
])
def test_student_timesteps_rejects(T, steps, spacing, message):
    with pytest.raises(ValueError, match=message):
        diffusion.student_timesteps(T, steps, spacing)


def test_linear_schedule_is_ddpm():
    betas = diffusion.beta_schedule("linear", 1000)
    assert betas.dtype == np.float64 and betas[0] == 1e-4 and betas[-1] == 0.02
    assert betas[1] - betas[0] == pytest.approx((0.02 - 1e-4) / 999, rel=1e-12)


def test_sigmoid_schedule_decreases_to_noise():
    abar = diffusion.alphas_cumprod(diffusion.beta_schedule("sigmoid", 1024))
    assert np.all(np.diff(abar) < 0) and abar[0] > 0.99 and abar[-1] < 1e-4


@pytest.mark.parametrize("T, schedule, steps, spacing", [
    (1000, "linear", 4, "trailing"), (1000, "linear", 7, "trailing"), (1024, "sigmoid", 128, "leading"),
    (1000, "linear", 3, [0, 10, 999]), (1000, "linear", 1000, "trailing")])
def test_student_cumprod_reproduces_teacher_abar(T, schedule, steps, spacing):
    abar = diffusion.alphas_cumprod(diffusion.beta_schedule(schedule, T))
    phi = diffusion.student_timesteps(T, steps, spacing)
    betas = diffusion.student_betas(abar, phi)
    assert betas[0] == pytest.approx(1 - abar[phi[0]], abs=0)              # alpha'_0 = abar'_0
    np.testing.assert_allclose(np.cumprod(1 - betas), abar[phi], rtol=1e-12, atol=0)
    assert np.all((betas > 0) & (betas < 1))


def test_student_betas_by_hand():
    abar = np.array([0.9, 0.8, 0.6, 0.3, 0.1])
    betas = diffusion.student_betas(abar, np.array([1, 3, 4]))
    np.testing.assert_allclose(betas, [1 - 0.8, 1 - 0.3 / 0.8, 1 - 0.1 / 0.3], rtol=1e-15)


def test_q_sample_and_inverses_by_hand():
    x0, eps = torch.tensor([0.5, -1.0]), torch.tensor([1.0, 2.0])
    x = diffusion.q_sample(x0, eps, 0.64)
    torch.testing.assert_close(x, torch.tensor([0.8 * 0.5 + 0.6, -0.8 + 1.2]))
    torch.testing.assert_close(diffusion.predict_x0(x, eps, 0.64), x0)
    torch.testing.assert_close(diffusion.predict_eps(x, x0, 0.64), eps)


def test_per_sample_coefficients_broadcast():
    x0, eps = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    x = diffusion.q_sample(x0, eps, np.array([0.25, 1.0]))
    torch.testing.assert_close(x[:, 0, 0, 0], torch.tensor([0.5, 1.0]))


def test_ddim_step_by_hand_and_clip():
    x_t, eps = torch.tensor([0.3, 3.0]), torch.tensor([0.5, -0.5])
    abar_t, abar_s = 0.36, 0.64                    # sqrt: 0.6, 0.8; sqrt(1 - .): 0.8, 0.6
    x0 = (x_t - 0.8 * eps) / 0.6                   # [-1/6, 5.666..]
    expected_unclipped = 0.8 * x0 + 0.6 * eps
    expected_clipped = 0.8 * x0.clamp(-1, 1) + 0.6 * eps
    torch.testing.assert_close(diffusion.ddim_step(x_t, eps, abar_t, abar_s, clip=False), expected_unclipped)
    torch.testing.assert_close(diffusion.ddim_step(x_t, eps, abar_t, abar_s), expected_clipped)
    torch.testing.assert_close(diffusion.ddim_step(x_t, eps, abar_t, 1.0), x0.clamp(-1, 1))  # data end


@pytest.mark.parametrize("abar_t, abar_s", [(0.3, 0.7), (0.01, 0.5), (0.5, 1.0)])   # 1.0: i = 0
def test_x0_landing_on_makes_one_ddim_step_hit_the_target(abar_t, abar_s):
    g = torch.Generator().manual_seed(0)
    x_t, x_target = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    x0 = diffusion.x0_landing_on(x_t, x_target, abar_t, abar_s)
    eps = diffusion.predict_eps(x_t, x0, abar_t)
    torch.testing.assert_close(diffusion.ddim_step(x_t, eps, abar_t, abar_s, clip=False), x_target)
    if abar_s == 1.0:
        torch.testing.assert_close(x0, x_target)


def test_teacher_path():
    assert diffusion.teacher_path(249, -1, 8).tolist() == [249, 218, 186, 155, 124, 93, 62, 30, -1]
    assert diffusion.teacher_path(10, 2, 2).tolist() == [10, 6, 2]
    # fewer teacher steps than K: repeats (no-op steps) come first, the last pair is a real step
    assert diffusion.teacher_path(5, 3, 8).tolist() == [5, 5, 5, 5, 5, 5, 5, 4, 3]
    assert diffusion.teacher_path(0, -1, 4).tolist() == [0, 0, 0, 0, -1]


def test_abar_at_data_end():
    abar = np.array([0.9, 0.5])
    assert diffusion.abar_at(abar, np.array([1, -1, 0])).tolist() == [0.5, 1.0, 0.9]


def test_posterior_variance_matches_ddpm_for_adjacent_steps():
    betas = diffusion.beta_schedule("linear", 1000)
    abar = diffusion.alphas_cumprod(betas)
    t = 500
    expected = (1 - abar[t - 1]) / (1 - abar[t]) * betas[t]         # Ho et al. beta-tilde
    assert diffusion.posterior_variance(abar[t], abar[t - 1]) == pytest.approx(expected, rel=1e-10)


def test_slerp_endpoints_and_norm():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(64, generator=g), torch.randn(64, generator=g)
    torch.testing.assert_close(diffusion.slerp(a, b, 0.0), a)
    torch.testing.assert_close(diffusion.slerp(a, b, 1.0), b)
    assert abs(diffusion.slerp(a, b, 0.5).norm() - (a.norm() + b.norm()) / 2) < 0.2 * a.norm()
