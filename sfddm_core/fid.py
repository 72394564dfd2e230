"""Frechet and kernel distances (FID, KID) between image sets, by torchmetrics on a chosen feature network.

Inception weights cannot be downloaded everywhere, so besides Inception-v3 (pool3, the standard FID) the
feature network can be a small classifier trained offline on the train split: the numbers are then only
comparable with others from the same classifier, which is why every feature network carries a `label`
that goes into each output next to the sample counts.
"""
from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
from torchmetrics.image.kid import KernelInceptionDistance
from tqdm import tqdm

from . import data, io
from .config import Config, EvaluateConfig
from .errors import SfddmError

CLASSIFIER_FILE = "classifier.pt"
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"   # torch-fidelity's release asset
CLASSIFIER_FORMAT = "sfddm-classifier-v1"

Device = Union[str, torch.device]


class Classifier(nn.Module):
    """A small CNN on uint8 images; its pooled 128-d penultimate layer is the offline FID feature space."""

    def __init__(self, channels: int, image_size: int, num_classes: int):
        super().__init__()
        self.config = {"channels": channels, "image_size": image_size, "num_classes": num_classes}
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.SiLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.num_features = 128
        self.head = nn.Linear(self.num_features, num_classes)
        # Provenance, recorded by save_classifier and restored by load_classifier; goes into the FID label.
        self.data_source: Optional[str] = None
        self.test_accuracy: Optional[float] = None

    def embed(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) -> penultimate features (N, 128)."""
        expected = (self.config["channels"], self.config["image_size"], self.config["image_size"])
        if tuple(images_uint8.shape[1:]) != expected:
            raise SfddmError(f"classifier: expected images of shape (N, {', '.join(map(str, expected))}), "
                             f"got {tuple(images_uint8.shape)}; retrain it on this data")
        return self.features(data.to_model_range(images_uint8))

    def forward(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(images_uint8))


def train_and_save_classifier(cfg: Config, data_dir: Union[str, Path], out_path: Union[str, Path]) -> float:
    """sfddm train-classifier: train on the train split, measure on the test split, write out_path."""
    device, meta = io.resolve_device(cfg.device), data.load_meta(data_dir)
    images, labels = data.load_split(data_dir, "train")
    model = train_classifier(images, labels, cfg.evaluate.classifier_iterations, cfg.seed, device,
                             num_classes=len(meta["class_names"]))
    test_accuracy = accuracy(model, *data.load_split(data_dir, "test"), device=device)
    save_classifier(model, out_path, test_accuracy=test_accuracy, data_source=meta["source"])
    return test_accuracy


def train_classifier(images: np.ndarray, labels: np.ndarray, iterations: int, seed: int,
                     device: Device = "cpu", batch_size: int = 128, lr: float = 1e-3,
                     num_classes: Optional[int] = None) -> Classifier:
    """Adam on random batches of (images uint8 NCHW, labels); the same seed gives the same weights."""
    torch.manual_seed(seed)
    num_classes = num_classes or int(labels.max()) + 1
    model = Classifier(images.shape[1], images.shape[-1], num_classes).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    images, labels = torch.from_numpy(images), torch.from_numpy(labels)
    batches = torch.Generator().manual_seed(seed)
    bar = tqdm(range(iterations), desc="classifier", unit="it")
    for step in bar:
        idx = torch.randint(len(labels), (batch_size,), generator=batches)
        loss = F.cross_entropy(model(images[idx].to(device)), labels[idx].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == iterations - 1:     # .item() syncs the GPU; not every step
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return model.eval()


@torch.no_grad()
def accuracy(model: Classifier, images: np.ndarray, labels: np.ndarray, device: Device = "cpu",
             batch_size: int = 500) -> float:
    if not len(labels):
        raise SfddmError("accuracy: the test split is empty; expected data.test_fraction > 0")
    model = model.to(device).eval()
    correct = 0
    for start in range(0, len(labels), batch_size):
        logits = model(torch.from_numpy(images[start:start + batch_size]).to(device))
        correct += (logits.argmax(1).cpu() == torch.from_numpy(labels[start:start + batch_size])).sum().item()
    return correct / len(labels)


def save_classifier(model: Classifier, path: Union[str, Path], test_accuracy: Optional[float] = None,
                    data_source: Optional[str] = None) -> None:
    """One .pt file: constructor args, CPU state dict and provenance (data source, test accuracy); atomic."""
    checkpoint = {
        "format": CLASSIFIER_FORMAT,
        "config": model.config,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "data_source": data_source,
        "test_accuracy": test_accuracy,
    }
    with io.atomic_file(path, "wb") as handle:
        torch.save(checkpoint, handle)


def load_classifier(path: Union[str, Path]) -> Classifier:
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SfddmError(f"{path}: no classifier here; train it with `sfddm train-classifier`") from None
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, ValueError) as err:
        raise SfddmError(f"{path}: unreadable classifier checkpoint ({_first_line(err)}); "
                         f"retrain it with `sfddm train-classifier`") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CLASSIFIER_FORMAT:
        raise SfddmError(f"{path}: not a {CLASSIFIER_FORMAT} checkpoint; retrain it with `sfddm train-classifier`")
    try:
        model = Classifier(**checkpoint["config"])
        model.load_state_dict(checkpoint["state_dict"])
    except (KeyError, TypeError, RuntimeError) as err:
        raise SfddmError(f"{path}: classifier weights do not fit the recorded architecture "
                         f"({_first_line(err)}); retrain it with `sfddm train-classifier`") from None
    model.data_source, model.test_accuracy = checkpoint.get("data_source"), checkpoint.get("test_accuracy")
    return model.eval()


class ClassifierFeatures(nn.Module):
    """The classifier's penultimate features, shaped for torchmetrics' FID."""

    def __init__(self, classifier: Classifier, label: str):
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.num_features = classifier.num_features     # spares torchmetrics a 299x299 probe
        self.label = label

    def forward(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return self.classifier.embed(images_uint8)


class InceptionFeatures(nn.Module):
    """Inception-v3 pool3 features (torch-fidelity's port of the TF FID network) of 1- or 3-channel images."""

    def __init__(self, weights_path: Path):
        super().__init__()
        # antialias=False keeps torch-fidelity's TF1-compatible resize to 299, so the numbers match the
        # reference FID implementation rather than torchmetrics' antialiased default.
        try:
            self.inception = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                                feature_extractor_weights_path=str(weights_path),
                                                antialias=False)
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, ValueError, KeyError) as err:
            raise SfddmError(f"{weights_path}: not usable Inception-v3 weights ({_first_line(err)}); "
                             f"expected {INCEPTION_WEIGHTS_FILE} from torch-fidelity's release") from None
        self.num_features = 2048
        self.label = "inception-v3 pool3 (2048-d)"

    def forward(self, images_uint8: torch.Tensor) -> torch.Tensor:
        if images_uint8.shape[1] == 1:      # Inception wants RGB; grayscale is the same value thrice
            images_uint8 = images_uint8.expand(-1, 3, -1, -1)
        return self.inception(images_uint8)


