"""SFDDM's alignment and loss terms, by hand on small tensors."""
import types

import numpy as np
import pytest
import torch

from sfddm_core import diffusion
from sfddm_core.config import DistillConfig
from sfddm_core.diffusion import StudentSchedule
from sfddm_core.methods.base import STEP_LOSSES, eps_error, sampler_output_error
from sfddm_core.methods.sfddm import distillation_loss, trajectory_eps_target

from conftest import make_unet


class LinearEps(torch.nn.Module):
    """A fake teacher, eps(x, t) = c_t x with c_t = 0.1 + t / 1000, simple enough to step by hand."""
    def forward(self, x, t):
        c = 0.1 + torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1) / 1000
        return type("Out", (), {"sample": c * x})()


def test_student_input_equals_teacher_input_bit_for_bit(linear_abar):
    schedule = StudentSchedule(diffusion.student_timesteps(1000, 7, "trailing"), linear_abar)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(64, 1, 8, 8, generator=g) * 2 - 1, torch.randn(64, 1, 8, 8, generator=g)
    i = np.random.default_rng(0).integers(0, 7, 64)
    student_input = diffusion.q_sample(x0, eps, schedule.abar_student[i])
    teacher_input = diffusion.q_sample(x0, eps, linear_abar[schedule.phi[i]])
    assert torch.equal(student_input, teacher_input)
    # and the exported betas describe exactly these noise levels
    np.testing.assert_allclose(np.cumprod(1 - schedule.betas), schedule.abar_student, rtol=1e-12)


def test_loss_is_zero_for_a_copy_of_the_teacher_with_all_steps():
    T = 20
    abar = diffusion.alphas_cumprod(diffusion.beta_schedule("linear", T))
    schedule = StudentSchedule(diffusion.student_timesteps(T, T, "trailing"), abar)
    teacher, student = make_unet(0), make_unet(0)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(16, 1, 8, 8, generator=g) * 2 - 1, torch.randn(16, 1, 8, 8, generator=g)
    i = np.arange(16) % T
    for step_loss in ("eps", "sampler_output"):     # an unclipped sampler: both measure the same landing
        cfg = DistillConfig(loss="l1", pointwise_weight=1.0, hidden_weight=1.0, trajectory_weight=1.0, substeps=4,
                            step_loss=step_loss)
        terms = distillation_loss(student, teacher, x0, eps, i, schedule, cfg, sampler_clip=False)
        assert set(terms) == {"loss", "pointwise", "hidden", "trajectory"}
        assert terms["pointwise"].item() == 0 and terms["hidden"].item() == 0
        assert terms["loss"].item() < 1e-10
        different = distillation_loss(make_unet(1), teacher, x0, eps, i, schedule, cfg, sampler_clip=False)
        assert all(different[name].item() > 1e-3 for name in ("pointwise", "hidden", "trajectory"))


def _ddim_by_hand(x, t, s, abar, clip):
    """One DDIM step of LinearEps from teacher step t to s (s = -1: data), written out."""
    a_t, a_s = abar[t], (1.0 if s < 0 else abar[s])
    eps = (0.1 + t / 1000) * x
    x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
    x0 = x0.clamp(-1, 1) if clip else x0
    return np.sqrt(a_s) * x0 + np.sqrt(1 - a_s) * eps


@pytest.mark.parametrize("clip", [False, True])
def test_trajectory_target_lands_on_the_teachers_k_steps(linear_abar, clip):
    """i = 1 (phi: 499 -> 249) and i = 0 (249 -> data), K = 2: the teacher's two DDIM steps by hand
    (the first one's x0-hat clipped if clip), then one student DDIM step with eps* must land on them."""
    schedule = StudentSchedule(diffusion.student_timesteps(1000, 4, "trailing"), linear_abar)
    teacher = LinearEps()
    x = torch.tensor([[[[0.5, -2.0], [1.5, 0.1]]], [[[0.3, -0.7], [2.5, -1.2]]]])
    i = np.array([1, 0])
    eps_t = teacher(x, torch.as_tensor(schedule.phi[i])).sample
    eps_star = trajectory_eps_target(teacher, x, i, schedule, 2, eps_t, clip)
    for b, (t, s) in enumerate([(499, 249), (249, -1)]):
        mid = (t + s) / 2
        mid = int(np.round(mid))                                      # 374 and 124
        x_mid = _ddim_by_hand(x[b], t, mid, linear_abar, clip=clip)
        target = _ddim_by_hand(x_mid, mid, s, linear_abar, clip=False)
        a_t, a_s = linear_abar[t], (1.0 if s < 0 else linear_abar[s])
        landed = diffusion.ddim_step(x[b], eps_star[b], a_t, a_s, clip=False)
        torch.testing.assert_close(landed, target, atol=1e-5, rtol=1e-5)
    # at i = 0 the landing point is the data end: x0* is the teacher's result itself
    x0_star = diffusion.predict_x0(x[1], eps_star[1], linear_abar[249])
    target0 = _ddim_by_hand(_ddim_by_hand(x[1], 249, 124, linear_abar, clip), 124, -1, linear_abar, False)
    torch.testing.assert_close(x0_star, target0, atol=1e-5, rtol=1e-5)


