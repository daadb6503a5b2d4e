"""Rewrite the settings table of docs/configuration.md from the settings' declarations
(config.settings_table).

Run after adding or changing a setting: `.venv/bin/python scripts/readme_settings.py`. The tests
check that the table is what this writes.
"""

from __future__ import annotations

from pathlib import Path

from transaction_service.config import settings_table

README = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
HEADER = "| variable | flag | default | meaning |"


def main() -> None:
    text = README.read_text()
    start = text.index(HEADER)
    end = text.find("\n\n", start)
    README.write_text(text[:start] + settings_table() + (text[end:] if end != -1 else "\n"))


if __name__ == "__main__":
    main()
