"""Requests our servers send to URLs a user chose (webhooks, MLflow): public internet hosts only.

A target is refused when its scheme is not http(s), when it carries userinfo, when its host does
not resolve, or when ANY address it resolves to is loopback, private, link-local, multicast,
reserved, unspecified or otherwise not globally routable. The operator's allow-list
(GS_OUTBOUND_ALLOW: hostnames and/or CIDRs) admits internal targets anyway.

Checking a name at submit time is not enough (DNS rebinding): the connection itself must go to an
address that passed the check. `CheckedBackend` (httpx/httpcore) and `guard_urllib3` (requests,
which MLflow uses) resolve once, check, and connect to that checked address.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

if TYPE_CHECKING:
    import httpcore

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
WEB_SCHEMES = ("http", "https")
NAT64 = ipaddress.ip_network("64:ff9b::/96")
NON_PUBLIC = (
    ("is_loopback", "a loopback address"),
    ("is_unspecified", "an unspecified address"),
    ("is_link_local", "a link-local address"),
    ("is_multicast", "a multicast address"),
    ("is_private", "a private address"),
    ("is_reserved", "a reserved address"),
)


class OutboundRefused(ValueError):
    """A target this service will not send requests to; str() is a sentence for a person."""


@dataclass(frozen=True)
class Allowlist:
    """Targets the operator admits although they are not public: exact hostnames and networks."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, text: str | None) -> Allowlist:
        hosts, networks = set(), []
        for entry in (text or "").split(","):
            entry = entry.strip()
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                hosts.add(normal_host(entry))
        return cls(frozenset(hosts), tuple(networks))

    def admits_host(self, host: str) -> bool:
        return normal_host(host) in self.hosts

    def admits_address(self, address: IPAddress) -> bool:
        return any(address in network for network in self.networks if address.version == network.version)


def as_allowlist(allow: Allowlist | str | None) -> Allowlist:
    return allow if isinstance(allow, Allowlist) else Allowlist.parse(allow)


def normal_host(host: str) -> str:
    return host.strip().strip("[]").rstrip(".").lower()


def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to (the one place we ask DNS; tests replace it)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as exc:
        raise OutboundRefused(f"the host {host!r} does not resolve ({exc}).") from None
    addresses = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])  # drop an IPv6 zone id
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise OutboundRefused(f"the host {host!r} does not resolve.")
    return addresses


def why_not_public(address: IPAddress) -> str | None:
    """What kind of non-public address `address` is ("a loopback address"), or None when public."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (address.teredo or (None, None))[1]
        if embedded is None and address in NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None and why_not_public(embedded):
            return f"{why_not_public(embedded)} ({embedded} inside)"
    for flag, kind in NON_PUBLIC:
        if getattr(address, flag):
            return kind
    if not address.is_global:
        return "not a globally routable address"
    return None


def checked_addresses(host: str, port: int, allow: Allowlist | str | None = None) -> list[IPAddress]:
    """Resolve `host` once and return its addresses, all of which passed the check."""
    allow = as_allowlist(allow)
    addresses = resolve(host, port)
    if allow.admits_host(host):
        return addresses
    for address in addresses:
        reason = why_not_public(address)
        if reason and not allow.admits_address(address):
            what = f"{address} is" if normal_host(host) == str(address) else f"{host!r} resolves to {address},"
            raise OutboundRefused(
                f"{what} {reason}; only public internet hosts are allowed "
                "(an operator can admit a host with GS_OUTBOUND_ALLOW)."
            )
    return addresses


def check_url(url: str, allow: Allowlist | str | None = None) -> list[IPAddress]:
    """Refuse a URL we must not send a request to; return the checked addresses of its host."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise OutboundRefused("it is not a valid URL.") from None
    if parts.scheme.lower() not in WEB_SCHEMES:
        raise OutboundRefused(f"the scheme must be http or https, not {parts.scheme or 'none'!r}.")
    if "@" in parts.netloc:
        raise OutboundRefused("it must not carry a user name or password.")
    if not parts.hostname:
        raise OutboundRefused("it names no host.")
    return checked_addresses(parts.hostname, port or (443 if parts.scheme.lower() == "https" else 80), allow)


