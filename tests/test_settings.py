"""Every setting can be given in the environment (``CAREPATH_<NAME>``), as the type
its default has: what ``carepath serve`` reads."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from gateway.settings import Settings, SettingsError


@pytest.mark.parametrize("field", [f for f in fields(Settings)
                                   if isinstance(getattr(Settings(), f.name), int | float)],
                         ids=lambda f: f.name)
def test_a_number_in_the_environment_is_a_number(field: object,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    name = field.name  # type: ignore[attr-defined]
    default = getattr(Settings(), name)
    if isinstance(default, bool):
        monkeypatch.setenv(f"CAREPATH_{name.upper()}", "false" if default else "true")
        assert getattr(Settings.from_env(), name) is (not default)
        return
    monkeypatch.setenv(f"CAREPATH_{name.upper()}", "7")
    value = getattr(Settings.from_env(), name)
    assert value == 7 and type(value) is type(default)
    if isinstance(default, float):
        monkeypatch.setenv(f"CAREPATH_{name.upper()}", "0.25")
        assert getattr(Settings.from_env(), name) == 0.25


@pytest.mark.parametrize(("variable", "value", "said"), [
    ("CAREPATH_PORT", "73730", "is not a TCP port"),
    ("CAREPATH_PORT", "abc", "is not a whole number"),
    ("CAREPATH_MAX_REQUEST_BYTES", "-5", "must be greater than 0"),
    ("CAREPATH_DEFAULT_PAGE_SIZE", "0", "must be greater than 0"),
    ("CAREPATH_DB_STATEMENT_TIMEOUT_MS", "-1", "must not be negative"),
    ("CAREPATH_METRICS", "ture", "is not true or false"),
    ("CAREPATH_PUBLIC_BASE_URL", "not a url", "is not an http(s) URL"),
    ("CAREPATH_BASE_PATH", "r4", "must begin with /"),
    ("CAREPATH_REDIS_URL", "notaurl", "is not a redis://"),
    ("CAREPATH_DATABASE_URL", "mysql://u:pw@h/d", "is neither sqlite"),
    ("CAREPATH_TIMEZONE", "Mitteleuropa", "is not an IANA time zone"),
    ("CAREPATH_TIMEZONE", "/etc/localtime", "is not an IANA time zone"),
    ("CAREPATH_FORWARDED_ALLOW_IPS", "127.0.0.1, proxy", "'proxy' does not appear to be"),
    ("CAREPATH_FORWARDED_ALLOW_IPS", "10.0.0.0/33", "does not appear to be"),
])
def test_a_setting_out_of_its_range_is_refused_by_name(
        monkeypatch: pytest.MonkeyPatch, variable: str, value: str, said: str) -> None:
    """A port beyond 65535 was taken modulo 65536, a negative size refused every
    write, a misspelt boolean read as false: each is refused, naming the variable."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=f"{variable}.*{re.escape(said)}"):
        Settings.from_env()


def test_the_local_time_zone_is_the_jurisdictions_unless_set(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CAREPATH_TIMEZONE", raising=False)
    monkeypatch.delenv("CAREPATH_JURISDICTION", raising=False)
    assert Settings.from_env().local_timezone == "Europe/Berlin"
    monkeypatch.setenv("CAREPATH_JURISDICTION", "NL")
    assert Settings.from_env().local_timezone == "Europe/Amsterdam"
    monkeypatch.setenv("CAREPATH_TIMEZONE", "UTC")
    assert Settings.from_env().local_timezone == "UTC"


def test_the_cli_ends_with_the_settings_error(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "CAREPATH_PORT": "73730",
           "CAREPATH_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}"}
    done = subprocess.run([sys.executable, "-m", "gateway", "migrate"], env=env,
                          capture_output=True, timeout=60, text=True)
    assert done.returncode == 2
    assert "CAREPATH_PORT=73730 is not a TCP port" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "x.db").exists()
