"""The documentation's settings table and its commands (curl, TLS, tokens, operations, bulk,
history), and
the Dockerfile's health check, run as written against real server processes. (The README's
grpcurl tour is run in test_server_process.py.)"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import trustme

from tests.process import GRPCURL, Server, running_server, server_env
from transaction_service.config import settings_table

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
COMMAND_TIMEOUT = 60.0


def sh_blocks(doc: str, heading: str) -> list[str]:
    """The ```sh blocks of the section of `docs/<doc>` under `heading` (up to the next
    heading)."""
    text = (DOCS / doc).read_text()
    section = text.split(f"{heading}\n", 1)[1]
    section = re.split(r"\n#{2,3} ", section, maxsplit=1)[0]
    return re.findall(r"```sh\n(.*?)```", section, re.DOTALL)


def commands(block: str) -> list[str]:
    """The block's commands, continuation lines joined, comments and blanks left out."""
    lines = block.replace("\\\n", " ").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def for_server(command: str, server: Server) -> str:
    return command.replace("localhost:50051", server.address).replace(
        "localhost:8080", f"localhost:{server.http_port}"
    )


def run_bash(script: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{GRPCURL.parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )


def test_readme_settings_table_is_generated_from_the_settings() -> None:
    """The table in docs/configuration.md is exactly `settings_table()`: regenerate it with
    `scripts/readme_settings.py` when a setting changes."""
    assert settings_table() in (DOCS / "configuration.md").read_text()


def test_readme_curl_example_signs_and_delivers_a_webhook(tmp_path: Path) -> None:
    """The curl example, run as written against a server with the README's secret, is applied;
    run again, it is a duplicate."""
    server_block, client_block = sh_blocks("webhooks.md", "## Try it with curl")
    secret = re.fullmatch(
        r"TRANSACTION_SERVICE_WEBHOOK_SECRETS=(\S+) make run", server_block.strip()
    )
    assert secret is not None, server_block
    assert f"SECRET={secret.group(1)}" in client_block
    env = server_env(TRANSACTION_SERVICE_WEBHOOK_SECRETS=secret.group(1))
    with running_server(tmp_path, "--grpc-port", "0", "--db", "x.db", env=env) as server:
        script = for_server(client_block, server)
        outcomes = []
        for _ in range(2):
            result = run_bash(script)
            assert result.returncode == 0, result.stderr
            outcomes.append(json.loads(result.stdout)["outcome"])
    assert outcomes == ["applied", "duplicate"]


def make_certificates(folder: Path) -> None:
    """The files the README's TLS lines name: a server certificate for localhost signed by
    ca.pem, and a client certificate signed by client-ca.pem."""
    server_ca, client_ca = trustme.CA(), trustme.CA()
    server_ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    client_ca.cert_pem.write_to_path(str(folder / "client-ca.pem"))
    for name, ca, identity in (
        ("server", server_ca, "localhost"),
        ("client", client_ca, "client@example.com"),
    ):
        issued = ca.issue_cert(identity)
        issued.cert_chain_pems[0].write_to_path(str(folder / f"{name}.pem"))
        issued.private_key_pem.write_to_path(str(folder / f"{name}.key"))


def test_readme_tls_and_token_examples_work_as_written(tmp_path: Path) -> None:
    """Each `serve` line of the security section is started as written (with free ports); the
    client lines under it all succeed against it."""
    make_certificates(tmp_path)
    for name in (".venv", "examples"):
        (tmp_path / name).symlink_to(ROOT / name)
    (block,) = sh_blocks("security.md", "# Secure the gRPC API")
    groups: list[tuple[str, list[str]]] = []
    for command in commands(block):
        if "transaction-service serve" in command:
            groups.append((command, []))
        else:
            groups[-1][1].append(command)
    assert len(groups) == 3, block

    outputs = []
    for serve_line, clients in groups:
        words = shlex.split(serve_line)
        at = next(i for i, w in enumerate(words) if w.endswith("transaction-service"))
        assignments = dict(w.split("=", 1) for w in words[:at])
        args = words[at + 2 :]  # after `transaction-service serve`
        env = server_env(**assignments)
        with running_server(tmp_path, *args, "--grpc-port", "0", "--db", "x.db", env=env) as server:
            assert clients, serve_line
            for client in clients:
                result = run_bash(for_server(client, server), cwd=tmp_path)
                assert result.returncode == 0, f"{client}\n{result.stdout}\n{result.stderr}"
                outputs.append(result.stdout)
            log = server.log_text()
        mode = "mutual TLS" if "--tls-client-ca" in args else "TLS" if args else "plaintext"
        assert f"grpc: {mode};" in log
        assert not any(token in log for token in assignments.values())
    # The read token got the transaction the ingest token wrote.
    assert "654d24d7-3252-5d9c-ac4c-723a3def2ebf" in outputs[-2]


def test_readme_operations_commands_work_as_written(tmp_path: Path) -> None:
    """The probes, metrics and health command lines of the operations section succeed."""
    (block,) = sh_blocks("operations.md", "# Operations")
    lines = commands(block)
    assert len(lines) == 4
    with running_server(tmp_path, "--grpc-port", "0", "--db", "x.db") as server:
        results = [run_bash(for_server(line, server)) for line in lines]
    for line, result in zip(lines, results, strict=True):
        assert result.returncode == 0, f"{line}\n{result.stdout}\n{result.stderr}"
    assert json.loads(results[1].stdout) == {"status": "ready"}
    assert "transaction_service_events_total{" in results[2].stdout
    assert results[3].stdout.strip() == "SERVING"


def test_dockerfile_health_check_runs_the_health_command(tmp_path: Path) -> None:
    """The image exposes both ports, and its HEALTHCHECK command, run with the port setting the
    container would have, says SERVING."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^EXPOSE 50051 8080$", dockerfile, re.MULTILINE)
    check = re.search(r"^HEALTHCHECK .*\\\n\s+CMD (\[.*\])$", dockerfile, re.MULTILINE)
    assert check is not None
    argv = json.loads(check.group(1))
    assert argv[:2] == ["transaction-service", "health"]
    with running_server(tmp_path, "--grpc-port", "0", "--db", "x.db") as server:
        env = server_env(TRANSACTION_SERVICE_GRPC_PORT=str(server.port))
        env["PATH"] = f"{GRPCURL.parent}{os.pathsep}{env['PATH']}"
        result = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
        )
    assert (result.returncode, result.stdout.strip()) == (0, "SERVING"), result.stderr


def test_readme_bulk_examples_work_as_written(tmp_path: Path) -> None:
    """The bulk section's ingest and BatchGetTransactions lines, as written, against a server:
    the fixtures go in, and the batch read finds the one order and marks the other lookup not
    found. (Its rebuild line is run by test_rebuild.py's command test.)"""
    ingest_block, rebuild_block = sh_blocks("bulk.md", "# Bulk: back-fills, replays, many lookups")
    assert "transaction-service rebuild --db" in rebuild_block
    with running_server(tmp_path, "--grpc-port", "0", "--db", "x.db") as server:
        for command in commands(ingest_block):
            result = run_bash(for_server(command, server))
            assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
    assert result.stdout.count('"found": true') == 1, result.stdout
    assert "654d24d7-3252-5d9c-ac4c-723a3def2ebf" in result.stdout


def test_history_examples_work_as_written(tmp_path: Path) -> None:
    """The history section's deliveries and questions, as written, against a server: the late
    webhook is STALE with its reason, the retry counted on it, the re-send STALE; the as-of
    read finds revision 1; the command prints the timeline and JSON lines."""
    deliver, ask = sh_blocks("history.md", "## Try it")
    with running_server(tmp_path, "--grpc-port", "0", "--db", "x.db") as server:
        for command in commands(deliver):
            result = run_bash(for_server(command, server))
            assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
        outputs = []
        for command in commands(ask):
            if command.startswith(".venv/bin/transaction-service"):
                command += f" --address {server.address}"
            result = run_bash(for_server(command, server))
            assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
            outputs.append(result.stdout)
    events = json.loads(outputs[0])["events"]
    assert [e["outcome"] for e in events] == [
        "INGEST_OUTCOME_APPLIED",
        "INGEST_OUTCOME_STALE",
        "INGEST_OUTCOME_STALE",
    ]
    assert events[1]["reason"] == (
        "older than order 654d24d7…'s `completed` at 2026-03-12T09:00:00Z"
    )
    assert events[1]["duplicateCount"] == "1"
    assert events[2]["reason"].startswith("a re-send: the same body was taken in before")
    assert json.loads(outputs[1])["transaction"]["revision"] == "1"
    timeline = outputs[2]
    assert "why: older than order 654d24d7…'s `completed` at 2026-03-12T09:00:00Z" in timeline
    assert "delivered again 1 time (DUPLICATE)" in timeline
    lines = [json.loads(line) for line in outputs[3].splitlines()]
    assert [line["event_id"] for line in lines] == [e["eventId"] for e in events]
