-- Combined results, results still to fetch, and reconcile checks: the same tables and meaning as
-- SQLite's migration 0004 (see there).
CREATE TABLE transaction_results (
    transaction_id text        PRIMARY KEY,
    status         text        NOT NULL,
    digest         text        NOT NULL,
    body           bytea,
    fetched_at     timestamptz NOT NULL,
    revision       bigint      NOT NULL
);
CREATE INDEX transaction_results_body_by_time ON transaction_results (fetched_at)
    WHERE body IS NOT NULL;

CREATE TABLE results_pending (
    transaction_id     text        PRIMARY KEY,
    requested_revision bigint      NOT NULL,
    requested_at       timestamptz NOT NULL,
    attempts           integer     NOT NULL,
    due_at             timestamptz NOT NULL,
    last_failure       text        NOT NULL
);
CREATE INDEX results_pending_by_due ON results_pending (due_at);

CREATE TABLE reconcile_checks (
    transaction_id text        PRIMARY KEY,
    checked_at     timestamptz NOT NULL
);
CREATE INDEX transactions_by_status_time ON transactions (status, updated_at);
