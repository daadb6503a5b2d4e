-- Every delivery ever accepted, verbatim: the dedupe key, the audit trail and the replay source.
CREATE TABLE events (
    seq            INTEGER PRIMARY KEY,          -- arrival order
    event_id       TEXT    NOT NULL UNIQUE,      -- svix-id, or "sha256:<digest>" when none was given
    event_type     TEXT    NOT NULL,
    body_format    TEXT    NOT NULL CHECK (body_format IN ('json', 'struct')),
    body           BLOB    NOT NULL,             -- raw bytes for 'json'; canonical JSON for 'struct'
    digest         TEXT    NOT NULL,             -- sha256 of the body's canonical JSON
    order_id       TEXT,                         -- data.id of order events
    transaction_id TEXT,                         -- the transaction it was merged into
    outcome        TEXT    NOT NULL,             -- applied | stale | ignored
    revision       INTEGER,                      -- the change it made, if applied
    received_at    TEXT    NOT NULL
);
CREATE INDEX events_by_order ON events (order_id) WHERE order_id IS NOT NULL;

-- Current state of each transaction: the merged knowledge and the view derived from it.
CREATE TABLE transactions (
    id         TEXT    PRIMARY KEY,
    revision   INTEGER NOT NULL UNIQUE,          -- revision of its last change
    status     TEXT    NOT NULL,
    team_id    TEXT    NOT NULL,
    user_id    TEXT    NOT NULL,
    updated_at TEXT,                             -- provider time, ISO 8601 UTC, sortable as text
    knowledge  TEXT    NOT NULL,                 -- JSON of domain.state.Knowledge
    view       TEXT    NOT NULL                  -- JSON of domain.state.TransactionView
);
CREATE INDEX transactions_by_status ON transactions (status, revision);
CREATE INDEX transactions_by_team ON transactions (team_id, revision);
CREATE INDEX transactions_by_user ON transactions (user_id, revision);

-- Which transaction each known order belongs to.
CREATE TABLE order_transactions (
    order_id       TEXT PRIMARY KEY,
    transaction_id TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX order_transactions_by_transaction ON order_transactions (transaction_id);

-- The change log: one row per state change, numbered by the global revision. AUTOINCREMENT keeps
-- revisions strictly increasing even after old rows are trimmed.
CREATE TABLE changes (
    revision       INTEGER PRIMARY KEY AUTOINCREMENT,
    transaction_id TEXT    NOT NULL,
    event_id       TEXT    NOT NULL,
    order_id       TEXT,
    kinds          TEXT    NOT NULL,             -- comma-separated domain.state.ChangeKind values
    view           TEXT    NOT NULL,             -- the transaction's view after the change
    recorded_at    TEXT    NOT NULL
);
CREATE INDEX changes_by_transaction ON changes (transaction_id, revision);
