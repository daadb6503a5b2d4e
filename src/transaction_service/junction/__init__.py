"""Junction's API: an async client (`client`), what its answers hold (`answers`), and how they
become webhook-shaped bodies for the one ingest path (`mapping`)."""
