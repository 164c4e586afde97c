"""rest-hook delivery: one POST of a notification Bundle, safely.

https://hl7.org/fhir/uv/subscriptions-backport/channels.html#rest-hook

* the endpoint is resolved and checked (:mod:`gateway.subscriptions.endpoint`)
  before every delivery, and the connection goes to exactly those checked
  addresses (:mod:`gateway.subscriptions.http1`), never to a fresh lookup;
* redirects are not followed (3xx is a failure), no proxy or ``.netrc``
  from the environment is used, nothing but the subscriber's own
  ``channel.header`` lines is sent;
* ``X-Carepath-Signature: sha256=<hex>`` is the HMAC-SHA256 of the body
  under the Subscription's secret, when it has one;
* the whole exchange is bounded by the Subscription's timeout, and at most
  64 KiB of a response body are read.
"""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import urlsplit

import gateway
from gateway.subscriptions.endpoint import EndpointPolicy, EndpointRefused, Resolver
from gateway.subscriptions.http1 import Http1Client, HttpError
from gateway.subscriptions.subscription import SubscriptionConfig

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
                 client: Http1Client | None = None) -> None:
        self.policy = policy
        self.resolver = resolver
        self.client = client or Http1Client()

    async def close(self) -> None:
        await self.client.close()

    async def send(self, config: SubscriptionConfig, body: bytes) -> int:
        """POST ``body``; returns the HTTP status or raises :class:`DeliveryFailed`."""
        if not config.endpoint:
            raise DeliveryFailed("the subscription has no endpoint", permanent=True)
        try:
            target = self.policy.check_url(config.endpoint)
            addresses = await self.policy.resolve(target, self.resolver)
        except EndpointRefused as exc:
            raise DeliveryFailed(f"endpoint refused: {exc}", permanent=True) from exc
        parts = urlsplit(config.endpoint)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = [
            ("Content-Type", config.mime),
            ("Accept", "application/fhir+json, application/json;q=0.9, */*;q=0.1"),
            ("User-Agent", f"carepath-gateway/{gateway.__version__}"),
            *config.headers,
        ]
        if config.secret:
            headers.append((SIGNATURE_HEADER, signature(config.secret, body)))
        timeout = float(config.timeout)
        failure = "no address"
        for address in addresses:  # each one checked above; connect to exactly these
            try:
                status = await self.client.post(
                    scheme=target.scheme, host=target.host, port=target.port,
                    address=address, target=path, headers=headers, body=body,
                    deadline_s=timeout)
            except TimeoutError as exc:
                raise DeliveryFailed(f"no answer within {timeout:g}s") from exc
            except HttpError as exc:
                failure = str(exc)
                continue
            if not 200 <= status < 300:
                kind = "redirect (not followed)" if 300 <= status < 400 else "answer"
                raise DeliveryFailed(f"HTTP {status} {kind}")
            return status
        raise DeliveryFailed(failure[:300])
