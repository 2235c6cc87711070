"""A 100 MB checkpoint uploaded and downloaded through the API: files in the local folder against an S3 store.

    .venv/bin/python bench/storage.py               # 2 rounds (~2 min on 2 CPUs)
    .venv/bin/python bench/storage.py --mb 20 --rounds 1

Starts two API-only processes (scripts/serve.py --no-worker) on the embedded default, one keeping files in its
folder and one in moto's standalone S3 server on this machine (the production client, boto3, over HTTP), and
times, for each, POST /v1/checkpoints of one TorchScript model of `--mb` MB (a Linear layer; the upload check loads
it in the jail and runs it once, the same work in both) and GET of its file, best of `--rounds`. moto keeps objects
in its own memory: what the ratio measures is the path through the store (multipart upload, streamed download),
not a real store's disks or network.
"""

from __future__ import annotations

import argparse
import io
import pathlib
import sys
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import machine  # noqa: E402
from scripts.stack import Stack  # noqa: E402
from tests.s3server import CREDENTIALS, s3_server  # noqa: E402


def model_bytes(mb: int, seed: int) -> tuple[bytes, int]:
    """A TorchScript model of about `mb` MB (input 4096: the largest input size an upload may name)."""
    width = mb * 2**20 // 4 // 4096
    torch.manual_seed(seed)
    buffer = io.BytesIO()
    torch.jit.save(
        torch.jit.script(torch.nn.Sequential(torch.nn.Linear(4096, width), torch.nn.Linear(width, 2))), buffer
    )
    return buffer.getvalue(), 4096


def measure(stack: Stack, content: bytes, side: int) -> tuple[float, float]:
    began = time.perf_counter()
    response = stack.client.post(
        "/v1/checkpoints",
        files={"file": ("m.pt", content)},
        data={"format": "torchscript", "input_shape": f"[{side}]"},
        timeout=600,
    )
    upload_s = time.perf_counter() - began
    assert response.status_code == 201, response.text
    began = time.perf_counter()
    downloaded = stack.client.get(f"/v1/checkpoints/{response.json()['id']}/file", timeout=600).content
    download_s = time.perf_counter() - began
    assert downloaded == content
    assert stack.client.delete(f"/v1/checkpoints/{response.json()['id']}").status_code == 204
    return upload_s, download_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory() as scratch, s3_server() as server:
        server.make_bucket("bench")
        base = {"GS_MAX_UPLOAD_BYTES": str(4 << 30)}
        stacks = {
            "local folder": Stack("local", base, pathlib.Path(scratch) / "local", ("--no-worker",)),
            "S3 store (moto)": Stack(
                "s3",
                {**base, **CREDENTIALS, "GS_STORAGE_URL": "s3://bench/p", "GS_S3_ENDPOINT_URL": server.endpoint},
                pathlib.Path(scratch) / "s3",
                ("--no-worker",),
            ),
        }
        for stack in stacks.values():
            stack.env["GS_DATABASE_URL"] = f"sqlite:///{stack.var_dir / 'gs.sqlite3'}"
            stack.start()
        try:
            best: dict[str, tuple[float, float]] = {}
            for round_ in range(args.rounds):
                content, side = model_bytes(args.mb, round_)  # new bytes each round: never the twin of the last
                for name, stack in stacks.items():
                    upload_s, download_s = measure(stack, content, side)
                    old = best.get(name, (float("inf"), float("inf")))
                    best[name] = (min(old[0], upload_s), min(old[1], download_s))
            size_mb = len(content) / 2**20
            print(f"{size_mb:.0f} MB checkpoint, best of {args.rounds}:")
            for name, (up, down) in best.items():
                print(f"  {name:16s} upload {up:6.2f} s   download {down:6.2f} s ({size_mb / down:6.0f} MB/s)")
            (lu, ld), (su, sd) = best["local folder"], best["S3 store (moto)"]
            print(f"  store / local:   upload x{su / lu:.2f}, download x{sd / ld:.2f}")
        finally:
            for stack in stacks.values():
                stack.stop()


if __name__ == "__main__":
    main()
