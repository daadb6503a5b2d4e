-- The trace of the delivery that caused each change (W3C ids in hex), so that every watcher,
-- on any replica and when replaying the log, gets it with the change. NULL: not traced.
ALTER TABLE changes ADD COLUMN trace_id text;
ALTER TABLE changes ADD COLUMN span_id text;
