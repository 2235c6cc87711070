"""Outbound targets: only public internet addresses, checked again when the connection is made."""
from __future__ import annotations

import ipaddress
import socket
import threading

import httpx
import pytest

from core import outbound
from core.outbound import Allowlist, OutboundRefused, check_target, check_url


class Listener:
    """A real TCP listener on 127.0.0.1 that counts connections and answers HTTP 204 (or a redirect)."""

    def __init__(self, redirect_to: str | None = None) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.requests: list[bytes] = []
        self.redirect_to = redirect_to
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < content_length(data):
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                self.requests.append(data)
                if self.redirect_to:
                    conn.sendall(f"HTTP/1.1 302 Found\r\nLocation: {self.redirect_to}\r\n"
                                 "Content-Length: 0\r\nConnection: close\r\n\r\n".encode())
                else:
                    conn.sendall(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")

    def close(self) -> None:
        self.sock.close()


def content_length(request: bytes) -> int:
    for line in request.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


@pytest.fixture
def listener():
    server = Listener()
    yield server
    server.close()


def fake_dns(monkeypatch, answers: dict[str, list[list[str]]]) -> None:
    """Replace the resolver: each lookup of a name takes the next answer (the last one repeats)."""
    calls: dict[str, int] = {}

    def resolve(host: str, port: int):
        if host not in answers:
            raise OutboundRefused(f"the host {host!r} does not resolve.")
        n = calls[host] = calls.get(host, -1) + 1
        return [ipaddress.ip_address(a) for a in answers[host][min(n, len(answers[host]) - 1)]]

    monkeypatch.setattr(outbound, "resolve", resolve)


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/", "http://127.0.0.1:6379/", "http://[::1]:8000/", "http://localhost/",
    "http://10.0.0.1/", "http://172.16.5.4/", "http://172.31.255.255/", "http://192.168.1.1/",
    "http://169.254.169.254/latest/meta-data/", "http://[fe80::1]/", "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:10.0.0.1]/", "http://0.0.0.0/", "http://0/", "http://127.1/", "http://2130706433/",
    "http://0x7f000001/", "http://224.0.0.1/", "http://[ff02::1]/", "http://100.64.0.1/", "http://240.0.0.1/",
    "http://[64:ff9b::7f00:1]/", "http://[2002:7f00:1::]/", "http://[fc00::1]/", "https://127.0.0.1/",
])
def test_loopback_private_link_local_multicast_and_reserved_targets_are_refused(url):
    with pytest.raises(OutboundRefused, match="only public internet hosts"):
        check_url(url)


@pytest.mark.parametrize("url", ["http://8.8.8.8/", "https://1.1.1.1:8443/x", "http://[2606:4700:4700::1111]/"])
def test_public_addresses_pass(url):
    assert check_url(url)


@pytest.mark.parametrize("url, reason", [
    ("ftp://8.8.8.8/", "scheme"), ("file:///etc/passwd", "scheme"), ("gopher://8.8.8.8:6379/", "scheme"),
    ("http://user:pw@8.8.8.8/", "user name"), ("http://@8.8.8.8/", "user name"),
    ("http://no-such-host.invalid/", "does not resolve"), ("http:///path", "no host"),
])
def test_other_schemes_userinfo_and_unresolvable_hosts_are_refused(url, reason):
    with pytest.raises(OutboundRefused, match=reason):
        check_url(url)


def test_a_name_with_any_private_address_is_refused(monkeypatch):
    fake_dns(monkeypatch, {"mixed.example.com": [["93.184.216.34", "10.1.2.3"]]})
    with pytest.raises(OutboundRefused, match="'mixed.example.com' resolves to 10.1.2.3, a private address"):
        check_url("https://mixed.example.com/hook")


def test_the_allow_list_admits_its_networks_and_hostnames_only():
    allow = Allowlist.parse(" 127.0.0.0/8, mlflow.internal. ,::1 ")
    assert check_url("http://127.0.0.1:5000/", allow) and check_url("http://[::1]:5000/", allow)
    assert check_url("http://localhost:5000/", "LOCALHOST")  # by name, whatever it resolves to
    with pytest.raises(OutboundRefused):
        check_url("http://10.0.0.1/", allow)
    with pytest.raises(OutboundRefused):
        check_url("http://localhost:5000/", "")
    assert Allowlist.parse("") == Allowlist()


