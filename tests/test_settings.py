"""Every setting can be given in the environment (``CAREPATH_<NAME>``), as the type
its default has: what ``carepath serve`` reads."""

from __future__ import annotations

from dataclasses import fields

import pytest

from gateway.settings import Settings


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