def test_one_step_path_gives_the_teachers_eps(linear_abar):
    """With T' = T every path is one teacher step, so eps* is eps_T exactly, clipping or not."""
    abar = linear_abar[:10]
    schedule = StudentSchedule(np.arange(10), abar)
    x = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(0)) * 3
    i = np.array([0, 3, 5, 9])
    eps_t = LinearEps()(x, torch.as_tensor(i)).sample
    for clip in (False, True):
        eps_star = trajectory_eps_target(LinearEps(), x, i, schedule, 8, eps_t, clip)
        # float32 round trip through x0* divides by sqrt(1 - abar_0) = 0.01, hence the tolerance
        torch.testing.assert_close(eps_star, eps_t, atol=3e-4, rtol=1e-3)


def test_teacher_init_starts_as_the_teacher_on_phi(linear_abar):
    from sfddm_core.students import align_time_embedding
    phi = diffusion.student_timesteps(1000, 4, "trailing")
    teacher, student = make_unet(0), make_unet(1)
    student.load_state_dict(teacher.state_dict())
    align_time_embedding(student, teacher, phi)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = student(x, torch.arange(4)).sample
        theirs = teacher(x, torch.as_tensor(phi)).sample
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_progressive_grids_bisect_every_gap():
    """T = 8, phi = [3, 7]: gaps from the data end are 4 and 4, so two folds: 8 -> 4 -> 2 steps."""
    grids = diffusion.progressive_grids(np.array([3, 7]))
    assert [g.tolist() for g in grids] == [[0, 1, 2, 3, 4, 5, 6, 7], [1, 3, 5, 7], [3, 7]]
    grids = diffusion.progressive_grids(diffusion.student_timesteps(1000, 4, "trailing"))
    assert [len(g) for g in grids] == [512, 256, 128, 64, 32, 16, 8, 4]       # floor(log2(250)) = 7 folds
    for fine, coarse in zip(grids, grids[1:]):
        np.testing.assert_array_equal(fine[1::2], coarse)
        assert np.all(np.diff(fine) > 0)
    assert len(diffusion.progressive_grids(np.array([0, 250, 500, 750]))) == 1  # leading: no fold fits


def test_progressive_target_is_two_teacher_ddim_steps_by_hand(linear_abar):
    """Fold 8 -> 4 steps on fine = [124, 249, ..., 999]: coarse step j = 1 goes 499 -> 374 -> 249 and
    j = 0 goes 249 -> 124 -> data. One unclipped student DDIM step with the loss's eps~ must land
    where the teacher's two unclipped steps land; the loss is the MSE to that eps~."""
    from sfddm_core.methods.progressive import progressive_loss
    fine = diffusion.progressive_grids(diffusion.student_timesteps(1000, 4, "trailing"))[-2]
    assert fine[:4].tolist() == [124, 249, 374, 499]
    x0 = torch.tensor([[[[0.5, -0.9], [0.8, 0.1]]], [[[0.3, -0.7], [1.0, -1.0]]]])
    eps = torch.tensor([[[[1.5, -2.0], [0.3, 0.7]]], [[[-0.4, 1.1], [2.2, -0.6]]]])
    j = np.array([1, 0])
    student = LinearEps()
    terms = progressive_loss(student, LinearEps(), x0, eps, j, fine, fine[1::2], linear_abar, clip=False,
                             step_loss="eps", sampler_clip=False)
    eps_student = []
    for b, (t, mid, s) in enumerate([(499, 374, 249), (249, 124, -1)]):
        x_t = np.sqrt(linear_abar[t]) * x0[b] + np.sqrt(1 - linear_abar[t]) * eps[b]
        target = _ddim_by_hand(_ddim_by_hand(x_t, t, mid, linear_abar, clip=False), mid, s, linear_abar, clip=False)
        a_t, a_s = linear_abar[t], (1.0 if s < 0 else linear_abar[s])
        r = np.sqrt((1 - a_s) / (1 - a_t))
        x0_tilde = (target - r * x_t) / (np.sqrt(a_s) - r * np.sqrt(a_t))      # Salimans & Ho's x-target
        eps_tilde = (x_t - np.sqrt(a_t) * x0_tilde) / np.sqrt(1 - a_t)
        landed = np.sqrt(a_s) * x0_tilde + np.sqrt(1 - a_s) * eps_tilde       # one DDIM step with eps~
        torch.testing.assert_close(landed, target, atol=1e-5, rtol=1e-5)
        eps_student.append(((0.1 + t / 1000) * x_t - eps_tilde))
    expected = torch.stack(eps_student).pow(2).mean()
    torch.testing.assert_close(terms["loss"], expected, atol=1e-6, rtol=1e-4)


