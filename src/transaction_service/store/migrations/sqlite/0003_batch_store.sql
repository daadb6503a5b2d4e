-- Revisions become a backend-neutral contract: one counter row, bumped by the number of changes
-- as the last step of each write, and the compacted revision stored explicitly (it was derived
-- from sqlite_sequence and the oldest change kept).
CREATE TABLE meta (
    key   TEXT    PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO meta (key, value)
    VALUES ('head_revision', coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'changes'), 0));
INSERT INTO meta (key, value)
    VALUES ('compacted_revision', coalesce(
        (SELECT min(revision) - 1 FROM changes),
        (SELECT value FROM meta WHERE key = 'head_revision')));
-- Written by the store's health probe to find out whether writes work again.
INSERT INTO meta (key, value) VALUES ('write_probe', 0);

-- Legacy stand-ins folded into a real transaction by the change, with the "reported once" kinds
-- each had already reported: JSON {"<stand-in id>": ["transaction_completed", ...]}.
ALTER TABLE changes ADD COLUMN merged TEXT;

-- Events: where each came from (grpc, webhook, api), and bodies that can be erased after the
-- retention period (NULL body; the id, digest, outcome and revision stay for dedupe and audit).
CREATE TABLE events_new (
    seq            INTEGER PRIMARY KEY,
    event_id       TEXT    NOT NULL UNIQUE,
    event_type     TEXT    NOT NULL,
    source         TEXT    NOT NULL DEFAULT 'grpc',
    body_format    TEXT    NOT NULL CHECK (body_format IN ('json', 'struct')),
    body           BLOB,                         -- NULL once erased by the body retention
    digest         TEXT    NOT NULL,
    order_id       TEXT,
    transaction_id TEXT,
    outcome        TEXT    NOT NULL,
    revision       INTEGER,
    received_at    TEXT    NOT NULL
);
INSERT INTO events_new (seq, event_id, event_type, body_format, body, digest, order_id,
                        transaction_id, outcome, revision, received_at)
    SELECT seq, event_id, event_type, body_format, body, digest, order_id, transaction_id,
           outcome, revision, received_at
    FROM events;
DROP TABLE events;
ALTER TABLE events_new RENAME TO events;
CREATE INDEX events_by_order ON events (order_id) WHERE order_id IS NOT NULL;
-- Erasing bodies by age finds the bodies still kept, oldest first.
CREATE INDEX events_body_by_time ON events (received_at) WHERE body IS NOT NULL;
