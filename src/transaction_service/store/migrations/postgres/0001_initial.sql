-- The PostgreSQL schema: the same tables and meaning as SQLite's (see migrations/sqlite), with
-- PostgreSQL types. Several replicas share it.

-- Revision counter and compaction point. `head_revision` is bumped by the number of changes as
-- the last step of each write, so revisions are contiguous and assigned in commit order (a
-- sequence would assign them at insert time, and a reader tailing by revision could skip a
-- transaction that commits late).
CREATE TABLE meta (
    key   text   PRIMARY KEY,
    value bigint NOT NULL
);
INSERT INTO meta (key, value) VALUES
    ('head_revision', 0),
    ('compacted_revision', 0),
    ('write_probe', 0);

-- Every delivery ever accepted: the dedupe key, the audit trail and the replay source.
CREATE TABLE events (
    seq            bigserial   PRIMARY KEY,      -- arrival order (not a revision)
    event_id       text        NOT NULL UNIQUE,
    event_type     text        NOT NULL,
    source         text        NOT NULL DEFAULT 'grpc',
    body_format    text        NOT NULL CHECK (body_format IN ('json', 'struct')),
    body           bytea,                        -- NULL once erased by the body retention
    digest         text        NOT NULL,
    order_id       text,
    transaction_id text,
    outcome        text        NOT NULL,
    revision       bigint,
    received_at    timestamptz NOT NULL
);
CREATE INDEX events_by_order ON events (order_id) WHERE order_id IS NOT NULL;
CREATE INDEX events_body_by_time ON events (received_at) WHERE body IS NOT NULL;

-- Current state of each transaction: the merged knowledge and the view derived from it (JSON
-- text, written and read as the service serialises it).
CREATE TABLE transactions (
    id         text        PRIMARY KEY,
    revision   bigint      NOT NULL UNIQUE,
    status     text        NOT NULL,
    team_id    text        NOT NULL,
    user_id    text        NOT NULL,
    updated_at timestamptz,
    knowledge  text        NOT NULL,
    view       text        NOT NULL
);
CREATE INDEX transactions_by_status ON transactions (status, revision);
CREATE INDEX transactions_by_team ON transactions (team_id, revision);
CREATE INDEX transactions_by_user ON transactions (user_id, revision);

-- Which transaction each known order belongs to.
CREATE TABLE order_transactions (
    order_id       text PRIMARY KEY,
    transaction_id text NOT NULL
);
CREATE INDEX order_transactions_by_transaction ON order_transactions (transaction_id);

-- The change log: one row per state change, numbered by the revision.
CREATE TABLE changes (
    revision       bigint      PRIMARY KEY,
    transaction_id text        NOT NULL,
    event_id       text        NOT NULL,
    order_id       text,
    kinds          text        NOT NULL,
    view           text        NOT NULL,
    recorded_at    timestamptz NOT NULL,
    merged         text
);
CREATE INDEX changes_by_transaction ON changes (transaction_id, revision);
CREATE INDEX changes_by_time ON changes (recorded_at);
