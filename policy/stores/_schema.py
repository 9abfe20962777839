"""The tables and indexes both stores create, written once, and their version
(``SCHEMA_VERSION``, one for both stores).

``schema_sql(dialect)`` is the DDL of ``"sqlite"`` or ``"postgres"``: the same statements,
with each column's type and the two idempotent inserts in that dialect. Times are ISO text
in SQLite (fixed width UTC, so text order is time order) and ``timestamptz`` in PostgreSQL;
JSON is text in SQLite and ``jsonb`` in PostgreSQL. Every statement may run again on an
existing database (``IF NOT EXISTS``, inserts that skip a held row); changes to existing
tables are each store's migration (``_migrate`` / ``_init_schema``).
"""
from __future__ import annotations

from typing import Literal

from ._sql import OPEN_SCOPE_INDEX

Dialect = Literal["sqlite", "postgres"]

#: The schema this program writes and understands; a store at a higher version is refused.
#: Bump it when the schema changes, and teach both stores' migrations the step.
SCHEMA_VERSION = 3

_TYPES: dict[str, dict[str, str]] = {
    "sqlite": {"text": "TEXT", "integer": "INTEGER", "bigint": "INTEGER", "ts": "TEXT",
               "serial": "INTEGER PRIMARY KEY AUTOINCREMENT", "boolean": "INTEGER", "json": "TEXT",
               "insert": "INSERT OR IGNORE", "on_conflict_id": ""},
    "postgres": {"text": "text", "integer": "integer", "bigint": "bigint", "ts": "timestamptz",
                 "serial": "bigserial PRIMARY KEY", "boolean": "boolean", "json": "jsonb",
                 "insert": "INSERT", "on_conflict_id": " ON CONFLICT (id) DO NOTHING"},
}

_TEMPLATE = """
CREATE TABLE IF NOT EXISTS schema_version (version {integer} NOT NULL);
CREATE TABLE IF NOT EXISTS grants (
    principal  {text} NOT NULL,
    role       {text} NOT NULL CHECK (role IN ('engineer', 'contributor', 'security_oncall', 'auditor')),
    service    {text} NOT NULL DEFAULT '',
    expires_at {ts},
    source     {text} NOT NULL DEFAULT 'manual',
    PRIMARY KEY (principal, role, service)
);
CREATE TABLE IF NOT EXISTS grants_revision (
    id       {integer} PRIMARY KEY CHECK (id = 1),
    revision {bigint} NOT NULL
);
{insert} INTO grants_revision (id, revision) VALUES (1, 0){on_conflict_id};
-- Every grant change, by revision: what caches apply as deltas (policy.grant_delta).
-- The floor is the newest revision whose changes were pruned (the log reaches back to it).
CREATE TABLE IF NOT EXISTS grant_changes (
    seq        {serial},
    revision   {bigint} NOT NULL,
    deleted    {boolean} NOT NULL,
    principal  {text} NOT NULL,
    role       {text} NOT NULL,
    service    {text} NOT NULL,
    expires_at {ts},
    source     {text} NOT NULL
);
CREATE INDEX IF NOT EXISTS grant_changes_revision ON grant_changes (revision);
-- What each sync source last wrote: its input's digest at a grants revision. Same input,
-- same revision: the sync has nothing to do and skips parsing (policy/sync.py).
CREATE TABLE IF NOT EXISTS sync_state (
    source   {text} PRIMARY KEY,
    digest   {text} NOT NULL,
    revision {bigint} NOT NULL
);
CREATE TABLE IF NOT EXISTS grant_changes_floor (
    id       {integer} PRIMARY KEY CHECK (id = 1),
    revision {bigint} NOT NULL
);
{insert} INTO grant_changes_floor (id, revision) SELECT 1, revision FROM grants_revision{on_conflict_id};
CREATE TABLE IF NOT EXISTS requests (
    seq                {serial},
    id                 {text} NOT NULL UNIQUE,
    requester          {text} NOT NULL,
    service            {text} NOT NULL,
    method             {text} NOT NULL,
    mode               {integer} NOT NULL,
    created_at         {ts} NOT NULL,
    expires_at         {ts} NOT NULL,
    approval_ttl_us    {bigint} NOT NULL,
    reason             {text} NOT NULL,
    incident           {text},
    body_sha256        {text},
    required_approvals {integer} NOT NULL,
    max_uses           {integer},
    uses               {integer} NOT NULL,
    state              {text} NOT NULL
                       CHECK (state IN ('pending', 'approved', 'rejected', 'cancelled', 'expired')),
    approvals          {json} NOT NULL,
    valid_until        {ts},
    closed_by          {text},
    closed_at          {ts},
    close_reason       {text} NOT NULL,
    origin             {text} NOT NULL
);
CREATE INDEX IF NOT EXISTS requests_scope ON requests (requester, service, method, state);
-- Every query the gateway and the approvals server run on a timer or per page view has
-- an index (tests/policy/test_query_plans.py fails on a full scan of requests):
-- "all"/state lists newest first, "my requests", and the expiry sweep (partial indexes:
-- only the few open rows are in them).
DROP INDEX IF EXISTS requests_created;
CREATE INDEX IF NOT EXISTS requests_created_seq ON requests (created_at, seq);
CREATE INDEX IF NOT EXISTS requests_state_created ON requests (state, created_at, seq);
-- "my requests" uses requests_scope's requester prefix: an index led by requester and
-- created_at would tempt the planner away from requests_scope on the gateway's lookup.
DROP INDEX IF EXISTS requests_requester_created;
CREATE INDEX IF NOT EXISTS requests_pending_expiry ON requests (expires_at) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS requests_approved_expiry ON requests (valid_until) WHERE state = 'approved';
-- requests_open_scope, the gateway's per-call lookup: _sql.OPEN_SCOPE_INDEX (added below).
-- What a body-bound request's call does, as the approver reads it (decoded, redacted, capped).
CREATE TABLE IF NOT EXISTS request_bodies (
    request_id {text} PRIMARY KEY,
    view       {text} NOT NULL
);
-- Approval uses spent by the gateway, one row per decision (the decision id of the Check
-- that spent it). A row 'voided' is a use given back (the Check was not answered allow) or
-- a tombstone that refuses a spend still in flight for that decision.
CREATE TABLE IF NOT EXISTS spends (
    decision_id {text} PRIMARY KEY,
    request_id  {text} NOT NULL,
    state       {text} NOT NULL CHECK (state IN ('spent', 'voided')),
    at          {ts} NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    seq        {serial},
    id         {text} NOT NULL UNIQUE,
    kind       {text} NOT NULL,
    actor      {text} NOT NULL,
    at         {ts} NOT NULL,
    request_id {text},
    service    {text},
    method     {text},
    outcome    {text},
    reason     {text} NOT NULL,
    detail     {json} NOT NULL,
    trace_id   {text}
);
CREATE INDEX IF NOT EXISTS audit_at ON audit (at);
CREATE INDEX IF NOT EXISTS audit_request ON audit (request_id);
"""


def schema_sql(dialect: Dialect) -> str:
    """The whole schema's DDL in ``dialect``, statements separated by ``;``."""
    return _TEMPLATE.format(**_TYPES[dialect]) + OPEN_SCOPE_INDEX + ";\n"
