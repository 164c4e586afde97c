"""Every extended operation the gateway offers (see ``operations.py``).

Add an operation by writing its module in this package and listing its
``Operation`` here.
"""

from __future__ import annotations

from gateway.interactions import (
    audit_log,
    capabilities,
    document,
    everything,
    meta,
    snapshot,
    terminology,
    validate,
)
from gateway.interactions.operations import Operation

_ALL: tuple[Operation, ...] = (
    audit_log.OPERATION,
    document.OPERATION,
    everything.OPERATION,
    *meta.OPERATIONS,
    *terminology.OPERATIONS,
    validate.OPERATION,
    snapshot.OPERATION,
    capabilities.VERSIONS,
)

OPERATIONS: dict[str, Operation] = {op.name: op for op in _ALL}
