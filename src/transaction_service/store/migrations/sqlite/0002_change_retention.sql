-- Trimming the change log by age looks up the newest change older than the retention window.
CREATE INDEX changes_by_time ON changes (recorded_at);
