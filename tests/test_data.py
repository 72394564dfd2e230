import pickle
import re

import numpy as np
import pytest
import torch
from PIL import Image

from sfddm_core import data, io
from sfddm_core.config import DataConfig
from sfddm_core.errors import SfddmError


def _arrays(out, split):
    with np.load(out / f"{split}.npz") as npz:
        return npz["images"], npz["labels"]


def _assert_nothing_written(out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]   # no temp folder


# ---- digits ----

def test_digits_prepare_writes_hashed_splits(tmp_path):
    out = tmp_path / "data"
    meta = data.prepare(DataConfig(), seed=0, out_dir=out)

    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "test.npz", "train.npz"]
    assert meta == data.load_meta(out)
    assert meta["counts"] == {"train": 1797 - 449, "test": 449}       # round(0.25 * 1797) = 449
    assert meta["shape"] == [1, 8, 8] and meta["class_names"] == [str(d) for d in range(10)]
    for split in data.SPLITS:
        images, labels = _arrays(out, split)
        assert images.dtype == np.uint8 and images.shape == (meta["counts"][split], 1, 8, 8)
        assert labels.dtype == np.int64 and set(labels) == set(range(10))
        assert meta["sha256"][split] == {"images": io.sha256_array(images), "labels": io.sha256_array(labels)}
        loaded = data.load_split(out, split)
        np.testing.assert_array_equal(loaded[0], images)
        np.testing.assert_array_equal(loaded[1], labels)
    train, _ = _arrays(out, "train")
    assert train.min() == 0 and train.max() == 255


def test_digits_split_depends_only_on_seed(tmp_path):
    first = data.prepare(DataConfig(), seed=0, out_dir=tmp_path / "a")
    again = data.prepare(DataConfig(), seed=0, out_dir=tmp_path / "b")
    other = data.prepare(DataConfig(), seed=1, out_dir=tmp_path / "c")
    assert first["sha256"] == again["sha256"]
    assert first["sha256"]["test"] != other["sha256"]["test"]
    assert first["counts"] == other["counts"]


def test_digits_resized_and_capped(tmp_path):
    meta = data.prepare(DataConfig(image_size=16, max_images=100), seed=0, out_dir=tmp_path / "d")
    assert meta["counts"] == {"train": 75, "test": 25}
    images, _ = data.load_split(tmp_path / "d", "train")
    assert images.shape == (75, 1, 16, 16) and images.dtype == np.uint8


# ---- photos ----

def test_photo_class_is_the_grid_cell_of_the_crop_centre_after_the_earlier_photos_cells():
    assert data.PHOTO_GRID == (3, 3)
    assert data.photo_class(0, 0, 0, 427, 640) == 0
    assert data.photo_class(0, 213, 320, 427, 640) == 4             # the middle cell
    assert data.photo_class(0, 142, 639, 427, 640) == 2             # 142 * 3 // 427 = 0: top row, right
    assert data.photo_class(0, 143, 0, 427, 640) == 3               # 143 * 3 // 427 = 1
    assert data.photo_class(1, 426, 639, 427, 640) == 17            # the last cell of the second photo


@pytest.mark.parametrize("channels", [1, 3])
def test_photos_are_seeded_crops_labelled_by_where_they_come_from(tmp_path, channels):
    cfg = DataConfig(source="photos", image_size=16, channels=channels, max_images=200)
    meta = data.prepare(cfg, seed=0, out_dir=tmp_path / "a")
    assert meta["counts"] == {"train": 150, "test": 50} and meta["shape"] == [channels, 16, 16]
    assert meta["class_names"][:2] == ["china r0c0", "china r0c1"] and meta["class_names"][-1] == "flower r2c2"
    images, labels = data.load_split(tmp_path / "a", "train")
    assert images.shape == (150, channels, 16, 16) and images.dtype == np.uint8
    assert labels.min() >= 0 and labels.max() < 18 and len(set(labels)) > 9
    assert images.std() > 20                    # crops of two photos, not one flat colour
    assert data.prepare(cfg, seed=0, out_dir=tmp_path / "b")["sha256"] == meta["sha256"]
    assert data.prepare(cfg, seed=1, out_dir=tmp_path / "c")["sha256"]["train"] != meta["sha256"]["train"]


