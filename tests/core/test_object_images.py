"""Image folders in the object store against moto's S3 server (the production client over HTTP): a folder is checked
and read as the same folder on disk, in DataLoader workers and through the cache; a CSV row naming a key outside its
prefix, an image changed after the check, a huge object where an image is expected, and a store that errors or stays
down are each refused, detected or waited for, never read as something else."""

from __future__ import annotations

import dataclasses
import http.server
import io
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from core.object_images import HEAD_BYTES, ImageChanged, StoreImages, connection, folder_of, granted_folder
from core.settings import Settings
from core.storage import S3Store, StoreUnavailable
from scripts.stack import free_port
from starvation import datasets
from starvation.datasets import DatasetError
from tests.s3server import CREDENTIALS, client_credentials, s3_server

BUCKET, FOLDER = "gs-images", "data/team/faces/"
N = 12


@pytest.fixture(autouse=True)
def credentials(monkeypatch):
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)


@pytest.fixture(scope="module")
def server():
    with s3_server() as running:
        running.make_bucket(BUCKET)
        yield running


@pytest.fixture
def s3(server):
    import boto3

    return boto3.client("s3", endpoint_url=server.endpoint, **client_credentials())


def png(i: int, size: int = 8) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), (20 * i % 255, 100, 200 - i), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def folder_on_both(s3, disk: Path, extra_rows: tuple[str, ...] = ()) -> tuple[Path, str]:
    """The same image folder on disk and in the store under FOLDER; returns (the CSV on disk, its text)."""
    (disk / "imgs").mkdir(parents=True)
    lines = ["path,label,attribute,split"]
    for i in range(N):
        (disk / "imgs" / f"{i}.png").write_bytes(png(i))
        s3.put_object(Bucket=BUCKET, Key=f"{FOLDER}imgs/{i}.png", Body=png(i))
        lines.append(f"imgs/{i}.png,{i % 2},{(i // 2) % 2},{'train' if i < 8 else 'test'}")
    text = "\n".join([*lines, *extra_rows]) + "\n"
    (disk / "metadata.csv").write_text(text)
    return disk / "metadata.csv", text


def source(server, tmp_path: Path, **changes) -> StoreImages:
    settings = {"bucket": BUCKET, "prefix": FOLDER, "endpoint_url": server.endpoint, "cache_dir": tmp_path / "cache",
                "cache_bytes": 1 << 30, "max_image_bytes": 1 << 20, "patience_s": 2.0, "threads": 4}  # fmt: skip
    return StoreImages(**{**settings, **changes})


def every_batch(data, workers: int) -> torch.Tensor:
    files = dataclasses.replace(data.splits["train"].files, workers=workers)
    return torch.cat(list(datasets.batches_of(files, 3)))


def test_a_folder_in_the_store_reads_as_the_same_folder_on_disk_and_again_from_the_cache(server, s3, tmp_path):
    csv_path, _ = folder_on_both(s3, tmp_path / "disk")
    images = source(server, tmp_path)
    checking = dataclasses.replace(images, cached=False)  # as the API's check reads: keeping nothing
    index = datasets.index_image_folder(checking, csv_path, max_image_bytes=images.max_image_bytes)
    local = datasets.index_image_folder(tmp_path / "disk", csv_path)
    assert local.versions is None and local.sizes is None  # a folder on disk: as before
    etags = [s3.head_object(Bucket=BUCKET, Key=f"{FOLDER}{p}")["ETag"].strip('"') for p in index.paths]
    assert index.versions is not None and index.versions.tolist() == etags
    assert index.sizes is not None and index.sizes.tolist() == [len(png(i)) for i in range(N)]
    datasets.save_index(index, tmp_path / "index.npz")
    kept = datasets.load_index(tmp_path / "index.npz")  # what a worker reads: the versions travel with the paths
    assert kept.versions is not None and kept.versions.tolist() == etags

    in_store = datasets.open_image_folder(images, kept, "faces", 8)
    on_disk = datasets.open_image_folder(tmp_path / "disk", local, "faces", 8)
    expected = every_batch(on_disk, 0)
    assert torch.equal(every_batch(in_store, 2), expected)  # two forked DataLoader workers, each its own client
    assert len(list((tmp_path / "cache").glob("*.png"))) == 8  # the train split's images, once each

    for i in range(N):  # gone from the store: the next epoch reads the checked versions from the cache
        s3.delete_object(Bucket=BUCKET, Key=f"{FOLDER}imgs/{i}.png")
    assert torch.equal(every_batch(in_store, 0), expected)


