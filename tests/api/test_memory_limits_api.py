"""Bombs are refused before anything is loaded (4xx, never a 500), and train specs over the worker's memory
budget are refused at submit naming the field to shrink."""
from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from tests.science.test_dataset_limits import members_of, npy_header, small_arrays, zero_bomb
from tests.api.test_datasets_api import checked


@pytest.fixture
def no_array_is_loaded(monkeypatch):
    """np.load made to record and refuse every call: a bomb must be refused before numpy is asked to load it."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise ValueError("np.load was called")

    monkeypatch.setattr(np, "load", refuse)
    yield calls
    assert calls == [], "an array of the bomb was loaded"


def post_npz(client, content: bytes, name: str = "bomb", headers=None):
    return client.post("/v1/datasets", files={"file": ("d.npz", content)}, data={"name": name}, headers=headers)


def test_an_npz_whose_header_declares_a_huge_array_is_a_413_naming_it(client, no_array_is_loaded) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for member, data in members_of(small_arrays()).items():
            archive.writestr(member, data)
        archive.writestr("split.npy", npy_header((10**12,), "<U8") + bytes(32))
    response = post_npz(client, buffer.getvalue())
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["code"] == "too_large" and "'split'" in error["message"]


def test_a_195_kb_zero_bomb_is_a_413_and_is_never_inflated(client, tmp_path, no_array_is_loaded) -> None:
    content = zero_bomb(tmp_path / "zeros.npz", 200 << 20).read_bytes()  # the attack: ~200 KB -> 200 MiB -> 800 MiB
    assert len(content) < 400_000
    response = post_npz(client, content)
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "too_large" and "'x'" in response.json()["error"]["message"]


def test_an_npz_with_an_object_array_is_a_422_before_loading(client, no_array_is_loaded) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for member, data in {**members_of(small_arrays()), "x.npy": npy_header((4, 2), "|O") + bytes(32)}.items():
            archive.writestr(member, data)
    response = post_npz(client, buffer.getvalue())
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_dataset"


def test_an_npz_over_the_configured_dataset_limit_is_a_413(client, monkeypatch) -> None:
    from core.settings import get_settings

    buffer = io.BytesIO()
    np.savez(buffer, **small_arrays(1000))
    monkeypatch.setattr(get_settings(), "max_dataset_bytes", 10_000)
    assert post_npz(client, buffer.getvalue()).status_code == 413
    monkeypatch.setattr(get_settings(), "max_dataset_bytes", 2 << 30)
    assert post_npz(client, buffer.getvalue(), name="fine").status_code == 201


def test_a_png_bomb_in_an_image_folder_fails_its_check_from_the_header(client, tmp_path, monkeypatch) -> None:
    from PIL import Image

    from core.settings import get_settings

    folder = tmp_path / "faces"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "ok.png")
    Image.new("1", (15_000, 15_000)).save(folder / "bomb.png", optimize=True)  # 225 megapixels, a few hundred kB
    (folder / "metadata.csv").write_text("path,label,attribute\nok.png,0,0\nbomb.png,1,1\n")
    monkeypatch.setattr(get_settings(), "data_dir", tmp_path)
    dataset = checked(client, {"name": "faces", "format": "image_folder", "folder": "faces", "image_size": "8"})
    assert dataset["status"] == "failed" and "line 3: the image is refused as a decompression bomb" in dataset["error"]


def test_a_corrupt_image_fails_its_check(client, tmp_path, monkeypatch) -> None:
    from core.settings import get_settings

    folder = tmp_path / "faces"
    folder.mkdir()
    (folder / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    (folder / "metadata.csv").write_text("path,label,attribute\ncut.png,0,0\n")
    monkeypatch.setattr(get_settings(), "data_dir", tmp_path)
    dataset = checked(client, {"name": "faces", "format": "image_folder", "folder": "faces"})
    assert dataset["status"] == "failed" and "line 2: cannot read the image" in dataset["error"], dataset


def train(client, spec: dict, headers):
    return client.post("/v1/jobs", json={"kind": "train", "spec": spec}, headers=headers)


@pytest.mark.parametrize("spec, field", [
    ({"preset": "paper_cmnist_sd", "model": {"arch": "mlp", "hidden": [1e9, 1e9]}}, "spec.model.hidden"),
    ({"preset": "paper_cmnist_sd", "model": {"arch": "mlp", "hidden": [16384, 16384]}}, "spec.model.hidden"),
    ({"preset": "paper_moons_erm", "dataset": {"name": "two_moons", "params": {"n_samples": 10**12}}},
     "spec.dataset.params.n_samples"),
    ({"preset": "paper_moons_erm", "dataset": {"name": "two_moons", "params": {"n_samples": 1e12}}},
     "spec.dataset.params.n_samples"),
])
def test_unbounded_sizes_in_a_train_spec_are_a_422_naming_the_field(client, tenant, spec, field) -> None:
    response = train(client, spec, tenant())
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_spec" and error["details"]["field"] == field
    assert field.removeprefix("spec.") in error["message"]


def test_a_spec_over_the_memory_budget_is_a_422_naming_the_field_that_dominates(client, tenant) -> None:
    spec = {"preset": "paper_moons_erm", "dataset": {"name": "two_moons", "params": {"n_samples": 1_000_000}},
            "seeds": list(range(10))}
    response = train(client, spec, tenant())
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "over_budget" and error["details"]["field"] == "spec.dataset.params.n_samples"
    assert error["details"]["estimate_bytes"] > error["details"]["budget_bytes"] == 8 << 30


def test_the_budget_is_a_setting(client, tenant, monkeypatch) -> None:
    from core.settings import get_settings

    spec = {"preset": "paper_moons_erm", "seeds": list(range(10))}
    monkeypatch.setattr(get_settings(), "worker_memory_budget_bytes", 64 << 20)
    assert train(client, spec, tenant()).json()["error"]["code"] == "over_budget"


@pytest.mark.parametrize("preset", ["paper_cmnist_erm", "paper_cmnist_sd", "paper_cmnist_irm", "paper_cmnist_weight_decay",
                                    "paper_moons_erm", "paper_moons_sd"])
def test_the_paper_presets_with_ten_seeds_are_accepted(client, tenant, preset) -> None:
    response = train(client, {"preset": preset, "seeds": list(range(10))}, tenant())
    assert response.status_code == 202, response.text


def test_a_registered_dataset_counts_at_its_recorded_size(client, tenant, monkeypatch) -> None:
    from core.settings import get_settings

    headers = tenant()
    buffer = io.BytesIO()
    np.savez(buffer, x=np.zeros((2000, 64), np.float32), y=np.arange(2000) % 2, attribute=np.zeros(2000, np.int64))
    dataset_id = post_npz(client, buffer.getvalue(), name="mine", headers=headers).json()["id"]
    spec = {"preset": "paper_moons_erm", "dataset": {"name": dataset_id}, "model": {"arch": "mlp", "hidden": [4096]}}
    assert train(client, spec, headers).status_code == 202
    monkeypatch.setattr(get_settings(), "worker_memory_budget_bytes", 300 << 20)
    response = train(client, spec, headers)
    assert response.status_code == 422 and response.json()["error"]["details"]["field"] == "spec.model.hidden"


def test_a_sweep_whose_widest_stack_is_over_the_budget_is_a_422_naming_the_grid(client, tenant) -> None:
    # SD's lambda and gamma ride in one stack: 64 networks of 4096 x 4096 trained at once, about 27 GiB.
    spec = {"preset": "paper_moons_sd", "model": {"arch": "mlp", "hidden": [4096, 4096]}, "seeds": [0],
            "grid": {"method.sd_lambda": [0.01 * (i + 1) for i in range(16)], "method.sd_gamma": [0.1, 0.2, 0.3, 0.4]}}
    headers = tenant()
    response = client.post("/v1/jobs", json={"kind": "sweep", "spec": spec}, headers=headers)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "over_budget" and error["details"]["field"] == "spec.grid", error
    assert error["details"]["parts"]["saving"] > 0 and "64 settings at once" in error["message"]
    small = {**spec, "grid": {"method.sd_lambda": [0.01, 0.02]}}
    assert client.post("/v1/jobs", json={"kind": "sweep", "spec": small}, headers=headers).status_code == 202
