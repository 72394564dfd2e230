import re

import numpy as np
import pytest
import scipy.linalg
import torch
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
from torch import nn

from sfddm_core import data, fid
from sfddm_core.config import Config, DataConfig, EvaluateConfig
from sfddm_core.errors import SfddmError


class RandomProjection(nn.Module):
    """A fixed linear map of the pixels to 16 features: cheap, and well conditioned on 200 samples."""

    num_features = 16

    def __init__(self, pixels: int):
        super().__init__()
        weight = torch.randn(self.num_features, pixels, generator=torch.Generator().manual_seed(0))
        self.register_buffer("weight", weight / pixels ** 0.5)

    def forward(self, images_uint8):
        return (images_uint8.flatten(1).float() / 255) @ self.weight.T


def _random_images(n, seed, shape=(1, 8, 8)):
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def _noisy(images, sigma, seed=1):
    noise = np.random.default_rng(seed).normal(0, sigma, images.shape)
    return np.clip(np.round(images + noise), 0, 255).astype(np.uint8)


def _fid(net, real, fake):
    """The FID of one fake set, from a fresh metric."""
    return fid.image_distances(net, real, {"fake": fake})["fake"]["fid"]


def _scipy_fid(net, real, fake):
    with torch.no_grad():
        f1, f2 = (net(torch.from_numpy(x)).double().numpy() for x in (real, fake))
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


# ---- Frechet distance ----

def test_fid_of_a_set_with_itself_is_zero():
    images = _random_images(200, seed=0)
    assert abs(_fid(RandomProjection(64), images, images.copy())) < 1e-3


def test_fid_matches_scipy_and_grows_with_noise():
    net, real = RandomProjection(64), _random_images(200, seed=0)
    fakes = {f"sigma={s}": _noisy(real, s) for s in (10, 30, 60)}
    distances = fid.image_distances(net, real, fakes, batch_size=64)

    for name, fake in fakes.items():
        assert distances[name]["fid"] == pytest.approx(_scipy_fid(net, real, fake), rel=1e-3)
        # the cached reference features must give what a fresh metric gives
        assert distances[name]["fid"] == pytest.approx(_fid(net, real, fake), rel=1e-9)
    values = [d["fid"] for d in distances.values()]
    assert 0 < values[0] < values[1] < values[2]


def test_kid_is_unbiased_grows_with_noise_and_repeats():
    """Two independent draws of one distribution: KID's mean lies within its spread around 0 (unbiased),
    while FID stays clearly positive (its small-sample bias); KID grows as the images brighten; the random
    subsets come from a fixed seed, so a rerun gives the same numbers."""
    net = RandomProjection(64)
    same = fid.image_distances(net, _random_images(400, seed=1), {"same": _random_images(400, seed=2)})["same"]
    assert abs(same["kid"]) < same["kid_std"]
    assert same["fid"] > 10 * abs(same["kid"])
    assert fid.image_distances(net, _random_images(400, seed=1), {"same": _random_images(400, seed=2)})["same"] == same
    real = _random_images(200, seed=0)
    brighter = {shift: np.clip(real.astype(int) + shift, 0, 255).astype(np.uint8) for shift in (10, 30, 60)}
    kids = [d["kid"] for d in fid.image_distances(net, real, brighter).values()]
    assert 0 < kids[0] < kids[1] < kids[2]


def test_fid_refuses_mismatched_sets():
    net, real = RandomProjection(64), _random_images(10, seed=0)
    with pytest.raises(SfddmError, match="sample set 'float': expected uint8 images of shape"):
        fid.image_distances(net, real, {"float": real.astype(np.float32)})
    expected = "sample set 'rgb': expected uint8 images of shape (N >= 2, 1, 8, 8)"
    with pytest.raises(SfddmError, match=re.escape(expected)):
        fid.image_distances(net, real, {"rgb": _random_images(10, 1, (3, 8, 8))})


# ---- Inception ----

@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A randomly initialised Inception-v3 saved under torch-fidelity's file name (no download)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tf_inception, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda *args, **kwargs: None)
        torch.manual_seed(0)
        net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    assert tf_inception.URL_INCEPTION_V3.endswith(fid.INCEPTION_WEIGHTS_FILE)
    path = tmp_path_factory.mktemp("hub") / fid.INCEPTION_WEIGHTS_FILE
    torch.save(net.state_dict(), path)
    return path