def check_target(url: str, allowed_schemes: Sequence[str], allow: Allowlist | str | None = None) -> None:
    """A URL whose scheme the operator lists: http(s) gets `check_url`, file: must name no host,
    any other listed scheme gets its host (if it names one) checked."""
    allowed = [s.strip().lower() for s in allowed_schemes if s.strip()]
    scheme = urlsplit(url).scheme.lower()
    if scheme not in allowed:
        raise OutboundRefused(f"the scheme must be one of: {', '.join(allowed)}.")
    if scheme in WEB_SCHEMES:
        check_url(url, allow)
        return
    parts = urlsplit(url)
    if "@" in parts.netloc:
        raise OutboundRefused("it must not carry a user name or password.")
    if scheme == "file":
        if parts.hostname not in (None, "", "localhost"):
            raise OutboundRefused("a file: URI must name no host.")
    elif parts.hostname:
        checked_addresses(parts.hostname, parts.port or 0, allow)


def connect_checked(host: str, port: int, allow: Allowlist | str | None, connect: Any) -> Any:
    """`connect(address)` to the first checked address of `host` that answers."""
    last: Exception | None = None
    for address in checked_addresses(host, port, allow):
        try:
            return connect(str(address))
        except OSError as exc:
            last = exc
    raise last if last else OutboundRefused(f"the host {host!r} does not resolve.")


class CheckedBackend:
    """An httpcore network backend that connects only to checked addresses (TLS keeps the name)."""

    def __init__(self, allow: Allowlist | str | None = None) -> None:
        import httpcore

        self.allow = as_allowlist(allow)
        self.inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> Any:
        import httpcore

        def connect(address: str) -> Any:
            return self.inner.connect_tcp(address, port, timeout, local_address, socket_options)

        try:
            return connect_checked(host, port, self.allow, connect)
        except OutboundRefused as exc:
            raise httpcore.ConnectError(f"refused target: {exc}") from None

    def connect_unix_socket(self, *args: Any, **kwargs: Any) -> Any:
        raise OutboundRefused("unix sockets are not an outbound target.")

    def sleep(self, seconds: float) -> None:
        self.inner.sleep(seconds)


def checked_http_client(allow: Allowlist | str | None, timeout_s: float) -> Any:
    """An httpx client for user-chosen URLs: checked connections, no redirects, no env proxies."""
    import httpcore
    import httpx

    transport = httpx.HTTPTransport(trust_env=False)
    transport._pool = httpcore.ConnectionPool(  # the pool httpx would build, with our backend
        ssl_context=httpx.create_ssl_context(trust_env=False),
        network_backend=cast("httpcore.NetworkBackend", CheckedBackend(allow)),  # duck-typed
    )
    return httpx.Client(transport=transport, timeout=timeout_s, follow_redirects=False, trust_env=False)


_guard_lock = threading.Lock()
_guards: list[Allowlist] = []
_original_create_connection: Any = None


def _checked_create_connection(address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
    host, port = address
    with _guard_lock:
        allow = _guards[-1] if _guards else None
    original = _original_create_connection
    if allow is None:
        return original(address, *args, **kwargs)
    return connect_checked(host, port, allow, lambda ip: original((ip, port), *args, **kwargs))


@contextmanager
def guard_urllib3(allow: Allowlist | str | None) -> Iterator[None]:
    """While open, every urllib3 (so requests, so MLflow) connection of this process goes only to
    checked addresses, redirects included; the name still drives the Host header and TLS."""
    import urllib3.util.connection as connection

    global _original_create_connection
    with _guard_lock:
        if not _guards:
            _original_create_connection = connection.create_connection
            connection.create_connection = _checked_create_connection
        _guards.append(as_allowlist(allow))
    try:
        yield
    finally:
        with _guard_lock:
            _guards.pop()
            if not _guards:
                connection.create_connection = _original_create_connection
