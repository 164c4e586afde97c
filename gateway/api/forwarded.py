"""Requests through a reverse proxy: the address, scheme, host and path the client used.

A gateway in production sits behind a proxy that ends TLS (nginx, HAProxy, an
ingress). The client's view of the request reaches the gateway in the
``X-Forwarded-*`` headers, and only a proxy the gateway trusts
(``CAREPATH_FORWARDED_ALLOW_IPS``: addresses and networks, ``*`` for any;
loopback by default) may set them; from anyone else they are ignored.

* ``X-Forwarded-For``: the client's address (in the AuditEvent): the nearest
  address in the chain that is not a trusted proxy, as uvicorn reads it;
* ``X-Forwarded-Proto``: ``http`` or ``https``;
* ``X-Forwarded-Host`` (and ``X-Forwarded-Port`` when the host names no port):
  the host the client addressed;
* ``X-Forwarded-Prefix``: the path the proxy strips before the gateway's own
  (``/gateway`` when ``https://example.org/gateway/fhir`` reaches ``/fhir``).

The last three make the base written into ``Location``, every Bundle link and
the SMART token endpoint the one the client can reach, as HAPI FHIR's
``ApacheProxyAddressStrategy`` does. ``CAREPATH_PUBLIC_BASE_URL``, when set,
wins over all of them. A value that is not a host, port or path is ignored.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import MutableMapping
from typing import Any

from gateway.settings import Networks

#: RFC 9110 7.2, RFC 3986 3.2.2: a host name, IPv4 address or bracketed IPv6
#: literal, and an optional port (a name with sub-delims is legal there but nowhere
#: in DNS: refused, as a value that would shape the links this server writes)
HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9._~%-]{1,253})(?::[0-9]{1,5})?")
_PORT = re.compile(r"[0-9]{1,5}")
_PREFIX = re.compile(r"(?:/[A-Za-z0-9._~%!$&'()*+,;=:@-]+)+/?")
_SCHEMES = frozenset({"http", "https"})
_DEFAULT_PORTS = {"http": "80", "https": "443"}
_NAMES = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
                    b"x-forwarded-port", b"x-forwarded-prefix"})


class Proxies:
    """Applies a trusted proxy's ``X-Forwarded-*`` headers to an ASGI scope."""

    def __init__(self, networks: Networks) -> None:
        self.networks = networks
        self._known: dict[str, bool] = {}

    def trusts(self, address: str | None) -> bool:
        if address is None:
            return False
        if self.networks is None:
            return True
        known = self._known.get(address)
        if known is None:
            try:
                ip = ipaddress.ip_address(address)
                known = any(ip in network for network in self.networks)
            except ValueError:  # (a unix socket's peer, say)
                known = False
            if len(self._known) < 10_000:
                self._known[address] = known
        return known

    def apply(self, scope: MutableMapping[str, Any]) -> None:
        """Rewrites ``client``, ``scheme``, the ``Host`` header and ``root_path`` of a
        request from a trusted proxy; leaves any other request as it is."""
        client = scope.get("client")
        if not client or not self.trusts(client[0]):
            return
        found: dict[bytes, list[str]] = {}
        for name, value in scope["headers"]:
            if name in _NAMES:
                found.setdefault(name, []).append(value.decode("latin-1"))
        if not found:
            return
        if b"x-forwarded-for" in found:
            chain = [h.strip() for v in found[b"x-forwarded-for"] for h in v.split(",")]
            chain = [h for h in chain if h]
            if chain:
                address = next((h for h in reversed(chain) if not self.trusts(h)), chain[0])
                scope["client"] = (address, 0)
        scheme = scope.get("scheme", "http")
        proto = _first(found.get(b"x-forwarded-proto"))
        if proto is not None and proto.lower() in _SCHEMES:
            scheme = proto.lower()
            scope["scheme"] = scheme if scope["type"] == "http" else scheme.replace("http", "ws")
        host = _first(found.get(b"x-forwarded-host"))
        if host is not None and HOST.fullmatch(host):
            port = _first(found.get(b"x-forwarded-port"))
            if ":" not in host.rsplit("]", 1)[-1] and port is not None \
                    and _PORT.fullmatch(port) and port != _DEFAULT_PORTS.get(scheme):
                host = f"{host}:{port}"
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"host"]
            scope["headers"].append((b"host", host.encode("latin-1")))
        prefix = _first(found.get(b"x-forwarded-prefix"))
        if prefix is not None and _PREFIX.fullmatch(prefix) and ".." not in prefix:
            scope["root_path"] = prefix.rstrip("/") + scope.get("root_path", "")


def _first(values: list[str] | None) -> str | None:
    """The first proxy's value (the one nearest the client) of a header that a chain
    of proxies may have appended to."""
    if not values:
        return None
    return values[0].split(",", 1)[0].strip() or None
