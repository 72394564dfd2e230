"""The consistency ratio by hand, and its reference: the teacher's ODE."""
import numpy as np
import pytest

from sfddm_core import data
from sfddm_core.evaluate import consistency_ratio


def _images(seed, n=64):
    return np.random.default_rng(seed).integers(0, 256, (n, 1, 8, 8), dtype=np.uint8)


def test_consistency_ratio_by_hand():
    """Same noise over shuffled noise: image k against image k (same noise) and against image k - 1."""
    teacher = np.zeros((3, 1, 1, 2), dtype=np.uint8)
    teacher[:, 0, 0, 0] = [0, 255, 0]                  # in model range: -1, 1, -1
    student = teacher.copy()
    student[0, 0, 0, 1] = 255                           # image 0 differs by 2 in one pixel
    a, b = data.to_model_range(teacher).flatten(1).numpy(), data.to_model_range(student).flatten(1).numpy()
    same = np.mean([np.linalg.norm(a[k] - b[k]) for k in range(3)])
    shuffled = np.mean([np.linalg.norm(a[k] - b[k - 1]) for k in range(3)])
    assert consistency_ratio(teacher, student) == pytest.approx(same / shuffled, rel=1e-6)
    assert same / shuffled == pytest.approx(2 / (0 + np.sqrt(8) + 2))        # pairs (0, 2), (1, 0), (2, 1)


def test_consistency_ratio_is_0_for_a_copy_and_about_1_for_unrelated_images():
    teacher = _images(0)
    assert consistency_ratio(teacher, teacher.copy()) == 0
    assert consistency_ratio(teacher, _images(1)) == pytest.approx(1.0, abs=0.05)
