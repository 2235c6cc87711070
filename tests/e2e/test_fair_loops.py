"""The API's background loops share fairly, on PostgreSQL + Redis: one tenant's hundred image folders or forty
webhooks to a host that never answers do not hold up another tenant's, and a FIFO in a folder fails that folder alone.

Each drill times tenant B quiet, then with tenant A's load in place (medians of five: this machine's
cores are shared, and one timing alone is noise), and prints both."""
from __future__ import annotations

import http.server
import os
import shutil
import socket
import statistics
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import POSTGRES_URL, REDIS_URL, Stack, scratch_postgres
from tests.science.test_image_folders import coloured_folder

QUICK = {"GS_SWEEP_EVERY_S": "0.25", "GS_DISPATCH_EVERY_S": "0.25"}
TRIES = 5
B_ROWS, A_ROWS, A_FOLDERS = 2_000, 12_000, 100  # on this 2-core machine B's check takes ~1 s, A's ~4 s


def loops_stack(tmp_path: Path, name: str, env: dict[str, str]) -> Stack:
    """An API without a worker (the loops under test run in the API) on a scratch database of this checkout's own."""
    database = scratch_postgres(f"{POSTGRES_URL.rsplit('/', 1)[1]}_{name}")
    return Stack(name, {"GS_DATABASE_URL": database, "GS_BROKER_URL": REDIS_URL, "GS_DATA_DIR": str(tmp_path / "data"),
                        "GS_DISPATCH_WINDOW": "1", **QUICK, **env}, tmp_path, serve_args=("--no-worker",))


def new_key(stack: Stack, name: str) -> tuple[dict[str, str], Path]:
    """A key's headers and its data folder (GS_DATA_DIR/<key id>: the folders it may register)."""
    response = stack.client.post("/v1/api-keys", json={"name": name})
    assert response.status_code == 201, response.text
    folder = stack.var_dir / "data" / response.json()["id"]
    folder.mkdir(parents=True, exist_ok=True)
    return {"Authorization": f"Bearer {response.json()['key']}"}, folder


def folder_with_rows(data_dir: Path, name: str, rows: int) -> str:
    """A folder whose CSV lists `rows` rows, naming its 72 images over and over (each row's header is read)."""
    root = data_dir / name
    coloured_folder(root)
    header, *lines = (root / "metadata.csv").read_text().splitlines()
    (root / "metadata.csv").write_text("\n".join([header] + [lines[i % len(lines)] for i in range(rows)]) + "\n")
    return name


def register(stack: Stack, headers: dict[str, str], folder: str) -> str:
    response = stack.client.post("/v1/datasets", headers=headers, data={
        "name": folder, "format": "image_folder", "folder": folder, "image_size": "8"})
    assert response.status_code == 202, response.text
    return response.json()["id"]


def checked(stack: Stack, headers: dict[str, str], dataset_id: str, timeout_s: float = 30) -> dict:
    deadline = time.monotonic() + timeout_s
    while (dataset := stack.client.get(f"/v1/datasets/{dataset_id}", headers=headers).json())["status"] == "pending":
        assert time.monotonic() < deadline, f"dataset {dataset_id} still pending after {timeout_s} s\n{stack.log()}"
        time.sleep(0.05)
    return dataset


def seconds_to_ready(stack: Stack, headers: dict[str, str], folder: str) -> float:
    start = time.monotonic()
    dataset = checked(stack, headers, register(stack, headers, folder))
    assert dataset["status"] == "ready", dataset
    return time.monotonic() - start


@pytest.fixture(scope="module")
def checks_stack(tmp_path_factory):
    stack = loops_stack(tmp_path_factory.mktemp("checks"), "checks", {"GS_DATASET_CHECKS_PER_KEY": str(A_FOLDERS)})
    yield stack.start(probe="/healthz")
    stack.stop()


def test_a_fifo_in_a_folder_fails_that_folder_alone(checks_stack):
    stack = checks_stack
    key, data = new_key(stack, "fifo")
    folder_with_rows(data, "piped", 10)
    os.mkfifo(data / "piped" / "img" / "pipe.png")  # nobody ever writes to it
    with open(data / "piped" / "metadata.csv", "a") as csv_file:
        csv_file.write("img/pipe.png,0,0,train,swap/0.png\n")
    piped = register(stack, key, "piped")
    plain = register(stack, key, folder_with_rows(data, "plain", 10))
    failed = checked(stack, key, piped)
    assert failed["status"] == "failed"
    assert failed["error"] == "metadata CSV line 12: the image is not a regular file (a FIFO, device, " \
                              "socket or folder is never read)"
    assert checked(stack, key, plain)["status"] == "ready"