def test_photos_make_6000_crops_unless_capped(tmp_path):
    meta = data.prepare(DataConfig(source="photos", image_size=8, channels=3), seed=0, out_dir=tmp_path / "d")
    assert data.PHOTO_CROPS == 6000 and meta["counts"] == {"train": 4500, "test": 1500}


def test_prepare_replaces_an_existing_folder(tmp_path):
    out = tmp_path / "data"
    data.prepare(DataConfig(max_images=40), seed=0, out_dir=out)
    (out / "stale.txt").write_text("from an older run")
    data.prepare(DataConfig(max_images=20), seed=0, out_dir=out)
    assert not (out / "stale.txt").exists()
    assert data.load_meta(out)["counts"] == {"train": 15, "test": 5}


def test_model_range_round_trip():
    values = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)
    x = data.to_model_range(values)
    assert x.dtype == torch.float32 and x.min() == -1 and x.max() == 1
    np.testing.assert_array_equal(data.to_uint8(x), values)
    np.testing.assert_array_equal(data.to_uint8(torch.tensor([-3.0, 0.0, 2.0])), [0, 128, 255])


# ---- folder ----

def _image(path, mode, size, value=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(path)))
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    pixels = rng.integers(0, 256, shape, dtype=np.uint8) if value is None else np.full(shape, value, np.uint8)
    Image.fromarray(pixels, mode).save(path)
    return path


@pytest.fixture
def image_tree(tmp_path):
    root = tmp_path / "images"
    _image(root / "cats" / "a.png", "RGB", (20, 12))
    _image(root / "cats" / "b.JPG", "L", (9, 9))
    _image(root / "cats" / "c.png", "L", (8, 30))
    _image(root / "dogs" / "d.jpeg", "RGB", (10, 10))
    _image(root / "dogs" / "deeper" / "e.png", "RGB", (64, 48))
    _image(root / "dogs" / "f.PNG", "RGB", (5, 7))
    _image(root / "owls" / "g.jpg", "RGB", (33, 17))
    _image(root / "owls" / "h.png", "L", (16, 16))
    (root / "owls" / "notes.txt").write_text("not an image")
    return root


@pytest.mark.parametrize("channels", [1, 3])
def test_folder_source_reads_classes_from_subfolders(tmp_path, image_tree, channels):
    cfg = DataConfig(source="folder", path=str(image_tree), channels=channels, image_size=8)
    meta = data.prepare(cfg, seed=0, out_dir=tmp_path / "data")
    assert meta["class_names"] == ["cats", "dogs", "owls"]
    assert meta["counts"] == {"train": 6, "test": 2}
    labels = []
    for split in data.SPLITS:
        images, split_labels = data.load_split(tmp_path / "data", split)
        assert images.shape == (meta["counts"][split], channels, 8, 8) and images.dtype == np.uint8
        labels += split_labels.tolist()
    assert sorted(labels) == [0, 0, 0, 1, 1, 1, 2, 2]


def test_folder_source_center_crops(tmp_path):
    pixels = np.zeros((8, 16), np.uint8)
    pixels[:, 4:12] = 255                   # only the middle 8 columns survive the crop
    root = tmp_path / "flat"
    root.mkdir()
    Image.fromarray(pixels, "L").save(root / "wide.png")
    _image(root / "other.png", "L", (8, 8), value=0)
    cfg = DataConfig(source="folder", path=str(root), image_size=8, test_fraction=0.0)
    meta = data.prepare(cfg, seed=0, out_dir=tmp_path / "data")
    images, labels = data.load_split(tmp_path / "data", "train")
    assert meta["class_names"] == ["."] and labels.tolist() == [0, 0]      # a flat folder is one class
    assert meta["counts"]["test"] == 0
    assert sorted(int(im.min()) for im in images) == [0, 255]


