"""Datasets as two uint8 arrays per split, hashed once at prepare time and checked on every load.

`prepare` turns a source (sklearn's bundled digits, crops of its two bundled sample photos, the CIFAR-10
python pickles, or a folder of images)
into `train.npz` / `test.npz` (images uint8 NCHW, labels int64) plus `meta.json`; every later stage
reads them through `load_split`, and moves between uint8 and the model's [-1, 1] range through
`to_model_range` / `to_uint8` only.
"""
from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from . import io
from .config import DataConfig
from .errors import SfddmError

SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_FILES = {"train": [f"data_batch_{k}" for k in range(1, 6)], "test": ["test_batch"]}
PROGRESS_MIN_FILES = 500            # below this, reading is too quick for a progress bar to help
PHOTO_CROPS = 6000                  # photos: crops made when data.max_images is null
PHOTO_GRID = (3, 3)                 # photos: a crop's class is the cell of this grid (rows, columns) its centre is in
PHOTO_CROP_SIDES = (32, 128)        # photos: side of a square crop in photo pixels, drawn uniformly in this range

Split = tuple[np.ndarray, np.ndarray]       # images uint8 (N, C, H, W), labels int64 (N,)


def prepare(cfg: DataConfig, seed: int, out_dir: Union[str, Path]) -> dict:
    """Read cfg.source, write out_dir/{train,test}.npz and meta.json atomically; return the meta dict."""
    readers = {"digits": _read_digits, "photos": _read_photos, "cifar10": _read_cifar10, "folder": _read_folder}
    splits, class_names = readers[cfg.source](cfg, seed)
    meta = {
        "source": cfg.source,
        "path": cfg.path,
        "image_size": cfg.image_size,
        "channels": cfg.channels,
        "shape": [cfg.channels, cfg.image_size, cfg.image_size],
        "counts": {split: len(labels) for split, (_, labels) in splits.items()},
        "class_names": list(class_names),
        "seed": seed,
        "test_fraction": None if cfg.source == "cifar10" else cfg.test_fraction,  # cifar10: official split
        "max_images": cfg.max_images,
        "sha256": {split: {"images": io.sha256_array(images), "labels": io.sha256_array(labels)}
                   for split, (images, labels) in splits.items()},
    }
    with io.atomic_dir(out_dir) as tmp:
        for split, (images, labels) in splits.items():
            np.savez(tmp / f"{split}.npz", images=images, labels=labels)
        io.write_json(tmp / "meta.json", meta)
    return meta


def load_meta(data_dir: Union[str, Path]) -> dict:
    path = Path(data_dir) / "meta.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SfddmError(f"{path}: not found; run `sfddm prepare` first") from None
    except (OSError, ValueError) as err:
        raise SfddmError(f"{path}: unreadable ({err}); rerun `sfddm prepare`") from None


def load_split(data_dir: Union[str, Path], split: str) -> Split:
    """(images uint8 NCHW, labels int64) of one split, refused unless both match the hashes in meta.json."""
    meta = load_meta(data_dir)
    if split not in meta.get("sha256", {}):
        raise SfddmError(f"{Path(data_dir) / 'meta.json'}: no split {split!r}; expected one of {list(SPLITS)}")
    path = Path(data_dir) / f"{split}.npz"
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in ("images", "labels")}
    except FileNotFoundError:
        raise SfddmError(f"{path}: not found; rerun `sfddm prepare`") from None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise SfddmError(f"{path}: unreadable or truncated ({err}); rerun `sfddm prepare`") from None
    for name, array in arrays.items():
        if io.sha256_array(array) != meta["sha256"][split][name]:
            raise SfddmError(f"{path}: {name} do not match their sha256 in meta.json (changed after "
                             f"prepare); rerun `sfddm prepare`")
    return arrays["images"], arrays["labels"]


