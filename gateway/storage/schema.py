"""Database schema and its versioned migrations.

One schema serves SQLite and PostgreSQL; where the dialects differ the DDL
has a ``{…}`` placeholder filled per dialect. Migrations are numbered and
applied once each, under a lock (``BEGIN IMMEDIATE`` on SQLite, an advisory
transaction lock on PostgreSQL), so several processes may start at once.

Search index tables hold rows for the *current* version of each resource only:

=============  =============================================================
table          columns besides (res_type, res_id, param)
=============  =============================================================
sp_string      value (normalised: case-folded, accents stripped), exact
sp_token       system, code, display (normalised text for ``:text``)
sp_date        lo, hi (epoch microseconds, inclusive bounds)
sp_number      lo, hi
sp_quantity    system, code, unit, lo, hi
sp_reference   target_type, target_id, target_version, url, ident_system,
               ident_value
sp_uri         value
sp_composite   a_system, a_code (the first component, a token), then the
               second component's value in the columns of its own table
               (dates in dlo, dhi)
=============  =============================================================
"""

from __future__ import annotations

DIALECT_TYPES = {
    "sqlite": {"serial": "INTEGER PRIMARY KEY AUTOINCREMENT", "blob": "BLOB", "float": "REAL",
               # one writer at a time: outbox seq order is commit order already
               "txid": "0", "collate_c": ""},
    "postgresql": {"serial": "BIGSERIAL PRIMARY KEY", "blob": "BYTEA", "float": "DOUBLE PRECISION",
                   # the writing transaction's 64-bit id (see gateway/storage/outbox.py)
                   "txid": "(pg_current_xact_id()::text::bigint)", "collate_c": ' COLLATE "C"'},
}

INDEX_TABLES: dict[str, tuple[str, ...]] = {
    "sp_string": ("value", "exact"),
    "sp_token": ("system", "code", "display"),
    "sp_date": ("lo", "hi"),
    "sp_number": ("lo", "hi"),
    "sp_quantity": ("system", "code", "unit", "lo", "hi"),
    "sp_reference": (
        "target_type", "target_id", "target_version", "url", "ident_system", "ident_value",
    ),
    "sp_uri": ("value",),
    # derived by gateway.security: one row per Consent provision (param "consent")
    "sp_consent": ("patient_id", "actor", "purpose", "weight", "lo", "hi"),
    # composite parameters (gateway.fhir.indexer.COMPOSITE_COLUMNS after a_system, a_code)
    "sp_composite": (
        "a_system", "a_code", "system", "code", "unit", "lo", "hi", "dlo", "dhi", "value",
        "exact", "target_type", "target_id", "target_version", "url", "ident_system",
        "ident_value",
    ),
    # positions (Location near): latitude and longitude in degrees
    "sp_coords": ("lat", "lon"),
}

