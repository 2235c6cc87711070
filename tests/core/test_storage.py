"""The object-store backend against moto's S3 server (the production client over HTTP): round trips byte for byte,
multipart uploads, ranged reads, a cache that never serves a changed object, a bounded cache, and a store that is
down or slow answering StoreUnavailable instead of hanging or a 500."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from core.settings import Settings
from core.storage import FileStore, S3Store, StoredFileMissing, StoreUnavailable, key_of, store
from tests.s3server import CREDENTIALS, s3_server


@pytest.fixture(scope="module")
def server():
    with s3_server() as running:
        running.make_bucket("gs-test")
        yield running


@pytest.fixture
def s3(server, tmp_path, monkeypatch) -> S3Store:
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    settings = Settings(var_dir=tmp_path, storage_url="s3://gs-test/unit", s3_endpoint_url=server.endpoint)
    kept = store(settings)
    assert isinstance(kept, S3Store)
    return kept


def test_a_large_file_goes_up_in_parts_and_comes_back_byte_for_byte(s3, tmp_path):
    data = os.urandom(S3Store.MULTIPART_BYTES + 3_000_001)  # past the multipart threshold: two parts
    (tmp_path / "big.pt").write_bytes(data)
    s3.put("checkpoints/big.pt", tmp_path / "big.pt")
    assert "-" in s3.stat("checkpoints/big.pt").etag  # a multipart upload's ETag names its parts
    assert s3.fetch("checkpoints/big.pt").read_bytes() == data
    assert b"".join(s3.chunks("checkpoints/big.pt", 5, 1_000_005)) == data[5:1_000_005]  # a ranged read
    assert b"".join(s3.chunks("checkpoints/big.pt")) == data


def test_a_changed_object_is_never_served_from_the_cache(s3, tmp_path):
    source = tmp_path / "x.npz"
    source.write_bytes(b"first")
    s3.put("datasets/x.npz", source)
    assert s3.fetch("datasets/x.npz").read_bytes() == b"first"
    source.write_bytes(b"second, longer")
    s3.put("datasets/x.npz", source)
    assert s3.fetch("datasets/x.npz").read_bytes() == b"second, longer"


def test_the_cache_stays_under_its_bound_least_recently_used_out_first(server, tmp_path, monkeypatch):
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    settings = Settings(var_dir=tmp_path, storage_url="s3://gs-test/lru", s3_endpoint_url=server.endpoint)
    kept = store(settings.model_copy(update={"cache_bytes": 2500}))
    for name in "abc":
        (tmp_path / name).write_bytes(name.encode() * 1000)
        kept.put(f"jobs/j/{name}", tmp_path / name)
    first = kept.fetch("jobs/j/a")
    kept.fetch("jobs/j/b")
    os.utime(first, (1, 1))  # `a` the least recently used
    kept.fetch("jobs/j/c")
    cached = sorted(p.read_bytes()[:1] for p in (tmp_path / "cache").iterdir())
    assert cached == [b"b", b"c"]
    assert sum(p.stat().st_size for p in (tmp_path / "cache").iterdir()) <= 2500


def test_a_missing_object_and_a_store_that_is_down_say_so(s3, tmp_path, monkeypatch):
    with pytest.raises(StoredFileMissing, match="jobs/nothing/here"):
        s3.fetch("jobs/nothing/here")
    from scripts.stack import free_port

    down = Settings(var_dir=tmp_path, storage_url="s3://gs-test/unit", s3_endpoint_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StoreUnavailable):
        store(down).stat("checkpoints/big.pt")


def test_keys_are_ours_and_old_rows_paths_read_as_keys(tmp_path):
    settings = Settings(var_dir=tmp_path)
    assert isinstance(store(settings), FileStore)
    assert key_of(settings, str(tmp_path / "storage" / "checkpoints" / "abc.pt")) == "checkpoints/abc.pt"
    assert key_of(settings, "jobs/abc/report.json") == "jobs/abc/report.json"
    for hostile in ("../etc/passwd", "jobs/../../x", "/etc/passwd", "jobs//x", "jobs/a b"):
        with pytest.raises((ValueError, FileNotFoundError)):
            key_of(settings, hostile)
    with pytest.raises(ValueError):
        store(settings).fetch("../../etc/passwd")
    assert not Path("/etc/passwd").is_relative_to(tmp_path)
