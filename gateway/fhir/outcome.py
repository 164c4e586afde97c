"""OperationOutcome and the gateway's stable error codes.

Every failure the gateway reports carries a ``GW-NNNN`` code in
``OperationOutcome.issue.details.coding`` (system :data:`ERROR_SYSTEM`). The
code, its FHIR issue type and its HTTP status live in one table,
:class:`Code`; the HTTP layer reads the status from there and nowhere else.

Spec: https://hl7.org/fhir/R4/operationoutcome.html,
https://hl7.org/fhir/R4/http.html#Status-Codes
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

ERROR_SYSTEM = "https://carepath-gateway.org/fhir/CodeSystem/error-code"


class Code(Enum):
    """``GW-NNNN`` code -> (HTTP status, issue type, summary)."""

    # 1xxx: the request itself is malformed
    MALFORMED_JSON = ("GW-1001", 400, "structure", "Body is not valid JSON")
    NOT_AN_OBJECT = ("GW-1002", 400, "structure", "Body is not a JSON object")
    UNKNOWN_RESOURCE_TYPE = ("GW-1003", 400, "not-supported", "Unknown resource type")
    TYPE_MISMATCH = ("GW-1004", 400, "invalid", "resourceType does not match the URL")
    ID_MISMATCH = ("GW-1005", 400, "invalid", "Resource id does not match the URL")
    ID_MISSING = ("GW-1006", 400, "required", "Resource id is required for update")
    INVALID_ID = ("GW-1007", 400, "value", "Invalid resource id")
    UNSUPPORTED_MEDIA_TYPE = ("GW-1008", 415, "not-supported", "Unsupported media type")
    NOT_ACCEPTABLE = ("GW-1009", 406, "not-supported", "Requested format is not supported")
    TOO_DEEP = ("GW-1010", 400, "too-costly", "JSON nesting is too deep")
    TOO_LARGE = ("GW-1011", 413, "too-costly", "Request body is too large")
    TOO_MANY_ENTRIES = ("GW-1012", 413, "too-costly", "Bundle has too many entries")
    INVALID_SEARCH_VALUE = ("GW-1013", 400, "value", "Invalid search parameter value")
    UNKNOWN_SEARCH_PARAM = ("GW-1014", 400, "not-supported", "Unknown search parameter")
    INVALID_PATCH = ("GW-1016", 400, "invalid", "Invalid patch document")
    INVALID_BUNDLE = ("GW-1017", 400, "invalid", "Invalid Bundle")
    INVALID_ENTRY = ("GW-1018", 400, "invalid", "Invalid Bundle entry")
    INVALID_HEADER = ("GW-1020", 400, "value", "Invalid HTTP header value")
    INVALID_CONDITION = ("GW-1021", 400, "invalid", "Invalid conditional criteria")
    INVALID_RESOURCE = ("GW-1022", 400, "structure", "Resource content is invalid")
    UNKNOWN_ENDPOINT = ("GW-1023", 404, "not-found", "Unknown endpoint")
    UNSUPPORTED_SEARCH = ("GW-1024", 400, "not-supported", "Unsupported search feature")
    STRING_TOO_LONG = ("GW-1025", 413, "too-long", "A string is longer than allowed")
    BAD_CONTENT_ENCODING = ("GW-1026", 400, "structure", "Body cannot be decoded")
    MALFORMED_XML = ("GW-1027", 400, "structure", "Body is not well-formed XML")
    INVALID_OPERATION = ("GW-1028", 400, "invalid", "Invalid operation parameters")
    SEARCH_TOO_COSTLY = ("GW-1029", 400, "too-costly", "Search has too many parameters or values")
    UNAUTHENTICATED = ("GW-1030", 401, "login", "Authentication required or failed")
    FORBIDDEN = ("GW-1031", 403, "forbidden", "Not permitted")
    UNSUPPORTED_OPERATION_PARAMETER = ("GW-1032", 400, "not-supported",
                                       "Operation parameter not supported")
    #: a warning in a searchset: a limit left out part of what the search found
    RESULT_TRUNCATED = ("GW-1033", 200, "too-costly", "Not all of the result is returned")
    #: json.html: "Property names SHALL be unique" (which one a reader keeps is its own
    #: choice: HAPI FHIR's parser keeps the last)
    DUPLICATE_PROPERTY = ("GW-1034", 400, "structure", "A JSON object repeats a property")
    # 2xxx: what was asked for is not there
    NOT_FOUND = ("GW-2001", 404, "not-found", "Resource not found")
    GONE = ("GW-2002", 410, "deleted", "Resource was deleted")
    VERSION_NOT_FOUND = ("GW-2003", 404, "not-found", "Resource version not found")
    SEARCH_EXPIRED = ("GW-2004", 410, "not-found", "Search result set expired or unknown")
    # 3xxx: state conflicts
    VERSION_CONFLICT = ("GW-3001", 412, "conflict", "Version does not match If-Match")
    MULTIPLE_MATCHES = ("GW-3002", 412, "multiple-matches",
                        "Conditional criteria match more than one resource")
    UNRESOLVED_REFERENCE = ("GW-3003", 412, "not-found",
                            "Conditional reference does not resolve to one resource")
    DUPLICATE_IDENTITY = ("GW-3004", 409, "conflict", "Transaction entries touch the same resource")
    CONCURRENT_CONFLICT = ("GW-3005", 409, "conflict", "Concurrent modification; retry the request")
    #: RFC 5789 2.2, conflicting state: the resource is not as the patch's test expects
    PATCH_TEST_FAILED = ("GW-3006", 409, "conflict", "A JSON Patch test operation failed")
    #: RFC 9110 13.1.2: If-None-Match on a write names what exists
    RESOURCE_EXISTS = ("GW-3007", 412, "duplicate", "The resource exists (If-None-Match)")
    #: http.html#cond-update, no match and an id given: the id is for a new resource
    #: (R5 says so: "409 Conflict" when it exists)
    CONDITIONAL_ID_TAKEN = ("GW-3008", 409, "duplicate",
                            "The id belongs to a resource the criteria do not match")
    # 4xxx: not supported
    METHOD_NOT_ALLOWED = ("GW-4001", 405, "not-supported", "Interaction not supported here")
    VALIDATION_FAILED = ("GW-4002", 422, "processing", "Resource failed validation")
    PATCH_RESULT_INVALID = ("GW-4003", 422, "processing", "Patched resource is invalid")
    DOCUMENT_TOO_LARGE = ("GW-4004", 422, "too-costly",
                          "The document would hold more resources than allowed")
    INVALID_SEARCH_PARAMETER = ("GW-4005", 422, "processing",
                                "The SearchParameter can never be searched by")
    # 43xx: terminology operations ($lookup, $expand, $validate-code, $translate)
    UNKNOWN_CODE_SYSTEM = ("GW-4301", 404, "not-found", "Code system is not known")
    UNKNOWN_VALUE_SET = ("GW-4302", 404, "not-found", "Value set is not known")
    UNKNOWN_CONCEPT_MAP = ("GW-4303", 404, "not-found", "Concept map is not known")
    UNKNOWN_CODE = ("GW-4304", 404, "not-found", "Code is not in the code system")
    INVALID_TERMINOLOGY_REQUEST = ("GW-4305", 400, "invalid",
                                   "Invalid terminology operation parameters")
    EXPANSION_FAILED = ("GW-4306", 422, "not-supported",
                        "Value set cannot be expanded offline")
    EXPANSION_TOO_LARGE = ("GW-4307", 422, "too-costly", "Value set expansion is too large")
    # 42xx: validation findings, the issues listed under GW-4002 and by $validate
    VALIDATION_OK = ("GW-4200", 200, "informational", "Validation found no problems")
    UNKNOWN_ELEMENT = ("GW-4201", 422, "structure", "Unknown element")
    WRONG_JSON_TYPE = ("GW-4202", 422, "structure", "Wrong JSON type for the element")
    EMPTY_VALUE = ("GW-4203", 422, "structure", "null or empty string, array or object")
    MIN_CARDINALITY = ("GW-4204", 422, "required", "Required element missing")
    MAX_CARDINALITY = ("GW-4205", 422, "structure", "Element repeats too often")
    INVALID_PRIMITIVE = ("GW-4206", 422, "value", "Invalid primitive value")
    CODE_NOT_IN_VALUESET = ("GW-4207", 422, "code-invalid",
                            "Code is not in the required value set")
    INVARIANT_FAILED = ("GW-4208", 422, "invariant", "Constraint failed")
    UNSAFE_NARRATIVE = ("GW-4209", 422, "invariant", "Narrative is not safe XHTML (txt-1/txt-2)")
    NESTING_TOO_DEEP = ("GW-4210", 422, "too-costly", "Nesting deeper than allowed")
    UNKNOWN_PROFILE = ("GW-4211", 422, "not-supported", "Unknown profile")
    FIXED_VALUE_MISMATCH = ("GW-4212", 422, "value",
                            "Value differs from the profile's fixed or pattern value")
    SLICING_FAILED = ("GW-4213", 422, "structure", "Slicing rule violated")
    INVARIANT_NOT_EVALUATED = ("GW-4214", 422, "informational", "Constraint not evaluated")
    INVALID_REFERENCE_TARGET = ("GW-4215", 422, "structure",
                                "Reference to a resource type the element does not allow")
    INVALID_RESOURCE_TYPE = ("GW-4216", 422, "structure", "Missing or unknown resourceType")
    TYPE_NOT_ALLOWED = ("GW-4217", 422, "structure", "Type not allowed by the profile")
    TOO_LONG = ("GW-4218", 422, "value", "Value longer than the profile's maxLength")
    SNAPSHOT_FAILED = ("GW-4219", 422, "processing",
                       "No snapshot can be made from the differential")
    #: the last issue of an OperationOutcome that lists the first of many (MAX_ISSUES)
    ISSUES_NOT_LISTED = ("GW-4220", 422, "too-costly", "More issues were found than are listed")
    EXTENSION_CONTEXT = ("GW-4221", 422, "structure",
                         "Extension used on an element its definition does not name")
    # 44xx: subscriptions (R4 Subscriptions Backport; docs/subscriptions.md)
    UNKNOWN_TOPIC = ("GW-4401", 422, "not-supported", "Unknown SubscriptionTopic")
    INVALID_FILTER = ("GW-4402", 422, "invalid", "Filter not supported by the topic")
    UNSUPPORTED_CHANNEL = ("GW-4403", 422, "not-supported", "Unsupported subscription channel")
    ENDPOINT_REFUSED = ("GW-4404", 422, "security", "Subscription endpoint refused")
    UNSUPPORTED_PAYLOAD = ("GW-4405", 422, "not-supported",
                           "Unsupported notification payload or content")
    INVALID_SUBSCRIPTION = ("GW-4406", 422, "invalid", "Invalid Subscription")
    INVALID_EVENT_RANGE = ("GW-4407", 400, "invalid", "Invalid event number range")
    NOT_A_TOPIC_SUBSCRIPTION = ("GW-4408", 422, "not-supported",
                                "Not a topic-based subscription managed by this gateway")
    INVALID_BINDING_TOKEN = ("GW-4409", 401, "security", "Invalid or expired binding token")
    # 5xxx: the gateway's own trouble
    INTERNAL = ("GW-5001", 500, "exception", "Internal error")
    UNAVAILABLE = ("GW-5002", 503, "transient", "Storage is unavailable")
    DATABASE_TIMEOUT = ("GW-5003", 503, "timeout", "The database took too long")
    DATABASE_BUSY = ("GW-5004", 503, "transient", "The database is busy; retry the request")

    def __init__(self, gw: str, status: int, issue_type: str, summary: str) -> None:
        self.gw = gw
        self.status = status
        self.issue_type = issue_type
        self.summary = summary


@dataclass(frozen=True, slots=True)
class Issue:
    code: Code
    diagnostics: str | None = None
    expression: tuple[str, ...] = ()
    severity: str = "error"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "severity": self.severity,
            "code": self.code.issue_type,
            "details": {
                "coding": [{"system": ERROR_SYSTEM, "code": self.code.gw}],
                "text": self.code.summary,
            },
        }
        if self.diagnostics:
            out["diagnostics"] = self.diagnostics
        if self.expression:
            out["expression"] = list(self.expression)
        return out


@dataclass(slots=True)
class FhirError(Exception):
    """A failure the client caused or must know about; becomes an OperationOutcome."""

    code: Code
    diagnostics: str | None = None
    expression: tuple[str, ...] = ()
    extra: list[Issue] = field(default_factory=list)
    #: HTTP headers the answer carries (``Allow`` of a 405)
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.code.gw} {self.code.summary}: {self.diagnostics or ''}"

    @property
    def status(self) -> int:
        return self.code.status

    def issues(self) -> list[Issue]:
        return [Issue(self.code, self.diagnostics, self.expression), *self.extra]

    def outcome(self) -> dict[str, Any]:
        return operation_outcome(self.issues())


#: the most errors, and the most other issues, one OperationOutcome lists; how many
#: more were found is said in one more issue (GW-4220). A resource of a million
#: faulty elements would otherwise be answered with a million issues, hundreds of
#: megabytes, which help no one: the first ones show what is wrong
MAX_ISSUES = 100

_ERRORS = ("error", "fatal")


class Findings:
    """Issues as a check finds them: the first :data:`MAX_ISSUES` errors and the first
    :data:`MAX_ISSUES` others kept, in the order found; the rest only counted, so that
    a long walk over a faulty resource costs no more memory than a short one.

    A caller that builds an issue's text or location at some cost asks :meth:`keeps`
    first, and builds the issue only when it is kept."""

    __slots__ = ("errors", "issues", "others")

    def __init__(self) -> None:
        self.issues: list[Issue] = []
        self.errors = 0  # found, kept or not
        self.others = 0

    def keeps(self, severity: str) -> bool:
        """Count an issue of ``severity``: True when it is to be kept (appended)."""
        if severity in _ERRORS:
            self.errors += 1
            return self.errors <= MAX_ISSUES
        self.others += 1
        return self.others <= MAX_ISSUES

    def add(self, issue: Issue) -> None:
        if self.keeps(issue.severity):
            self.issues.append(issue)

    def absorb(self, other: Findings) -> None:
        """What ``other`` found, as if found here after what was found here."""
        for issue in other.issues:
            self.add(issue)
        self.errors += max(0, other.errors - MAX_ISSUES)
        self.others += max(0, other.others - MAX_ISSUES)

    @property
    def failed(self) -> bool:
        """An error was found (kept or not)."""
        return self.errors > 0

    def listed(self) -> list[Issue]:
        """The kept issues and, when some were not kept, one saying how many: an error
        when any of those is, so what is left out still fails a write."""
        errors = max(0, self.errors - MAX_ISSUES)
        others = max(0, self.others - MAX_ISSUES)
        if not errors and not others:
            return list(self.issues)
        counted = " and ".join(f"{n} {what}" for n, what in ((errors, "more errors"),
                                                            (others, "more warnings or notes"))
                               if n)
        return [*self.issues, Issue(
            Code.ISSUES_NOT_LISTED,
            f"{counted} were found and are not listed (at most {MAX_ISSUES} errors and"
            f" {MAX_ISSUES} other issues are)", (), "error" if errors else "warning")]


def listed(issues: Iterable[Issue]) -> list[Issue]:
    """``issues`` as an OperationOutcome lists them (:class:`Findings`)."""
    found = Findings()
    for issue in issues:
        found.add(issue)
    return found.listed()


def operation_outcome(issues: Iterable[Issue]) -> dict[str, Any]:
    issues = list(issues)
    if len(issues) > 2 * MAX_ISSUES + 2:  # the validator lists that many at most
        issues = listed(issues)
    return {"resourceType": "OperationOutcome", "issue": [i.to_json() for i in issues]}


def information(text: str) -> dict[str, Any]:
    """An all-is-well OperationOutcome (``Prefer: return=OperationOutcome``)."""
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "information", "code": "informational", "diagnostics": text}],
    }
