"""Transaction Bundles shaped as Synthea (3.x) writes them, and their load.

``python -m bench.synthea_shaped --out DIR`` writes, as Synthea's FHIR exporter
does, one Bundle of hospitals (Organizations and Locations), one of practitioners
(Practitioners and PractitionerRoles), each entry a ``POST`` with ``ifNoneExist``
on its identifier, and one Bundle a patient: the Patient, then per encounter an
Encounter, a Condition, four vital signs, a blood pressure panel (components), an
Immunization, a MedicationRequest, a Procedure, a DiagnosticReport and a
DocumentReference carrying a base64 note, a Claim and an ExplanationOfBenefit
with contained resources (``#referral``, ``#coverage``), and last a Provenance
naming every entry. Entries refer to each other by ``urn:uuid`` and to
practitioners, organizations and locations by ``Type?identifier=…``; resources
claim US Core profiles, which the gateway does not hold. ``--load URL`` then
posts the files in order and prints one JSON line per Bundle and a summary.

Generated, not Synthea's output: the same structure, seeded, with no clinical
sense to it. The searches over such a load are in ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

SYNTHEA = "https://github.com/synthetichealth/synthea"
NPI = "http://hl7.org/fhir/sid/us-npi"
US_CORE = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
Resource = dict[str, Any]


def _concept(system: str, code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


def _entry(resource: Resource, if_none_exist: str | None = None) -> dict[str, Any]:
    request: dict[str, str] = {"method": "POST", "url": resource["resourceType"]}
    if if_none_exist:
        request["ifNoneExist"] = if_none_exist
    return {"fullUrl": f"urn:uuid:{resource['id']}", "resource": resource, "request": request}


def _bundle(entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


class Generator:
    """Bundles from one seed: the same seed, the same Bundles."""

    def __init__(self, seed: int = 7) -> None:
        self.rng = random.Random(seed)
        self.organizations: list[Resource] = []
        self.locations: list[Resource] = []
        self.npis: list[str] = []

    def _id(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128)))

    def hospitals(self, n: int) -> dict[str, Any]:
        entries = []
        for i in range(n):
            oid, lid = self._id(), self._id()
            address = {"line": [f"{i + 1} Main St"], "city": "Boston", "state": "MA",
                       "postalCode": "02110", "country": "US"}
            org = {"resourceType": "Organization", "id": oid,
                   "meta": {"profile": [f"{US_CORE}organization"]},
                   "extension": [{"url": "http://synthetichealth.github.io/synthea/"
                                         "utilization-encounters-extension",
                                  "valueInteger": 10}],
                   "identifier": [{"system": SYNTHEA, "value": oid}], "active": True,
                   "type": [_concept("http://terminology.hl7.org/CodeSystem/organization-type",
                                     "prov", "Healthcare Provider")],
                   "name": f"HOSPITAL {i}", "telecom": [{"system": "phone", "value": "5088287000"}],
                   "address": [address]}
            loc = {"resourceType": "Location", "id": lid,
                   "meta": {"profile": [f"{US_CORE}location"]},
                   "identifier": [{"system": SYNTHEA, "value": lid}], "status": "active",
                   "name": f"HOSPITAL {i}", "address": address,
                   "position": {"longitude": -71.05, "latitude": 42.36},
                   "managingOrganization": {"reference": f"Organization?identifier={SYNTHEA}|{oid}",
                                            "display": f"HOSPITAL {i}"}}
            self.organizations.append(org)
            self.locations.append(loc)
            entries += [_entry(org, f"identifier={SYNTHEA}|{oid}"),
                        _entry(loc, f"identifier={SYNTHEA}|{lid}")]
        return _bundle(entries)

    def practitioners(self, n: int) -> dict[str, Any]:
        entries = []
        for i in range(n):
            npi = str(self.rng.randrange(10**9, 10**10))  # ten digits, as NPIs have
            while npi in self.npis:
                npi = str(int(npi) + 1)
            self.npis.append(npi)
            org, loc = self.rng.choice(self.organizations), self.rng.choice(self.locations)
            practitioner = {
                "resourceType": "Practitioner", "id": self._id(),
                "meta": {"profile": [f"{US_CORE}practitioner"]},
                "identifier": [{"system": NPI, "value": npi}], "active": True,
                "name": [{"family": f"Nienow{i}", "given": ["Alphonso"], "prefix": ["Dr."]}],
                "telecom": [{"extension": [{"url": f"{US_CORE}direct", "valueBoolean": True}],
                             "system": "email", "value": f"alphonso{i}@example.com",
                             "use": "work"}],
                "gender": "male"}
            role = {
                "resourceType": "PractitionerRole", "id": self._id(),
                "meta": {"profile": [f"{US_CORE}practitionerrole"]},
                "practitioner": {"identifier": {"system": NPI, "value": npi},
                                 "display": f"Dr. Alphonso Nienow{i}"},
                "organization": {"identifier": {"system": SYNTHEA, "value": org["id"]},
                                 "display": org["name"]},
                "code": [_concept("http://nucc.org/provider-taxonomy", "208D00000X",
                                  "General Practice")],
                "location": [{"identifier": {"system": SYNTHEA, "value": loc["id"]},
                              "display": loc["name"]}]}
            entries += [_entry(practitioner, f"identifier={NPI}|{npi}"), _entry(role)]
        return _bundle(entries)

    def patient(self, encounters: int) -> dict[str, Any]:
        """A patient's Bundle (after :meth:`hospitals` and :meth:`practitioners`)."""
        pid = self._id()
        subject = {"reference": f"urn:uuid:{pid}"}
        entries = [_entry({
            "resourceType": "Patient", "id": pid, "meta": {"profile": [f"{US_CORE}patient"]},
            "text": {"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">'
                     'Generated by <a href="https://github.com/synthetichealth/synthea">'
                     "Synthea</a>.</div>"},
            "extension": [
                {"url": f"{US_CORE}race", "extension": [
                    {"url": "ombCategory", "valueCoding": {
                        "system": "urn:oid:2.16.840.1.113883.6.238", "code": "2106-3",
                        "display": "White"}},
                    {"url": "text", "valueString": "White"}]},
                {"url": "http://hl7.org/fhir/StructureDefinition/patient-birthPlace",
                 "valueAddress": {"city": "Wayland", "state": "Massachusetts", "country": "US"}},
                {"url": "http://synthetichealth.github.io/synthea/"
                        "disability-adjusted-life-years", "valueDecimal": 2.0028929627142285}],
            "identifier": [
                {"system": SYNTHEA, "value": pid},
                {"type": _concept("http://terminology.hl7.org/CodeSystem/v2-0203", "MR",
                                  "Medical Record Number"),
                 "system": "http://hospital.smarthealthit.org", "value": pid}],
            "name": [{"use": "official", "family": f"Gerlach{self.rng.randrange(1000)}",
                      "given": [f"Lindsay{self.rng.randrange(1000)}"], "prefix": ["Mr."]}],
            "telecom": [{"system": "phone", "value": "555-450-5873", "use": "home"}],
            "gender": self.rng.choice(["male", "female"]), "birthDate": "1950-10-24",
            "address": [{"extension": [{
                "url": "http://hl7.org/fhir/StructureDefinition/geolocation", "extension": [
                    {"url": "latitude", "valueDecimal": 42.167344139459686},
                    {"url": "longitude", "valueDecimal": -71.07262371813607}]}],
                "line": ["690 Raynor Overpass"], "city": "Randolph", "state": "MA",
                "country": "US"}],
            "maritalStatus": _concept("http://terminology.hl7.org/CodeSystem/v3-MaritalStatus",
                                      "M", "M"),
            "multipleBirthBoolean": False})]
        for k in range(encounters):
            entries += self._encounter(k, subject)
        entries.append(_entry({
            "resourceType": "Provenance", "id": self._id(),
            "target": [{"reference": e["fullUrl"]} for e in entries],
            "recorded": "2024-01-01T00:00:00.000-05:00",
            "agent": [{"type": _concept(
                "http://terminology.hl7.org/CodeSystem/provenance-participant-type", role,
                role.title()),
                "who": {"reference": f"Practitioner?identifier={NPI}|{self.npis[0]}"},
                "onBehalfOf": {"reference": f"Organization?identifier={SYNTHEA}|"
                                            f"{self.organizations[0]['id']}"}}
                for role in ("author", "transmitter")]}))
        return _bundle(entries)

    def _encounter(self, k: int, subject: dict[str, str]) -> list[dict[str, Any]]:
        eid, cid, claim_id = self._id(), self._id(), self._id()
        encounter = {"reference": f"urn:uuid:{eid}"}
        practitioner = {"reference": f"Practitioner?identifier={NPI}|{self.rng.choice(self.npis)}"}
        org = {"reference": f"Organization?identifier={SYNTHEA}|"
                            f"{self.rng.choice(self.organizations)['id']}"}
        loc = {"reference": f"Location?identifier={SYNTHEA}|"
                            f"{self.rng.choice(self.locations)['id']}"}
        start = f"{1980 + k % 40}-{1 + k % 12:02d}-{1 + k % 28:02d}T11:44:52-05:00"
        end = start.replace("11:44", "11:59")
        note = base64.b64encode(("Patient is presenting with anemia. " * 30).encode()).decode()
        vital = _concept("http://terminology.hl7.org/CodeSystem/observation-category",
                         "vital-signs", "vital-signs")
        resources: list[Resource] = [
            {"resourceType": "Encounter", "id": eid,
             "identifier": [{"use": "official", "system": SYNTHEA, "value": eid}],
             "status": "finished",
             "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                       "code": "AMB"},
             "type": [_concept(SNOMED, "162673000", "General examination of patient")],
             "subject": subject,
             "participant": [{"period": {"start": start, "end": end},
                              "individual": practitioner}],
             "period": {"start": start, "end": end}, "location": [{"location": loc}],
             "serviceProvider": org},
            {"resourceType": "Condition", "id": cid,
             "clinicalStatus": {"coding": [{
                 "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                 "code": "active"}]},
             "verificationStatus": {"coding": [{
                 "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                 "code": "confirmed"}]},
             "code": _concept(SNOMED, "271737000", "Anemia (disorder)"), "subject": subject,
             "encounter": encounter, "onsetDateTime": start, "recordedDate": start},
            *({"resourceType": "Observation", "id": self._id(), "status": "final",
               "category": [vital], "code": _concept(LOINC, code, display), "subject": subject,
               "encounter": encounter, "effectiveDateTime": start,
               "issued": start.replace("-05:00", ".558-05:00"),
               "valueQuantity": {"value": round(self.rng.uniform(low, high), 1), "unit": unit,
                                 "system": UCUM, "code": unit}}
              for code, display, low, high, unit in (
                  ("8302-2", "Body Height", 150, 200, "cm"),
                  ("29463-7", "Body Weight", 50, 120, "kg"),
                  ("39156-5", "Body mass index", 18, 35, "kg/m2"),
                  ("8867-4", "Heart rate", 50, 110, "/min"))),
            {"resourceType": "Observation", "id": self._id(), "status": "final",
             "category": [vital], "code": _concept(LOINC, "85354-9", "Blood pressure panel"),
             "subject": subject, "encounter": encounter, "effectiveDateTime": start,
             "component": [
                 {"code": _concept(LOINC, code, display),
                  "valueQuantity": {"value": value, "unit": "mm[Hg]", "system": UCUM,
                                    "code": "mm[Hg]"}}
                 for code, display, value in (("8462-4", "Diastolic Blood Pressure", 80),
                                              ("8480-6", "Systolic Blood Pressure", 120))]},
            {"resourceType": "Immunization", "id": self._id(), "status": "completed",
             "vaccineCode": _concept("http://hl7.org/fhir/sid/cvx", "140", "Influenza"),
             "patient": subject, "encounter": encounter, "occurrenceDateTime": start,
             "primarySource": True, "location": loc},
            {"resourceType": "MedicationRequest", "id": self._id(), "status": "active",
             "intent": "order",
             "medicationCodeableConcept": _concept(
                 "http://www.nlm.nih.gov/research/umls/rxnorm", "2001499", "Vitamin B 12"),
             "subject": subject, "encounter": encounter, "authoredOn": start,
             "requester": practitioner},
            {"resourceType": "Procedure", "id": self._id(), "status": "completed",
             "code": _concept(SNOMED, "430193006", "Medication Reconciliation"),
             "subject": subject, "encounter": encounter,
             "performedPeriod": {"start": start, "end": end}, "location": loc},
            {"resourceType": "DiagnosticReport", "id": self._id(), "status": "final",
             "code": _concept(LOINC, "34117-2", "History and physical note"),
             "subject": subject, "encounter": encounter, "effectiveDateTime": start,
             "issued": start.replace("-05:00", ".558-05:00"), "performer": [practitioner],
             "presentedForm": [{"contentType": "text/plain; charset=utf-8", "data": note}]},
            {"resourceType": "DocumentReference", "id": self._id(), "status": "superseded",
             "identifier": [{"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{self._id()}"}],
             "type": _concept(LOINC, "34117-2", "History and physical note"),
             "subject": subject, "date": start.replace("-05:00", ".558-05:00"),
             "author": [practitioner], "custodian": org,
             "content": [{"attachment": {"contentType": "text/plain; charset=utf-8",
                                         "data": note}}],
             "context": {"encounter": [encounter], "period": {"start": start, "end": end}}},
            {"resourceType": "Claim", "id": claim_id, "status": "active",
             "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/claim-type",
                                  "code": "institutional"}]},
             "use": "claim", "patient": subject, "billablePeriod": {"start": start, "end": end},
             "created": end, "provider": org, "facility": loc,
             "priority": {"coding": [{
                 "system": "http://terminology.hl7.org/CodeSystem/processpriority",
                 "code": "normal"}]},
             "diagnosis": [{"sequence": 1,
                            "diagnosisReference": {"reference": f"urn:uuid:{cid}"}}],
             "insurance": [{"sequence": 1, "focal": True, "coverage": {"display": "Humana"}}],
             "item": [{"sequence": 1, "encounter": [encounter], "productOrService": _concept(
                 SNOMED, "162673000", "General examination of patient")}],
             "total": {"value": 129.16, "currency": "USD"}},
            {"resourceType": "ExplanationOfBenefit", "id": self._id(),
             "contained": [
                 {"resourceType": "ServiceRequest", "id": "referral", "status": "completed",
                  "intent": "order", "subject": subject, "requester": practitioner},
                 {"resourceType": "Coverage", "id": "coverage", "status": "active",
                  "type": {"text": "Humana"}, "beneficiary": subject,
                  "payor": [{"display": "Humana"}]}],
             "identifier": [{"system": "https://bluebutton.cms.gov/resources/variables/clm_id",
                             "value": claim_id}],
             "status": "active",
             "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/claim-type",
                                  "code": "institutional"}]},
             "use": "claim", "patient": subject, "billablePeriod": {"start": end, "end": end},
             "created": end, "insurer": {"display": "Humana"}, "provider": practitioner,
             "referral": {"reference": "#referral"}, "facility": loc,
             "claim": {"reference": f"urn:uuid:{claim_id}"}, "outcome": "complete",
             "careTeam": [{"sequence": 1, "provider": practitioner}],
             "insurance": [{"focal": True, "coverage": {"reference": "#coverage",
                                                         "display": "Humana"}}],
             "item": [{"sequence": 1, "encounter": [encounter], "productOrService": _concept(
                 SNOMED, "162673000", "General examination of patient")}],
             "total": [{"category": {"coding": [{
                 "system": "http://terminology.hl7.org/CodeSystem/adjudication",
                 "code": "submitted"}]}, "amount": {"value": 129.16, "currency": "USD"}}],
             "payment": {"amount": {"value": 0.0, "currency": "USD"}}},
        ]
        return [_entry(r) for r in resources]


