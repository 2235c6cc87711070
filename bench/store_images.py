"""A 40,000-image 64x64 folder read by training from an S3 store against the same folder on local disk.

    .venv/bin/python bench/store_images.py                     # 40,000 images, 2 epochs each (~22 min on 2 CPUs)
    .venv/bin/python bench/store_images.py --images 4000       # a quick run

The folder is `starvation.datasets.backgrounds`' (digits on photo backgrounds, 64x64 PNG; its counterfactual column
left out), made once under --work, 80% train and 20% test, and put in moto's standalone S3 server on this machine
(boto3 over HTTP, as in production). Each folder is checked as the API checks it (every image's header, a sample
decoded: for the store, a ranged GET of each image, which records its size and ETag), then, in a process of its own
as a worker child runs a job, trained on for --epochs epochs of its train split: the service's `ImageFiles` read by
GS_DATA_WORKERS=2 DataLoader processes (from the store: 16 reads at once each, with If-Match on the recorded ETag,
through the process's cache of objects), a small CNN's SGD step per batch of --batch-size. Printed per epoch:
images/s; per run: the peak memory of the worker process and its DataLoader processes together (the sum of their
proportional set sizes, sampled every 0.2 s: pages they share are counted once) and the worker's own peak RSS. The
number the issue asks for is the store's rate after the first epoch (from its cache) over the local folder's.
moto keeps objects in its own memory on the same two cores as everything else: the first epoch measures the path
through the store, not a real store's network.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import machine  # noqa: E402
from tests.s3server import CREDENTIALS, client_credentials, s3_server  # noqa: E402

SIZE = 64
BUCKET, PREFIX = "gs-bench", "data/folder/"


def folder(work: pathlib.Path, images: int) -> pathlib.Path:
    """The benchmark folder, made once; its CSV without the counterfactual column (nor those images)."""
    from starvation.datasets.backgrounds import make_background_folder

    path = work / f"folder-{images}"
    if not (path / "metadata.csv").exists():
        shutil.rmtree(path, ignore_errors=True)
        n_test = images // 5
        make_background_folder(path, n_train=images - n_test, n_val=0, n_test=n_test, image_size=SIZE, seed=0)
    if not (path / "plain.csv").exists():
        with (path / "metadata.csv").open() as source, (path / "plain.csv").open("w", newline="") as plain:
            rows = csv.DictReader(source)
            out = csv.DictWriter(plain, ["path", "label", "attribute", "split"], extrasaction="ignore")
            out.writeheader()
            out.writerows(rows)
    return path


def rows_of(path: pathlib.Path) -> list[str]:
    with (path / "plain.csv").open() as handle:
        return [row["path"] for row in csv.DictReader(handle)]


def upload(s3, path: pathlib.Path) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda relative: s3.upload_file(str(path / relative), BUCKET, PREFIX + relative), rows_of(path)))
    s3.upload_file(str(path / "plain.csv"), BUCKET, PREFIX + "plain.csv")
    return time.perf_counter() - started


def store_images(endpoint: str, var: pathlib.Path, *, cached: bool):
    from core.object_images import images_in_store
    from core.settings import Settings

    settings = Settings(var_dir=var, s3_endpoint_url=endpoint)
    return images_in_store(settings, f"s3://{BUCKET}/{PREFIX}", cached=cached)


def check(source, csv_path: pathlib.Path, index_path: pathlib.Path) -> float:
    """The API's check of the folder, its index saved for the worker."""
    from starvation import datasets

    started = time.perf_counter()
    index = datasets.index_image_folder(source, csv_path, max_image_bytes=64 << 20)
    datasets.save_index(index, index_path)
    return time.perf_counter() - started


def tree_pss_mib(pid: int) -> float:
    """The proportional set size of `pid` and its descendants (a shared page counted once over them)."""
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            with open(f"/proc/{current}/smaps_rollup") as rollup:
                total += next(int(line.split()[1]) for line in rollup if line.startswith("Pss:"))
            with open(f"/proc/{current}/task/{current}/children") as children:
                pending += [int(child) for child in children.read().split()]
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue
    return total / 1024


