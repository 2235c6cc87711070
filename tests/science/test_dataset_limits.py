"""User datasets are vetted before they are loaded: .npz sizes from the zip directory and .npy headers, images
from their headers. Bombs are `DatasetError`s with code too_large; nothing is materialised first."""
from __future__ import annotations

import io
import pathlib
import zipfile

import numpy as np
import pytest

from starvation.datasets import DatasetError, check_npz, load_image_folder, load_npz
from starvation.errors import SpecError


def npy_header(shape: tuple[int, ...], dtype: str = "<f8") -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def small_arrays(n: int = 4) -> dict[str, np.ndarray]:
    return {"x": np.zeros((n, 2), np.float32), "y": np.arange(n) % 2, "attribute": np.zeros(n, np.int64)}


def write_npz(path: pathlib.Path, members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> pathlib.Path:
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def members_of(arrays: dict[str, np.ndarray]) -> dict[str, bytes]:
    members = {}
    for key, array in arrays.items():
        buffer = io.BytesIO()
        np.save(buffer, array)
        members[f"{key}.npy"] = buffer.getvalue()
    return members


def zero_bomb(path: pathlib.Path, n_bytes: int) -> pathlib.Path:
    """An .npz whose x is `n_bytes` of uint8 zeros, deflated (about 1000:1), written without holding them."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        with archive.open("x.npy", "w", force_zip64=True) as member:
            member.write(npy_header((n_bytes // 1024, 1024), "|u1"))
            chunk = bytes(1 << 20)
            for _ in range(n_bytes // len(chunk)):
                member.write(chunk)
        for name, data in members_of({"y": np.zeros(2, np.int64), "attribute": np.zeros(2, np.int64)}).items():
            archive.writestr(name, data)
    return path


@pytest.fixture
def no_array_is_loaded(monkeypatch):
    """Fails the test if numpy is asked to load any array of the archive."""
    calls = []
    monkeypatch.setattr(np, "load", lambda *args, **kwargs: calls.append(args) or pytest.fail("np.load was called"))
    return calls


def test_a_header_declaring_a_huge_shape_is_refused_from_the_header(tmp_path, no_array_is_loaded) -> None:
    members = members_of(small_arrays())
    members["x.npy"] = npy_header((1_000_000, 1_000_000)) + bytes(64)  # 8 TB declared, 64 bytes held
    path = write_npz(tmp_path / "bomb.npz", members)
    assert path.stat().st_size < 2000
    with pytest.raises(DatasetError, match="array 'x'") as error:
        load_npz(path, "bomb")
    assert error.value.code == "too_large" and not no_array_is_loaded


def test_a_compressed_zero_bomb_is_refused_before_it_is_inflated(tmp_path, no_array_is_loaded) -> None:
    path = zero_bomb(tmp_path / "zeros.npz", 256 << 20)
    assert path.stat().st_size < 400_000  # the attack: ~200 KB that unpacks to 256 MiB (and 1 GiB as float32)
    with pytest.raises(DatasetError, match="array 'x'.*bomb") as error:
        load_npz(path, "zeros")
    assert error.value.code == "too_large"


def test_arrays_too_large_once_loaded_are_refused_even_when_honestly_packed(tmp_path) -> None:
    arrays = {**small_arrays(1000), "x": np.ones((1000, 300), np.uint8)}  # 300 kB, 1.2 MB as float32
    path = write_npz(tmp_path / "d.npz", members_of(arrays))
    with pytest.raises(DatasetError, match="array 'x'") as error:
        check_npz(path, max_bytes=1_000_000)
    assert error.value.code == "too_large"
    assert load_npz(path, "d", max_bytes=2_000_000).input_shape == (300,)


def test_small_arrays_may_compress_as_well_as_they_like(tmp_path) -> None:
    n = 100_000  # an all-zero attribute (800 kB) deflates ~1000:1, far under the floor where the ratio counts
    arrays = {"x": np.random.default_rng(0).random((n, 2), dtype=np.float32), "y": np.arange(n) % 2,
              "attribute": np.zeros(n, np.int64)}
    path = write_npz(tmp_path / "d.npz", members_of(arrays), zipfile.ZIP_DEFLATED)
    assert len(load_npz(path, "d").splits["all"]) == n


@pytest.mark.parametrize("change, message", [
    ({"x.npy": npy_header((4, 2), "|O") + bytes(32)}, "dtype object"),
    ({"x.npy": npy_header((4, 2), "<c16") + bytes(128)}, "numeric"),
    ({"split.npy": npy_header((4,), "<f8") + bytes(32)}, "strings"),
    ({"x.npy": npy_header((4, 3)) + bytes(64)}, "declares shape \\[4, 3\\]"),
    ({"x.npy": b"not an npy header at all"}, "no readable .npy header"),
    ({"x": members_of(small_arrays())["x.npy"]}, "unexpected member"),
    ({"../x.npy": b""}, "unexpected member"),
])
def test_bad_members_are_refused_before_loading(tmp_path, no_array_is_loaded, change, message) -> None:
    members = {**members_of(small_arrays()), **change}
    if "x" in change:
        members.pop("x.npy")
    with pytest.raises(DatasetError, match=message) as error:
        load_npz(write_npz(tmp_path / "d.npz", members), "d")
    assert error.value.code == "invalid_dataset" and isinstance(error.value, SpecError)


def test_a_well_formed_npz_loads_after_the_check(tmp_path) -> None:
    path = write_npz(tmp_path / "d.npz", members_of({**small_arrays(), "split": np.array(["train"] * 3 + ["test"])}))
    assert {k: v[1] for k, v in check_npz(path).items()} == {"x": (4, 2), "y": (4,), "attribute": (4,),
                                                              "split": (4,)}
    assert load_npz(path, "d").train_splits == ["train"]


def image_folder(root: pathlib.Path, images: dict[str, object]) -> pathlib.Path:
    root.mkdir(parents=True)
    for name, image in images.items():
        if isinstance(image, bytes):
            (root / name).write_bytes(image)
        else:
            image.save(root / name, optimize=True)
    lines = ["path,label,attribute"] + [f"{name},{i % 2},0" for i, name in enumerate(images)]
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root / "metadata.csv"


def test_an_image_over_the_pixel_limit_is_refused_from_its_header(tmp_path, monkeypatch) -> None:
    from PIL import Image

    big = Image.new("1", (12_000, 12_000))  # 144 megapixels, 18 MB here, a few hundred kB as a PNG
    csv_path = image_folder(tmp_path / "imgs", {"ok.png": Image.new("RGB", (8, 8)), "bomb.png": big})
    assert (tmp_path / "imgs" / "bomb.png").stat().st_size < 1_000_000
    decoded, convert = [], Image.Image.convert
    monkeypatch.setattr(Image.Image, "convert",
                        lambda self, *a, **k: decoded.append(self.size) or convert(self, *a, **k))
    with pytest.raises(DatasetError, match="line 3: the image .*144000000 pixels") as error:
        load_image_folder(tmp_path / "imgs", csv_path, "imgs", 8, max_image_pixels=50_000_000)
    assert error.value.code == "too_large" and decoded == []  # every header is read before any pixels: none decoded


@pytest.mark.parametrize("warnings_are_errors", [False, True])
def test_pillows_own_bomb_check_is_set_to_our_limit_and_becomes_a_dataset_error(tmp_path, monkeypatch,
                                                                                warnings_are_errors) -> None:
    import warnings

    from PIL import Image

    csv_path = image_folder(tmp_path / "imgs", {"a.png": Image.new("RGB", (60, 60))})  # 3,600 pixels: a warning
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    open_image, seen = Image.open, []

    def checked_open(*args, **kwargs):  # what Pillow's own check sees: our limit, then its warning or error
        seen.append(Image.MAX_IMAGE_PIXELS)
        return open_image(*args, **kwargs)

    monkeypatch.setattr(Image, "open", checked_open)
    with warnings.catch_warnings():
        warnings.simplefilter("error" if warnings_are_errors else "ignore")
        with pytest.raises(DatasetError, match="line 2: the image") as error:
            load_image_folder(tmp_path / "imgs", csv_path, "imgs", 8, max_image_pixels=2_000)
    assert error.value.code == "too_large" and seen == [2_000]


def test_a_truncated_image_is_a_dataset_error_not_a_crash(tmp_path) -> None:
    from PIL import Image

    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 50).save(buffer, format="PNG")
    csv_path = image_folder(tmp_path / "imgs", {"cut.png": buffer.getvalue()[:200]})
    with pytest.raises(DatasetError, match="line 2: cannot read the image") as error:
        load_image_folder(tmp_path / "imgs", csv_path, "imgs", 8)
    assert error.value.code == "invalid_dataset"


def test_a_zip_directory_of_millions_of_entries_is_refused_before_zipfile_reads_it(tmp_path, monkeypatch) -> None:
    path = tmp_path / "entries.npz"
    with zipfile.ZipFile(path, "w") as archive:
        for index in range(2000):  # stands for millions: each entry is ~400 bytes of Python objects once listed
            archive.writestr(f"{index}", b"")
    read = []
    monkeypatch.setattr(zipfile.ZipFile, "_RealGetContents", lambda self: read.append(self) or pytest.fail())
    with pytest.raises(DatasetError, match="2000 members") as error:
        check_npz(path)
    assert error.value.code == "too_large" and not read