def write(out: Path, patients: int, seed: int = 7) -> list[Path]:
    """The Bundles as files in ``out``, in the order to load them."""
    out.mkdir(parents=True, exist_ok=True)
    gen = Generator(seed)
    bundles = [("0-hospitals", gen.hospitals(max(2, patients // 15))),
               ("1-practitioners", gen.practitioners(max(3, patients // 6)))]
    bundles += [(f"2-patient-{n:05d}", gen.patient(10 + (n * 7) % 60))
                for n in range(patients)]
    paths = []
    for name, bundle in bundles:
        path = out / f"{name}.json"
        path.write_text(json.dumps(bundle))
        paths.append(path)
    return paths


def load(base: str, paths: list[Path]) -> None:
    started, resources = time.perf_counter(), 0
    with httpx.Client(timeout=600, headers={"Content-Type": "application/fhir+json"}) as client:
        for path in paths:
            t = time.perf_counter()
            answer = client.post(base, content=path.read_bytes())
            entries = len(answer.json().get("entry", [])) if answer.status_code == 200 else 0
            resources += entries
            print(json.dumps({"bundle": path.name, "status": answer.status_code,
                              "entries": entries,
                              "seconds": round(time.perf_counter() - t, 2)}), flush=True)
    print(json.dumps({"bundles": len(paths), "resources": resources,
                      "seconds": round(time.perf_counter() - started, 1)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the Bundles")
    parser.add_argument("--patients", type=int, default=300, help="patients (300)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--load", metavar="URL",
                        help="a FHIR base to post them to, e.g. http://127.0.0.1:8080/fhir")
    args = parser.parse_args()
    paths = write(args.out, args.patients, args.seed)
    if args.load:
        load(args.load, paths)


if __name__ == "__main__":
    main()