def test_a_hundred_folders_of_one_tenant_do_not_hold_up_anothers(checks_stack):
    stack = checks_stack
    (a, a_data), (b, b_data) = new_key(stack, "a"), new_key(stack, "b")
    small, big = folder_with_rows(b_data, "small", B_ROWS), folder_with_rows(a_data, "big", A_ROWS)
    seconds_to_ready(stack, b, small)  # the first check starts the check processes' server (torch imported once)
    quiet = [seconds_to_ready(stack, b, small) for _ in range(TRIES)]
    backlog = [register(stack, a, big) for _ in range(A_FOLDERS)]
    over = stack.client.post("/v1/datasets", headers=a, data={"name": "one more", "format": "image_folder",
                                                              "folder": big})
    assert over.status_code == 429 and over.json()["error"]["code"] == "too_many_dataset_checks"
    assert int(over.headers["Retry-After"]) > 0
    loaded = [seconds_to_ready(stack, b, small) for _ in range(TRIES)]
    a_done = sum(stack.client.get(f"/v1/datasets/{i}", headers=a).json()["status"] != "pending" for i in backlog)
    print(f"\nB's {B_ROWS}-row folder ready in {statistics.median(quiet):.2f} s quiet {fmt(quiet)}, "
          f"{statistics.median(loaded):.2f} s behind A's {A_FOLDERS} x {A_ROWS} rows {fmt(loaded)}; "
          f"A's checks done meanwhile: {a_done}")
    assert statistics.median(loaded) <= 2 * statistics.median(quiet)
    assert a_done < A_FOLDERS / 2  # B went ahead of A's backlog, not after it


def fmt(values: list[float]) -> str:
    return "(" + ", ".join(f"{v:.2f}" for v in values) + ")"


class Silent:
    """A loopback host that accepts connections and never answers; counts the connections it holds at once."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self.server.getsockname()[1]
        self.held, self.most_held, self.lock = 0, 0, threading.Lock()
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self.hold, args=(connection,), daemon=True).start()

    def hold(self, connection: socket.socket) -> None:
        with self.lock:
            self.held += 1
            self.most_held = max(self.most_held, self.held)
        with connection:
            while connection.recv(65536):  # read the request, answer nothing, until the caller gives up
                pass
        with self.lock:
            self.held -= 1

    def close(self) -> None:
        self.server.close()


class FailsFirst(http.server.BaseHTTPRequestHandler):
    """B's receiver: a 500 to each job's first try, a 204 to its second; notes when each job's success arrived."""

    tries: dict[str, int] = {}
    delivered: dict[str, float] = {}

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        self.rfile.read(int(self.headers["Content-Length"]))
        job_id = self.headers["X-GS-Job-Id"]
        FailsFirst.tries[job_id] = FailsFirst.tries.get(job_id, 0) + 1
        ok = FailsFirst.tries[job_id] > 1
        if ok:
            FailsFirst.delivered[job_id] = time.monotonic()
        self.send_response(204 if ok else 500)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


JOB = {"kind": "train", "spec": {"preset": "paper_moons_erm", "steps": 5, "audit": False}}


def cancelled_job(stack: Stack, headers: dict[str, str], callback_url: str) -> tuple[str, float]:
    """A job that ends at once (queued, then cancelled: no worker needed) owing a webhook; with when it ended."""
    job = stack.client.post("/v1/jobs", headers=headers, json={**JOB, "callback_url": callback_url})
    assert job.status_code == 202, job.text
    cancel = stack.client.post(f"/v1/jobs/{job.json()['id']}/cancel", headers=headers)
    assert cancel.status_code == 202 and cancel.json()["status"] == "cancelled", cancel.text
    return job.json()["id"], time.monotonic()


def seconds_to_webhook(stack: Stack, headers: dict[str, str], callback_url: str, timeout_s: float = 30) -> float:
    job_id, ended = cancelled_job(stack, headers, callback_url)
    deadline = ended + timeout_s
    while job_id not in FailsFirst.delivered:
        assert time.monotonic() < deadline, f"B's webhook not delivered after {timeout_s} s\n{stack.log()}"
        time.sleep(0.02)
    return FailsFirst.delivered[job_id] - ended


def test_forty_webhooks_to_a_silent_host_do_not_hold_up_another_tenants(tmp_path):
    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FailsFirst)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    silent = Silent()
    stack = loops_stack(tmp_path, "hooks", {"GS_OUTBOUND_ALLOW": "127.0.0.1"}).start(probe="/healthz")
    try:
        (a, _), (b, _) = new_key(stack, "a"), new_key(stack, "b")
        b_hook = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
        quiet = [seconds_to_webhook(stack, b, b_hook) for _ in range(TRIES)]
        for _ in range(40):
            cancelled_job(stack, a, f"http://127.0.0.1:{silent.port}/hook")
        time.sleep(1)  # A's first tries are under way
        loaded = [seconds_to_webhook(stack, b, b_hook) for _ in range(TRIES)]
        print(f"\nB's webhook (a 500, then a retry 2 s later) arrived {statistics.median(quiet):.2f} s after its job "
              f"ended quiet {fmt(quiet)}, {statistics.median(loaded):.2f} s with A's 40 to a silent host "
              f"{fmt(loaded)}; A's tries held at once: at most {silent.most_held}")
        assert statistics.median(loaded) <= 2 * statistics.median(quiet)
        assert silent.most_held == 2  # GS_WEBHOOK_SLOTS_PER_KEY: A's silent host holds two slots, never more
    finally:
        stack.stop()
        silent.close()
        receiver.shutdown()
