"""The client distribution on its own: a fresh virtual environment with only `./client`
installed (by uv, which resolves its declared dependencies as `pip install ./client` does)
imports it, holds none of the server's dependencies, and lets mypy type-check a consumer
(messages, stubs and the client are typed: a wrong type is caught)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INSTALL_TIMEOUT = 600
UV = Path(sys.executable).parent / "uv"

CONSUMER = """
from __future__ import annotations

from transaction_client import TransactionClient, TransactionChange
from transactions.v1 import transactions_pb2 as pb


async def newest(client: TransactionClient) -> int:
    page = await client.call(client.stub.ListTransactions, pb.ListTransactionsRequest(page_size=1))
    found = await client.get_transaction(order_id="o")
    async for item in client.watch_transactions(kinds=[pb.CHANGE_KIND_TRANSACTION_COMPLETED]):
        if isinstance(item, TransactionChange):
            return item.revision + found.revision
    return page.revision


async def wrong(client: TransactionClient) -> str:
    found = await client.get_transaction(order_id="o")
    return found.revision  # the one mistake mypy must find
"""


def run(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT,
        check=False,
    )


def test_the_client_installs_alone_imports_and_type_checks_a_consumer(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    python = venv / "bin" / "python"
    # uv (a dev dependency) makes the environment and installs the client's declared
    # dependencies as pip would, in a tenth of pip's time (3 s against 25 s here).
    made = run(UV, "venv", "--quiet", "--python", sys.executable, venv)
    assert made.returncode == 0, made.stderr
    installed = run(UV, "pip", "install", "--quiet", "--python", python, ROOT / "client")
    assert installed.returncode == 0, installed.stderr

    listed = run(UV, "pip", "list", "--format=json", "--python", python, cwd=tmp_path)
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert {"transaction-service-client", "grpcio", "protobuf", "googleapis-common-protos"} <= names
    server_only = {"transaction-service", "aiohttp", "asyncpg", "pydantic", "uvloop", "httpx"}
    assert names.isdisjoint(server_only), names & server_only

    imported = run(
        python,
        "-c",
        "import transaction_client, transaction_client.sync, transactions.v1",
        cwd=tmp_path,
    )
    assert imported.returncode == 0, imported.stderr

    consumer = tmp_path / "consumer.py"
    consumer.write_text(CONSUMER)
    checked = run(
        sys.executable,
        "-m",
        "mypy",
        "--strict",
        "--no-incremental",
        "--python-executable",
        python,
        consumer,
        ROOT / "examples" / "follow_order.py",
        cwd=tmp_path,
    )
    errors = [line for line in checked.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1, checked.stdout
    assert errors[0].startswith("consumer.py:")
    assert 'Incompatible return value type (got "int", expected "str")' in errors[0]
