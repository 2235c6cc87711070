"""callback_url: a signed POST on the terminal status, retried when the receiver fails."""
from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import threading
import time

import pytest

from tests.conftest import ADMIN_TOKEN, Stack, free_port


class Receiver(http.server.BaseHTTPRequestHandler):
    calls: list[dict] = []
    fail_first = 1

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Receiver.calls.append({"headers": dict(self.headers), "body": body})
        failing = len(Receiver.calls) <= Receiver.fail_first
        self.send_response(500 if failing else 204)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def webhook_stack(tmp_path_factory):
    """The embedded stack with the test's receiver on 127.0.0.1 admitted: webhooks go to public hosts only."""
    var_dir = tmp_path_factory.mktemp("webhooks")
    stack = Stack("embedded+outbound-allow", {"GS_DATABASE_URL": f"sqlite:///{var_dir / 'gs.sqlite3'}",
                                              "GS_BROKER_URL": "filesystem://", "GS_OUTBOUND_ALLOW": "127.0.0.1"},
                  var_dir)
    yield stack.start()
    stack.stop()


def test_terminal_status_is_posted_signed_and_retried(webhook_stack):
    Receiver.calls, Receiver.fail_first = [], 1
    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        spec = {"preset": "paper_moons_erm", "steps": 5, "audit": False}
        job = webhook_stack.client.post(
            "/v1/jobs", json={"kind": "train", "spec": spec, "callback_url": f"http://127.0.0.1:{port}/hook"}
        ).json()
        webhook_stack.wait_for(job["id"], ("succeeded",), timeout_s=60)
        deadline = time.monotonic() + 40
        while len(Receiver.calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(Receiver.calls) == 2, "one failed delivery, then one retry that succeeds"
        for call in Receiver.calls:
            timestamp = call["headers"]["X-GS-Timestamp"]
            expected = hmac.new(ADMIN_TOKEN.encode(), timestamp.encode() + b"." + call["body"], hashlib.sha256)
            assert call["headers"]["X-GS-Signature"] == f"sha256={expected.hexdigest()}"
            delivered = json.loads(call["body"])
            assert delivered["id"] == job["id"] and delivered["status"] == "succeeded"
        time.sleep(6)  # no third delivery once one succeeded
        assert len(Receiver.calls) == 2
    finally:
        server.shutdown()


def test_a_keys_jobs_are_signed_with_its_own_webhook_secret(webhook_stack):
    Receiver.calls, Receiver.fail_first = [], 0
    issued = webhook_stack.client.post("/v1/api-keys", json={"name": "hooks"}).json()
    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        job = webhook_stack.client.post(
            "/v1/jobs", headers={"Authorization": f"Bearer {issued['key']}"},
            json={"kind": "train", "spec": {"preset": "paper_moons_erm", "steps": 5, "audit": False},
                  "callback_url": f"http://127.0.0.1:{port}/hook"},
        ).json()
        deadline = time.monotonic() + 60
        while not Receiver.calls and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(Receiver.calls) == 1, webhook_stack.log()
        call = Receiver.calls[0]
        timestamp = call["headers"]["X-GS-Timestamp"]
        signed = timestamp.encode() + b"." + call["body"]
        expected = hmac.new(issued["webhook_secret"].encode(), signed, hashlib.sha256).hexdigest()
        assert call["headers"]["X-GS-Signature"] == f"sha256={expected}"
        assert json.loads(call["body"])["id"] == job["id"]
    finally:
        server.shutdown()


def test_a_callback_outside_the_allow_list_is_refused(webhook_stack):
    response = webhook_stack.client.post("/v1/jobs", json={
        "kind": "train", "spec": {"preset": "paper_moons_erm", "steps": 5}, "callback_url": "http://10.0.0.1/hook"})
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_callback_url"