def to_model_range(images_uint8: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
    """uint8 0..255 -> float32 in [-1, 1] (a tensor keeps its device)."""
    return torch.as_tensor(images_uint8).float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float in [-1, 1] -> uint8 0..255 numpy array (clipped, rounded); the inverse of to_model_range."""
    return ((x.detach().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8).cpu().numpy()


# ---- sources: each returns ({split: (images, labels)}, class names) ----

def _read_digits(cfg: DataConfig, seed: int) -> tuple[dict[str, Split], list[str]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # A pixel counts the set pixels (0..16) of a 4x4 block of the original scan; stretch to 0..255.
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)[:, None]
    images = _resize_all(images, cfg.image_size, "digits")
    labels = digits.target.astype(np.int64)
    splits = {split: (images[idx], labels[idx])
              for split, idx in _random_split(len(labels), cfg, seed).items()}
    return splits, [str(d) for d in range(10)]


def _read_photos(cfg: DataConfig, seed: int) -> tuple[dict[str, Split], list[str]]:
    """Seeded square crops of scikit-learn's bundled sample photos (china.jpg, flower.jpg; 427 x 640 RGB),
    of random side in PHOTO_CROP_SIDES, resized to image_size. An RGB dataset that ships with a package.
    A crop's class is where it comes from: its photo and the PHOTO_GRID cell of its centre, so a
    classifier trained on the labels learns the colours and textures that tell regions apart."""
    from sklearn.datasets import load_sample_images

    sample = load_sample_images()
    rng = np.random.default_rng(seed)
    count = cfg.max_images if cfg.max_images is not None else PHOTO_CROPS
    mode = {1: "L", 3: "RGB"}[cfg.channels]
    rows, columns = PHOTO_GRID
    images, labels = [], []
    for _ in tqdm(range(count), desc=f"cropping sample photos to {cfg.image_size}x{cfg.image_size}", unit="img",
                  disable=count < PROGRESS_MIN_FILES):
        photo = int(rng.integers(len(sample.images)))
        height, width, _ = sample.images[photo].shape
        side = int(rng.integers(PHOTO_CROP_SIDES[0], PHOTO_CROP_SIDES[1] + 1))
        top, left = int(rng.integers(height - side + 1)), int(rng.integers(width - side + 1))
        crop = Image.fromarray(sample.images[photo][top:top + side, left:left + side]).convert(mode)
        images.append(_chw(crop.resize((cfg.image_size, cfg.image_size), Image.BICUBIC)))
        labels.append(photo_class(photo, top + side // 2, left + side // 2, height, width))
    images, labels = np.stack(images), np.asarray(labels, dtype=np.int64)
    splits = {split: (images[idx], labels[idx]) for split, idx in _random_split(count, cfg, seed).items()}
    names = [f"{Path(name).stem} r{cell // columns}c{cell % columns}" for name in sample.filenames
             for cell in range(rows * columns)]
    return splits, names


def photo_class(photo: int, row: int, column: int, height: int, width: int) -> int:
    """The class of a crop centred at pixel (row, column) of sample photo `photo` (height x width): the
    PHOTO_GRID cell it falls in, numbered row-major, after the cells of the photos before it."""
    rows, columns = PHOTO_GRID
    return (photo * rows + row * rows // height) * columns + column * columns // width


def _read_cifar10(cfg: DataConfig, seed: int) -> tuple[dict[str, Split], list[str]]:
    folder = _cifar10_folder(cfg)
    rng = np.random.default_rng(seed)
    splits = {}
    for split in SPLITS:
        images, labels = _read_cifar10_batches(folder, CIFAR10_FILES[split])
        if cfg.max_images is not None:
            keep = rng.permutation(len(labels))[:cfg.max_images]
            images, labels = images[keep], labels[keep]
        splits[split] = (_resize_all(images, cfg.image_size, f"cifar10 {split}"), labels)
    return splits, list(CIFAR10_CLASSES)


def _read_folder(cfg: DataConfig, seed: int) -> tuple[dict[str, Split], list[str]]:
    root = Path(cfg.path)
    if not root.is_dir():
        raise SfddmError(f"{root}: data.path is not a folder; expected a folder of .png/.jpg images")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise SfddmError(f"{root}: no .png/.jpg/.jpeg images found under data.path")
    # The class of an image is its top-level subfolder; images directly under the root form class ".".
    classes = [p.relative_to(root).parts[0] if p.parent != root else "." for p in files]
    class_names = sorted(set(classes))
    index = {name: k for k, name in enumerate(class_names)}
    labels = np.array([index[c] for c in classes], dtype=np.int64)
    mode = {1: "L", 3: "RGB"}[cfg.channels]
    splits = {}
    for split, idx in _random_split(len(files), cfg, seed).items():
        chosen = [files[i] for i in idx]
        bar = tqdm(chosen, desc=f"reading {root} ({split})", unit="img",
                   disable=len(files) < PROGRESS_MIN_FILES)
        images = np.asarray([_read_image(p, mode, cfg.image_size) for p in bar], dtype=np.uint8)
        splits[split] = (images.reshape(-1, cfg.channels, cfg.image_size, cfg.image_size), labels[idx])
    return splits, class_names


# ---- helpers ----

def _random_split(n: int, cfg: DataConfig, seed: int) -> dict[str, np.ndarray]:
    """Seeded permutation of range(n), capped at max_images, then cut into test (first) and train indices."""
    order = np.random.default_rng(seed).permutation(n)[:cfg.max_images]
    n_test = round(cfg.test_fraction * len(order))
    if n_test == len(order):
        raise SfddmError(f"data.test_fraction: {cfg.test_fraction} of {len(order)} images leaves no "
                         f"training images; expected a smaller fraction or more images")
    return {"train": order[n_test:], "test": order[:n_test]}


def _cifar10_folder(cfg: DataConfig) -> Path:
    root = Path(cfg.path or "data/raw")
    if (root / CIFAR10_FOLDER).is_dir():
        return root / CIFAR10_FOLDER
    if any((root / name).exists() for names in CIFAR10_FILES.values() for name in names):
        return root         # data.path names cifar-10-batches-py itself
    if cfg.download:
        import torchvision

        torchvision.datasets.CIFAR10(root=str(root), download=True)
        return root / CIFAR10_FOLDER
    raise SfddmError(f"{root / CIFAR10_FOLDER}: CIFAR-10 not found; put the python version there "
                     f"(data_batch_1..5, test_batch) or set data.download: true where the network allows")


def _read_cifar10_batches(folder: Path, names: list[str]) -> Split:
    images, labels = [], []
    for name in names:
        path = folder / name
        try:
            with open(path, "rb") as handle:
                batch = pickle.load(handle, encoding="bytes")
            data = np.asarray(batch[b"data"], dtype=np.uint8)
            labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
        except FileNotFoundError:
            raise SfddmError(f"{path}: not found; put the complete {CIFAR10_FOLDER} folder "
                             f"(data_batch_1..5, test_batch) at data.path") from None
        except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError) as err:
            raise SfddmError(f"{path}: not a CIFAR-10 python batch ({err!r})") from None
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels[-1]):
            raise SfddmError(f"{path}: expected b'data' of shape (N, 3072) and N labels, got "
                             f"{data.shape} and {len(labels[-1])} labels")
        images.append(data.reshape(-1, 3, 32, 32))     # rows are R plane, G plane, B plane
    return np.concatenate(images), np.concatenate(labels)


def _read_image(path: Path, mode: str, size: int) -> np.ndarray:
    """One file -> uint8 (C, size, size): converted to mode, shorter side resized to size, center-cropped."""
    try:
        with Image.open(path) as img:
            img.load()          # decode now, so a truncated file fails here and not later
            img = img.convert(mode)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise SfddmError(f"{path}: unreadable image ({err})") from None
    return _chw(ImageOps.fit(img, (size, size), method=Image.BICUBIC))


def _resize_all(images: np.ndarray, size: int, what: str) -> np.ndarray:
    """Bicubic resize of square uint8 NCHW images to size x size (a no-op at the native size)."""
    if images.shape[-1] == size:
        return images
    mode = {1: "L", 3: "RGB"}[images.shape[1]]
    bar = tqdm(images, desc=f"resizing {what} to {size}x{size}", unit="img",
               disable=len(images) < PROGRESS_MIN_FILES)
    return np.stack([_chw(Image.fromarray(_hwc(im), mode).resize((size, size), Image.BICUBIC))
                     for im in bar])


def _hwc(image_chw: np.ndarray) -> np.ndarray:
    return image_chw[0] if image_chw.shape[0] == 1 else image_chw.transpose(1, 2, 0)


def _chw(img: Image.Image) -> np.ndarray:
    array = np.asarray(img, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