_V1 = """
CREATE TABLE IF NOT EXISTS resource (
    res_type TEXT NOT NULL,
    res_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    last_updated BIGINT NOT NULL,
    deleted SMALLINT NOT NULL DEFAULT 0,
    content {blob},
    created_seq BIGINT NOT NULL,
    PRIMARY KEY (res_type, res_id)
);
CREATE INDEX IF NOT EXISTS resource_type_created ON resource (res_type, created_seq);
CREATE INDEX IF NOT EXISTS resource_type_updated ON resource (res_type, last_updated);
CREATE TABLE IF NOT EXISTS resource_history (
    seq {serial},
    res_type TEXT NOT NULL,
    res_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    last_updated BIGINT NOT NULL,
    method TEXT NOT NULL,
    content {blob},
    UNIQUE (res_type, res_id, version)
);
CREATE INDEX IF NOT EXISTS history_type ON resource_history (res_type, seq);
CREATE TABLE IF NOT EXISTS outbox (
    seq {serial},
    event_id TEXT NOT NULL UNIQUE,
    res_type TEXT NOT NULL,
    res_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    interaction TEXT NOT NULL,
    ts BIGINT NOT NULL,
    history_seq BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS search_snapshot (
    search_id TEXT PRIMARY KEY,
    created BIGINT NOT NULL,
    query TEXT NOT NULL,
    total INTEGER NOT NULL,
    truncated SMALLINT NOT NULL DEFAULT 0,
    ids {blob} NOT NULL
);
CREATE TABLE IF NOT EXISTS sp_string (
    res_type TEXT NOT NULL, res_id TEXT NOT NULL, param TEXT NOT NULL,
    value TEXT, exact TEXT
);
CREATE INDEX IF NOT EXISTS sp_string_value ON sp_string (res_type, param, value);
CREATE INDEX IF NOT EXISTS sp_string_res ON sp_string (res_type, res_id);
CREATE TABLE IF NOT EXISTS sp_token (
    res_type TEXT NOT NULL, res_id TEXT NOT NULL, param TEXT NOT NULL,
    system TEXT, code TEXT, display TEXT
);
CREATE INDEX IF NOT EXISTS sp_token_code ON sp_token (res_type, param, code, system);
CREATE INDEX IF NOT EXISTS sp_token_res ON sp_token (res_type, res_id);
CREATE TABLE IF NOT EXISTS sp_date (
    res_type TEXT NOT NULL, res_id TEXT NOT NULL, param TEXT NOT NULL,
    lo BIGINT NOT NULL, hi BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS sp_date_lo ON sp_date (res_type, param, lo);
CREATE INDEX IF NOT EXISTS sp_date_hi ON sp_date (res_type, param, hi);
CREATE INDEX IF NOT EXISTS sp_date_res ON sp_date (res_type, res_id);
CREATE TABLE IF NOT EXISTS sp_number (
    res_type TEXT NOT NULL, res_id TEXT NOT NULL, param TEXT NOT NULL,
    lo {float} NOT NULL, hi {float} NOT NULL
);
CREATE INDEX IF NOT EXISTS sp_number_lo ON sp_number (res_type, param, lo);
CREATE INDEX IF NOT EXISTS sp_number_res ON sp_number (res_type, res_id);
CREATE TABLE IF NOT EXISTS sp_quantity (
    res_type TEXT NOT NULL, res_id TEXT NOT NULL, param TEXT NOT NULL,
    system TEXT, code TEXT, unit TEXT, lo {float} NOT NULL, hi {float} NOT NULL
);
CREATE INDEX IF NOT EXISTS sp_quantity_lo ON sp_quantity (res_type, param, lo);
CREATE INDEX IF NOT EXISTS sp_quantity_res ON sp_quantity (res_type, res_id);
CREATE TABLE IF NOT EXISTS sp_reference (
    res_type TEXT NOT NULL, res_id TEXT NOT NULL, param TEXT NOT NULL,
    target_type TEXT, target_id TEXT, target_version TEXT, url TEXT,
    ident_system TEXT, ident_value TEXT
);
CREATE INDEX IF NOT EXISTS sp_reference_target ON sp_reference (target_id, target_type, param);
CREATE INDEX IF NOT EXISTS sp_reference_url ON sp_reference (res_type, param, url);
CREATE INDEX IF NOT EXISTS sp_reference_ident ON sp_reference (res_type, param, ident_value);
CREATE INDEX IF NOT EXISTS sp_reference_res ON sp_reference (res_type, res_id);
CREATE TABLE IF NOT EXISTS sp_uri (
    res_type TEXT NOT NULL, res_id TEXT NOT NULL, param TEXT NOT NULL, value TEXT
);
CREATE INDEX IF NOT EXISTS sp_uri_value ON sp_uri (res_type, param, value);
CREATE INDEX IF NOT EXISTS sp_uri_res ON sp_uri (res_type, res_id);
"""

_V10 = """
CREATE TABLE IF NOT EXISTS auth_client (
    client_id TEXT PRIMARY KEY,
    organization TEXT NOT NULL,
    jwks TEXT NOT NULL,
    jwks_url TEXT,
    scope TEXT NOT NULL,
    created BIGINT NOT NULL,
    active SMALLINT NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS auth_jti (
    jti TEXT PRIMARY KEY,
    client_id TEXT NOT NULL,
    expires BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS auth_jti_expires ON auth_jti (expires);
CREATE TABLE IF NOT EXISTS auth_key (
    kid TEXT PRIMARY KEY,
    private_pem TEXT NOT NULL,
    created BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_log (
    seq {serial},
    recorded BIGINT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    client_id TEXT,
    patient TEXT,
    outcome TEXT NOT NULL,
    record {blob} NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_log_patient ON audit_log (patient);
CREATE TABLE IF NOT EXISTS resource_creator (
    res_type TEXT NOT NULL,
    res_id TEXT NOT NULL,
    organization TEXT NOT NULL,
    PRIMARY KEY (res_type, res_id)
);
CREATE INDEX IF NOT EXISTS resource_creator_org ON resource_creator (organization, res_type);
CREATE TABLE IF NOT EXISTS sp_consent (
    res_type TEXT NOT NULL, res_id TEXT NOT NULL, param TEXT NOT NULL,
    patient_id TEXT NOT NULL, actor TEXT NOT NULL, purpose TEXT NOT NULL,
    weight INTEGER NOT NULL, lo BIGINT NOT NULL, hi BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS sp_consent_patient ON sp_consent (patient_id, actor);
CREATE INDEX IF NOT EXISTS sp_consent_res ON sp_consent (res_type, res_id)
"""

