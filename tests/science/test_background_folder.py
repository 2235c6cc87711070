"""The spurious-background image folder (starvation/datasets/backgrounds.py): layout, groups, counterfactuals, seeds."""
from __future__ import annotations

import csv
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from scripts.make_background_folder import main as cli_main
from starvation.datasets import load_image_folder
from starvation.datasets.backgrounds import COLUMNS, WATER, make_background_folder

SIZES = {"train": 200, "val": 60, "test": 100}
SIZE = 32
AGREEMENT = 0.9


def _make(root: pathlib.Path, seed: int) -> dict:
    return make_background_folder(root, n_train=SIZES["train"], n_val=SIZES["val"], n_test=SIZES["test"],
                                  image_size=SIZE, agreement=AGREEMENT, seed=seed)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, tuple[pathlib.Path, dict]]:
    made = {}
    for name, seed in (("a", 0), ("again", 0), ("other", 1)):
        root = tmp_path_factory.mktemp(f"backgrounds_{name}") / "folder"
        made[name] = (root, _make(root, seed))
    return made


@pytest.fixture(scope="module")
def rows(folders) -> list[dict[str, str]]:
    root, _ = folders["a"]
    with (root / "metadata.csv").open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == COLUMNS
        return list(reader)


def _rgb(root: pathlib.Path, relative: str) -> np.ndarray:
    with Image.open(root / relative) as image:
        assert image.mode == "RGB" and image.size == (SIZE, SIZE)
        return np.asarray(image).astype(np.int64)


def _mask(root: pathlib.Path, relative: str) -> np.ndarray:
    with Image.open(root / relative) as image:
        assert image.mode == "L" and image.size == (SIZE, SIZE)
        values = np.asarray(image)
    assert set(np.unique(values)) <= {0, 255}
    return values == 255


def test_csv_has_the_columns_and_the_counts(folders, rows) -> None:
    _, counts = folders["a"]
    assert {split: sum(r["split"] == split for r in rows) for split in SIZES} == SIZES
    assert [r["split"] for r in rows] == [s for s in SIZES for _ in range(SIZES[s])]  # train, then val, then test
    for split, n in SIZES.items():
        mine = [r for r in rows if r["split"] == split]
        assert [r["path"] for r in mine] == [f"images/{split}/{i}.png" for i in range(n)]
        assert [r["counterfactual"] for r in mine] == [f"counterfactual/{split}/{i}.png" for i in range(n)]
        assert [r["mask"] for r in mine] == [f"masks/{split}/{i}.png" for i in range(n)]
        groups = {f"y{y}_a{a}": sum(r["label"] == str(y) and r["attribute"] == str(a) for r in mine)
                  for y in (0, 1) for a in (0, 1)}
        assert counts[split]["n"] == n and counts[split]["groups"] == groups
    assert {r["label"] for r in rows} == {"0", "1"} and {r["attribute"] for r in rows} == {"0", "1"}
    info = json.loads((folders["a"][0] / "info.json").read_text())
    assert info["counts"] == counts and info["params"]["seed"] == 0


def test_background_agrees_with_the_label_in_train_only(rows) -> None:
    def agreement(split: str, label: str | None = None) -> float:
        mine = [r for r in rows if r["split"] == split and label in (None, r["label"])]
        return float(np.mean([r["label"] == r["attribute"] for r in mine]))

    assert abs(agreement("train") - AGREEMENT) <= 0.01  # exact per label, up to rounding
    for split in ("val", "test"):  # background independent of the label: half of each label on each family
        for label in ("0", "1"):
            assert abs(agreement(split, label) - 0.5) <= 0.05
    labels = np.array([int(r["label"]) for r in rows if r["split"] == "train"])
    assert 0.35 < labels.mean() < 0.65  # digits 0-4 vs 5-9: about balanced


