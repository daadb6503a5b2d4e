-- Combined results of order transactions, fetched from Junction's API once a transaction
-- completes (and again when results are corrected). Health data: the body is erased after the
-- body retention period; status, digest, time and revision stay.
CREATE TABLE transaction_results (
    transaction_id TEXT    PRIMARY KEY,
    status         TEXT    NOT NULL,             -- metadata.status: partial | final
    digest         TEXT    NOT NULL,             -- sha256 of the body
    body           BLOB,                         -- the provider's JSON as sent; NULL once erased
    fetched_at     TEXT    NOT NULL,
    revision       INTEGER NOT NULL              -- the RESULTS_READY change that reported them
) WITHOUT ROWID;
CREATE INDEX transaction_results_body_by_time ON transaction_results (fetched_at)
    WHERE body IS NOT NULL;

-- Results still to fetch: written in the commit of the change that asks for them (completed,
-- results corrected), cleared in the commit that stores them, so a restart picks them up again.
CREATE TABLE results_pending (
    transaction_id     TEXT    PRIMARY KEY,
    requested_revision INTEGER NOT NULL,         -- the change that asked; a newer one replaces it
    requested_at       TEXT    NOT NULL,
    attempts           INTEGER NOT NULL,         -- failed or partial fetches so far
    due_at             TEXT    NOT NULL,         -- next attempt (backoff)
    last_failure       TEXT    NOT NULL          -- a status line, never a body
) WITHOUT ROWID;
CREATE INDEX results_pending_by_due ON results_pending (due_at);

-- When the sweep (or a ReconcileTransaction call) last asked Junction about a transaction, so a
-- silent transaction is asked at most once per RECONCILE_AFTER_SECONDS.
CREATE TABLE reconcile_checks (
    transaction_id TEXT PRIMARY KEY,
    checked_at     TEXT NOT NULL
) WITHOUT ROWID;
-- The sweep looks for active transactions by their newest provider time.
CREATE INDEX transactions_by_status_time ON transactions (status, updated_at);
