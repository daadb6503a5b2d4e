"""Rewrite the metrics table of docs/observability.md from the metrics' declarations
(metrics.metrics_table).

Run after adding or changing a metric: `.venv/bin/python scripts/docs_metrics.py`. The tests
check that the table is what this writes.
"""

from __future__ import annotations

from pathlib import Path

from transaction_service.metrics import metrics_table

DOC = Path(__file__).resolve().parent.parent / "docs" / "observability.md"
HEADER = "| metric | type | labels | what |"


def main() -> None:
    text = DOC.read_text()
    start = text.index(HEADER)
    end = text.find("\n\n", start)
    DOC.write_text(text[:start] + metrics_table() + (text[end:] if end != -1 else "\n"))


if __name__ == "__main__":
    main()
