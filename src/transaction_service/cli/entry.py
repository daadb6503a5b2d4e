"""The `transaction-service` command's entry point: `health` runs on its own, everything else
through the whole command line (`cli/main.py`).

`health` is what container probes run, often, on busy machines; the whole CLI imports pydantic,
the settings and every command (about 500 modules). Only this module and `cli/health.py` are
imported for it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["health"]:
        from transaction_service.cli.health import main as health

        return health(args[1:])
    from transaction_service.cli.main import main as everything

    return everything(args)


if __name__ == "__main__":
    sys.exit(main())