def test_inception_features_of_grayscale_images(inception_weights):
    net = fid.feature_network(EvaluateConfig(feature_network="inception", inception_weights=str(inception_weights)),
                              "unused")
    assert net.label == "inception-v3 pool3 (2048-d)" and net.num_features == 2048
    gray = torch.from_numpy(_random_images(2, seed=0))
    with torch.no_grad():
        features = net(gray)
        as_rgb = net(gray.repeat(1, 3, 1, 1))
    assert features.shape == (2, 2048) and torch.isfinite(features).all()
    torch.testing.assert_close(features, as_rgb)


def test_inception_weights_missing_or_corrupt(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    default = tmp_path / "torch" / "hub" / "checkpoints" / fid.INCEPTION_WEIGHTS_FILE
    with pytest.raises(SfddmError, match=re.escape(f"inception weights not found at {default}: download")):
        fid.feature_network(EvaluateConfig(feature_network="inception"), tmp_path)

    corrupt = tmp_path / "weights.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(SfddmError, match=re.escape(f"{corrupt}: not usable Inception-v3 weights")):
        fid.feature_network(EvaluateConfig(feature_network="inception", inception_weights=str(corrupt)), tmp_path)


# ---- classifier ----

@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "data"
    data.prepare(DataConfig(), seed=0, out_dir=out)
    return out


@pytest.fixture(scope="module")
def classifier(digits):
    images, labels = data.load_split(digits, "train")
    return fid.train_classifier(images, labels, iterations=150, seed=0, device="cpu")    # about 3 s on CPU


def test_classifier_learns_digits(digits, classifier):
    assert fid.accuracy(classifier, *data.load_split(digits, "test")) > 0.85


def test_classifier_training_is_deterministic(digits):
    images, labels = data.load_split(digits, "train")
    first, second = (fid.train_classifier(images, labels, iterations=5, seed=3) for _ in range(2))
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_classifier_save_load_and_feature_network(digits, classifier):
    path = digits / fid.CLASSIFIER_FILE
    fid.save_classifier(classifier, path, test_accuracy=0.9, data_source="digits")
    loaded = fid.load_classifier(path)
    assert loaded.config == classifier.config and (loaded.data_source, loaded.test_accuracy) == ("digits", 0.9)
    for (name, a), (_, b) in zip(classifier.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)

    net = fid.feature_network(EvaluateConfig(), digits)     # a data folder means <folder>/classifier.pt
    assert net.num_features == 128
    assert net.label == "digits-classifier (penultimate, 128-d, trained on the train split, test accuracy 0.900)"
    elsewhere = digits.parent / "other.pt"
    fid.save_classifier(classifier, elsewhere)
    assert fid.feature_network(EvaluateConfig(), elsewhere).label == \
        "classifier (penultimate, 128-d, trained on the train split)"
    images, _ = data.load_split(digits, "test")
    with torch.no_grad():
        torch.testing.assert_close(net(torch.from_numpy(images[:8])), classifier.embed(torch.from_numpy(images[:8])))
    real, fake = images[:200], images[200:400]
    assert 0 < _fid(net, real, fake) < _fid(net, real, _noisy(fake, 60))


def test_train_and_save_classifier(tmp_path, digits):
    cfg = Config(device="cpu", evaluate=EvaluateConfig(classifier_iterations=20))
    test_accuracy = fid.train_and_save_classifier(cfg, digits, tmp_path / "classifier.pt")
    loaded = fid.load_classifier(tmp_path / "classifier.pt")
    assert 0 <= test_accuracy <= 1 and loaded.test_accuracy == test_accuracy
    assert loaded.data_source == "digits" and loaded.config["num_classes"] == 10


def test_classifier_file_missing_or_corrupt(tmp_path):
    data.prepare(DataConfig(max_images=20), seed=0, out_dir=tmp_path / "data")
    path = tmp_path / "data" / fid.CLASSIFIER_FILE
    missing = f"{path}: no classifier here; train it with `sfddm train-classifier`"
    with pytest.raises(SfddmError, match=re.escape(missing)):
        fid.feature_network(EvaluateConfig(), tmp_path / "data")
    path.write_bytes(b"\x00" * 10)
    with pytest.raises(SfddmError, match=re.escape(f"{path}: unreadable classifier checkpoint")):
        fid.load_classifier(path)
    torch.save({"format": fid.CLASSIFIER_FORMAT, "config": {"channels": 1, "image_size": 8, "num_classes": 10},
                "state_dict": {"head.weight": torch.zeros(3)}}, path)
    with pytest.raises(SfddmError, match="classifier weights do not fit the recorded architecture"):
        fid.load_classifier(path)


def test_classifier_refuses_images_of_another_shape(classifier):
    with pytest.raises(SfddmError, match=re.escape("classifier: expected images of shape (N, 1, 8, 8)")):
        classifier.embed(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
