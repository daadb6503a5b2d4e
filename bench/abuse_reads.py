"""Issue 16, item 5: read amplification and the Junction budget, measured against a real server
process (SQLite), so a change can be compared before and after with the same command.

Run: `.venv/bin/python bench/abuse_reads.py [--only batch,pdf] [--json PATH] [--set name=value]`

Rows:
 batch  a transaction of about 100 KB on the wire (50 orders with 1,000-character ids); 8
        concurrent BatchGetTransactions of 500 lookups of it, 3 rounds: the server's peak
        resident memory growth, and what the calls got. Then the same with 100 such
        transactions, each looked up 5 times in every call.
 pdf    a fake Junction (tests/fake_junction.py) serving a 1 MiB results PDF; ReconcileTransaction
        latency alone (median of 5), then with 4 GetTransactionResultsPdf streams open that never
        read (and again with 8): the latency, whether it finished, and how many PDF requests
        reached Junction. Then 20 PDF calls for an id the service does not know: how many
        reached Junction.

To measure a version of the service other than the checked-out one, put its `src` and
`client/src` first on PYTHONPATH: the server processes inherit the environment.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from abuse import rows_main, serve

from tests.fake_junction import FakeJunction
from tests.read_tools import batch_attack, stalled_pdf_readers

API_KEY = "bench-junction-key"


async def row_batch(folder: Path, extra: dict[str, str]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for distinct in (1, 100):
        with serve(folder, extra) as (process, grpc_port, _):
            address = f"127.0.0.1:{grpc_port}"
            attack = await batch_attack(address, process.process.pid, distinct=distinct)
        results[f"distinct_{distinct}"] = attack.summary()
    return results


async def row_pdf(folder: Path, extra: dict[str, str]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with FakeJunction(api_key=API_KEY) as fake:
        settings = {"junction_api_key": API_KEY, "junction_base_url": fake.base_url}
        with serve(folder, extra, **settings) as (_, grpc_port, _):
            address = f"127.0.0.1:{grpc_port}"
            for readers in (4, 8):
                outcome = await stalled_pdf_readers(fake, address, readers=readers)
                results[f"stalled_{readers}"] = outcome
    return results


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(rows_main(__doc__, {"batch": row_batch, "pdf": row_pdf}))
