"""Where a rest-hook may point: checked at creation and again at every delivery.

A gateway that POSTs to URLs its clients choose is a server-side request
forgery target. The rules (docs/subscriptions.md, "Endpoint safety"):

* ``https`` only; ``http`` only to loopback, and only in development mode;
* no user info in the URL (no credentials are ever forwarded);
* every address the host resolves to is checked, and the delivery connects
  to one of those checked addresses (:mod:`gateway.subscriptions.http1`), so
  DNS rebinding between check and connect does not help;
* never: link-local (169.254.0.0/16, fe80::/10 — cloud metadata lives there),
  the metadata addresses fd00:ec2::254 and 100.100.100.200, unspecified,
  multicast, broadcast, reserved — also when embedded in IPv6 (mapped,
  6to4, Teredo, NAT64);
* production mode: only globally routable addresses, unless the address lies
  in a network of the allow-list (``CAREPATH_SUBSCRIPTION_ENDPOINT_ALLOWLIST``);
* when the allow-list is set, the host must match one of its host patterns or
  all its addresses one of its networks.

Redirects are never followed (the delivery counts a 3xx as a failure).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import urlsplit

from gateway.settings import Settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Awaitable[list[str]]]

#: never a notification target, whatever the mode or allow-list
_METADATA = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "fd00:ec2::254", "100.100.100.200", "169.254.170.2",
))
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_BROADCAST = ipaddress.ip_address("255.255.255.255")
DNS_TIMEOUT_S = 2.0


class EndpointRefused(ValueError):
    """The endpoint may not receive notifications; the message says why."""


@dataclass(frozen=True, slots=True)
class Target:
    scheme: str
    host: str  # without brackets
    port: int
    url: str


def _embedded_v4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _never(ip: IPAddress) -> str | None:
    if ip in _METADATA:
        return "a cloud metadata address"
    if ip.is_link_local:
        return "link-local"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_multicast or ip == _BROADCAST:
        return "multicast/broadcast"
    if ip.is_reserved and not ip.is_loopback:  # ::1 lies in the reserved ::/8
        return "reserved"
    return None


def _is_loopback(ip: IPAddress) -> bool:
    inner = _embedded_v4(ip)
    return ip.is_loopback or (inner is not None and inner.is_loopback)


@dataclass(frozen=True, slots=True)
class EndpointPolicy:
    dev_mode: bool
    allow_hosts: tuple[str, ...] = ()
    allow_networks: tuple[Network, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings) -> EndpointPolicy:
        hosts: list[str] = []
        networks: list[Network] = []
        for item in (x.strip() for x in settings.subscription_endpoint_allowlist.split(",")):
            if not item:
                continue
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                hosts.append(item.lower().rstrip("."))
        return cls(settings.effective_dev_mode, tuple(hosts), tuple(networks))

    @property
    def restricted(self) -> bool:
        return bool(self.allow_hosts or self.allow_networks)

    def _host_allowed(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        for pattern in self.allow_hosts:
            if pattern == "*" or pattern == host:
                return True
            if pattern.startswith("*.") and host.endswith(pattern[1:]):
                return True
        return False

    def check_url(self, url: str) -> Target:
        """The static rules (scheme, user info, host); raises :class:`EndpointRefused`."""
        return _checked_url(self, url)  # the same answer every time: remembered

    def _check_url(self, url: str) -> Target:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise EndpointRefused(f"not a valid URL ({exc})") from exc
        scheme = parts.scheme.lower()
        if scheme not in ("https", "http"):
            raise EndpointRefused("the endpoint must be an https:// URL")
        if parts.username is not None or parts.password is not None:
            raise EndpointRefused("the endpoint URL must not carry credentials")
        if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
            raise EndpointRefused("the endpoint URL contains spaces or control characters")
        host = (parts.hostname or "").rstrip(".")
        if not host or any(c in host for c in " \t\r\n/\\@"):
            raise EndpointRefused("the endpoint URL has no valid host")
        if scheme == "http" and not self.dev_mode:
            raise EndpointRefused("the endpoint must use https (http only to loopback in "
                                  "development mode)")
        return Target(scheme, host, port or (443 if scheme == "https" else 80), url)

    def check_address(self, target: Target, address: str) -> None:
        """Whether ``target`` may be reached at ``address``; raises :class:`EndpointRefused`."""
        _checked_address(self, target, address)  # remembered when allowed

    def _check_address(self, target: Target, address: str) -> None:
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError as exc:
            raise EndpointRefused(f"{address!r} is not an IP address") from exc
        for candidate in (ip, _embedded_v4(ip)):
            if candidate is None:
                continue
            never = _never(candidate)
            if never:
                raise EndpointRefused(f"{target.host} resolves to {ip}, {never}; "
                                      "never a notification target")
        listed = any(ip in net for net in self.allow_networks)
        if self.restricted and not (listed or self._host_allowed(target.host)):
            raise EndpointRefused(f"{target.host} ({ip}) is not on the endpoint allow-list")
        if target.scheme == "http" and not _is_loopback(ip):
            raise EndpointRefused("http:// is only allowed to loopback addresses (use https)")
        inner = _embedded_v4(ip)
        public = ip.is_global and (inner is None or inner.is_global)
        if not self.dev_mode and not public and not listed:
            raise EndpointRefused(f"{target.host} resolves to {ip}, a private or loopback "
                                  "address (refused in production mode)")

    def _literal(self, target: Target) -> list[str] | None:
        return [target.host] if _is_ip_literal(target.host) else None

    async def resolve(self, target: Target, resolver: Resolver | None = None) -> list[str]:
        """Every address of the target, each checked; raises :class:`EndpointRefused`."""
        addresses = self._literal(target)
        if addresses is None:
            try:
                addresses = await (resolver or system_resolver)(target.host, target.port)
            except (OSError, TimeoutError) as exc:
                raise EndpointRefused(f"{target.host} does not resolve ({exc})") from exc
        if not addresses:
            raise EndpointRefused(f"{target.host} does not resolve")
        for address in addresses:
            self.check_address(target, address)
        return addresses

    def resolve_blocking(self, target: Target) -> list[str]:
        """:meth:`resolve` for synchronous callers (Subscription validation), bounded."""
        addresses = self._literal(target)
        if addresses is None:
            pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
            try:
                future = pool.submit(_getaddrinfo, target.host, target.port)
                addresses = future.result(timeout=DNS_TIMEOUT_S)
            except (OSError, concurrent.futures.TimeoutError) as exc:
                raise EndpointRefused(f"{target.host} does not resolve ({exc})") from exc
            finally:
                pool.shutdown(wait=False)
        if not addresses:
            raise EndpointRefused(f"{target.host} does not resolve")
        for address in addresses:
            self.check_address(target, address)
        return addresses


# The rules are pure functions of the (immutable) policy and their arguments, and a
# delivery applies them to the same endpoint thousands of times a second. Only
# answers that allow are remembered; a refusal is worked out (and logged) each time.

@lru_cache(maxsize=4096)
def _checked_url(policy: EndpointPolicy, url: str) -> Target:
    return policy._check_url(url)


@lru_cache(maxsize=4096)
def _checked_address(policy: EndpointPolicy, target: Target, address: str) -> None:
    policy._check_address(target, address)


@lru_cache(maxsize=4096)
def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _getaddrinfo(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return _unique(str(info[4][0]) for info in infos)


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


async def system_resolver(host: str, port: int) -> list[str]:
    loop = asyncio.get_running_loop()
    infos = await asyncio.wait_for(
        loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), DNS_TIMEOUT_S
    )
    return _unique(str(info[4][0]) for info in infos)
