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
=============  =============================================================
"""

from __future__ import annotations

DIALECT_TYPES = {
    "sqlite": {"serial": "INTEGER PRIMARY KEY AUTOINCREMENT", "blob": "BLOB", "float": "REAL"},
    "postgresql": {"serial": "BIGSERIAL PRIMARY KEY", "blob": "BYTEA", "float": "DOUBLE PRECISION"},
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

#: (version, description, DDL template). Append only; never edit a released step.
MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (1, "resources, history, outbox, search index", _V1),
)


def statements(ddl: str, dialect: str) -> list[str]:
    text = ddl.format(**DIALECT_TYPES[dialect])
    return [s.strip() for s in text.split(";") if s.strip()]