def feature_network(cfg: EvaluateConfig, classifier_path: Union[str, Path]) -> nn.Module:
    """The FID feature network named by cfg.feature_network, with its `label` and `num_features`.

    classifier_path is the classifier's .pt file, or a data folder holding it as classifier.pt; the
    inception network ignores it.
    """
    if cfg.feature_network == "inception":
        return InceptionFeatures(_inception_weights(cfg))
    path = Path(classifier_path)
    classifier = load_classifier(path / CLASSIFIER_FILE if path.is_dir() else path)
    source = f"{classifier.data_source}-" if classifier.data_source else ""
    accuracy_note = "" if classifier.test_accuracy is None else f", test accuracy {classifier.test_accuracy:.3f}"
    label = (f"{source}classifier (penultimate, {classifier.num_features}-d, "
             f"trained on the train split{accuracy_note})")
    return ClassifierFeatures(classifier, label)


KID_SUBSETS = 100       # torchmetrics' default; KID's mean and std are over this many random subsets


def image_distances(feature_net: nn.Module, real_uint8: np.ndarray, fakes: dict[str, np.ndarray],
                    batch_size: int = 250, device: Device = "cpu", seed: int = 0) -> dict[str, dict[str, float]]:
    """FID and KID of each fake set against one reference set, on features extracted once per set.

    FID (torchmetrics' FrechetInceptionDistance) is biased upward at small n; KID (torchmetrics'
    KernelInceptionDistance: the unbiased MMD^2 of a cubic polynomial kernel) is not, so it is reported
    beside it: its mean and std over KID_SUBSETS random subsets of half of each set (drawn from `seed`,
    so the numbers repeat). Returns {name: {"fid", "kid", "kid_std"}}.
    """
    _check_images("reference set", real_uint8, real_uint8.shape[1:])
    for name, fake in fakes.items():
        _check_images(f"sample set {name!r}", fake, real_uint8.shape[1:])
    real = _features(feature_net, real_uint8, batch_size, device, "reference")
    passthrough = _Features(real.shape[1])
    frechet = FrechetInceptionDistance(feature=passthrough, reset_real_features=False)
    frechet.update(real, real=True)
    distances = {}
    for name, fake_uint8 in fakes.items():
        fake = _features(feature_net, fake_uint8, batch_size, device, name)
        frechet.update(fake, real=False)
        with warnings.catch_warnings():      # that it keeps all features: they are what we hand it
            warnings.filterwarnings("ignore", message=".*will save all extracted features")
            kernel = KernelInceptionDistance(feature=passthrough, subsets=KID_SUBSETS,
                                             subset_size=min(len(real), len(fake)) // 2)
        kernel.update(real, real=True)
        kernel.update(fake, real=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            kid, kid_std = kernel.compute()
        distances[name] = {"fid": float(frechet.compute()), "kid": float(kid), "kid_std": float(kid_std)}
        frechet.reset()      # drops the fake features only (reset_real_features=False)
    return distances


class _Features(nn.Module):
    """What torchmetrics' metrics see as their feature network: features already extracted (float64,
    so that results are not rounded back to float32) pass through unchanged."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


@torch.no_grad()
def _features(feature_net: nn.Module, images: np.ndarray, batch_size: int, device: Device, what: str) -> torch.Tensor:
    """The feature network's outputs for uint8 images, float64 on the CPU."""
    feature_net = feature_net.to(device)
    starts = range(0, len(images), batch_size)
    return torch.cat([feature_net(torch.from_numpy(images[start:start + batch_size]).to(device)).double().cpu()
                      for start in tqdm(starts, desc=f"features: {what}", unit="batch", disable=len(starts) < 4)])


def _check_images(what: str, images: np.ndarray, chw: tuple) -> None:
    if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4
            and images.shape[1:] == tuple(chw) and len(images) >= 2):
        shape = getattr(images, "shape", None)
        raise SfddmError(f"{what}: expected uint8 images of shape (N >= 2, {', '.join(map(str, chw))}), "
                         f"got {getattr(images, 'dtype', type(images).__name__)} {shape}")


def _inception_weights(cfg: EvaluateConfig) -> Path:
    path = Path(cfg.inception_weights or Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE)
    if not path.is_file():
        raise SfddmError(f"inception weights not found at {path}: download {INCEPTION_WEIGHTS_FILE} "
                         f"(torch-fidelity's release) and put it there or set evaluate.inception_weights")
    return path


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0]