@pytest.mark.parametrize("row", [
    "../other/0.png", "/data/team/other/0.png", "imgs//0.png", "imgs/./0.png", "imgs\\0.png", "%2e%2e/other/0.png",
    "imgs/0.png\x01",
])  # fmt: skip
def test_a_csv_row_naming_a_key_outside_its_prefix_fails_naming_the_line_and_never_the_value(
    server, s3, tmp_path, row
):
    csv_path, _ = folder_on_both(s3, tmp_path / "disk", extra_rows=(f'"{row}",1,0,train',))
    s3.put_object(Bucket=BUCKET, Key="data/team/other/0.png", Body=png(0))  # a real image, outside the folder
    with pytest.raises(DatasetError) as refused:
        datasets.index_image_folder(source(server, tmp_path), csv_path)
    message = str(refused.value)
    assert message.startswith(f"metadata CSV line {N + 2}: the path "), message
    assert "other" not in message and "0.png" not in message and "%" not in message


def test_an_image_changed_after_the_check_fails_the_job_as_input_changed_not_as_other_bytes(server, s3, tmp_path):
    from worker.runner import job_error

    csv_path, _ = folder_on_both(s3, tmp_path / "disk")
    images = source(server, tmp_path)
    index = datasets.index_image_folder(dataclasses.replace(images, cached=False), csv_path)
    data = datasets.open_image_folder(images, index, "faces", 8)
    s3.put_object(Bucket=BUCKET, Key=f"{FOLDER}imgs/3.png", Body=png(99))  # replaced, as valid an image as before
    with pytest.raises(ImageChanged) as changed:
        every_batch(data, 2)  # raised in a DataLoader worker, carried back whole
    assert "imgs/3.png" in str(changed.value) and "Traceback" not in str(changed.value)
    assert job_error(changed.value, None)["code"] == "input_changed"  # type: ignore[arg-type]
    assert all(p.read_bytes() != png(99) for p in (tmp_path / "cache").iterdir())  # nothing kept of the new one


