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


def test_consistency_ratio_on_paper():
    """Three 2-pixel images, numbers worked out by hand. uint8 u is u / 127.5 - 1 in model range, so
    (153, 204) is (0.2, 0.6), and its distance to (0, 0) = (-1, -1) is |(1.2, 1.6)| = 2 (Euclidean; L1
    would give 2.8). Different noise pairs teacher image k with student image k - 1.

    teacher: (-1, -1), (0.2, 0.6), (1, 1);  student: (-1, -1), (-1, -1), (1, 1)
    same noise:      0, 2, 0                                   -> mean 2 / 3
    different noise: |t0 - s2| = 2 sqrt 2, |t1 - s0| = 2, |t2 - s1| = 2 sqrt 2 -> mean (4 sqrt 2 + 2) / 3
    ratio: 2 / (4 sqrt 2 + 2) = 1 / (2 sqrt 2 + 1) = 0.26120...
    Roles swapped, the numerator stays and the pairs change: |s0 - t2| = 2 sqrt 2, |s1 - t0| = 0,
    |s2 - t1| = |(0.8, 0.4)| = 2 / sqrt 5, so 2 / (2 sqrt 2 + 2 / sqrt 5) = 1 / (sqrt 2 + 1 / sqrt 5):
    the ratio is not symmetric in its arguments."""
    teacher = np.array([[0, 0], [153, 204], [255, 255]], dtype=np.uint8).reshape(3, 1, 1, 2)
    student = np.array([[0, 0], [0, 0], [255, 255]], dtype=np.uint8).reshape(3, 1, 1, 2)
    assert consistency_ratio(teacher, student) == pytest.approx(1 / (2 * np.sqrt(2) + 1), rel=1e-6)
    assert consistency_ratio(teacher, student) == pytest.approx(0.2612038749637414, rel=1e-6)
    assert consistency_ratio(student, teacher) == pytest.approx(1 / (np.sqrt(2) + 1 / np.sqrt(5)), rel=1e-6)
    # the same pixels as 2 channels of one pixel, or as a 1 x 2 image: only the flattened image counts
    assert consistency_ratio(teacher.reshape(3, 2, 1, 1), student.reshape(3, 2, 1, 1)) == \
        pytest.approx(1 / (2 * np.sqrt(2) + 1), rel=1e-6)


def test_consistency_ratio_is_exactly_1_for_a_student_that_ignores_its_noise():
    """Every student image the same picture c: both means are mean_k |t_k - c|, so the ratio is 1."""
    teacher = np.array([[0, 0], [153, 204], [255, 255], [255, 0]], dtype=np.uint8).reshape(4, 1, 1, 2)
    student = np.full_like(teacher, 51)
    assert consistency_ratio(teacher, student) == pytest.approx(1.0, rel=1e-6)


def test_consistency_ratio_is_0_for_a_copy_and_about_1_for_unrelated_images():
    teacher = _images(0)
    assert consistency_ratio(teacher, teacher.copy()) == 0
    assert consistency_ratio(teacher, _images(1)) == pytest.approx(1.0, abs=0.05)