def test_file_and_other_listed_schemes(tmp_path):
    check_target(tmp_path.as_uri(), ["file"])
    with pytest.raises(OutboundRefused, match="scheme must be one of: http, https"):
        check_target(tmp_path.as_uri(), ["http", "https"])
    with pytest.raises(OutboundRefused, match="no host"):
        check_target("file://10.0.0.1/share", ["file"])
    with pytest.raises(OutboundRefused, match="private"):
        check_target("postgresql://10.0.0.1/mlflow", ["postgresql"])
    with pytest.raises(OutboundRefused):
        check_target("http://127.0.0.1:5000", ["http", "file"])


def test_webhook_client_refuses_a_name_that_rebinds_to_loopback_at_connect_time(monkeypatch, listener):
    # The first lookup (the submit-time check) answers a public address, the next ones 127.0.0.1.
    fake_dns(monkeypatch, {"hooks.example.com": [["93.184.216.34"], ["127.0.0.1"]]})
    url = f"http://hooks.example.com:{listener.port}/hook"
    assert check_url(url) == [ipaddress.ip_address("93.184.216.34")]
    with outbound.checked_http_client("", timeout_s=5) as client, pytest.raises(httpx.ConnectError, match="loopback"):
        client.post(url, content=b"{}")
    assert listener.requests == []


def test_webhook_client_connects_to_the_checked_address_and_keeps_the_host_header(monkeypatch, listener):
    fake_dns(monkeypatch, {"hooks.example.com": [["127.0.0.1"]]})
    with outbound.checked_http_client("127.0.0.1", timeout_s=5) as client:
        assert client.post(f"http://hooks.example.com:{listener.port}/hook", content=b"{}").status_code == 204
    assert f"host: hooks.example.com:{listener.port}".encode() in listener.requests[0].lower()


def test_webhook_client_does_not_follow_redirects(monkeypatch, listener):
    redirector = Listener(redirect_to=f"http://127.0.0.1:{listener.port}/")
    try:
        with outbound.checked_http_client("127.0.0.1", timeout_s=5) as client:
            assert client.post(f"http://127.0.0.1:{redirector.port}/", content=b"{}").status_code == 302
        assert len(redirector.requests) == 1 and listener.requests == []
    finally:
        redirector.close()


def test_requests_under_the_guard_refuse_rebinding_and_redirects_to_private_addresses(monkeypatch, listener):
    import requests

    fake_dns(monkeypatch, {"mlflow.example.com": [["93.184.216.34"], ["127.0.0.1"]]})
    check_url(f"http://mlflow.example.com:{listener.port}/")  # passes: a public address, this time
    with outbound.guard_urllib3(""), pytest.raises(OutboundRefused, match="loopback"):
        requests.get(f"http://mlflow.example.com:{listener.port}/api/2.0/mlflow/experiments/search", timeout=5)
    assert listener.requests == []

    # An admitted server that redirects elsewhere: the redirect target is checked like any other.
    redirector = Listener(redirect_to=f"http://127.0.0.1:{listener.port}/")
    fake_dns(monkeypatch, {"mlflow.example.com": [["127.0.0.1"]], "127.0.0.1": [["127.0.0.1"]]})
    try:
        with outbound.guard_urllib3("mlflow.example.com"), pytest.raises(OutboundRefused, match="loopback"):
            requests.get(f"http://mlflow.example.com:{redirector.port}/", timeout=5)
        assert len(redirector.requests) == 1 and listener.requests == []
    finally:
        redirector.close()


def test_the_urllib3_guard_is_removed_when_the_export_ends():
    import urllib3.util.connection as connection

    before = connection.create_connection
    with outbound.guard_urllib3(""):
        assert connection.create_connection is not before
    assert connection.create_connection is before