def cpu_s() -> float:
    """CPU seconds of this process and of its children that have ended (the DataLoader's, after each epoch)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def train(where: str, index_path: str, var: str, endpoint: str, epochs: int, batch_size: int) -> dict:
    """The worker child's part: epochs over the train split, read through the service's ImageFiles."""
    import numpy as np
    import torch

    from starvation import datasets
    from starvation.networks import build_network

    peak = [0.0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            peak[0] = max(peak[0], tree_pss_mib(os.getpid()))

    threading.Thread(target=sample, daemon=True).start()
    source = where if where != "store" else store_images(endpoint, pathlib.Path(var), cached=True)
    data = datasets.open_image_folder(source, datasets.load_index(index_path), "bench", SIZE, workers=2)
    split = data.splits["train"]
    files, labels = split.files, split.y
    model = build_network("cnn", {"channels": [8, 16]}, (3, SIZE, SIZE), data.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    rng = np.random.default_rng(0)
    rates, per_cpu_s = [], []
    for _ in range(epochs):
        order = rng.permutation(len(files))
        batches = [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
        started, cpu = time.perf_counter(), cpu_s()
        for images, rows in files.loader(batches):
            loss = torch.nn.functional.cross_entropy(model(images), labels[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        rates.append(round(len(files) / (time.perf_counter() - started), 1))
        per_cpu_s.append(round(len(files) / (cpu_s() - cpu), 1))  # the loaders have ended: counted as children
    stop.set()
    peak[0] = max(peak[0], tree_pss_mib(os.getpid()))
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"train_images": len(files), "images_per_s": rates, "images_per_cpu_s": per_cpu_s,
            "peak_pss_mib_with_loaders": round(peak[0]),
            "worker_peak_rss_mib": round(own)}  # fmt: skip


def in_process_of_its_own(*args: str) -> dict:
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **CREDENTIALS})  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=pathlib.Path, default=pathlib.Path("/tmp/gs-bench-store-images"))
    parser.add_argument("--images", type=int, default=40_000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("_train", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._train:
        where, index_path, var, endpoint = args._train
        print(json.dumps(train(where, index_path, var, endpoint, args.epochs, args.batch_size)))
        return 0

    import boto3
    import torch
    from botocore.config import Config

    os.environ.update(CREDENTIALS)
    print(json.dumps({"machine": machine(torch.device("cpu")), "load": os.getloadavg()}), flush=True)
    started = time.perf_counter()
    path = folder(args.work, args.images)
    print(json.dumps({"folder": path.name, "made_s": round(time.perf_counter() - started, 1)}), flush=True)
    with s3_server() as server:
        server.make_bucket(BUCKET)
        s3 = boto3.client("s3", endpoint_url=server.endpoint, config=Config(max_pool_connections=16),
                          **client_credentials())  # fmt: skip
        print(json.dumps({"uploaded_s": round(upload(s3, path), 1)}), flush=True)
        results = {}
        for where in ("local", "store"):
            var = args.work / f"var-{where}"
            shutil.rmtree(var, ignore_errors=True)  # a worker host that has read nothing yet
            var.mkdir(parents=True)
            index = var / "index.npz"
            if where == "local":
                checked = check(path, path / "plain.csv", index)
            else:
                local_csv = var / "plain.csv"
                s3.download_file(BUCKET, PREFIX + "plain.csv", str(local_csv))
                checked = check(store_images(server.endpoint, var, cached=False), local_csv, index)
            target = str(path) if where == "local" else "store"
            run = in_process_of_its_own(target, str(index), str(var), server.endpoint, "--epochs", str(args.epochs),
                                        "--batch-size", str(args.batch_size))  # fmt: skip
            cache = sum(p.stat().st_size for p in (var / "cache").glob("*")) if (var / "cache").exists() else 0
            results[where] = {"check_s": round(checked, 1), **run, "cache_mib": round(cache / 2**20, 1)}
            print(json.dumps({where: results[where]}), flush=True)
    after_first = [results[w]["images_per_s"][-1] for w in ("store", "local")]
    print(json.dumps({"store_over_local_after_first_epoch": round(after_first[0] / after_first[1], 2),
                      "store_over_local_first_epoch": round(results["store"]["images_per_s"][0]
                                                            / results["local"]["images_per_s"][0], 2)}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
