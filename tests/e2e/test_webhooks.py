"""callback_url: a signed POST on the terminal status, retried when the receiver fails."""
from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import threading
import time

from tests.conftest import ADMIN_TOKEN, free_port


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


def test_terminal_status_is_posted_signed_and_retried(embedded_stack):
    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        spec = {"preset": "paper_moons_erm", "steps": 5, "audit": False}
        job = embedded_stack.client.post(
            "/v1/jobs", json={"kind": "train", "spec": spec, "callback_url": f"http://127.0.0.1:{port}/hook"}
        ).json()
        embedded_stack.wait_for(job["id"], ("succeeded",), timeout_s=60)
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