def test_progressive_target_of_a_constant_eps_teacher_is_that_eps(linear_abar):
    """DDIM is exact when eps is constant, so two steps land where one does and eps~ is the teacher's eps,
    also in the first fold at high noise, where x0-hat lies far outside [-1, 1] (clipping it there would
    move eps~ 25-fold: c_ts is -0.04 for 999 -> 995)."""
    from sfddm_core.methods.progressive import progressive_loss

    class ConstantEps(torch.nn.Module):
        def forward(self, x, t):
            return types.SimpleNamespace(sample=torch.full_like(x, 0.7))

    fine = diffusion.progressive_grids(diffusion.student_timesteps(1000, 4, "trailing"))[0]
    assert fine[-3:].tolist() == [995, 997, 999]
    x0 = torch.full((3, 1, 2, 2), 0.9)
    eps = torch.full((3, 1, 2, 2), 3.0)      # x_999's x0-hat is about 360: far outside [-1, 1]
    j = np.array([len(fine) // 2 - 1, 100, 0])
    for step_loss in STEP_LOSSES:
        terms = progressive_loss(ConstantEps(), ConstantEps(), x0, eps, j, fine, fine[1::2], linear_abar,
                                 clip=False, step_loss=step_loss, sampler_clip=False)
        assert terms["loss"].item() < 1e-8


def test_sampler_output_error_is_the_eps_error_where_nothing_is_clipped(linear_abar):
    g = torch.Generator().manual_seed(0)
    x, eps_s, eps_t = (torch.randn(3, 1, 4, 4, generator=g) for _ in range(3))
    abar_t, abar_s = linear_abar[[999, 749, 499]], linear_abar[[749, 499, 249]]
    torch.testing.assert_close(sampler_output_error(x, eps_s, eps_t, abar_t, abar_s, clip=False),
                               eps_error(x, eps_s, eps_t, abar_t, abar_s, clip=False), rtol=1e-4, atol=1e-7)


def test_sampler_output_error_by_hand_at_the_data_end_and_with_a_clipping_sampler():
    """At the data end both images are clamped: a pixel both push past -1 costs nothing however far
    apart; otherwise the squared difference of the landings over c_ts^2 (here (1 - a) / a, a = abar_t)."""
    a = 0.64                                             # sqrt(a) = 0.8, sqrt(1 - a) = 0.6
    x = torch.zeros(1, 1, 1, 3)
    x0_student, x0_target = torch.tensor([-1.5, -0.7, 0.2]), torch.tensor([-3.0, -0.5, 0.2])
    eps_of = lambda x0: ((x - 0.8 * x0) / 0.6).reshape(1, 1, 1, 3)        # x = 0.8 x0 + 0.6 eps
    error = sampler_output_error(x, eps_of(x0_student), eps_of(x0_target), np.array([a]), np.array([1.0]), clip=True)
    expected = ((-0.7 + 0.5) ** 2 / ((1 - a) / a)) / 3                  # only the middle pixel differs
    torch.testing.assert_close(error, torch.tensor([expected]), rtol=1e-5, atol=0)
    # Between two noise levels the clipping sampler lands at sqrt(abar_s) clip(x0-hat) + sqrt(1 - abar_s) eps.
    abar_s = 0.81                                        # sqrt 0.9, sqrt(1 - abar_s) = sqrt 0.19
    eps_s, eps_t = eps_of(x0_student), eps_of(x0_target)
    landing_s = 0.9 * x0_student.clamp(-1, 1) + np.sqrt(0.19) * eps_s.flatten()
    landing_t = 0.9 * x0_target + np.sqrt(0.19) * eps_t.flatten()
    gain = np.sqrt(0.19) - np.sqrt(abar_s / a) * 0.6
    expected = ((landing_s - landing_t) ** 2).mean() / gain ** 2
    torch.testing.assert_close(sampler_output_error(x, eps_s, eps_t, np.array([a]), np.array([abar_s]), clip=True),
                               expected.reshape(1).float(), rtol=1e-5, atol=0)


def test_time_embedding_fit_beyond_the_well_conditioned_range(linear_abar):
    """T' = 10 on a UNet with 8 sinusoidal time features: least squares alone is far off (the features
    of 0..9 are nearly collinear); the refinement brings the copy's outputs within 1e-2 of the teacher."""
    from sfddm_core.students import align_time_embedding
    phi = diffusion.student_timesteps(1000, 10, "trailing")
    teacher, student = make_unet(0), make_unet(1)
    student.load_state_dict(teacher.state_dict())
    assert align_time_embedding(student, teacher, phi, refine_steps=0) > 1e-2
    error = align_time_embedding(student, teacher, phi)
    assert error < 1e-2
    x = torch.randn(10, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = student(x, torch.arange(10)).sample, teacher(x, torch.as_tensor(phi)).sample
    assert (ours - theirs).abs().max() < 1e-2


def test_teacher_path_targets_chain_the_teachers_ddim_segments(linear_abar):
    """Inputs on the teacher's own path: the top input is x' at phi_{T'-1}; each (x, i, eps*) is what
    trajectory_eps_target gives at that x; and one student DDIM step with eps* from step i lands on the
    input of step i - 1 (the last one on the teacher's image)."""
    from sfddm_core.methods.sfddm import teacher_path_targets
    schedule = StudentSchedule(diffusion.student_timesteps(1000, 3, "trailing"), linear_abar)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(5, 1, 4, 4, generator=g) * 2 - 1, torch.randn(5, 1, 4, 4, generator=g)
    x, i, eps_star = teacher_path_targets(LinearEps(), x0, eps, schedule, 4, clip=False)
    assert x.shape == (15, 1, 4, 4) and i.tolist() == [2] * 5 + [1] * 5 + [0] * 5
    torch.testing.assert_close(x[:5], diffusion.q_sample(x0, eps, schedule.abar_student[2]))
    teacher = LinearEps()
    first = teacher(x, torch.as_tensor(schedule.phi[i])).sample
    torch.testing.assert_close(eps_star, trajectory_eps_target(teacher, x, i, schedule, 4, first, False),
                               atol=1e-5, rtol=1e-5)
    abar_next = diffusion.abar_at(linear_abar, schedule.previous_teacher_step(i))
    landed = diffusion.ddim_step(x, eps_star, schedule.abar_student[i], abar_next, clip=False)
    torch.testing.assert_close(landed[:10], x[5:], atol=1e-4, rtol=1e-4)


def test_learning_rate_warms_up_then_decays_by_a_cosine():
    from sfddm_core.training import learning_rate
    lr = learning_rate(1e-3, iterations=110, warmup=10, decay="cosine")
    assert [lr(0), lr(4), lr(9)] == pytest.approx([1e-4, 5e-4, 1e-3])
    assert lr(60) == pytest.approx(0.5e-3)                      # half-way through the decay
    assert 0 < lr(109) < 1e-6
    constant = learning_rate(1e-3, iterations=110, warmup=0, decay="constant")
    assert {constant(step) for step in (0, 50, 109)} == {1e-3}


def test_step_sampler_leans_toward_the_step_with_the_larger_running_loss():
    from sfddm_core.methods.sfddm import StepSampler
    rng = np.random.default_rng(0)
    uniform = StepSampler(4, weighted=False)
    assert uniform.draw(np.random.default_rng(0), 8).tolist() == np.random.default_rng(0).integers(0, 4, 8).tolist()
    sampler = StepSampler(2, weighted=True, decay=0.5)
    sampler.observe(np.array([0, 0, 1]), np.array([3.0, 5.0, 1.0]))      # means: 0.5 + 0.5 * 4 = 2.5, 1.0
    np.testing.assert_allclose(sampler.mean_loss, [2.5, 1.0])
    draws = sampler.draw(rng, 20000)
    p0 = np.sqrt(2.5) / (np.sqrt(2.5) + 1.0)
    assert abs((draws == 0).mean() - p0) < 0.01
    restored = StepSampler(2, weighted=True)
    restored.load_state_dict(sampler.state_dict())                      # resumed with a checkpoint
    np.testing.assert_array_equal(restored.mean_loss, sampler.mean_loss)
