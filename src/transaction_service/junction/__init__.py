"""Junction's API: an async client (`client`), what its answers hold (`answers`), the endpoints
it uses (`endpoints`), and how answers become webhook-shaped bodies for the one ingest path
(`mapping`)."""
