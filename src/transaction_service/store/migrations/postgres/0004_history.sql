-- The delivery history and change diffs: the same columns and meaning as SQLite's migration 0005
-- (see there).
ALTER TABLE events
    ADD COLUMN reason                     text,
    ADD COLUMN provider_time              timestamptz,
    ADD COLUMN claimed_status             text,
    ADD COLUMN claimed_transaction_status text,
    ADD COLUMN duplicates                 integer NOT NULL DEFAULT 0,
    ADD COLUMN last_duplicate_at          timestamptz;
CREATE INDEX events_by_transaction ON events (transaction_id, seq)
    WHERE order_id IS NULL AND transaction_id IS NOT NULL;

ALTER TABLE changes ADD COLUMN diff text;
