"""Endpoint safety: refused before any connection is attempted."""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

import pytest

from gateway.settings import Settings
from gateway.subscriptions.delivery import DeliveryFailed, RestHookSender
from gateway.subscriptions.endpoint import EndpointPolicy, EndpointRefused
from gateway.subscriptions.http1 import Http1Client
from gateway.subscriptions.subscription import SubscriptionConfig

PRODUCTION = EndpointPolicy(dev_mode=False)
DEV = EndpointPolicy(dev_mode=True)


def check(policy: EndpointPolicy, url: str, addresses: list[str] | None = None) -> None:
    target = policy.check_url(url)

    async def resolver(host: str, port: int) -> list[str]:
        assert addresses is not None, "a literal address needs no resolver"
        return addresses

    asyncio.run(policy.resolve(target, resolver))


@pytest.mark.parametrize("url", [
    "https://169.254.169.254/latest/meta-data/",
    "https://10.0.0.1/hook",
    "https://192.168.1.10/hook",
    "https://172.16.0.5/hook",
    "https://127.0.0.1/hook",
    "https://[::1]/hook",
    "https://[fd00:ec2::254]/",
    "https://[::ffff:169.254.169.254]/",
    "https://[::ffff:10.0.0.1]/",
    "https://100.64.0.1/hook",
    "https://0.0.0.0/hook",
    "https://[fe80::1]/hook",
    "http://203.0.113.7/hook",
    "http://127.0.0.1:8080/hook",
    "https://user:secret@93.184.216.34/hook",
    "ftp://93.184.216.34/hook",
])
def test_production_refuses(url: str) -> None:
    with pytest.raises(EndpointRefused):
        check(PRODUCTION, url)


def test_production_accepts_a_public_https_address() -> None:
    check(PRODUCTION, "https://93.184.216.34/hook")


@pytest.mark.parametrize("url", [
    "https://169.254.169.254/", "https://[fd00:ec2::254]/", "http://169.254.169.254/",
    "https://[fe80::1]/", "https://224.0.0.1/", "https://100.100.100.200/",
    "http://10.0.0.1/hook",  # http only to loopback, even in development
])
def test_development_mode_still_refuses(url: str) -> None:
    with pytest.raises(EndpointRefused):
        check(DEV, url)


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/hook", "http://[::1]:9/hook",
                                 "https://10.0.0.1/hook"])
def test_development_mode_allows_loopback_and_private(url: str) -> None:
    check(DEV, url)


def test_a_name_is_refused_when_any_of_its_addresses_is_forbidden() -> None:
    with pytest.raises(EndpointRefused, match="metadata"):
        check(PRODUCTION, "https://partner.example/hook", ["93.184.216.34", "169.254.169.254"])
    with pytest.raises(EndpointRefused, match="private"):
        check(PRODUCTION, "https://partner.example/hook", ["10.1.2.3"])
    check(PRODUCTION, "https://partner.example/hook", ["93.184.216.34"])


def test_allow_list_restricts_hosts_and_opens_listed_networks() -> None:
    policy = EndpointPolicy.from_settings(Settings(
        dev_mode=False, subscription_endpoint_allowlist="*.partner.example, 10.20.0.0/16"))
    check(policy, "https://hooks.partner.example/x", ["93.184.216.34"])
    check(policy, "https://10.20.1.5/x")  # a listed private network
    with pytest.raises(EndpointRefused, match="allow-list"):
        check(policy, "https://other.example/x", ["93.184.216.34"])
    with pytest.raises(EndpointRefused, match="private"):
        check(policy, "https://hooks.partner.example/x", ["10.1.2.3"])  # name listed, not net
    # listing the link-local network does not open the metadata service
    listed = EndpointPolicy(False, ("*",), (ipaddress.ip_network("169.254.0.0/16"),))
    with pytest.raises(EndpointRefused, match="metadata"):
        check(listed, "https://169.254.169.254/")


def test_dev_mode_defaults_to_loopback_binding() -> None:
    assert Settings(host="127.0.0.1").effective_dev_mode
    assert not Settings(host="0.0.0.0").effective_dev_mode
    assert not Settings(host="127.0.0.1", dev_mode=False).effective_dev_mode


def test_a_delivery_is_refused_before_any_connection() -> None:
    """A name that resolves to a metadata address at delivery time never gets a socket."""
    posted: list[str] = []

    class Recording(Http1Client):
        async def post(self, **kw: Any) -> int:
            posted.append(kw["address"])
            raise AssertionError("must not connect")

    async def rebinding(host: str, port: int) -> list[str]:
        return ["93.184.216.34", "169.254.169.254"]

    sender = RestHookSender(PRODUCTION, resolver=rebinding, client=Recording())
    config = SubscriptionConfig(topic="t", filters=(), channel="rest-hook",
                                endpoint="https://hooks.partner.example/x",
                                mime="application/fhir+json", content="empty")
    with pytest.raises(DeliveryFailed) as failure:
        asyncio.run(sender.send(config, b"{}"))
    assert failure.value.permanent and "metadata" in failure.value.reason
    assert posted == []
