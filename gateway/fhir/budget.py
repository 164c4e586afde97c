"""A bound on the work one request's patch may do: the paths or selectors of a
FHIRPath Patch or XML Patch examine at most so many elements, whatever the
resource and the patch (413 beyond). Without it, many operations over a resource
of long lists cost operations times elements, on the event loop."""

from __future__ import annotations

from gateway.fhir.outcome import Code, FhirError


class Visits:
    """What a patch has examined so far, against its ``limit``."""

    __slots__ = ("left", "limit", "refusal")

    def __init__(self, limit: int, refusal: str) -> None:
        self.left = self.limit = limit
        self.refusal = refusal  # the diagnostics of the 413

    def spend(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise FhirError(Code.TOO_LARGE, self.refusal)