def test_folder_missing_or_empty_is_refused(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images")
    for path in (tmp_path / "missing", empty):
        out = tmp_path / "data"
        with pytest.raises(SfddmError, match=re.escape(str(path))):
            data.prepare(DataConfig(source="folder", path=str(path)), seed=0, out_dir=out)
        _assert_nothing_written(out)


def test_folder_truncated_image_is_refused(tmp_path):
    root = tmp_path / "images"
    _image(root / "good.png", "RGB", (32, 32))
    bad = _image(root / "bad.png", "RGB", (32, 32))
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    out = tmp_path / "data"
    with pytest.raises(SfddmError, match=re.escape(str(bad))):
        data.prepare(DataConfig(source="folder", path=str(root), test_fraction=0.0), seed=0, out_dir=out)
    _assert_nothing_written(out)


# ---- load_split ----

def test_load_split_refuses_changed_or_truncated_arrays(tmp_path):
    out = tmp_path / "data"
    data.prepare(DataConfig(max_images=50), seed=0, out_dir=out)
    images, labels = _arrays(out, "train")
    images[0, 0, 0, 0] ^= 1
    np.savez(out / "train.npz", images=images, labels=labels)
    with pytest.raises(SfddmError, match=r"train\.npz: images do not match"):
        data.load_split(out, "train")

    test_file = out / "test.npz"
    test_file.write_bytes(test_file.read_bytes()[:100])
    with pytest.raises(SfddmError, match=r"test\.npz: unreadable or truncated"):
        data.load_split(out, "test")
    test_file.unlink()
    with pytest.raises(SfddmError, match=r"test\.npz: not found"):
        data.load_split(out, "test")
    with pytest.raises(SfddmError, match="meta.json: not found"):
        data.load_split(tmp_path / "nowhere", "train")


# ---- cifar10 ----

@pytest.fixture
def cifar_root(tmp_path):
    """A fake cifar-10-batches-py: 3 images per train batch, 4 in the test batch."""
    folder = tmp_path / "raw" / data.CIFAR10_FOLDER
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k, name in enumerate(data.CIFAR10_FILES["train"] + data.CIFAR10_FILES["test"]):
        n = 4 if name == "test_batch" else 3
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": [(k + i) % 10 for i in range(n)], b"batch_label": name.encode()}
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle)
    return tmp_path / "raw"


def _cifar_batch(root, name):
    with open(root / data.CIFAR10_FOLDER / name, "rb") as handle:
        return pickle.load(handle, encoding="bytes")


def test_cifar10_keeps_the_official_split(tmp_path, cifar_root):
    cfg = DataConfig(source="cifar10", path=str(cifar_root), channels=3, image_size=32)
    meta = data.prepare(cfg, seed=0, out_dir=tmp_path / "data")
    assert meta["counts"] == {"train": 15, "test": 4} and meta["class_names"][0] == "airplane"
    images, labels = data.load_split(tmp_path / "data", "test")
    test_batch = _cifar_batch(cifar_root, "test_batch")
    np.testing.assert_array_equal(images, test_batch[b"data"].reshape(4, 3, 32, 32))
    assert labels.tolist() == test_batch[b"labels"]


def test_cifar10_capped_resized_and_found_by_folder_name(tmp_path, cifar_root):
    cfg = DataConfig(source="cifar10", path=str(cifar_root / data.CIFAR10_FOLDER), channels=3,
                     image_size=16, max_images=5)
    meta = data.prepare(cfg, seed=0, out_dir=tmp_path / "data")
    assert meta["counts"] == {"train": 5, "test": 4}
    images, _ = data.load_split(tmp_path / "data", "train")
    assert images.shape == (5, 3, 16, 16)


def test_cifar10_missing_files_are_named(tmp_path, cifar_root):
    out = tmp_path / "data"
    with pytest.raises(SfddmError, match="cifar-10-batches-py: CIFAR-10 not found"):
        data.prepare(DataConfig(source="cifar10", path=str(tmp_path / "elsewhere"), channels=3), 0, out)
    missing = cifar_root / data.CIFAR10_FOLDER / "data_batch_3"
    missing.unlink()
    with pytest.raises(SfddmError, match=re.escape(f"{missing}: not found")):
        data.prepare(DataConfig(source="cifar10", path=str(cifar_root), channels=3), 0, out)
    _assert_nothing_written(out)
