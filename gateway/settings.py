"""Runtime configuration. The only module that reads the environment.

Every setting has an environment variable ``CAREPATH_<NAME>``; the CLI may
override some of them with flags.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, fields, replace
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

#: IP networks; None for any
Networks = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None


@dataclass(frozen=True, slots=True)
class Settings:
    database_url: str = "sqlite:///./carepath.db"
    #: PostgreSQL schema to use (``search_path``); default: the server's default
    database_schema: str | None = None
    redis_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    base_path: str = "/fhir"
    #: public base URL used in Location headers and Bundle links; derived from
    #: the request when unset.
    public_base_url: str | None = None
    max_request_bytes: int = 10 * 1024 * 1024
    max_bundle_entries: int = 5000
    #: most operations in one JSON Patch or FHIRPath Patch (413 beyond)
    max_patch_operations: int = 1000
    max_json_depth: int = 64
    #: longest string value accepted (base64 documents included), in characters
    max_string_length: int = 8 * 1024 * 1024
    #: responses this large or larger are gzip-compressed for clients that accept it
    #: (0: never); request bodies may be sent with ``Content-Encoding: gzip``
    gzip_min_bytes: int = 8_192
    #: browser origins allowed to call the FHIR API (CORS), comma-separated
    #: (``https://app.example.org``; ``*``: any); unset: no cross-origin access
    cors_origins: str = ""
    #: reverse proxies whose ``X-Forwarded-For/-Proto/-Host/-Port/-Prefix`` headers are
    #: believed (addresses and networks, comma-separated; ``*``: any)
    forwarded_allow_ips: str = "127.0.0.1, ::1"
    default_page_size: int = 20
    max_page_size: int = 1000
    #: largest number of matches a search keeps for stable paging
    max_search_results: int = 100_000
    #: matches the first page of a search reads ahead (at least two pages); a longer
    #: result is read on when a page beyond them is asked for, and has no ``total``
    #: unless ``_total=accurate`` (or ``estimate``) asks for one
    search_read_ahead: int = 1000
    db_pool_size: int = 10
    #: an idle HTTP/1.1 connection is closed after this many seconds. Longer than the
    #: idle timeouts of client pools (httpx 5 s, Node 5 s, Apache HttpClient's check
    #: after 2 s): the client ends an idle connection before the server does, and
    #: never sends a request into one the server is closing (uvicorn's default, 5 s,
    #: loses such a request now and then)
    keep_alive_s: int = 75
    #: a request's line and headers must have arrived this many seconds after its
    #: first byte (or the connection's opening), and its body may pause no longer
    #: than ``request_body_timeout_s`` between two reads; else the connection is
    #: closed (408 when nothing was answered yet), as nginx's client_header_timeout
    #: and client_body_timeout do: a client that sends slowly holds no connection
    request_head_timeout_s: float = 30.0
    request_body_timeout_s: float = 60.0
    #: on SIGTERM, requests in flight are given this long to finish before the
    #: connections are closed and the process ends (0: as long as they take)
    shutdown_grace_s: int = 30
    #: how often a worker looks for SearchParameters stored (or changed) by another
    search_parameter_refresh_s: float = 5.0
    #: a database statement of the server running longer is cancelled, and the request
    #: answered 503 (GW-5003); 0: never. The CLI's maintenance runs without a limit
    db_statement_timeout_ms: int = 60_000
    #: a request that only reads (a search, history, ``POST _search``, a batch of
    #: reads) is stopped after this many seconds in all, its statements together, and
    #: answered 503 (GW-5003); 0: never
    query_timeout_s: float = 60.0
    #: tokens of an external authorisation server instead of (or beside) our own
    auth_issuer: str | None = None
    auth_jwks_url: str | None = None
    auth_audience: str | None = None
    auth_org_claim: str = "organization"
    access_token_lifetime: int = 300
    #: consent policy of the deployment's jurisdiction (mappings/security)
    jurisdiction: str = "DE"
    #: the server's local time zone (IANA name, ``Europe/Berlin``): dates and times
    #: without a zone, searched for or stored, are taken in it (search.html#date).
    #: Unset: the jurisdiction's (``DE`` Europe/Berlin, ``NL`` Europe/Amsterdam)
    timezone: str | None = None
    #: wait for the WAL flush of the audit records of reads (PostgreSQL). Off, a
    #: database crash can lose the read records of its last moments (writes'
    #: records always commit with the write); reads do not each wait for a flush.
    audit_durable_reads: bool = False
    #: Prometheus metrics at ``/metrics`` (outside the FHIR base, without a token)
    metrics: bool = True
    #: an update (or patch) that leaves a resource as it is keeps its current version:
    #: no new version, no event, as HAPI FHIR and Microsoft's FHIR server do for
    #: systems that send the same data again. Off by default: FHIR's update makes a
    #: new version (http.html#update)
    skip_unchanged_updates: bool = False
    # -- validation (docs/adr-0002-validator.md) -------------------------------
    #: deepest nesting of resources in resources (contained, Bundle.entry.resource,
    #: Parameters.parameter.resource) a resource may have; deeper is an error
    validation_max_resource_depth: int = 6
    #: canonical URLs of profiles whose violations are warnings, not errors
    #: (comma- or space-separated); every other known profile is enforced on write
    validation_warn_only: str = ""
    # -- events and subscriptions (docs/subscriptions.md) --------------------
    #: development mode: rest-hook endpoints may use http:// on loopback and may
    #: point at loopback/private addresses. Unset: on when bound to loopback.
    dev_mode: bool | None = None
    #: Redis key prefix of the event stream (one deployment per prefix)
    redis_prefix: str = "carepath"
    #: how often the outbox relay looks for commits no local write told it about
    event_poll_ms: int = 500
    #: Redis entries a consumer left pending this long are reclaimed (XAUTOCLAIM)
    event_claim_idle_ms: int = 30_000
    #: outbox events every reader has passed are kept this long (hours; 0: for ever)
    outbox_retention_hours: int = 168
    #: delivered subscription events (``$events``) are kept this long (hours; 0: for ever)
    subscription_event_retention_hours: int = 720
    #: where rest-hook endpoints may point, comma-separated host names
    #: (``*.example.org``, ``*`` = any) and networks (``10.20.0.0/16``; listing
    #: a network also permits its private/loopback addresses in production)
    subscription_endpoint_allowlist: str = ""
    #: how long (s) deliveries are retried before a subscription turns ``error``
    subscription_retry_period: int = 86_400
    subscription_retry_initial_ms: int = 1_000
    subscription_retry_max_ms: int = 300_000
    #: delivery timeout (s) when the Subscription has no ``backport-timeout``, and its cap
    subscription_timeout: int = 10
    subscription_max_timeout: int = 60
    #: most events in one notification when the Subscription has no ``backport-max-count``
    subscription_max_batch: int = 20
    #: how often each process looks for due retries, heartbeats and orphaned work
    subscription_poll_ms: int = 1_000
    #: most deliveries in flight per process
    subscription_concurrency: int = 100
    #: handshake attempts before a new subscription turns ``error``
    subscription_handshake_attempts: int = 3
    #: lifetime (s) of a ``$get-ws-binding-token`` token
    subscription_ws_token_lifetime: int = 3_600

    @property
    def effective_dev_mode(self) -> bool:
        """``dev_mode``, or on when the gateway listens on loopback only."""
        if self.dev_mode is not None:
            return self.dev_mode
        return self.host in ("127.0.0.1", "localhost", "::1")

    @property
    def own_base(self) -> str:
        """The FHIR base URL the gateway names itself by where no request says which
        (notifications, token ``iss``/``aud``): ``public_base_url``, else its address."""
        if self.public_base_url:
            return self.public_base_url.rstrip("/")
        return f"http://{self.host}:{self.port}{self.base_path}"

    @property
    def trusted_proxies(self) -> Networks:
        """The networks of ``forwarded_allow_ips``; None for ``*`` (any)."""
        return _networks(self.forwarded_allow_ips)

    @property
    def local_timezone(self) -> str:
        """``timezone``, or the jurisdiction's time zone when unset."""
        if self.timezone is not None:
            return self.timezone
        return JURISDICTION_TIMEZONES.get(self.jurisdiction, "UTC")

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        """The settings of the environment; :class:`SettingsError` naming the variable
        for a value that is not of its kind or out of its range."""
        base = cls()
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = f"CAREPATH_{f.name.upper()}"
            raw = os.environ.get(name)
            if raw is None:
                continue
            try:
                values[f.name] = _parse(raw, str(f.type), getattr(base, f.name))
            except ValueError:
                raise SettingsError(f"{name}={raw[:80]!r} is not "
                                    f"{_KINDS.get(str(f.type), 'a value of its kind')}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = replace(base, **values)
        settings.check()
        return settings

    def check(self) -> None:
        """:class:`SettingsError` for a value a gateway cannot run with (a port beyond
        65535 was taken modulo 65536; a negative size refused every write)."""
        if not self.database_url.startswith(("sqlite:", "postgresql:", "postgres:")):
            raise SettingsError(f"CAREPATH_DATABASE_URL={database_label(self.database_url)!r}"
                                " is neither sqlite:///… nor postgresql://…")
        if not 0 <= self.port <= 65535:
            raise SettingsError(f"CAREPATH_PORT={self.port} is not a TCP port (0-65535)")
        for name in _POSITIVE:
            if getattr(self, name) <= 0:
                raise SettingsError(f"CAREPATH_{name.upper()}={getattr(self, name)} must be "
                                    "greater than 0")
        for name in _NOT_NEGATIVE:
            if getattr(self, name) < 0:
                raise SettingsError(f"CAREPATH_{name.upper()}={getattr(self, name)} must not be "
                                    "negative")
        if self.base_path and not self.base_path.startswith("/"):
            raise SettingsError(f"CAREPATH_BASE_PATH={self.base_path[:80]!r} must begin with /")
        if self.redis_url is not None and not self.redis_url.startswith(
                ("redis://", "rediss://", "unix://")):
            raise SettingsError(f"CAREPATH_REDIS_URL={database_label(self.redis_url)!r} "
                                "is not a redis://, rediss:// or unix:// URL")
        if self.public_base_url is not None and not self.public_base_url.startswith(
                ("http://", "https://")):
            raise SettingsError(f"CAREPATH_PUBLIC_BASE_URL={self.public_base_url[:80]!r} is not "
                                "an http(s) URL")
        try:
            _networks(self.forwarded_allow_ips)
        except ValueError as exc:
            raise SettingsError(f"CAREPATH_FORWARDED_ALLOW_IPS={self.forwarded_allow_ips[:80]!r}:"
                                f" {exc}") from None
        try:
            ZoneInfo(self.local_timezone)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            raise SettingsError(f"CAREPATH_TIMEZONE={self.local_timezone[:80]!r} is not an IANA "
                                "time zone (Europe/Berlin)") from None


def database_label(url: str) -> str:
    """``url`` as it may be shown: without its password."""
    head, at, tail = url.rpartition("@")
    if not at:
        return url[:120]
    scheme, sep, credentials = head.partition("://")
    user = credentials.split(":", 1)[0]
    return f"{scheme}{sep}{user}{':***' if ':' in credentials else ''}@{tail}"[:120]


def _networks(value: str) -> Networks:
    """``10.0.0.0/8, 127.0.0.1`` as networks, None for ``*``; ValueError naming an
    entry that is neither an address nor a network."""
    entries = [e.strip() for e in value.split(",") if e.strip()]
    if "*" in entries:
        return None
    return tuple(ipaddress.ip_network(e, strict=False) for e in entries)


class SettingsError(ValueError):
    """A setting the gateway cannot run with; the message names its variable."""


#: the local time zone of a jurisdiction's deployments, unless ``timezone`` names one
JURISDICTION_TIMEZONES = {"DE": "Europe/Berlin", "NL": "Europe/Amsterdam"}

#: settings that must be greater than 0, and those that may be 0 (off, or for ever)
_POSITIVE = ("workers", "max_request_bytes", "max_bundle_entries", "max_patch_operations",
             "max_json_depth", "max_string_length", "default_page_size", "max_page_size",
             "max_search_results", "search_read_ahead", "db_pool_size", "keep_alive_s",
             "access_token_lifetime", "validation_max_resource_depth",
             "search_parameter_refresh_s")
_NOT_NEGATIVE = ("gzip_min_bytes", "shutdown_grace_s", "db_statement_timeout_ms",
                 "request_head_timeout_s", "request_body_timeout_s", "outbox_retention_hours",
                 "query_timeout_s",
                 "subscription_event_retention_hours")
_KINDS = {"int": "a whole number", "float": "a number", "bool": "true or false",
          "bool | None": "true or false"}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def _parse(raw: str, annotation: str, current: Any) -> Any:
    if annotation.startswith("bool"):
        value = raw.strip().lower()
        if value not in _TRUE + _FALSE:
            raise ValueError(raw)
        return value in _TRUE
    if isinstance(current, float):
        return float(raw)
    return int(raw) if isinstance(current, int) else raw