def test_counterfactual_keeps_the_object_and_swaps_the_background_family(folders, rows) -> None:
    root, _ = folders["a"]
    for r in rows:
        image, counterfactual, mask = _rgb(root, r["path"]), _rgb(root, r["counterfactual"]), _mask(root, r["mask"])
        assert 0 < mask.sum() < mask.size
        assert (image[mask] == counterfactual[mask]).all()  # the object: identical pixels
        outside = ~mask
        assert (image[outside] != counterfactual[outside]).any(axis=1).all()  # every background pixel changed
        # The families' tints: a background pixel has blue > green exactly when it is water-like (attribute 1).
        water = int(r["attribute"]) == WATER
        assert ((image[outside][:, 2] > image[outside][:, 1]) == water).all()
        assert ((counterfactual[outside][:, 2] > counterfactual[outside][:, 1]) == (not water)).all()


def test_same_seed_same_bytes_other_seed_other_images(folders) -> None:
    def files(root: pathlib.Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    first, again, other = (files(folders[name][0]) for name in ("a", "again", "other"))
    assert first == again
    assert first.keys() == other.keys()
    images = [name for name in first if name.startswith(("images/", "counterfactual/"))]
    assert sum(first[name] != other[name] for name in images) == len(images)
    assert first["metadata.csv"] != other["metadata.csv"]


def test_every_path_is_inside_the_folder_and_every_file_is_listed(folders, rows) -> None:
    root, _ = folders["a"]
    resolved = root.resolve()
    listed = {"metadata.csv", "info.json"}
    for r in rows:
        for column in ("path", "counterfactual", "mask"):
            relative = pathlib.PurePosixPath(r[column])
            assert not relative.is_absolute() and ".." not in relative.parts
            path = (root / relative).resolve()
            assert path.is_relative_to(resolved) and path.is_file()
            listed.add(relative.as_posix())
    assert {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} == listed


def test_the_image_folder_loader_reads_it(folders) -> None:
    root, _ = folders["a"]
    data = load_image_folder(root, root / "metadata.csv", "backgrounds", SIZE)
    assert data.train_splits == ["train"] and data.test_split == "test"
    assert {name: len(split) for name, split in data.splits.items()} == SIZES
    assert tuple(data.splits["train"].x.shape[1:]) == (3, SIZE, SIZE)


def test_refuses_a_used_folder_and_bad_arguments(tmp_path) -> None:
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(FileExistsError):
        make_background_folder(tmp_path, n_train=2, n_val=0, n_test=0)
    for bad in ({"n_train": -1}, {"n_train": 0, "n_test": 0}, {"image_size": 8}, {"agreement": 1.5}, {"seed": -1}):
        kwargs = {"n_train": 2, "n_val": 0, "n_test": 1, **bad}
        with pytest.raises(ValueError):
            make_background_folder(tmp_path / "new", **kwargs)
    assert not (tmp_path / "new").exists()


def test_cli_writes_a_folder(tmp_path, capsys) -> None:
    out = tmp_path / "cli"
    assert cli_main([str(out), "--train", "6", "--val", "2", "--test", "4", "--size", "16", "--seed", "3"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert {split: c["n"] for split, c in counts.items()} == {"train": 6, "val": 2, "test": 4}
    with (out / "metadata.csv").open(newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 12
    assert cli_main([str(out), "--train", "1", "--val", "0", "--test", "0"]) == 2  # not empty any more


def test_the_balanced_upstream_variant_labels_digits_and_makes_the_background_independent(tmp_path) -> None:
    import csv
    from collections import Counter

    counts = make_background_folder(tmp_path / "upstream", n_train=200, n_val=0, n_test=40, image_size=16, seed=0,
                                    labels="digit")
    with (tmp_path / "upstream" / "metadata.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    labels = {int(r["label"]) for r in rows}
    assert labels == set(range(10))
    per_label = Counter((int(r["label"]), int(r["attribute"])) for r in rows if r["split"] == "train")
    for label in labels:  # half of each digit on either background family, in train too
        assert abs(per_label[(label, 0)] - per_label[(label, 1)]) <= 1, per_label
    assert abs(counts["train"]["agreement"] - 0.5) < 0.1
    with pytest.raises(ValueError):
        make_background_folder(tmp_path / "bad", n_train=2, n_val=0, n_test=0, labels="colour")
