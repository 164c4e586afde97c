"""SQL for the organisation compartment (see ``gateway.security.policy``).

A patient is *accessible* to an organisation when a participation source
links them (an EpisodeOfCare it manages, a ServiceRequest it requested or
performs, a Task it owns, …; a PractitionerRole counts through its
organisation), or the organisation created the Patient, and the consent
rows (``sp_consent``, derived from active Consent resources) allow it:
the applicable row of highest weight decides (weight = 2·depth + 1 for deny),
and with ``consent_required`` a patient without a permitting row is not
accessible.

A resource is *visible* when every Patient its compartment parameters name
is accessible; a Patient when it is accessible itself; an *owned* type when
the organisation created it; anything else (directories, definitions) to
every authenticated organisation. A deleted resource (no index rows left)
is visible to the organisation that created it only.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from gateway.storage.interface import Restriction

Frag = tuple[str, list[Any]]

#: the index ``param`` of an owned resource's access proxy (no search parameter has
#: it): a Binary's ``securityContext``, a document Bundle's patient. The rows
#: :class:`gateway.security.policy.PolicyIndexer` derives for :func:`visible`
ACCESS_PROXY = "_access-proxy"
#: the owned types a proxy can open
PROXIED = ("Binary", "Bundle")


#: the directory type through which an organisation takes part in a patient's care
#: (by its ``organization``); writes to it are guarded accordingly
#: (``gateway.security.guard``)
PARTICIPATION_PROXY = "PractitionerRole"


def _marks(n: int) -> str:
    return ", ".join("?" for _ in range(n))


def _org_match(alias: str, org: str) -> Frag:
    return (
        f"(({alias}.target_type = 'Organization' AND {alias}.target_id = ?)"
        f" OR ({alias}.target_type = '{PARTICIPATION_PROXY}' AND {alias}.target_id IN ("
        f"SELECT apr.res_id FROM sp_reference apr WHERE apr.res_type = '{PARTICIPATION_PROXY}'"
        " AND apr.param = 'organization' AND apr.target_type = 'Organization'"
        " AND apr.target_id = ?)))",
        [org, org],
    )


def accessible(r: Restriction, pid: str) -> Frag:
    """A condition: the Patient whose id is the SQL expression ``pid`` is one ``r`` may
    see. Never NULL (a NOT around it must not turn an unknown into a yes).

    Correlated on ``pid``, so that it costs a few index look-ups per patient asked
    about. (The list of every accessible patient, which an uncorrelated subquery
    would build for each statement, grows with the organisation's patients: 130 ms
    for 20,000 of them on PostgreSQL, for a search that finds one.)"""
    # its aliases (a…) differ from those of the statements it goes into, so that
    # ``pid`` (``c.target_id``, ``v.res_id``) names the outer row
    org = r.organization
    pairs: list[str] = []
    pair_params: list[Any] = []
    self_params: list[str] = []
    for rtype, pparam, oparams in r.rules.participation:
        if pparam == "_self":
            self_params.extend(oparams)
            continue
        pairs.append(f"(ap.res_type = ? AND ap.param = ? AND ao.param IN ({_marks(len(oparams))}))")
        pair_params += [rtype, pparam, *oparams]
    # the cheapest look-ups first: the first that holds ends the OR
    linked: list[Frag] = [(
        "EXISTS (SELECT 1 FROM resource_creator ac WHERE ac.res_type = 'Patient'"
        f" AND ac.res_id = {pid} AND ac.organization = ?)", [org])]
    if self_params:
        match, mp = _org_match("ao", org)
        linked.append((
            f"EXISTS (SELECT 1 FROM sp_reference ao WHERE ao.res_type = 'Patient'"
            f" AND ao.res_id = {pid} AND ao.param IN ({_marks(len(self_params))}) AND {match})",
            [*self_params, *mp]))
    if pairs:
        match, mp = _org_match("ao", org)
        linked.append((
            "EXISTS (SELECT 1 FROM sp_reference ap JOIN sp_reference ao"
            " ON ao.res_type = ap.res_type AND ao.res_id = ap.res_id"
            f" WHERE ap.target_id = {pid} AND ap.target_type = 'Patient'"
            f" AND ({' OR '.join(pairs)}) AND {match})", [*pair_params, *mp]))
    params = [p for _, ps in linked for p in ps]
    # the applicable consent row of highest weight decides (odd: deny); without a row
    # there is no objection, or, where consent is required, no permission either
    fallback = "1" if r.rules.consent_required else "0"
    decision = (
        f"COALESCE((SELECT MAX(ak.weight) FROM sp_consent ak WHERE ak.patient_id = {pid}"
        " AND ak.actor IN ('*', ?) AND ak.purpose IN ('*', ?) AND ak.lo <= ? AND ak.hi >= ?),"
        f" {fallback}) % 2 = 0")
    return (f"(({' OR '.join(sql for sql, _ in linked)}) AND {decision})",
            [*params, org, r.purpose, r.now, r.now])


def _patients_accessible(r: Restriction, alias: str,
                         comp: Mapping[str, Collection[str]]) -> Frag:
    """``alias`` is of a type of ``comp`` (type -> its patient-compartment
    parameters) and names no patient ``r`` may not access."""
    pairs = " OR ".join(
        f"(c.res_type = ? AND c.param IN ({_marks(len(ps))}))" for ps in comp.values())
    pair_params = [v for t, ps in comp.items() for v in (t, *ps)]
    acc, acc_params = accessible(r, "c.target_id")
    return (f"({alias}.res_type IN ({_marks(len(comp))}) AND NOT EXISTS (SELECT 1 FROM"
            f" sp_reference c WHERE c.res_type = {alias}.res_type AND c.res_id = {alias}.res_id"
            f" AND c.target_type = 'Patient' AND ({pairs}) AND c.target_id IS NOT NULL"
            f" AND NOT {acc}))", [*comp, *pair_params, *acc_params])


def visible(r: Restriction, alias: str, types: Collection[str] | None, *,
            proxies: bool = True) -> Frag:
    """A condition on ``alias`` (a row with res_type, res_id): ``r`` may see it.

    A Binary or Bundle is also visible where its access proxy is (one level;
    ``proxies``: False inside that look-up): a Binary's ``securityContext``
    (binary.html: the proxy for its access rules), so the PDF of a discharge
    letter goes where its DocumentReference goes; a document Bundle's patient
    (its Composition's subject), so a discharge letter sent as a document goes
    to the organisations that take part in that patient's care."""
    rules = r.rules
    candidates = sorted(types) if types is not None else None
    ors: list[str] = []
    params: list[Any] = []
    if candidates is None or "Patient" in candidates:
        acc, acc_params = accessible(r, f"{alias}.res_id")
        ors.append(f"({alias}.res_type = 'Patient' AND {acc})")
        params += acc_params
    comp = {t: p for t, p in rules.compartment.items()
            if candidates is None or t in candidates}
    # an owned type in the compartment (Basic, DocumentManifest) is its creator's, and
    # then only while every patient it names is accessible: both, not either
    both = {t: p for t, p in comp.items() if t in rules.owned}
    comp = {t: p for t, p in comp.items() if t not in rules.owned}
    if comp:
        sql, comp_params = _patients_accessible(r, alias, comp)
        ors.append(sql)
        params += comp_params
    owned = sorted(t for t in rules.owned if candidates is None or t in candidates)
    if owned:
        for group in ([t for t in owned if t not in both], sorted(both)):
            if not group:
                continue
            mine = (f"({alias}.res_type IN ({_marks(len(group))}) AND EXISTS (SELECT 1 FROM"
                    f" resource_creator rc WHERE rc.res_type = {alias}.res_type"
                    f" AND rc.res_id = {alias}.res_id AND rc.organization = ?))")
            params += [*group, r.organization]
            if group[0] in both:
                sql, comp_params = _patients_accessible(r, alias, both)
                mine = f"({mine} AND {sql})"
                params += comp_params
            ors.append(mine)
        proxied = [t for t in PROXIED if t in owned]
        if proxies and proxied:
            inner, inner_params = visible(r, "sx", None, proxies=False)
            ors.append(
                f"({alias}.res_type IN ({_marks(len(proxied))}) AND EXISTS (SELECT 1 FROM"
                " sp_reference sc JOIN resource sx ON sx.res_type = sc.target_type"
                f" AND sx.res_id = sc.target_id WHERE sc.res_type = {alias}.res_type"
                f" AND sc.res_id = {alias}.res_id AND sc.param = ? AND sx.deleted = 0"
                f" AND {inner}))")
            params += [*proxied, ACCESS_PROXY, *inner_params]
    special = {"Patient", *rules.compartment, *rules.owned}
    shared = (candidates is None) or any(t not in special for t in candidates)
    if shared:
        ors.append(f"({alias}.res_type NOT IN ({_marks(len(special))}))")
        params += sorted(special)
    if not ors:
        return "1 = 0", []
    # a deleted resource has no index rows left to judge by: its creator only
    return (
        f"(({alias}.deleted = 0 AND ({' OR '.join(ors)})) OR ({alias}.deleted = 1 AND EXISTS"
        f" (SELECT 1 FROM resource_creator dc WHERE dc.res_type = {alias}.res_type"
        f" AND dc.res_id = {alias}.res_id AND dc.organization = ?)))",
        [*params, r.organization],
    )
