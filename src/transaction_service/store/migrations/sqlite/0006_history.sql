-- The delivery history (ListTransactionEvents): each event's outcome is explained, in words, in
-- the commit that decided it; what the delivery claimed is kept apart from its body, so it
-- outlives the body retention; retries of an event id are counted on its row (DUPLICATE left no
-- trace before). Rows recorded before this migration have no reason and no claims.
ALTER TABLE events ADD COLUMN reason TEXT;
ALTER TABLE events ADD COLUMN provider_time TEXT;            -- the order's updated_at as sent
ALTER TABLE events ADD COLUMN claimed_status TEXT;           -- its newest status, HIGH.METHOD.LOW
ALTER TABLE events ADD COLUMN claimed_transaction_status TEXT;  -- its order_transaction.status
ALTER TABLE events ADD COLUMN duplicates INTEGER NOT NULL DEFAULT 0;  -- retries since
ALTER TABLE events ADD COLUMN last_duplicate_at TEXT;
-- Rows the service records itself (results fetches, rebuilds) name their transaction, not an
-- order: the history finds them by transaction.
CREATE INDEX events_by_transaction ON events (transaction_id)
    WHERE order_id IS NULL AND transaction_id IS NOT NULL;

-- Each change's diff (domain/diff.py, JSON): the fields it changed and their values before, so
-- a replay from the log says what the live change said. NULL for changes recorded before.
ALTER TABLE changes ADD COLUMN diff TEXT;
