"""Image folders stream from disk: training and audits read batches, and give what the same images in memory give."""
from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from starvation import datasets
from starvation.audit import run_audit
from starvation.checkpoints.wrap import wrap_module
from starvation.datasets.user import from_arrays
from starvation.training import train

N_TRAIN, N_TEST = 48, 24


def coloured_folder(root: pathlib.Path) -> pathlib.Path:
    """Noisy 12x12 images whose background is red (attribute 0) or green (1), with the same image in the other colour
    as each row's counterfactual; in training the colour agrees with the label, at test it is independent of it."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    (root / "swap").mkdir()
    lines = ["path,label,attribute,split,counterfactual"]
    for i in range(N_TRAIN + N_TEST):
        label = i % 2
        attribute = label if i < N_TRAIN else (i // 2) % 2
        noise = rng.integers(0, 60, (12, 12, 3), dtype=np.uint8)
        for value, folder in ((attribute, "img"), (1 - attribute, "swap")):
            pixels = noise.copy()
            pixels[..., value] += 150  # red channel for 0, green for 1
            Image.fromarray(pixels).save(root / folder / f"{i}.png")
        lines.append(f"img/{i}.png,{label},{attribute},{'train' if i < N_TRAIN else 'test'},swap/{i}.png")
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root / "metadata.csv"


def in_memory_twin(folder: datasets.Dataset) -> datasets.Dataset:
    """The same images, labels and splits as tensors (what an .npz upload of them would be)."""
    names = list(folder.splits)
    x = torch.cat([folder.splits[name].x.load() for name in names]).numpy()
    y = torch.cat([folder.splits[name].y for name in names]).numpy()
    attribute = torch.cat([folder.splits[name].attribute for name in names]).numpy()
    split = np.concatenate([[name] * len(folder.splits[name]) for name in names])
    return from_arrays(folder.name, x, y, attribute, split, info={})


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("coloured")
    coloured_folder(root)
    return root


@pytest.mark.parametrize("workers", [0, 2])
def test_a_streamed_folder_trains_exactly_as_its_images_in_memory(folder, tmp_path, workers) -> None:
    streamed = datasets.load_image_folder(folder, folder / "metadata.csv", "coloured", 8, workers=workers)
    spec = {"dataset": {"name": "coloured"}, "model": {"arch": "cnn", "channels": [4, 8]}, "method": {"name": "sd"},
            "steps": 9, "batch_size": 16, "eval_every": 3, "seeds": [5]}
    from_disk = train(spec, out_dir=tmp_path / "disk", dataset=streamed)
    from_memory = train(spec, out_dir=tmp_path / "memory", dataset=in_memory_twin(streamed))
    assert from_disk.result["execution"]["used"] == "sequential"
    assert from_disk.result["splits"] == from_memory.result["splits"]
    disk, memory = (load_file(o.checkpoints[0].safetensors_path) for o in (from_disk, from_memory))
    assert disk.keys() == memory.keys() and all(torch.equal(disk[k], memory[k]) for k in disk)


def test_a_folder_with_a_batch_larger_than_its_training_images_trains_on_all_of_them(folder, tmp_path) -> None:
    streamed = datasets.load_image_folder(folder, folder / "metadata.csv", "coloured", 8)
    spec = {"dataset": {"name": "coloured"}, "model": {"arch": "cnn", "channels": [4]}, "steps": 3, "eval_every": 3,
            "batch_size": 2 * N_TRAIN, "seeds": [1]}
    from_disk = train(spec, out_dir=tmp_path / "disk", dataset=streamed)
    from_memory = train(spec, out_dir=tmp_path / "memory", dataset=in_memory_twin(streamed))
    assert from_disk.result["splits"] == from_memory.result["splits"]


def test_a_folder_trains_in_minibatches_only(folder, tmp_path) -> None:
    streamed = datasets.load_image_folder(folder, folder / "metadata.csv", "coloured", 8)
    spec = {"dataset": {"name": "coloured"}, "model": {"arch": "cnn", "channels": [4]}, "steps": 2}
    with pytest.raises(datasets.SpecError, match="set batch_size"):
        train(spec, out_dir=tmp_path, dataset=streamed)


class ReadsGreen(nn.Module):
    """Predicts label 1 when the image is greener than it is red: a model that relies on the attribute alone."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, 1] - x[:, 0]).mean(dim=(1, 2)).unsqueeze(1) * 10


def test_an_audit_streams_the_test_split_and_swaps_to_the_counterfactual_images(folder, tmp_path) -> None:
    streamed = datasets.load_image_folder(folder, folder / "metadata.csv", "coloured", 8)
    assert streamed.can_intervene
    report = run_audit(wrap_module(ReadsGreen()), streamed, probes=["groups", "counterfactual"],
                       spurious_attribute="attribute", seed=0, out_dir=tmp_path)
    assert sum(group["n"] for group in report["groups"]) == N_TEST
    assert report["counterfactual"]["flip_rate"] == 1.0 and report["counterfactual"]["flip_rate_towards"] == 1.0
    conflicting = [g for g in report["groups"] if not g["aligned"]]
    assert conflicting and all(g["accuracy"] == 0.0 for g in conflicting)


