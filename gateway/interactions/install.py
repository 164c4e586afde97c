"""The gateway's own conformance resources, stored on the server.

Its profiles and extensions, code systems, value sets, concept maps, the pain
Questionnaire and its search parameters (``profiles/*.json``) are resources of
the server like any other, under the ids of their files: a client or a
conformance tester reads them where the CapabilityStatement's ``supportedProfile``
and ``searchParam.definition`` point (``GET [base]/StructureDefinition/
pathway-episode-of-care``, ``StructureDefinition?url=…``), as from a server an
implementation guide was installed on.

Each start installs those that are missing, deleted or different (after an
upgrade) as a new version; one that is as shipped stays as it is, so every
worker may start at once. Validation uses the shipped definitions, not what is
stored under their URLs.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from gateway.interactions.update import same_content

if TYPE_CHECKING:
    from gateway.registry import Registry
    from gateway.storage.interface import Store, StoreTransaction


async def install_conformance(store: Store, registry: Registry) -> int:
    """Store the gateway's own conformance resources where missing or changed; how
    many were written."""
    shipped = [r for r in registry.conformance if isinstance(r.get("id"), str)]
    if not shipped:
        return 0

    async def work(tx: StoreTransaction) -> int:
        await tx.lock(*(f"{r['resourceType']}/{r['id']}" for r in shipped))
        written = 0
        for resource in shipped:
            rtype, id = resource["resourceType"], resource["id"]
            current = await tx.current(rtype, id)
            if same_content(current, resource):
                continue
            await tx.put(rtype, id, copy.deepcopy(resource), "PUT", current)
            written += 1
        return written

    return await store.run(work)