def test_a_huge_object_where_an_image_is_expected_is_refused_from_its_size_before_its_body_is_read(
    server, s3, tmp_path
):
    csv_path, _ = folder_on_both(s3, tmp_path / "disk", extra_rows=("imgs/huge.png,1,0,train",))
    huge = png(1, size=8) + bytes(3 * HEAD_BYTES)  # a valid header, then megabytes
    s3.put_object(Bucket=BUCKET, Key=f"{FOLDER}imgs/huge.png", Body=huge)
    images = source(server, tmp_path, max_image_bytes=HEAD_BYTES // 2)
    answered: list[int] = []
    connection(images).client.meta.events.register(
        "after-call.s3.GetObject", lambda http_response, **_: answered.append(int(http_response.headers["Content-Length"]))
    )
    with pytest.raises(DatasetError) as refused:
        datasets.index_image_folder(images, csv_path, max_image_bytes=images.max_image_bytes)
    assert refused.value.code == "too_large" and f"line {N + 2}: the image is {len(huge)} bytes" in str(refused.value)
    assert max(answered) <= HEAD_BYTES  # a ranged read of its head at most, never the object
    with pytest.raises(OSError):  # a job's read of an object grown past the limit: refused from its length
        images.open("imgs/huge.png", "image 'imgs/huge.png'", None)


def test_a_store_that_errors_is_asked_again_and_one_that_stays_down_is_unavailable(tmp_path, monkeypatch):
    monkeypatch.setattr(S3Store, "TIMEOUT_S", 0.5)

    class Failing(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    failing = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    threading.Thread(target=failing.serve_forever, daemon=True).start()
    try:
        for endpoint in (f"http://127.0.0.1:{failing.server_address[1]}", f"http://127.0.0.1:{free_port()}"):
            images = StoreImages(BUCKET, FOLDER, endpoint, tmp_path / "cache", 1 << 20, 1 << 20, patience_s=1.0)
            began = time.monotonic()
            with pytest.raises(StoreUnavailable):
                images.open("imgs/0.png", "image 'imgs/0.png'", "etag")
            assert 1.0 <= time.monotonic() - began < 15
    finally:
        failing.shutdown()

    # Down for a while, then back: the read waits it out.
    port = free_port()
    images = StoreImages(BUCKET, FOLDER, f"http://127.0.0.1:{port}", tmp_path / "cache", 1 << 20, 1 << 20,
                         patience_s=60.0)  # fmt: skip
    started: list[subprocess.Popen] = []

    def come_back() -> None:
        import boto3

        time.sleep(2)
        started.append(subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
        s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", **client_credentials())
        while True:
            try:
                s3.create_bucket(Bucket=BUCKET)
                break
            except Exception:
                time.sleep(0.2)
        s3.put_object(Bucket=BUCKET, Key=f"{FOLDER}imgs/0.png", Body=png(0))

    coming = threading.Thread(target=come_back)
    coming.start()
    try:
        read = images.open("imgs/0.png", "image 'imgs/0.png'", None)  # missing until it is put: asked again
    except FileNotFoundError:
        coming.join()
        read = images.open("imgs/0.png", "image 'imgs/0.png'", None)
    finally:
        coming.join()
        for process in started:
            process.terminate()
            process.wait(10)
    assert read.read() == png(0)


@pytest.mark.parametrize("url, admin, granted", [
    ("s3://gs-images/data/KEY/faces/", False, True),
    ("s3://gs-images/data/KEY/faces", False, True),
    ("s3://gs-images/data/KEY/", False, True),
    ("s3://gs-images/data/OTHER/faces/", False, False),
    ("s3://gs-images/data/", False, False),
    ("s3://gs-images/data/", True, True),
    ("s3://gs-images/data-evil/KEY/", False, False),
    ("s3://gs-images/data-evil/", True, False),
    ("s3://other-bucket/data/KEY/", False, False),
    ("s3://gs-images/data/KEY/../OTHER/", False, False),
    ("s3://gs-images/data/KEY//faces/", False, False),
    ("s3://gs-images/data/KEY/%2e%2e/OTHER/", False, False),
    ("s3://gs-images/data/KEY/faces\\..\\..\\OTHER/", False, False),
    ("s3://gs-images/data/KEY/fa\x00ces/", False, False),
    ("s3://gs-images/data/KEY/./faces/", False, False),
    ("S3://gs-images/data/KEY/", False, False),
    ("s3://gs-images@evil/data/KEY/", False, False),
    ("s3://gs-images/data/KEY/faces/?x=1", False, False),
])  # fmt: skip
def test_a_folder_is_granted_under_a_listed_prefix_and_the_key_id_only(url, admin, granted):
    settings = Settings(data_urls="s3://gs-images/data/, s3://gs-more/")
    assert (granted_folder(settings, url, owner_id="KEY", is_admin=admin) is not None) is granted
    if granted:
        assert folder_of(url) is not None and folder_of(url).url.endswith("/")  # type: ignore[union-attr]


def test_a_listed_prefix_that_is_not_plain_is_refused_at_start():
    for listed in ("s3://b/data", "s3://b/../x/", "http://b/x/", "s3://b//x/", "s3://B/x/"):
        with pytest.raises(ValueError):
            Settings(data_urls=listed)