def test_a_folder_without_counterfactuals_cannot_intervene(folder, tmp_path) -> None:
    csv_path = tmp_path / "plain.csv"
    lines = (folder / "metadata.csv").read_text().splitlines()
    csv_path.write_text("\n".join(line.rsplit(",", 1)[0] for line in lines) + "\n")
    plain = datasets.load_image_folder(folder, csv_path, "plain", 8)
    assert not plain.can_intervene


def test_reading_a_split_holds_one_batch_at_a_time(folder, monkeypatch) -> None:
    streamed = datasets.load_image_folder(folder, folder / "metadata.csv", "coloured", 8)
    monkeypatch.setattr(datasets.files, "IMAGE_BATCH", 10)
    reads, seen = [], []
    read = datasets.ImageFiles.read
    monkeypatch.setattr(datasets.ImageFiles, "read", lambda self, i: reads.append(i) or read(self, i))
    for batch in datasets.batches_of(streamed.splits["test"].x, 1024):
        seen.append((len(batch), len(reads)))
    assert seen == [(10, 10), (10, 20), (4, 24)]  # each batch read when it is asked for, never the split at once


def test_the_index_round_trips_without_pickle(folder, tmp_path) -> None:
    index = datasets.index_image_folder(folder, folder / "metadata.csv")
    datasets.save_index(index, tmp_path / "index.npz")
    again = datasets.load_index(tmp_path / "index.npz")
    assert all(np.array_equal(getattr(index, f), getattr(again, f))
               for f in ("paths", "labels", "attributes", "splits", "counterfactuals"))
    assert index.summary()["test"]["n"] == N_TEST


@pytest.mark.parametrize("line, message", [
    ("img/0.png" + "/." * 600 + ",1,0,train", "a path of 1209 characters; the limit is 1024"),
    ("img/0.png,1,0," + "t" * 100_000, "a split name must be"),
    ("img/\x000.png,1,0,train", r"the path is not a usable path \(embedded null byte\)"),
])
def test_a_row_that_would_blow_up_the_index_is_refused_naming_its_line(folder, tmp_path, line, message) -> None:
    csv_path = tmp_path / "hostile.csv"
    csv_path.write_text("path,label,attribute,split\nimg/1.png,1,1,train\n" + line + "\n")
    with pytest.raises(datasets.DatasetError, match=f"line 3: {message}"):
        datasets.index_image_folder(folder, csv_path)


def test_a_csv_past_the_row_limit_is_refused_before_it_is_held(folder, tmp_path) -> None:
    csv_path = tmp_path / "long.csv"
    csv_path.write_text("path,label,attribute\n" + "img/0.png,0,0\n" * 11)
    with pytest.raises(datasets.DatasetError, match="line 12: the CSV lists more than 10 images") as error:
        datasets.index_image_folder(folder, csv_path, max_rows=10)
    assert error.value.code == "too_large"
    assert len(datasets.index_image_folder(folder, csv_path, max_rows=11).paths) == 11


@pytest.mark.parametrize("special", ["fifo", "folder"])
def test_a_row_naming_anything_but_a_regular_file_is_refused_without_waiting(folder, tmp_path, special) -> None:
    import os
    import shutil

    shutil.copy(folder / "img" / "0.png", tmp_path / "0.png")
    odd = tmp_path / "odd.png"
    if special == "fifo":
        os.mkfifo(odd)  # opened for reading the ordinary way, it would wait for a writer forever
    else:
        odd.mkdir()
    csv_path = tmp_path / "odd.csv"
    csv_path.write_text("path,label,attribute\n0.png,0,0\nodd.png,1,1\n")
    with pytest.raises(datasets.DatasetError, match="line 3: the image is not a regular file"):
        datasets.index_image_folder(tmp_path, csv_path)


def test_a_metadata_csv_that_is_a_fifo_is_refused_without_waiting(folder, tmp_path) -> None:
    import os

    os.mkfifo(tmp_path / "metadata.csv")
    with pytest.raises(datasets.DatasetError, match="the metadata CSV is not a regular file"):
        datasets.index_image_folder(folder, tmp_path / "metadata.csv")


def test_a_check_past_its_time_limit_fails_naming_where_it_stopped(folder) -> None:
    with pytest.raises(datasets.DatasetError, match=r"line 2: the check ran past its limit of 0 s") as error:
        datasets.index_image_folder(folder, folder / "metadata.csv", time_limit_s=0)
    assert error.value.code == "too_large"
    assert len(datasets.index_image_folder(folder, folder / "metadata.csv", time_limit_s=60).paths) == N_TRAIN + N_TEST


def test_an_image_gone_since_the_check_is_its_own_error_even_from_a_loader_process(folder, tmp_path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    data = datasets.load_image_folder(copy, copy / "metadata.csv", "coloured", 8, workers=2)
    (copy / "img" / "0.png").unlink()
    with pytest.raises(datasets.DatasetError) as gone:  # its type and message, not a traceback's text
        list(datasets.batches_of(data.splits["train"].x, 16))
    assert str(gone.value) == "image 'img/0.png': cannot read the image (No such file or directory)"