# Outbox rows are read in (tx_id, seq) order; positions of the relay and of
# each consumer group are kept in event_position (gateway/storage/outbox.py).
# subscription_state holds one row per Subscription resource, subscription_event
# one row per (subscription, event number) (gateway/storage/subscription_tables.py).
_V2 = """
ALTER TABLE outbox ADD COLUMN tx_id BIGINT NOT NULL DEFAULT {txid};
CREATE INDEX IF NOT EXISTS outbox_position ON outbox (tx_id, seq);
CREATE TABLE IF NOT EXISTS event_position (
    name TEXT PRIMARY KEY,
    tx_id BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    epoch TEXT,
    updated BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS subscription_state (
    id TEXT PRIMARY KEY,
    resource_version INTEGER NOT NULL,
    resource_status TEXT NOT NULL,
    topic TEXT NOT NULL,
    channel TEXT NOT NULL,
    status TEXT NOT NULL,
    config {blob} NOT NULL,
    heartbeat INTEGER NOT NULL DEFAULT 0,
    end_at BIGINT NOT NULL DEFAULT 0,
    events_since_start BIGINT NOT NULL DEFAULT 0,
    delivered_number BIGINT NOT NULL DEFAULT 0,
    handshake_pending SMALLINT NOT NULL DEFAULT 0,
    resend_from BIGINT,
    resend_to BIGINT,
    next_attempt BIGINT NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    failing_since BIGINT,
    last_error TEXT,
    last_sent BIGINT NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_until BIGINT NOT NULL DEFAULT 0,
    created BIGINT NOT NULL,
    updated BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS subscription_state_topic ON subscription_state (topic, status);
CREATE TABLE IF NOT EXISTS subscription_event (
    subscription_id TEXT NOT NULL,
    event_number BIGINT NOT NULL,
    event_id TEXT NOT NULL,
    res_type TEXT NOT NULL,
    res_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    interaction TEXT NOT NULL,
    ts BIGINT NOT NULL,
    PRIMARY KEY (subscription_id, event_number),
    UNIQUE (subscription_id, event_id)
);
CREATE TABLE IF NOT EXISTS subscription_ws_token (
    token_hash TEXT PRIMARY KEY,
    subscriptions TEXT NOT NULL,
    expires BIGINT NOT NULL
)
"""

_V11 = """
ALTER TABLE audit_log ADD COLUMN tx_id BIGINT NOT NULL DEFAULT {txid};
CREATE INDEX IF NOT EXISTS audit_log_position ON audit_log (tx_id, seq);
CREATE TABLE IF NOT EXISTS audit_chain (
    pos BIGINT PRIMARY KEY,
    tx_id BIGINT NOT NULL,
    seq BIGINT NOT NULL UNIQUE,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
INSERT INTO audit_chain (pos, tx_id, seq, prev_hash, hash)
    SELECT seq, tx_id, seq, prev_hash, hash FROM audit_log;
ALTER TABLE audit_log DROP COLUMN prev_hash;
ALTER TABLE audit_log DROP COLUMN hash
"""

_V20 = """
CREATE INDEX IF NOT EXISTS sp_string_prefix ON sp_string (res_type, param, value{collate_c})
"""

_V21 = """
DROP INDEX IF EXISTS sp_string_value;
DROP INDEX IF EXISTS sp_reference_url;
CREATE INDEX IF NOT EXISTS sp_reference_url_set ON sp_reference (res_type, param, url)
    WHERE url IS NOT NULL;
DROP INDEX IF EXISTS sp_reference_ident;
CREATE INDEX IF NOT EXISTS sp_reference_ident_set ON sp_reference (res_type, param, ident_value)
    WHERE ident_value IS NOT NULL OR ident_system IS NOT NULL
"""

_V22 = """
UPDATE sp_reference SET target_type = NULL, target_id = NULL, target_version = NULL
    WHERE url IS NOT NULL AND target_id IS NOT NULL
"""

_V23 = """
CREATE TABLE IF NOT EXISTS sp_composite (
    res_type TEXT NOT NULL, res_id TEXT NOT NULL, param TEXT NOT NULL,
    a_system TEXT, a_code TEXT,
    system TEXT, code TEXT, unit TEXT, lo {float}, hi {float}, dlo BIGINT, dhi BIGINT,
    value TEXT, exact TEXT, target_type TEXT, target_id TEXT, target_version TEXT, url TEXT,
    ident_system TEXT, ident_value TEXT
);
CREATE INDEX IF NOT EXISTS sp_composite_code ON sp_composite (res_type, param, a_code, a_system);
CREATE INDEX IF NOT EXISTS sp_composite_res ON sp_composite (res_type, res_id)
"""

