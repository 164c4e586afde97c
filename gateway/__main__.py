"""``python -m gateway`` is the ``carepath`` command."""

from gateway.cli import app

app()
