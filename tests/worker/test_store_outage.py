"""A worker facing a store that is down, slow, or holding something other than what was checked: it waits out an
outage, gives up on a store that never answers instead of hanging, and never reads a replaced or oversized input."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from core.settings import Settings
from core.storage import ObjectChanged, S3Store, StoredFileTooLarge, StoreUnavailable, local_copy, store
from scripts.stack import free_port
from tests.s3server import CREDENTIALS, s3_server


@pytest.fixture(autouse=True)
def credentials(monkeypatch):
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)


def test_a_write_waits_for_a_store_that_comes_back(tmp_path, monkeypatch):
    import subprocess
    import sys

    from worker.files import patiently_stored

    port = free_port()
    settings = Settings(var_dir=tmp_path, storage_url="s3://gs-w/p", s3_endpoint_url=f"http://127.0.0.1:{port}")
    (tmp_path / "report.json").write_text('{"ok": true}')
    started: list[subprocess.Popen] = []

    def come_back() -> None:  # the store is down for 3 s, then answers on the same address
        time.sleep(3)
        started.append(subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip

    coming = threading.Thread(target=come_back)
    coming.start()
    kept = store(settings)
    assert isinstance(kept, S3Store)
    began = time.monotonic()
    try:

        def make_bucket() -> None:
            with kept.answering("gs-w"):
                kept.client.create_bucket(Bucket="gs-w")

        patiently_stored(make_bucket, "bucket")
        patiently_stored(lambda: kept.put("jobs/j/report.json", tmp_path / "report.json"), "report")
        assert kept.fetch("jobs/j/report.json").read_text() == '{"ok": true}'
        assert time.monotonic() - began >= 3
    finally:
        coming.join()  # never leave a server behind, even when the test failed before it started
        for process in started:
            process.terminate()
            process.wait(10)


def test_a_store_that_accepts_and_never_answers_is_unavailable_not_a_hang(tmp_path, monkeypatch):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    monkeypatch.setattr(S3Store, "TIMEOUT_S", 1.0)
    settings = Settings(
        var_dir=tmp_path, storage_url="s3://b/p", s3_endpoint_url=f"http://127.0.0.1:{silent.getsockname()[1]}"
    )
    began = time.monotonic()
    with pytest.raises(StoreUnavailable):
        store(settings).stat("jobs/j/report.json")
    assert time.monotonic() - began < 15
    silent.close()


def test_an_input_replaced_by_a_huge_or_changed_object_is_never_read(tmp_path):
    with s3_server() as server:
        server.make_bucket("gs-h")
        settings = Settings(var_dir=tmp_path, storage_url="s3://gs-h/p", s3_endpoint_url=server.endpoint,
                            max_upload_bytes=1000, max_dataset_bytes=1000)  # fmt: skip
        kept = store(settings)
        assert isinstance(kept, S3Store)
        (tmp_path / "small").write_bytes(b"x" * 100)
        kept.put("checkpoints/c.pt", tmp_path / "small")
        assert local_copy(settings, "checkpoints/c.pt").read_bytes() == b"x" * 100
        old = kept.stat("checkpoints/c.pt")
        (tmp_path / "huge").write_bytes(b"y" * 5000)
        kept.put("checkpoints/c.pt", tmp_path / "huge")  # replaced behind the service's back
        with pytest.raises(StoredFileTooLarge):
            local_copy(settings, "checkpoints/c.pt")
        (tmp_path / "out").write_bytes(b"")
        with pytest.raises(ObjectChanged):  # bytes read under the ETag the check saw: a 412, never the new bytes
            kept.read_into(tmp_path / "out", "checkpoints/c.pt", old.etag, 0, 100)
        assert (tmp_path / "out").read_bytes() == b""