# rows of the parameters answered by other parameters' rows (SearchParam.stored_as)
_V24 = """
DELETE FROM sp_string WHERE res_type IN ('Patient', 'Person', 'Practitioner', 'RelatedPerson')
    AND param = 'phonetic';
DELETE FROM sp_string WHERE res_type = 'Observation'
    AND param IN ('gene-amino-acid-change', 'gene-dnavariant');
DELETE FROM sp_token WHERE res_type = 'Observation'
    AND param IN ('combo-code', 'combo-data-absent-reason', 'combo-value-concept');
DELETE FROM sp_token WHERE res_type = 'CapabilityStatement' AND param = 'fhirversion';
DELETE FROM sp_quantity WHERE res_type = 'Observation' AND param = 'combo-value-quantity';
DELETE FROM sp_composite WHERE res_type = 'Observation'
    AND param IN ('combo-code-value-concept', 'combo-code-value-quantity');
DELETE FROM sp_uri WHERE res_type = 'CodeSystem' AND param = 'system'
"""

# a search's snapshot may hold the head of its result only; the rest is read when a
# page beyond it is asked for
_V25 = """
ALTER TABLE search_snapshot ADD COLUMN complete SMALLINT NOT NULL DEFAULT 1
"""

# the last stored version when such a search began: reading on finds only what
# was created by then
_V26 = """
ALTER TABLE search_snapshot ADD COLUMN bound BIGINT
"""

# positions, for Location near: a latitude range is scanned, then the distance computed
_V27 = """
CREATE TABLE IF NOT EXISTS sp_coords (
    res_type TEXT NOT NULL, res_id TEXT NOT NULL, param TEXT NOT NULL,
    lat {float} NOT NULL, lon {float} NOT NULL
);
CREATE INDEX IF NOT EXISTS sp_coords_lat ON sp_coords (res_type, param, lat);
CREATE INDEX IF NOT EXISTS sp_coords_res ON sp_coords (res_type, res_id)
"""

# a kept result set in parts of SNAPSHOT_PART keys (gateway/storage/sql.py), so that a
# page reads one or two of them, not the whole list; ``held``: how many keys are kept
# (NULL: a set kept before, whole in ``ids``). ``created`` is where expiry looks.
_V29 = """
CREATE TABLE IF NOT EXISTS search_snapshot_part (
    search_id TEXT NOT NULL,
    part INTEGER NOT NULL,
    ids {blob} NOT NULL,
    PRIMARY KEY (search_id, part)
);
ALTER TABLE search_snapshot ADD COLUMN held INTEGER;
CREATE INDEX IF NOT EXISTS search_snapshot_created ON search_snapshot (created)
"""

# versions by when they were written: a poll for what changed since a moment
# (``_history?_since=``) reads what changed, not every version stored (SqlStore.history).
# Without it, one that found nothing new walked all 166,696 versions of a
# Synthea-shaped load (133 ms on PostgreSQL), and ever more as the server fills.
_V30 = """
CREATE INDEX IF NOT EXISTS history_updated ON resource_history (last_updated, seq)
"""

#: (version, description, DDL template). Append only; never edit a released step.
#: Versions 2-9 belong to events/subscriptions, 10-19 to security, 20-29 and 30 on to
#: the core store. 28 is not used: a development build took it for statistics objects
#: that were not kept.
MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (1, "resources, history, outbox, search index", _V1),
    (2, "events: outbox transaction ids, relay/consumer positions; subscriptions", _V2),
    (10, "security: clients, token replay, signing keys, audit log, consent index", _V10),
    (11, "security: audit records chained after commit (audit_chain)", _V11),
    (20, "search: starts-with index in code point order", _V20),
    (21, "search: fewer index entries per write (no second string index; reference url and"
         " identifier indexes only where set)", _V21),
    (22, "search: an absolute reference names a resource elsewhere, not a local one", _V22),
    (23, "search: composite parameters (sp_composite; `carepath reindex` fills it for"
         " resources stored before)", _V23),
    (24, "search: no rows for parameters that repeat others' (phonetic, combo-*)", _V24),
    (25, "search: snapshots of a result's head, completed when paged beyond", _V25),
    (26, "search: what a snapshot's rest may hold (created by its first page)", _V26),
    (27, "search: positions for Location near (sp_coords; `carepath reindex Location` fills"
         " it for Locations stored before)", _V27),
    (29, "search: kept result sets in parts; snapshots expire by an index", _V29),
    (30, "history: versions by when they were written, for _since", _V30),
)


def statements(ddl: str, dialect: str) -> list[str]:
    text = ddl.format(**DIALECT_TYPES[dialect])
    return [s.strip() for s in text.split(";") if s.strip()]
