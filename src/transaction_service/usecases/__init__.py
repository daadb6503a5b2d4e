"""The use cases: what the service does, between the transports (`api/`, `http/`, `cli/`) and the
store (`store/`). Ingest plans and commits deliveries; the watch hub fans committed changes out;
results, reconcile and rebuild are the other writers."""
