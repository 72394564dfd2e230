"""Saturated pixels of stored images: the fraction at 0 or 255, the ends of the uint8 range.

    python -m benchmarks.saturation FILE.npz [FILE.npz ...]

A sampler whose x0 leaves [-1, 1] (the teacher's unclipped ODE, which SFDDM's targets follow) has its
images clipped there when they are stored, so they saturate; an FID far above the same teacher's DDPM
with many more saturated pixels than the data says the sampler left the data's range, not that it drew
the wrong content. FILE is any .npz with an `images` array: a chain's samples/teacher_*.npz, a bench
store's teacher_ddpm-*.npz, or a prepared split (data/train.npz) for the data's own fraction.
"""
from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path

import numpy as np


def saturated_fraction(images: np.ndarray) -> float:
    """The fraction of uint8 values at 0 or 255."""
    if images.dtype != np.uint8:
        raise ValueError(f"images of dtype {images.dtype}; expected uint8 (stored samples or a prepared split)")
    return float(np.isin(images, (0, 255)).mean())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", type=Path, nargs="+", metavar="FILE.npz")
    args = parser.parse_args(argv)
    rows = []
    for path in args.files:
        try:
            with np.load(path) as stored:
                images = stored["images"]
            rows.append((path, images.shape, saturated_fraction(images)))
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
            print(f"benchmarks.saturation: {path}: {err}", file=sys.stderr)
            return 2
    for path, shape, fraction in rows:
        print(f"{fraction:.3f}  {'x'.join(map(str, shape))}  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
