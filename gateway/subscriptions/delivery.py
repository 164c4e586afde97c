"""rest-hook delivery: one POST of a notification Bundle, safely.

https://hl7.org/fhir/uv/subscriptions-backport/channels.html#rest-hook

* the endpoint is checked (:mod:`gateway.subscriptions.endpoint`) before
  every delivery, and the connection itself is made by a network backend that
  resolves and checks again, connecting only to a checked address;
* redirects are not followed (3xx is a failure), no proxy or ``.netrc``
  from the environment is used, nothing but the subscriber's own
  ``channel.header`` lines is sent;
* ``X-Carepath-Signature: sha256=<hex>`` is the HMAC-SHA256 of the body
  under the Subscription's secret, when it has one;
* the whole exchange is bounded by the Subscription's timeout, and at most
  64 KiB of a response body are read.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ssl

import httpcore

import gateway
from gateway.subscriptions.endpoint import EndpointPolicy, EndpointRefused, GuardedBackend, Resolver
from gateway.subscriptions.subscription import SubscriptionConfig

MAX_RESPONSE_BYTES = 64 * 1024
SIGNATURE_HEADER = "X-Carepath-Signature"


class DeliveryFailed(Exception):
    """A delivery did not succeed; ``permanent`` when retrying cannot help."""

    def __init__(self, reason: str, *, permanent: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class RestHookSender:
    def __init__(self, policy: EndpointPolicy, *, resolver: Resolver | None = None,
                 max_connections: int = 100) -> None:
        self.policy = policy
        self.resolver = resolver
        self.pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl.create_default_context(),
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=30.0,
            retries=0,
            network_backend=GuardedBackend(policy, resolver),
        )

    async def close(self) -> None:
        await self.pool.aclose()

    async def send(self, config: SubscriptionConfig, body: bytes) -> int:
        """POST ``body``; returns the HTTP status or raises :class:`DeliveryFailed`."""
        if not config.endpoint:
            raise DeliveryFailed("the subscription has no endpoint", permanent=True)
        try:
            target = self.policy.check_url(config.endpoint)
            await self.policy.resolve(target, self.resolver)
        except EndpointRefused as exc:
            raise DeliveryFailed(f"endpoint refused: {exc}", permanent=True) from exc
        headers = [
            ("Content-Type", config.mime),
            ("Accept", "application/fhir+json, application/json;q=0.9, */*;q=0.1"),
            ("User-Agent", f"carepath-gateway/{gateway.__version__}"),
            *config.headers,
        ]
        if config.secret:
            headers.append((SIGNATURE_HEADER, signature(config.secret, body)))
        timeout = float(config.timeout)
        limits = {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}
        try:
            async with asyncio.timeout(timeout):
                async with self.pool.stream("POST", config.endpoint, headers=headers,
                                            content=body,
                                            extensions={"timeout": limits}) as response:
                    read = 0
                    async for chunk in response.aiter_stream():
                        read += len(chunk)
                        if read > MAX_RESPONSE_BYTES:
                            break
                    status = response.status
        except EndpointRefused as exc:
            raise DeliveryFailed(f"endpoint refused: {exc}", permanent=True) from exc
        except TimeoutError as exc:
            raise DeliveryFailed(f"no answer within {timeout:g}s") from exc
        except httpcore.TimeoutException as exc:
            raise DeliveryFailed(f"timed out ({type(exc).__name__})") from exc
        except (httpcore.NetworkError, httpcore.ProtocolError, OSError) as exc:
            raise DeliveryFailed(f"{type(exc).__name__}: {exc}"[:300]) from exc
        if not 200 <= status < 300:
            kind = "redirect (not followed)" if 300 <= status < 400 else "answer"
            raise DeliveryFailed(f"HTTP {status} {kind}")
        return status
